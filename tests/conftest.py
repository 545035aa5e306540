"""Shared fixtures: the same case run against the standard library and cpool, per start method."""
import importlib
import os
import signal
import sys
import time

import pytest

START_METHODS = ['fork', 'spawn', 'forkserver']


# CPOOL_TEST_DEFAULT_START=forkserver runs the suite with that start method as the default of
# both libraries, as Python 3.14 makes it on Linux: what 3.14 users get, tested on any Python.
_DEFAULT_START = os.environ.get('CPOOL_TEST_DEFAULT_START')


def pytest_configure(config):
    # The Ctrl-C tests need Python's own SIGINT handler here and in the programs they start. A
    # suite started with SIGINT ignored (`cmd &` in a script, nohup) would inherit SIG_IGN, and
    # children keep ignored signals as the standard library's do: put the default back first.
    # (Here, not at import: worker processes import this module too, some from a thread.)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if not _DEFAULT_START:
        return
    if _DEFAULT_START not in START_METHODS:
        raise pytest.UsageError('CPOOL_TEST_DEFAULT_START must be one of %s, not %r'
                                % (START_METHODS, _DEFAULT_START))
    import multiprocessing
    import cpool
    multiprocessing.set_start_method(_DEFAULT_START, force=True)
    cpool.set_start_method(_DEFAULT_START, force=True)


def pytest_report_header(config):
    if _DEFAULT_START:
        return 'default start method (CPOOL_TEST_DEFAULT_START): %s' % _DEFAULT_START


@pytest.fixture(params=['multiprocessing', 'cpool'])
def mpmod(request):
    """The module under test: the standard library's multiprocessing, then cpool."""
    return importlib.import_module(request.param)


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


@pytest.fixture
def ctx(mpmod, start_method):
    """A context of mpmod for each start method (differential tests run on all six)."""
    return mpmod.get_context(start_method)


@pytest.fixture
def cctx(start_method):
    """A cpool context for each start method (cpool-only tests)."""
    import cpool
    return cpool.get_context(start_method)


def open_fds():
    """The fds open in this process (for leak checks)."""
    return set(int(x) for x in os.listdir('/proc/self/fd'))


def sigint_after(delay, sent=None):
    """SIGINT to this process's main thread after delay seconds, from a daemon thread (the main
    thread gets KeyboardInterrupt); the moment it was sent is appended to `sent` if given. The
    thread. Directed at the main thread: a process-wide kill() may be taken by another thread
    (the sender itself when the main one has a signal pending), and then nothing interrupts the
    main thread's blocking call, so KeyboardInterrupt surfaces late -- in a later test, once."""
    import threading
    main = threading.main_thread().ident

    def fire():
        time.sleep(delay)
        if sent is not None:
            sent.append(time.monotonic())
        signal.pthread_kill(main, signal.SIGINT)
    t = threading.Thread(target=fire, daemon=True)
    t.start()
    return t


def call_with_sigint(op, after):
    """(result, latency): op() with SIGINT sent to the main thread `after` s into it. When it
    landed inside op, latency is the time from SIGINT to KeyboardInterrupt and op() runs once
    more, as a caller retrying after Ctrl-C; else latency is None."""
    sent, got = [], []
    t = sigint_after(after, sent)
    try:
        got.append(op())
        t.join()
        time.sleep(0.01)  # a signal that came after op() returned lands here, outside it
    except KeyboardInterrupt:
        latency = time.monotonic() - sent[0]
        t.join()
        if not got:
            return op(), latency
    return got[0], None


def zombies():
    """Pids of this process's children that have exited and not been reaped."""
    me = os.getpid()
    out = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[0] == 'Z' and int(fields[1]) == me:
            out.append(int(pid))
    return out


def running(pid):
    """Whether pid runs: a zombie (exited, not yet reaped by whoever inherited it) does not."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False


# ---- at the end of the session: nothing the tests made is left in /dev/shm ----

_shm_at_start = set()


def _shm_entries():
    try:
        return set(os.listdir('/dev/shm'))
    except FileNotFoundError:
        return set()


def _shm_held_by_others():
    """Names under /dev/shm that a living process other than this one has open or mapped (this
    machine runs other test sessions at the same time: their live segments are not ours)."""
    held = set()
    me = str(os.getpid())
    for pid in os.listdir('/proc'):
        if not pid.isdigit() or pid == me:
            continue
        try:
            for fd in os.listdir('/proc/%s/fd' % pid):
                target = os.readlink('/proc/%s/fd/%s' % (pid, fd))
                if target.startswith('/dev/shm/'):
                    held.add(target[len('/dev/shm/'):].split(' (deleted)')[0])
            with open('/proc/%s/maps' % pid) as f:
                for line in f:
                    at = line.find('/dev/shm/')
                    if at >= 0:
                        held.add(line[at + len('/dev/shm/'):].split()[0])
        except OSError:
            continue
    return held


def pytest_sessionstart(session):
    _shm_at_start.update(_shm_entries())


def pytest_sessionfinish(session, exitstatus):
    # The standard library's named semaphores (sem.*) are not made by cpool; killed stdlib
    # processes of any session on the machine leave them behind.
    def left_over():
        return {n for n in _shm_entries() - _shm_at_start if not n.startswith('sem.')}
    left = left_over()
    # Segments of programs the tests ran are unlinked by their watcher just after they end.
    for _ in range(100):
        if not left:
            return
        time.sleep(0.1)
        left = left_over()
    left -= _shm_held_by_others()
    if left:
        sys.stderr.write('\nshared memory left in /dev/shm by the tests: %s\n'
                         % ', '.join(sorted(left)))
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
