"""Pools of worker processes (Pool) and threads (ThreadPool), with the standard library's API.

The per-task path runs in C (cpool._core.PoolCore): tasks are encoded straight into a
shared-memory ring, workers run a C loop (take, call, hand back), and results are collected by
whoever waits for them. This module shapes the API, starts and replaces workers, and runs one
handler thread that collects results nobody waits for (callbacks), feeds tasks that did not fit
in the ring, enforces task timeouts and replaces workers that exit.

Beyond the standard library:
  - a worker that dies mid-task (killed, segfault, os._exit) fails that task (one chunk) with
    cpool.WorkerLostError (its .exitcode says how) and is replaced; nothing hangs. imap
    raises it once per item of the lost chunk, so results stay in their places. A task that
    raises SystemExit or KeyboardInterrupt fails like any other.
  - task_timeout=seconds (opt-in), on the Pool (every task) or per call (apply_async, map,
    imap, ...): an item running longer fails with cpool.TimeoutError and its worker is killed
    and replaced.
  - imap/imap_unordered read their input lazily, so a generator of any length runs in
    constant memory. buffersize=b means what it means in CPython 3.15+: at most processes + b
    chunks are read and not yet returned by next(); without it cpool still reads ahead only
    max(256, 64 * processes) chunks (the standard library reads the whole input first).
  - progress=True (or a label) on map/starmap/imap/imap_unordered shows a progress bar: tqdm
    when installed, else a line on stderr.
  - Ctrl-C in the parent interrupts map/get/next at once; workers ignore SIGINT and are
    stopped by terminate() (the with block) without tracebacks.
  - results are sent in a compact form when they are plain builtin values and pickled
    otherwise; several small chunks may share one task message, but each chunk's result comes
    back on its own and a worker that finds them slow gives back the ones it has not started.
"""
import collections
import io
import itertools
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings
import weakref
from functools import partial

from . import _core, _cpus, context, reduction, util
from .context import ProcessError, TimeoutError, WorkerLostError  # noqa: F401
from ._pool_stats import PoolStats
from .connection import wait  # noqa: F401  (names the stdlib module has)
get_context = context._default_context.get_context  # a name the stdlib module has

__all__ = ['Pool', 'ThreadPool']

INIT = 'INIT'
RUN = 'RUN'
CLOSE = 'CLOSE'
TERMINATE = 'TERMINATE'
_STATES = {0: RUN, 1: CLOSE, 2: TERMINATE}

job_counter = itertools.count()

TASK_RING_BYTES = 4 << 20
RESULT_RING_BYTES = 4 << 20


def _default_heap_bytes():
    """Address space of the process's buffer heap, where arguments and results exporting a large
    buffer (numpy arrays...) are placed once and read in place: 1 GiB, of which only what
    passes through is ever touched; a sixteenth of an address-space limit (ulimit -v) if one
    is set."""
    import resource
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return 1 << 30
    return max(16 << 20, min(1 << 30, soft // 16))


_heap = None
HEAP_IDLE_MS = 10000  # freed heap pages unused this long go back (jemalloc's dirty decay)
_heaps = weakref.WeakSet()  # every heap mapped in this process


def _privatize_heaps():
    """Before a fork: arrays read in place from a heap move to private memory at the same
    address (one copy each, once), so the child gets them copy-on-write, as it gets any other
    memory, instead of sharing them with this process. Every fork does it, a pool's own
    worker forks too: a second pool's workers may read results of the first one kept in a
    global, and must not see the parent's later writes to them."""
    for heap in list(_heaps):
        try:
            heap.privatize()
        except OSError:
            util.debug('could not privatize a buffer heap before fork', exc_info=True)


os.register_at_fork(before=_privatize_heaps)


def _buffer_heap(nbytes):
    """The heap for a new pool: the process's one, shared by its pools and kept between them
    so its pages stay resident (fresh shared memory costs four times a copy to touch), or a
    heap of nbytes of the pool's own; None for nbytes == 0."""
    global _heap
    if nbytes is not None:
        heap = _core._buffer_heap(nbytes) if nbytes else None
        if heap is not None:
            _heaps.add(heap)
        return heap
    if _heap is None or _heap.pid != os.getpid():  # a forked child makes its own
        _heap = _core._buffer_heap(_default_heap_bytes())
        _heaps.add(_heap)
    else:
        _heap.trim(HEAP_IDLE_MS)
    return _heap


def mapstar(args):
    return list(map(*args))


def starmapstar(args):
    return list(itertools.starmap(args[0], args[1]))


# ---- exceptions travel with the worker's traceback, as in the standard library ----

class RemoteTraceback(Exception):
    def __init__(self, tb):
        self.tb = tb

    def __str__(self):
        return self.tb


class ExceptionWithTraceback:
    def __init__(self, exc, tb):
        tb = traceback.format_exception(type(exc), exc, tb)
        tb = ''.join(tb)
        self.exc = exc
        self.tb = '\n"""\n%s"""' % tb

    def __reduce__(self):
        return rebuild_exc, (self.exc, self.tb)


def rebuild_exc(exc, tb):
    exc.__cause__ = RemoteTraceback(tb)
    return exc


class MaybeEncodingError(Exception):
    """Wraps possible unpickleable errors, so they can be safely sent through the socket."""

    def __init__(self, exc, value):
        self.exc = repr(exc)
        self.value = repr(value)
        super(MaybeEncodingError, self).__init__(self.exc, self.value)

    def __str__(self):
        return "Error sending result: '%s'. Reason: '%s'" % (self.value, self.exc)

    def __repr__(self):
        return "<%s: %s>" % (self.__class__.__name__, self)


def _wrap_exception(exc):
    # Called by the C worker loop when a task raised (any BaseException).
    return ExceptionWithTraceback(exc, exc.__traceback__)


def _encoding_error(exc, value):
    return MaybeEncodingError(exc, value)


# ---- results: C objects (cpool._core.PoolJob) under the standard library's names ----

class ApplyResult(_core.PoolJob):
    """The result of apply_async: get(timeout), wait(timeout), ready(), successful()."""
    __slots__ = ()

    def __repr__(self):
        state = 'ready' if self.ready() else 'pending'
        return '<%s job=%s %s>' % (type(self).__name__, self._job, state)

    __class_getitem__ = classmethod(type(list[int]))


AsyncResult = ApplyResult


class MapResult(ApplyResult):
    """The result of map_async/starmap_async: get() gives the list of results."""
    __slots__ = ()


class IMapIterator(_core.PoolJob):
    """Results of imap in order; next(timeout) raises TimeoutError when not there in time."""
    __slots__ = ()

    def __repr__(self):
        return '<%s job=%s>' % (type(self).__name__, self._job)


class IMapUnorderedIterator(IMapIterator):
    """Results of imap_unordered, as they come."""
    __slots__ = ()


# ---- the worker process ----

class _Channel(object):
    """The pool's shared memory and its handler's wake-up eventfd as handed to a worker:
    inherited under fork, passed by fd (DupFd) when the worker is spawned."""

    def __init__(self, core):
        self.core = core

    def __reduce__(self):
        context.assert_spawning(self)
        heap = self.core.heap
        return _rebuild_channel, (reduction.DupFd(self.core.fd), self.core.size,
                                  reduction.DupFd(self.core.wake_fd),
                                  heap and (reduction.DupFd(heap[0]), heap[1], heap[2]))


def _rebuild_channel(dfd, size, wake_dfd, heap=None):
    fd, wake_fd = dfd.detach(), wake_dfd.detach()
    heap_fd, heap_size, tag = (heap[0].detach(), heap[1], heap[2]) if heap else (-1, 0, 0)
    try:
        core = _core.PoolCore._attach(fd, size, wake_fd, heap_fd, heap_size, tag)
    finally:
        os.close(fd)
        os.close(wake_fd)
        if heap_fd >= 0:
            os.close(heap_fd)
    _set_helpers(core)
    return _Channel(core)


class _PayloadPickler(pickle.Pickler):
    """The pickler of task arguments and results that may hold buffers (protocol 5, large
    buffers out of band in the pool's heap). A read-only numpy array goes as a writable copy:
    with the standard library's protocol 4 every array arrives writable, and tasks that write
    to their argument rely on it."""

    def reducer_override(self, obj):
        np = sys.modules.get('numpy')
        if np is not None and isinstance(obj, np.ndarray) and not obj.flags.writeable:
            f = obj.flags
            return obj.copy(order='K' if f.c_contiguous or f.f_contiguous else 'C').__reduce_ex__(5)
        return NotImplemented


def _dumps_collecting(obj, buffer_callback):
    f = io.BytesIO()
    _PayloadPickler(f, 5, buffer_callback=buffer_callback).dump(obj)
    return f.getvalue()


def _set_helpers(core):
    core._set_helpers(_wrap_exception, _encoding_error, ApplyResult, MapResult,
                      IMapIterator, IMapUnorderedIterator, _dumps_collecting)


def worker(channel, index, initializer=None, initargs=(), maxtasks=None, parent_pid=None):
    """Body of a pool worker process: the initializer, then the C task loop."""
    # Ctrl-C is the parent's business: it stops the workers itself, without a traceback storm.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if initializer is not None:
        initializer(*initargs)
    channel.core.worker_loop(index, maxtasks or 0, parent_pid or os.getppid())


def _launch_worker(w):
    """Name and start a pool worker process (daemonic, as the standard library's)."""
    w.name = w.name.replace('Process', 'PoolWorker')
    w.daemon = True
    w.start()
    return w


def _stop_processes(procs):
    """SIGTERM the pool's worker processes still running, SIGKILL those not gone within 1 s."""
    for p in procs:
        if p.exitcode is None:
            p.terminate()
    deadline = time.monotonic() + 1.0
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.exitcode is None:
            p.kill()
            p.join()


def _start_worker(ctx, channel, initializer, initargs, maxtasks, workers, core, index):
    w = _launch_worker(ctx.Process(target=worker, args=(channel, index, initializer, initargs,
                                                        maxtasks, os.getpid())))
    workers[index] = w
    # A context's stand-in Process without pid/sentinel (CPython's tests use one) is started
    # and stopped like the others, but not watched for its death (pid 0, no pidfd).
    pid, sentinel = getattr(w, 'pid', None), getattr(w, 'sentinel', None)
    core.set_worker(index, 0 if pid is None else pid, -1 if sentinel is None else sentinel)
    util.debug('added worker %s', w.name)
    return w


def _serve(core, workers, respawn, lock, heap=None):
    """The handler thread: collect results nobody waits for (callbacks), feed tasks that did
    not fit, enforce task timeouts, reap and replace workers that exit; and the heap's decay:
    pages of freed blocks unused for HEAP_IDLE_MS go back to the kernel. It is checked here,
    while a pool runs, and when a pool starts or ends (as jemalloc purges during allocator
    activity), so no thread of cpool's outlives the pools (a thread left running would make
    every later fork warn on 3.12+)."""
    missing = set()  # slots whose replacement could not be started yet (fork failed...)
    next_trim = time.monotonic() + 1.0
    while True:
        try:
            dead = core.serve(0.1)
            if heap is not None and time.monotonic() >= next_trim:
                heap.trim(HEAP_IDLE_MS)
                next_trim = time.monotonic() + 1.0
            for i in dead:
                with lock:
                    w = workers[i]
                    if w is None:
                        continue
                    w.join()
                    core.worker_lost(i, w.exitcode)
                    util.debug('worker %s exited with %s', w.name, w.exitcode)
                    workers[i] = None
                    missing.add(i)
            state = core.state
            for i in sorted(missing):
                if state == 0 or (state == 1 and not core.idle()):
                    with lock:
                        respawn(i)
                missing.discard(i)
        except Exception:
            traceback.print_exc()  # the pool must keep being served: try again shortly
            time.sleep(0.1)
            continue
        if state == 2:
            break
        if state == 1 and all(w is None for w in workers):
            core.serve(0)  # results handed back just before the last worker left
            break
    if heap is not None:
        heap.trim(HEAP_IDLE_MS)
    util.debug('pool handler thread exiting')


class _ProgressLine(object):
    """A progress line on stderr when tqdm is not installed."""

    def __init__(self, total, desc):
        self.n = 0
        self.total = total
        self.desc = desc or 'tasks'
        self.last = 0.0
        self.start = time.monotonic()

    def update(self, k=1):
        self.n += k
        now = time.monotonic()
        if now - self.last >= 0.1:
            self.last = now
            self._show(now)

    def _show(self, now):
        rate = self.n / max(now - self.start, 1e-9)
        tot = '/%d' % self.total if self.total is not None else ''
        sys.stderr.write('\r%s: %d%s [%.0f/s]' % (self.desc, self.n, tot, rate))
        sys.stderr.flush()

    def close(self):
        self._show(time.monotonic())
        sys.stderr.write('\n')
        sys.stderr.flush()


def _progress_bar(total, progress):
    desc = progress if isinstance(progress, str) else None
    try:
        from tqdm import tqdm
    except ImportError:
        return _ProgressLine(total, desc)
    return tqdm(total=total, desc=desc)


def _with_progress(it, total, progress):
    bar = _progress_bar(total, progress)
    try:
        for x in it:
            bar.update(1)
            yield x
    finally:
        bar.close()


def _check_pool_args(processes, initializer):
    if processes is None:
        processes = _cpus.default_pool_size()
    if processes < 1:
        raise ValueError("Number of processes must be at least 1")
    if initializer is not None and not callable(initializer):
        raise TypeError('initializer must be a callable')
    return processes


def _imap_window(buffersize, processes):
    """How many chunks an imap may have read and not yet returned: processes + buffersize, as
    CPython's imap counts it (a chunk per worker plus buffersize waiting); cpool's lazy default
    without one."""
    if buffersize is None:
        return max(256, 64 * processes)
    if not isinstance(buffersize, int) or isinstance(buffersize, bool):
        raise TypeError("buffersize must be an integer or None")
    if buffersize < 1:
        raise ValueError("buffersize must be None or > 0")
    return processes + buffersize


def _map_chunksize(n, chunksize, workers):
    """The chunksize of a map over n items: the standard library's default (about four chunks
    per worker), 0 for no items (the result is ready at once)."""
    if chunksize is None:
        chunksize, extra = divmod(n, workers * 4)
        if extra:
            chunksize += 1
    if n == 0:
        return 0
    if chunksize < 1:
        raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
    return chunksize


def _length(iterable):
    try:
        return len(iterable)
    except TypeError:
        return None


class Pool(object):
    """A pool of worker processes, as multiprocessing.Pool.

    Extra keyword arguments (cpool's own): task_timeout=seconds for every task (a task may
    also pass its own), task_ring_bytes / result_ring_bytes for the shared rings,
    buffer_heap_bytes for a heap of large buffers of the pool's own (0: none, every buffer is
    pickled in band; None: the process's heap, shared by its pools), stats=True to keep the time counters of stats()."""

    _wrap_exception = True

    @staticmethod
    def Process(ctx, *args, **kwds):
        return ctx.Process(*args, **kwds)

    def __init__(self, processes=None, initializer=None, initargs=(),
                 maxtasksperchild=None, context=None, *, task_timeout=None,
                 task_ring_bytes=TASK_RING_BYTES, result_ring_bytes=RESULT_RING_BYTES,
                 buffer_heap_bytes=None, stats=False):
        self._pool = []
        self._state = INIT
        self._ctx = context or _default_context()
        self._taskqueue = None
        self._cache = {}
        processes = _check_pool_args(processes, initializer)
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        self._processes = processes
        self._owner = os.getpid()
        self._initializer = initializer
        self._initargs = initargs
        self._maxtasksperchild = maxtasksperchild
        if type(self)._setup_queues is not Pool._setup_queues:
            self._start_queue_pool(task_timeout)
            return
        heap = _buffer_heap(buffer_heap_bytes)
        self._core = core = _core.PoolCore(processes, task_ring_bytes, result_ring_bytes,
                                           maxtasksperchild or 0, task_timeout, heap, stats)
        _set_helpers(core)
        core._set_owner(weakref.ref(self))
        self._lock = threading.Lock()
        self._pool = [None] * processes
        channel = _Channel(core)
        self._respawn = partial(_start_worker, self._ctx, channel, initializer, initargs,
                                maxtasksperchild, self._pool, core)
        try:
            for i in range(processes):
                self._respawn(i)
        except Exception:
            core.terminate()
            for p in self._pool:
                if p is not None:
                    p.terminate()
            for p in self._pool:
                if p is not None:
                    p.join()
            raise
        self._handler = threading.Thread(target=_serve,
                                         args=(core, self._pool, self._respawn, self._lock,
                                               heap),
                                         name='cpool-pool-handler', daemon=True)
        self._handler.start()
        self._state = RUN
        self._terminate = util.Finalize(
            self, self._terminate_pool,
            args=(core, self._pool, self._handler, self._lock), exitpriority=15)

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, '_state', None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __repr__(self):
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} state={self._state} '
                f'pool_size={len(self._pool)}>')

    def stats(self):
        """Where the pool's time went since it started (a PoolStats; print it for a report,
        subtract two for a span). Needs Pool(..., stats=True)."""
        if not isinstance(self._core, _core.PoolCore):
            raise ValueError('a Pool whose _setup_queues is overridden keeps no stats')
        d = self._core.stats()
        if not d['enabled']:
            raise ValueError('this pool keeps no stats: create it with Pool(..., stats=True)')
        return PoolStats._from_core(d)

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    def _setup_queues(self):
        """The standard library's hook: the queues tasks and results travel through. cpool's
        Pool does not call it (its tasks go through shared-memory rings in C); a subclass that
        overrides it gets its queues used, as _QueueCore says."""
        self._inqueue = self._ctx.SimpleQueue()
        self._outqueue = self._ctx.SimpleQueue()
        self._quick_put = self._inqueue._writer.send
        self._quick_get = self._outqueue._reader.recv

    def _start_queue_pool(self, task_timeout):
        _no_task_timeout(task_timeout)
        self._setup_queues()
        self._pool = [None] * self._processes
        self._core = core = _QueueCore(self)
        self._taskqueue = core.taskqueue
        try:
            for i in range(self._processes):
                core.start_worker(i)
        except Exception:
            core.stop_workers()
            raise
        core.start_threads()
        self._worker_handler, self._task_handler, self._result_handler = core.threads
        self._handler = core
        self._state = RUN
        self._terminate = util.Finalize(self, core.terminate, exitpriority=15)

    # ---- the standard library's API ----

    def apply(self, func, args=(), kwds={}, *, task_timeout=None):
        """Call func(*args, **kwds) in a worker and return its result."""
        return self._core.apply(func, args, kwds, None, None, task_timeout).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None, *,
                    task_timeout=None):
        """Call func(*args, **kwds) in a worker; returns an AsyncResult at once."""
        return self._core.apply(func, args, kwds, callback, error_callback, task_timeout)

    def map(self, func, iterable, chunksize=None, *, progress=False, task_timeout=None):
        """list(map(func, iterable)) computed by the workers, chunksize items per task."""
        if progress:
            return self._map_progress(func, iterable, chunksize, False, progress, task_timeout)
        return self._map_async(func, iterable, chunksize, False, None, None, task_timeout).get()

    def starmap(self, func, iterable, chunksize=None, *, progress=False, task_timeout=None):
        """Like map() but each item is an argument tuple: func(*item)."""
        if progress:
            return self._map_progress(func, iterable, chunksize, True, progress, task_timeout)
        return self._map_async(func, iterable, chunksize, True, None, None, task_timeout).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None, *,
                  task_timeout=None):
        """Asynchronous map(); returns a MapResult."""
        return self._map_async(func, iterable, chunksize, False, callback, error_callback,
                               task_timeout)

    def starmap_async(self, func, iterable, chunksize=None, callback=None,
                      error_callback=None, *, task_timeout=None):
        """Asynchronous starmap(); returns a MapResult."""
        return self._map_async(func, iterable, chunksize, True, callback, error_callback,
                               task_timeout)

    def imap(self, func, iterable, chunksize=1, buffersize=None, *, progress=False,
             task_timeout=None):
        """Lazy map(): results in order. The input is read at most buffersize chunks ahead."""
        return self._imap(func, iterable, chunksize, True, False, buffersize, task_timeout,
                          progress)

    def imap_unordered(self, func, iterable, chunksize=1, buffersize=None, *, progress=False,
                       task_timeout=None):
        """Like imap() but results come as they are ready."""
        return self._imap(func, iterable, chunksize, False, False, buffersize, task_timeout,
                          progress)

    def close(self):
        """No more tasks; the workers leave once the queued ones are done."""
        util.debug('closing pool')
        if self._state == RUN:
            self._state = CLOSE
            self._core.close()

    def terminate(self):
        """Stop the workers now; results not yet in are lost (their get() raises)."""
        util.debug('terminating pool')
        self._state = TERMINATE
        if os.getpid() != self._owner:
            return  # a forked copy of the pool object: the workers are not ours to stop
        self._terminate()

    def join(self):
        """Wait for the workers to leave (after close() or terminate())."""
        util.debug('joining pool')
        if self._state == RUN:
            raise ValueError("Pool is still running")
        elif self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        if os.getpid() != self._owner:
            return
        self._handler.join()
        for p in list(self._pool):
            if p is not None:
                p.join()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError(
            'pool objects cannot be passed between processes or pickled')

    # ---- internals ----

    def _default_chunksize(self, n):
        chunksize, extra = divmod(n, len(self._pool) * 4)
        if extra:
            chunksize += 1
        return chunksize

    def _map_async(self, func, iterable, chunksize, star, callback, error_callback,
                   task_timeout):
        self._check_running()
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        if chunksize is None:
            chunksize = self._default_chunksize(len(iterable))
        elif chunksize < 1 and len(iterable):
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        if not isinstance(iterable, (list, tuple, range)):
            iterable = list(iterable)
        return self._core.map(func, iterable, chunksize, star, callback, error_callback,
                              task_timeout)

    def _imap(self, func, iterable, chunksize, ordered, star, buffersize, task_timeout,
              progress=False):
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        window = _imap_window(buffersize, len(self._pool))
        total = _length(iterable) if progress else None
        it = self._core.imap(func, iterable, chunksize, ordered, star, window, task_timeout)
        return _with_progress(it, total, progress) if progress else it

    def _map_progress(self, func, iterable, chunksize, star, progress, task_timeout):
        # map with a progress bar: an imap underneath, so progress is seen chunk by chunk.
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        if chunksize is None:
            chunksize = max(1, min(self._default_chunksize(len(iterable)), 64))
        return list(self._imap(func, iterable, chunksize, True, star, None, task_timeout,
                               progress))

    @staticmethod
    def _terminate_pool(core, workers, handler, lock):
        util.debug('finalizing pool')
        core.terminate()
        with lock:
            procs = [p for p in workers if p is not None]
        _stop_processes(procs)
        if handler.is_alive() and threading.current_thread() is not handler:
            handler.join()
        core.fail_all(ProcessError('the pool was terminated before the task finished'))


def _default_context():
    from . import context as _context
    return _context._default_context.get_context()


# =============================== ThreadPool ===============================

class _ThreadResult(object):
    """AsyncResult of a ThreadPool (results stay in the process: nothing is pickled)."""

    def __init__(self, pool, callback, error_callback):
        self._pool = pool
        self._event = threading.Event()
        self._job = next(job_counter)
        self._cache = pool._cache
        self._callback = callback
        self._error_callback = error_callback
        self._cache[self._job] = self

    def ready(self):
        return self._event.is_set()

    def successful(self):
        if not self.ready():
            raise ValueError("{0!r} not ready".format(self))
        return self._success

    def wait(self, timeout=None):
        self._event.wait(timeout)

    def get(self, timeout=None):
        self.wait(timeout)
        if not self.ready():
            raise TimeoutError
        if self._success:
            return self._value
        raise self._value

    def _set(self, i, obj):
        self._success, self._value = obj
        _call_back(self._callback if self._success else self._error_callback, self._value)
        self._event.set()
        self._cache.pop(self._job, None)
        self._pool = None

    __class_getitem__ = classmethod(type(list[int]))


def _call_back(callback, value):
    # A failing callback is reported and the result still becomes ready (as cpool.Pool's).
    if callback is not None:
        try:
            callback(value)
        except Exception:
            traceback.print_exc()


class _ThreadMapResult(_ThreadResult):

    def __init__(self, pool, chunksize, length, callback, error_callback):
        super().__init__(pool, callback, error_callback=error_callback)
        self._success = True
        self._value = [None] * length
        self._chunksize = chunksize
        self._lock = threading.Lock()
        if chunksize <= 0:
            self._number_left = 0
            self._event.set()
            self._cache.pop(self._job, None)
        else:
            self._number_left = length // chunksize + bool(length % chunksize)

    def _set(self, i, success_result):
        success, result = success_result
        with self._lock:
            if self._event.is_set():
                return
            if success and self._success:
                self._value[i * self._chunksize:(i + 1) * self._chunksize] = result
                self._number_left -= 1
                finished = self._number_left == 0
            else:
                finished = self._success
                self._success = False
                self._value = result
        if not finished:
            return
        _call_back(self._callback if self._success else self._error_callback, self._value)
        self._event.set()
        self._cache.pop(self._job, None)
        self._pool = None


class _ThreadIMapIterator(object):

    def __init__(self, pool, ordered, buffersize):
        self._pool = pool
        self._cond = threading.Condition(threading.Lock())
        self._job = next(job_counter)
        self._cache = pool._cache
        self._items = collections.deque()
        self._unsorted = {}
        self._index = 0
        self._length = None
        self._ordered = ordered
        self._slots = threading.BoundedSemaphore(buffersize) if buffersize else None
        self._cache[self._job] = self

    def __iter__(self):
        return self

    def next(self, timeout=None):
        with self._cond:
            self._cond.wait_for(lambda: self._items or self._index == self._length, timeout)
            if not self._items:
                if self._index == self._length:
                    self._pool = None
                    raise StopIteration
                raise TimeoutError
            item = self._items.popleft()
        if self._slots is not None:
            self._slots.release()
        success, value = item
        if success:
            return value
        raise value

    __next__ = next

    def _set(self, i, obj):
        with self._cond:
            if not self._ordered or self._index == i:
                self._items.append(obj)
                self._index += 1
                while self._ordered and self._index in self._unsorted:
                    self._items.append(self._unsorted.pop(self._index))
                    self._index += 1
                self._cond.notify()
            else:
                self._unsorted[i] = obj
            if self._index == self._length:
                self._cache.pop(self._job, None)
                self._pool = None

    def _abort(self, exc):
        # next() yields what did arrive in order, then raises exc, then stops (as cpool.Pool's).
        with self._cond:
            if self._index == self._length:
                return
            self._items.append((False, exc))
            self._index += 1
            self._length = self._index
            self._cond.notify_all()
            self._cache.pop(self._job, None)
            self._pool = None

    def _set_length(self, length):
        with self._cond:
            self._length = length
            if self._index == self._length:
                self._cond.notify()
                self._cache.pop(self._job, None)
                self._pool = None


class ThreadPool(Pool):
    """A pool of threads with Pool's API (nothing is pickled; functions may be lambdas).
    A Pool subclass as in the standard library, with its own thread-based machinery."""

    def __init__(self, processes=None, initializer=None, initargs=()):
        self._state = INIT
        self._cache = {}
        processes = _check_pool_args(processes, initializer)
        self._processes = processes
        self._inqueue = queue.SimpleQueue()
        self._pool = []
        for i in range(processes):
            t = threading.Thread(target=self._worker, args=(self._inqueue, initializer, initargs),
                                 name='ThreadPoolWorker-%d' % (i + 1), daemon=True)
            t.start()
            self._pool.append(t)
        self._feeders = []  # imap feeders and the thread failing dropped tasks: join() waits
        # Guards the state against the imap feeders: a task is queued only while the pool is
        # not terminated, and the workers' stop marks go in once, after the last task.
        self._feed_lock = threading.Lock()
        self._feeding = 0  # imap feeders still queueing tasks
        self._state = RUN

    @staticmethod
    def _worker(inqueue, initializer, initargs):
        if initializer is not None:
            initializer(*initargs)
        while True:
            task = inqueue.get()
            if task is None:
                break
            job, i, func, args, kwds = task
            try:
                result = (True, func(*args, **kwds))
            except Exception as e:
                result = (False, e)
            try:
                job._set(i, result)
            except Exception:
                traceback.print_exc()
            del task, job, func, args, kwds, result

    def __repr__(self):
        cls = self.__class__
        return f'<{cls.__module__}.{cls.__qualname__} state={self._state} pool_size={len(self._pool)}>'

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")

    def apply(self, func, args=(), kwds={}):
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        self._check_running()
        result = _ThreadResult(self, callback, error_callback)
        self._inqueue.put((result, 0, func, args, kwds))
        return result

    def map(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, mapstar, chunksize).get()

    def starmap(self, func, iterable, chunksize=None):
        return self._map_async(func, iterable, starmapstar, chunksize).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, mapstar, chunksize, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        return self._map_async(func, iterable, starmapstar, chunksize, callback, error_callback)

    def _map_async(self, func, iterable, mapper, chunksize=None, callback=None,
                   error_callback=None):
        self._check_running()
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        chunksize = _map_chunksize(len(iterable), chunksize, len(self._pool))
        result = _ThreadMapResult(self, chunksize, len(iterable), callback, error_callback)
        if chunksize:
            it = iter(iterable)
            for i in itertools.count():
                chunk = tuple(itertools.islice(it, chunksize))
                if not chunk:
                    break
                self._inqueue.put((result, i, mapper, ((func, chunk),), {}))
        return result

    def imap(self, func, iterable, chunksize=1, buffersize=None):
        return self._imap(func, iterable, chunksize, True, buffersize)

    def imap_unordered(self, func, iterable, chunksize=1, buffersize=None):
        return self._imap(func, iterable, chunksize, False, buffersize)

    def _imap(self, func, iterable, chunksize, ordered, buffersize):
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        window = None if buffersize is None else _imap_window(buffersize, self._processes)
        result = _ThreadIMapIterator(self, ordered, window)

        def feed():
            # Feeds on after close() (as the standard library's task handler does) and stops
            # at terminate(); the iterator always learns its length, so next() never hangs.
            n = 0
            try:
                it = iter(iterable)
                while self._state != TERMINATE:
                    # A slot first, then the input: nothing is read beyond the window.
                    if result._slots is not None:
                        while not result._slots.acquire(timeout=0.1):
                            if self._state == TERMINATE:
                                break
                        if self._state == TERMINATE:
                            break
                    chunk = tuple(itertools.islice(it, chunksize))
                    if not chunk:
                        break
                    if chunksize == 1:
                        task = (result, n, func, chunk, {})
                    else:
                        task = (result, n, mapstar, ((func, chunk),), {})
                    with self._feed_lock:
                        if self._state == TERMINATE:
                            break
                        self._inqueue.put(task)
                    n += 1
            except Exception as e:
                result._set(n, (False, e))
                n += 1
            finally:
                result._set_length(n)
                with self._feed_lock:
                    self._feeding -= 1
                    if self._state == CLOSE and not self._feeding:
                        self._stop_workers()

        with self._feed_lock:
            self._feeding += 1
        t = threading.Thread(target=feed, daemon=True)
        t.start()
        self._feeders.append(t)
        if chunksize == 1:
            return result
        return _Flatten(result)

    def _stop_workers(self):
        # One stop mark per thread, behind every queued task (the caller holds _feed_lock).
        for _ in self._pool:
            self._inqueue.put(None)

    def close(self):
        with self._feed_lock:
            if self._state == RUN:
                self._state = CLOSE
                if not self._feeding:
                    self._stop_workers()

    def terminate(self):
        """Drop the queued tasks and return at once, closed or not, as the standard library's
        does; running tasks finish (threads cannot be killed) and join() waits for them.
        A dropped task's result fails with ProcessError, as a terminated Pool's do: in a thread
        of its own (join() waits for it), as failing 10,000 of them takes a tenth of a second."""
        dropped = []
        with self._feed_lock:
            if self._state == TERMINATE:
                return
            self._state = TERMINATE
            try:
                while True:
                    task = self._inqueue.get_nowait()
                    if task is not None:
                        dropped.append(task)
            except queue.Empty:
                pass
            self._stop_workers()
        if dropped:
            t = threading.Thread(target=_fail_dropped, args=(dropped,), daemon=True)
            t.start()
            self._feeders.append(t)

    def join(self):
        if self._state == RUN:
            raise ValueError("Pool is still running")
        for t in self._feeders:
            t.join()
        for t in self._pool:
            t.join()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, *exc):
        self.terminate()


def _fail_dropped(tasks):
    exc = ProcessError('the pool was terminated before the task finished')
    for job, i, *_ in tasks:
        try:
            job._set(i, (False, exc))
        except Exception:
            traceback.print_exc()


class _Flatten(object):
    """Items of the chunks yielded by a chunked ThreadPool imap."""

    def __init__(self, chunks):
        self._chunks = chunks
        self._cur = iter(())

    def __iter__(self):
        return self

    def __next__(self):
        while True:
            try:
                return next(self._cur)
            except StopIteration:
                self._cur = iter(next(self._chunks))

    def next(self, timeout=None):
        while True:
            try:
                return next(self._cur)
            except StopIteration:
                self._cur = iter(self._chunks.next(timeout))


# ============ Pools whose subclass overrides _setup_queues (joblib's MemmappingPool) ============

class _QueueCache(dict):
    """Pending results by job id; wakes the worker handler when the last one is done, so a
    closed pool's workers are told to leave at once (the standard library's _PoolCache)."""

    def __init__(self, wake):
        super().__init__()
        self._wake = wake

    def pop(self, *args):
        value = super().pop(*args)
        if not self:
            self._wake()
        return value


def _exit_with(pid):
    # A pipe's reader sees EOF when the pool's process dies; a cpool queue's does not, so the
    # worker watches that process itself (through a pidfd: under forkserver it is not the parent).
    try:
        fd = os.pidfd_open(pid)
    except OSError:
        os._exit(1)
    import select
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    while not poller.poll():
        pass
    os._exit(1)


def _queue_worker(inqueue, outqueue, slots, index, initializer=None, initargs=(), maxtasks=None,
                  wrap_exception=False, pool_pid=None):
    """Body of a worker of a _QueueCore pool: the standard library's worker loop, which also
    records the (job, i) it runs in its slot of `slots`, so that its death fails that task."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if pool_pid is not None:
        threading.Thread(target=_exit_with, args=(pool_pid,), daemon=True).start()
    put = outqueue.put
    get = inqueue.get
    if hasattr(inqueue, '_writer'):
        inqueue._writer.close()
        outqueue._reader.close()
    if initializer is not None:
        initializer(*initargs)
    job_slot, i_slot = 2 * index, 2 * index + 1
    completed = 0
    while maxtasks is None or completed < maxtasks:
        try:
            task = get()
        except (EOFError, OSError):
            util.debug('worker got EOFError or OSError -- exiting')
            break
        if task is None:
            util.debug('worker got sentinel -- exiting')
            break
        job, i, func, args, kwds = task
        slots[i_slot] = i
        slots[job_slot] = job + 1
        try:
            result = (True, func(*args, **kwds))
        except BaseException as e:  # SystemExit too fails its task, as in cpool's C loop
            if wrap_exception:
                e = ExceptionWithTraceback(e, e.__traceback__)
            result = (False, e)
        try:
            put((job, i, result))
        except Exception as e:
            wrapped = MaybeEncodingError(e, result[1])
            util.debug("Possible encoding error while sending result: %s" % (wrapped,))
            put((job, i, (False, wrapped)))
        slots[job_slot] = 0
        task = job = result = func = args = kwds = None
        completed += 1
    util.debug('worker exiting after %d tasks' % completed)


def _worker_lost(pid, exitcode):
    how = ''
    if exitcode is not None and exitcode < 0:
        try:
            how = ' (%s)' % signal.Signals(-exitcode).name
        except ValueError:
            pass
    exc = WorkerLostError('worker (pid %s) terminated abruptly with exit code %s%s while '
                          'running the task' % (pid, exitcode, how))
    exc.exitcode = exitcode
    exc.pid = pid
    return exc


class _QueueCore(object):
    """The task path of a Pool whose subclass overrides _setup_queues: tasks go through the
    queues that hook made (pool._inqueue written with pool._quick_put, pool._outqueue read with
    pool._quick_get), with the standard library's three threads: a task handler that sends the
    queued tasks, a result handler that hands results to their AsyncResults (ThreadPool's
    classes, keyed by job id in pool._cache), and a worker handler that replaces exited workers.

    Beyond the standard library, as cpool's C path: a worker killed mid-task fails that task
    with WorkerLostError (its slot in a shared array names the task; the failure goes through
    the outqueue, behind any result the worker did send, and a task already answered is left
    alone); imap reads its input lazily in a feeder thread; terminate() fails what is pending
    with ProcessError. Same interface as cpool._core.PoolCore where Pool uses it."""

    def __init__(self, pool):
        self.state = 0  # PoolCore's numbering: 0 RUN, 1 CLOSE, 2 TERMINATE
        self.pool_ref = weakref.ref(pool)
        self.ctx = pool._ctx
        self.Process = pool.Process
        self.processes = pool._processes
        self.worker_args = (pool._initializer, pool._initargs, pool._maxtasksperchild,
                            pool._wrap_exception, os.getpid())
        self.inqueue, self.outqueue = pool._inqueue, pool._outqueue
        self.put, self.get = pool._quick_put, pool._quick_get
        self.workers = pool._pool
        from .sharedctypes import RawArray
        self.slots = RawArray('q', 2 * self.processes)
        self.wake_fd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self.cache = pool._cache = _QueueCache(self.wake)
        self.taskqueue = queue.SimpleQueue()
        self.inflight = set()  # (job, i) sent and not answered
        self.feeders = []
        self.lock = threading.Lock()
        self.threads = ()
        self.terminated = False

    def __del__(self):
        # Not in terminate(): a result set after it still wakes this fd, never a reused number.
        os.close(self.wake_fd)

    def wake(self):
        os.eventfd_write(self.wake_fd, 1)

    # ---- workers ----

    def start_worker(self, index):
        w = self.Process(self.ctx, target=_queue_worker,
                         args=(self.inqueue, self.outqueue, self.slots, index) + self.worker_args)
        self.slots[2 * index] = 0
        self.workers[index] = _launch_worker(w)
        util.debug('added worker')
        return w

    def stop_workers(self):
        with self.lock:
            procs = [p for p in self.workers if p is not None]
        _stop_processes(procs)

    def reap_workers(self):
        """Join exited workers, fail the task a dead one was running, start replacements."""
        for index, w in enumerate(self.workers):
            if w is None or w.exitcode is None:
                continue
            w.join()
            util.debug('cleaning up worker %d' % index)
            job = self.slots[2 * index] - 1
            if job >= 0:
                self.slots[2 * index] = 0
                lost = _worker_lost(w.pid, w.exitcode)
                # Behind the worker's own result if it sent one: the result handler ignores a
                # loss for a task already answered.
                self.outqueue.put((job, self.slots[2 * index + 1], (False, lost), index))
            with self.lock:
                self.workers[index] = None
                if self.state == 0 or (self.state == 1 and self.cache):
                    self.start_worker(index)

    # ---- the three threads ----

    def start_threads(self):
        self.threads = tuple(threading.Thread(target=f, name='cpool-pool-' + name, daemon=True)
                             for f, name in ((self.handle_workers, 'workers'),
                                             (self.handle_tasks, 'tasks'),
                                             (self.handle_results, 'results')))
        for t in self.threads:
            t.start()

    def handle_workers(self):
        while self.state == 0 or (self.state == 1 and self.cache):
            try:
                self.reap_workers()
            except Exception:
                traceback.print_exc()  # fork failed...: try again shortly
                time.sleep(0.1)
            sentinels = [w.sentinel for w in self.workers
                         if w is not None and hasattr(w, 'sentinel')]
            wait(sentinels + [self.wake_fd])
            try:
                os.eventfd_read(self.wake_fd)
            except BlockingIOError:
                pass
        self.taskqueue.put(None)  # the task handler tells the workers to leave
        util.debug('worker handler exiting')

    def handle_tasks(self):
        put, inflight, cache = self.put, self.inflight, self.cache
        for taskseq, set_length in iter(self.taskqueue.get, None):
            task = None
            try:
                for task in taskseq:
                    if self.state == 2:
                        break
                    key = task[:2]
                    inflight.add(key)
                    try:
                        put(task)
                    except Exception as e:
                        inflight.discard(key)
                        result = cache.get(key[0])
                        if result is not None:
                            result._set(key[1], (False, e))
                else:
                    if set_length:
                        set_length()
                    continue
                break
            finally:
                task = taskseq = None
        try:
            self.outqueue.put(None)
            for _ in self.workers:
                put(None)
        except OSError:
            util.debug('task handler got OSError when sending sentinels')
        util.debug('task handler exiting')

    def handle_results(self):
        get, inflight, cache = self.get, self.inflight, self.cache
        while True:
            try:
                task = get()
            except (OSError, EOFError):
                util.debug('result handler got EOFError/OSError -- exiting')
                return
            if self.state == 2:
                break
            if task is None:
                if not cache:
                    break
                continue  # the task handler's, while results are still owed: go on
            key = task[:2]
            if len(task) == 4 and key not in inflight:
                continue  # a dead worker's task that it had answered
            inflight.discard(key)
            result = cache.get(key[0])
            if result is not None:
                result._set(key[1], task[2])
            task = result = None
        util.debug('result handler exiting')

    # ---- what Pool calls ----

    def submit(self, taskseq, set_length=None):
        self.taskqueue.put((taskseq, set_length))

    def apply(self, func, args, kwds, callback, error_callback, task_timeout):
        if self.state != 0:
            raise ValueError("Pool not running")
        _no_task_timeout(task_timeout)
        result = _ThreadResult(self.pool_ref(), callback, error_callback)
        self.submit([(result._job, 0, func, args, kwds)])
        return result

    def map(self, func, iterable, chunksize, star, callback, error_callback, task_timeout):
        _no_task_timeout(task_timeout)
        n = len(iterable)
        chunksize = chunksize if n else 0
        result = _ThreadMapResult(self.pool_ref(), chunksize, n, callback, error_callback)
        mapper = starmapstar if star else mapstar
        if n:
            job = result._job
            self.submit((job, i, mapper, ((func, iterable[k:k + chunksize]),), {})
                        for i, k in enumerate(range(0, n, chunksize)))
        return result

    def imap(self, func, iterable, chunksize, ordered, star, window, task_timeout):
        _no_task_timeout(task_timeout)
        result = _ThreadIMapIterator(self.pool_ref(), ordered, window)
        direct = chunksize == 1 and not star
        mapper = starmapstar if star else mapstar
        job = result._job

        def feed():
            # A slot first, then the input: nothing is read beyond the window. Feeds on after
            # close() and stops at terminate(); the iterator always learns its length.
            n = 0
            try:
                it = iter(iterable)
                while self.state != 2:
                    if result._slots is not None:
                        while not result._slots.acquire(timeout=0.1):
                            if self.state == 2:
                                return
                    chunk = tuple(itertools.islice(it, chunksize))
                    if not chunk:
                        break
                    if direct:
                        self.submit([(job, n, func, chunk, {})])
                    else:
                        self.submit([(job, n, mapper, ((func, chunk),), {})])
                    n += 1
            except Exception as e:
                result._set(n, (False, e))
                n += 1
            finally:
                result._set_length(n)

        t = threading.Thread(target=feed, name='cpool-pool-imap', daemon=True)
        self.feeders.append(t)
        t.start()
        return result if direct else _Flatten(result)

    def close(self):
        if self.state == 0:
            self.state = 1
            self.wake()

    def join(self):
        for t in self.threads + tuple(self.feeders):
            t.join()

    def terminate(self):
        """The Finalize of the pool: stop the threads and the workers, fail what is pending."""
        if self.terminated:
            return
        self.terminated = True
        util.debug('finalizing pool')
        self.state = 2
        self.wake()
        me = threading.current_thread()
        worker_handler, task_handler, result_handler = self.threads or (None,) * 3
        if worker_handler is not None and worker_handler is not me:
            worker_handler.join()
        self.stop_workers()
        # The task handler may be blocked sending to a full inqueue: nobody reads it now.
        reader = getattr(self.inqueue, '_reader', None)
        while task_handler is not None and task_handler.is_alive() and reader is not None:
            try:
                if reader.poll(0.01):
                    reader.recv_bytes()
            except (OSError, EOFError):
                break
        if result_handler is not None and result_handler.is_alive():
            self.outqueue.put(None)
        for t in (task_handler, result_handler):
            if t is not None and t is not me:
                t.join()
        for t in self.feeders:
            if t is not me:
                t.join()
        exc = ProcessError('the pool was terminated before the task finished')
        for result in list(self.cache.values()):
            if isinstance(result, _ThreadIMapIterator):
                result._abort(exc)
            else:
                result._set(0, (False, exc))
        self.cache.clear()


def _no_task_timeout(task_timeout):
    if task_timeout is not None:
        raise ValueError('task_timeout is not supported by a Pool whose _setup_queues is '
                         'overridden (its tasks go through its own queues)')
