"""Tests of cpool.shared_memory and SharedMemoryManager: differential with the standard library,
attach across start methods and with stdlib processes, cleanup after kills, no leaks."""
import importlib
import multiprocessing
import multiprocessing.shared_memory as std_sm
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from cpool import shared_memory as sm
from conftest import START_METHODS, open_fds

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shm_module(mpmod):
    return importlib.import_module(mpmod.__name__ + '.shared_memory')


def exists(name):
    return os.path.exists('/dev/shm/' + name.lstrip('/'))


def wait_gone(names, polls=600):
    """True once none of names is in /dev/shm (a watcher unlinks just after its program ends)."""
    for _ in range(polls):
        if not any(exists(n) for n in names):
            return True
        time.sleep(0.05)
    return False


def std_attach(name):
    """Attach with the standard library without registering the segment with its tracker (it
    is not the creator, and would otherwise unlink or warn about it at exit)."""
    if sys.version_info >= (3, 13):
        return std_sm.SharedMemory(name, track=False)
    from multiprocessing import resource_tracker
    s = std_sm.SharedMemory(name)
    resource_tracker.unregister(s._name, 'shared_memory')
    return s


def program(tmp_path, code):
    """code written to a script (spawn children re-import the main module from its file)."""
    script = tmp_path / 'prog.py'
    script.write_text(textwrap.dedent(code))
    return [sys.executable, str(script)], dict(os.environ, PYTHONPATH=REPO)


def run_program(tmp_path, code, *args):
    """Run code as a program with cpool importable; (stdout words, stderr, returncode)."""
    cmd, env = program(tmp_path, code)
    proc = subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=90, env=env)
    return proc.stdout.split(), proc.stderr, proc.returncode


# ---- differential: every method of SharedMemory, as the standard library answers ----

def _outcome(fn):
    try:
        return ('ok', fn())
    except Exception as e:
        return ('raise', type(e).__name__)


def _shared_memory_transcript(smod):
    out = []
    a = smod.SharedMemory(create=True, size=100)
    n = a.name
    out.append(('new', a.size, len(a.buf), n.startswith('psm_'), len(n), a._name == '/' + n))
    out.append(('repr', repr(a).replace(n, 'NAME')))
    a.buf[:5] = b'hello'
    b = smod.SharedMemory(n)
    out.append(('attach', bytes(b.buf[:5]), b.size, b.name == n))
    c = smod.SharedMemory(n, size=10 ** 6)
    out.append(('attach ignores size', c.size))
    c.close()
    for proto in range(pickle.HIGHEST_PROTOCOL + 1):
        d = pickle.loads(pickle.dumps(a, proto))
        out.append(('pickle', type(d).__name__, d.name == n, bytes(d.buf[:5])))
        d.close()
    b.buf[0] = ord('J')
    out.append(('shared', bytes(a.buf[:5])))
    for kw in (dict(create=True, size=-1), dict(create=True, size=0), dict(create=True),
               dict(), dict(size=5), dict(name=n, create=True, size=8),
               dict(name='cpt_absent_%d' % os.getpid())):
        out.append(('bad', sorted(kw), _outcome(lambda: smod.SharedMemory(**kw))))
    b.close()
    b.close()
    out.append(('closed', b.buf))
    pickled = pickle.dumps(a)
    a.close()
    a.unlink()
    out.append(('after unlink', _outcome(lambda: smod.SharedMemory(n)),
                _outcome(lambda: pickle.loads(pickled)), _outcome(a.unlink)))
    own = 'cpt_named_%d' % os.getpid()
    e = smod.SharedMemory(own, create=True, size=8)
    f = smod.SharedMemory('/' + own)  # '//name' is the same segment for shm_open
    e.buf[0] = 9
    out.append(('named', e.name, e._name, f.name, f._name, f.buf[0]))
    f.close()
    e.close()
    e.unlink()
    return out


def test_shared_memory_methods_as_stdlib(mpmod):
    assert _shared_memory_transcript(shm_module(mpmod)) == _shared_memory_transcript(std_sm)


def test_attach_both_ways_and_errors():
    a = sm.SharedMemory(create=True, size=16)
    a.buf[:3] = b"abc"
    b = std_attach(a.name)
    assert bytes(b.buf[:3]) == b"abc"
    b.close()
    c = std_sm.SharedMemory(create=True, size=8)
    c.buf[0] = 7
    d = sm.SharedMemory(c.name)
    assert d.buf[0] == 7 and d.size >= 8
    d.close()
    c.close()
    c.unlink()
    with pytest.raises(ValueError):
        sm.SharedMemory(a.name + '\0x')
    a.close()
    a.unlink()
    with pytest.raises(FileNotFoundError):
        sm.SharedMemory(a.name)


def test_attach_or_create_subclass_and_untracked():
    name = 'cpt_optional_%d' % os.getpid()

    class OptionalAttach(sm.SharedMemory):
        _flags = os.O_CREAT | os.O_RDWR
    first = sm.SharedMemory(name, create=True, size=64)
    again = OptionalAttach(name)
    assert again.size == first.size
    again.close()
    first.close()
    first.unlink()
    untracked = sm.SharedMemory(create=True, size=8, track=False)
    try:
        untracked.buf[0] = 1
    finally:
        untracked.close()
        untracked.unlink()


# ---- ShareableList: the standard library's values, formats and bytes ----

_items = st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.floats(allow_nan=False),
                   st.booleans(), st.none(), st.text(max_size=30), st.binary(max_size=30))


def _list_transcript(smod, values, assignments):
    sl = smod.ShareableList(values)
    try:
        # reading may raise as in the standard library (a str of multi-byte characters gets
        # len(str) rounded up bytes, and its UTF-8 is cut there)
        out = [_outcome(lambda: list(sl)), sl.format, len(sl), sl.shm.size, bytes(sl.shm.buf)]
        for position, value in assignments:
            def assign():
                sl[position] = value
                return sl[position]
            out.append((_outcome(assign), sl.format))
        out.append(_outcome(lambda: list(sl)))
        out.append(_outcome(lambda: sl[len(values)]))
        out.append(_outcome(lambda: sl.index(values[0]) if values else sl.index(None)))
        out.append(_outcome(lambda: sl.count(values[0]) if values else sl.count(None)))
        out.append(bytes(sl.shm.buf))
        return out
    finally:
        sl.shm.close()
        sl.shm.unlink()


@settings(max_examples=60, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(values=st.lists(_items, max_size=12),
       assignments=st.lists(st.tuples(st.integers(-12, 11), _items), max_size=6))
def test_shareable_list_as_stdlib(values, assignments):
    assignments = [(p, v) for p, v in assignments if values and -len(values) <= p < len(values)]
    assert _list_transcript(sm, values, assignments) == _list_transcript(std_sm, values,
                                                                         assignments)


@pytest.mark.parametrize('values', [
    [], [0], list(range(1000)), ['x' * 10000, b'y' * 9, 'é' * 4, ''], [True, None, 1.5, -1],
    [2 ** 63 - 1, -(2 ** 63)], ['encodés', b'\x00a'],
], ids=['empty', 'one', 'thousand', 'strs', 'mixed', 'extremes', 'utf8-and-nul'])
def test_shareable_list_sizes_read_across_libraries(values):
    mine = sm.ShareableList(values)
    theirs = std_sm.ShareableList(values)
    try:
        assert bytes(mine.shm.buf) == bytes(theirs.shm.buf)
        other = std_sm.ShareableList.__new__(std_sm.ShareableList)
        other.__init__(name=mine.shm.name)
        assert list(other) == list(mine) and other.format == mine.format
        if values:
            other[0] = values[-1] if not isinstance(values[-1], (str, bytes)) else 7
            assert mine[0] == other[0]
        other.shm.close()
        back = sm.ShareableList(name=theirs.shm.name)
        assert list(back) == list(theirs)
        back.shm.close()
        assert list(pickle.loads(pickle.dumps(mine))) == list(mine)
    finally:
        for sl in (mine, theirs):
            sl.shm.close()
            sl.shm.unlink()
    # the standard library's attach registered it with its tracker; cpool unlinked it above
    from multiprocessing import resource_tracker
    resource_tracker.unregister('/' + mine.shm.name, 'shared_memory')


# ---- attach across start methods, and with standard-library processes ----

def _child_write(modname, name_or_obj, data):
    smod = importlib.import_module(modname + '.shared_memory')
    s = smod.SharedMemory(name_or_obj) if isinstance(name_or_obj, str) else name_or_obj
    s.buf[:len(data)] = data
    s.close()


def test_attach_in_child(ctx, mpmod):
    smod = shm_module(mpmod)
    s = smod.SharedMemory(create=True, size=64)
    try:
        for arg, data in ((s.name, b'by name'), (s, b'pickled')):
            p = ctx.Process(target=_child_write, args=(mpmod.__name__, arg, data))
            p.start()
            p.join()
            assert p.exitcode == 0
            assert bytes(s.buf[:len(data)]) == data
    finally:
        s.close()
        s.unlink()


def _std_child_write(name, data):
    s = std_attach(name)
    s.buf[:len(data)] = data
    s.close()


def test_stdlib_process_attaches_to_cpool_segment_and_back(start_method):
    import cpool
    mine = sm.SharedMemory(create=True, size=32)
    theirs = std_sm.SharedMemory(create=True, size=32)
    try:
        p = multiprocessing.get_context(start_method).Process(
            target=_std_child_write, args=(mine.name, b'from stdlib'))
        p.start()
        p.join()
        q = cpool.get_context(start_method).Process(
            target=_child_write, args=('cpool', theirs.name, b'from cpool'))
        q.start()
        q.join()
        assert (p.exitcode, q.exitcode) == (0, 0)
        assert bytes(mine.buf[:11]) == b'from stdlib'
        assert bytes(theirs.buf[:10]) == b'from cpool'
    finally:
        mine.close()
        mine.unlink()
        theirs.close()
        theirs.unlink()


# ---- SharedMemoryManager ----

def test_shared_memory_manager_as_stdlib(ctx, mpmod):
    managers = importlib.import_module(mpmod.__name__ + '.managers')
    smod = shm_module(mpmod)
    smm = managers.SharedMemoryManager(ctx=ctx)
    with pytest.raises(ValueError):
        smm.SharedMemory(size=9)  # not started
    smm.start()
    lists = [smm.ShareableList(range(i)) for i in range(3)]
    blocks = [smm.SharedMemory(size=j) for j in (16, 100, 4096)]
    assert [list(sl) for sl in lists] == [[], [0], [0, 1]]
    assert [b.size for b in blocks] == [16, 100, 4096]
    again = smod.SharedMemory(blocks[1].name)
    assert again.size == 100
    again.close()
    names = [sl.shm.name for sl in lists] + [b.name for b in blocks]
    smm.shutdown()
    for name in names:
        with pytest.raises(FileNotFoundError):
            smod.SharedMemory(name)
    with managers.SharedMemoryManager(ctx=ctx) as smm2:
        sl = smm2.ShareableList('howdy')
        held = sl.shm.name
        assert ''.join(sl) == 'howdy'
    with pytest.raises(FileNotFoundError):
        smod.ShareableList(name=held)


def test_shared_memory_manager_unlinks_the_rest_after_a_user_unlink(cctx):
    from cpool.managers import SharedMemoryManager
    with SharedMemoryManager(ctx=cctx) as smm:
        blocks = [smm.SharedMemory(size=8) for _ in range(3)]
        # the standard library's shutdown stops at the first name already gone
        blocks[0].close()
        blocks[0].unlink()
        names = [b.name for b in blocks]
    assert not [n for n in names if exists(n)]


# ---- cleanup: never while the program runs, always after it ----

_CHILD_CREATES = '''
    import sys
    import cpool
    from cpool import shared_memory as sm

    def make(q):
        s = sm.SharedMemory(create=True, size=32)
        s.buf[:5] = b'alive'
        q.put(s.name)
        s.close()

    def pool_make(i):
        s = sm.SharedMemory(create=True, size=16)
        s.buf[0] = i
        s.close()
        return s.name

    if __name__ == '__main__':
        ctx = cpool.get_context(sys.argv[1])
        q = ctx.Queue()
        p = ctx.Process(target=make, args=(q,))
        p.start()
        name = q.get()
        p.join()
        with ctx.Pool(2, maxtasksperchild=1) as pool:
            names = pool.map(pool_make, range(6))
        found = 0
        for i, n in enumerate([name] + names):
            s = sm.SharedMemory(n)
            found += bytes(s.buf[:5]) == b'alive' if i == 0 else s.buf[0] == i - 1
            s.close()
        print(found, name, *names)
'''


@pytest.mark.parametrize('method', START_METHODS)
def test_segment_of_exited_child_lives_until_program_ends(method, tmp_path):
    (found, *names), err, rc = run_program(tmp_path, _CHILD_CREATES, method)
    assert rc == 0, err
    # every segment was still there after its creator (a child, pool workers) had exited
    assert int(found) == 7 and len(names) == 7
    assert wait_gone(names), [n for n in names if exists(n)]
    assert 'leaked' not in err


_CREATOR_KILLED = '''
    import os, signal, sys, time
    import cpool
    from cpool import shared_memory as sm

    def reader(name, r, w):
        w.close()
        s = sm.SharedMemory(name)
        print('ready', flush=True)
        try:
            r.recv()
        except EOFError:
            pass  # the creator is dead
        good = sum(bytes(s.buf[:4096]) == bytes(range(256)) * 16 for _ in range(1000))
        again = sm.SharedMemory(name)  # the name is still there
        print('reads', good, bytes(again.buf[:3]) == bytes(range(3)), flush=True)
        again.close()
        s.close()

    if __name__ == '__main__':
        ctx = cpool.get_context(sys.argv[1])
        s = sm.SharedMemory(create=True, size=4096)
        s.buf[:] = bytes(range(256)) * 16
        print(s.name, flush=True)
        r, w = ctx.Pipe(duplex=False)
        p = ctx.Process(target=reader, args=(s.name, r, w))
        p.start()
        r.close()
        time.sleep(600)
'''


@pytest.mark.parametrize('method', START_METHODS)
def test_creator_sigkilled_child_keeps_reading(method, tmp_path):
    cmd, env = program(tmp_path, _CREATOR_KILLED)
    proc = subprocess.Popen(cmd + [method], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        name = proc.stdout.readline().strip()
        assert proc.stdout.readline().strip() == 'ready'
        proc.kill()
        proc.wait()
        out, err = proc.communicate(timeout=90)  # EOF: the child and the watcher are gone
    finally:
        if proc.poll() is None:
            proc.kill()
    assert out.split() == ['reads', '1000', 'True'], err
    assert wait_gone([name])


_MANAGER_KILLED = '''
    import os, signal, sys
    import cpool
    from cpool import shared_memory as sm
    from cpool.managers import SharedMemoryManager

    if __name__ == '__main__':
        smm = SharedMemoryManager(ctx=cpool.get_context(sys.argv[1]))
        smm.start()
        a = smm.SharedMemory(64)
        a.buf[0] = 42
        sl = smm.ShareableList([1, 'two', None])
        os.kill(smm._process.pid, signal.SIGKILL)
        smm._process.join()
        b = sm.SharedMemory(a.name)
        again = sm.ShareableList(name=sl.shm.name)
        ok = b.buf[0] == 42 and list(again) == [1, 'two', None]
        b.close()
        again.shm.close()
        smm.shutdown()  # returns: the server is already gone
        print(ok, smm._process.exitcode, a.name, sl.shm.name)
'''


@pytest.mark.parametrize('method', START_METHODS)
def test_manager_sigkilled_segments_gone_after_program(method, tmp_path):
    (ok, exitcode, *names), err, rc = run_program(tmp_path, _MANAGER_KILLED, method)
    assert rc == 0, err
    assert ok == 'True' and exitcode == str(-signal.SIGKILL)
    assert wait_gone(names), [n for n in names if exists(n)]


def test_tracked_segment_unlinked_after_sigkill_of_creator(tmp_path):
    lines, err, rc = run_program(tmp_path, '''
        import os, signal
        from cpool import shared_memory as sm
        s = sm.SharedMemory(create=True, size=64)
        print(s.name, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    ''')
    assert rc == -signal.SIGKILL and lines[0].startswith('psm_')
    assert wait_gone(lines)


def test_unregistered_segment_survives_program(tmp_path):
    lines, err, rc = run_program(tmp_path, '''
        from cpool import shared_memory as sm, resource_tracker
        s = sm.SharedMemory(create=True, size=64)
        kept = sm.SharedMemory(create=True, size=64, track=False)
        resource_tracker.unregister(s._name, 'shared_memory')
        print(s.name, kept.name)
    ''')
    assert rc == 0, err
    try:
        assert not wait_gone(lines, polls=20)  # the program ended; still there (1 s)
        assert all(exists(n) for n in lines)
    finally:
        for n in lines:
            sm.SharedMemory(n, track=False).unlink()


@pytest.mark.stress
def test_ten_thousand_cycles_leak_nothing():
    before_fds = open_fds()
    before_shm = set(os.listdir('/dev/shm'))
    names = []
    for i in range(10000):
        s = sm.SharedMemory(create=True, size=4096 if i % 2 else 1)
        s.buf[0] = i & 0xff
        names.append(s.name)
        s.close()
        s.unlink()
    for i in range(1000):
        sl = sm.ShareableList([i, 'x' * (i % 50), None])
        names.append(sl.shm.name)
        sl.shm.close()
        sl.shm.unlink()
    assert open_fds() == before_fds
    assert not [n for n in names if exists(n)]
    assert not {n for n in os.listdir('/dev/shm') if n in set(names)} - before_shm
