"""Micro cases: one primitive of the multiprocessing API each (pipe, queue, lock, event, process, pool,
manager), written against the public API of the module passed in as `mp`.

Each case is `fn(mp, n, cfg) -> (units, seconds)`; `cfg` carries the pool size ('workers') and the
data directory. Setup (starting a pool, a peer process) stays outside the timed part unless the
case measures it; every case checks its result so a fast wrong answer cannot pass.
"""
import time

perf = time.perf_counter


def square(x):
    return x * x


def add(a, b):
    return a + b


def noop():
    pass


# ---- Pipe / Connection ----

def _echo(conn):
    while True:
        obj = conn.recv()
        if obj is None:
            break
        conn.send(obj)


def pipe_pingpong(mp, n, cfg):
    a, b = mp.Pipe()
    peer = mp.Process(target=_echo, args=(b,))
    peer.start()
    try:
        a.send(0)
        a.recv()
        t = perf()
        for i in range(n):
            a.send(i)
            if a.recv() != i:
                raise AssertionError('echo returned a different object')
        dt = perf() - t
        a.send(None)
    finally:
        peer.join(5)
        if peer.is_alive():
            peer.terminate()
    return n, dt


def _sink(conn, n):
    total = 0
    for _ in range(n):
        total += len(conn.recv_bytes())
    conn.send(total)


def pipe_10mb(mp, n, cfg):
    a, b = mp.Pipe()
    peer = mp.Process(target=_sink, args=(b, n))
    peer.start()
    buf = b'y' * (10 << 20)
    t = perf()
    for _ in range(n):
        a.send_bytes(buf)
    if a.recv() != n * len(buf):
        raise AssertionError('bytes lost in the pipe')
    dt = perf() - t
    peer.join()
    return n * 10, dt  # MB


# ---- Queue ----

def _produce(q, n, payload):
    for i in range(n):
        q.put(i if payload is None else payload)
    q.put(None)


def _queue(mp, n, payload):
    q = mp.Queue()
    producer = mp.Process(target=_produce, args=(q, n, payload))
    t = perf()
    producer.start()
    count = 0
    while q.get() is not None:
        count += 1
    dt = perf() - t
    producer.join()
    if count != n:
        raise AssertionError('%d of %d messages arrived' % (count, n))
    return n, dt


def queue_small(mp, n, cfg):
    return _queue(mp, n, None)


def queue_1mb(mp, n, cfg):
    return _queue(mp, n, b'x' * (1 << 20))


# ---- Lock, Event ----

def lock_uncontended(mp, n, cfg):
    lock = mp.Lock()
    t = perf()
    for _ in range(n):
        lock.acquire()
        lock.release()
    return n, perf() - t


def _increment(lock, counter, n):
    for _ in range(n):
        with lock:
            counter.value += 1


def lock_contended(mp, n, cfg):
    lock = mp.Lock()
    counter = mp.Value('i', 0, lock=False)
    procs = [mp.Process(target=_increment, args=(lock, counter, n)) for _ in range(2)]
    t = perf()
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    dt = perf() - t
    if counter.value != 2 * n:
        raise AssertionError('lost updates under the lock: %d != %d' % (counter.value, 2 * n))
    return 2 * n, dt


def _answer(ping, pong, n):
    for _ in range(n):
        ping.wait()
        ping.clear()
        pong.set()


def event_pingpong(mp, n, cfg):
    ping, pong = mp.Event(), mp.Event()
    peer = mp.Process(target=_answer, args=(ping, pong, n))
    peer.start()
    t = perf()
    for _ in range(n):
        ping.set()
        pong.wait()
        pong.clear()
    dt = perf() - t
    peer.join()
    return n, dt


# ---- Process ----

def process_start_join(mp, n, cfg):
    t = perf()
    for _ in range(n):
        p = mp.Process(target=noop)
        p.start()
        p.join()
        if p.exitcode != 0:
            raise AssertionError('exitcode %r' % p.exitcode)
    return n, perf() - t


# ---- Pool ----

def _warm_pool(mp, cfg, method):
    """A pool whose workers have all started and run the case's own call once: the steady state.
    (Some libraries, mpire among them, restart or reconfigure their workers when the function or
    the method changes.)"""
    pool = mp.Pool(cfg['workers'])
    k = 4 * cfg['workers']
    if method == 'apply_async':
        for r in [pool.apply_async(add, (i, 1)) for i in range(k)]:
            r.get()
    else:
        list(getattr(pool, method)(square, range(k), chunksize=1))
    return pool


def pool_map(mp, n, cfg):
    with _warm_pool(mp, cfg, 'map') as pool:
        t = perf()
        out = pool.map(square, range(n))
        dt = perf() - t
    if out[-1] != (n - 1) ** 2 or len(out) != n:
        raise AssertionError('wrong map result')
    return n, dt


def pool_map_chunk1(mp, n, cfg):
    with _warm_pool(mp, cfg, 'map') as pool:
        t = perf()
        out = pool.map(square, range(n), chunksize=1)
        dt = perf() - t
    if len(out) != n:
        raise AssertionError('wrong map result')
    return n, dt


def pool_apply_async(mp, n, cfg):
    with _warm_pool(mp, cfg, 'apply_async') as pool:
        t = perf()
        results = [pool.apply_async(add, (i, 1)) for i in range(n)]
        total = sum(r.get() for r in results)
        dt = perf() - t
    if total != n * (n + 1) // 2:
        raise AssertionError('wrong apply_async results')
    return n, dt


def pool_imap(mp, n, cfg):
    with _warm_pool(mp, cfg, 'imap') as pool:
        t = perf()
        total = 0
        for i, r in enumerate(pool.imap(square, range(n))):
            if r != i * i:
                raise AssertionError('imap out of order')
            total += 1
        dt = perf() - t
    return total, dt


def pool_imap_unordered(mp, n, cfg):
    with _warm_pool(mp, cfg, 'imap_unordered') as pool:
        t = perf()
        total = sum(pool.imap_unordered(square, range(n)))
        dt = perf() - t
    if total != sum(i * i for i in range(n)):
        raise AssertionError('wrong imap_unordered results')
    return n, dt


def pool_apply_latency(mp, n, cfg):
    with _warm_pool(mp, cfg, 'apply_async') as pool:
        t = perf()
        for i in range(n):
            if pool.apply(add, (i, 1)) != i + 1:
                raise AssertionError('wrong apply result')
        dt = perf() - t
    return n, dt


# ---- Manager ----

def manager_list_append(mp, n, cfg):
    with mp.Manager() as manager:
        shared = manager.list()
        t = perf()
        for i in range(n):
            shared.append(i)
        dt = perf() - t
        if len(shared) != n:
            raise AssertionError('lost appends')
    return n, dt
