"""concurrent.futures.ProcessPoolExecutor on cpool (mp_context=, every start method, compared with
the standard library), and the queue internals it relies on: `_reader`/`_writer` ends that
`wait()` and `select` can watch, and the `_on_queue_feeder_error` hook of queue subclasses."""
import concurrent.futures as cf
import os
import pickle
import select
import signal
import threading
import time

import pytest

import cpool
from cpool.connection import wait

pytestmark = pytest.mark.timeout(120)


def square(x):
    return x * x


def fail(x):
    raise ValueError('bad %s' % x)


def die(_):
    os.kill(os.getpid(), signal.SIGKILL)


def executor_run(ctx):
    """Everything a user of the executor sees, as plain data to compare."""
    out = []
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        out.append(list(ex.map(square, range(20))))
        out.append(list(ex.map(square, range(30), chunksize=7)))
        f = ex.submit(fail, 3)
        out.append((type(f.exception()).__name__, str(f.exception())))
        # An argument that cannot be pickled fails its own future and nothing else.
        bad = ex.submit(square, lambda: 0)
        out.append(type(bad.exception()).__name__)
        out.append(ex.submit(square, 9).result())
        futs = [ex.submit(square, i) for i in range(50)]
        out.append(sorted(f.result() for f in cf.as_completed(futs)))
    return out


def test_executor_same_as_stdlib(ctx):
    got = executor_run(ctx)
    assert got[0] == [x * x for x in range(20)]
    assert got[2] == ('ValueError', 'bad 3')
    assert got[3] in ('PicklingError', 'AttributeError', 'TypeError')
    assert got[4] == 81


def test_executor_results_equal_across_modules(start_method):
    import multiprocessing
    assert executor_run(cpool.get_context(start_method)) == \
        executor_run(multiprocessing.get_context(start_method))


def test_executor_killed_worker_breaks_pool(ctx):
    # The standard library's promise: a worker that dies breaks the pool, no hang.
    with cf.ProcessPoolExecutor(2, mp_context=ctx) as ex:
        f = ex.submit(die, 0)
        with pytest.raises(cf.process.BrokenProcessPool):
            f.result(timeout=60)


def test_executor_max_tasks_per_child(mpmod):
    import sys
    if sys.version_info < (3, 14):
        # Seen here on 3.11.7 and 3.13.0: the executor's manager thread waits for ever after a
        # worker leaves, with the standard library as with cpool (map never returns).
        pytest.skip("this Python's executor hangs replacing a worker, on the standard library too")
    ctx = mpmod.get_context('spawn')
    with cf.ProcessPoolExecutor(2, mp_context=ctx, max_tasks_per_child=3) as ex:
        assert list(ex.map(square, range(12))) == [x * x for x in range(12)]


# ---- the queue ends the executor waits on ----

def _ready(end, timeout=0.0):
    return bool(select.select([end.fileno()], [], [], timeout)[0])


@pytest.mark.parametrize('kind', ['SimpleQueue', 'Queue', 'JoinableQueue'])
def test_reader_readable_exactly_while_nonempty(kind):
    q = getattr(cpool, kind)()
    r = q._reader
    assert q._reader is r and r.readable and not r.writable
    assert not _ready(r)
    q.put(1)
    assert _ready(r) and wait([r], 0) == [r]
    q.put(2)
    assert r.recv() == 1 and _ready(r)
    assert q.get() == 2
    assert not _ready(r) and wait([r], 0.01) == []
    # Messages put before anyone asked for the fd count too.
    q2 = getattr(cpool, kind)()
    q2.put('x')
    assert _ready(q2._reader) and q2._reader.poll() and q2.get() == 'x' and not q2._reader.poll()


def _producer(q, n):
    for i in range(n):
        q.put(i)


def test_reader_woken_by_other_processes(cctx):
    q = cctx.SimpleQueue()
    r = q._reader
    r.fileno()  # armed before the producers start: their puts keep it up to date
    procs = [cctx.Process(target=_producer, args=(q, 200)) for _ in range(2)]
    for p in procs:
        p.start()
    got = []
    deadline = time.monotonic() + 60
    while len(got) < 400 and time.monotonic() < deadline:
        ready = wait([r] + [p.sentinel for p in procs], timeout=5)
        if r in ready:
            got.append(r.recv())
    for p in procs:
        p.join()
    assert sorted(got) == sorted(list(range(200)) * 2)
    assert not _ready(r)


def test_wait_wakes_on_put_from_thread():
    q = cpool.SimpleQueue()
    r = q._reader
    t = threading.Timer(0.2, q.put, ('late',))
    t.start()
    assert wait([r], timeout=30) == [r]
    assert r.recv() == 'late'
    t.join()


def test_ends_speak_pickles():
    q = cpool.Queue()
    q._writer.send_bytes(pickle.dumps({'a': [1, 2]}))
    q._writer.send_bytes(b'xx' + pickle.dumps('mid') + b'yy', 2, len(pickle.dumps('mid')))
    q._writer.send(('t', 3))
    assert q.get() == {'a': [1, 2]}
    assert q.get() == 'mid'
    assert pickle.loads(q._reader.recv_bytes()) == ('t', 3)
    q.put(list(range(100)))
    with pytest.raises(OSError):
        q._reader.recv_bytes(maxlength=10)
    with pytest.raises(ValueError):
        q._writer.send_bytes(b'abc', 2, 5)


def test_closed_ends_raise():
    q = cpool.SimpleQueue()
    r = q._reader
    q.close()
    assert r.closed
    with pytest.raises(OSError):
        r.recv()
    with pytest.raises(OSError):
        r.fileno()
    q2 = cpool.Queue()
    q2._reader.close()
    q2.put(1)  # closing the reader end does not stop puts (the stdlib's feeder keeps going)
    with pytest.raises(OSError):
        q2._reader.recv()


def test_end_outliving_queue_is_closed():
    r = cpool.SimpleQueue()._reader
    assert r.closed
    with pytest.raises(OSError):
        r.recv()


def _read_child(q, out):
    out.put(q._reader.recv())


def test_notify_fd_reaches_spawned_child(start_method):
    ctx = cpool.get_context(start_method)
    q, out = ctx.SimpleQueue(), ctx.SimpleQueue()
    p = ctx.Process(target=_read_child, args=(q, out))
    p.start()
    q.put('to child')
    assert out.get() == 'to child'
    p.join()
    assert p.exitcode == 0


# ---- _on_queue_feeder_error ----

@pytest.mark.parametrize('modname', ['multiprocessing', 'cpool'])
def test_feeder_error_hook_of_subclass(modname):
    import importlib
    mod = importlib.import_module(modname)
    queues = importlib.import_module(modname + '.queues')
    errors = []

    class HookedQueue(queues.Queue):
        def _on_queue_feeder_error(self, e, obj):
            errors.append((type(e).__name__, obj if not callable(obj) else 'callable'))

    q = HookedQueue(ctx=mod.get_context())
    q.put(lambda: 0)   # no exception here: the hook hears of it
    q.put('ok')
    assert q.get(timeout=30) == 'ok'
    deadline = time.monotonic() + 10
    while not errors and time.monotonic() < deadline:  # stdlib: its feeder thread calls it
        time.sleep(0.01)
    assert errors and errors[0][1] == 'callable'
    q.close()
    q.join_thread()


def test_plain_queue_still_raises_in_put():
    q = cpool.Queue()
    with pytest.raises(Exception) as info:
        q.put(lambda: 0)
    assert 'pickle' in str(info.value).lower() or 'lambda' in str(info.value)
    q.put(1)
    assert q.get() == 1


def test_hooked_queue_full_and_closed_still_raise():
    import queue
    from cpool import queues

    class HookedQueue(queues.Queue):
        def _on_queue_feeder_error(self, e, obj):
            raise AssertionError('not a feeder error: %r' % e)

    q = HookedQueue(1)
    q.put(1)
    with pytest.raises(queue.Full):
        q.put_nowait(2)
    q.close()
    with pytest.raises(ValueError):
        q.put(3)
