"""cpool.dask.Pool: the Pool API run on a Dask cluster (distributed), for work that outgrows a node.

    from cpool.dask import Pool          # instead of: from multiprocessing import Pool
    with Pool(address='tcp://head:8786') as pool:
        for r in pool.imap(work, reads(), chunksize=64):
            ...

Pool(processes=None, initializer=None, initargs=(), maxtasksperchild=None, *, client=None,
address=None) takes a distributed.Client, a scheduler address, or neither (then a LocalCluster
of `processes` worker processes on this machine, one thread each; address='local' is the same). Dask is only the engine:
results, their order, callbacks and exceptions (the worker's traceback as __cause__) are those of
the standard library's Pool, and what Dask does not give by default is given here:
  - every call runs, even two equal ones (pure=False: no deduplication), and none is retried;
  - `processes` caps the tasks in flight (default: the cluster's threads);
  - imap/imap_unordered read their input lazily, at most `buffersize` chunks ahead of what the
    caller has consumed, so a generator of any length runs in constant memory here;
  - initializer(*initargs) runs once in every worker process before its first task, also in
    workers that join or are restarted later (a Dask WorkerPlugin);
  - a worker that dies mid-task fails that task with cpool.WorkerLostError and the pool keeps
    serving (the LocalCluster made here is configured with allowed-failures=0; a scheduler of
    your own retries a task on `distributed.scheduler.allowed-failures` workers first);
  - the scheduler going away fails the pending tasks with SchedulerLostError within seconds;
  - maxtasksperchild=n: a worker process runs at most n tasks of this pool, then its nanny
    replaces it by a fresh process (the initializer runs again there). The worker stops taking
    tasks when it starts its n-th, waits until the results it holds have been fetched, and
    retires (the scheduler moves any other data it holds and reschedules what was queued on
    it, none of it counted as a failure). Workers without a nanny cannot be replaced: the pool
    refuses them (ValueError), or fails the task given to one that joined later. On a cluster
    shared with other work the restart also restarts that work's tasks on the worker.

Functions and arguments travel with Dask's pickling (cloudpickle: lambdas work too); results
travel pickled by the standard pickle, so what the standard library cannot return fails here
as there (MaybeEncodingError). This module imports distributed; `import cpool` does not.
"""
import asyncio
import itertools
import logging
import os
import pickle
import queue
import threading
import time
import uuid
import warnings
from functools import partial

import dask
import distributed
from distributed.comm import CommClosedError
from distributed.core import Status
from distributed.diagnostics.plugin import WorkerPlugin

from .context import ProcessError, TimeoutError, WorkerLostError  # noqa: F401
from .pool import (CLOSE, INIT, RUN, TERMINATE, MaybeEncodingError, ExceptionWithTraceback,
                   _check_pool_args, _imap_window, _map_chunksize, _ThreadIMapIterator,
                   _ThreadMapResult, _ThreadResult)

__all__ = ['Pool', 'AsyncResult', 'SchedulerLostError', 'WorkerLostError']

# Configuration of the LocalCluster made when neither client nor address is given: a worker
# that dies fails its task at once instead of re-running it elsewhere, and each worker thread
# holds one task, so a killed worker takes down only the task it was running.
LOCAL_CONFIG = {
    'distributed.scheduler.allowed-failures': 0,
    'distributed.scheduler.worker-saturation': 1.0,
}

_APPLY, _MAP, _STARMAP = 0, 1, 2


class SchedulerLostError(ProcessError):
    """The connection to the Dask scheduler was lost before the task's result came back."""


# ---- what runs in the worker processes ----

_worker_lock = threading.Lock()
_initialized = set()     # pool ids whose initializer ran in this process


def _initialize(pool_id, initializer, initargs):
    with _worker_lock:
        if pool_id in _initialized:
            return
        _initialized.add(pool_id)
    initializer(*initargs)


class _Initializer(WorkerPlugin):
    """Runs the pool's initializer in each worker process, also in those that join later."""

    def __init__(self, pool_id, initializer, initargs):
        self.pool_id = pool_id
        self.initializer = initializer
        self.initargs = initargs

    def setup(self, worker):
        _initialize(self.pool_id, self.initializer, self.initargs)


# maxtasksperchild: what this worker process has run, for the pools that set it.
_tasks_run = {}          # pool id -> tasks of that pool started in this process
_quota_keys = []         # keys of those tasks: their results must be fetched before retiring
_retiring = False        # a quota was reached: this process takes no more tasks


def _take_quota(pool_id, maxtasks):
    """Counts a task of the pool in this worker process, before it runs. Its n-th sets the
    worker on its way out: the process is replaced once that task's result has been fetched."""
    global _retiring
    worker = distributed.get_worker()
    with _worker_lock:
        if _retiring:
            # Only if the task reached the worker before the scheduler heard it is leaving:
            # back to the scheduler, for another worker (not a failure, not a retry: it did
            # not run).
            raise distributed.Reschedule()
        if worker.nanny is None:
            raise RuntimeError('maxtasksperchild: the Dask worker %s has no nanny to start a '
                               'fresh process (start workers without --no-nanny)'
                               % worker.address)
        n = _tasks_run[pool_id] = _tasks_run.get(pool_id, 0) + 1
        _quota_keys.append(worker.get_current_task())
        if n < maxtasks:
            return
        _retiring = True
        keys = list(_quota_keys)
    asyncio.run_coroutine_threadsafe(_replace_worker(worker, keys), worker.loop.asyncio_loop)


async def _replace_worker(worker, keys):
    """On the worker's event loop: no more tasks, and once the results of `keys` are fetched,
    retire from the scheduler and close the process, which the nanny then starts afresh."""
    try:
        if worker.status not in (Status.running, Status.paused):
            return  # already closing for another reason
        # Not paused: the memory monitor resumes paused workers. closing_gracefully is what
        # Scheduler.retire_workers sets, and keeps the scheduler from assigning new tasks here.
        worker.status = Status.closing_gracefully
        # From here on this process closes without telling its nanny. Worker.close() asks the
        # nanny to close gracefully, and a nanny whose process exits in that state closes for
        # good instead of starting a fresh one. Dask closes a worker that way when a heartbeat
        # of it reaches the scheduler after the retirement below ("Scheduler was unaware of
        # this worker"), which under load often falls before the nanny's kill: the cluster
        # then shrank to nothing.
        nanny, worker.nanny = worker.nanny, None
        # Tasks running here (of any pool) finish rather than be rescheduled and run twice.
        while worker.status == Status.closing_gracefully and (
                worker.state.executing or any(k in worker.state.tasks for k in keys)):
            await asyncio.sleep(0.01)
        if worker.status != Status.closing_gracefully:
            return
        # An expected removal: what was queued here is rescheduled, not failed as lost, and
        # data of others held only here is copied to another worker first. It tells this
        # worker closing_gracefully over the scheduler's stream, which can come after its
        # answer, and once this process is closing Dask logs that as an invalid transition.
        # From paused (no tasks given here either) the message's arrival can be seen.
        worker.status = Status.paused
        retired = await worker.scheduler.retire_workers(
            workers=[worker.address], close_workers=False, remove=True,
            stimulus_id='cpool-maxtasksperchild')
        if worker.address in retired:
            deadline = time.monotonic() + 10
            # Paused until that message comes (or running, if the memory monitor resumed it).
            while (worker.status in (Status.paused, Status.running)
                   and time.monotonic() < deadline):
                await asyncio.sleep(0.01)
        if worker.status in (Status.closing, Status.closed, Status.failed):
            return  # closing by itself: the nanny starts a fresh process when it has exited
        # The nanny stops this process as Client.restart_workers has it do (through its stop
        # queue: a process that closes itself leaves the nanny's reader thread to fail), and
        # starts a fresh one. Stopping closes this end of the connection: no answer comes.
        try:
            async with worker.rpc(nanny) as rpc:
                await rpc.kill(reason='cpool-maxtasksperchild')
        except (CommClosedError, OSError):
            pass
    except Exception:
        logging.getLogger(__name__).exception('could not replace worker %s after '
                                              'maxtasksperchild tasks', worker.address)


def _encode(result):
    # Pickled here rather than by Dask so that a result the standard library could not send
    # fails the same way (MaybeEncodingError), and the client gets exactly what pickle gives.
    try:
        return pickle.dumps(result, pickle.HIGHEST_PROTOCOL)
    except Exception as e:
        return pickle.dumps((False, MaybeEncodingError(e, result[1])), pickle.HIGHEST_PROTOCOL)


def _run(kind, func, args, quota=None):
    """One task in a worker: an apply (args = (args, kwds)) or one chunk of a map/starmap;
    quota is (pool id, maxtasksperchild) for a pool that set it."""
    if quota is not None:
        _take_quota(*quota)
    try:
        if kind == _APPLY:
            value = func(*args[0], **args[1])
        elif kind == _MAP:
            value = list(map(func, args))
        else:
            value = list(itertools.starmap(func, args))
        result = (True, value)
    except BaseException as e:  # as cpool's workers: SystemExit/KeyboardInterrupt fail the task
        result = (False, ExceptionWithTraceback(e, e.__traceback__))
    return _encode(result)


# ---- results, as the standard library's ----

class AsyncResult(_ThreadResult):
    """The result of apply_async: get(timeout), wait(timeout), ready(), successful()."""

    def _set(self, i, obj):
        # Once: a task failed by terminate() may still report back from the cluster.
        if not self._event.is_set():
            super()._set(i, obj)


ApplyResult = AsyncResult


class MapResult(_ThreadMapResult):
    """The result of map_async/starmap_async: get() gives the list of results."""


class IMapIterator(_ThreadIMapIterator):
    """Results of imap/imap_unordered; next(timeout) raises TimeoutError when not there in time.
    Its window (buffersize slots) is taken before an input chunk is read and given back when
    its result is consumed, which is what keeps the reading of the input bounded."""

    def __init__(self, pool, ordered, buffersize):
        super().__init__(pool, ordered, buffersize)
        self._aborted = False

    def _set(self, i, obj):
        if not self._aborted:
            super()._set(i, obj)

    def _set_length(self, length):
        if not self._aborted:
            super()._set_length(length)

    def _abort(self, exc):
        # The pool stopped: what came back is still given, then exc once, then the end.
        with self._cond:
            if self._aborted:
                return
            self._aborted = True
            self._unsorted.clear()
            self._items.append((False, exc))
            self._index += len(self._items)
            self._length = self._index
            self._cond.notify_all()
        self._cache.pop(self._job, None)


IMapUnorderedIterator = IMapIterator


class _LocalCluster(distributed.LocalCluster):
    """The LocalCluster a pool makes: its workers all run under nannies that restart them.

    A SpecCluster closes a worker's nanny for good when, lost-worker-timeout (15 s) after any
    removal of a worker, no worker of that name is registered: which is the case when that
    moment falls inside a restart (maxtasksperchild restarts often), and the cluster then
    shrinks to nothing. Here a removal only updates the cluster's view, as Cluster's does."""

    def _update_worker_status(self, op, msg):
        distributed.deploy.Cluster._update_worker_status(self, op, msg)


def _check_nannies(client):
    """maxtasksperchild replaces a worker's process through its nanny: every worker needs one."""
    workers = client.scheduler_info(n_workers=-1)['workers']
    without = sorted(addr for addr, info in workers.items() if not info.get('nanny'))
    if without:
        raise ValueError('maxtasksperchild needs Dask workers started by a nanny, which starts '
                         'a fresh process in place of one that retires; these have none: %s '
                         '(started with --no-nanny, or LocalCluster(processes=False))'
                         % ', '.join(without))


class Pool(object):
    """A pool of Dask workers with multiprocessing.Pool's API (see the module's docstring)."""

    def __init__(self, processes=None, initializer=None, initargs=(), maxtasksperchild=None,
                 *, client=None, address=None):
        self._state = INIT
        self._cache = {}
        if client is not None and address is not None:
            raise ValueError('give a client or an address, not both')
        if processes is not None:
            _check_pool_args(processes, None)
        _check_pool_args(1, initializer)
        if maxtasksperchild is not None:
            if not isinstance(maxtasksperchild, int) or maxtasksperchild <= 0:
                raise ValueError("maxtasksperchild must be a positive int or None")
        self._cluster = None
        self._own_client = client is None
        if address == 'local':  # what a `--dask local` command-line option gives
            address = None
        if client is None and address is None:
            with dask.config.set(LOCAL_CONFIG):
                self._cluster = _LocalCluster(
                    n_workers=processes or os.cpu_count() or 1, threads_per_worker=1,
                    processes=True, host='127.0.0.1', dashboard_address=':0')
            client = distributed.Client(self._cluster, set_as_default=False)
        elif client is None:
            client = distributed.Client(address, set_as_default=False)
        self._client = client
        self._address = client.scheduler.address
        if processes is None:
            # A cluster still starting (an adaptive or batch-queue one) has no threads yet.
            processes = sum(client.nthreads().values()) or os.cpu_count() or 1
        self._processes = processes
        self._id = 'cpool-%s' % uuid.uuid4().hex
        self._quota = None if maxtasksperchild is None else (self._id, maxtasksperchild)
        self._plugin = None
        try:
            if maxtasksperchild is not None:
                _check_nannies(client)
            if initializer is not None:
                client.register_plugin(_Initializer(self._id, initializer, initargs),
                                       name=self._id)
                self._plugin = self._id
        except BaseException:
            self._release_cluster()
            raise
        self._lock = threading.Lock()
        self._slots = threading.Semaphore(processes)  # tasks in flight
        self._inflight = {}      # future key -> future, to cancel them on terminate
        self._idle = threading.Condition(self._lock)
        self._lost = None        # the SchedulerLostError once the scheduler went away
        self._tasks = queue.SimpleQueue()
        self._feeders = []
        self._submitter = threading.Thread(target=self._submit_loop, daemon=True,
                                           name='cpool-dask-submitter')
        self._submitter.start()
        self._state = RUN

    def __del__(self, _warn=warnings.warn, RUN=RUN):
        if getattr(self, '_state', None) == RUN:
            _warn(f"unclosed running multiprocessing pool {self!r}", ResourceWarning, source=self)

    def __repr__(self):
        cls = self.__class__
        return (f'<{cls.__module__}.{cls.__qualname__} state={self._state} '
                f'pool_size={self._processes} scheduler={self._address}>')

    @property
    def client(self):
        """The distributed.Client the pool submits through."""
        return self._client

    def _check_running(self):
        if self._state != RUN:
            raise ValueError("Pool not running")
        if self._lost is not None:
            raise self._lost

    # ---- the standard library's API ----

    def apply(self, func, args=(), kwds={}):
        """Call func(*args, **kwds) in a worker and return its result."""
        return self.apply_async(func, args, kwds).get()

    def apply_async(self, func, args=(), kwds={}, callback=None, error_callback=None):
        """Call func(*args, **kwds) in a worker; returns an AsyncResult at once."""
        self._check_running()
        result = AsyncResult(self, callback, error_callback)
        self._tasks.put((result, 0, _APPLY, func, (tuple(args), dict(kwds))))
        return result

    def map(self, func, iterable, chunksize=None):
        """list(map(func, iterable)) computed by the workers, chunksize items per task."""
        return self._map_async(func, iterable, chunksize, _MAP).get()

    def starmap(self, func, iterable, chunksize=None):
        """Like map() but each item is an argument tuple: func(*item)."""
        return self._map_async(func, iterable, chunksize, _STARMAP).get()

    def map_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        """Asynchronous map(); returns a MapResult."""
        return self._map_async(func, iterable, chunksize, _MAP, callback, error_callback)

    def starmap_async(self, func, iterable, chunksize=None, callback=None, error_callback=None):
        """Asynchronous starmap(); returns a MapResult."""
        return self._map_async(func, iterable, chunksize, _STARMAP, callback, error_callback)

    def imap(self, func, iterable, chunksize=1, buffersize=None):
        """Lazy map(): results in order; the input is read at most buffersize chunks ahead."""
        return self._imap(func, iterable, chunksize, True, buffersize)

    def imap_unordered(self, func, iterable, chunksize=1, buffersize=None):
        """Like imap() but results come as they are ready."""
        return self._imap(func, iterable, chunksize, False, buffersize)

    def close(self):
        """No more tasks; those given still run. join() then waits for them."""
        if self._state == RUN:
            self._state = CLOSE
            self._tasks.put(None)

    def terminate(self):
        """Stop now: tasks not finished fail, and a cluster this pool made is shut down."""
        if self._state == TERMINATE:
            return
        self._state = TERMINATE
        self._stop(ProcessError('the pool was terminated before the task finished'))
        self._tasks.put(None)
        self._release_cluster()

    def join(self):
        """Wait until every task given has finished (after close() or terminate())."""
        if self._state == RUN:
            raise ValueError("Pool is still running")
        if self._state not in (CLOSE, TERMINATE):
            raise ValueError("In unknown state")
        for t in self._feeders:
            t.join()
        self._submitter.join()
        with self._idle:
            self._idle.wait_for(lambda: not self._inflight or self._lost is not None)
        self._release_cluster()

    def __enter__(self):
        self._check_running()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()

    def __reduce__(self):
        raise NotImplementedError('pool objects cannot be passed between processes or pickled')

    # ---- internals ----

    def _map_async(self, func, iterable, chunksize, kind, callback=None, error_callback=None):
        self._check_running()
        if not hasattr(iterable, '__len__'):
            iterable = list(iterable)
        chunksize = _map_chunksize(len(iterable), chunksize, self._processes)
        result = MapResult(self, chunksize, len(iterable), callback, error_callback)
        if chunksize:
            it = iter(iterable)
            for i in itertools.count():
                chunk = tuple(itertools.islice(it, chunksize))
                if not chunk:
                    break
                self._tasks.put((result, i, kind, func, chunk))
        return result

    def _imap(self, func, iterable, chunksize, ordered, buffersize, star=False):
        self._check_running()
        if chunksize < 1:
            raise ValueError("Chunksize must be 1+, not {0:n}".format(chunksize))
        # The window counts as cpool.Pool's does (CPython 3.15+): processes + buffersize chunks.
        result = IMapIterator(self, ordered, _imap_window(buffersize, self._processes))
        t = threading.Thread(target=self._feed, name='cpool-dask-imap-feeder', daemon=True,
                             args=(result, iter(iterable), func, chunksize, star))
        t.start()
        self._feeders.append(t)
        if chunksize == 1:
            return result
        return (item for chunk in result for item in chunk)

    def _feed(self, result, it, func, chunksize, star):
        """Reads an imap's input, one window slot taken before each chunk is read."""
        n = 0
        try:
            while True:
                while not result._slots.acquire(timeout=0.1):
                    if self._state == TERMINATE or self._lost is not None or result._aborted:
                        return
                if self._state == TERMINATE or result._aborted:
                    return
                chunk = tuple(itertools.islice(it, chunksize))
                if not chunk:
                    result._slots.release()
                    break
                if chunksize == 1 and not star:
                    self._tasks.put((result, n, _APPLY, func, (chunk, {})))
                else:
                    self._tasks.put((result, n, _STARMAP if star else _MAP, func, chunk))
                n += 1
        except Exception as e:
            result._set(n, (False, e))
            n += 1
        result._set_length(n)

    def _submit_loop(self):
        """Hands tasks to the scheduler in order, never more than `processes` in flight."""
        while True:
            task = self._tasks.get()
            if task is None:
                if self._state == TERMINATE:
                    self._drain(ProcessError('the pool was terminated before the task finished'))
                return
            job, i, kind, func, args = task
            while not self._slots.acquire(timeout=0.1):
                if self._state == TERMINATE or self._lost is not None:
                    break
            else:
                if self._state != TERMINATE and self._lost is None:
                    self._submit(job, i, kind, func, args)
                    continue
                self._slots.release()
            job._set(i, (False, self._lost or
                         ProcessError('the pool was terminated before the task finished')))

    def _submit(self, job, i, kind, func, args):
        try:
            fut = self._client.submit(_run, kind, func, args, self._quota,
                                      pure=False, retries=0)
        except BaseException as e:
            self._slots.release()
            job._set(i, (False, e))
            return
        with self._lock:
            self._inflight[fut.key] = fut
            late = self._state == TERMINATE or self._lost is not None
        fut.add_done_callback(partial(self._done, job, i))
        if late:  # terminate() took its list of futures to cancel before this one was added
            self._cancel([fut])

    def _cancel(self, futs):
        try:
            self._client.cancel(futs, force=True)
        except Exception:
            pass  # a client that lost its scheduler cancels them itself

    def _done(self, job, i, fut):
        """In Dask's callback thread: turn a finished future into the job's (ok, value)."""
        # The slot is free once the task has finished: the next one is submitted while this
        # result is fetched.
        self._slots.release()
        try:
            result = self._outcome(fut)
        finally:
            fut.release()
            with self._idle:
                self._inflight.pop(fut.key, None)
                self._idle.notify_all()
        job._set(i, result)

    def _outcome(self, fut):
        status = fut.status
        if status == 'finished':
            try:
                return pickle.loads(fut.result())
            except Exception as e:
                return (False, self._scheduler_lost(e) if self._state != TERMINATE else e)
        if status == 'error':
            exc = fut.exception()
            if isinstance(exc, distributed.KilledWorker):
                lost = WorkerLostError('the Dask worker running the task died: %s' % (exc,))
                lost.__cause__ = exc
                return (False, lost)
            return (False, exc)
        # Cancelled: by terminate(), or by the client when it lost the scheduler.
        if self._state == TERMINATE:
            return (False, ProcessError('the pool was terminated before the task finished'))
        return (False, self._scheduler_lost(None))

    def _scheduler_lost(self, cause):
        """Fails everything at once: nothing submitted from now on would come back."""
        with self._lock:
            first = self._lost is None
            if first:
                self._lost = SchedulerLostError(
                    'lost the connection to the Dask scheduler at %s' % self._address)
                self._lost.__cause__ = cause
            exc = self._lost
        if first:
            threading.Thread(target=self._stop, args=(exc,), daemon=True).start()
        return exc

    def _stop(self, exc):
        """Cancels what is in flight and fails every job still waiting with exc."""
        with self._lock:
            futs = list(self._inflight.values())
        if futs:
            self._cancel(futs)
        self._drain(exc)
        for job in list(self._cache.values()):
            if isinstance(job, IMapIterator):
                job._abort(exc)
            else:
                job._set(0, (False, exc)) if isinstance(job, AsyncResult) else \
                    job._set(None, (False, exc))

    def _drain(self, exc):
        while True:
            try:
                task = self._tasks.get_nowait()
            except queue.Empty:
                return
            if task is None:
                self._tasks.put(None)  # the submitter's stop sign stays for it to see
                return
            task[0]._set(task[1], (False, exc))

    def _release_cluster(self):
        plugin, self._plugin = self._plugin, None
        if plugin is not None and self._lost is None:
            try:
                self._client.unregister_worker_plugin(plugin)
            except Exception:
                pass  # the scheduler is gone, and its plugins with it
        if self._own_client:
            self._own_client = False
            self._client.close()
            if self._cluster is not None:
                self._cluster.close()
                self._cluster = None
