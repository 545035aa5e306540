"""Per-task overhead of process pools: cpool against multiprocessing, mpire and loky.

usage: python bench/pool_vs_peers.py [--rounds N] [--scale F] [--only case,...] [--peers a,b]

Each case runs for every pool in turn (A B C ... over --rounds) and the median throughput is
reported with its ratio to multiprocessing. Pools are created outside the timed region and
warmed up, so only the per-task path is measured. This machine is shared and noisy: compare
ratios from one run, not absolute numbers across runs.
"""
import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sq(x):
    return x * x


def add(a, b):
    return a + b


def gc_content(read):
    return (read.count("G") + read.count("C")) / len(read)


def _reads(n):
    rnd = random.Random(7)
    base = ["".join(rnd.choice("ACGT") for _ in range(150)) for _ in range(2000)]
    return (base * (n // 2000 + 1))[:n]


# ---- adapters: each gives map(func, items, chunksize), imap_unordered, submit->get ----

class StdlibLike(object):
    def __init__(self, mod, n):
        self.pool = mod.Pool(n)

    def map(self, f, it, chunksize):
        return self.pool.map(f, it, chunksize)

    def imap_unordered(self, f, it, chunksize):
        return self.pool.imap_unordered(f, it, chunksize)

    def imap(self, f, it, chunksize):
        return self.pool.imap(f, it, chunksize)

    def submit_all(self, f, argss):
        rs = [self.pool.apply_async(f, a) for a in argss]
        return [r.get() for r in rs]

    def close(self):
        self.pool.terminate()


class Mpire(object):
    def __init__(self, n):
        from mpire import WorkerPool
        self.pool = WorkerPool(n_jobs=n, start_method='fork')
        self.pool.__enter__()

    def map(self, f, it, chunksize):
        return self.pool.map(f, it, chunk_size=chunksize)

    def imap_unordered(self, f, it, chunksize):
        return self.pool.imap_unordered(f, it, chunk_size=chunksize)

    def imap(self, f, it, chunksize):
        return self.pool.imap(f, it, chunk_size=chunksize)

    def submit_all(self, f, argss):
        rs = [self.pool.apply_async(f, a) for a in argss]
        return [r.get() for r in rs]

    def close(self):
        self.pool.__exit__(None, None, None)


class Loky(object):
    def __init__(self, n):
        from loky import get_reusable_executor
        self.ex = get_reusable_executor(max_workers=n)

    def map(self, f, it, chunksize):
        return list(self.ex.map(f, it, chunksize=chunksize))

    def imap_unordered(self, f, it, chunksize):
        return self.ex.map(f, it, chunksize=chunksize)  # loky has no unordered map

    def imap(self, f, it, chunksize):
        return self.ex.map(f, it, chunksize=chunksize)

    def submit_all(self, f, argss):
        fs = [self.ex.submit(f, *a) for a in argss]
        return [x.result() for x in fs]

    def close(self):
        pass


def make(name, n):
    if name in ('multiprocessing', 'cpool'):
        import importlib
        return StdlibLike(importlib.import_module(name), n)
    if name == 'mpire':
        return Mpire(n)
    if name == 'loky':
        return Loky(n)
    raise ValueError(name)


# ---- cases: (pool, n) -> (units, seconds) ----

def case_map_chunk1(p, n):
    t = time.perf_counter()
    r = p.map(sq, range(n), 1)
    dt = time.perf_counter() - t
    assert len(r) == n
    return n, dt


def case_apply_async(p, n):
    args = [(i, 1) for i in range(n)]
    t = time.perf_counter()
    s = sum(p.submit_all(add, args))
    dt = time.perf_counter() - t
    assert s == n * (n + 1) // 2
    return n, dt


def case_imap_unordered(p, n):
    t = time.perf_counter()
    s = sum(p.imap_unordered(sq, range(n), 1))
    dt = time.perf_counter() - t
    assert s == sum(x * x for x in range(n))
    return n, dt


def case_map_small(p, n):
    t = time.perf_counter()
    r = p.map(sq, range(n), max(1, n // 8))
    dt = time.perf_counter() - t
    assert r[-1] == (n - 1) ** 2
    return n, dt


def case_imap_reads(p, n):
    reads = _reads(n)
    t = time.perf_counter()
    tot = sum(p.imap(gc_content, reads, 64))
    dt = time.perf_counter() - t
    assert 0.4 * n < tot < 0.6 * n
    return n, dt


CASES = {
    'map_chunk1': (case_map_chunk1, 20000, 'task/s'),
    'apply_async': (case_apply_async, 10000, 'task/s'),
    'imap_unordered': (case_imap_unordered, 20000, 'task/s'),
    'map_small': (case_map_small, 200000, 'item/s'),
    'imap_reads': (case_imap_reads, 200000, 'read/s'),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--scale', type=float, default=1.0)
    ap.add_argument('--only', default='')
    ap.add_argument('--peers', default='multiprocessing,cpool,mpire,loky')
    ap.add_argument('--workers', type=int, default=2)
    a = ap.parse_args()
    names = a.peers.split(',')
    pools = {}
    for name in names:
        try:
            pools[name] = make(name, a.workers)
            pools[name].map(sq, range(100), 1)  # workers up and warm
        except ImportError as e:
            print('# skipping %s: %s' % (name, e), file=sys.stderr)
    cases = [c for c in CASES if not a.only or c in a.only.split(',')]
    print('%-16s %-8s ' % ('case', 'unit') + '  '.join('%22s' % n for n in pools))
    try:
        for case in cases:
            fn, n, unit = CASES[case]
            n = max(100, int(n * a.scale))
            runs = {name: [] for name in pools}
            for _ in range(a.rounds):
                for name, p in pools.items():
                    units, dt = fn(p, n)
                    runs[name].append(units / dt)
            med = {name: statistics.median(v) for name, v in runs.items()}
            base = med.get('multiprocessing') or next(iter(med.values()))
            cells = '  '.join('%12.0f (%6.2fx)' % (med[name], med[name] / base) for name in pools)
            print('%-16s %-8s %s' % (case, unit, cells), flush=True)
    finally:
        for p in pools.values():
            p.close()


if __name__ == '__main__':
    main()
