"""Pool, ThreadPool and cpool.dummy: differential tests against multiprocessing, faults that must
not hang (dead workers, Ctrl-C, overrunning tasks), bounded imap memory, maxtasksperchild."""
import importlib
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import cpool
import cpool.pool
from conftest import running, zombies

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- task functions (module level: they travel by name) ----

def sq(x):
    return x * x


def add(a, b=0):
    return a + b


def boom(x):
    raise ValueError('boom %r' % (x,))


def boom_on(x, bad):
    if x == bad:
        raise ValueError('bad item %r' % (x,))
    return x


def sleepy(t):
    time.sleep(t)
    return t


def getpid(_=None):
    return os.getpid()


def die(code):
    os._exit(code)


def kill_self(_=None):
    os.kill(os.getpid(), signal.SIGKILL)


def segfault(_=None):
    import ctypes
    ctypes.string_at(0)


def raise_systemexit(_=None):
    raise SystemExit(3)


def raise_kbi(_=None):
    raise KeyboardInterrupt


def unpicklable_result(_=None):
    return threading.Lock()


def identity(x):
    return x


def die_on(x, bad):
    if x == bad:
        os._exit(5)
    return x


_init_value = None


def _init(v):
    global _init_value
    _init_value = v


def get_init(_=None):
    return _init_value


@pytest.fixture(params=['multiprocessing', 'cpool'])
def fmp(request):
    """The module under test, with the fork start method (the differential default)."""
    return importlib.import_module(request.param).get_context('fork')


def _norm_exc(e):
    return type(e).__name__, str(e)


# ============================ differential: results and order ============================

@pytest.mark.timeout(60)
def test_map_family_matches(fmp):
    with fmp.Pool(2) as p:
        data = list(range(50))
        out = {
            'map': p.map(sq, data),
            'map_c1': p.map(sq, data, chunksize=1),
            'map_c7': p.map(sq, data, 7),
            'map_gen': p.map(sq, (x for x in data)),
            'map_empty': p.map(sq, []),
            'starmap': p.starmap(add, [(i, i) for i in range(20)]),
            'starmap_c3': p.starmap(add, [(i, 1) for i in range(20)], 3),
            'map_async': p.map_async(sq, data).get(10),
            'starmap_async': p.starmap_async(add, [(1, 2), (3, 4)]).get(10),
            'imap': list(p.imap(sq, data)),
            'imap_c5': list(p.imap(sq, iter(data), 5)),
            'imap_unordered': sorted(p.imap_unordered(sq, data)),
            'imap_unordered_c4': sorted(p.imap_unordered(sq, data, chunksize=4)),
            'apply': p.apply(add, (1, 2)),
            'apply_kw': p.apply(add, (1,), {'b': 5}),
            'apply_async': [p.apply_async(add, (i, 1)).get(10) for i in range(10)],
            'objects': p.map(identity, [None, 1.5, 'x', b'y', (1, [2]), {'a': {1, 2}}, 10 ** 30]),
        }
    assert out == {
        'map': [x * x for x in data],
        'map_c1': [x * x for x in data],
        'map_c7': [x * x for x in data],
        'map_gen': [x * x for x in data],
        'map_empty': [],
        'starmap': [2 * i for i in range(20)],
        'starmap_c3': [i + 1 for i in range(20)],
        'map_async': [x * x for x in data],
        'starmap_async': [3, 7],
        'imap': [x * x for x in data],
        'imap_c5': [x * x for x in data],
        'imap_unordered': sorted(x * x for x in data),
        'imap_unordered_c4': sorted(x * x for x in data),
        'apply': 3,
        'apply_kw': 6,
        'apply_async': [i + 1 for i in range(10)],
        'objects': [None, 1.5, 'x', b'y', (1, [2]), {'a': {1, 2}}, 10 ** 30],
    }


def same(a, b):
    return a is b, a == b


def twice(x):
    v = [x]
    return (v, v)


def test_shared_references_survive_like_pickle(fmp):
    l, d = [1, 2], {'k': [3]}
    with fmp.Pool(1) as p:
        assert p.apply(same, (l, l)) == (True, True)
        assert p.apply(same, (d, d)) == (True, True)
        assert p.apply(same, (l, [1, 2])) == (False, True)
        assert p.apply(same, ({'a': 1}, {'a': 1})) == (False, True)
        a, b = p.apply(twice, (5,))
        assert a is b and a == [5]
        assert p.apply(identity, ({'x': [1, {'y': (2, 3.5, None, b'z', 'é')}]},)) == \
            {'x': [1, {'y': (2, 3.5, None, b'z', 'é')}]}
        assert p.starmap(same, [(l, l)] * 3, chunksize=2) == [(True, True)] * 3


def _typed(v):
    # the value with the exact type of every part, so 1 == 1.0 == True does not hide a change
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, [_typed(x) for x in v])
    if isinstance(v, dict):
        return ('dict', [(_typed(k), _typed(x)) for k, x in v.items()])
    if isinstance(v, float) and v != v:
        return ('float', 'nan')
    return (type(v).__name__, v)


def test_codec_round_trip_is_exact():
    hypothesis = pytest.importorskip('hypothesis')
    st = hypothesis.strategies
    scalars = (st.none() | st.booleans() | st.integers() | st.floats() | st.text() |
               st.binary() | st.integers(min_value=-2 ** 70, max_value=2 ** 70))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) |
                          st.tuples(inner, inner) |
                          st.dictionaries(st.text(max_size=3) | st.integers(), inner, max_size=4),
                          max_leaves=20)
    with cpool.Pool(1) as p:
        @hypothesis.settings(max_examples=150, deadline=None)
        @hypothesis.given(values)
        def check(v):
            assert _typed(p.apply(identity, (v,))) == _typed(v)
            assert _typed(p.map(identity, [v, v], chunksize=2)) == _typed([v, v])
        check()


def test_callbacks_and_async_result_api(fmp):
    got, errs = [], []
    with fmp.Pool(2) as p:
        r = p.apply_async(add, (2, 3), callback=got.append, error_callback=errs.append)
        assert r.get(10) == 5
        assert r.ready() and r.successful()
        m = p.map_async(sq, range(5), callback=got.append)
        m.wait(10)
        assert m.ready() and m.successful()
        e = p.apply_async(boom, (1,), callback=got.append, error_callback=errs.append)
        e.wait(10)
        assert e.ready() and not e.successful()
        s = p.apply_async(sleepy, (0.5,))
        with pytest.raises(ValueError):
            s.successful()
        assert not s.ready()
        with pytest.raises(fmp.TimeoutError):
            s.get(0.05)
        assert s.get(10) == 0.5
        em = p.map_async(boom, [1, 2], error_callback=errs.append)
        em.wait(10)
    # callbacks have run by the time get()/wait() return
    assert got == [5, [0, 1, 4, 9, 16]]
    assert [_norm_exc(x) for x in errs] == [('ValueError', 'boom 1'), ('ValueError', 'boom 1')] or \
        [_norm_exc(x) for x in errs] == [('ValueError', 'boom 1'), ('ValueError', 'boom 2')]


def test_exceptions_carry_remote_traceback(fmp):
    with fmp.Pool(2) as p:
        with pytest.raises(ValueError) as ei:
            p.apply(boom, (7,))
        assert str(ei.value) == 'boom 7'
        cause = ei.value.__cause__
        assert type(cause).__name__ == 'RemoteTraceback'
        assert 'in boom' in str(cause) and 'ValueError: boom 7' in str(cause)
        with pytest.raises(ValueError, match='bad item 3'):
            p.starmap(boom_on, [(i, 3) for i in range(10)], chunksize=2)
        # imap: the failing item raises in its place, the others are still delivered
        it = p.imap(sq, range(5))
        assert list(it) == [0, 1, 4, 9, 16]
        it = p.imap(boom, [1, 2])
        with pytest.raises(ValueError, match='boom 1'):
            next(it)
        with pytest.raises(ValueError, match='boom 2'):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
        # the pool still serves
        assert p.map(sq, range(4)) == [0, 1, 4, 9]


def test_unpicklable_result_becomes_error(fmp):
    with fmp.Pool(2) as p:
        with pytest.raises(Exception) as ei:
            p.apply(unpicklable_result)
        assert type(ei.value).__name__ == 'MaybeEncodingError'
        assert 'Error sending result' in str(ei.value)
        assert p.apply(add, (1, 1)) == 2


def test_bad_arguments_raise_like_stdlib(fmp):
    with pytest.raises(ValueError):
        fmp.Pool(0)
    with pytest.raises(ValueError):
        fmp.Pool(-1)
    with pytest.raises(TypeError):
        fmp.Pool(1, initializer=3)
    with pytest.raises(ValueError):
        fmp.Pool(1, maxtasksperchild=0)
    p = fmp.Pool(1)
    try:
        with pytest.raises(ValueError):
            p.imap(sq, range(3), chunksize=0)
        with pytest.raises(ValueError):
            p.imap_unordered(sq, range(3), chunksize=-1)
        with pytest.raises(ValueError):
            p.join()  # still running
        p.close()
        for call in (lambda: p.apply_async(sq, (1,)), lambda: p.map(sq, [1]),
                     lambda: p.imap(sq, [1]), lambda: p.apply(sq, (1,))):
            with pytest.raises(ValueError, match='Pool not running'):
                call()
        p.join()
    finally:
        p.terminate()
    p = fmp.Pool(1)
    p.terminate()
    with pytest.raises(ValueError, match='Pool not running'):
        p.map(sq, [1])
    p.join()
    with pytest.raises(ValueError):
        with p:
            pass


def test_initializer_and_close_join(fmp):
    p = fmp.Pool(2, initializer=_init, initargs=('hello',))
    r = p.map_async(get_init, range(6))
    p.close()
    p.join()
    assert r.get(0) == ['hello'] * 6
    assert not [c for c in fmp.active_children() if c.is_alive()]


def test_unpicklable_function_raises(fmp):
    with fmp.Pool(1) as p:
        with pytest.raises(Exception) as ei:
            p.apply_async(lambda x: x, (1,)).get(10)
        assert 'lambda' in str(ei.value)  # the message names what could not be pickled
        with pytest.raises(Exception):
            p.map(sq, [threading.Lock()])
        assert p.apply(sq, (3,)) == 9


def test_unpicklable_imap_item_fails_in_place():
    with cpool.Pool(2) as p:
        it = p.imap(identity, [1, threading.Lock(), 3])
        assert next(it) == 1
        with pytest.raises(TypeError, match='pickle'):
            next(it)
        assert next(it) == 3
        with pytest.raises(TypeError, match='pickle'):
            p.apply_async(identity, (threading.Lock(),))


def test_pickling_pool_refused(fmp):
    with fmp.Pool(1) as p:
        with pytest.raises(NotImplementedError):
            pickle.dumps(p)


# ============================ cpool only: never hangs ============================

@pytest.mark.parametrize('func,arg,code', [(die, 7, 7), (kill_self, 0, -signal.SIGKILL),
                                           (segfault, 0, -signal.SIGSEGV)])
def test_worker_death_fails_only_its_task(func, arg, code):
    with cpool.get_context('fork').Pool(2) as p:
        others = [p.apply_async(sleepy, (0.2,)) for _ in range(3)]
        t = time.monotonic()
        with pytest.raises(cpool.WorkerLostError) as ei:
            p.apply(func, (arg,))
        assert time.monotonic() - t < 1.5
        if func is segfault and 'asan' in os.environ.get('LD_PRELOAD', ''):
            code = (code, -signal.SIGABRT)  # AddressSanitizer turns the fault into an abort
        assert ei.value.exitcode in (code if isinstance(code, tuple) else (code,))
        assert isinstance(ei.value, cpool.ProcessError)
        assert [r.get(10) for r in others] == [0.2] * 3
        # replaced: the pool keeps serving with its full size
        assert p.map(sq, range(20), chunksize=1) == [x * x for x in range(20)]
        _wait_full(p)
        assert len(p._pool) == 2


def _wait_full(p, timeout=10):
    # A dead worker's replacement is started right after its task has been failed.
    deadline = time.monotonic() + timeout
    while not all(w is not None and w.exitcode is None for w in p._pool):
        assert time.monotonic() < deadline, p._pool
        time.sleep(0.02)


def slow_sq(x):
    time.sleep(0.001)
    return x * x


@pytest.mark.timeout(60)
def test_killing_workers_during_imap_never_hangs():
    # Workers are SIGKILLed at random while an imap runs: every item comes back, either its
    # result or WorkerLostError in its place, and the pool keeps serving.
    import random
    rnd = random.Random(3)
    with cpool.Pool(2) as p:
        stop = threading.Event()

        def killer():
            while not stop.wait(rnd.uniform(0.02, 0.08)):
                w = rnd.choice(list(p._pool))
                if w is not None and w.pid:
                    try:
                        os.kill(w.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass

        t = threading.Thread(target=killer)
        t.start()
        try:
            n, out = 600, []
            it = p.imap(slow_sq, range(n))
            for _ in range(n):
                try:
                    out.append(next(it))
                except cpool.WorkerLostError:
                    out.append(None)
            with pytest.raises(StopIteration):
                next(it)
        finally:
            stop.set()
            t.join()
        assert len(out) == n
        assert all(v is None or v == i * i for i, v in enumerate(out))
        assert 0 < out.count(None) < n // 2
        assert p.map(sq, range(10)) == [x * x for x in range(10)]


def test_base_exceptions_fail_the_task():
    with cpool.Pool(1) as p:
        with pytest.raises(SystemExit):
            p.apply(raise_systemexit)
        with pytest.raises(KeyboardInterrupt):
            p.apply(raise_kbi)
        assert p.apply(sq, (4,)) == 16


def test_worker_death_in_imap_and_map():
    with cpool.Pool(2) as p:
        r = p.starmap_async(die_on, [(i, 3) for i in range(6)], chunksize=1)
        with pytest.raises(cpool.WorkerLostError) as ei:
            r.get(10)
        assert ei.value.exitcode == 5
        it = p.imap(getpid, range(0))
        assert list(it) == []
        res = []
        it = p.imap(die_on_3, range(6))
        for _ in range(6):
            try:
                res.append(next(it))
            except cpool.WorkerLostError:
                res.append('lost')
        assert res == [0, 1, 2, 'lost', 4, 5]


def die_on_3(x):
    return die_on(x, 3)


def test_task_timeout_pool_and_per_call():
    with cpool.Pool(2, task_timeout=0.3) as p:
        t = time.monotonic()
        with pytest.raises(cpool.TimeoutError):
            p.apply(sleepy, (10,))
        assert time.monotonic() - t < 2
        assert p.apply(sleepy, (0.01,)) == 0.01
        out = []
        for r in [p.apply_async(sleepy, (x,)) for x in (0.01, 5, 0.02)]:
            try:
                out.append(r.get(10))
            except cpool.TimeoutError:
                out.append('timeout')
        assert out == [0.01, 'timeout', 0.02]
    with cpool.Pool(1) as p:
        with pytest.raises(cpool.TimeoutError):
            p.apply_async(sleepy, (10,), task_timeout=0.2).get(5)
        with pytest.raises(cpool.TimeoutError):
            p.map(sleepy, [0.01, 5], chunksize=1, task_timeout=0.3)
        assert p.apply(sleepy, (0.3,)) == 0.3  # no timeout unless asked


_CTRL_C = textwrap.dedent('''
    import os, signal, sys, threading, time
    sys.path.insert(0, {root!r})
    import cpool
    def sleepy(t):
        time.sleep(t)
        return t
    if __name__ == '__main__':
        ctx = cpool.get_context({method!r})
        t0 = [None]
        def fire():
            t0[0] = time.monotonic()
            os.kill(os.getpid(), signal.SIGINT)
        try:
            with ctx.Pool(2) as p:
                p.map(time.sleep, [0.01] * 4)  # time.sleep: importable under spawn too
                threading.Timer(0.3, fire).start()
                p.{call}
        except KeyboardInterrupt:
            print('KI %.3f' % (time.monotonic() - t0[0]))
        print('children', len(cpool.active_children()))
''')


@pytest.mark.parametrize('method,call', [('fork', 'map(sleepy, [3] * 8, chunksize=1)'),
                                         ('fork', 'apply_async(sleepy, (3,)).get()'),
                                         ('fork', 'imap(sleepy, [3] * 4).__next__()'),
                                         ('spawn', 'map(time.sleep, [3] * 8, chunksize=1)')])
def test_ctrl_c_in_parent(method, call):
    code = _CTRL_C.format(root=ROOT, method=method, call=call)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=30)
    lines = r.stdout.split()
    assert lines[0] == 'KI', r.stdout + r.stderr
    assert float(lines[1]) < 0.1
    assert lines[-1] == '0'
    # workers are stopped quietly: no traceback storm
    assert 'Traceback' not in r.stderr, r.stderr


def test_terminate_fails_pending_results_and_leaves_nothing():
    p = cpool.Pool(2)
    r = p.apply_async(sleepy, (10,))
    pending = p.map_async(sleepy, [10] * 4)
    time.sleep(0.1)
    p.terminate()
    p.join()
    with pytest.raises(cpool.ProcessError):
        r.get(5)
    with pytest.raises(cpool.ProcessError):
        pending.get(5)
    assert not [w for w in p._pool if w is not None and w.is_alive()]
    assert not zombies()


def test_pending_result_keeps_an_unreferenced_pool_alive(fmp):
    import gc
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', ResourceWarning)
        r = fmp.Pool(2).apply_async(sleepy, (0.2,))
        gc.collect()
        assert r.get(10) == 0.2


def test_terminate_ends_imap_with_error():
    p = cpool.Pool(2)
    it = p.imap(sleepy, [0.01, 0.01, 10, 0.01, 10], chunksize=1)
    assert next(it) == 0.01
    assert next(it) == 0.01
    time.sleep(0.2)
    p.terminate()
    got = []
    with pytest.raises(cpool.ProcessError):
        for x in it:
            got.append(x)
    assert got == []  # chunk 2 never finished: what came after it is not yielded out of order
    with pytest.raises(StopIteration):
        next(it)
    p.join()


class Box(object):
    # Pickled by pickle (not plain): its reduce runs Python code, so a thread switch can
    # happen in the middle of a submission.
    def __init__(self, v):
        self.v = v

    def __reduce__(self):
        time.sleep(0)
        return Box, (self.v,)

    def __eq__(self, other):
        return isinstance(other, Box) and other.v == self.v


def unbox(b):
    return Box(b.v * 2)


def test_many_threads_submitting():
    with cpool.Pool(2) as p:
        errors = []

        def client(k):
            try:
                for i in range(30):
                    assert p.apply_async(unbox, (Box(i + k),)).get(20) == Box(2 * (i + k))
                    assert p.map(unbox, [Box(j) for j in range(5)], chunksize=2) == \
                        [Box(2 * j) for j in range(5)]
                    assert list(p.imap(sq, range(k, k + 7))) == [x * x for x in range(k, k + 7)]
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors


def test_callback_may_use_the_pool():
    with cpool.Pool(2) as p:
        got = []
        done = threading.Event()

        def cb(v):
            got.append(v)
            if len(got) < 5:
                p.apply_async(add, (v, 1), callback=cb)
            else:
                done.set()

        p.apply_async(add, (0, 1), callback=cb)
        assert done.wait(10)
        assert got == [1, 2, 3, 4, 5]


def _use_inherited_pool(pool, q):
    out = []
    for call in (lambda: pool.apply(sq, (2,)), lambda: pool.map(sq, [1])):
        try:
            call()
            out.append('ran')
        except ValueError as e:
            out.append(str(e))
    pool.terminate()  # must not stop the parent's workers
    q.put(out)


def test_forked_child_cannot_use_the_parents_pool():
    ctx = cpool.get_context('fork')
    with ctx.Pool(2) as p:
        assert p.apply(sq, (3,)) == 9
        import queue as _queue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                q = _queue.SimpleQueue()
                _use_inherited_pool(p, q)
                os.write(w, repr(q.get()).encode())
            finally:
                os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            got = f.read()
        os.waitpid(pid, 0)
        assert got.count('process that created it') == 2, got
        assert p.map(sq, range(5)) == [0, 1, 4, 9, 16]  # the parent's pool still serves


# ============================ bounded memory, big messages, rings ============================

_MEM = textwrap.dedent('''
    import resource, sys
    sys.path.insert(0, {root!r})
    import cpool
    def f(x):
        return x & 7
    if __name__ == '__main__':
        with cpool.Pool(2) as p:
            list(p.imap(f, range(20000), chunksize=50))
            base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            n = 0
            for v in p.{fn}(f, (i for i in range({n})), chunksize=50):
                n += 1
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(n, peak - base)
''')


@pytest.mark.timeout(90)
@pytest.mark.parametrize('fn', ['imap', 'imap_unordered'])
def test_imap_consumes_lazily_in_bounded_memory(fn):
    n = 2_000_000
    code = _MEM.format(root=ROOT, fn=fn, n=n)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=80)
    count, grew_kb = map(int, r.stdout.split())
    assert count == n
    # the input list alone would take ~70 MB; the window keeps the parent flat
    assert grew_kb < 20_000, grew_kb


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_imap_ten_million_items_constant_memory():
    code = _MEM.format(root=ROOT, fn='imap', n=10_000_000)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=280)
    count, grew_kb = map(int, r.stdout.split())
    assert count == 10_000_000
    assert grew_kb < 20_000, grew_kb


def test_imap_reads_input_lazily():
    pulled = []

    def gen():
        for i in range(100000):
            pulled.append(i)
            yield i

    with cpool.Pool(2) as p:
        it = p.imap(sq, gen(), chunksize=1, buffersize=16)
        assert next(it) == 0
        # CPython's meaning of buffersize: processes + buffersize chunks ahead of next().
        assert len(pulled) <= 2 + 16 + 1
        assert sum(1 for _ in it) == 99999


def test_abandoned_imap_is_freed():
    import gc
    with cpool.Pool(2) as p:
        for _ in range(3):
            it = p.imap(sq, range(10 ** 9), chunksize=10)
            for x in it:
                if x > 100:
                    break
            del it
            gc.collect()
        assert p._core.njobs == 0
        assert p.map(sq, range(5)) == [0, 1, 4, 9, 16]


def test_imap_input_error_raised_in_place():
    def gen():
        yield 1
        yield 2
        raise RuntimeError('input broke')

    with cpool.Pool(1) as p:
        it = p.imap(sq, gen())
        assert next(it) == 1
        assert next(it) == 4
        with pytest.raises(RuntimeError, match='input broke'):
            next(it)


def test_large_messages_and_tiny_rings():
    blob = os.urandom(3 << 20)
    with cpool.Pool(2, task_ring_bytes=4096, result_ring_bytes=4096) as p:
        assert p.apply(identity, (blob,)) == blob
        assert p.map(identity, [blob[:100000]] * 6, chunksize=1) == [blob[:100000]] * 6
        assert p.map(sq, range(5000), chunksize=3) == [x * x for x in range(5000)]
        rs = [p.apply_async(add, (i, 1)) for i in range(3000)]
        assert [r.get(10) for r in rs] == [i + 1 for i in range(3000)]
    with cpool.Pool(2) as p:
        big = os.urandom(20 << 20)
        assert p.apply(identity, (big,)) == big


def test_slow_batched_chunks_are_shared():
    # Many small chunks go out several to a message; when they turn out slow and the other
    # worker has nothing to do, the unstarted ones are given back and shared.
    with cpool.Pool(2) as p:
        ts = [0.002] * 100 + [0.05] * 30
        assert p.map(sleepy, ts, chunksize=1) == ts
        assert list(p.imap(sleepy, ts)) == ts
        pids = p.map(sleep_pid, [0.005] * 64, chunksize=1)
        assert len(set(pids)) == 2


def sleep_pid(t):
    time.sleep(t)
    return os.getpid()


def test_maxtasksperchild_replaces_workers():
    with cpool.Pool(2, maxtasksperchild=1) as p:
        pids = p.map(getpid, range(60), chunksize=1)
        assert len(set(pids)) == 60
        assert p.map(sq, range(10)) == [x * x for x in range(10)]


@pytest.mark.stress
@pytest.mark.timeout(300)
def test_maxtasksperchild_stress():
    with cpool.Pool(2, maxtasksperchild=1) as p:
        rs = [p.apply_async(sq, (i,)) for i in range(2000)]
        assert [r.get(60) for r in rs] == [i * i for i in range(2000)]


# ============================ progress ============================

def test_progress_plain_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, 'tqdm', None)  # as if tqdm were not installed
    with cpool.Pool(2) as p:
        assert p.map(sq, range(100), progress=True) == [x * x for x in range(100)]
        assert sorted(p.imap_unordered(sq, range(10), progress='squares')) == \
            sorted(x * x for x in range(10))
        assert p.starmap(add, [(1, 2)] * 5, progress=True) == [3] * 5
    err = capsys.readouterr().err
    assert '100/100' in err and 'squares: 10/10' in err


def test_progress_tqdm(capsys):
    pytest.importorskip('tqdm')
    with cpool.Pool(2) as p:
        assert list(p.imap(sq, range(50), progress=True)) == [x * x for x in range(50)]
    assert '50/50' in capsys.readouterr().err


# ============================ start methods ============================

@pytest.mark.timeout(90)
@pytest.mark.parametrize('method', ['spawn', 'forkserver'])
def test_other_start_methods(method):
    with cpool.get_context(method).Pool(2, initializer=_init, initargs=(method,)) as p:
        assert p.map(sq, range(10)) == [x * x for x in range(10)]
        assert p.apply(get_init) == method
        with pytest.raises(cpool.WorkerLostError):
            p.apply(die, (4,))
        assert list(p.imap(sq, range(5))) == [0, 1, 4, 9, 16]
        # idle workers stay (under forkserver the pool is not their parent process)
        _wait_full(p)
        before = sorted(w.pid for w in p._pool)
        time.sleep(0.5)
        assert sorted(w.pid for w in p._pool) == before


_ORPHAN = textwrap.dedent('''
    import os, sys, time
    sys.path.insert(0, {root!r})
    import cpool
    if __name__ == '__main__':
        p = cpool.get_context({method!r}).Pool(2)
        print(' '.join(str(w.pid) for w in p._pool), flush=True)
        time.sleep(60)
''')


@pytest.mark.parametrize('method', ['fork', 'forkserver'])
def test_workers_leave_when_the_pool_process_dies(method):
    code = _ORPHAN.format(root=ROOT, method=method)
    proc = subprocess.Popen([sys.executable, '-c', code], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(x) for x in proc.stdout.readline().split()]
        assert len(pids) == 2
    finally:
        proc.kill()
        proc.wait()
    deadline = time.monotonic() + 5
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [pid for pid in pids if running(pid)]
    assert not alive


def test_default_context_pool_and_names():
    assert cpool.Pool is not None
    for name in ('Pool', 'ThreadPool', 'ApplyResult', 'AsyncResult', 'MapResult',
                 'IMapIterator', 'IMapUnorderedIterator', 'RemoteTraceback',
                 'MaybeEncodingError', 'ExceptionWithTraceback'):
        assert hasattr(cpool.pool, name), name
    with cpool.Pool(1) as p:
        r = p.apply_async(sq, (2,))
        assert isinstance(r, cpool.pool.AsyncResult)
        assert r.get(10) == 4


# ============================ threads ============================

@pytest.mark.parametrize('mod', ['multiprocessing', 'cpool'])
def test_threadpool_and_dummy(mod):
    pool_mod = importlib.import_module(mod + '.pool')
    dummy = importlib.import_module(mod + '.dummy')
    got = []
    with pool_mod.ThreadPool(3) as p:
        out = (p.map(lambda x: x * 2, range(10)),
               p.starmap(pow, [(2, 3), (3, 2)]),
               list(p.imap(lambda x: x + 1, range(5))),
               list(p.imap(str, range(5), chunksize=2)),
               sorted(p.imap_unordered(lambda x: -x, range(7), chunksize=3)),
               p.apply_async(lambda a, b: a - b, (5, 3), callback=got.append).get(5),
               p.map_async(abs, [-1, -2]).get(5))
        with pytest.raises(ZeroDivisionError):
            p.apply(lambda: 1 / 0)
    with dummy.Pool(2) as p:
        d = p.map(len, ['a', 'bb'])
    assert out == ([0, 2, 4, 6, 8, 10, 12, 14, 16, 18], [8, 9], [1, 2, 3, 4, 5],
                   ['0', '1', '2', '3', '4'], [-6, -5, -4, -3, -2, -1, 0], 2, [1, 2])
    assert got == [2] and d == [1, 2]
    a, b = dummy.Pipe()
    a.send(5)
    assert b.recv() == 5


def test_no_stdlib_multiprocessing_import():
    code = ("import sys; sys.modules['multiprocessing'] = None; sys.path.insert(0, %r)\n"
            "import cpool, cpool.pool, cpool.dummy\n"
            "with cpool.Pool(1) as p: print(p.map(abs, [-1]))" % ROOT)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=30)
    assert r.stdout.strip() == '[1]', r.stderr


class _InputFailed(Exception):
    pass


def _input_failing_at(n, when):
    for i in range(n):
        if i == when:
            raise _InputFailed
        yield i


def _imap_until_input_error(mod, chunksize):
    out = []
    with mod.Pool(2) as p:
        try:
            for x in p.imap(sq, _input_failing_at(20, 7), chunksize):
                out.append(x)
        except _InputFailed:
            out.append('input error')
    return out


@pytest.mark.parametrize('chunksize', [1, 2, 4])
def test_imap_input_error_drops_its_chunk_as_stdlib(chunksize):
    # The chunk whose reading raised is not run; the error comes in its place.
    import multiprocessing
    import cpool
    assert (_imap_until_input_error(cpool, chunksize)
            == _imap_until_input_error(multiprocessing, chunksize))


def test_pool_with_a_stand_in_process_that_fails_to_start(mpmod):
    # A context's Process may be any object with start/terminate/join/is_alive (CPython's
    # TestPoolNotLeakOnFailure): when the fourth fails to start, the pool raises and the
    # three started ones are stopped, not leaked.
    import unittest.mock
    started = []

    class StandIn:
        def __init__(self, **kwargs):
            self.name, self.exitcode, self.state = 'stand-in', None, None
            started.append(self)

        def start(self):
            if len(started) > 3:
                raise OSError('induced')
            self.state = 'started'

        def terminate(self):
            self.state = 'stopping'

        def join(self, timeout=None):
            if self.state == 'stopping':
                self.state = 'stopped'

        def is_alive(self):
            return self.state in ('started', 'stopping')

    pool_module = importlib.import_module(mpmod.__name__ + '.pool')
    with pytest.raises(OSError, match='induced'):
        pool_module.Pool(5, context=unittest.mock.MagicMock(Process=StandIn))
    assert len(started) == 4 and not any(p.is_alive() for p in started)


def slow_identity(x):
    time.sleep(0.3)
    return x


def test_a_job_is_untracked_only_while_the_pool_holds_it():
    """The cyclic GC is spared walking apply and map jobs while the pool's table holds them
    (they cannot be garbage there): untracked until they finish, then tracked again."""
    import gc
    with cpool.Pool(1) as p:
        for r in (p.apply_async(slow_identity, (1,)), p.map_async(slow_identity, [1])):
            assert not gc.is_tracked(r)
            r.wait(30)
            assert gc.is_tracked(r)
        it = p.imap(slow_identity, [1])  # held by its caller only: always tracked
        assert gc.is_tracked(it)
        assert list(it) == [1]
