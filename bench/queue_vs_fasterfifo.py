"""cpool's Queue against faster-fifo (and the standard library) on the same workloads.

usage: python bench/queue_vs_fasterfifo.py [--n N] [--rounds R]
Cases: single put/get of small messages with 1 and 4 producers, 1 KiB messages, and batches
(put_many/get_many against faster-fifo's own). Prints messages per second (median of rounds)
and cpool's ratio to each other implementation. Children are started with fork, each by its own library.
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cpool  # noqa: E402

try:
    import faster_fifo
    import faster_fifo_reduction  # noqa: F401  (makes its queue picklable for spawn)
except ImportError:  # pragma: no cover
    faster_fifo = None

DONE = 'done'


def fork_context(impl):
    # Each queue with its own library's processes (the standard library's queue flushes its
    # feeder thread from multiprocessing's exit hooks).
    if impl == 'cpool':
        return cpool.get_context('fork')
    import multiprocessing
    return multiprocessing.get_context('fork')


def make_queue(impl):
    if impl == 'cpool':
        return cpool.Queue()
    if impl == 'faster_fifo':
        return faster_fifo.Queue(max_size_bytes=4 << 20)
    import multiprocessing
    return multiprocessing.get_context('fork').Queue()


def _produce(q, n, payload, batch):
    if batch:
        for i in range(0, n, batch):
            q.put_many([payload if payload is not None else j for j in range(i, min(n, i + batch))])
    else:
        for i in range(n):
            q.put(payload if payload is not None else i)
    q.put(DONE)


def run(impl, nprod, n, payload=None, batch=0, get_many=False):
    q = make_queue(impl)
    procs = [fork_context(impl).Process(target=_produce, args=(q, n, payload, batch)) for _ in range(nprod)]
    for p in procs:
        p.start()
    # The clock starts at the first message: process start-up is not what is compared.
    t = None
    got = done = 0
    if get_many:
        while done < nprod:
            if impl == 'faster_fifo':
                msgs = q.get_many(max_messages_to_get=1000, timeout=30)
            else:
                msgs = q.get_many(max_messages=1000, timeout=30)
            if t is None:
                t = time.perf_counter()
            for m in msgs:
                if m == DONE:
                    done += 1
                else:
                    got += 1
    else:
        while done < nprod:
            m = q.get(timeout=30)
            if t is None:
                t = time.perf_counter()
            if isinstance(m, str) and m == DONE:
                done += 1
            else:
                got += 1
    dt = time.perf_counter() - t
    for p in procs:
        p.join()
    assert got == n * nprod, (impl, got)
    return got / dt


CASES = [
    # name, producers, payload, put_many batch, get_many
    ('put/get small, 1 producer', 1, None, 0, False),
    ('put/get small, 4 producers', 4, None, 0, False),
    ('put/get 1 KiB bytes, 1 producer', 1, b'k' * 1024, 0, False),
    ('put_many/get_many small, 1 producer', 1, None, 100, True),
    ('put/get_many small, 4 producers', 4, None, 0, True),
]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument('--n', type=int, default=100_000, help='messages per producer')
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--stdlib', action='store_true', help='also run multiprocessing.Queue')
    args = ap.parse_args()
    impls = ['cpool'] + (['faster_fifo'] if faster_fifo else []) + (['multiprocessing'] if args.stdlib else [])
    if not faster_fifo:
        print('faster-fifo is not installed (pip install faster-fifo): cpool only')
    print('%-40s %s' % ('case (msg/s, median of %d)' % args.rounds, '  '.join('%14s' % i for i in impls)))
    for name, nprod, payload, batch, gm in CASES:
        res = {}
        for impl in impls:
            if impl == 'multiprocessing' and (batch or gm):
                continue
            n = args.n
            res[impl] = statistics.median(run(impl, nprod, n, payload, batch, gm) for _ in range(args.rounds))
        cells = []
        for impl in impls:
            if impl not in res:
                cells.append('%14s' % '-')
            elif impl == 'cpool':
                cells.append('%14s' % format(int(res[impl]), ','))
            else:
                cells.append('%14s' % ('%s (%.1fx)' % (format(int(res[impl]), ','), res['cpool'] / res[impl])))
        print('%-40s %s' % (name, '  '.join(cells)))
    print('(x) = cpool / that implementation; Python %s' % sys.version.split()[0])


if __name__ == '__main__':
    main()
