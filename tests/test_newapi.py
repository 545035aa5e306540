"""The API that Python 3.14-3.16 added, on every Python cpool supports: differential against
multiprocessing where the running stdlib has it, behaviour tests (cpool alone) where it does not."""
import inspect
import itertools
import os
import signal
import subprocess
import sys
import time

import pytest



def _need(mod_or_ctx, has, since):
    # The stdlib side runs only where the running Python has the API; cpool's always runs.
    name = getattr(mod_or_ctx, '__name__', None) or type(mod_or_ctx).__module__
    if name.split('.')[0] == 'multiprocessing' and not has:
        pytest.skip('the standard library has this from Python %s' % since)


# ---- Process.interrupt() (3.14) ----

def _wait_for_interrupt(path):
    # Shows that SIGINT arrived as KeyboardInterrupt: the finally block runs, then exit code 1.
    try:
        open(path + '.ready', 'w').close()
        time.sleep(60)
    finally:
        with open(path, 'w') as f:
            f.write('finally ran')


def _ignore_interrupt_then_exit(path):
    try:
        open(path + '.ready', 'w').close()
        time.sleep(60)
    except KeyboardInterrupt:
        sys.exit(7)


def _signal_state(pid):
    try:
        with open('/proc/%d/status' % pid) as f:
            return ' '.join(line.strip() for line in f if line.startswith(('State', 'Sig', 'Shd')))
    except OSError as e:
        return str(e)


def _start_and_wait_ready(ctx, target, path):
    p = ctx.Process(target=target, args=(path,))
    p.start()
    deadline = time.monotonic() + 30
    while not os.path.exists(path + '.ready'):
        assert time.monotonic() < deadline and p.exitcode is None, 'child never got ready'
        time.sleep(0.01)
    return p


def test_interrupt_raises_keyboardinterrupt_in_child(ctx, tmp_path):
    _need(ctx, hasattr(ctx.Process, 'interrupt'), '3.14')
    path = str(tmp_path / 'out')
    p = _start_and_wait_ready(ctx, _wait_for_interrupt, path)
    p.interrupt()
    p.join(30)
    assert p.exitcode == 1
    with open(path) as f:
        assert f.read() == 'finally ran'


def test_interrupt_caught_sets_own_exit_code(ctx, tmp_path):
    _need(ctx, hasattr(ctx.Process, 'interrupt'), '3.14')
    p = _start_and_wait_ready(ctx, _ignore_interrupt_then_exit, str(tmp_path / 'out'))
    p.interrupt()
    p.join(30)
    # Once (CI, 3.11 spawn, loaded machine) the child slept on as if SIGINT had not come: say
    # what the child's signal state was if that happens again, and leave no child to the tests
    # after this one.
    state = ''
    if p.exitcode is None:
        state = _signal_state(p.pid)
        p.kill()
        p.join(10)
    assert state == '' and p.exitcode == 7, state


def test_interrupt_after_exit_and_after_close(mpmod):
    _need(mpmod, hasattr(mpmod.Process, 'interrupt'), '3.14')
    p = mpmod.Process(target=time.sleep, args=(0,))
    p.start()
    p.join()
    p.interrupt()  # already exited: no error
    p.close()
    with pytest.raises(ValueError):
        p.interrupt()


# ---- Lock.locked() / RLock.locked() (3.14), and on the managed ones ----

def _hold_until(lock, held, release):
    with lock:
        held.set()
        release.wait(30)


@pytest.mark.parametrize('kind', ['Lock', 'RLock'])
def test_locked(ctx, kind):
    lock = getattr(ctx, kind)()
    _need(ctx, hasattr(lock, 'locked'), '3.14')
    assert lock.locked() is False
    with lock:
        assert lock.locked() is True
        if kind == 'RLock':
            with lock:
                assert lock.locked() is True
            assert lock.locked() is True
    assert lock.locked() is False
    # Held by another process: locked there is locked here.
    held, release = ctx.Event(), ctx.Event()
    p = ctx.Process(target=_hold_until, args=(lock, held, release))
    p.start()
    try:
        assert held.wait(30)
        assert lock.locked() is True
    finally:
        release.set()
        p.join(30)
    assert lock.locked() is False


@pytest.mark.parametrize('kind', ['Lock', 'RLock'])
def test_managed_locked(mpmod, kind):
    import threading
    with mpmod.Manager() as m:
        lock = getattr(m, kind)()
        _need(mpmod, 'locked' in type(lock)._exposed_, '3.14')
        assert lock.locked() is False
        lock.acquire()
        assert lock.locked() is True
        if kind == 'RLock':
            # Another client thread (another serving thread) sees it held too.
            seen = []
            t = threading.Thread(target=lambda: seen.append(lock.locked()))
            t.start()
            t.join(30)
            assert seen == [True]
        lock.release()
        assert lock.locked() is False


# ---- SyncManager.set(), list clear/copy, dict fromkeys and | / |= (3.14) ----

def test_managed_set(mpmod):
    with mpmod.Manager() as m:
        _need(mpmod, hasattr(m, 'set'), '3.14')
        s = m.set([1, 2, 3])
        s.add(4)
        s.discard(1)
        assert s.copy() == {2, 3, 4} and len(s) == 3 and 2 in s and 9 not in s
        alias = s
        s |= {5}
        s &= {2, 3, 5, 6}
        s -= {3}
        s ^= {7}
        assert s is alias  # in-place operators change the served set, not the name
        assert s.copy() == {2, 5, 7}
        assert s | {8} == {2, 5, 7, 8} and {8} | s == {2, 5, 7, 8}
        assert s & {2, 9} == {2} and s - {2} == {5, 7} and s ^ {2} == {5, 7}
        assert s.issubset({2, 5, 7, 9}) and s <= {2, 5, 7} and not s < {2, 5, 7}
        assert s.union([1]) == {1, 2, 5, 7} and s.isdisjoint({0})
        assert s.pop() in {2, 5, 7} and len(s) == 2
        s.clear()
        assert len(s) == 0
        if mpmod.__name__ == 'cpool':
            # Iterating: through a served iterator in cpool (as for a managed dict).
            s.update([1, 2])
            assert sorted(s) == [1, 2]


def test_managed_list_clear_copy(mpmod):
    with mpmod.Manager() as m:
        lst = m.list([1, 2, 3])
        _need(mpmod, 'copy' in type(lst)._exposed_, '3.14')
        c = lst.copy()
        assert c == [1, 2, 3] and type(c) is list  # a plain copy, by value
        c.append(4)
        assert len(lst) == 3
        lst.clear()
        assert len(lst) == 0


def test_managed_dict_fromkeys_and_or(mpmod):
    with mpmod.Manager() as m:
        d = m.dict(a=1)
        _need(mpmod, 'fromkeys' in type(d)._exposed_, '3.14')
        assert d.fromkeys('xy', 0) == {'x': 0, 'y': 0}
        alias = d
        d |= {'b': 2}
        assert d is alias and dict(d.items()) == {'a': 1, 'b': 2}
        assert d | {'c': 3} == {'a': 1, 'b': 2, 'c': 3}
        assert {'z': 0} | d == {'z': 0, 'a': 1, 'b': 2}


# ---- set_forkserver_preload(..., on_error=) (3.15) ----

_PRELOAD_PROGRAM = r'''
import sys, warnings
import {mod} as mp
if __name__ == '__main__':
    ctx = mp.get_context('forkserver')
    ctx.set_forkserver_preload(['os', 'no_such_module_xyz'], on_error=sys.argv[1])
    r, w = ctx.Pipe(duplex=False)
    p = ctx.Process(target=w.send, args=(42,))
    try:
        p.start()
    except (EOFError, ConnectionError) as e:
        print('START FAILED', type(e).__name__, getattr(e, '__notes__', []), flush=True)
        sys.exit(3)
    w.close()
    print('GOT', r.recv(), flush=True)
    p.join()
    print('EXIT', p.exitcode, flush=True)
'''


def _run_preload_program(mpmod, tmp_path, on_error):
    prog = tmp_path / 'prog.py'
    prog.write_text(_PRELOAD_PROGRAM.format(mod=mpmod.__name__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    # ImportWarning is hidden by default: -W shows it (the server inherits the flags).
    return subprocess.run([sys.executable, '-W', 'always::ImportWarning', str(prog), on_error],
                          capture_output=True, text=True, timeout=60, env=env)


def _has_on_error(mpmod):
    return 'on_error' in inspect.signature(mpmod.set_forkserver_preload).parameters


@pytest.mark.parametrize('on_error', ['ignore', 'warn'])
def test_preload_on_error_ignore_and_warn(mpmod, tmp_path, on_error):
    _need(mpmod, _has_on_error(mpmod), '3.15')
    r = _run_preload_program(mpmod, tmp_path, on_error)
    assert r.returncode == 0, r.stderr
    assert 'GOT 42' in r.stdout and 'EXIT 0' in r.stdout
    warned = 'ImportWarning' in r.stderr and 'no_such_module_xyz' in r.stderr
    assert warned == (on_error == 'warn'), r.stderr


def test_preload_on_error_fail(mpmod, tmp_path):
    _need(mpmod, _has_on_error(mpmod), '3.15')
    r = _run_preload_program(mpmod, tmp_path, 'fail')
    assert r.returncode == 3, (r.stdout, r.stderr)
    assert 'START FAILED' in r.stdout and 'Forkserver process may have crashed' in r.stdout
    assert 'ModuleNotFoundError' in r.stderr and 'no_such_module_xyz' in r.stderr


def test_preload_on_error_bad_value(mpmod):
    _need(mpmod, _has_on_error(mpmod), '3.15')
    with pytest.raises(ValueError, match="on_error must be 'ignore', 'warn', or 'fail'"):
        mpmod.set_forkserver_preload(['os'], on_error='loud')
    with pytest.raises(TypeError):
        mpmod.set_forkserver_preload(['os'], 'warn')  # keyword-only


# ---- Pool.imap(..., buffersize=) (3.15): at most processes + buffersize chunks read ahead ----

_read = []


def _counting(n):
    for i in range(n):
        _read.append(i)
        yield i


def _square(x):
    return x * x


def _pool_types(mpmod):
    from importlib import import_module
    return [mpmod.Pool, import_module(mpmod.__name__ + '.pool').ThreadPool]


def _has_buffersize(mpmod):
    from importlib import import_module
    imap = import_module(mpmod.__name__ + '.pool').Pool.imap
    return 'buffersize' in inspect.signature(imap).parameters


@pytest.mark.parametrize('method', ['imap', 'imap_unordered'])
@pytest.mark.parametrize('chunksize,buffersize', [(1, 1), (1, 3), (4, 2)])
def test_imap_buffersize_bounds_reading(mpmod, method, chunksize, buffersize):
    _need(mpmod, _has_buffersize(mpmod), '3.15')
    processes, n = 2, 200
    for Pool in _pool_types(mpmod):
        _read.clear()
        with Pool(processes) as p:
            it = getattr(p, method)(_square, _counting(n), chunksize=chunksize,
                                    buffersize=buffersize)
            got = []
            for _ in range(5):
                got.append(next(it))
                # Chunks handed out but not yet returned by next() never exceed the window.
                consumed_chunks = -(-len(got) // chunksize)
                limit = (processes + buffersize + consumed_chunks) * chunksize
                time.sleep(0.05)  # give the reader every chance to run ahead
                assert len(_read) <= limit, (Pool.__name__, len(_read), limit)
            got.extend(it)
        assert sorted(got) == [x * x for x in range(n)]
        if method == 'imap':
            assert got == [x * x for x in range(n)]
        assert len(_read) == n


def test_imap_buffersize_infinite_input(mpmod):
    _need(mpmod, _has_buffersize(mpmod), '3.15')
    with mpmod.Pool(2) as p:
        it = p.imap(_square, itertools.count(), buffersize=4)
        assert [next(it) for _ in range(50)] == [x * x for x in range(50)]


@pytest.mark.parametrize('bad,exc', [(0, ValueError), (-1, ValueError), (1.5, TypeError)])
def test_imap_buffersize_rejects(bad, exc):
    import cpool
    from cpool.pool import ThreadPool
    for Pool in (cpool.Pool, ThreadPool):
        with Pool(1) as p:
            with pytest.raises(exc):
                p.imap(_square, range(3), buffersize=bad)


# ---- WorkerLostError: pid, exitcode and the signal's name (3.15's BrokenProcessPool model) ----

def _die_by(sig):
    os.kill(os.getpid(), sig)
    time.sleep(30)


def _exit_now(code):
    os._exit(code)


@pytest.mark.parametrize('sig,name', [(signal.SIGKILL, 'SIGKILL'), (signal.SIGTERM, 'SIGTERM')])
def test_worker_lost_error_names_pid_and_signal(cctx, sig, name):
    import cpool
    with cctx.Pool(1) as p:
        pids = set(p.map(_pid_of, range(4)))
        with pytest.raises(cpool.WorkerLostError) as ei:
            p.apply(_die_by, (sig,))
        e = ei.value
        assert e.exitcode == -sig and e.pid in pids
        assert 'pid %d' % e.pid in str(e) and 'exit code %d' % -sig in str(e)
        assert '(%s)' % name in str(e)
        assert p.apply(_square, (3,)) == 9  # replaced, still serving


def test_worker_lost_error_exit_code_without_signal(cctx):
    import cpool
    with cctx.Pool(1) as p:
        with pytest.raises(cpool.WorkerLostError) as ei:
            p.apply(_exit_now, (5,))
        e = ei.value
        assert e.exitcode == 5 and isinstance(e.pid, int)
        assert 'exit code 5 ' in str(e) and 'SIG' not in str(e)
        import pickle
        back = pickle.loads(pickle.dumps(e))
        assert (back.pid, back.exitcode, str(back)) == (e.pid, e.exitcode, str(e))


def _pid_of(_):
    return os.getpid()


def test_worker_lost_error_class_defaults():
    import cpool
    assert cpool.WorkerLostError.pid is None and cpool.WorkerLostError.exitcode is None


# ---- Pool size: os.process_cpu_count() semantics on 3.13+, usable_cpu_count() opt-in ----

_SIZES = r'''
import os, sys, json
import cpool, cpool.pool
out = {'usable': cpool.usable_cpu_count(), 'cpu_count': cpool.cpu_count()}
with cpool.Pool() as p:
    out['cpool_pool'] = len(p._pool)
with cpool.pool.ThreadPool() as p:
    out['cpool_threadpool'] = len(p._pool)
if os.environ.get('WITH_STDLIB'):
    import multiprocessing, multiprocessing.pool
    with multiprocessing.Pool() as p:
        out['mp_pool'] = len(p._pool)
    with multiprocessing.pool.ThreadPool() as p:
        out['mp_threadpool'] = len(p._pool)
    out['mp_cpu_count'] = multiprocessing.cpu_count()
print(json.dumps(out))
'''


def _sizes(prefix=(), **env):
    import json
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env)
    r = subprocess.run(list(prefix) + [sys.executable, '-c', _SIZES], capture_output=True,
                       text=True, timeout=60, env=full)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _need_taskset():
    import shutil
    if shutil.which('taskset') is None:
        pytest.skip('taskset is not installed')
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip('this process may run on one CPU only: affinity 1 would prove nothing')


def test_pool_default_size_follows_stdlib_under_taskset():
    _need_taskset()
    got = _sizes(['taskset', '-c', '0'], WITH_STDLIB='1')
    # The stdlib of this very Python is the reference, for Pool, ThreadPool and cpu_count().
    assert got['cpool_pool'] == got['mp_pool']
    assert got['cpool_threadpool'] == got['mp_threadpool']
    assert got['cpu_count'] == got['mp_cpu_count'] == os.cpu_count()
    expected = 1 if sys.version_info >= (3, 13) else os.cpu_count()
    assert got['cpool_pool'] == expected
    assert got['usable'] == 1


def test_pool_usable_opt_in_under_taskset():
    _need_taskset()
    got = _sizes(['taskset', '-c', '0'], CPOOL_POOL_PROCESSES='usable')
    assert got['cpool_pool'] == got['cpool_threadpool'] == 1  # on every Python version
    assert got['cpu_count'] == os.cpu_count()  # cpu_count() itself keeps the stdlib's meaning


def test_pool_size_env_rejects_unknown_value():
    full = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), CPOOL_POOL_PROCESSES='all')
    r = subprocess.run([sys.executable, '-c', 'import cpool; cpool.Pool()'],
                       capture_output=True, text=True, timeout=60, env=full)
    assert r.returncode != 0 and 'CPOOL_POOL_PROCESSES' in r.stderr


def _make_cgroup(version, settings):
    """A real child cgroup with a CPU quota, where this machine lets us make one (root, a
    writable hierarchy with the cpu controller); None where it does not."""
    from cpool import _cpus
    for v, mount, root in _cpus._cgroup_mounts():
        if v != version:
            continue
        d = os.path.join(mount, 'cpool-test-%d' % os.getpid())
        try:
            os.mkdir(d)
        except OSError:
            continue
        try:
            for name, value in settings:
                with open(os.path.join(d, name), 'w') as f:
                    f.write(value)
        except OSError:
            os.rmdir(d)  # e.g. v2 without the cpu controller enabled for children
            continue
        return d
    return None


@pytest.mark.parametrize('version', [1, 2])
def test_usable_cpu_count_real_cgroup_quota(version):
    if os.cpu_count() < 2:
        pytest.skip('one CPU: a 1-CPU quota would prove nothing')
    settings = ([('cpu.cfs_period_us', '100000'), ('cpu.cfs_quota_us', '50000')]
                if version == 1 else [('cpu.max', '50000 100000')])
    d = _make_cgroup(version, settings)
    if d is None:
        pytest.skip('cannot create a cgroup v%d with a CPU quota here (needs root and a '
                    'writable %s hierarchy with the cpu controller)'
                    % (version, 'v1 cpu' if version == 1 else 'v2'))
    try:
        # The child moves itself into the group before Python starts, then reports.
        code = ('import cpool, json; print(json.dumps([cpool.usable_cpu_count(), '
                'len(cpool.Pool()._pool)]))')
        sh = 'echo $$ > %s/cgroup.procs && exec "$0" -c "$1"' % d
        full = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path),
                    CPOOL_POOL_PROCESSES='usable')
        r = subprocess.run(['sh', '-c', sh, sys.executable, code], capture_output=True,
                           text=True, timeout=60, env=full)
        assert r.returncode == 0, r.stderr
        import json
        assert json.loads(r.stdout) == [1, 1]
    finally:
        os.rmdir(d)


def _fake_cgroups(tmp_path, monkeypatch, mountinfo, cgroup, files):
    from cpool import _cpus
    (tmp_path / 'mountinfo').write_text(mountinfo.replace('ROOT', str(tmp_path)))
    (tmp_path / 'cgroup').write_text(cgroup)
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.setattr(_cpus, '_PROC_SELF_MOUNTINFO', str(tmp_path / 'mountinfo'))
    monkeypatch.setattr(_cpus, '_PROC_SELF_CGROUP', str(tmp_path / 'cgroup'))
    return _cpus


_V2_MOUNT = '41 31 0:38 / ROOT/v2 rw,relatime - cgroup2 cgroup2 rw\n'
_V1_MOUNT = '32 31 0:29 / ROOT/cpu rw,relatime - cgroup cgroup rw,cpu,cpuacct\n'


@pytest.mark.parametrize('files,expected', [
    ({'v2/job/step/cpu.max': '150000 100000\n'}, 2),            # 1.5 CPUs round up, as loky
    ({'v2/job/cpu.max': '100000 100000', 'v2/job/step/cpu.max': 'max 100000'}, 1),  # parent's
    ({'v2/job/step/cpu.max': 'max 100000'}, None),              # no quota
    ({}, None),                                                  # no cpu controller files
])
def test_cgroup_v2_quota_parsing(tmp_path, monkeypatch, files, expected):
    cp = _fake_cgroups(tmp_path, monkeypatch, _V2_MOUNT, '0::/job/step\n', files)
    assert cp._cgroup_count() == expected


@pytest.mark.parametrize('quota,period,expected', [
    ('250000', '100000', 3), ('-1', '100000', None), ('50000', '100000', 1)])
def test_cgroup_v1_quota_parsing(tmp_path, monkeypatch, quota, period, expected):
    cp = _fake_cgroups(tmp_path, monkeypatch, _V1_MOUNT, '3:cpu,cpuacct:/slurm/job_7\n',
                       {'cpu/slurm/job_7/cpu.cfs_quota_us': quota,
                        'cpu/slurm/job_7/cpu.cfs_period_us': period})
    assert cp._cgroup_count() == expected


def test_usable_cpu_count_takes_the_smallest(tmp_path, monkeypatch):
    cp = _fake_cgroups(tmp_path, monkeypatch, _V2_MOUNT, '0::/\n',
                       {'v2/cpu.max': '100000 100000'})
    assert cp.usable_cpu_count() == 1
    monkeypatch.setattr(cp, '_cgroup_count', lambda: None)
    assert cp.usable_cpu_count() == min(os.cpu_count(), len(os.sched_getaffinity(0)))


# ---- each Python's defaults (3.14: forkserver start method on Linux, pickle protocol 5) ----

def test_default_start_method_is_the_running_pythons(mpmod):
    import cpool
    import multiprocessing
    fresh = subprocess.run(
        [sys.executable, '-c', 'import %s as m; print(m.get_start_method())' % mpmod.__name__],
        capture_output=True, text=True, timeout=60,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert fresh.returncode == 0, fresh.stderr
    assert fresh.stdout.strip() == ('forkserver' if sys.version_info >= (3, 14) else 'fork')
    assert cpool.get_all_start_methods()[0] == multiprocessing.get_all_start_methods()[0]


def test_forking_pickler_protocol_is_the_running_pythons(mpmod):
    from importlib import import_module
    data = bytes(import_module(mpmod.__name__ + '.reduction').ForkingPickler.dumps([1, 'a']))
    import pickle
    assert data[:2] == b'\x80' + bytes([pickle.DEFAULT_PROTOCOL])


def test_suite_default_start_mode():
    # Under CPOOL_TEST_DEFAULT_START both libraries default to it for every test (conftest).
    import cpool
    import multiprocessing
    want = os.environ.get('CPOOL_TEST_DEFAULT_START')
    if not want:
        pytest.skip('CPOOL_TEST_DEFAULT_START is not set')
    assert cpool.get_start_method() == multiprocessing.get_start_method() == want
    p = cpool.Process(target=_square, args=(2,))
    p.start()
    p.join(30)
    assert p.exitcode == 0 and p._popen.method == want


def test_forkserver_usable_after_bare_os_fork():
    # With forkserver the default (3.14), a library that os.fork()s after the parent started the
    # server used to fail: the inherited server is not the child's to wait for.
    import cpool
    ctx = cpool.get_context('forkserver')
    p = ctx.Process(target=_square, args=(1,))
    p.start()
    p.join(30)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.close(r)
            q = ctx.Process(target=_square, args=(2,))
            q.start()
            q.join(30)
            code = 0 if q.exitcode == 0 else 2
        finally:
            os.write(w, bytes([code]))
            os._exit(code)
    os.close(w)
    got = os.read(r, 1)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    assert got == b'\x00' and os.waitstatus_to_exitcode(status) == 0
