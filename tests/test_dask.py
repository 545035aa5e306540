"""cpool.dask.Pool on a real distributed.LocalCluster: differential with cpool.Pool, and the faults
(a worker SIGKILLed mid-task, the scheduler going away, Ctrl-C) that must not hang."""
import collections
import functools
import glob
import itertools
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

distributed = pytest.importorskip('distributed')

import cpool  # noqa: E402
import cpool.dask  # noqa: E402
import cpool.pool  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- task functions (module level: the workers import them by name) ----

def sq(x):
    return x * x


def add(a, b=0):
    return a + b


def boom(x):
    raise ValueError('boom %r' % (x,))


def boom_on(x, bad):
    if x == bad:
        raise ValueError('bad item %r' % (x,))
    return x


def boom_on_3(x):
    return boom_on(x, 3)


def sleepy_sq(x):
    time.sleep(0.01 * (x % 4))  # results finish out of order
    return x * x


def unpicklable_result(_):
    return lambda: 1


def mark(path, x):
    """Appends a line per call, so the calls that ran can be counted."""
    with open(path, 'a') as f:
        f.write('%d %d\n' % (os.getpid(), x))
    return x


def count_running(d, i):
    """How many tasks run at once: each leaves a file while it runs and counts the others'."""
    me = os.path.join(d, 'run-%d' % i)
    open(me, 'w').close()
    time.sleep(0.2)
    n = len(glob.glob(os.path.join(d, 'run-*')))
    os.unlink(me)
    return n


def started_then_wait(d, i):
    """Says which process runs task i, then waits for the test's go."""
    # Written under another name and renamed: a reader that sees the file sees the pid in it.
    tmp = os.path.join(d, '.started-%d' % i)
    with open(tmp, 'w') as f:
        f.write(str(os.getpid()))
    os.replace(tmp, os.path.join(d, 'started-%d' % i))
    deadline = time.monotonic() + 60
    while not os.path.exists(os.path.join(d, 'go')) and time.monotonic() < deadline:
        time.sleep(0.02)
    return i


_init_value = None


def init(path, value):
    global _init_value
    _init_value = value
    with open(path, 'a') as f:
        f.write('%d\n' % os.getpid())


def init_value(_=None):
    return os.getpid(), _init_value


def getpid(_=None):
    return os.getpid()


# ---- fixtures ----

@pytest.fixture(scope='module')
def client():
    """One LocalCluster for the module: starting one costs a second or two."""
    import dask
    with dask.config.set(cpool.dask.LOCAL_CONFIG):
        # The pool's own kind: a plain LocalCluster may close a nanny for good if a check for
        # lost workers falls inside a restart (maxtasksperchild's, a SIGKILLed worker's).
        cluster = cpool.dask._LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                           host='127.0.0.1', dashboard_address=':0')
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


@pytest.fixture
def two_workers(client):
    """The module's client once both workers are up again (a test before may have killed one)."""
    client.wait_for_workers(2, timeout=60)
    return client


@pytest.fixture(params=['cpool', 'dask'])
def make_pool(request, two_workers):
    """Pool(...) of cpool, then of cpool.dask on the module's cluster."""
    def make(processes=2, *args, **kwds):
        if request.param == 'cpool':
            return cpool.Pool(processes, *args, **kwds)
        return cpool.dask.Pool(processes, *args, client=two_workers, **kwds)
    make.kind = request.param
    return make


def outcome(fn, *args):
    try:
        return ('ok', fn(*args))
    except Exception as e:
        return ('err', type(e), str(e))


def drain(it):
    """Every item of an iterator, an exception raised by next() counted as an item."""
    out = []
    while True:
        try:
            out.append(('ok', next(it)))
        except StopIteration:
            return out
        except Exception as e:
            out.append(('err', type(e), str(e)))


# ---- the standard library's API, differential with cpool.Pool ----

def test_results_of_every_method(make_pool):
    with make_pool() as p:
        assert p.apply(add, (2,), {'b': 3}) == 5
        assert p.apply_async(sq, (7,)).get(timeout=30) == 49
        assert p.map(sq, range(50)) == [x * x for x in range(50)]
        assert p.map(sq, range(50), chunksize=7) == [x * x for x in range(50)]
        assert p.map(sq, []) == []
        assert p.starmap(add, [(1, 2), (3, 4)]) == [3, 7]
        assert p.map_async(sq, range(10)).get(timeout=30) == [x * x for x in range(10)]
        assert p.starmap_async(add, [(i, i) for i in range(9)], 2).get(30) == list(range(0, 18, 2))
        assert list(p.imap(sleepy_sq, range(30))) == [x * x for x in range(30)]
        assert list(p.imap(sleepy_sq, range(30), chunksize=4)) == [x * x for x in range(30)]
        assert sorted(p.imap_unordered(sleepy_sq, range(30))) == [x * x for x in range(30)]
        assert sorted(p.imap_unordered(sq, range(30), 5)) == [x * x for x in range(30)]


def test_async_result_states(make_pool, tmp_path):
    with make_pool() as p:
        r = p.apply_async(sq, (3,))
        r.wait(30)
        assert r.ready() and r.successful() and r.get(0) == 9
        e = p.apply_async(boom, (1,))
        e.wait(30)
        assert e.ready() and not e.successful()
        with pytest.raises(ValueError, match='boom 1'):
            e.get(0)
        slow = p.apply_async(started_then_wait, (str(tmp_path), 0))
        with pytest.raises(cpool.TimeoutError):
            slow.get(0.05)
        with pytest.raises(ValueError):
            slow.successful()  # not ready yet
        open(tmp_path / 'go', 'w').close()
        assert slow.get(30) == 0


def test_callbacks_and_error_callbacks(make_pool):
    got = []
    with make_pool() as p:
        p.apply_async(sq, (4,), callback=got.append).wait(30)
        p.apply_async(boom, (5,), error_callback=lambda e: got.append(repr(e))).wait(30)
        p.map_async(sq, range(5), callback=got.append).wait(30)
        p.starmap_async(add, [(1, 1)], callback=got.append).wait(30)
        p.map_async(boom_on_3, range(5), 1, error_callback=lambda e: got.append(str(e))).wait(30)
    # Callbacks run before wait() returns (the stdlib sets the event after calling them).
    assert got == [16, "ValueError('boom 5')", [0, 1, 4, 9, 16], [2], 'bad item 3']


def test_exceptions_carry_the_remote_traceback(make_pool):
    with make_pool() as p:
        with pytest.raises(ValueError) as ei:
            p.apply(boom, ('x',))
        cause = ei.value.__cause__
        assert isinstance(cause, cpool.pool.RemoteTraceback)
        assert 'in boom' in str(cause) and "ValueError: boom 'x'" in str(cause)
        assert outcome(p.map, boom_on_3, range(10)) == ('err', ValueError, 'bad item 3')
        with pytest.raises(cpool.pool.MaybeEncodingError, match='Error sending result'):
            p.apply(unpicklable_result, (1,))
        # The pool keeps serving after failures.
        assert p.map(sq, range(4)) == [0, 1, 4, 9]


def test_imap_order_and_errors_in_place(make_pool):
    with make_pool() as p:
        got = drain(p.imap(boom_on_3, range(7)))
        assert got == [('ok', 0), ('ok', 1), ('ok', 2), ('err', ValueError, 'bad item 3'),
                       ('ok', 4), ('ok', 5), ('ok', 6)]
        # Chunked, the standard library fails the whole chunk [2, 3] and its generator stops
        # there. (cpool.Pool goes on with the next chunks: only the prefix is common.)
        got = drain(p.imap(boom_on_3, range(10), chunksize=2))
        stdlib = [('ok', 0), ('ok', 1), ('err', ValueError, 'bad item 3')]
        assert got[:3] == stdlib
        if make_pool.kind == 'dask':
            assert got == stdlib
        un = drain(p.imap_unordered(boom_on_3, range(7)))
        assert sorted(x for x in un if x[0] == 'ok') == [('ok', x) for x in (0, 1, 2, 4, 5, 6)]
        assert ('err', ValueError, 'bad item 3') in un and len(un) == 7


def test_imap_input_error_comes_in_its_place(make_pool):
    def gen():
        yield 1
        yield 2
        raise KeyError('input broke')
    with make_pool() as p:
        it = p.imap(sq, gen())
        assert [next(it), next(it)] == [1, 4]
        with pytest.raises(KeyError):
            next(it)
        with pytest.raises(StopIteration):
            next(it)


def test_imap_reads_its_input_lazily(make_pool):
    consumed = []

    def endless():
        for i in itertools.count():
            consumed.append(i)
            yield i
    with make_pool() as p:
        it = p.imap(sq, endless(), chunksize=2, buffersize=3)
        first = [next(it) for _ in range(10)]
        assert first == [x * x for x in range(10)]
        # At most processes + buffersize chunks are read ahead of the 5 chunks consumed (one
        # more may be in the feeder's hands), as CPython 3.15 counts the window.
        assert len(consumed) <= (5 + p._processes + 3 + 1) * 2
        it2 = p.imap_unordered(sq, endless(), buffersize=4)
        assert len([next(it2) for _ in range(20)]) == 20


def test_identical_calls_all_run(make_pool, tmp_path):
    log = str(tmp_path / 'calls')
    with make_pool() as p:
        rs = [p.apply_async(mark, (log, 7)) for _ in range(5)]
        assert [r.get(30) for r in rs] == [7] * 5
        assert p.map(functools.partial(mark, log), [9] * 6, chunksize=1) == [9] * 6
        assert p.starmap(mark, [(log, 1)] * 6, chunksize=1) == [1] * 6
    with open(log) as f:
        lines = f.read().split('\n')
    assert sum(1 for x in lines if x.endswith(' 7')) == 5
    assert sum(1 for x in lines if x.endswith(' 1')) == 6
    assert sum(1 for x in lines if x.endswith(' 9')) == 6


def test_processes_caps_the_tasks_in_flight(make_pool, tmp_path):
    # The cluster has two workers; a pool of one may still only run one task at a time.
    with make_pool(1) as p:
        seen = p.starmap(count_running, [(str(tmp_path), i) for i in range(6)], chunksize=1)
    assert seen == [1] * 6


def test_initializer_runs_once_in_every_worker(make_pool, tmp_path):
    log = str(tmp_path / 'init')
    with make_pool(2, init, (log, 'ready')) as p:
        got = p.map(init_value, range(20), chunksize=1)
    assert {v for _, v in got} == {'ready'}
    with open(log) as f:
        pids = f.read().split()
    assert len(pids) == len(set(pids))  # once per process
    assert {str(pid) for pid, _ in got} <= set(pids)
    if make_pool.kind == 'dask':
        assert len(pids) == 2  # also in the worker that ran nothing


def test_with_close_join_terminate(make_pool):
    p = make_pool()
    rs = [p.apply_async(sq, (i,)) for i in range(8)]
    p.close()
    with pytest.raises(ValueError):
        p.apply(sq, (1,))
    p.join()
    assert [r.get(0) for r in rs] == [i * i for i in range(8)]
    p2 = make_pool()
    with pytest.raises(ValueError):
        p2.join()  # still running
    with p2 as q:
        assert q is p2
    with pytest.raises(ValueError, match='Pool not running'):
        p2.apply(sq, (1,))
    p2.join()


def test_argument_errors(make_pool):
    with pytest.raises(ValueError):
        make_pool(0)
    with pytest.raises(TypeError):
        make_pool(2, 'not callable')
    with pytest.raises(ValueError):
        make_pool(2, None, (), 0)
    with make_pool() as p:
        with pytest.raises(ValueError):
            p.imap(sq, [1], chunksize=0)
        with pytest.raises(ValueError):
            p.map(sq, [1], chunksize=0)


# ---- cpool.dask only ----

def test_terminate_fails_the_tasks_in_flight(two_workers, tmp_path):
    p = cpool.dask.Pool(2, client=two_workers)
    rs = [p.apply_async(started_then_wait, (str(tmp_path), i)) for i in range(4)]
    it = p.imap(started_then_wait, [(str(tmp_path))] * 3)
    p.terminate()
    for r in rs:
        with pytest.raises(cpool.ProcessError, match='terminated'):
            r.get(30)
    with pytest.raises(cpool.ProcessError, match='terminated'):
        it.next(30)
    p.join()
    open(tmp_path / 'go', 'w').close()  # cancelled, the running ones still hold a worker thread


def test_pool_of_its_own_local_cluster():
    with cpool.dask.Pool(1) as p:
        assert p.map(sq, range(5)) == [0, 1, 4, 9, 16]
        assert len(p.client.nthreads()) == 1
        cluster = p._cluster
    assert cluster is None or cluster.status.name in ('closed', 'closing')


def test_client_and_address_are_exclusive(two_workers):
    with pytest.raises(ValueError):
        cpool.dask.Pool(client=two_workers, address='tcp://127.0.0.1:1')


def test_import_cpool_does_not_import_dask():
    code = ("import sys, cpool, cpool.pool; "
            "assert not {'dask', 'distributed'} & set(sys.modules), 'dask imported'")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT,
                   env=dict(os.environ, PYTHONPATH=ROOT))


def test_dask_module_does_not_import_multiprocessing_itself():
    # distributed imports the standard library's multiprocessing (its nanny uses it); cpool.dask
    # must not add to that.
    import ast
    with open(cpool.dask.__file__) as f:
        tree = ast.parse(f.read())
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module]
    assert not [x for x in names if x.split('.')[0] == 'multiprocessing']


# ---- faults ----

def _wait_for_files(pattern, n, timeout=60):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = sorted(glob.glob(pattern))
        if len(found) >= n:
            return found
        time.sleep(0.02)
    raise AssertionError('only %r after %s s' % (glob.glob(pattern), timeout))


@pytest.mark.timeout(150)
def test_worker_killed_mid_task_fails_that_task(make_pool, tmp_path):
    d = str(tmp_path)
    with make_pool(2) as p:
        rs = [p.apply_async(started_then_wait, (d, i)) for i in range(4)]
        first = _wait_for_files(os.path.join(d, 'started-*'), 1)[0]
        with open(first) as f:
            victim = int(f.read())
        if make_pool.kind == 'dask':
            assert victim in p.client.run(os.getpid).values()
        os.kill(victim, signal.SIGKILL)
        lost = rs[int(first.rsplit('-', 1)[1])]
        with pytest.raises(cpool.WorkerLostError):
            lost.get(60)
        open(os.path.join(d, 'go'), 'w').close()
        outcomes = [outcome(r.get, 60) for r in rs]
        assert sum(1 for o in outcomes if o[0] == 'ok') == 3
        assert sum(1 for o in outcomes if o[:2] == ('err', cpool.WorkerLostError)) == 1
        # The pool keeps serving, on a replacement worker too.
        assert p.map(sq, range(10), chunksize=1) == [x * x for x in range(10)]


@pytest.mark.timeout(150)
def test_initializer_runs_in_a_worker_that_joins_later(two_workers, tmp_path):
    log = str(tmp_path / 'init')
    with cpool.dask.Pool(2, init, (log, 'ready'), client=two_workers) as p:
        before = dict(p.client.run(os.getpid))
        victim = next(iter(before.values()))
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = p.client.run(os.getpid, on_error='ignore')  # the dead one cannot answer
            if len(now) == 2 and victim not in now.values():
                break
            time.sleep(0.1)
        else:
            raise AssertionError('the killed worker was not replaced')
        new = (set(now.values()) - set(before.values())).pop()
        got = p.map(init_value, range(20), chunksize=1)
        with open(log) as f:
            pids = [int(x) for x in f.read().split()]
    assert new in pids and len(pids) == 3
    assert {v for _, v in got} == {'ready'}


def square_pid_init(x):
    return x * x, os.getpid(), _init_value


@pytest.mark.timeout(150)
def test_maxtasksperchild_replaces_the_worker_process(make_pool, tmp_path):
    # On Dask the nanny starts each replacement: about 2 s a generation, three generations.
    log = str(tmp_path / 'init')
    with make_pool(2, init, (log, 'ready'), 2) as p:
        got = p.map(square_pid_init, range(8), chunksize=1)
        got += [r.get(60) for r in [p.apply_async(square_pid_init, (i,)) for i in range(8, 12)]]
    assert [x for x, _, _ in got] == [x * x for x in range(12)]
    per_pid = collections.Counter(pid for _, pid, _ in got)
    assert max(per_pid.values()) <= 2 and len(per_pid) >= 6, per_pid
    assert {v for _, _, v in got} == {'ready'}  # the initializer ran in every new process
    with open(log) as f:
        pids = [int(x) for x in f.read().split()]
    assert len(pids) == len(set(pids)) and set(per_pid) <= set(pids)


@pytest.mark.stress  # a cluster of its own, four generations of workers: 10-20 s
@pytest.mark.timeout(150)
def test_maxtasksperchild_keeps_the_pools_own_cluster_whole():
    # A SpecCluster closes a worker's nanny when, lost-worker-timeout after a removal, no
    # worker of its name is there: at 1 s that falls inside one of these restarts. And a
    # retired worker whose heartbeat reaches the scheduler before its nanny's kill closes
    # itself, which closed its nanny too (under load: run with both cores busy).
    import dask
    with dask.config.set({'distributed.deploy.lost-worker-timeout': '1s'}):
        with cpool.dask.Pool(2, maxtasksperchild=1) as p:
            got = p.map(getpid, range(8), chunksize=1)
            time.sleep(1.5)  # the last removals' checks too
            # The last restarts may still be under way: both workers come back.
            p.client.wait_for_workers(2, timeout=30)
            assert len(p.client.nthreads()) == 2
            nannies = p._cluster.workers.values()
            assert [n.status for n in nannies] == [distributed.core.Status.running] * 2
    assert len(set(got)) == 8


@pytest.fixture(scope='module')
def nannyless_client():
    """Workers in this process (LocalCluster(processes=False)): no nanny to replace them."""
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                                       dashboard_address=':0')
    c = distributed.Client(cluster, set_as_default=False)
    yield c
    c.close()
    cluster.close()


def test_maxtasksperchild_needs_workers_with_a_nanny(nannyless_client):
    with pytest.raises(ValueError, match='nanny'):
        cpool.dask.Pool(1, maxtasksperchild=2, client=nannyless_client)
    with cpool.dask.Pool(1, client=nannyless_client) as p:  # without it the pool serves
        assert p.map(sq, range(4)) == [0, 1, 4, 9]
    # A worker without a nanny that joins after the pool started fails the task given to it.
    fut = nannyless_client.submit(cpool.dask._run, cpool.dask._APPLY, sq, ((3,), {}),
                                  ('pool-id', 2), pure=False)
    with pytest.raises(RuntimeError, match='has no nanny'):
        fut.result(timeout=30)


SCHEDULER_GONE = r'''
import os, signal, subprocess, sys, time
sys.path.insert(0, %(tests)r)
import cpool.dask, test_dask

sfile = os.path.join(%(tmp)r, 'scheduler.json')
env = dict(os.environ, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES='0',
           PYTHONPATH=os.pathsep.join(sys.path))
sched = subprocess.Popen([sys.executable, '-m', 'distributed.cli.dask_scheduler', '--host',
                          '127.0.0.1', '--port', '0', '--no-dashboard', '--scheduler-file', sfile],
                         env=env, stderr=subprocess.DEVNULL)
worker = subprocess.Popen([sys.executable, '-m', 'distributed.cli.dask_worker', '--nthreads', '1',
                           '--no-dashboard', '--scheduler-file', sfile], env=env,
                          stderr=subprocess.DEVNULL)
try:
    while not os.path.exists(sfile):
        time.sleep(0.05)
    import json
    time.sleep(0.2)
    with open(sfile) as f:
        address = json.load(f)['address']
    pool = cpool.dask.Pool(1, address=address)
    pool.client.wait_for_workers(1, timeout=60)
    print('ran', pool.map(test_dask.sq, range(3)), flush=True)
    r = pool.starmap_async(test_dask.started_then_wait, [(%(tmp)r, i) for i in range(4)], 1)
    while not os.path.exists(os.path.join(%(tmp)r, 'started-0')):
        time.sleep(0.02)
    os.kill(sched.pid, signal.SIGKILL)
    t = time.monotonic()
    try:
        r.get(60)
    except cpool.dask.SchedulerLostError as e:
        print('lost after %%.1f s: %%s' %% (time.monotonic() - t, e), flush=True)
    try:
        pool.apply(test_dask.sq, (2,))
    except cpool.dask.SchedulerLostError:
        print('later calls fail too', flush=True)
    pool.terminate()
    print('terminated', flush=True)
finally:
    worker.kill()
    sched.kill()
'''


def _run_script(code):
    """Runs code in a fresh interpreter (a cluster of its own) from the repository root."""
    res = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT))
    assert res.returncode == 0, res.stderr[-3000:]
    return res


@pytest.mark.stress  # a cluster of its own: 20-35 s on a loaded machine
@pytest.mark.timeout(150)
def test_scheduler_going_away_fails_the_tasks(tmp_path):
    code = SCHEDULER_GONE % {'tests': HERE, 'tmp': str(tmp_path)}
    res = _run_script(code)
    lines = res.stdout.splitlines()
    assert lines[0] == 'ran [0, 1, 4]'
    assert lines[1].startswith('lost after ') and 'lost the connection' in lines[1]
    assert float(lines[1].split()[2]) < 20
    assert lines[2:] == ['later calls fail too', 'terminated']


CTRL_C = r'''
import os, signal, sys, threading, time
sys.path.insert(0, %(tests)r)
import cpool.dask, test_dask

with cpool.dask.Pool(2) as pool:
    pool.map(test_dask.sq, range(4))
    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT)).start()
    t = time.monotonic()
    try:
        pool.starmap(test_dask.started_then_wait, [(%(tmp)r, i) for i in range(20)], 1)
        print('map finished')
    except KeyboardInterrupt:
        print('KeyboardInterrupt after %%.1f s' %% (time.monotonic() - t), flush=True)
print('out of the with block', flush=True)
'''


@pytest.mark.stress  # a cluster of its own: 20-35 s on a loaded machine
@pytest.mark.timeout(150)
def test_ctrl_c_during_map(tmp_path):
    code = CTRL_C % {'tests': HERE, 'tmp': str(tmp_path)}
    res = _run_script(code)
    lines = res.stdout.splitlines()
    assert lines[0].startswith('KeyboardInterrupt after ') and float(lines[0].split()[2]) < 10
    assert lines[1:] == ['out of the with block']
    assert 'Traceback' not in res.stderr, res.stderr[-3000:]


def test_slurm_cluster_job_script():
    import importlib.util
    import subprocess
    import sys
    if importlib.util.find_spec('dask_jobqueue') is None:
        pytest.skip("could not import 'dask_jobqueue'")
    # In a fresh interpreter: importing dask_jobqueue replaces this process's SIGINT handler
    # with one that calls sys.exit(), which would turn every later Ctrl-C test into SystemExit.
    prog = """if 1:
        import dask_jobqueue as jq
        cluster = jq.SLURMCluster(cores=1, processes=1, memory='2GB', queue='normal',
                                  walltime='01:00:00', job_extra_directives=['--cpus-per-task=1'])
        try:
            print(cluster.job_script())
        finally:
            cluster.close()
    """
    res = subprocess.run([sys.executable, '-c', prog], capture_output=True, text=True, timeout=100)
    assert res.returncode == 0, res.stderr[-3000:]
    script = res.stdout
    assert '#SBATCH -p normal' in script and '#SBATCH -t 01:00:00' in script
    assert 'distributed.cli.dask_worker' in script and '--nthreads 1' in script
