"""Fault cases of the synchronisation objects, Listener and forkserver: a lock holder whose pid
was reused, barrier parties and condition waiters killed, silent clients, a killed forkserver
parent. Counts of what was delivered decide, not timings (bounds are generous)."""
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
    print(p.pid, cpool.util.get_temp_dir(), flush=True)
    time.sleep(60)
''')


def test_forkserver_dir_removed_after_parent_sigkill():
    env = dict(os.environ, PYTHONPATH=ROOT)
    parent = subprocess.Popen([sys.executable, '-c', _FORKSERVER_PARENT], env=env,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child, tempdir = parent.stdout.readline().split()
        child = int(child)
        # The server's socket lives in the parent's private temp dir (other processes on the
        # machine make their own pymp-* dirs: only this one is looked at).
        assert tempdir.startswith(tempfile.gettempdir())
        assert any(n.startswith('fs-') for n in os.listdir(tempdir))
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 1.0
        while os.path.exists(tempdir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not os.path.exists(tempdir)
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
    for _ in range(10):
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


def _holder_and_successor(cpool, kind, start, made=None):
    """(lock, pid, process): a lock whose holder was killed, and a process made by start()
    that was given the holder's pid. Another process on the machine may take the pid first
    (threads take pids too): a new holder is tried then, and the test skipped if that never
    works."""
    for _ in range(5):
        lock, pid = _killed_holder(cpool, kind)
        if made is not None:
            made['lock'] = lock
        successor = _with_pid(pid, start)
        if successor is not None:
            return lock, pid, successor
    pytest.skip('the holder\'s pid was taken by another process each time')


needs_pid_control = pytest.mark.skipif(
    not os.access('/proc/sys/kernel/ns_last_pid', os.W_OK),
    reason='pid reuse needs a writable /proc/sys/kernel/ns_last_pid (root)')


@needs_pid_control
@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'Condition'])
def test_dead_holder_with_reused_pid_is_dead(kind):
    import cpool
    from cpool.synchronize import OwnerDiedWarning
    lock, pid, impostor = _holder_and_successor(
        cpool, kind, lambda: subprocess.Popen(['sleep', '60']))
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
    out = cpool.Array('i', 3)
    ctx = cpool.get_context('fork')
    made = {}

    def start():
        p = ctx.Process(target=_acquire_and_report, args=(made['lock'], out))
        p.start()
        return p
    lock, pid, p = _holder_and_successor(cpool, 'Lock', start, made)
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


# ---- a barrier party or a condition waiter killed while it sleeps ----

def _barrier_wait_report(barrier, results, times):
    import threading
    try:
        barrier.wait(20)
        kind = 0
    except threading.BrokenBarrierError:
        kind = 1
    with results.get_lock():
        results[kind] += 1
    times[os.getpid() % len(times)] = time.monotonic()


def _sleeping_in(cond_like, n):
    # How many sleepers cond_like (a Condition, or a Barrier's) has enlisted.
    cond = getattr(cond_like, '_cond', cond_like)
    if hasattr(cond, '_waiters'):
        sleeping = cond._waiters._sleeping
    else:  # the standard library's counters (cpool before its waiters' table)
        def sleeping():
            return cond._sleeping_count.get_value() - cond._woken_count.get_value()
    deadline = time.monotonic() + 30
    while sleeping() < n and time.monotonic() < deadline:
        time.sleep(0.01)
    return sleeping()


def test_barrier_party_killed_while_others_wait_breaks_it():
    import cpool
    ctx = cpool.get_context('fork')
    barrier = ctx.Barrier(3)
    results = ctx.Array('i', 2)  # [passed, broken]
    times = ctx.Array('d', 1 << 16, lock=False)
    doomed = ctx.Process(target=barrier.wait)
    doomed.start()
    assert _sleeping_in(barrier, 1) == 1
    waiter = ctx.Process(target=_barrier_wait_report, args=(barrier, results, times))
    waiter.start()
    assert _sleeping_in(barrier, 2) == 2
    killed_at = time.monotonic()
    doomed.kill()  # not reaped: a zombie party is as dead
    waiter.join(5)
    assert list(results) == [0, 1]
    assert times[waiter.pid % len(times)] - killed_at < 1.0
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(10)  # the third party: broken at once, not after its timeout
    assert time.monotonic() - t0 < 1.0
    assert barrier.broken and barrier.n_waiting == 0
    doomed.join(5)
    barrier.reset()  # the dead party's count was given back: the barrier works again
    parties = [ctx.Process(target=_barrier_wait_report, args=(barrier, results, times))
               for _ in range(2)]
    for p in parties:
        p.start()
    barrier.wait(10)
    for p in parties:
        p.join(10)
    assert list(results) == [2, 1]


def test_barrier_last_party_after_a_death_breaks_instead_of_passing():
    import cpool
    ctx = cpool.get_context('fork')
    barrier = ctx.Barrier(2)
    doomed = ctx.Process(target=barrier.wait)
    doomed.start()
    assert _sleeping_in(barrier, 1) == 1
    doomed.kill()
    doomed.join(5)
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(10)
    assert time.monotonic() - t0 < 1.0


def _cond_wait_report(cond, woken):
    with cond:
        if cond.wait(20):
            with woken.get_lock():
                woken.value += 1


@pytest.mark.parametrize('how', ['notify', 'notify_all'])
def test_notify_passes_over_a_killed_waiter(how):
    # The standard library's notify waits for ever for the killed waiter to answer.
    import cpool
    ctx = cpool.get_context('fork')
    cond = ctx.Condition()
    woken = ctx.Value('i', 0)
    doomed = ctx.Process(target=_cond_wait_report, args=(cond, woken))
    doomed.start()
    assert _sleeping_in(cond, 1) == 1  # the oldest sleeper: notify(1) picks it first
    live = ctx.Process(target=_cond_wait_report, args=(cond, woken))
    live.start()
    assert _sleeping_in(cond, 2) == 2
    doomed.kill()
    doomed.join(5)
    t0 = time.monotonic()
    with cond:
        getattr(cond, how)()
    assert time.monotonic() - t0 < 0.5
    live.join(5)
    assert woken.value == 1 and live.exitcode == 0
    assert _sleeping_in(cond, 0) == 0  # the dead one's slot was given back


def test_notify_wakes_only_those_asleep_before_it():
    # Without acknowledgements, a waiter that arrives after notify() must still not take the
    # wake-up: two sleepers, notify(1), then a third sleeper; exactly one of the first two wakes.
    import cpool
    ctx = cpool.get_context('fork')
    cond = ctx.Condition()
    woken = ctx.Value('i', 0)
    first = [ctx.Process(target=_cond_wait_report, args=(cond, woken)) for _ in range(2)]
    for p in first:
        p.start()
    assert _sleeping_in(cond, 2) == 2
    with cond:
        cond.notify(1)
        late = ctx.Process(target=_cond_wait_report, args=(cond, woken))
        late.start()
    assert _sleeping_in(cond, 2) == 2  # one of the first and the late one
    deadline = time.monotonic() + 10
    while woken.value < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert woken.value == 1
    late.join(0.1)
    assert late.is_alive()
    with cond:
        cond.notify_all()
    for p in first + [late]:
        p.join(10)
    assert woken.value == 3
