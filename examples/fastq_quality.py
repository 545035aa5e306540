#!/usr/bin/env python3
"""Quality statistics of a FASTQ file with worker Processes fed through a Queue.

    python examples/fastq_quality.py                  # generated reads (seeded, 5000 reads)
    python examples/fastq_quality.py reads.fq.gz --workers 4 --phred 33
    python examples/fastq_quality.py --module multiprocessing
    python examples/fastq_quality.py --dask local     # on a Dask LocalCluster (or --dask tcp://host:8786)

The parent reads the file and puts batches of reads on a task Queue; each worker Process takes
batches until it gets the end marker, adds up its statistics and puts them on a result Queue
once; the parent merges them. Only integer sums cross between processes, so the report is the
same whatever the number of workers and the order in which they finish.

With --dask the same work takes the Pool's shape, as Queues between Processes do not reach the
machines of a cluster: cpool.dask.Pool(--workers).imap_unordered gives each batch to a worker,
which sends back that batch's sums, at most 4 x --workers batches ahead of the merge (what the
bounded task Queue does here), and the parent merges them: the same report.
"""
import functools
import argparse
import gzip
import importlib
import random

STOP = None  # the end marker on the task queue: one per worker


def read_fastq(path):
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        while True:
            head = f.readline()
            if not head:
                return
            seq, _, qual = f.readline().strip(), f.readline(), f.readline().strip()
            if not head.startswith('@') or len(seq) != len(qual):
                raise ValueError('not a FASTQ record: %r' % head[:50])
            yield seq, qual


def generated_reads(n, seed, length=100):
    """Reads whose quality falls along the read, as on an Illumina run."""
    rnd = random.Random(seed)
    profile = [38 - 12 * i // length for i in range(length)]
    noise = (-8, -4, -2, -1, 0, 0, 1, 1, 2, 3)
    for _ in range(n):
        seq = ''.join(rnd.choices('ACGTN', (30, 20, 20, 30, 0.2), k=length))
        qual = ''.join(chr(33 + max(2, min(41, q + d))) for q, d in zip(profile, rnd.choices(noise, k=length)))
        yield seq, qual


def batches(records, size):
    batch = []
    for rec in records:
        batch.append(rec)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def new_stats():
    return {'reads': 0, 'bases': 0, 'gc': 0, 'n': 0, 'q30': 0, 'qsum': 0,
            'pos_qsum': [], 'pos_count': [], 'low_reads': 0}


def add_batch(stats, batch, phred):
    pos_qsum, pos_count = stats['pos_qsum'], stats['pos_count']
    for seq, qual in batch:
        quals = [ord(c) - phred for c in qual]
        if len(quals) > len(pos_qsum):
            grow = len(quals) - len(pos_qsum)
            pos_qsum.extend([0] * grow)
            pos_count.extend([0] * grow)
        for i, q in enumerate(quals):
            pos_qsum[i] += q
            pos_count[i] += 1
        total = sum(quals)
        stats['reads'] += 1
        stats['bases'] += len(seq)
        stats['gc'] += seq.count('G') + seq.count('C')
        stats['n'] += seq.count('N')
        stats['q30'] += sum(q >= 30 for q in quals)
        stats['qsum'] += total
        stats['low_reads'] += total < 20 * len(quals)  # mean quality below 20


def merge(into, part):
    for key in ('reads', 'bases', 'gc', 'n', 'q30', 'qsum', 'low_reads'):
        into[key] += part[key]
    for key in ('pos_qsum', 'pos_count'):
        a, b = into[key], part[key]
        a.extend([0] * (len(b) - len(a)))
        for i, v in enumerate(b):
            a[i] += v


def worker(tasks, results, phred):
    """Runs in a worker Process: statistics of every batch it takes, sent back once at the end."""
    stats = new_stats()
    while True:
        batch = tasks.get()
        if batch is STOP:
            break
        add_batch(stats, batch, phred)
    results.put(stats)


def batch_stats(batch, phred):
    """Runs in a Dask worker (--dask): the statistics of one batch."""
    stats = new_stats()
    add_batch(stats, batch, phred)
    return stats


def stats_on_processes(mp, records, args):
    """Worker Processes fed through a bounded Queue; their statistics merged here."""
    # a bounded task queue: the reader waits when the workers fall behind, memory stays flat
    tasks, results = mp.Queue(maxsize=4 * args.workers), mp.Queue()
    procs = [mp.Process(target=worker, args=(tasks, results, args.phred)) for _ in range(args.workers)]
    for p in procs:
        p.start()
    for batch in batches(records, args.batch):
        tasks.put(batch)
    for _ in procs:
        tasks.put(STOP)
    total = new_stats()
    for _ in procs:  # get the results before join: a process that put data is joined after
        merge(total, results.get())
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise SystemExit('a worker failed with exit code %s' % p.exitcode)
    return total


def stats_on_dask(address, records, args):
    """The same on a Dask cluster: a batch per task, each batch's sums merged here."""
    from cpool.dask import Pool
    total = new_stats()
    with Pool(args.workers, address=address) as pool:
        for part in pool.imap_unordered(functools.partial(batch_stats, phred=args.phred),
                                        batches(records, args.batch), buffersize=4 * args.workers):
            merge(total, part)
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('fastq', nargs='?', help='FASTQ file (.gz allowed); default: generated reads')
    ap.add_argument('--reads', type=int, default=5000, help='reads to generate (default 5000)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--phred', type=int, default=33, help='quality offset (default 33)')
    ap.add_argument('--batch', type=int, default=500, help='reads per queue message (default 500)')
    ap.add_argument('--workers', type=int, default=2, help='worker processes (default 2)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run on a Dask cluster (its scheduler's address, or 'local') as Pool "
                         "tasks, a batch each, instead of Processes and Queues")
    args = ap.parse_args()

    records = read_fastq(args.fastq) if args.fastq else generated_reads(args.reads, args.seed)
    if args.dask:
        s = stats_on_dask(args.dask, records, args)
    else:
        s = stats_on_processes(importlib.import_module(args.module).get_context(args.start_method),
                               records, args)
    print('reads\t%d' % s['reads'])
    print('bases\t%d' % s['bases'])
    print('mean_quality\t%.3f' % (s['qsum'] / max(1, s['bases'])))
    print('q30_bases\t%.4f' % (s['q30'] / max(1, s['bases'])))
    print('gc\t%.4f' % (s['gc'] / max(1, s['bases'] - s['n'])))
    print('n_bases\t%d' % s['n'])
    print('reads_mean_q_below_20\t%d' % s['low_reads'])
    step = max(1, len(s['pos_qsum']) // 10)
    for i in range(0, len(s['pos_qsum']), step):
        print('position_%d_mean_quality\t%.2f' % (i + 1, s['pos_qsum'][i] / s['pos_count'][i]))


if __name__ == '__main__':
    main()
