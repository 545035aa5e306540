"""Fault cases of the synchronisation objects, Listener and forkserver: a lock holder whose pid
was reused, barrier parties and condition waiters killed, silent clients, a killed forkserver
parent. Counts of what was delivered decide, not timings (bounds are generous)."""
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- forkserver: nothing left in the temp folder when the parent is SIGKILLed ----

_FORKSERVER_PARENT = textwrap.dedent('''
    import sys, time
    import cpool
    ctx = cpool.get_context('forkserver')
    p = ctx.Process(target=time.sleep, args=(30,))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
''')


def _pymp_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), 'pymp-*')))


def test_forkserver_dir_removed_after_parent_sigkill():
    before = _pymp_dirs()
    env = dict(os.environ, PYTHONPATH=ROOT)
    parent = subprocess.Popen([sys.executable, '-c', _FORKSERVER_PARENT], env=env,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        created = _pymp_dirs() - before
        assert created, 'the forkserver made no socket directory'
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 1.0
        while (_pymp_dirs() & created) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (_pymp_dirs() & created)
    finally:
        parent.kill()
        parent.wait(10)
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


# ---- Listener: a silent peer does not hold up the clients behind it ----

def _client_in_thread(connection_mod, address, authkey, got):
    def run():
        try:
            c = connection_mod.Client(address, authkey=authkey)
            got.append(c.recv())
            c.close()
        except Exception as e:  # the assertion on got says what happened
            got.append(e)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize('family', ['AF_UNIX', 'AF_INET'])
def test_silent_clients_do_not_delay_a_legitimate_one(family):
    # The standard library blocks in accept() for ever behind the first silent client (it
    # reads the answer with no deadline): no differential case, cpool must do better.
    from cpool import connection as cc
    with cc.Listener(family=family, authkey=b'key') as listener:
        accepted = []

        def accept():
            c = listener.accept()
            accepted.append(c)
            c.send('hello')
        # accept() runs first, as in a server: the default backlog of 1 would make the
        # silent connects themselves wait otherwise.
        a = threading.Thread(target=accept, daemon=True)
        a.start()
        silent = []
        for _ in range(3):
            s = socket.socket(getattr(socket, family))
            s.connect(listener.address)
            silent.append(s)
        time.sleep(0.2)  # let accept() take them (and send them their challenges)
        got = []
        t = _client_in_thread(cc, listener.address, b'key', got)
        a.join(5)
        t.join(5)
        assert len(accepted) == 1 and got == ['hello']
        # The silent ones are still pending, not accepted; a second legitimate client too
        # gets through while they stay silent.
        got2 = []
        t2 = _client_in_thread(cc, listener.address, b'key', got2)
        c2 = listener.accept()
        c2.send('again')
        t2.join(5)
        assert got2 == ['again']
        assert len(listener._listener._pending) == 3
        for c in accepted + [c2]:
            c.close()
        for s in silent:
            s.close()


def test_silent_client_then_wrong_key_then_right_key():
    from cpool import connection as cc
    import cpool
    with cc.Listener(authkey=b'key') as listener:
        silent = socket.socket(socket.AF_UNIX)
        silent.connect(listener.address)
        bad = []
        tb = _client_in_thread(cc, listener.address, b'wrong', bad)
        with pytest.raises(cpool.AuthenticationError):
            listener.accept()
        tb.join(5)
        assert len(bad) == 1 and isinstance(bad[0], cpool.AuthenticationError)
        good = []
        tg = _client_in_thread(cc, listener.address, b'key', good)
        c = listener.accept()
        c.send(42)
        tg.join(5)
        assert good == [42]
        c.close()
        silent.close()


# ---- a dead lock holder whose pid was given to a new process ----

def _hold_and_hang(lock, ready):
    lock.acquire()
    ready.set()
    time.sleep(60)


def _acquire_and_report(lock, out):
    import warnings
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter('always')
        out[0] = int(lock.acquire(timeout=10))
        out[1] = sum('died' in str(x.message) for x in w)
        out[2] = os.getpid()
    lock.release()


def _with_pid(pid, start):
    """Run start() with the next pid set to pid (root: /proc/sys/kernel/ns_last_pid); returns
    what start() returned, or None when another process on the machine took the pid first."""
    for _ in range(50):
        with open('/proc/sys/kernel/ns_last_pid', 'w') as f:
            f.write(str(pid - 1))
        made = start()
        if made.pid == pid:
            return made
        made.kill()
        made.wait() if hasattr(made, 'wait') else made.join(10)
    return None


def _killed_holder(cpool, kind):
    lock = getattr(cpool, kind)()
    ready = cpool.Event()
    p = cpool.get_context('fork').Process(target=_hold_and_hang, args=(lock, ready))
    p.start()
    assert ready.wait(30)
    p.kill()
    p.join(10)  # reaped: the pid is free to be reused
    # Start times count clock ticks (10 ms): a real pid reuse needs the pid space to wrap,
    # which takes far longer; forcing the pid with ns_last_pid at once could land in the
    # same tick, so the new process is made a few ticks later.
    time.sleep(0.05)
    return lock, p.pid


needs_pid_control = pytest.mark.skipif(
    not os.access('/proc/sys/kernel/ns_last_pid', os.W_OK),
    reason='pid reuse needs a writable /proc/sys/kernel/ns_last_pid (root)')


@needs_pid_control
@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'Condition'])
def test_dead_holder_with_reused_pid_is_dead(kind):
    import cpool
    from cpool.synchronize import OwnerDiedWarning
    lock, pid = _killed_holder(cpool, kind)
    impostor = _with_pid(pid, lambda: subprocess.Popen(['sleep', '60']))
    if impostor is None:
        pytest.skip('pid %d was taken by another process each time' % pid)
    try:
        assert getattr(lock, '_lock', lock)._semlock._owner_pid == pid
        with pytest.warns(OwnerDiedWarning, match='died'):
            assert lock.acquire(timeout=5) is True
        lock.release()
        assert impostor.poll() is None  # the unrelated process was alive all along
    finally:
        impostor.kill()
        impostor.wait()


@needs_pid_control
def test_acquirer_given_the_dead_holders_pid_takes_the_lock():
    import cpool
    lock, pid = _killed_holder(cpool, 'Lock')
    out = cpool.Array('i', 3)
    ctx = cpool.get_context('fork')

    def start():
        p = ctx.Process(target=_acquire_and_report, args=(lock, out))
        p.start()
        return p
    p = _with_pid(pid, start)
    if p is None:
        pytest.skip('pid %d was taken by another process each time' % pid)
    p.join(30)
    assert list(out) == [1, 1, pid]
    assert lock.acquire(timeout=1) is True  # and the new holder released it
    lock.release()


def test_live_holder_is_not_taken_for_dead():
    # The start time must match for a live holder: a waiter times out, takes nothing.
    import cpool
    import warnings
    lock = cpool.Lock()
    ready = cpool.Event()
    p = cpool.get_context('fork').Process(target=_hold_and_hang, args=(lock, ready))
    p.start()
    try:
        assert ready.wait(30)
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            assert lock.acquire(timeout=0.5) is False
        assert lock._semlock._owner_pid == p.pid
    finally:
        p.kill()
        p.join(10)
