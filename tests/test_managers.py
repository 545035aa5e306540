"""Managers: shared containers and proxies (differential vs multiprocessing), security, robustness."""
import gc
import importlib
import os
import signal
import socket
import struct
import sys
import threading
import time

import pytest

from conftest import zombies


@pytest.fixture
def manager(mpmod):
    with mpmod.Manager() as m:
        yield m


@pytest.fixture
def cmanager():
    import cpool
    with cpool.Manager() as m:
        yield m


# ---- containers and proxies, same results on both modules ----

def _list_ops(l):
    l.append(4)
    l.extend([5, 6])
    l += [7]
    l.insert(0, 0)
    l[1] = 30
    del l[2]
    out = [len(l), l[0], l[-1], l[1:3], 30 in l, l.count(30), l.index(30), l.pop(),
           str(l), l + [9], [9] + l[:]]
    l.reverse()
    out.append(l[:])
    l.sort()
    out.append(l[:])
    l *= 2
    out.append(l[:])
    l.remove(30)
    out.append(l[:])
    out.append(list(reversed(l)))
    for bad, exc in ((lambda: l[100], IndexError), (lambda: l.index(12345), ValueError)):
        with pytest.raises(exc):
            bad()
    return out


def test_list_operations(manager):
    assert _list_ops(manager.list([3, 1, 2])) == _list_ops([3, 1, 2])


def test_dict_operations(manager):
    d = manager.dict({'a': 1})
    d['b'] = 2
    d.update(c=3)
    assert d.setdefault('d', 4) == 4
    assert sorted(d.keys()) == ['a', 'b', 'c', 'd']
    assert sorted(d.values()) == [1, 2, 3, 4]
    assert sorted(d.items()) == [('a', 1), ('b', 2), ('c', 3), ('d', 4)]
    assert sorted(iter(d)) == ['a', 'b', 'c', 'd']
    assert 'a' in d and 'z' not in d
    assert d.get('z', 9) == 9
    assert d.pop('a') == 1
    del d['b']
    assert len(d) == 2
    assert d.copy() == {'c': 3, 'd': 4}
    with pytest.raises(KeyError):
        d['nope']
    assert d.popitem() == ('d', 4)
    d.clear()
    assert d._getvalue() == {}


def test_nested_proxies(manager):
    outer = manager.dict()
    inner = manager.list([1])
    outer['l'] = inner
    outer['l'].append(2)          # through the proxy fetched from the dict
    assert inner[:] == [1, 2]
    del inner
    gc.collect()
    # the list lives on inside the dict even with no outside proxy left
    got = outer['l']
    got.append(3)
    assert outer['l'][:] == [1, 2, 3]
    lol = manager.list([manager.list([i]) for i in range(3)])
    assert [x[:] for x in lol] == [[0], [1], [2]]


def test_namespace_value_array(manager):
    ns = manager.Namespace(x=1, _y=2)
    ns.z = 3
    assert (ns.x, ns.z) == (1, 3)
    del ns.x
    with pytest.raises(AttributeError):
        ns.x
    assert 'z=3' in str(ns)
    v = manager.Value('i', 5)
    v.value += 2
    assert v.get() == 7 and v.value == 7
    a = manager.Array('d', [1.0, 2.0])
    a[1] = 5.0
    assert (len(a), a[0], a[1], list(a[:])) == (2, 1.0, 5.0, [1.0, 5.0])


def test_queue_and_joinable_queue(manager):
    q = manager.Queue(2)
    q.put(1)
    q.put(2)
    assert q.full()
    with pytest.raises(Exception) as e:
        q.put(3, timeout=0.05)
    assert type(e.value).__name__ == 'Full'
    assert q.qsize() == 2
    assert [q.get(), q.get()] == [1, 2]
    with pytest.raises(Exception) as e:
        q.get(timeout=0.05)
    assert type(e.value).__name__ == 'Empty'
    jq = manager.JoinableQueue()
    jq.put('x')
    assert jq.get() == 'x'
    jq.task_done()
    jq.join()


def test_error_is_raised_with_its_type(manager):
    d = manager.dict()
    with pytest.raises(KeyError):
        d['missing']
    l = manager.list()
    with pytest.raises(TypeError):
        l.append()


def _sync_worker(lock, rlock, sem, cond, ev, barrier, lst):
    with lock:
        lst.append('locked')
    with rlock:
        with rlock:
            lst.append('rlocked')
    sem.acquire()
    sem.release()
    barrier.wait(10)
    with cond:
        cond.notify_all()
    ev.set()


def test_synchronization_proxies_across_processes(manager, mpmod):
    lock, rlock = manager.Lock(), manager.RLock()
    sem, bsem = manager.Semaphore(1), manager.BoundedSemaphore(1)
    cond, ev, barrier = manager.Condition(), manager.Event(), manager.Barrier(2)
    lst = manager.list()
    assert barrier.parties == 2 and barrier.n_waiting == 0 and not barrier.broken
    assert bsem.acquire() and not bsem.acquire(False)
    bsem.release()
    with pytest.raises(Exception):
        bsem.release()
    assert not ev.is_set()
    p = mpmod.Process(target=_sync_worker, args=(lock, rlock, sem, cond, ev, barrier, lst))
    p.start()
    barrier.wait(10)
    assert ev.wait(10)
    with cond:
        cond.wait_for(lambda: ev.is_set(), 10)
    p.join(10)
    assert p.exitcode == 0
    assert lst[:] == ['locked', 'rlocked']
    assert lock.acquire(timeout=1)
    lock.release()


def _child_appends(lst, d, n):
    for i in range(n):
        lst.append(i)
    d['pid'] = os.getpid()


@pytest.mark.parametrize('method', ['fork', 'spawn', 'forkserver'])
def test_proxies_passed_to_children(mpmod, method):
    ctx = mpmod.get_context(method)
    with ctx.Manager() as m:
        lst, d = m.list(), m.dict()
        ps = [ctx.Process(target=_child_appends, args=(lst, d, 50)) for _ in range(2)]
        for p in ps:
            p.start()
        for p in ps:
            p.join(30)
        assert [p.exitcode for p in ps] == [0, 0]
        assert sorted(lst[:]) == sorted(list(range(50)) * 2)
        assert d['pid'] in [p.pid for p in ps]


def test_proxy_pickled_through_a_pipe(manager, mpmod):
    r, w = mpmod.Pipe(duplex=False)
    shared = manager.list()
    p = mpmod.Process(target=_append_from_pipe, args=(r,))
    p.start()
    w.send(shared)
    p.join(20)
    assert p.exitcode == 0
    assert shared[:] == ['from child']


def _append_from_pipe(r):
    assert r.poll(10)
    r.recv().append('from child')


class Counter(object):
    def __init__(self, start=0):
        self.n = start

    def incr(self, k=1):
        self.n += k
        return self.n

    def box(self):
        return Counter(self.n)

    def _hidden(self):
        return 'hidden'


def _register(mod):
    class MyManager(mod.managers.BaseManager):
        pass
    MyManager.register('Counter', Counter)
    MyManager.register('CounterExposed', Counter, exposed=('incr',))
    MyManager.register('CounterBoxed', Counter, method_to_typeid={'box': 'CounterRef'})
    MyManager.register('CounterRef', create_method=False)
    MyManager.register('NoCreate', Counter, create_method=False)
    return MyManager


def test_register_autoproxy_exposed_method_to_typeid(mpmod):
    importlib.import_module(mpmod.__name__ + '.managers')
    MyManager = _register(mpmod)
    assert not hasattr(MyManager, 'NoCreate')
    # A class defined in a function reaches the manager process only by fork (whatever the
    # default start method is, e.g. under CPOOL_TEST_DEFAULT_START=forkserver).
    with MyManager(ctx=mpmod.get_context('fork')) as m:
        c = m.Counter(5)
        assert c.incr() == 6 and c.incr(4) == 10
        assert not hasattr(c, '_hidden')
        e = m.CounterExposed()
        assert e.incr() == 1
        assert not hasattr(e, 'box')
        b = m.CounterBoxed(7)
        inner = b.box()
        assert isinstance(inner, mpmod.managers.BaseProxy)
        assert inner.incr() == 8
        assert b.incr() == 8  # a separate object
        assert m._number_of_objects() == 4
        del c, e, b, inner
        gc.collect()
        assert m._number_of_objects() == 0


def test_start_initializer_and_state_errors(mpmod):
    importlib.import_module(mpmod.__name__ + '.managers')
    m = mpmod.managers.SyncManager()
    with pytest.raises(TypeError):
        m.start(initializer=5)
    m.start(initializer=os.getpid)
    with pytest.raises(mpmod.ProcessError):
        m.start()
    m.shutdown()
    with pytest.raises(mpmod.ProcessError):
        m.start()
    with pytest.raises(mpmod.ProcessError):
        m.get_server()


# ---- shutdown, dead managers, dead clients ----

def test_shutdown_ends_and_reaps_the_manager(mpmod):
    m = mpmod.Manager()
    l = m.list([1])
    proc = m._process
    m.shutdown()
    assert not proc.is_alive()
    assert proc.exitcode == 0
    assert proc.pid not in zombies()
    with pytest.raises(Exception):
        l.append(2)


def test_killed_manager_gives_errors_not_hangs(cmanager):
    l = cmanager.list([1])
    q = cmanager.Queue()
    l.append(2)
    errors = []

    def blocked_get():
        try:
            q.get()
        except Exception as e:
            errors.append(e)
    t = threading.Thread(target=blocked_get)
    t.start()
    time.sleep(0.2)
    os.kill(cmanager._process.pid, signal.SIGKILL)
    t.join(5)
    assert not t.is_alive(), 'a get() blocked on a killed manager hung'
    assert len(errors) == 1 and isinstance(errors[0], (EOFError, OSError))
    t0 = time.monotonic()
    with pytest.raises((EOFError, OSError)):
        l.append(3)
    with pytest.raises((EOFError, OSError)):
        cmanager.list()
    assert time.monotonic() - t0 < 5


def _blocked_child(q, lst, ready):
    lst.append('child')
    ready.set()
    q.get()  # blocks until killed


def test_client_killed_mid_call_releases_and_does_not_wedge(cmanager):
    import cpool
    q = cmanager.Queue()
    lst = cmanager.list()
    ready = cmanager.Event()
    base = cmanager._number_of_objects()
    p = cpool.Process(target=_blocked_child, args=(q, lst, ready))
    p.start()
    assert ready.wait(10)
    time.sleep(0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    # the manager serves everyone else at once
    lst.append('parent')
    assert lst[:] == ['child', 'parent']
    # and the references the killed child held are dropped with its connections
    deadline = time.monotonic() + 5
    while cmanager._number_of_objects() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cmanager._number_of_objects() == base
    # the item queued next goes to a live reader
    q.put(1)
    assert q.get(timeout=5) == 1


def test_sigint_does_not_kill_the_manager(cmanager):
    l = cmanager.list()
    os.kill(cmanager._process.pid, signal.SIGINT)
    time.sleep(0.2)
    l.append(1)
    assert cmanager._process.is_alive() and l[:] == [1]


@pytest.mark.timeout(20)
def test_ctrl_c_interrupts_a_blocked_call_and_the_proxy_still_works(cmanager):
    q = cmanager.Queue()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        q.get()
    assert time.monotonic() - t0 < 3
    timer.join()
    # the interrupted exchange is abandoned: the next call does not read its stale reply
    q.put('a')
    q.put('b')
    # and the server side of the abandoned get() takes nothing for the interrupted caller
    assert q.get(timeout=5) == 'a'
    assert q.get(timeout=5) == 'b'
    assert q.qsize() == 0


def test_manager_exits_when_its_owner_is_killed():
    import cpool
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            m = cpool.Manager()
            os.write(w, str(m._process.pid).encode())
            time.sleep(60)
        finally:
            os._exit(0)
    os.close(w)
    mpid = int(os.read(r, 100))
    os.close(r)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(mpid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        os.kill(mpid, signal.SIGKILL)
        pytest.fail('the manager outlived its killed owner')


# ---- security ----

def test_default_authkey_is_the_process_authkey(cmanager):
    import cpool
    assert cmanager._authkey == cpool.current_process().authkey
    assert len(cpool.current_process().authkey) >= 16


def test_unix_socket_is_owner_only(cmanager):
    address = cmanager.address
    assert isinstance(address, str)
    if not address.startswith('\0'):
        assert os.stat(address).st_mode & 0o077 == 0 or \
            os.stat(os.path.dirname(address)).st_mode & 0o077 == 0


def test_wrong_authkey_is_refused_and_the_server_keeps_serving(cmanager):
    import cpool
    from cpool.managers import SyncManager
    l = cmanager.list()
    other = SyncManager(address=cmanager.address, authkey=b'wrong key')
    with pytest.raises(cpool.AuthenticationError):
        other.connect()
    with pytest.raises(cpool.AuthenticationError):
        cpool.connection.Client(cmanager.address, authkey=b'also wrong')
    l.append(1)
    assert l[:] == [1]


def _vm_rss_kb(pid):
    with open('/proc/%d/status' % pid) as f:
        for line in f:
            if line.startswith('VmRSS:'):
                return int(line.split()[1])


def _raw_connect(address):
    s = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
    s.settimeout(5)
    s.connect(address)
    return s


@pytest.mark.parametrize('payload', [
    struct.pack('!i', 0x7fffffff),                                # a 2 GiB length
    struct.pack('!i', -1) + struct.pack('!Q', 1 << 40),           # a 1 TiB length
    b'\x80\x05garbage that is not a handshake' * 10,
    b'',                                                          # connect and say nothing
])
def test_garbage_before_auth_is_dropped_without_allocation(cmanager, payload):
    l = cmanager.list()
    rss0 = _vm_rss_kb(cmanager._process.pid)
    s = _raw_connect(cmanager.address)
    try:
        s.recv(1024)  # the server's challenge
        if payload:
            s.sendall(payload)
            # the server hangs up (or answers with a failure, then hangs up)
            try:
                while s.recv(1 << 16):
                    pass
            except ConnectionResetError:
                pass
        # meanwhile and after, others are served
        l.append(1)
        assert l[:] == [1]
    finally:
        s.close()
    rss1 = _vm_rss_kb(cmanager._process.pid)
    assert rss1 - rss0 < 64 * 1024, 'the manager grew by %d kB' % (rss1 - rss0)


# ---- a manager reached over TCP with an authkey ----

def test_remote_manager_over_tcp(mpmod):
    importlib.import_module(mpmod.__name__ + '.managers')
    MyManager = _register(mpmod)
    key = b'remote secret'
    server_side = MyManager(address=('127.0.0.1', 0), authkey=key, ctx=mpmod.get_context('fork'))
    server_side.start()
    try:
        host, port = server_side.address
        assert host == '127.0.0.1' and port > 0
        client = MyManager(address=('127.0.0.1', port), authkey=key)
        client.connect()
        c = client.Counter(10)
        assert c.incr() == 11
        assert c._token.address == ('127.0.0.1', port)
        bad = MyManager(address=('127.0.0.1', port), authkey=b'bad')
        with pytest.raises(mpmod.AuthenticationError):
            bad.connect()
        assert c.incr() == 12
        del c
    finally:
        server_side.shutdown()


_SHARED = {}


def _the_dict():
    return _SHARED


def test_get_server_serve_forever_and_connect():
    import cpool
    import cpool.managers as cm
    r, w = cpool.Pipe(duplex=False)
    p = cpool.Process(target=_serve_pipe, args=(w, b'k3y'), daemon=True)
    p.start()
    address = r.recv()

    class M(cm.BaseManager):
        pass
    M.register('get_dict', proxytype=cm.DictProxy)
    m = M(address=address, authkey=b'k3y')
    m.connect()
    d = m.get_dict()
    d['a'] = 1
    d2 = M(address=address, authkey=b'k3y')
    d2.connect()
    assert d2.get_dict()['a'] == 1
    p.terminate()
    p.join(5)


def _serve_pipe(w, key):
    import cpool.managers as cm

    class M(cm.BaseManager):
        pass
    M.register('get_dict', callable=_the_dict, proxytype=cm.DictProxy)
    server = M(address=('127.0.0.1', 0), authkey=key).get_server()
    w.send(server.address)
    server.serve_forever()


def test_no_stdlib_multiprocessing_import():
    import subprocess
    code = ("import sys; sys.modules['multiprocessing'] = None; import cpool, cpool.managers; "
            "m = cpool.Manager(); l = m.list([1]); l.append(2); assert l[:] == [1, 2]; "
            "m.shutdown()")
    subprocess.run([sys.executable, '-c', code], check=True, timeout=30,
                   cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_xmlrpclib_serializer(mpmod):
    importlib.import_module(mpmod.__name__ + '.managers')
    m = mpmod.managers.SyncManager(serializer='xmlrpclib')
    m.start()
    try:
        l = m.list([1])
        l.append(2)
        d = m.dict()
        d['k'] = 'v'
        assert (len(l), l[1], d['k']) == (2, 2, 'v')
    finally:
        m.shutdown()


def _square(x):
    return x * x


def test_pool_through_manager(manager, mpmod):
    with manager.Pool(2) as p:
        assert p.map(_square, range(5)) == [0, 1, 4, 9, 16]
        assert p.apply_async(_square, (7,)).get(10) == 49
        assert sorted(p.imap_unordered(_square, range(4))) == [0, 1, 4, 9]


def _hold_locks(lock, rlock, ready):
    lock.acquire()
    rlock.acquire()
    rlock.acquire()
    ready.set()
    time.sleep(60)


def _wait_for_lock(lock, ready):
    ready.set()
    lock.acquire()
    time.sleep(60)


def test_locks_of_a_killed_client_are_released(cmanager):
    import cpool
    lock, rlock, ready = cmanager.Lock(), cmanager.RLock(), cmanager.Event()
    p = cpool.Process(target=_hold_locks, args=(lock, rlock, ready))
    p.start()
    assert ready.wait(10)
    assert not lock.acquire(timeout=0.1) and not rlock.acquire(timeout=0.1)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert lock.acquire(timeout=5) and rlock.acquire(timeout=5)
    # a client killed while waiting for the lock does not get it after its death
    ready.clear()
    p = cpool.Process(target=_wait_for_lock, args=(lock, ready))
    p.start()
    assert ready.wait(10)
    time.sleep(0.2)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    lock.release()
    time.sleep(0.3)
    assert lock.acquire(timeout=5)
    lock.release()
    rlock.release()


def _take_and_exit(lock, rlock):
    lock.acquire()
    rlock.acquire()


@pytest.mark.parametrize('method', ['fork', 'spawn'])
def test_lock_left_held_by_a_client_that_exits_normally(mpmod, method):
    # A Lock may be released by another process than the one that acquired it: a client that
    # exits normally holding it leaves it held, for the parent to release (CPython's
    # TestSyncManagerTypes.test_lock). An RLock it held can be released by nobody else, so
    # cpool releases that one (the stdlib leaves it held for ever).
    with mpmod.Manager() as m:
        lock, rlock = m.Lock(), m.RLock()
        p = mpmod.get_context(method).Process(target=_take_and_exit, args=(lock, rlock))
        p.start()
        p.join(30)
        assert p.exitcode == 0
        time.sleep(0.2)  # the server notices the closed connections
        assert not lock.acquire(timeout=0.1)
        lock.release()
        with pytest.raises(RuntimeError):
            lock.release()
        if mpmod.__name__ == 'cpool':
            assert rlock.acquire(timeout=5)
            rlock.release()


def test_no_fd_or_zombie_left_behind():
    from conftest import open_fds
    import cpool
    with cpool.Manager() as m:  # warm up: imports, temp dir
        m.list()
    before = open_fds()
    for _ in range(2):
        m = cpool.Manager()
        l, d = m.list([1]), m.dict()
        d['l'] = l
        assert d['l'][:] == [1]
        del l, d
        m.shutdown()
    gc.collect()
    assert open_fds() - before == set()
    assert zombies() == []


def test_interop_with_the_standard_library_managers():
    """A cpool client uses a standard library manager and the other way round."""
    import multiprocessing.managers as smm
    import cpool.managers as cmm
    for server_mod, client_mod in ((smm, cmm), (cmm, smm)):
        server = server_mod.SyncManager(address=('127.0.0.1', 0), authkey=b'interop')
        server.start()
        try:
            client = client_mod.SyncManager(address=server.address, authkey=b'interop')
            client.connect()
            l = client.list([1])
            l.append(2)
            d = client.dict(a=1)
            assert (l[:], len(l), d['a'], sorted(d.keys())) == ([1, 2], 2, 1, ['a'])
            before = client._number_of_objects()
            del l
            gc.collect()
            assert client._number_of_objects() == before - 1
            del d
            gc.collect()
        finally:
            server.shutdown()


def _join_queue(jq, ready):
    ready.set()
    jq.join()


def test_joinable_queue_join_across_processes_and_a_killed_joiner(cmanager):
    import cpool
    jq, ready = cmanager.JoinableQueue(), cmanager.Event()
    jq.put(1)
    p = cpool.Process(target=_join_queue, args=(jq, ready))
    p.start()
    assert ready.wait(10)
    time.sleep(0.2)
    assert p.is_alive()  # waits for the task
    jq.get()
    jq.task_done()
    p.join(10)
    assert p.exitcode == 0
    jq.put(2)
    ready.clear()
    p = cpool.Process(target=_join_queue, args=(jq, ready))
    p.start()
    assert ready.wait(10)
    os.kill(p.pid, signal.SIGKILL)
    p.join(5)
    assert jq.get(timeout=5) == 2
    jq.task_done()
    jq.join()


def test_threads_share_proxies(manager):
    lst = manager.list()
    created = []

    def work(k):
        for i in range(100):
            lst.append((k, i))
        created.append(manager.dict(k=k))  # creation from a thread, on its own connection
    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(lst[:]) == sorted((k, i) for k in range(4) for i in range(100))
    assert sorted(d['k'] for d in created) == [0, 1, 2, 3]


def _churn(m_address, authkey, lst, rounds):
    import cpool.managers as cm
    m = cm.SyncManager(address=m_address, authkey=authkey)
    m.connect()
    for i in range(rounds):
        d = m.dict(i=i)
        inner = m.list([i])
        d['inner'] = inner
        lst.append(d['inner'][0])
        del d, inner


@pytest.mark.stress
@pytest.mark.timeout(120)
def test_many_clients_creating_and_dropping_objects(cmanager):
    import cpool
    lst = cmanager.list()
    base = cmanager._number_of_objects()
    ps = [cpool.Process(target=_churn, args=(cmanager.address, bytes(cmanager._authkey), lst, 100))
          for _ in range(4)]
    for p in ps:
        p.start()
    victim = cpool.Process(target=_churn, args=(cmanager.address, bytes(cmanager._authkey),
                                                 lst, 10 ** 6))
    victim.start()
    time.sleep(0.5)
    victim.kill()
    for p in ps + [victim]:
        p.join(60)
    assert [p.exitcode for p in ps] == [0] * 4
    assert lst[:].count(99) >= 4
    deadline = time.monotonic() + 10
    while cmanager._number_of_objects() != base and time.monotonic() < deadline:
        time.sleep(0.05)
    assert cmanager._number_of_objects() == base


def _count(pid, what):
    return len(os.listdir('/proc/%d/%s' % (pid, what)))


def _use_and_block(q, lst, ready):
    lst.append(os.getpid())
    ready.set()
    q.get()


def test_dead_clients_leave_no_thread_or_fd_in_the_manager(cmanager):
    import cpool
    q, lst, ready = cmanager.Queue(), cmanager.list(), cmanager.Event()
    mpid = cmanager._process.pid
    lst.append(0)
    time.sleep(0.1)
    threads0, fds0 = _count(mpid, 'task'), _count(mpid, 'fd')
    for _ in range(3):
        ready.clear()
        p = cpool.Process(target=_use_and_block, args=(q, lst, ready))
        p.start()
        assert ready.wait(10)
        assert _count(mpid, 'task') > threads0
        os.kill(p.pid, signal.SIGKILL)
        p.join(5)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if (_count(mpid, 'task'), _count(mpid, 'fd')) == (threads0, fds0):
            break
        time.sleep(0.05)
    assert (_count(mpid, 'task'), _count(mpid, 'fd')) == (threads0, fds0)
    assert len(lst) == 4


def test_proxy_reprs_and_copies(manager, mpmod):
    import copy
    l = manager.list([1, [2]])
    assert repr(l).startswith('<ListProxy object, typeid \'list\' at 0x')
    assert str(l) == '[1, [2]]'
    assert copy.deepcopy(l) == [1, [2]]
    assert l._getvalue() == [1, [2]]
    ns = manager.Namespace(a=1)
    with pytest.raises(AttributeError):
        ns.b
    assert mpmod.managers.ValueProxy[int] is not None


def test_condition_notify_given_while_waiter_between_slices(manager):
    # The server waits in slices (to notice dead clients); a notify given while the notifier
    # holds the lock across a slice boundary must still wake the waiter (it once got lost).
    cond = manager.Condition()
    ready = threading.Event()
    got = []

    def waiter():
        with cond:
            ready.set()
            t = time.monotonic()
            got.append((cond.wait(5), time.monotonic() - t))

    th = threading.Thread(target=waiter)
    th.start()
    ready.wait(5)
    time.sleep(0.05)
    with cond:
        time.sleep(0.35)  # several server-side slices time out while we hold the lock
        cond.notify()
    th.join(10)
    assert got and got[0][0] is True and got[0][1] < 2.5, got
