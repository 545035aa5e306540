"""Pool latency against the standard library: close+join, callbacks nobody waits for, and
ThreadPool.terminate() with queued work (bounds the standard library meets by far)."""
import importlib
import os
import select
import statistics
import threading
import time

import pytest

import cpool
import cpool.pool


def identity(x):
    return x


def fail(x):
    raise ValueError(x)


def _close_join_time(ctx, n):
    total = 0.0
    for _ in range(n):
        p = ctx.Pool(2)
        assert p.map(identity, range(4)) == [0, 1, 2, 3]
        workers = list(p._pool)
        t0 = time.monotonic()
        p.close()
        p.join()
        total += time.monotonic() - t0
        assert [w.exitcode for w in workers] == [0, 0]
    return total


def test_close_join_returns_when_the_workers_are_done(mpmod):
    # The handler used to notice the workers' exit only at the end of a 0.1 s slice.
    total = _close_join_time(mpmod.get_context('fork'), 20)
    assert total < 1.0, total


def test_join_returns_as_the_last_worker_exits(cctx):
    # cpool, every start method: a spawned worker's own exit (interpreter shutdown) takes tens
    # of ms, so the bound is on what join() adds after the last worker is gone (the median of
    # five, as other processes share this machine's cores).
    took = []
    for _ in range(5):
        p = cctx.Pool(2)
        assert p.map(identity, range(4)) == [0, 1, 2, 3]
        # Our own pidfds: the pool closes the workers' sentinels once it has reaped them.
        pidfds = [os.pidfd_open(w.pid) for w in p._pool]
        p.close()
        left = set(pidfds)
        while left:
            ready, _, _ = select.select(sorted(left), [], [], 10)
            assert ready
            left.difference_update(ready)
        t0 = time.monotonic()
        p.join()
        took.append(time.monotonic() - t0)
        for fd in pidfds:
            os.close(fd)
    assert statistics.median(took) < 0.05, took


@pytest.mark.parametrize('failing', [False, True])
def test_callback_runs_when_its_result_arrives(ctx, failing):
    # Nobody waits on the AsyncResult: only the pool's own thread can run the callback.
    delays, got = [], []
    with ctx.Pool(2) as p:
        p.apply(identity, (0,))
        for i in range(200):
            ev = threading.Event()

            def done(v, ev=ev):
                got.append(v)
                ev.set()
            t0 = time.monotonic()
            if failing:
                p.apply_async(fail, (i,), error_callback=done)
            else:
                p.apply_async(identity, (i,), callback=done)
            assert ev.wait(10)
            delays.append(time.monotonic() - t0)
    assert len(got) == 200
    if failing:
        assert [e.args[0] for e in got] == list(range(200))
    else:
        assert got == list(range(200))
    assert statistics.median(delays) < 0.02, sorted(delays)[::20]


def test_callbacks_of_many_tasks_run_while_the_caller_polls(mpmod):
    # joblib's Parallel submits with callbacks and polls what they set, never calling get().
    n = 5000
    count = [0]
    lock = threading.Lock()

    def cb(_):
        with lock:
            count[0] += 1
    with mpmod.get_context('fork').Pool(2) as p:
        p.apply(identity, (0,))
        t0 = time.monotonic()
        for i in range(n):
            p.apply_async(identity, (i,), callback=cb)
        while count[0] < n and time.monotonic() - t0 < 30:
            time.sleep(0.001)
    assert count[0] == n


def _sleep_and_count(ran, t):
    ran.append(t)
    time.sleep(t)


@pytest.mark.parametrize('close_first', [False, True])
def test_threadpool_terminate_drops_queued_work(mpmod, close_first):
    pool_mod = importlib.import_module(mpmod.__name__ + '.pool')
    ran = []
    p = pool_mod.ThreadPool(2)
    results = [p.apply_async(_sleep_and_count, (ran, 0.001)) for _ in range(10000)]
    time.sleep(0.05)
    if close_first:
        p.close()
    t0 = time.monotonic()
    p.terminate()
    took = time.monotonic() - t0
    p.join()
    joined = time.monotonic() - t0
    # Running tasks finish (threads cannot be killed); the queued ones never start.
    assert len(ran) < 5000, len(ran)
    assert took < 0.5 and joined < 1.0, (took, joined)
    # cpool: every task that ran has its result. The standard library loses those still on
    # their way through its result handler when it stops.
    time.sleep(0.05)
    n_ok = sum(r.ready() and r.successful() for r in results)
    assert n_ok == len(ran) if mpmod.__name__ == 'cpool' else n_ok <= len(ran)


def test_threadpool_terminate_fails_the_dropped_results():
    # cpool's own: a dropped task's get() raises as a terminated Pool's does (the standard
    # library's would wait for ever).
    errors = []
    p = cpool.pool.ThreadPool(1)
    gate, started = threading.Event(), threading.Event()
    first = p.apply_async(lambda: started.set() or gate.wait(10))
    assert started.wait(10)
    dropped = [p.apply_async(identity, (i,), error_callback=errors.append) for i in range(100)]
    p.terminate()
    gate.set()
    p.join()
    assert first.get(5) is True
    for r in dropped:
        with pytest.raises(cpool.ProcessError):
            r.get(5)
    assert len(errors) == 100


def _slow(x):
    time.sleep(0.0005)
    return x


def test_threadpool_imap_is_completed_after_close(mpmod):
    pool_mod = importlib.import_module(mpmod.__name__ + '.pool')
    p = pool_mod.ThreadPool(2)
    it = p.imap(_slow, range(300))
    unordered = p.imap_unordered(_slow, range(300), chunksize=7)
    p.close()
    assert list(it) == list(range(300))
    assert sorted(unordered) == list(range(300))
    p.join()


def test_threadpool_windowed_imap_is_completed_after_close():
    # A feeder held back by its window used to stop at close() and the iterator waited for ever.
    p = cpool.pool.ThreadPool(2)
    it = p.imap(_slow, range(300), buffersize=10)
    time.sleep(0.01)
    p.close()
    assert list(it) == list(range(300))
    p.join()


def test_threadpool_terminate_ends_a_windowed_imap():
    p = cpool.pool.ThreadPool(2)
    it = p.imap(_slow, range(100000), buffersize=10)
    assert next(it) == 0
    p.terminate()
    got = []
    with pytest.raises(cpool.ProcessError):
        for x in it:
            got.append(x)
    assert got == list(range(1, len(got) + 1))
    t0 = time.monotonic()
    p.join()
    assert time.monotonic() - t0 < 1.0
