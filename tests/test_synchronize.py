"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event, Barrier: the same cases on
multiprocessing and cpool (differential), contention between processes, and what goes wrong:
a holder SIGKILLed, Ctrl-C during a blocking wait, many locks created and dropped."""
import gc
import os
import pickle
import signal
import threading
import time
import warnings

import pytest

from conftest import open_fds, sigint_after


# ---- run in children (module level, so spawn and forkserver can find them) ----

def _count_under_lock(lock, value, n):
    for _ in range(n):
        with lock:
            value.value += 1


def _admitted(sem, guard, inside, peak, n):
    for _ in range(n):
        with sem:
            with guard:
                inside.value += 1
                peak.value = max(peak.value, inside.value)
            time.sleep(0.002)
            with guard:
                inside.value -= 1


def _barrier_party(barrier, out, i):
    out[i] = barrier.wait(20)


def _hold_and_hang(lock, ready):
    lock.acquire()
    ready.set()
    time.sleep(60)


def _cond_sleeper(cond, started, woken):
    with cond:
        started.release()
        if cond.wait(20):
            with woken.get_lock():
                woken.value += 1


def _set_after(event, delay):
    time.sleep(delay)
    event.set()


def _wait_in_barrier(barrier, ready):
    ready.set()
    barrier.wait()


def _child_view_of_rlock(rlock, out):
    out[0] = int(rlock._semlock._is_mine())
    out[1] = rlock._semlock._count()
    out[2] = int(rlock.acquire(timeout=0.2))


def _use_all(lock, rlock, sem, event, cond, out):
    with lock:
        out[0] = 1
    with rlock:
        with rlock:
            out[1] = 1
    out[2] = int(sem.acquire(timeout=5))
    with cond:
        cond.notify_all()
    event.set()


def _start(ctx, target, args):
    p = ctx.Process(target=target, args=args)
    p.start()
    return p


# ---- Lock and RLock ----

def test_lock_api(mpmod):
    lock = mpmod.Lock()
    assert repr(lock) == '<Lock(owner=None)>'
    assert lock.acquire() is True
    assert repr(lock) == '<Lock(owner=MainProcess)>'
    assert lock.acquire(False) is False
    assert lock.acquire(block=False) is False
    assert lock.acquire(True, 0) is False
    assert lock.acquire(timeout=-1) is False
    t0 = time.monotonic()
    assert lock.acquire(False, 5) is False  # a non-blocking acquire ignores the timeout
    assert lock.acquire(timeout=0.1) is False
    assert 0.08 <= time.monotonic() - t0 < 2
    # Another thread may release a Lock; releasing it once more is an error.
    t = threading.Thread(target=lock.release)
    t.start()
    t.join()
    with pytest.raises(ValueError, match='released too many times'):
        lock.release()
    with lock:
        assert lock._semlock._is_mine()
    assert lock.acquire(timeout=None) is True
    lock.release()
    with pytest.raises(TypeError):
        lock.acquire(blocking=False)


def test_rlock_api(mpmod):
    rlock = mpmod.RLock()
    assert repr(rlock) == '<RLock(None, 0)>'
    assert rlock.acquire() and rlock.acquire(False) and rlock.acquire(timeout=0)
    assert repr(rlock) == '<RLock(MainProcess, 3)>'
    assert rlock._semlock._count() == 3
    errors = []

    def other():
        try:
            rlock.release()
        except AssertionError as e:
            errors.append(str(e))
        errors.append(rlock.acquire(timeout=0.05))

    t = threading.Thread(target=other)
    t.start()
    t.join()
    assert errors == ['attempt to release recursive lock not owned by thread', False]
    for _ in range(3):
        rlock.release()
    with pytest.raises(AssertionError):
        rlock.release()
    with rlock:
        with rlock:
            assert rlock._semlock._is_mine()
    assert not rlock._semlock._is_mine()


@pytest.mark.parametrize('start_method', ['fork'])
def test_rlock_state_is_per_process(ctx):
    rlock = ctx.RLock()
    out = ctx.Array('i', 3, lock=False)
    with rlock:
        p = _start(ctx, _child_view_of_rlock, (rlock, out))
        p.join()
    assert list(out) == [0, 0, 0]


def test_rlock_held_by_parent_is_not_mine_in_an_os_fork_child():
    import cpool
    rlock = cpool.RLock()
    out = cpool.Array('i', 3, lock=False)
    with rlock:
        pid = os.fork()
        if pid == 0:
            try:
                _child_view_of_rlock(rlock, out)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
    assert list(out) == [0, 0, 0]


# ---- Semaphore and BoundedSemaphore ----

def test_semaphore_api(mpmod):
    sem = mpmod.Semaphore(2)
    assert sem.get_value() == 2 and repr(sem) == '<Semaphore(value=2)>'
    assert sem.acquire() and sem.acquire(timeout=1)
    assert sem.acquire(False) is False and sem.acquire(timeout=0.05) is False
    sem.release()
    sem.release()
    sem.release()  # an unbounded semaphore goes above its start value
    assert sem.get_value() == 3
    with sem:
        assert sem.get_value() == 2
    assert mpmod.Semaphore().get_value() == 1
    assert mpmod.Semaphore(0).acquire(timeout=0) is False


def test_bounded_semaphore_api(mpmod):
    sem = mpmod.BoundedSemaphore(2)
    assert repr(sem) == '<BoundedSemaphore(value=2, maxvalue=2)>'
    with pytest.raises(ValueError, match='released too many times'):
        sem.release()
    sem.acquire()
    sem.release()
    assert sem.get_value() == 2
    zero = mpmod.BoundedSemaphore(0)
    assert zero.acquire(False) is False
    with pytest.raises(ValueError):
        zero.release()


@pytest.mark.parametrize('make', [lambda m: m.Semaphore(-1), lambda m: m.BoundedSemaphore(-1),
                                  lambda m: m.Semaphore(2 ** 31)])
def test_bad_semaphore_values_raise_as_stdlib(mpmod, make):
    import multiprocessing
    with pytest.raises(Exception) as ref:
        make(multiprocessing)
    with pytest.raises(type(ref.value)):
        make(mpmod)


# ---- Event ----

def test_event_api(mpmod):
    ev = mpmod.Event()
    assert ev.is_set() is False and 'unset' in repr(ev)
    assert ev.wait(0) is False and ev.wait(-1) is False and ev.wait(timeout=0.05) is False
    ev.set()
    assert ev.is_set() is True and ev.wait() is True and ev.wait(0) is True and 'set' in repr(ev)
    ev.set()
    ev.clear()
    assert ev.is_set() is False
    timer = threading.Timer(0.1, ev.set)
    timer.start()
    assert ev.wait(10) is True
    timer.join()  # no thread left behind to make later forks warn


def test_event_set_by_other_process(ctx):
    ev = ctx.Event()
    p = _start(ctx, _set_after, (ev, 0.1))
    assert ev.wait(30) is True
    p.join()
    assert p.exitcode == 0


def test_event_set_then_cleared_still_wakes_waiter():
    # A waiter that slept through set()+clear() learns the flag was set, as threading.Event.
    import cpool
    ev = cpool.Event()
    got = []
    t = threading.Thread(target=lambda: got.append(ev.wait(10)))
    t.start()
    time.sleep(0.2)
    ev.set()
    ev.clear()
    t.join()
    assert got == [True]


# ---- Condition ----

def test_condition_api(mpmod):
    cond = mpmod.Condition()
    with pytest.raises(AssertionError):
        cond.wait(0.01)
    with pytest.raises(AssertionError):
        cond.notify()
    with cond:
        t0 = time.monotonic()
        assert cond.wait(0.1) is False
        assert time.monotonic() - t0 >= 0.08
        cond.notify()
        cond.notify_all()
        assert cond.wait_for(lambda: 42) == 42
        assert cond.wait_for(lambda: False, timeout=0.05) is False
    assert cond.acquire() is True
    cond.release()
    assert repr(cond).startswith('<Condition(<RLock(')
    # A Condition over a Lock of one's own.
    lock = mpmod.Lock()
    cond = mpmod.Condition(lock)
    with cond:
        assert lock._semlock._is_mine()
        assert cond.wait(0.01) is False


def test_condition_with_threads(mpmod):
    cond = mpmod.Condition()
    state = []

    def waiter():
        with cond:
            state.append(cond.wait_for(lambda: len(state) >= 1 and state[0] == 'go', 10))

    threads = [threading.Thread(target=waiter) for _ in range(3)]
    for t in threads:
        t.start()
    time.sleep(0.2)
    with cond:
        state.insert(0, 'go')
        cond.notify_all()
    for t in threads:
        t.join()
    assert state == ['go', True, True, True]


@pytest.mark.parametrize('start_method', ['fork'])
def test_condition_notify_n_wakes_n_processes(ctx):
    cond = ctx.Condition()
    started = ctx.Semaphore(0)
    woken = ctx.Value('i', 0)
    procs = [_start(ctx, _cond_sleeper, (cond, started, woken)) for _ in range(3)]
    for _ in procs:
        assert started.acquire(timeout=30)
    with cond:  # every sleeper is now inside wait(): it released the lock we hold
        cond.notify(1)
    deadline = time.monotonic() + 10
    while woken.value < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert woken.value == 1
    with cond:
        cond.notify(5)
    for p in procs:
        p.join(30)
    assert woken.value == 3
    assert [p.exitcode for p in procs] == [0, 0, 0]


# ---- Barrier ----

def test_barrier_api_with_threads(mpmod):
    calls = []
    barrier = mpmod.Barrier(3, action=lambda: calls.append(1), timeout=10)
    assert barrier.parties == 3 and barrier.n_waiting == 0 and barrier.broken is False
    out = []
    threads = [threading.Thread(target=lambda: out.append(barrier.wait())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(out) == [0, 1, 2] and calls == [1]
    # abort breaks it for waiters and newcomers; reset mends it
    errors = []

    def waiter():
        try:
            barrier.wait()
        except threading.BrokenBarrierError:
            errors.append('broken')

    t = threading.Thread(target=waiter)
    t.start()
    deadline = time.monotonic() + 10
    while barrier.n_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert barrier.n_waiting == 1
    barrier.abort()
    t.join()
    assert errors == ['broken'] and barrier.broken
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait()
    barrier.reset()
    assert not barrier.broken
    # a timeout breaks the barrier
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(0.1)
    assert barrier.broken


def test_barrier_releases_all_processes(ctx):
    barrier = ctx.Barrier(3)
    out = ctx.Array('i', [-1] * 3, lock=False)
    procs = [_start(ctx, _barrier_party, (barrier, out, i)) for i in range(2)]
    out[2] = barrier.wait(30)
    for p in procs:
        p.join(30)
    assert sorted(out) == [0, 1, 2]
    assert [p.exitcode for p in procs] == [0, 0]


# ---- pickling only through inheritance ----

@pytest.mark.parametrize('factory', ['Lock', 'RLock', 'Semaphore', 'BoundedSemaphore',
                                     'Condition', 'Event', 'Barrier'])
def test_pickling_outside_spawning_raises_runtimeerror(mpmod, factory):
    obj = getattr(mpmod, factory)(*((2,) if factory == 'Barrier' else ()))
    with pytest.raises(RuntimeError, match='through inheritance'):
        pickle.dumps(obj)


def test_objects_reach_children_as_process_args(cctx):
    lock, rlock, sem = cctx.Lock(), cctx.RLock(), cctx.Semaphore(1)
    event, cond = cctx.Event(), cctx.Condition()
    out = cctx.Array('i', 3, lock=False)
    p = _start(cctx, _use_all, (lock, rlock, sem, event, cond, out))
    assert event.wait(30)
    p.join(30)
    assert p.exitcode == 0 and list(out) == [1, 1, 1]
    assert sem.get_value() == 0


# ---- contention between processes ----

@pytest.mark.parametrize('start_method', ['fork'])
def test_counter_under_lock_is_exact(ctx):
    lock = ctx.Lock()
    value = ctx.Value('i', 0, lock=False)
    procs = [_start(ctx, _count_under_lock, (lock, value, 3000)) for _ in range(4)]
    for p in procs:
        p.join(60)
    assert value.value == 12000


@pytest.mark.parametrize('start_method', ['fork'])
def test_semaphore_admits_at_most_k(ctx):
    sem = ctx.Semaphore(2)
    guard = ctx.Lock()
    inside = ctx.Value('i', 0, lock=False)
    peak = ctx.Value('i', 0, lock=False)
    procs = [_start(ctx, _admitted, (sem, guard, inside, peak, 30)) for _ in range(4)]
    for p in procs:
        p.join(60)
    assert peak.value == 2 and inside.value == 0 and sem.get_value() == 2


# ---- faults: a holder killed, Ctrl-C ----

@pytest.mark.parametrize('kind', ['Lock', 'RLock', 'Condition'])
def test_holder_killed_does_not_lock_others_out(kind):
    import cpool
    from cpool.synchronize import OwnerDiedWarning
    lock = getattr(cpool, kind)()
    ready = cpool.Event()
    p = _start(cpool, _hold_and_hang, (lock, ready))
    assert ready.wait(30)
    assert lock.acquire(timeout=0.3) is False
    os.kill(p.pid, signal.SIGKILL)  # not reaped yet: a zombie holder counts as dead too
    t0 = time.monotonic()
    with pytest.warns(OwnerDiedWarning, match='died'):
        assert lock.acquire(timeout=10) is True
    assert time.monotonic() - t0 < 3
    lock.release()
    assert lock.acquire(timeout=1) is True
    lock.release()
    p.join(10)
    assert p.exitcode == -signal.SIGKILL


def test_owner_died_as_error_leaves_lock_untaken():
    import cpool
    from cpool.synchronize import OwnerDiedWarning
    lock = cpool.Lock()
    ready = cpool.Event()
    p = _start(cpool, _hold_and_hang, (lock, ready))
    assert ready.wait(30)
    p.kill()
    p.join(10)
    with warnings.catch_warnings():
        warnings.simplefilter('error', OwnerDiedWarning)
        with pytest.raises(OwnerDiedWarning):
            lock.acquire(timeout=10)
    assert lock._semlock._owner_pid == p.pid  # still the dead one's: not taken
    with pytest.warns(OwnerDiedWarning):
        assert lock.acquire(timeout=10)
    lock.release()


def test_waiter_blocked_before_holder_died_gets_the_lock():
    import cpool
    lock = cpool.Lock()
    ready = cpool.Event()
    p = _start(cpool, _hold_and_hang, (lock, ready))
    assert ready.wait(30)
    got = []

    def waiter():
        with warnings.catch_warnings(record=True):
            warnings.simplefilter('always')
            got.append(lock.acquire(timeout=20))

    t = threading.Thread(target=waiter)
    t.start()
    time.sleep(0.2)
    p.kill()
    t.join(10)
    assert got == [True]
    lock.release()
    p.join(10)


def test_barrier_party_killed_breaks_barrier_for_waiters_with_timeout():
    import cpool
    barrier = cpool.Barrier(3)
    ready = cpool.Event()
    p = _start(cpool, _wait_in_barrier, (barrier, ready))
    assert ready.wait(30)
    deadline = time.monotonic() + 10
    while barrier.n_waiting < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    p.kill()
    p.join(10)
    t0 = time.monotonic()
    with pytest.raises(threading.BrokenBarrierError):
        barrier.wait(timeout=0.3)
    assert time.monotonic() - t0 < 5
    assert barrier.broken


def _blocked_call(what):
    """A cpool call that blocks for ever, and a check that it took nothing when interrupted."""
    import cpool
    if what == 'lock':
        lock = cpool.Lock()
        lock.acquire()

        def check():
            lock.release()
            assert lock.acquire(False)
        return lock.acquire, check
    if what == 'rlock':
        rlock = cpool.RLock()
        held, done = threading.Event(), threading.Event()

        def holder():
            with rlock:
                held.set()
                done.wait(30)
        t = threading.Thread(target=holder)
        t.start()
        held.wait(10)

        def check():
            assert not rlock._semlock._is_mine()
            done.set()
            t.join()
            assert rlock.acquire(timeout=5)
        return rlock.acquire, check
    if what == 'semaphore':
        sem = cpool.Semaphore(0)

        def check():
            sem.release()
            assert sem.get_value() == 1
        return sem.acquire, check
    if what == 'event':
        ev = cpool.Event()
        return ev.wait, lambda: None
    if what == 'condition':
        cond = cpool.Condition()

        def wait():
            with cond:
                cond.wait()

        def check():
            assert not cond._lock._semlock._is_mine()
            assert cond.acquire(False)
            cond.release()
        return wait, check
    if what == 'barrier':
        barrier = cpool.Barrier(2)
        return barrier.wait, lambda: None
    raise AssertionError(what)


@pytest.mark.parametrize('what', ['lock', 'rlock', 'semaphore', 'event', 'condition', 'barrier'])
def test_sigint_interrupts_blocking_wait(what):
    call, check = _blocked_call(what)
    sent = []
    timer = sigint_after(0.2, sent)
    with pytest.raises(KeyboardInterrupt):
        call()
    elapsed = time.monotonic() - sent[0]
    timer.join()
    assert elapsed < 0.5, elapsed  # 100 ms promised; generous for a loaded machine
    check()


def test_sigint_handler_that_returns_does_not_end_wait():
    import cpool
    ev = cpool.Event()
    hits = []
    old = signal.signal(signal.SIGUSR1, lambda *a: hits.append(1))
    try:
        timers = [threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1)),
                  threading.Timer(0.4, ev.set)]
        for t in timers:
            t.start()
        assert ev.wait(10) is True
        for t in timers:
            t.join()
    finally:
        signal.signal(signal.SIGUSR1, old)
    assert hits == [1]


# ---- no leaks ----

def _rss_kib():
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE') // 1024


def test_creating_and_dropping_many_locks_is_bounded():
    import cpool
    from cpool import _core
    for _ in range(1000):  # warm up caches and the first chunk
        cpool.Lock(), cpool.Event(), cpool.Semaphore(3)
    gc.collect()
    fds0, rss0, chunks0 = len(open_fds()), _rss_kib(), _core.arena_stats()['chunks']
    for i in range(100_000):
        lock = cpool.Lock()
        lock.acquire()
        lock.release()
        cpool.RLock()
        cpool.Event()
    del lock
    gc.collect()
    assert len(open_fds()) <= fds0 + 1
    assert _core.arena_stats()['chunks'] <= chunks0 + 1
    assert _rss_kib() - rss0 < 20 * 1024


def test_many_live_locks_cost_few_fds():
    import cpool
    from cpool import _core
    fds0 = len(open_fds())
    locks = [cpool.Lock() for _ in range(20_000)]
    # ~15k 64-byte slots per 1 MiB chunk: two chunks' fds for 20k locks, not 20k fds
    assert len(open_fds()) - fds0 <= 3
    assert _core.arena_stats()['handles'] >= 20_000
    del locks
    gc.collect()
    assert _core.arena_stats()['handles'] < 20_000


def test_children_give_their_references_back(cctx, start_method):
    from cpool import _core
    gc.collect()
    refs0 = _core.arena_stats()['refs']
    objs = [cctx.Lock(), cctx.Event(), cctx.RLock(), cctx.Semaphore(2)]
    out = cctx.Array('i', 3, lock=False)
    cond = cctx.Condition()
    p = _start(cctx, _use_all, (objs[0], objs[2], objs[3], objs[1], cond, out))
    p.join(30)
    assert p.exitcode == 0
    del objs, out, cond, p
    gc.collect()
    assert _core.arena_stats()['refs'] == refs0


@pytest.mark.stress
def test_million_locks():
    import cpool
    fds0, rss0 = len(open_fds()), _rss_kib()
    for _ in range(1_000_000):
        cpool.Lock()
    gc.collect()
    assert len(open_fds()) <= fds0 + 1
    assert _rss_kib() - rss0 < 20 * 1024


def _count_forever(lock, value):
    import warnings
    warnings.simplefilter('ignore')
    while True:
        with lock:
            value.value += 1


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_holders_killed_at_random_never_stop_the_others():
    import random
    import cpool
    lock = cpool.Lock()
    value = cpool.Value('i', 0, lock=False)
    rnd = random.Random(1)
    procs = [_start(cpool, _count_forever, (lock, value)) for _ in range(3)]
    for _ in range(20):
        time.sleep(rnd.uniform(0.01, 0.1))
        victim = procs.pop(rnd.randrange(len(procs)))
        victim.kill()
        victim.join(10)
        procs.append(_start(cpool, _count_forever, (lock, value)))
    before = value.value
    time.sleep(0.5)
    assert value.value > before  # the survivors still get the lock
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')
        assert lock.acquire(timeout=10)
    lock.release()
    for p in procs:
        p.kill()
        p.join(10)
