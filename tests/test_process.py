"""Process and the module-level API, run the same way on multiprocessing and cpool under every
start method; plus what goes wrong: signals, killed children, bad input, leaks."""
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from conftest import open_fds, zombies


def _exit_with(code):
    sys.exit(code)


def _raise():
    raise ValueError('boom in child')


def _sleep(t):
    time.sleep(t)


def _noop():
    pass


def _report(path, modname, *args, **kwargs):
    # Written to a file so the test needs no Queue/Pipe from the library under test.
    import importlib
    import pickle
    mod = importlib.import_module(modname)
    info = (args, kwargs, mod.current_process().name,
            mod.parent_process().pid if mod.parent_process() else None, os.getppid())
    with open(path, 'wb') as f:
        pickle.dump(info, f)


class Subclassed:
    pass


def _outcome(ctx, target, args=()):
    p = ctx.Process(target=target, args=args)
    p.start()
    p.join()
    return p.exitcode


@pytest.mark.parametrize('target,args,expected', [
    (_noop, (), 0),
    (_exit_with, (0,), 0),
    (_exit_with, (3,), 3),
    (_exit_with, (None,), 0),
    (_exit_with, ('message',), 1),
    (_raise, (), 1),
])
def test_exit_codes_match(ctx, target, args, expected):
    assert _outcome(ctx, target, args) == expected


def test_killed_by_signal_gives_minus_signum(ctx):
    p = ctx.Process(target=_sleep, args=(30,))
    p.start()
    assert p.is_alive()
    p.terminate()
    p.join(10)
    assert p.exitcode == -signal.SIGTERM
    p = ctx.Process(target=_sleep, args=(30,))
    p.start()
    p.kill()
    p.join(10)
    assert p.exitcode == -signal.SIGKILL
    assert not p.is_alive()


def test_args_kwargs_names_and_parent(ctx, mpmod, tmp_path):
    out = str(tmp_path / 'report')
    p = ctx.Process(target=_report, args=(out, mpmod.__name__, 1, 'two'), kwargs={'k': [3]},
                    name='worker-x')
    assert p.name == 'worker-x'
    p.start()
    p.join()
    import pickle
    with open(out, 'rb') as f:
        args, kwargs, name, parent_pid, ppid = pickle.load(f)
    assert (args, kwargs, name) == ((1, 'two'), {'k': [3]}, 'worker-x')
    assert parent_pid == os.getpid()
    assert p.exitcode == 0


def test_repr_and_attributes(ctx):
    p = ctx.Process(target=_sleep, args=(30,), daemon=True)
    assert 'initial' in repr(p) and p.pid is None and p.exitcode is None and p.daemon
    with pytest.raises(ValueError):
        p.sentinel
    p.start()
    assert 'started' in repr(p) and isinstance(p.pid, int) and p.ident == p.pid
    assert isinstance(p.sentinel, int)
    assert p in ctx.active_children() if hasattr(ctx, 'active_children') else True
    p.kill()
    p.join()
    assert 'stopped' in repr(p) and 'SIGKILL' in repr(p)
    p.close()
    assert 'closed' in repr(p)


def test_bad_use_raises_as_stdlib(ctx):
    p = ctx.Process(target=_noop)
    with pytest.raises(AssertionError):
        p.join()  # before start
    p.start()
    with pytest.raises(AssertionError):
        p.start()  # twice
    p.join()
    p.close()
    for use in (p.start, p.join, p.is_alive, p.terminate, p.kill, lambda: p.exitcode,
                lambda: p.pid, lambda: p.sentinel):
        with pytest.raises(ValueError):
            use()
    q = ctx.Process(target=_sleep, args=(30,))
    q.start()
    with pytest.raises(ValueError):
        q.close()  # still running
    q.kill()
    q.join()


def test_non_callable_target_fails_in_child(ctx):
    p = ctx.Process(target=42)
    p.start()
    p.join()
    assert p.exitcode == 1


def _start_error(mod, target):
    p = mod.get_context('spawn').Process(target=target)
    with pytest.raises(Exception) as exc:
        p.start()
    return type(exc.value), str(exc.value)


def test_unpicklable_target_under_spawn_raises_as_stdlib():
    import multiprocessing
    import cpool
    target = lambda: None  # noqa: E731  (a local lambda cannot be pickled)
    assert _start_error(cpool, target) == _start_error(multiprocessing, target)
    # nothing was left behind by the failed start
    assert cpool.active_children() == []


def test_module_api_present(mpmod):
    for name in ['Process', 'current_process', 'parent_process', 'active_children', 'cpu_count',
                 'freeze_support', 'get_context', 'set_start_method', 'get_start_method',
                 'get_all_start_methods', 'ProcessError', 'BufferTooShort', 'TimeoutError',
                 'AuthenticationError', 'get_logger', 'log_to_stderr']:
        assert hasattr(mpmod, name), name
    assert mpmod.current_process().name == 'MainProcess'
    assert mpmod.parent_process() is None
    assert mpmod.cpu_count() == os.cpu_count()
    assert sorted(mpmod.get_all_start_methods()) == ['fork', 'forkserver', 'spawn']
    if not os.environ.get('CPOOL_TEST_DEFAULT_START'):  # that mode sets another default
        assert mpmod.get_all_start_methods()[0] == mpmod.get_context().get_start_method()


def test_default_start_method_is_stdlibs():
    import multiprocessing
    import cpool
    assert (cpool.get_context().get_start_method()
            == multiprocessing.get_context().get_start_method())


def test_contexts():
    import cpool
    for m in ('fork', 'spawn', 'forkserver'):
        c = cpool.get_context(m)
        assert c.get_start_method() == m
        assert c.Process._start_method == m
    with pytest.raises(ValueError):
        cpool.get_context('nope')
    with pytest.raises(ValueError):
        cpool.get_context('fork').set_start_method('spawn')


_SCRIPT_PRELUDE = 'import sys; sys.path.insert(0, %r)\n' % os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))


def _run_script(body, timeout=60, **kw):
    return subprocess.run([sys.executable, '-c', _SCRIPT_PRELUDE + textwrap.dedent(body)],
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.parametrize('method', ['fork', 'spawn', 'forkserver'])
def test_main_module_rule_and_exit_joins(tmp_path, method):
    # A script started as a program: under spawn/forkserver its __main__ is re-imported as
    # __mp_main__ in the child (the `if __name__ == '__main__'` rule); at exit, non-daemonic
    # children are joined and daemonic ones terminated.
    script = tmp_path / 'prog.py'
    script.write_text(_SCRIPT_PRELUDE + textwrap.dedent('''
        import os, time, cpool
        print('import', __name__, flush=True)
        def work(path):
            time.sleep(0.3)
            open(path, 'w').write('done')
        if __name__ == '__main__':
            cpool.set_start_method(%r)
            cpool.Process(target=work, args=(%r,)).start()
            d = cpool.Process(target=time.sleep, args=(60,), daemon=True)
            d.start()
            print('daemon', d.pid, flush=True)
    ''' % (method, str(tmp_path / 'out'))))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / 'out').read_text() == 'done'
    lines = r.stdout.splitlines()
    assert lines[0] == 'import __main__'
    if method != 'fork':
        assert 'import __mp_main__' in lines
    daemon_pid = int([l for l in lines if l.startswith('daemon')][0].split()[1])
    time.sleep(0.1)
    with pytest.raises(ProcessLookupError):
        os.kill(daemon_pid, 0)


def test_no_output_printed_twice():
    r = _run_script('''
        import cpool
        print('once', end='')   # buffered when stdout is a pipe
        p = cpool.get_context('fork').Process(target=print, args=('child',))
        p.start(); p.join()
    ''')
    assert r.stdout.count('once') == 1 and 'child' in r.stdout


@pytest.mark.skipif(sys.version_info < (3, 12), reason='the warning exists from 3.12 on')
def test_fork_with_threads_warns_like_os_fork():
    r = _run_script('''
        import threading, time, warnings, cpool
        warnings.simplefilter('always')
        t = threading.Thread(target=time.sleep, args=(2,)); t.start()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter('always')
            p = cpool.get_context('fork').Process(target=int); p.start(); p.join()
        print([(x.category.__name__, str(x.message)) for x in w])
    ''')
    assert "DeprecationWarning" in r.stdout and 'is multi-threaded, use of fork()' in r.stdout, \
        r.stdout + r.stderr


def _sigint_after(delay):
    threading.Timer(delay, os.kill, (os.getpid(), signal.SIGINT)).start()


@pytest.mark.timeout(30)
def test_sigint_interrupts_join(cctx):
    p = cctx.Process(target=_sleep, args=(30,))
    p.start()
    try:
        _sigint_after(0.3)
        t = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            p.join()
        assert time.monotonic() - t < 0.3 + 0.5
    finally:
        p.kill()
        p.join()


def test_join_timeout(ctx):
    p = ctx.Process(target=_sleep, args=(30,))
    p.start()
    t = time.monotonic()
    p.join(0.2)
    assert 0.15 < time.monotonic() - t < 5
    assert p.exitcode is None and p.is_alive()
    p.kill()
    p.join()


def test_sentinel_usable_with_poll(ctx):
    import select
    p = ctx.Process(target=_sleep, args=(0.2,))
    p.start()
    poller = select.poll()
    poller.register(p.sentinel, select.POLLIN)
    assert poller.poll(5000)
    p.join()
    assert p.exitcode == 0


@pytest.mark.timeout(120)
def test_many_start_join_cycles_leak_nothing(cctx, start_method):
    n = 1000 if start_method == 'fork' else 40
    for _ in range(3):  # warm up: the forkserver, lazily imported modules
        p = cctx.Process(target=_noop)
        p.start(); p.join(); p.close()
    before = open_fds()
    for _ in range(n):
        p = cctx.Process(target=_noop)
        p.start()
        p.join()
        assert p.exitcode == 0
    del p
    import gc
    gc.collect()
    assert open_fds() - before == set()
    assert zombies() == []


def test_independent_of_stdlib_multiprocessing():
    r = _run_script('''
        import sys
        sys.modules['multiprocessing'] = None
        import cpool, cpool.process, cpool.context, cpool.spawn, cpool.forkserver, cpool.util
        import cpool.reduction, cpool.popen_fork, cpool.popen_spawn_posix, cpool.popen_forkserver
        p = cpool.get_context('spawn').Process(target=print, args=('ok',)); p.start(); p.join()
        print(p.exitcode)
    ''')
    assert r.returncode == 0 and r.stdout.split() == ['ok', '0'], r.stderr


def test_exceptions_are_processerrors():
    import cpool
    for name in ('BufferTooShort', 'TimeoutError', 'AuthenticationError', 'WorkerLostError'):
        assert issubclass(getattr(cpool, name), cpool.ProcessError)
    import pickle
    e = pickle.loads(pickle.dumps(cpool.TimeoutError('late')))
    assert type(e) is cpool.TimeoutError and e.args == ('late',)


def test_authkey_not_picklable_outside_spawning():
    import pickle
    import cpool
    with pytest.raises(TypeError):
        pickle.dumps(cpool.current_process().authkey)


def _child_life(path, modname, parent_pid):
    # What a child sees and leaves behind; each fact goes to the file as it is known, and the
    # last lines are written by a finalizer and a thread that must run before the child exits.
    import importlib
    mod = importlib.import_module(modname)
    util = importlib.import_module(modname + '.util')
    out = open(path, 'a')

    def say(*fact):
        out.write(repr(fact) + '\n')
        out.flush()
    say('stdin', sys.stdin.read(), os.read(0, 10))
    me = mod.current_process()
    say('me', me.name, me.pid == os.getpid(), mod.parent_process().pid == parent_pid)
    say('children', mod.active_children())
    grandchild = mod.Process(target=_noop)
    grandchild.start()
    grandchild.join()
    say('grandchild', grandchild.name.split('-')[1].split(':')[-1], grandchild.exitcode,
        grandchild.name.count(':') == len(me._identity))
    util.Finalize(None, say, args=('finalizer',), exitpriority=1)

    def late():
        time.sleep(0.2)
        say('thread')
    threading.Thread(target=late).start()


def test_child_life_matches_stdlib(ctx, mpmod, tmp_path):
    # The bootstrap of a child: stdin is /dev/null, it is the current process and its parent is
    # ours, it has no children of ours, its own children are numbered from 1 again; at exit its
    # finalizers run and its non-daemon threads are joined (in the stdlib's order).
    path = str(tmp_path / 'life')
    p = ctx.Process(target=_child_life, args=(path, mpmod.__name__, os.getpid()), name='life')
    p.start()
    p.join(30)
    with open(path) as f:
        facts = [eval(line) for line in f]
    # 3.13 moved the finalizers to atexit, which runs after the threads are joined.
    last = [('thread',), ('finalizer',)] if sys.version_info >= (3, 13) else \
        [('finalizer',), ('thread',)]
    assert facts == [('stdin', '', b''), ('me', 'life', True, True), ('children', []),
                     ('grandchild', '1', 0, True)] + last
    assert p.exitcode == 0


def _make_subclass(base):
    class Child(base):
        def run(self):
            sys.exit(7 if self._target is None else 8)
    return Child


@pytest.mark.parametrize('how,expected', [('falsy_target', 0), ('subclass_run', 7),
                                          ('keyboard_interrupt', 1)])
def test_run_variants_exit_codes(ctx, how, expected):
    if how == 'falsy_target':
        p = ctx.Process(target=None)
    elif how == 'subclass_run':
        if ctx.get_start_method() != 'fork':
            pytest.skip('a local subclass cannot be pickled for spawn/forkserver')
        p = _make_subclass(ctx.Process)()
    else:
        p = ctx.Process(target=_raise_keyboard_interrupt)
    p.start()
    p.join(30)
    assert p.exitcode == expected


def _raise_keyboard_interrupt():
    raise KeyboardInterrupt


def _report_native_id(path):
    with open(path, 'w') as f:
        f.write('%d %d' % (threading.main_thread().native_id, threading.get_native_id()))


def test_child_main_thread_native_id_is_its_own(ctx, tmp_path):
    path = str(tmp_path / 'tid')
    p = ctx.Process(target=_report_native_id, args=(path,))
    p.start()
    p.join(30)
    with open(path) as f:
        main_id, own_id = map(int, f.read().split())
    assert main_id == own_id == p.pid


def test_config_is_a_copy_of_the_parents(mpmod):
    # Process objects start from the creating process's config (authkey, ...), and writes on
    # either side do not reach the other (cpool shares the dict until a write replaces it).
    me = mpmod.current_process()
    old_key = me.authkey
    p = mpmod.Process(target=_noop)
    q = mpmod.Process(target=_noop, daemon=True)
    try:
        assert p.authkey == old_key and q.daemon and not p.daemon and not me.daemon
        me.authkey = b'changed'
        assert p.authkey == old_key and me.authkey == b'changed'
        p.authkey = b'mine'
        assert me.authkey == b'changed' and q.authkey == old_key
    finally:
        me.authkey = old_key


def _register_atexit(path):
    import atexit

    def note():
        with open(path, 'a') as f:
            f.write('child\n')
    atexit.register(note)


def test_atexit_in_child_as_stdlib(ctx, tmp_path):
    # A callback the parent registered never runs in a child; one the child registered runs at
    # its exit from 3.13 on (and never before, the child leaving with os._exit) -- except under
    # spawn, where the child is a whole interpreter that exits normally.
    import atexit
    path = str(tmp_path / 'atexit')
    parent_note = lambda: open(path, 'a').write('parent\n')  # noqa: E731
    atexit.register(parent_note)
    try:
        p = ctx.Process(target=_register_atexit, args=(path,))
        p.start()
        p.join(30)
    finally:
        atexit.unregister(parent_note)
    try:
        with open(path) as f:
            lines = f.read().split()
    except FileNotFoundError:
        lines = []
    ran = sys.version_info >= (3, 13) or ctx.get_start_method() == 'spawn'
    assert lines == (['child'] if ran else [])
    assert p.exitcode == 0
