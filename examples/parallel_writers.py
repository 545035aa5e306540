#!/usr/bin/env python3
"""Several processes append results to one file: a Lock keeps each block whole, a Semaphore
bounds how many processes work at once.

    python examples/parallel_writers.py                     # 8 generated samples, at most 3 at once
    python examples/parallel_writers.py --samples 20 --max-active 4 --out results.tsv
    python examples/parallel_writers.py --module multiprocessing
    python examples/parallel_writers.py --dask local     # on a Dask LocalCluster (or --dask tcp://host:8786)

One Process per sample (as when each sample is a large file and only a few fit in memory or the
disk's bandwidth at a time): it waits on the Semaphore, computes per-read lines for its sample
and appends them to the shared file in blocks, each block written and flushed under the Lock so
no two blocks interleave (a buffered write of a large block can take several system calls).
Start and end of each sample's work are logged in the same file under the same Lock, so the
file itself proves the bound was kept. The parent then checks the file and prints a summary.

With --dask each sample is a task of cpool.dask.Pool instead of a Process. A Lock and a
Semaphore of cpool live in this machine's shared memory and do not reach the machines of a
cluster, so there the two are Dask's own (distributed.Lock, distributed.Semaphore), held
through the scheduler; the code of a sample is the same. The file must be one that every
worker can open: on a scheduler of other machines, give --out a path on a filesystem they share.
"""
import argparse
import importlib
import os
import random
import sys
import tempfile
import uuid
import zlib

COMPLEMENT = str.maketrans('ACGT', 'TGCA')


def sample_reads(sample, reads, seed):
    rnd = random.Random(seed * 1000003 + sample)
    for i in range(reads):
        yield 's%02d_r%05d' % (sample, i), ''.join(rnd.choices('ACGT', k=rnd.randint(50, 150)))


def append(path, lock, text):
    with lock:
        with open(path, 'a') as f:
            f.write(text)
            f.flush()


def process_sample(sample, path, lock, slots, reads, block, seed):
    """Runs in its own Process: at most --max-active of these are between acquire and release."""
    with slots:
        append(path, lock, '#start\t%d\n' % sample)
        lines = []
        for name, seq in sample_reads(sample, reads, seed):
            gc = (seq.count('G') + seq.count('C')) / len(seq)
            rc = seq.translate(COMPLEMENT)[::-1]
            lines.append('%s\t%d\t%.4f\t%s\n' % (name, len(seq), gc, rc[:12]))
            if len(lines) == block:
                append(path, lock, '#block\t%d\t%d\n%s' % (sample, len(lines), ''.join(lines)))
                lines = []
        if lines:
            append(path, lock, '#block\t%d\t%d\n%s' % (sample, len(lines), ''.join(lines)))
        append(path, lock, '#end\t%d\n' % sample)


def run_on_processes(mp, path, args):
    """A Process per sample; the exit codes of those that failed."""
    lock, slots = mp.Lock(), mp.Semaphore(args.max_active)
    procs = [mp.Process(target=process_sample,
                        args=(s, path, lock, slots, args.reads, args.block, args.seed))
             for s in range(args.samples)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    return ['exit code %s' % p.exitcode for p in procs if p.exitcode != 0]


def run_on_dask(address, path, args):
    """A Pool task per sample on a Dask cluster, with Dask's Lock and Semaphore; the errors."""
    import distributed
    from cpool.dask import Pool
    tag = uuid.uuid4().hex  # names of this run's lock and semaphore on the scheduler
    lock = distributed.Lock('parallel_writers-lock-' + tag)
    slots = distributed.Semaphore(args.max_active, 'parallel_writers-slots-' + tag)
    with Pool(address=address) as pool:  # the cluster's threads; the Semaphore bounds the rest
        results = [pool.apply_async(process_sample,
                                    (s, path, lock, slots, args.reads, args.block, args.seed))
                   for s in range(args.samples)]
        failed = []
        for r in results:
            try:
                r.get()
            except Exception as e:
                failed.append(repr(e))
    return failed


def check(path, samples):
    """Per-sample line counts and checksums, the largest number of samples active at once, and
    whether every block arrived whole (its lines together, all of its sample)."""
    per_sample = {s: [] for s in range(samples)}
    active = max_active = 0
    whole = True
    with open(path) as f:
        lines = f.read().splitlines()
    i = 0
    while i < len(lines):
        kind, *fields = lines[i].split('\t')
        if kind == '#start':
            active += 1
            max_active = max(max_active, active)
        elif kind == '#end':
            active -= 1
        elif kind == '#block':
            sample, count = int(fields[0]), int(fields[1])
            body = lines[i + 1:i + 1 + count]
            if len(body) != count or any(not b.startswith('s%02d_' % sample) for b in body):
                whole = False
            per_sample[sample].extend(body)
            i += count
        else:
            whole = False
        i += 1
    return per_sample, max_active, whole


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('--samples', type=int, default=8, help='samples, one process each (default 8)')
    ap.add_argument('--max-active', type=int, default=3, help='processes working at once (default 3)')
    ap.add_argument('--reads', type=int, default=2000, help='reads per sample (default 2000)')
    ap.add_argument('--block', type=int, default=250, help='lines per locked write (default 250)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--out', help='the shared output file (default: a temporary file, removed)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run the samples as Pool tasks on a Dask cluster (its scheduler's "
                         "address, or 'local'), with Dask's Lock and Semaphore")
    args = ap.parse_args()

    if args.out:
        path = args.out
        open(path, 'w').close()
    else:
        fd, path = tempfile.mkstemp(prefix='parallel_writers_', suffix='.tsv')
        os.close(fd)
    try:
        if args.dask:
            failed = run_on_dask(args.dask, path, args)
        else:
            failed = run_on_processes(
                importlib.import_module(args.module).get_context(args.start_method), path, args)
        per_sample, max_active, whole = check(path, args.samples)
    finally:
        if not args.out:
            os.unlink(path)
    for s, lines in per_sample.items():
        # sorted: the order of blocks in the file differs from run to run, their content does not
        print('sample_%02d\t%d lines\tcrc32 %08x' % (s, len(lines), zlib.crc32('\n'.join(sorted(lines)).encode())))
    print('blocks whole: %s' % ('yes' if whole else 'NO'))
    print('at most %d samples at once: %s' % (args.max_active, 'yes' if max_active <= args.max_active else 'NO'))
    if failed or not whole or max_active > args.max_active:
        print('error: %s' % ', '.join(failed) if failed else 'error: the file is not as expected', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
