"""Other libraries measured on the cases they have an equivalent for: the plain loop (`serial`, no
pool at all: cpool._bench.serial), faster-fifo (a shared-memory
queue, its processes started by fork, which its queues are made for), mpire (WorkerPool) and loky
(ProcessPoolExecutor); and cpool.dask.Pool on a LocalCluster of as many worker processes (module
name `dask`, opt-in with --modules: what the network and Dask's scheduler cost per task).

Each library is seen through a small facade with the attribute names the cases use (Pool, Queue,
Process), so the very same case code, inputs and checks run on every library; a facade method
is a direct call of the library's own API. Cases a library has no equivalent for show as "-".
"""
import types

TIMEOUT = 600.0  # faster-fifo's default timeout (10 s) would turn a slow machine into an error


class _MpirePool:
    """mpire's WorkerPool with the Pool method names. mpire unpacks tuple, list and dict items
    into arguments, so such an item is wrapped in a 1-tuple to reach the function as one argument
    (what mpire's documentation advises)."""

    def __init__(self, workers):
        from mpire import WorkerPool
        self._pool = WorkerPool(n_jobs=workers, start_method='fork', keep_alive=True)

    @staticmethod
    def _items(iterable):
        if isinstance(iterable, range):
            return iterable
        wrapped = ((x,) if isinstance(x, (tuple, list, dict)) else x for x in iterable)
        # A sized input stays sized: from a generator mpire cannot size its chunks and falls
        # back to chunk_size 4 (and warns), which is not how its documentation has it used.
        return list(wrapped) if hasattr(iterable, '__len__') else wrapped

    def map(self, fn, iterable, chunksize=None):
        # Pool.map returns one result per item: mpire would join numpy results into one array
        return self._pool.map(fn, self._items(iterable), chunk_size=chunksize,
                              concatenate_numpy_output=False)

    def imap(self, fn, iterable, chunksize=1):
        return self._pool.imap(fn, self._items(iterable), chunk_size=chunksize)

    def imap_unordered(self, fn, iterable, chunksize=1):
        return self._pool.imap_unordered(fn, self._items(iterable), chunk_size=chunksize)

    def apply(self, fn, args=()):
        return self._pool.apply(fn, args)

    def apply_async(self, fn, args=(), callback=None, error_callback=None):
        return self._pool.apply_async(fn, args, callback=callback, error_callback=error_callback)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._pool.terminate()


class _LokyPool:
    """loky's ProcessPoolExecutor with the Pool method names (a Future serves as AsyncResult)."""

    def __init__(self, workers):
        from loky import ProcessPoolExecutor
        self._ex = ProcessPoolExecutor(max_workers=workers)
        self._workers = workers

    def map(self, fn, iterable, chunksize=None):
        if chunksize is None:  # Pool.map's default, which Executor.map does not compute
            chunksize = max(1, -(-len(iterable) // (4 * self._workers)))
        return list(self._ex.map(fn, iterable, chunksize=chunksize))

    def imap(self, fn, iterable, chunksize=1):
        return self._ex.map(fn, iterable, chunksize=chunksize)

    def apply(self, fn, args=()):
        return self._ex.submit(fn, *args).result()

    def apply_async(self, fn, args=(), callback=None, error_callback=None):
        fut = self._ex.submit(fn, *args)
        if callback or error_callback:
            def done(f):
                if f.exception() is None:
                    callback and callback(f.result())
                elif error_callback:
                    error_callback(f.exception())
            fut.add_done_callback(done)
        fut.get = fut.result
        return fut

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ex.shutdown(wait=True)


def _faster_fifo_queue(maxsize=0):
    import faster_fifo
    import faster_fifo_reduction  # noqa: F401  (lets the queue be passed to a Process)

    class Queue(faster_fifo.Queue):
        def put(self, x, block=True, timeout=TIMEOUT):
            super().put(x, block, timeout)

        def get(self, block=True, timeout=TIMEOUT):
            return super().get(block, timeout)

    # room for the 1 MB messages and a backlog of small ones
    return Queue(max_size_bytes=64 << 20)


def _faster_fifo():
    # faster-fifo has no Process of its own: its queues reach children by fork. cpool's fork
    # Process starts them (the cpool package never imports the standard library's
    # multiprocessing); the case measures the queue, a few starts per run do not count.
    import cpool
    return types.SimpleNamespace(Queue=_faster_fifo_queue,
                                 Process=cpool.get_context('fork').Process)


_POOL_CASES = ('pool_map', 'pool_map_chunk1', 'pool_apply_async', 'pool_imap', 'pool_imap_unordered',
               'pool_apply_latency', 'fasta_gc_imap', 'fastq_kmer_imap', 'genes_apply_async',
               'line_slices_apply_async', 'numpy_map')

def _dask():
    # A LocalCluster of cfg['workers'] processes, one thread each, made by the pool itself (what
    # `Pool(n)` gives a user of cpool.dask); the micro cases warm it up before timing.
    from cpool.dask import Pool
    return types.SimpleNamespace(Pool=Pool)


# library -> (facade factory, the cases it runs)
LIBRARIES = {
    'serial': (lambda: __import__('cpool._bench.serial', fromlist=['Pool']),
               _POOL_CASES + ('matrix_args_stats',)),
    'faster_fifo': (_faster_fifo, ('queue_small', 'queue_1mb', 'fastq_queue_pipeline')),
    'mpire': (lambda: types.SimpleNamespace(Pool=_MpirePool), _POOL_CASES),
    'dask': (_dask, _POOL_CASES),
    'loky': (lambda: types.SimpleNamespace(Pool=_LokyPool),
             tuple(c for c in _POOL_CASES if c != 'pool_imap_unordered')),
}
