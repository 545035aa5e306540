"""Queue, SimpleQueue, JoinableQueue: differential against multiprocessing, many producers and
consumers, and what goes wrong (SIGKILL mid-put/get, Ctrl-C in a blocking call, a producer that
exits with items in the queue, unpicklable objects, huge messages, ring wrap-around)."""
import os
import pickle
import queue
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

import cpool
from cpool import _core

from conftest import open_fds, sigint_after


# ---- helpers run in children (module level so spawn can find them) ----

def _put_all(q, items):
    for x in items:
        q.put(x)


def _producer(q, pid, n, seed):
    rnd = random.Random(seed)
    for i in range(n):
        size = rnd.choice((0, 1, 10, 100, 1000, 10000, 100000))
        q.put((pid, i, bytes([i % 256]) * size))
    q.put(('done', pid))


def _consumer(q, out):
    got = []
    while True:
        m = q.get(timeout=30)
        if m is None:
            break
        if m[0] == 'done':
            continue
        pid, i, payload = m
        assert payload == bytes([i % 256]) * len(payload)
        got.append((pid, i))
    out.put(('end', got))


def _joinable_worker(q, results):
    while True:
        x = q.get(timeout=30)
        if x is None:
            q.task_done()
            break
        results.put(x * 2)
        q.task_done()


def _put_forever(q, payload):
    i = 0
    while True:
        q.put((i, payload))
        i += 1


def _get_forever(q, ready):
    ready.put(1)
    while True:
        q.get()


def _big_put(q, nbytes, started):
    buf = b'z' * nbytes
    started.put(1)
    q.put(buf)


def _child_puts_and_exits(q, n):
    for i in range(n):
        q.put(i)
    q.put(b'x' * (8 << 20))


def _echo_many(qin, qout):
    while True:
        batch = qin.get_many(timeout=30)
        if batch[-1] is None:
            qout.put_many(batch[:-1])
            return
        qout.put_many(batch)


# ---- API, differential ----

OBJECTS = [None, True, False, 0, -1, 2**63 - 1, -2**63, 2**64, 1.5, float('inf'), '', 'héllo',
           '\udc80', b'', b'abc', bytearray(b'xy'), (1, 'a'), [1, [2]], {'k': {1, 2}},
           b'q' * 70000, 'w' * 5000, list(range(1000))]


def test_roundtrip_in_process(mpmod):
    q = mpmod.Queue()
    for o in OBJECTS:
        q.put(o)
    got = [q.get(timeout=10) for _ in OBJECTS]
    assert got == OBJECTS
    assert [type(x) for x in got] == [type(x) for x in OBJECTS]
    assert q.empty()


def test_empty_full_and_sizes(mpmod):
    q = mpmod.Queue(2)
    assert q.empty() and not q.full()
    with pytest.raises(queue.Empty):
        q.get_nowait()
    with pytest.raises(queue.Empty):
        q.get(timeout=0.05)
    with pytest.raises(queue.Empty):
        q.get(False)
    q.put(1)
    q.put_nowait(2)
    time.sleep(0.05)  # the standard library's feeder thread
    assert q.full() and q.qsize() == 2
    with pytest.raises(queue.Full):
        q.put(3, timeout=0.05)
    with pytest.raises(queue.Full):
        q.put_nowait(3)
    with pytest.raises(queue.Full):
        q.put(3, block=False)
    assert q.get() == 1 and q.get() == 2


def test_closed_queue(mpmod):
    q = mpmod.Queue()
    q.put(1)
    q.close()
    with pytest.raises(ValueError, match='is closed'):
        q.put(2)
    with pytest.raises(ValueError, match='is closed'):
        q.get()
    q.join_thread()
    q.cancel_join_thread()


def test_join_thread_needs_close(mpmod):
    q = mpmod.Queue()
    with pytest.raises(AssertionError):
        q.join_thread()


def test_pickling_outside_spawn_is_refused(mpmod):
    for q in (mpmod.Queue(), mpmod.JoinableQueue()):
        with pytest.raises(RuntimeError, match='through inheritance'):
            pickle.dumps(q)


def test_joinable_task_done(mpmod):
    q = mpmod.JoinableQueue()
    with pytest.raises(ValueError, match='task_done\\(\\) called too many times'):
        q.task_done()
    q.put(1)
    q.put(2)
    q.get()
    q.get()
    q.task_done()
    q.task_done()
    assert q.join() is None
    with pytest.raises(ValueError):
        q.task_done()


def test_simple_queue(mpmod):
    q = mpmod.SimpleQueue()
    assert q.empty()
    q.put([1, 2])
    assert not q.empty()
    assert q.get() == [1, 2]
    q.close()


def test_children_by_inheritance(ctx):
    q = ctx.Queue()
    items = [1, 'two', b'3' * 200000, (4,)]
    p = ctx.Process(target=_put_all, args=(q, items))
    p.start()
    got = [q.get(timeout=30) for _ in items]
    p.join(30)
    assert got == items and p.exitcode == 0


def test_joinable_with_worker(ctx):
    q = ctx.JoinableQueue()
    results = ctx.Queue()
    p = ctx.Process(target=_joinable_worker, args=(q, results))
    p.start()
    for i in range(20):
        q.put(i)
    q.put(None)
    q.join()
    assert sorted(results.get(timeout=10) for _ in range(20)) == [2 * i for i in range(20)]
    p.join(30)
    assert p.exitcode == 0


# ---- errors reach the caller ----

def test_unpicklable_raises_in_put_and_queue_stays_usable():
    q = cpool.Queue()
    q.put(1)
    with pytest.raises((pickle.PicklingError, AttributeError, TypeError)):
        q.put(lambda: 0)
    with pytest.raises(TypeError):
        q.put(threading.Lock())
    q.put(2)
    assert q.get(timeout=1) == 1 and q.get(timeout=1) == 2
    assert q.empty()


def test_put_many_is_all_or_nothing_on_pickling_error():
    q = cpool.Queue()
    with pytest.raises(TypeError):
        q.put_many([1, 2, threading.Lock()])
    assert q.empty()
    q.put_many(x for x in range(5))
    assert q.get_many() == [0, 1, 2, 3, 4]


def test_joinable_unpicklable_does_not_count_a_task():
    q = cpool.JoinableQueue()
    with pytest.raises(TypeError):
        q.put(threading.Lock())
    assert q.join(timeout=0) is True


# ---- batches and out-of-band buffers ----

def test_put_many_get_many_fifo():
    q = cpool.Queue()
    q.put_many(range(10000))
    got = []
    while len(got) < 10000:
        got += q.get_many(max_messages=777, timeout=1)
    assert got == list(range(10000))
    with pytest.raises(queue.Empty):
        q.get_many(timeout=0.01)
    with pytest.raises(ValueError):
        q.get_many(max_messages=0)


def test_get_many_with_large_messages():
    q = cpool.Queue()
    items = [b'a' * 10, b'b' * (1 << 20), b'c', 'd' * 300000, b'e' * 5]
    q.put_many(items)
    got = []
    while len(got) < len(items):
        got += q.get_many(timeout=1)
    assert got == items


def test_put_many_bounded_waits_for_room():
    q = cpool.Queue(3)
    t = threading.Thread(target=lambda: [time.sleep(0.05) or q.get() for _ in range(4)])
    t.start()
    q.put_many(range(7), timeout=10)
    t.join()
    assert q.get_many() == [4, 5, 6]
    q.put_many(range(3))
    with pytest.raises(queue.Full):
        q.put_many([9], block=False)


def test_get_many_across_processes():
    ctx = cpool.get_context('fork')
    qin, qout = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_echo_many, args=(qin, qout))
    p.start()
    for k in range(50):
        qin.put_many(range(k * 100, k * 100 + 100))
    qin.put(None)
    got = []
    while len(got) < 5000:
        got += qout.get_many(timeout=30)
    p.join(30)
    assert got == list(range(5000))


def test_out_of_band_buffers():
    np = pytest.importorskip('numpy')
    q = cpool.Queue()
    a = np.arange(1 << 20, dtype=np.float64).reshape(1024, 1024)
    q.put({'a': a, 'b': a[::2].copy(), 't': a.T})  # contiguous, contiguous, non-contiguous
    d = q.get(timeout=5)
    assert (d['a'] == a).all() and (d['b'] == a[::2]).all() and (d['t'] == a.T).all()
    d['a'][0, 0] = -1  # arrives writable, backed by the received buffer
    q.put(memoryview(b'hello world'))
    m = q.get(timeout=5)
    assert isinstance(m, memoryview) and bytes(m) == b'hello world'


# ---- many producers x many consumers ----

@pytest.mark.timeout(90)
def test_mpmc_exactly_once_in_producer_order():
    ctx = cpool.get_context('fork')
    q = ctx.Queue()
    out = ctx.Queue()
    nprod, ncons, n = 3, 2, 400
    prods = [ctx.Process(target=_producer, args=(q, k, n, k)) for k in range(nprod)]
    cons = [ctx.Process(target=_consumer, args=(q, out)) for _ in range(ncons)]
    for p in prods + cons:
        p.start()
    for p in prods:
        p.join(60)
        assert p.exitcode == 0
    for _ in cons:
        q.put(None)
    per_consumer = [out.get(timeout=60)[1] for _ in cons]
    for p in cons:
        p.join(30)
        assert p.exitcode == 0
    data = [r for got in per_consumer for r in got]
    assert sorted(data) == [(k, i) for k in range(nprod) for i in range(n)]
    # Each consumer saw every producer's messages in that producer's order.
    for got in per_consumer:
        for k in range(nprod):
            seq = [i for (pk, i) in got if pk == k]
            assert seq == sorted(seq)


def test_per_consumer_order_is_producer_order():
    ctx = cpool.get_context('fork')
    q = ctx.Queue()
    prods = [ctx.Process(target=_put_all, args=(q, [(k, i) for i in range(3000)])) for k in range(3)]
    for p in prods:
        p.start()
    last = {}
    for _ in range(9000):
        k, i = q.get(timeout=30)
        assert i == last.get(k, -1) + 1
        last[k] = i
    for p in prods:
        p.join(30)


# ---- no hangs ----

def test_join_producer_that_left_items_behind():
    ctx = cpool.get_context('fork')
    q = ctx.Queue()
    p = ctx.Process(target=_child_puts_and_exits, args=(q, 20000))
    p.start()
    p.join(20)
    assert p.exitcode == 0
    assert q.qsize() == 20001
    got = q.get_many(max_messages=20000, timeout=5)
    while len(got) < 20000:
        got += q.get_many(max_messages=20000 - len(got), timeout=5)
    assert got == list(range(20000))
    assert len(q.get(timeout=5)) == 8 << 20


def test_unbounded_put_does_not_block_without_reader_and_memory_returns():
    q = cpool.Queue()
    block = b'm' * (1 << 20)
    t = time.monotonic()
    for _ in range(64):  # 64 MiB: far beyond the resident hot zone
        q.put(block)
    assert time.monotonic() - t < 20
    used = os.fstat(q.fileno()).st_blocks * 512
    assert used >= 60 << 20
    for _ in range(64):
        assert q.get(timeout=5) == block
    # Consumed cold pages were given back: what stays is about the hot zone.
    used = os.fstat(q.fileno()).st_blocks * 512
    assert used <= 8 << 20, used


@pytest.mark.parametrize('what', ['get', 'put_full', 'join', 'get_many'])
def test_sigint_interrupts_blocking_call(what):
    q = cpool.JoinableQueue(1)
    if what == 'put_full' or what == 'join':
        q.put(0)
    calls = {'get': q.get, 'put_full': lambda: q.put(1), 'join': q.join,
             'get_many': q.get_many}
    sigint_after(0.2)
    t = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        calls[what]()
    assert time.monotonic() - t < 1.2


def test_sigint_interrupts_get_while_lock_holder_is_stopped():
    ctx = cpool.get_context('fork')
    q, started = ctx.Queue(), ctx.Queue()
    p = ctx.Process(target=_big_put, args=(q, 256 << 20, started))
    p.start()
    started.get(timeout=30)
    time.sleep(0.03)
    os.kill(p.pid, signal.SIGSTOP)  # most likely inside its copy, holding the lock
    try:
        sigint_after(0.3)
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            q.get()
        assert time.monotonic() - t < 1.5
    finally:
        os.kill(p.pid, signal.SIGCONT)
    assert len(q.get(timeout=30)) == 256 << 20
    p.join(30)
    assert p.exitcode == 0


def _sleep_in_get(q, ready):
    ready.put(1)
    q.get()


def test_reader_killed_in_its_sleep_costs_one_wake():
    # The first put wakes (nobody); later puts must not pay a futex wake each for ever.
    ctx = cpool.get_context('fork')
    q, ready = ctx.Queue(), ctx.Queue()
    ps = [ctx.Process(target=_sleep_in_get, args=(q, ready)) for _ in range(2)]
    for p in ps:
        p.start()
    for p in ps:
        ready.get(timeout=30)
    deadline = time.monotonic() + 10
    while q._waiters[0] < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert q._waiters[0] == 2 and q._armed[0] == 1
    for p in ps:
        p.kill()
        p.join(10)
    q.put('x')
    assert q._armed == (0, 0, 0)
    q.put('y')
    assert q.get(timeout=5) == 'x' and q.get(timeout=5) == 'y'


def test_sigkill_mid_put_leaves_queue_usable():
    ctx = cpool.get_context('fork')
    q, started = ctx.Queue(), ctx.Queue()
    # A 256 MiB copy takes tens of ms: the kill lands inside it, with the lock held. Tried a
    # few times in case a loaded machine did not schedule the child in time.
    for attempt in range(5):
        p = ctx.Process(target=_big_put, args=(q, 256 << 20, started))
        p.start()
        started.get(timeout=30)
        time.sleep(0.03 + 0.02 * attempt)
        p.kill()
        p.join(10)
        # Either the whole message went in or none of it.
        try:
            m = q.get(timeout=0.5)
            assert len(m) == 256 << 20
        except queue.Empty:
            pass
        q.put('after')
        assert q.get(timeout=5) == 'after'
        assert q.empty()
        if q._recoveries:
            break
    assert q._recoveries >= 1  # the lock was taken over from the dead holder


def test_sigkill_during_put_and_get_storm():
    ctx = cpool.get_context('fork')
    q, ready = ctx.Queue(), ctx.Queue()
    payload = b'p' * 300000
    rnd = random.Random(1)
    for round_ in range(6):
        ps = [ctx.Process(target=_put_forever, args=(q, payload)),
              ctx.Process(target=_get_forever, args=(q, ready))]
        for p in ps:
            p.start()
        ready.get(timeout=30)
        time.sleep(rnd.uniform(0.01, 0.1))
        for p in ps:
            p.kill()
        for p in ps:
            p.join(10)
        # Every message left is whole, in producer order; the queue works.
        last = -1
        while True:
            try:
                i, data = q.get(timeout=0.05)
            except queue.Empty:
                break
            assert data == payload and i > last
            last = i
        q.put(round_)
        assert q.get(timeout=5) == round_
    assert q.qsize() == 0


def test_sigkill_mid_get_leaves_the_message_in_the_queue():
    # A reader killed while it copies a 200 MiB message out (holding the lock) never took it:
    # the message is still there, whole, for the next reader.
    ctx = cpool.get_context('fork')
    q, ready = ctx.Queue(), ctx.Queue()
    big = b'g' * (200 << 20)
    q.put(big)
    for attempt in range(5):
        before = q._recoveries
        p = ctx.Process(target=_get_forever, args=(q, ready))
        p.start()
        ready.get(timeout=30)
        time.sleep(0.03 + 0.03 * attempt)
        p.kill()
        p.join(10)
        q.put(1)
        if q._recoveries > before or q.qsize() == 2:
            # The lock was taken over, or the child had not reached the copy: still there.
            assert q.qsize() == 2
            assert q.get(timeout=5) == big
            assert q.get(timeout=5) == 1
            if q._recoveries > before:
                break
        else:
            assert q.get(timeout=5) == 1  # the child got it, whole, before the kill
        q.put(big)
    assert q._recoveries >= 1
    assert q.empty()


# ---- sizes and the ring's geometry ----

@pytest.mark.timeout(120)
def test_256mb_message_through_a_child():
    ctx = cpool.get_context('fork')
    q = ctx.Queue()
    big = bytes(range(256)) * (1 << 20)  # 256 MiB
    p = ctx.Process(target=_put_all, args=(q, [big, ('tail', 1)]))
    p.start()
    got = q.get(timeout=60)
    assert got == big
    assert q.get(timeout=10) == ('tail', 1)
    p.join(30)


def test_message_larger_than_capacity_raises():
    q = _core.Queue(hot=1 << 14, cold=1 << 16)
    with pytest.raises(ValueError, match='larger than'):
        q.put(b'x' * (1 << 17))
    q.put(b'ok')
    assert q.get() == b'ok'


def test_small_ring_full_by_bytes_blocks_then_raises_full():
    q = _core.Queue(hot=1 << 14, cold=1 << 16)
    for _ in range(6):  # one in the hot ring, five in the cold one
        q.put(b'x' * 10000)
    with pytest.raises(queue.Full):
        q.put(b'x' * 20000, timeout=0.05)
    assert q.get() == b'x' * 10000
    q.put(b'y' * 9000, timeout=1)


def test_ring_wraparound_model():
    hypothesis = pytest.importorskip('hypothesis')
    st = pytest.importorskip('hypothesis.strategies')
    from collections import deque

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(st.lists(st.one_of(st.integers(0, 12000).map(lambda n: ('put', n)),
                                         st.integers(1, 5).map(lambda n: ('get', n))),
                               max_size=80))
    def run(ops):
        q = _core.Queue(hot=1 << 13, cold=1 << 15)
        model = deque()
        seq = 0
        for op, n in ops:
            if op == 'put':
                item = (seq, bytes([seq % 251]) * n)
                seq += 1
                try:
                    q.put(item, block=False)
                except queue.Full:
                    # Out of bytes (skipped space counts until readers pass it): once drained,
                    # the ring takes the message.
                    while model:
                        assert q.get(block=False) == model.popleft()
                    q.put(item, block=False)
                model.append(item)
            else:
                if not model:
                    with pytest.raises(queue.Empty):
                        q.get_many(max_messages=n, block=False)
                    continue
                got = q.get_many(max_messages=n, block=False)
                for g in got:
                    assert g == model.popleft()
            assert q.qsize() == len(model)
        while model:
            assert q.get(block=False) == model.popleft()
    run()


# ---- resources ----

def test_no_fd_leak():
    before = open_fds()
    for _ in range(50):
        q = cpool.Queue()
        q.put(1)
        q.get()
        del q
    assert open_fds() == before


def test_import_without_stdlib_multiprocessing():
    code = ("import sys; sys.modules['multiprocessing'] = None\n"
            "import cpool\nq = cpool.Queue(); q.put(1); assert q.get() == 1\n"
            "j = cpool.JoinableQueue(); s = cpool.SimpleQueue()\n")
    subprocess.run([sys.executable, '-c', code], check=True, timeout=60,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---- stress: peers killed at random while traffic flows ----

def _stress_producer(q, pid, seed):
    rnd = random.Random(seed)
    i = 0
    while True:
        size = rnd.choice((0, 8, 100, 3000, 70000, 1 << 20, 3 << 20))
        q.put((pid, i, bytes([i % 251]) * size))
        i += 1


def _stress_consumer(q):
    last = {}
    while True:
        m = q.get(timeout=60)
        if m is None:
            return
        pid, i, data = m
        if data != bytes([i % 251]) * len(data) or i <= last.get(pid, -1):
            os._exit(3)  # corruption or reordering: the parent sees exit code 3
        last[pid] = i


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_stress_random_kills():
    ctx = cpool.get_context('fork')
    q = ctx.Queue()
    rnd = random.Random(7)
    producers, consumers, finished = [], [], []
    next_id = [0]

    def spawn(kind):
        if kind == 'p':
            next_id[0] += 1
            p = ctx.Process(target=_stress_producer, args=(q, next_id[0], next_id[0]))
            producers.append(p)
        else:
            p = ctx.Process(target=_stress_consumer, args=(q,))
            consumers.append(p)
        p.start()

    for _ in range(2):
        spawn('p')
        spawn('c')
    end = time.monotonic() + 8
    while time.monotonic() < end:
        time.sleep(rnd.uniform(0.01, 0.2))
        pool = producers if rnd.random() < 0.5 else consumers
        victim = pool.pop(rnd.randrange(len(pool)))
        victim.kill()
        victim.join(10)
        finished.append(victim)
        spawn('p' if pool is producers else 'c')
    for p in producers:
        p.kill()
        p.join(10)
    for _ in consumers:
        q.put(None)
    for p in consumers:
        p.join(60)
        assert p.exitcode == 0
    assert all(p.exitcode == -signal.SIGKILL for p in finished)  # none exited on bad data
    # Whatever is left is whole and in order per producer.
    last = {}
    while True:
        try:
            m = q.get(timeout=0.2)
        except queue.Empty:
            break
        if m is None:
            continue
        pid, i, data = m
        assert data == bytes([i % 251]) * len(data) and i > last.get(pid, -1)
        last[pid] = i
    q.put('end')
    assert q.get(timeout=5) == 'end'


def _closed_queue_outcomes(mod, cls):
    q = getattr(mod, cls)()
    q.put(1)
    q.close()
    if cls != 'SimpleQueue':
        # the stdlib's feeder closes the reading end when it is done: wait for it
        q.join_thread()
    out = []
    for op in (q.empty, q.get, lambda: q.put(2)):
        try:
            out.append(('ok', type(op()).__name__))
        except Exception as e:
            out.append((type(e).__name__, str(e) if isinstance(e, OSError) else ''))
    return out


@pytest.mark.parametrize('cls', ['Queue', 'SimpleQueue', 'JoinableQueue'])
def test_use_after_close_raises_as_stdlib(cls):
    import multiprocessing
    import cpool
    assert _closed_queue_outcomes(cpool, cls) == _closed_queue_outcomes(multiprocessing, cls)


@pytest.mark.parametrize('cls', ['Queue', 'JoinableQueue'])
def test_empty_after_close_of_unused_queue(mpmod, cls):
    # Only a queue that was used has a reading end to lose: close() of an unused one leaves
    # empty() working (CPython's test_closed_queue_empty_exceptions).
    q = getattr(mpmod, cls)()
    q.close()
    q.join_thread()
    assert q.empty()
