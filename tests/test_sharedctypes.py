"""Value, Array, RawValue, RawArray and cpool.sharedctypes: the same cases on multiprocessing and
cpool, children writing what the parent reads under every start method, pickling rules, sizes."""
import ctypes
import gc
import importlib
import pickle

import pytest

from conftest import open_fds


class Point(ctypes.Structure):
    _fields_ = [('x', ctypes.c_int), ('y', ctypes.c_double)]


def _sharedctypes(mpmod):
    return importlib.import_module(mpmod.__name__ + '.sharedctypes')


# ---- run in children ----

def _mutate(value, array, raw_value, raw_array, string, point):
    with value.get_lock():
        value.value += 1
    array[0] = -1
    array[1:3] = [20, 30]
    raw_value.value = 2.5
    raw_array[len(raw_array) - 1] = 7
    string.value = b'child'
    point.x, point.y = 5, 0.25


def _add_many(value, n):
    for _ in range(n):
        with value.get_lock():
            value.value += 1


# ---- differential: the API ----

@pytest.mark.parametrize('code,args,expected', [
    ('i', (), 0), ('i', (-7,), -7), ('I', (7,), 7), ('b', (-3,), -3), ('B', (250,), 250),
    ('h', (-300,), -300), ('H', (300,), 300), ('l', (-2 ** 40,), -2 ** 40),
    ('L', (2 ** 40,), 2 ** 40), ('q', (-2 ** 62,), -2 ** 62), ('Q', (2 ** 63,), 2 ** 63),
    ('f', (0.5,), 0.5), ('d', (1e300,), 1e300), ('c', (b'x',), b'x'), ('u', ('é',), 'é'),
    (ctypes.c_int, (9,), 9), (ctypes.c_double, (), 0.0), (ctypes.c_bool, (True,), True),
])
def test_value_typecodes_and_types(mpmod, code, args, expected):
    v = mpmod.Value(code, *args)
    assert v.value == expected
    raw = mpmod.RawValue(code, *args)
    assert raw.value == expected
    assert type(raw) is type(v.get_obj())
    assert repr(v).startswith('<Synchronized wrapper for ')


def test_value_locks(mpmod):
    v = mpmod.Value('i', 1)
    assert type(v.get_lock()).__name__ == 'RLock'
    with v:
        v.value += 1
    assert v.acquire() and v.release() is None
    assert v.value == 2
    raw = mpmod.Value('i', 3, lock=False)
    assert isinstance(raw, ctypes.c_int) and not hasattr(raw, 'get_lock')
    lock = mpmod.Lock()
    v = mpmod.Value('d', 1.5, lock=lock)
    assert v.get_lock() is lock
    with pytest.raises(AttributeError, match="has no method 'acquire'"):
        mpmod.Value('i', 1, lock='nope')
    with pytest.raises(TypeError):
        mpmod.Value('i', 'not an int')
    with pytest.raises(TypeError):
        mpmod.Value('zz')  # not a typecode: treated as a type, which it is not


def test_array_api(mpmod):
    a = mpmod.Array('i', range(5))
    assert len(a) == 5 and a[:] == [0, 1, 2, 3, 4] and a[-1] == 4 and a[1:4] == [1, 2, 3]
    assert a[::2] == [0, 2, 4]
    a[0] = 10
    a[1:3] = [11, 12]
    assert list(a) == [10, 11, 12, 3, 4]
    with pytest.raises(IndexError):
        a[5]
    with pytest.raises(ValueError):
        a[0:2] = [1, 2, 3]
    z = mpmod.Array('d', 4)
    assert z[:] == [0.0] * 4
    raw = mpmod.RawArray(ctypes.c_ushort, [1, 2, 3])
    assert raw[:] == [1, 2, 3] and isinstance(raw, ctypes.Array)
    assert isinstance(mpmod.Array('i', 3, lock=False), ctypes.Array)
    assert repr(a).startswith('<SynchronizedArray wrapper for ')
    assert len(mpmod.RawArray('b', 0)) == 0


def test_char_array_value_and_raw(mpmod):
    s = mpmod.Array('c', b'hello world')
    assert s.value == b'hello world' and s.raw == b'hello world'
    s.value = b'hi'
    assert s.value == b'hi' and s.raw == b'hi\x00lo world'
    s.raw = b'HELLO'
    assert s.raw == b'HELLO world'
    assert s[0] == b'H' and s[1:3] == b'EL'
    assert type(s).__name__ == 'SynchronizedString'
    z = mpmod.Array('c', 4)
    assert z.raw == b'\x00' * 4 and z.value == b''


def test_structures(mpmod):
    p = mpmod.Value(Point, 1, 2.5)
    assert (p.x, p.y) == (1, 2.5)
    p.x = 3
    assert p.get_obj().x == 3 and type(p).__name__ == 'SynchronizedPoint'
    arr = mpmod.Array(Point, [(1, 1.0), (2, 2.0)])
    assert arr[1].x == 2 and arr[0].y == 1.0
    raw = mpmod.RawValue(Point)
    assert (raw.x, raw.y) == (0, 0.0)


def test_sharedctypes_module_functions(mpmod):
    sc = _sharedctypes(mpmod)
    raw = sc.RawArray('i', [1, 2, 3])
    dup = sc.copy(raw)
    dup[0] = 100
    assert raw[0] == 1 and dup[:] == [100, 2, 3] and type(dup) is type(raw)
    s = sc.synchronized(sc.RawValue('d', 0.5))
    assert type(s).__name__ == 'Synchronized' and s.value == 0.5
    sa = sc.synchronized(sc.RawArray('c', b'ab'))
    assert type(sa).__name__ == 'SynchronizedString' and sa.value == b'ab'
    with pytest.raises(AssertionError):
        sc.synchronized(s)
    lock = mpmod.RLock()
    v = sc.Value('i', 4, lock=lock, ctx=mpmod.get_context())
    assert v.get_lock() is lock
    a = sc.Array('i', 2, lock=False)
    assert a[:] == [0, 0]
    assert sc.typecode_to_type['d'] is ctypes.c_double


@pytest.mark.parametrize('make', [
    lambda m: m.RawValue('i', 1), lambda m: m.RawArray('d', 3), lambda m: m.Value('i', 1),
    lambda m: m.Array('c', b'xy'), lambda m: m.Value(Point, 1, 1.0)])
def test_pickling_outside_spawning_raises_runtimeerror(mpmod, make):
    obj = make(mpmod)
    forking_pickler = importlib.import_module(mpmod.__name__ + '.reduction').ForkingPickler
    with pytest.raises(RuntimeError, match='through inheritance'):
        forking_pickler.dumps(obj)
    with pytest.raises(Exception):
        pickle.dumps(obj)


def test_plain_ctypes_objects_still_pickle():
    import cpool
    cpool.RawValue('i', 1)
    cpool.RawValue(Point)  # registers reducers for c_int and Point
    assert pickle.loads(pickle.dumps(ctypes.c_int(5))).value == 5
    assert pickle.loads(pickle.dumps(Point(1, 2.0))).y == 2.0


# ---- children ----

def test_children_write_what_the_parent_reads(ctx):
    value = ctx.Value('i', 1)
    array = ctx.Array('i', 5)
    raw_value = ctx.RawValue('d', 0.0)
    raw_array = ctx.RawArray('q', 10_000)  # 80 kB: memory of its own, not an arena slot run
    string = ctx.Array('c', 10)
    point = ctx.RawValue(Point)
    p = ctx.Process(target=_mutate, args=(value, array, raw_value, raw_array, string, point))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert value.value == 2
    assert array[:3] == [-1, 20, 30]
    assert raw_value.value == 2.5
    assert raw_array[9999] == 7 and raw_array[0] == 0
    assert string.value == b'child'
    assert (point.x, point.y) == (5, 0.25)


@pytest.mark.parametrize('start_method', ['fork'])
def test_value_increments_under_its_lock_are_exact(ctx):
    value = ctx.Value('i', 0)
    procs = [ctx.Process(target=_add_many, args=(value, 2000)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert value.value == 6000


# ---- cpool only: memory ----

def test_big_arrays_and_many_values_cost_few_fds():
    import cpool
    from cpool import _core
    fds0 = len(open_fds())
    values = [cpool.Value('d', i) for i in range(5000)]  # each: a value slot and an RLock slot
    arrays = [cpool.RawArray('i', 100) for _ in range(500)]  # 400 bytes: 7-slot runs
    assert len(open_fds()) - fds0 <= 2
    assert sum(v.value for v in values) == sum(range(5000))
    assert all(a[99] == 0 for a in arrays)
    big = cpool.RawArray('b', 32 << 20)  # a dedicated memfd, pages touched lazily
    big[len(big) - 1] = 1
    assert len(open_fds()) - fds0 <= 3
    del values, arrays, big
    gc.collect()
    assert len(open_fds()) - fds0 <= 2
    assert _core.arena_stats()['chunks'] <= 2


def test_slot_runs_do_not_overlap():
    import cpool
    objs = [cpool.RawArray('b', n) for n in (1, 63, 64, 65, 200, 1000, 5000, 16384, 16385)]
    for i, o in enumerate(objs):
        ctypes.memset(ctypes.addressof(o), i + 1, len(o))
    for i, o in enumerate(objs):
        assert set(bytes(o)) <= {i + 1}
    addrs = sorted((ctypes.addressof(o), len(o)) for o in objs)
    for (a, n), (b, _) in zip(addrs, addrs[1:]):
        assert a + n <= b


def _churn(seed, rounds, failures):
    import random
    import os
    import cpool
    rnd = random.Random(seed)
    me = os.getpid() & 0x7fffffff
    live = []
    for i in range(rounds):
        if len(live) > 40 or (live and rnd.random() < 0.5):
            arr = live.pop(rnd.randrange(len(live)))
            if any(x != me for x in arr):
                failures.value += 1
        else:
            n = rnd.choice((1, 3, 16, 17, 100))
            arr = cpool.RawArray('i', [me] * n)
            live.append(arr)


def test_processes_allocating_from_shared_chunks_never_share_a_slot():
    # Forked children inherit the parent's chunks and claim slots in them concurrently.
    import cpool
    keep = [cpool.RawArray('i', 10) for _ in range(10)]  # the chunk exists before the fork
    failures = cpool.Value('i', 0)
    procs = [cpool.Process(target=_churn, args=(i, 20000, failures)) for i in range(3)]
    for p in procs:
        p.start()
    _churn(99, 20000, failures)
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert failures.value == 0
    assert all(a[:] == [0] * 10 for a in keep)
