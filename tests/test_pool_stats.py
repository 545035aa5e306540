"""Pool(stats=True) and pool.stats(): the counts are exact, the times bound what the tasks did,
and the advice names the cause of a slow pool."""
import os
import signal
import time

import pytest

import cpool
from cpool.pool import PoolStats


def nap(t):
    time.sleep(t)
    return t


def noop(x):
    return x


def die(_):
    os.kill(os.getpid(), signal.SIGKILL)


def test_stats_are_opt_in():
    with cpool.Pool(1) as p:
        with pytest.raises(ValueError, match='stats=True'):
            p.stats()


def test_tasks_are_counted_as_the_standard_library_counts_them():
    with cpool.Pool(2, stats=True) as p:
        before = p.stats()
        p.map(noop, range(100), chunksize=7)          # 15 chunks: 15 tasks
        rs = [p.apply_async(noop, (i,)) for i in range(5)]
        [r.get(30) for r in rs]
        list(p.imap(noop, range(10), chunksize=5))    # 2 tasks
        span = p.stats() - before
    assert span.tasks == 15 + 5 + 2
    assert len(span.workers) == 2


def test_times_bound_what_the_tasks_did():
    with cpool.Pool(2, stats=True) as p:
        p.map(noop, range(4))
        before = p.stats()
        t0 = time.monotonic()
        p.map(nap, [0.05] * 12, chunksize=1)
        elapsed = time.monotonic() - t0
        span = p.stats() - before
    assert span.busy >= 12 * 0.05
    assert span.busy <= 2 * span.wall + 0.01
    assert span.wall >= elapsed - 0.01
    assert 0 < span.utilisation <= 1.0
    assert span.speedup == pytest.approx(span.busy / span.wall)
    for w in span.workers:
        assert min(w.run, w.decode, w.encode, w.wait) >= 0


def test_report_and_advice_for_fine_grained_work():
    with cpool.Pool(2, stats=True) as p:
        p.map(noop, range(2000), chunksize=1)
        s = p.stats()
    text = str(s)
    assert 'tasks' in text and 'parent' in text
    assert len([ln for ln in text.splitlines() if ln.strip()[:1].isdigit()]) == 2
    assert any('chunksize' in a for a in s.advice())
    assert isinstance(s, PoolStats) and 'PoolStats' in repr(s)


def test_advice_for_heavy_payloads():
    blobs = [bytearray(4 << 20) for _ in range(8)]  # moved in band: costly next to no work
    with cpool.Pool(2, stats=True, buffer_heap_bytes=0) as p:
        p.map(noop, blobs, chunksize=1)
        s = p.stats()
    assert s.transport > 0
    assert any('moving arguments and results' in a for a in s.advice())


def test_counters_survive_a_killed_worker():
    with cpool.Pool(2, stats=True) as p:
        p.map(noop, range(10), chunksize=1)
        with pytest.raises(cpool.WorkerLostError):
            p.apply(die, (0,))
        p.map(noop, range(10), chunksize=1)
        s = p.stats()
    assert s.tasks == 20  # the dead worker's earlier tasks stay counted; the one it died in never finished
