#!/usr/bin/env python3
"""k-mer counts of the reads of a FASTQ (or FASTA) file with Pool.map, merging per-chunk Counters.

    python examples/kmer_count.py                  # generated reads (seeded), k=5, top 20
    python examples/kmer_count.py reads.fq.gz -k 7 --top 50
    python examples/kmer_count.py --dask local      # on a Dask LocalCluster (or --dask tcp://host:8786)
    python examples/kmer_count.py --module multiprocessing

The reads are split into chunks; each worker counts the k-mers of one chunk into a Counter
(canonical k-mers with --canonical) and the parent adds the Counters up. Sending one Counter per
chunk instead of one result per read keeps the traffic between processes small.
"""
import argparse
import gzip
import importlib
import random
from collections import Counter

COMPLEMENT = str.maketrans('ACGT', 'TGCA')


def read_sequences(path):
    """The sequences of a FASTQ or FASTA file (format taken from the first character)."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rt') as f:
        first = f.read(1)
        f.seek(0)
        if first == '@':
            for i, line in enumerate(f):
                if i % 4 == 1:
                    yield line.strip()
        else:
            parts = []
            for line in f:
                if line.startswith('>'):
                    if parts:
                        yield ''.join(parts)
                    parts = []
                else:
                    parts.append(line.strip())
            if parts:
                yield ''.join(parts)


def generated_reads(n, seed, length=100):
    rnd = random.Random(seed)
    motif = 'GATTACA'
    for _ in range(n):
        read = rnd.choices('ACGT', k=length)
        if rnd.random() < 0.3:  # a motif to find at the top of the counts
            at = rnd.randrange(length - len(motif))
            read[at:at + len(motif)] = motif
        yield ''.join(read)


def chunks(items, size):
    chunk = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def count_chunk(task):
    """Runs in a worker: the k-mer Counter of a chunk of reads (k-mers with N are skipped)."""
    reads, k, canonical = task
    counts = Counter()
    for read in reads:
        read = read.upper()
        for i in range(len(read) - k + 1):
            kmer = read[i:i + k]
            if 'N' in kmer:
                continue
            if canonical:
                rc = kmer.translate(COMPLEMENT)[::-1]
                kmer = min(kmer, rc)
            counts[kmer] += 1
    return counts


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('reads', nargs='?', help='FASTQ/FASTA file (.gz allowed); default: generated reads')
    ap.add_argument('-k', type=int, default=5, help='k-mer length (default 5)')
    ap.add_argument('--top', type=int, default=20, help='k-mers to print (default 20)')
    ap.add_argument('--canonical', action='store_true', help='count a k-mer and its reverse complement together')
    ap.add_argument('--reads-count', type=int, default=4000, help='reads to generate (default 4000)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--chunk', type=int, default=500, help='reads per task (default 500)')
    ap.add_argument('--processes', type=int, default=None, help='worker processes (default: CPU count)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run the Pool on a Dask cluster: its scheduler's address, or 'local'")
    args = ap.parse_args()

    mp = importlib.import_module(args.module).get_context(args.start_method)
    reads = read_sequences(args.reads) if args.reads else generated_reads(args.reads_count, args.seed)
    tasks = [(chunk, args.k, args.canonical) for chunk in chunks(reads, args.chunk)]
    if args.dask:  # the same Pool code on a Dask cluster (pip install 'cpool[dask]')
        from cpool.dask import Pool
        pool = Pool(args.processes, address=args.dask)
    else:
        pool = mp.Pool(args.processes)
    with pool:
        partial = pool.map(count_chunk, tasks)
    total = Counter()
    for counts in partial:
        total.update(counts)
    n = sum(total.values())
    print('# %d reads, %d %s-mers, %d distinct' % (sum(len(t[0]) for t in tasks), n, args.k, len(total)))
    # ties broken by the k-mer so the output is the same on every run
    for kmer, c in sorted(total.items(), key=lambda kv: (-kv[1], kv[0]))[:args.top]:
        print('%s\t%d\t%.5f' % (kmer, c, c / n))


if __name__ == '__main__':
    main()
