#!/usr/bin/env python3
"""Per-gene differential expression statistics over a tab-separated matrix, with apply_async.

    python examples/gene_stats.py                       # a generated matrix (seeded, 3000 genes)
    python examples/gene_stats.py counts.tsv --groups ctrl,ctrl,ctrl,trt,trt,trt
    python examples/gene_stats.py --dask local      # on a Dask LocalCluster (or --dask tcp://host:8786)
    python examples/gene_stats.py --module multiprocessing

Input: a header line, then one gene per line: its id and one value per sample. The genes are
split into chunks, each chunk is submitted with apply_async; a callback stores each finished chunk
by its number, an error_callback records a failed chunk, and the output is written in input
order however the chunks finish. Per gene: mean of each group, log2 fold change and Welch's t.
A line that cannot be parsed is reported (with its line number) instead of stopping the others.
"""
import argparse
import importlib
import math
import random
import sys


def generated_matrix(genes, samples, seed):
    """Header and lines of a reproducible expression matrix; some genes change in the 2nd group."""
    rnd = random.Random(seed)
    yield 'gene\t' + '\t'.join('sample%d' % (j + 1) for j in range(samples))
    for i in range(genes):
        base = rnd.lognormvariate(4, 1.5)
        fold = rnd.choice((0.25, 0.5, 1, 1, 1, 1, 1, 1, 2, 4))
        vals = [max(0.0, rnd.gauss(base * (fold if j >= samples // 2 else 1), base * 0.15))
                for j in range(samples)]
        yield 'GENE%05d\t' % (i + 1) + '\t'.join('%.2f' % v for v in vals)


def welch(a, b):
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    va = sum((x - ma) ** 2 for x in a) / (len(a) - 1)
    vb = sum((x - mb) ** 2 for x in b) / (len(b) - 1)
    se = math.sqrt(va / len(a) + vb / len(b))
    return ma, mb, (mb - ma) / se if se else 0.0


def chunk_stats(first_line, lines, groups):
    """Runs in a worker: the output lines for one chunk, or ValueError naming the bad line."""
    names = sorted(set(groups))
    out = []
    for offset, line in enumerate(lines):
        fields = line.rstrip('\n').split('\t')
        try:
            if len(fields) != len(groups) + 1:
                raise ValueError('%d values, expected %d' % (len(fields) - 1, len(groups)))
            vals = [float(v) for v in fields[1:]]
        except ValueError as e:
            raise ValueError('line %d (%s): %s' % (first_line + offset, fields[0], e)) from None
        a = [v for v, g in zip(vals, groups) if g == names[0]]
        b = [v for v, g in zip(vals, groups) if g == names[1]]
        ma, mb, t = welch(a, b)
        out.append('%s\t%.3f\t%.3f\t%.4f\t%.3f' % (fields[0], ma, mb, math.log2((mb + 1) / (ma + 1)), t))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    ap.add_argument('matrix', nargs='?', help='TSV file: gene id, then one value per sample; default: generated')
    ap.add_argument('--groups', help='comma-separated group of each sample, two distinct names '
                                     '(default: first half A, second half B)')
    ap.add_argument('--genes', type=int, default=3000, help='genes to generate (default 3000)')
    ap.add_argument('--samples', type=int, default=8, help='samples to generate (default 8)')
    ap.add_argument('--seed', type=int, default=1)
    ap.add_argument('--chunk', type=int, default=100, help='genes per task (default 100)')
    ap.add_argument('--processes', type=int, default=None, help='worker processes (default: CPU count)')
    ap.add_argument('--module', default='cpool', choices=('cpool', 'multiprocessing'),
                    help='the multiprocessing implementation (default cpool)')
    ap.add_argument('--start-method', default=None, choices=('fork', 'spawn', 'forkserver'))
    ap.add_argument('--dask', metavar='ADDRESS',
                    help="run the Pool on a Dask cluster: its scheduler's address, or 'local'")
    args = ap.parse_args()

    mp = importlib.import_module(args.module).get_context(args.start_method)
    if args.matrix:
        with open(args.matrix) as f:
            lines = f.read().splitlines()
    else:
        lines = list(generated_matrix(args.genes, args.samples, args.seed))
    header, body = lines[0].split('\t'), lines[1:]
    nsamples = len(header) - 1
    groups = args.groups.split(',') if args.groups else \
        ['A'] * (nsamples // 2) + ['B'] * (nsamples - nsamples // 2)
    if len(groups) != nsamples or len(set(groups)) != 2:
        ap.error('--groups: one of two group names per sample (%d samples)' % nsamples)

    done, failed = {}, {}
    if args.dask:  # the same Pool code on a Dask cluster (pip install 'cpool[dask]')
        from cpool.dask import Pool
        pool = Pool(args.processes, address=args.dask)
    else:
        pool = mp.Pool(args.processes)
    with pool:
        for number, start in enumerate(range(0, len(body), args.chunk)):
            pool.apply_async(
                chunk_stats, (start + 2, body[start:start + args.chunk], groups),
                callback=lambda result, number=number: done.__setitem__(number, result),
                error_callback=lambda exc, number=number: failed.__setitem__(number, exc))
        pool.close()
        pool.join()  # every callback has run once join returns

    a, b = sorted(set(groups))
    print('gene\tmean_%s\tmean_%s\tlog2fc\twelch_t' % (a, b))
    for number in sorted(done):  # chunk order is input order
        for line in done[number]:
            print(line)
    for number in sorted(failed):
        print('error: chunk %d: %s' % (number, failed[number]), file=sys.stderr)
    print('# %d genes in %d chunks, %d chunks failed' % (
        sum(len(v) for v in done.values()), len(done) + len(failed), len(failed)))
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
