"""Pool subclasses that override _setup_queues (joblib's PicklingPool/MemmappingPool do): their
tasks and results go through the queues the hook made, with the standard library's semantics
(differential, fork and spawn), plus cpool's own promises (a killed worker's task fails,
terminate() fails what is pending). joblib itself under the alias is in test_alias.py."""
import copyreg
import importlib
import io
import os
import pickle
import signal
import threading
import time

import pytest

import cpool
import cpool.pool

pytestmark = pytest.mark.timeout(120)


# ---- a queue with its own pickler, as joblib's CustomizablePicklingQueue ----

class Tagged(object):
    """A value whose reducer marks it: a worker sees `via_reducer` only if the hook's queue
    carried the task."""

    def __init__(self, value, via_reducer=False):
        self.value = value
        self.via_reducer = via_reducer


def rebuild_tagged(value):
    return Tagged(value, via_reducer=True)


def reduce_tagged(obj):
    return rebuild_tagged, (obj.value,)


class ReducingQueue(object):
    """A locked pipe whose sends pickle with `reducers` (joblib's queue, reduced to its core)."""

    def __init__(self, ctx, reducers):
        self._reducers = reducers
        self._reader, self._writer = ctx.Pipe(duplex=False)
        self._rlock = ctx.Lock()
        self._wlock = ctx.Lock()
        self._make_methods()

    def __getstate__(self):
        return self._reader, self._writer, self._rlock, self._wlock, self._reducers

    def __setstate__(self, state):
        self._reader, self._writer, self._rlock, self._wlock, self._reducers = state
        self._make_methods()

    def empty(self):
        return not self._reader.poll()

    def _make_methods(self):
        self._recv = self._reader.recv

        def _send(obj):
            buf = io.BytesIO()
            pickler = pickle.Pickler(buf, protocol=pickle.HIGHEST_PROTOCOL)
            pickler.dispatch_table = copyreg.dispatch_table.copy()
            pickler.dispatch_table.update(self._reducers)
            pickler.dump(obj)
            self._writer.send_bytes(buf.getvalue())
        self._send = _send

    def get(self):
        with self._rlock:
            return self._recv()

    def put(self, obj):
        with self._wlock:
            self._send(obj)


def reducing_pool_class(base):
    """base's subclass whose queues pickle Tagged with reduce_tagged (both ways)."""

    class ReducingPool(base):
        def _setup_queues(self):
            reducers = {Tagged: reduce_tagged}
            self._inqueue = ReducingQueue(self._ctx, reducers)
            self._outqueue = ReducingQueue(self._ctx, reducers)
            self._quick_put = self._inqueue._send
            self._quick_get = self._outqueue._recv
    return ReducingPool


def queue_pool_class(base):
    """base's subclass whose hook chains to the base's own (two SimpleQueues)."""

    class QueuePool(base):
        def _setup_queues(self):
            super()._setup_queues()
            self.hook_called = True
    return QueuePool


# ---- task functions ----

def sq(x):
    return x * x


def boom(x):
    raise ValueError('boom %r' % (x,))


def seen(t):
    return t.value, t.via_reducer


def tag(x):
    return Tagged(x)


def unpicklable(x):
    return lambda: x


def pid_of(x):
    return os.getpid()


def die(x):
    os.kill(os.getpid(), signal.SIGKILL)


def sleep_then(x):
    time.sleep(x)
    return x


def failing_input(n):
    for i in range(n):
        yield i
    raise KeyError('input broke')


@pytest.fixture(params=['multiprocessing', 'cpool'])
def mpmod(request):
    return importlib.import_module(request.param)


@pytest.fixture(params=['fork', 'spawn'])
def method(request):
    return request.param


def new_pool(mpmod, method, make=reducing_pool_class, processes=2, **kwds):
    pool_mod = importlib.import_module(mpmod.__name__ + '.pool')
    return make(pool_mod.Pool)(processes, context=mpmod.get_context(method), **kwds)


def test_reducer_used_both_ways(mpmod, method):
    # The hook's pickler carries the tasks (worker side sees the reducer's mark) and the
    # results (the parent's Tagged comes back rebuilt by it).
    with new_pool(mpmod, method) as p:
        assert p.apply(seen, (Tagged(3),)) == (3, True)
        assert (p.map(seen, [Tagged(i) for i in range(6)], chunksize=2)
                == [(i, True) for i in range(6)])
        assert [t.via_reducer for t in p.imap(tag, range(4))] == [True] * 4
        back = p.apply_async(tag, (7,)).get(30)
        assert (back.value, back.via_reducer) == (7, True)


def test_semantics_match_stdlib(mpmod, method):
    out = []
    with new_pool(mpmod, method) as p:
        out.append(p.map(sq, range(20)))
        out.append(p.map(sq, []))
        out.append(p.starmap(pow, [(2, 5), (3, 3)]))
        out.append(list(p.imap(sq, range(7), chunksize=3)))
        out.append(sorted(p.imap_unordered(sq, range(7))))
        got, errs = [], []
        p.apply_async(sq, (4,), callback=got.append).wait(30)
        r = p.apply_async(boom, (1,), callback=got.append, error_callback=errs.append)
        with pytest.raises(ValueError, match='boom 1') as ei:
            r.get(30)
        assert 'boom' in str(ei.value.__cause__)  # the worker's traceback, as RemoteTraceback
        out.append((r.ready(), r.successful()))
        m = p.map_async(sq, range(5), callback=got.append)
        out.append(m.get(30))
        em = p.map_async(boom, [1], error_callback=errs.append)
        em.wait(30)
        out.append((em.successful(), got, [str(e) for e in errs]))
        with pytest.raises(Exception) as ei:
            p.apply(unpicklable, (1,))
        out.append((type(ei.value).__name__, 'Error sending result' in str(ei.value)))
        it = p.imap(sq, failing_input(3))
        out.append([next(it) for _ in range(3)])
        with pytest.raises(KeyError):
            next(it)
        with pytest.raises(StopIteration):
            next(it)
    out.append(repr(p).split()[1:])
    assert out == [
        [x * x for x in range(20)], [], [32, 27], [x * x for x in range(7)],
        sorted(x * x for x in range(7)), (True, False), [0, 1, 4, 9, 16],
        (False, [16, [0, 1, 4, 9, 16]], ['boom 1', 'boom 1']),
        ('MaybeEncodingError', True), [0, 1, 4], ['state=TERMINATE', 'pool_size=2>']]


def test_maxtasksperchild_and_close_join(mpmod, method):
    p = new_pool(mpmod, method, make=queue_pool_class, maxtasksperchild=1)
    assert p.hook_called
    pids = p.map(pid_of, range(6), chunksize=1)
    p.close()
    t = time.monotonic()
    p.join()
    assert time.monotonic() - t < 5
    assert len(set(pids)) == 6
    assert all(w is None or not w.is_alive() for w in p._pool)
    with pytest.raises(ValueError):
        p.apply(sq, (1,))


def test_plain_pools_keep_the_c_path():
    class Sub(cpool.pool.Pool):
        pass
    for cls in (cpool.pool.Pool, Sub):
        with cls(1) as p:
            assert type(p._core) is cpool._core.PoolCore
            assert not hasattr(p, '_inqueue')
    with new_pool(cpool, 'fork', processes=1) as p:
        assert type(p._core) is cpool.pool._QueueCore


def test_task_timeout_refused():
    with pytest.raises(ValueError, match='_setup_queues'):
        new_pool(cpool, 'fork', task_timeout=1)
    with new_pool(cpool, 'fork', processes=1) as p:
        with pytest.raises(ValueError, match='_setup_queues'):
            p.apply_async(sq, (1,), task_timeout=1)


# ---- cpool's own promises (the standard library hangs in these) ----

@pytest.mark.parametrize('make', [reducing_pool_class, queue_pool_class])
def test_killed_worker_fails_its_task_and_is_replaced(method, make):
    with new_pool(cpool, method, make=make) as p:
        r = p.apply_async(die, (0,))
        with pytest.raises(cpool.WorkerLostError) as ei:
            r.get(30)
        assert ei.value.exitcode == -signal.SIGKILL
        assert 'SIGKILL' in str(ei.value)
        m = p.map_async(die, [1])
        with pytest.raises(cpool.WorkerLostError):
            m.get(30)
        assert p.map(sq, range(10)) == [x * x for x in range(10)]
        # Idle workers killed from outside (one holds the inqueue's read lock): the replacements
        # still get the tasks. Gone before tasks are sent: a worker killed mid-read would leave
        # half a message in the pipe (a pipe queue breaks so with the standard library too).
        from conftest import running
        deadline = time.monotonic() + 30
        while None in p._pool and time.monotonic() < deadline:
            time.sleep(0.01)  # the worker lost above may still be being replaced
        killed = list(p._pool)
        for w in killed:
            w.kill()
        deadline = time.monotonic() + 10
        while any(running(w.pid) for w in killed) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert p.map(sq, range(4)) == [0, 1, 4, 9]


def test_terminate_fails_pending_and_returns_soon(method):
    p = new_pool(cpool, method)
    running = [p.apply_async(sleep_then, (30,)) for _ in range(2)]
    queued = p.map_async(sq, range(100), chunksize=1)
    it = p.imap(sleep_then, [30, 30, 30])
    time.sleep(0.5)
    t = time.monotonic()
    p.terminate()
    assert time.monotonic() - t < 5
    for r in running + [queued]:
        with pytest.raises(cpool.ProcessError, match='terminated'):
            r.get(5)
    with pytest.raises(cpool.ProcessError):
        it.next(5)
    p.join()
    assert all(not w.is_alive() for w in p._pool)


def test_callback_that_raises_does_not_hang(capfd):
    def bad_callback(value):
        raise RuntimeError('callback broke')
    with new_pool(cpool, 'fork') as p:
        r = p.apply_async(sq, (3,), callback=bad_callback)
        assert r.get(30) == 9
        assert p.apply(sq, (4,)) == 16
    assert 'callback broke' in capfd.readouterr().err


def test_close_from_thread_with_pending_results_delivers_them():
    # join() returns after close() once the queued tasks are answered, callbacks run.
    got = []
    p = new_pool(cpool, 'fork')
    rs = [p.apply_async(sleep_then, (0.05,), callback=got.append) for _ in range(6)]
    threading.Thread(target=p.close).start()
    p.join()
    assert [r.get(0) for r in rs] == [0.05] * 6 and len(got) == 6


ORPHAN_PROGRAM = '''
import os, signal, sys
sys.path[:0] = [%r, %r]
import cpool.pool
from test_pool_setup_queues import queue_pool_class, sq
if __name__ == '__main__':
    p = queue_pool_class(cpool.pool.Pool)(2, context=cpool.get_context(sys.argv[1]))
    p.map(sq, range(3))
    print(' '.join(str(w.pid) for w in p._pool), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
'''


def test_workers_leave_when_the_pool_process_is_killed(method, tmp_path):
    # cpool's SimpleQueue gives its readers no EOF when the pool's process dies, as a pipe does.
    import subprocess
    import sys
    from conftest import running
    here = os.path.dirname(os.path.abspath(__file__))
    script = tmp_path / 'orphan.py'
    script.write_text(ORPHAN_PROGRAM % (here, os.path.dirname(here)))
    proc = subprocess.run([sys.executable, str(script), method], capture_output=True, text=True,
                          timeout=60)
    pids = [int(x) for x in proc.stdout.split()]
    assert len(pids) == 2, proc.stderr
    deadline = time.monotonic() + 10
    while any(running(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(running(pid) for pid in pids)


def test_ctrl_c_interrupts_map_and_the_with_block_cleans_up():
    from conftest import running, sigint_after
    with pytest.raises(KeyboardInterrupt):
        with new_pool(cpool, 'fork') as p:
            workers = list(p._pool)
            t = time.monotonic()
            sigint_after(0.3)
            p.map(sleep_then, [30, 30])
    assert time.monotonic() - t < 5
    assert not any(running(w.pid) for w in workers)


def test_no_fd_left_behind():
    import gc
    from conftest import open_fds
    for make in (reducing_pool_class, queue_pool_class):  # the first pool's imports open fds
        with new_pool(cpool, 'fork', make=make) as p:
            p.map(sq, range(3))
    p = None
    gc.collect()
    before = open_fds()
    for make in (reducing_pool_class, queue_pool_class) * 3:
        with new_pool(cpool, 'fork', make=make) as p:
            p.map(sq, range(3))
        p.join()
    p = None
    gc.collect()
    assert open_fds() <= before
