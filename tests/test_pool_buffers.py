"""Pool arguments and results that export large buffers (numpy arrays): placed once in the
pool's shared heap and read there in place. Differential against multiprocessing (the same
values, dtypes, shapes, memory order, writability), then what can go wrong: a full heap, a
killed worker, results outliving the pool, a forked child holding them."""
import gc
import hashlib
import os
import pickle
import signal
import time

import pytest

np = pytest.importorskip('numpy')

import cpool  # noqa: E402

MB = 1 << 20


# ---- task functions (module level: they travel by name) ----

def describe(a):
    """What a receiver can tell about an array, as plain values."""
    if not isinstance(a, np.ndarray):
        return (type(a).__name__, a if not isinstance(a, (bytes, bytearray)) else
                hashlib.sha1(a).hexdigest())
    f = a.flags
    return ('ndarray', a.dtype.str, a.shape, a.strides if a.size else None, bool(f.writeable),
            bool(f.c_contiguous), bool(f.f_contiguous),
            hashlib.sha1(a.tobytes() if a.dtype != object else pickle.dumps(a.tolist())).hexdigest())


def standardize(a):
    return (a - a.mean()) / a.std()


def identity(x):
    return x


def scale_in_place(a):
    a *= 2  # the worker's copy is its own: writable, as in the standard library
    return a


def make_array(spec):
    return build(spec)


def pid_and_sum(a):
    return os.getpid(), float(a.sum())


def sum_then_die(a):
    if a[0] < 0:
        os.kill(os.getpid(), signal.SIGKILL)
    return float(a.sum())


def keep_forever(a, _kept=[]):
    _kept.append(a)  # held by the worker until it exits
    return float(a.sum())


def sleep_then_sum(a):
    time.sleep(0.2)
    return float(a.sum())


# ---- the arrays ----

def build(spec):
    rng = np.random.default_rng(7)
    big = rng.random(MB // 8 * 3)  # 3 MB, above the heap's unit
    if spec == 'c_big':
        return big
    if spec == 'small':
        return rng.random(100)
    if spec == 'fortran':
        return np.asfortranarray(big.reshape(768, 512))
    if spec == 'strided':
        return big[::3]
    if spec == 'readonly':
        b = big.copy()
        b.flags.writeable = False
        return b
    if spec == 'readonly_fortran':
        b = np.asfortranarray(big.reshape(768, 512))
        b.flags.writeable = False
        return b
    if spec == 'readonly_strided':
        b = big.reshape(768, 512)[::2, ::3]
        b.flags.writeable = False
        return b
    if spec == 'empty':
        return np.zeros((0, 5))
    if spec == 'int8_2d':
        return rng.integers(-100, 100, size=(1024, 2048), dtype=np.int8)
    if spec == 'record':
        r = np.zeros(200_000, dtype=[('id', '<i4'), ('score', '<f8'), ('tag', 'S3')])
        r['id'] = np.arange(r.size)
        r['score'] = rng.random(r.size)
        return r
    if spec == 'objects':
        return np.array(['read%d' % i for i in range(20_000)], dtype=object)
    if spec == 'bytes':
        return bytes(rng.integers(0, 256, 2 * MB, dtype=np.uint8))
    if spec == 'bytearray':
        return bytearray(rng.integers(0, 256, 2 * MB, dtype=np.uint8))
    raise ValueError(spec)


SPECS = ['c_big', 'small', 'fortran', 'strided', 'readonly', 'readonly_fortran',
         'readonly_strided', 'empty', 'int8_2d', 'record',
         'objects', 'bytes', 'bytearray']


def run_both(fn):
    """fn(module) for multiprocessing and cpool; both outcomes."""
    import multiprocessing
    return fn(multiprocessing), fn(cpool)


@pytest.mark.parametrize('spec', SPECS)
def test_argument_arrives_as_sent(spec):
    def case(mp):
        with mp.get_context('fork').Pool(2) as p:
            return p.map(describe, [build(spec)] * 3)
    std, ours = run_both(case)
    assert ours == std
    assert ours[0][-1] == describe(build(spec))[-1]  # the same content


@pytest.mark.parametrize('spec', SPECS)
def test_result_arrives_as_made(spec):
    def case(mp):
        with mp.get_context('fork').Pool(2) as p:
            return [describe(r) for r in p.map(make_array, [spec] * 3)]
    std, ours = run_both(case)
    assert ours == std


def test_worker_may_write_its_argument_and_the_caller_its_result():
    a = build('c_big')
    def case(mp):
        with mp.get_context('fork').Pool(2) as p:
            out = p.apply(scale_in_place, (a,))
            out += 1  # results are writable too
            return describe(out)
    std, ours = run_both(case)
    assert ours == std
    assert np.array_equal(a, build('c_big'))  # the caller's array is not touched


def test_memoryview_argument_fails_as_in_the_standard_library():
    mv = memoryview(bytearray(2 * MB))
    def case(mp):
        with mp.get_context('fork').Pool(1) as p:
            with pytest.raises(TypeError) as ei:
                p.apply(identity, (mv,))
            return type(ei.value)
    std, ours = run_both(case)
    assert ours is std


def memoryview_of(n):
    return memoryview(bytearray(n))[1:]


def test_memoryview_result_fails_as_in_the_standard_library():
    def case(mp):
        with mp.get_context('fork').Pool(1) as p:
            with pytest.raises(Exception) as ei:
                p.apply(memoryview_of, (2 * MB,))
            return type(ei.value).__name__, p.apply(len, (b'still serving',))
    std, ours = run_both(case)
    assert ours == std


def test_large_results_in_order_with_callbacks(start_method):
    arrays = [np.full(MB // 8 * 2, float(i)) for i in range(12)]
    def case(mp):
        with mp.get_context(start_method).Pool(2) as p:
            got = []
            rs = [p.apply_async(standardize, (a + np.arange(a.size),),
                                callback=lambda r: got.append(float(r[0])))
                  for a in arrays]
            applied = [describe(r.get(60)) for r in rs]
            mapped = [describe(r) for r in p.imap(standardize, arrays[:4])]
            unordered = sorted(describe(r) for r in p.imap_unordered(identity, arrays[:4]))
            return applied, mapped, unordered, sorted(got)
    std, ours = run_both(case)
    assert ours == std


def heap_used():
    """Bytes in blocks of the process's heap (shared by every pool of this process)."""
    gc.collect()
    return cpool.pool._buffer_heap(None).used


def wait_heap_back_to(base):
    deadline = time.monotonic() + 10
    while heap_used() != base and time.monotonic() < deadline:
        time.sleep(0.02)  # workers free their arguments after the task
    return heap_used()


def test_results_read_in_place_free_their_blocks():
    base = heap_used()
    with cpool.Pool(2) as p:
        p.map(abs, range(4))
        before = p._core.stats()
        out = p.map(standardize, [np.ones(MB) + i for i in range(6)], chunksize=1)
        after = p._core.stats()
        assert p._core.heap_used >= base + 6 * 8 * MB  # the results live in the heap
        # ... and 96 MB of arguments and results did not go through the rings.
        for ring in ('task_ring_bytes', 'result_ring_bytes'):
            assert after[ring] - before[ring] < 64 * 1024
        del out
        assert wait_heap_back_to(base) == base


def test_results_outlive_the_pool():
    p = cpool.Pool(2)
    out = p.map(make_array, ['c_big', 'int8_2d'])
    p.terminate()
    p.join()
    del p
    gc.collect()
    assert describe(out[0]) == describe(build('c_big'))
    assert describe(out[1]) == describe(build('int8_2d'))
    out[0][:] = 0  # still writable memory
    assert not out[0].any()


def test_a_full_heap_falls_back_to_the_pickle():
    arrays = [np.arange(MB, dtype=np.float64) + i for i in range(10)]  # 80 MB > the heap
    with cpool.Pool(2, buffer_heap_bytes=16 * MB) as p:
        out = p.map(standardize, arrays, chunksize=1)
        assert p._core.heap is not None
    for a, o in zip(arrays, out):
        assert np.allclose(o, standardize(a))


def test_no_heap_at_all_still_works():
    with cpool.Pool(2, buffer_heap_bytes=0) as p:
        assert p._core.heap is None
        out = p.map(standardize, [build('c_big')])
    assert np.allclose(out[0], standardize(build('c_big')))


def test_killed_worker_gives_back_the_blocks_it_read():
    base = heap_used()
    with cpool.Pool(2) as p:
        p.map(abs, range(4))
        bad = -np.ones(MB // 8 * 4)
        rs = [p.apply_async(sum_then_die, (bad if i == 3 else np.ones(MB) * i,)) for i in range(8)]
        for i, r in enumerate(rs):  # only the task that killed its worker fails
            if i == 3:
                with pytest.raises(cpool.WorkerLostError):
                    r.get(60)
            else:
                assert r.get(60) == float(MB * i)
        with pytest.raises(cpool.WorkerLostError):
            p.apply(sum_then_die, (bad,))
        # The pool keeps serving, and the dead worker's argument is freed with it.
        assert p.apply(sum_then_die, (np.ones(MB),)) == float(MB)
        assert wait_heap_back_to(base) == base


def test_blocks_a_worker_keeps_are_freed_when_it_leaves():
    base = heap_used()
    with cpool.Pool(1, maxtasksperchild=2) as p:
        sums = p.map(keep_forever, [np.ones(MB) * i for i in range(4)], chunksize=1)
        assert sums == [float(MB * i) for i in range(4)]
        assert wait_heap_back_to(base) == base


def test_forked_child_dropping_inherited_results_frees_nothing():
    with cpool.Pool(2) as p:
        out = p.map(make_array, ['c_big'] * 2)
        used = p._core.heap_used
        child = cpool.get_context('fork').Process(target=out.clear)
        child.start()
        child.join(30)
        assert child.exitcode == 0
        assert p._core.heap_used == used
        assert describe(out[0]) == describe(build('c_big'))


def test_pools_share_the_process_heap_and_give_back_what_they_held():
    base = heap_used()
    p = cpool.Pool(2)
    q = cpool.Pool(1)
    assert p._core.heap[0] == q._core.heap[0] and p._core.heap[2] != q._core.heap[2]
    # Arguments never read (the pool is terminated under them) come back with the pool.
    rs = [p.apply_async(sleep_then_sum, (np.ones(MB) * i,)) for i in range(8)]
    assert q.apply(sleep_then_sum, (np.ones(MB),)) == float(MB)
    time.sleep(0.1)
    p.terminate()
    p.join()
    q.close()
    q.join()
    del p, q, rs
    assert wait_heap_back_to(base) == base


def child_sees(out, conn, go):
    """In a forked child: write to the inherited results, wait, report what they hold."""
    out[0][:] = -1.0
    go.recv()  # the parent has changed its copy and reused the heap meanwhile
    conn.send((float(out[0][0]), float(out[1].sum())))


def test_results_are_copy_on_write_in_a_forked_child():
    """As with any memory: a child forked after the results came gets its own copy, not the
    heap's pages shared with the parent."""
    ones = np.ones(MB)
    def case(mp):
        ctx = mp.get_context('fork')
        with ctx.Pool(2) as p:
            out = p.map(identity, [ones, ones * 2])
            r, w = ctx.Pipe(duplex=False)
            go_r, go_w = ctx.Pipe(duplex=False)
            child = ctx.Process(target=child_sees, args=(out, w, go_r))
            child.start()
            time.sleep(0.3)
            parent_view = float(out[0][0])  # the child's write is not seen here
            out[1][:] = 7.0                 # nor this write there
            del out
            gc.collect()
            p.map(identity, [ones * 5] * 4)  # blocks freed by the parent are reused
            go_w.send(None)
            seen = r.recv()
            child.join(30)
            return parent_view, seen, child.exitcode
    std, ours = run_both(case)
    assert ours == std == (1.0, (-1.0, 2.0 * MB), 0)


_kept = []  # results of a first pool, read by a second pool's workers (fork inherits them)


def kept_first_value_after():
    """In a second pool's worker: wait until the parent has written to its copy, then read."""
    _kept[1].wait(30)
    return float(_kept[0][0])


def test_a_second_pools_workers_get_the_firsts_results_copy_on_write():
    """Results of one pool kept in a global, then a second pool whose workers read them: its
    workers are forked children like any other, so the parent's later writes stay its own."""
    def case(mp):
        ctx = mp.get_context('fork')
        with ctx.Pool(1) as p:
            _kept[:] = p.map(identity, [np.ones(MB)])
        go = ctx.Event()  # inherited by the workers, as the results are
        _kept.append(go)
        try:
            with ctx.Pool(1) as q:
                r = q.apply_async(kept_first_value_after)
                time.sleep(0.3)  # the worker is forked and waiting
                _kept[0][:] = -1.0
                go.set()
                return r.get(30), float(_kept[0][0])
        finally:
            _kept.clear()
    std, ours = run_both(case)
    assert ours == std == (1.0, -1.0)


def make_pool_in_child(conn):
    with cpool.Pool(1) as p:
        conn.send((cpool.pool._buffer_heap(None).pid, float(p.apply(pid_and_sum, (np.ones(MB),))[1])))


def test_a_forked_child_makes_a_heap_of_its_own():
    with cpool.Pool(1) as p:
        p.apply(identity, (np.ones(MB),))
    r, w = cpool.Pipe(duplex=False)
    child = cpool.get_context('fork').Process(target=make_pool_in_child, args=(w,))
    child.start()
    heap_pid, total = r.recv()
    child.join(30)
    assert heap_pid == child.pid and total == float(MB)
    assert cpool.pool._buffer_heap(None).pid == os.getpid()


def test_arguments_of_a_terminated_pool_do_not_break_the_next():
    p = cpool.Pool(2)
    rs = [p.apply_async(sleep_then_sum, (np.ones(MB) * i,)) for i in range(8)]
    time.sleep(0.1)
    p.terminate()
    p.join()
    assert not all(r.ready() and r.successful() for r in rs)
    with cpool.Pool(2) as q:
        assert q.map(pid_and_sum, [np.ones(MB)])[0][1] == float(MB)


def test_freed_pages_stay_until_trimmed_and_no_thread_outlives_the_pools():
    import threading
    heap = cpool.pool._buffer_heap(None)
    with cpool.Pool(2) as p:
        out = p.map(identity, [np.ones(MB) * i for i in range(4)], chunksize=1)
        del out
        gc.collect()
        assert heap.trim(60_000) >= 4 * 8 * MB  # freed, still resident for the next use
        assert heap.trim(0) == 0                 # given back
    time.sleep(0.2)
    # The decay runs in the pools' handler threads: none is left once they are gone, so a
    # later fork does not warn about threads (3.12+) where the standard library's would not.
    assert [t.name for t in threading.enumerate() if t.name.startswith('cpool')] == []
