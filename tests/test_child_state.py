"""What a started child finds (stdin and fds 0-2, signals, names, threads, its main module and
argv), each program run in a fresh interpreter on the standard library and on cpool under the
`multiprocessing` alias, the outputs compared."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import START_METHODS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIAS_DIR = os.path.join(ROOT, 'tests', 'cpython_suite', 'alias')

# Every program starts with this: under target cpool the alias must have taken effect.
CHECK_ALIAS = """
    import multiprocessing, os
    assert multiprocessing.__name__ == os.environ['CPOOL_SUITE_TARGET'].replace(
        'stdlib', 'multiprocessing'), multiprocessing.__name__
"""


def run_script(tmp_path, source, target, args=(), stdin=b'', timeout=90):
    """Runs source as a script file (its children import it as their main module) with the
    given argv and stdin; returns its stdout. target 'cpool' makes every `import
    multiprocessing[.X]` give cpool's module, in the children and the forkserver too."""
    script = tmp_path / ('prog_%s.py' % target)
    script.write_text(textwrap.dedent(CHECK_ALIAS) + textwrap.dedent(source))
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([ALIAS_DIR, ROOT, env.get('PYTHONPATH', '')])
    env['CPOOL_SUITE_TARGET'] = target
    proc = subprocess.run([sys.executable, str(script)] + list(args), input=stdin, env=env,
                          capture_output=True, timeout=timeout, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


# The child describes itself relative to its parent: where fds 0-2 point, the sys.std* objects,
# every signal's disposition and the blocked mask, the names logging and threading report, its
# process group and session, its Process object and its parent's.
STATE_PROBE = r"""
    import json, logging, signal, sys, threading
    import multiprocessing as mp

    def fd_target(fd, parent_links):
        try:
            link = os.readlink('/proc/self/fd/%d' % fd)
        except OSError:
            return 'closed'
        if link == os.devnull:
            return 'devnull'
        for n, parent_link in parent_links.items():
            if link == parent_link:
                return 'parent-fd%s' % n
        return 'other'

    def stream(f, parent_links):
        if f is None:
            return None
        d = {'type': type(f).__name__, 'closed': f.closed}
        if not f.closed:
            raw = getattr(getattr(f, 'buffer', None), 'raw', None)
            d.update(fileno=fd_target(f.fileno(), parent_links), mode=f.mode,
                     encoding=f.encoding, closefd=getattr(raw, 'closefd', None))
        return d

    def handler_name(h):
        if h in (signal.SIG_DFL, signal.SIG_IGN):
            return signal.Handlers(h).name
        return None if h is None else h.__qualname__

    def observe(parent):
        links = parent['links']
        record = logging.LogRecord('x', logging.INFO, __file__, 1, 'm', None, None)
        me = mp.current_process()
        pp = mp.parent_process()
        state = {
            'fds': [fd_target(n, links) for n in range(3)],
            'stdin': stream(sys.stdin, links),
            'stdout': stream(sys.stdout, links),
            'stderr': stream(sys.stderr, links),
            '__stdin__': stream(sys.__stdin__, links),
            'std_is_dunder': [sys.stdin is sys.__stdin__, sys.stdout is sys.__stdout__,
                              sys.stderr is sys.__stderr__],
            'signals': {signal.Signals(s).name: handler_name(signal.getsignal(s))
                        for s in sorted(signal.valid_signals()) if s < signal.SIGRTMIN},
            'blocked': sorted(signal.Signals(s).name
                              for s in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                              if s < signal.SIGRTMIN),
            'processName': record.processName,
            'thread': threading.current_thread().name,
            'main_thread': threading.main_thread().name,
            'is_main_thread': threading.current_thread() is threading.main_thread(),
            'active_count': threading.active_count(),
            'threads': sorted(t.name for t in threading.enumerate()),
            'same_pgrp': os.getpgrp() == parent['pgrp'],
            'same_sid': os.getsid(0) == parent['sid'],
            'name': me.name,
            'type': type(me).__name__,
            'ident_is_pid': me.ident == os.getpid() == me.pid,
            'daemon': me.daemon,
            'authkey_is_parents': bytes(me.authkey) == parent['authkey'],
            'parent': None if pp is None else [pp.name, pp.pid == parent['pid'],
                                               pp.is_alive()],
            'argv': sys.argv[1:],
        }
        print(json.dumps(state, sort_keys=True), flush=True)

    def on_signal(*args):
        pass

    def start_one(ctx, parent, daemon):
        p = ctx.Process(target=observe, args=(parent,), daemon=daemon)
        p.start()
        p.join()
        print(json.dumps({'exitcode': p.exitcode}), flush=True)

    if __name__ == '__main__':
        method, sigint = sys.argv[1:3]
        # A program's own signal settings: caught, ignored, blocked; Ctrl-C ignored as a
        # non-interactive shell leaves it for a background job.
        signal.signal(signal.SIGUSR1, on_signal)
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGUSR2, signal.SIG_IGN)
        if sigint == 'ignored':
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGURG})
        ctx = mp.get_context(method)
        parent = {'links': {n: os.readlink('/proc/self/fd/%d' % n) for n in range(3)},
                  'pgrp': os.getpgrp(), 'sid': os.getsid(0), 'pid': os.getpid(),
                  'authkey': bytes(mp.current_process().authkey)}
        start_one(ctx, parent, False)
        # Started from another thread, as a Pool's handler thread starts replacement workers.
        t = threading.Thread(target=start_one, args=(ctx, parent, True), name='starter')
        t.start()
        t.join()
"""


def _states(out):
    return [json.loads(line) for line in out.splitlines()]


@pytest.mark.timeout(240)
@pytest.mark.parametrize('sigint', ['default', 'ignored'])
@pytest.mark.parametrize('method', START_METHODS)
def test_child_state_matches_stdlib(tmp_path, method, sigint):
    args = (method, sigint, 'extra-arg')
    want = _states(run_script(tmp_path, STATE_PROBE, 'stdlib', args, stdin=b'parent input\n'))
    got = _states(run_script(tmp_path, STATE_PROBE, 'cpool', args, stdin=b'parent input\n'))
    assert len(want) == 4 and want[1] == want[3] == {'exitcode': 0}
    for w, g in zip(want, got):
        assert g == w, {k: (w.get(k), g.get(k)) for k in set(w) | set(g) if w.get(k) != g.get(k)}
    # What the comparison is about, so that both getting it wrong the same way cannot pass:
    # fd 0 stays the parent's, only the sys.stdin object is replaced.
    assert want[0]['fds'][0] == 'parent-fd0'
    assert want[0]['stdin']['fileno'] == 'devnull' and want[0]['__stdin__']['closed']


# A reader child that reopens the parent's stdin by descriptor, as a tool reading '-' does.
PIPELINE = r"""
    import sys
    import multiprocessing as mp

    def reader(fd, out_q):
        with os.fdopen(os.dup(fd), 'r') as f:
            out_q.put(f.read().upper())

    if __name__ == '__main__':
        ctx = mp.get_context(sys.argv[1])
        q = ctx.SimpleQueue()
        p = ctx.Process(target=reader, args=(sys.stdin.fileno(), q))
        p.start()
        text = q.get()
        p.join()
        sys.stdout.write(text)
        print('exitcode', p.exitcode, 'sys.stdin still readable:', repr(sys.stdin.read()))
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize('method', START_METHODS)
def test_child_reads_parents_stdin_through_its_fd(tmp_path, method):
    data = b''.join(b'@read%d\nACGT\n+\nIIII\n' % i for i in range(2000))
    want = run_script(tmp_path, PIPELINE, 'stdlib', [method], stdin=data)
    got = run_script(tmp_path, PIPELINE, 'cpool', [method], stdin=data)
    assert got == want
    # The child got everything: the parent, reading after it, finds the pipe drained.
    assert want == data.decode().upper() + "exitcode 0 sys.stdin still readable: ''\n"


# A script whose top level needs its command-line arguments (the forkserver must not import it
# where sys.argv is not the parent's), with the top-level runs counted per process kind.
ARGV_SCRIPT = r"""
    import sys
    N = int(sys.argv[1])
    import multiprocessing as mp

    def scaled(x):
        return x * N

    def put_scaled(q, x):
        q.put(scaled(x))

    if __name__ == '__main__':
        ctx = mp.get_context('forkserver')
        if sys.argv[2:] == ['preload-main']:
            ctx.set_forkserver_preload(['__main__'])
        with ctx.Pool(2) as pool:
            print(pool.map(scaled, range(6)))
        q = ctx.SimpleQueue()
        p = ctx.Process(target=put_scaled, args=(q, 7))
        p.start()
        print(q.get())
        p.join()
        print('exitcode', p.exitcode)
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize('preload', [[], ['preload-main']], ids=['default', 'preload-main'])
def test_forkserver_script_reads_argv_at_top_level(tmp_path, preload):
    args = ['3'] + preload
    want = run_script(tmp_path, ARGV_SCRIPT, 'stdlib', args)
    assert want == '[0, 3, 6, 9, 12, 15]\n21\nexitcode 0\n'
    assert run_script(tmp_path, ARGV_SCRIPT, 'cpool', args) == want
