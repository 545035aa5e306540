#!/usr/bin/env python3
"""Per-gene statistics of a large expression matrix shared with Pool workers, without copying it.

    python examples/shared_matrix.py                        # 20,000 genes x 1,000 samples (seeded)
    python examples/shared_matrix.py --genes 5000 --samples 200 --top 10
    python examples/shared_matrix.py --out stats.tsv        # every gene's statistics
    python examples/shared_matrix.py --module multiprocessing --start-method spawn
    python examples/shared_matrix.py --dask local     # on a Dask LocalCluster (or --dask tcp://host:8786)

The float64 matrix (160 MB at the default size) is written once into a SharedMemory block; each
task names only a range of rows, and the worker computes on a numpy view of the shared buffer,
attached once per worker and kept. Nothing of the matrix is pickled or copied to the workers
(passing the row slices as arguments copies all of it, through a pipe, per run: see the
benchmark cases matrix_shm_stats / matrix_args_stats of `python -m cpool.bench`). Per gene: mean,
variance (n-1), coefficient of variation, and the fraction of samples above the gene's mean.
The parent unlinks the block in a finally; if it is killed, the block is unlinked when the
program's last process ends.

With --dask the tasks run on a Dask cluster (cpool.dask.Pool), whose workers may be on other
machines, which a SharedMemory block does not reach: there the pool's initializer sends the
matrix once to each worker, which keeps it, and the tasks still name only ranges of rows and
compute on views of the worker's copy (the "shared buffer" of the report). The result is the
same; the copy per worker is the cost of leaving the machine.
"""
import argparse
import importlib
import sys

import numpy as np

_attached = {}  # in a worker: segment name -> (SharedMemory, matrix view)


def _matrix_view(shm_module, name, shape):
    """The worker's view of the shared matrix, attached on its first task and then reused."""
    if name not in _attached:
        shm = shm_module.SharedMemory(name)
        _attached[name] = shm, np.ndarray(shape, dtype=np.float64, buffer=shm.buf)
    return _attached[name]


def keep_matrix(name, matrix):
    """The pool's initializer with --dask: the matrix, sent once to each worker, kept there."""
    _attached[name] = matrix, matrix


def row_stats(task):
    """Runs in a worker: statistics of rows start..stop, computed on the shared buffer."""
    module, name, shape, start, stop = task
    if module is None:  # --dask: the worker's copy, kept by keep_matrix
        buffer, matrix = _attached[name]
    else:
        shm, matrix = _matrix_view(importlib.import_module(module + '.shared_memory'), name, shape)
        buffer = shm.buf
    rows = matrix[start:stop]  # a view: no copy
    mean = rows.mean(axis=1)
    var = rows.var(axis=1, ddof=1)
    above = (rows > mean[:, None]).mean(axis=1)
    viewed = np.shares_memory(rows, np.frombuffer(buffer, dtype=np.uint8))
    return start, np.stack([mean, var, above]), viewed


def generated_matrix(genes, samples, seed):
    """A reproducible log-normal expression matrix with gene-specific level and spread."""
    rng = np.random.default_rng(seed)
    level = rng.normal(4.0, 1.5, size=(genes, 1))
    spread = rng.uniform(0.05, 0.6, size=(genes, 1))
    return np.exp(level + spread * rng.standard_normal((genes, samples)))


def row_ranges(module, name, shape, args):
    """The tasks: each names the matrix and a range of rows, nothing of the data."""
    return [(module, name, shape, start, min(start + args.chunk, args.genes))
            for start in range(0, args.genes, args.chunk)]


def gather_stats(pool, row_stats, tasks, genes):
    """Every task's block of statistics in its place, and how many ran on the shared buffer."""
    stats = np.empty((3, genes))
    viewed = 0
    for start, block, on_shared_buffer in pool.imap_unordered(row_stats, tasks):
        stats[:, start:start + block.shape[1]] = block
        viewed += on_shared_buffer
    return stats, viewed


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--genes', type=int, default=20000, help='rows (default 20000)')
    ap.add_argument('--samples', type=int, default=1000, help='columns (default 1000)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--chunk', type=int, default=500, help='genes per task (default 500)')
    ap.add_argument('--top', type=int, default=20, help='most variable genes to print (default 20)')
    ap.add_argument('--out', help='write every gene\'s statistics to this TSV file')
    ap.add_argument('--processes', type=int, default=None,
                    help='worker processes (default: CPU count)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run the Pool on a Dask cluster (its scheduler's address, or 'local'); "
                         "the matrix is sent once to each worker instead of shared")
    args = ap.parse_args()
    if args.genes < 1 or args.samples < 2 or args.chunk < 1:
        ap.error('--genes >= 1, --samples >= 2 and --chunk >= 1')

    data = generated_matrix(args.genes, args.samples, args.seed)
    if args.dask:
        from cpool.dask import Pool
        # This file imported as a module, which the workers import too (as they must on a
        # cluster: the same code on every node): Dask sends functions of __main__ by value,
        # each with a copy of the globals, so keep_matrix's _attached would not be row_stats'.
        import shared_matrix as this
        tasks = row_ranges(None, 'matrix', data.shape, args)
        with Pool(args.processes, this.keep_matrix, ('matrix', data), address=args.dask) as pool:
            stats, viewed = gather_stats(pool, this.row_stats, tasks, args.genes)
    else:
        mp = importlib.import_module(args.module).get_context(args.start_method)
        shared_memory = importlib.import_module(args.module + '.shared_memory')
        shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
        try:
            matrix = np.ndarray(data.shape, dtype=np.float64, buffer=shm.buf)
            matrix[:] = data
            del data
            tasks = row_ranges(args.module, shm.name, matrix.shape, args)
            with mp.Pool(args.processes) as pool:
                stats, viewed = gather_stats(pool, row_stats, tasks, args.genes)
            del matrix  # the view must go before the buffer can be released
        finally:
            shm.close()
            shm.unlink()

    mean, var, above = stats
    cv = np.sqrt(var) / mean
    ids = ['GENE%05d' % (i + 1) for i in range(args.genes)]
    if args.out:
        with open(args.out, 'w') as f:
            f.write('gene\tmean\tvariance\tcv\tfrac_above_mean\n')
            for i, gene in enumerate(ids):
                f.write('%s\t%.6g\t%.6g\t%.5f\t%.4f\n' % (gene, mean[i], var[i], cv[i], above[i]))
    print('gene\tmean\tvariance\tcv\tfrac_above_mean')
    for i in np.argsort(-cv, kind='stable')[:args.top]:
        print('%s\t%.6g\t%.6g\t%.5f\t%.4f' % (ids[i], mean[i], var[i], cv[i], above[i]))
    print('# %d genes x %d samples (%.1f MB shared), %d tasks computed on the shared buffer '
          'of %d' % (args.genes, args.samples, args.genes * args.samples * 8 / 1e6, viewed,
                     len(tasks)))
    print('# median cv %.5f, mean of means %.6g' % (np.median(cv), mean.mean()))
    return 0 if viewed == len(tasks) else 1


if __name__ == '__main__':
    sys.exit(main())
