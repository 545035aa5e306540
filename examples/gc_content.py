#!/usr/bin/env python3
"""GC content of every record of a FASTA file, computed in parallel with Pool.imap.

    python examples/gc_content.py                 # on a generated FASTA (seeded, 2000 records)
    python examples/gc_content.py genome.fa       # on your own file (plain or .gz)
    python examples/gc_content.py --dask local      # on a Dask LocalCluster (or --dask tcp://host:8786)
    python examples/gc_content.py --module multiprocessing   # the same with the standard library

Prints one line per record (name, length, GC fraction) in input order, then a summary.
Pool.imap hands records to the workers as the file is read and gives results back in order,
so memory stays flat however large the file is.
"""
import argparse
import gzip
import importlib
import random
import sys


def read_fasta(path):
    """(name, sequence) for each record; the sequence lines of a record are joined."""
    opener = gzip.open if path.endswith('.gz') else open
    name, parts = None, []
    with opener(path, 'rt') as f:
        for line in f:
            line = line.strip()
            if line.startswith('>'):
                if name is not None:
                    yield name, ''.join(parts)
                name, parts = line[1:].split()[0], []
            elif line:
                parts.append(line)
    if name is not None:
        yield name, ''.join(parts)


def generated_fasta(records, seed):
    """A reproducible set of contigs of varied length and GC content."""
    rnd = random.Random(seed)
    for i in range(records):
        gc = rnd.uniform(0.3, 0.7)
        weights = ((1 - gc) / 2, gc / 2, gc / 2, (1 - gc) / 2)
        yield 'contig_%05d' % i, ''.join(rnd.choices('ACGT', weights, k=rnd.randint(200, 3000)))


def gc_content(record):
    """Runs in a worker: length, G+C and A+T counts of one record (N and other letters are neither)."""
    name, seq = record
    seq = seq.upper()
    return name, len(seq), seq.count('G') + seq.count('C'), seq.count('A') + seq.count('T')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('fasta', nargs='?', help='FASTA file (.gz allowed); default: generated records')
    ap.add_argument('--records', type=int, default=2000, help='records to generate (default 2000)')
    ap.add_argument('--seed', type=int, default=1, help='seed of the generated records (default 1)')
    ap.add_argument('--processes', type=int, default=None, help='worker processes (default: CPU count)')
    ap.add_argument('--chunksize', type=int, default=16, help='records per task (default 16)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run the Pool on a Dask cluster: its scheduler's address, or 'local'")
    args = ap.parse_args()

    mp = importlib.import_module(args.module).get_context(args.start_method)
    records = read_fasta(args.fasta) if args.fasta else generated_fasta(args.records, args.seed)
    count = total_len = total_gc = total_at = 0
    out = sys.stdout
    if args.dask:  # the same Pool code on a Dask cluster (pip install 'cpool[dask]')
        from cpool.dask import Pool
        pool = Pool(args.processes, address=args.dask)
    else:
        pool = mp.Pool(args.processes)
    with pool:
        for name, length, gc, at in pool.imap(gc_content, records, chunksize=args.chunksize):
            out.write('%s\t%d\t%.4f\n' % (name, length, gc / (gc + at) if gc + at else 0.0))
            count += 1
            total_len += length
            total_gc += gc
            total_at += at
    if count:
        print('# %d records, %d bases, overall GC %.4f'
              % (count, total_len, total_gc / max(1, total_gc + total_at)))


if __name__ == '__main__':
    main()
