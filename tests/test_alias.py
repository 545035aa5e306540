"""Whole programs run with cpool standing in for multiprocessing (`sys.modules` alias), in a fresh
interpreter each, and compared with the same program on the standard library."""
import os
import subprocess
import sys
import tempfile
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALIAS_DIR = os.path.join(ROOT, 'tests', 'cpython_suite', 'alias')


def run_program(source, target, timeout=90):
    """Runs source in a fresh interpreter; with target='cpool' every `multiprocessing[.X]` import
    gives cpool's module (the CPython suite runner's sitecustomize alias)."""
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join([ALIAS_DIR, ROOT, env.get('PYTHONPATH', '')])
    env['CPOOL_SUITE_TARGET'] = target
    # From a file, so that spawn and forkserver children can import the main module.
    with tempfile.TemporaryDirectory() as tmp:
        script = os.path.join(tmp, 'program.py')
        with open(script, 'w') as f:
            f.write(textwrap.dedent(source))
        proc = subprocess.run([sys.executable, script], env=env, cwd=tmp,
                              capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr
    # The program's first line says which module it got: the alias must have taken effect.
    assert proc.stderr.split()[0] == ('cpool' if target == 'cpool' else 'stdlib'), proc.stderr
    return proc.stdout


WHICH = """
    import multiprocessing, sys
    print('cpool' if multiprocessing.__name__ == 'cpool' else 'stdlib', file=sys.stderr)
"""


@pytest.mark.timeout(120)
def test_small_program_under_alias():
    src = WHICH + """
    import multiprocessing as mp
    from multiprocessing import queues, util, process
    def sq(x):
        return x * x
    if __name__ == '__main__':
        with mp.Pool(2) as pool:
            print(pool.map(sq, range(10)))
        q = mp.Queue()
        p = mp.Process(target=q.put, args=('hi',))
        p.start(); print(q.get()); p.join()
        print(p.exitcode, p in process._dangling, queues._sentinel is queues._sentinel,
              isinstance(util._args_from_interpreter_flags(), list))
    """
    assert run_program(src, 'cpool') == run_program(src, 'stdlib')


@pytest.mark.timeout(300)
def test_joblib_multiprocessing_backend_under_alias():
    pytest.importorskip('joblib')
    pytest.importorskip('numpy')
    # Arrays above joblib's max_nbytes (1 MB by default) go through its memmapping path: its
    # MemmappingPool overrides Pool._setup_queues with queues whose pickler dumps them to a file,
    # so workers get read-only np.memmap views (and large results come back the same way).
    src = WHICH + """
    import multiprocessing
    import numpy as np
    import joblib
    from joblib import Parallel, delayed
    def twice(a):
        return a * 2
    def kind(a):
        return type(a).__name__, float(a.sum()), a.flags.writeable
    def big(i):
        return np.full(100_000, i, dtype=np.float64)
    if __name__ == '__main__':
        small = Parallel(n_jobs=2, backend='multiprocessing')(
            delayed(twice)(np.arange(i)) for i in range(6))
        print([a.tolist() for a in small])
        large = Parallel(n_jobs=2, backend='multiprocessing')(
            delayed(twice)(np.full(300_000, i, dtype=np.float64)) for i in range(4))
        print([float(a.sum()) for a in large])
        for method in ('fork', 'spawn'):
            multiprocessing.set_start_method(method, force=True)
            arrays = [np.arange(20_000, dtype=np.float64) * i for i in range(4)]
            print(method, Parallel(n_jobs=2, backend='multiprocessing', max_nbytes='1K')(
                delayed(kind)(a) for a in arrays + [np.arange(5.0)]))
            out = Parallel(n_jobs=2, backend='multiprocessing', max_nbytes='1K')(
                delayed(big)(i) for i in range(3))
            print([(type(a).__name__, float(a.sum())) for a in out])
    """
    out = run_program(src, 'cpool', timeout=200)
    assert out == run_program(src, 'stdlib', timeout=200)
    assert '[0.0, 600000.0, 1200000.0, 1800000.0]' in out
    assert out.count("('memmap', 199990000.0, False)") == 2
    assert out.count("('ndarray', 10.0, True)") == 2


EXECUTOR_PROGRAM = WHICH + """
    import concurrent.futures as cf
    import multiprocessing as mp
    def sq(x):
        return x * x
    def bad(x):
        raise KeyError(x)
    if __name__ == '__main__':
        for method in ('fork', 'spawn', 'forkserver'):
            with cf.ProcessPoolExecutor(2, mp_context=mp.get_context(method)) as ex:
                print(method, list(ex.map(sq, range(8))), type(ex.submit(bad, 1).exception()),
                      type(ex.submit(sq, lambda: 0).exception()).__name__, ex.submit(sq, 5).result())
        with cf.ProcessPoolExecutor(2) as ex:  # the default context: concurrent.futures picks it
            print(sum(ex.map(sq, range(100), chunksize=9)))
"""


@pytest.mark.timeout(240)
def test_process_pool_executor_under_alias():
    # concurrent.futures.process itself runs on cpool here: its manager thread waits on the
    # result queue's _reader together with the workers' sentinels.
    out = run_program(EXECUTOR_PROGRAM, 'cpool', timeout=200)
    assert out == run_program(EXECUTOR_PROGRAM, 'stdlib', timeout=200)
    assert 'forkserver [0, 1, 4, 9, 16, 25, 36, 49]' in out


@pytest.mark.timeout(240)
def test_tqdm_process_map_under_alias():
    pytest.importorskip('tqdm')
    src = WHICH + """
    import io
    from tqdm.contrib.concurrent import process_map
    def gc(seq):
        return sum(c in 'GC' for c in seq) / len(seq)
    if __name__ == '__main__':
        reads = ['ACGT' * (i % 7 + 1) + 'G' * (i % 3) for i in range(500)]
        res = process_map(gc, reads, max_workers=2, chunksize=16, file=io.StringIO())
        print(len(res), round(sum(res), 6))
    """
    out = run_program(src, 'cpool', timeout=200)
    assert out == run_program(src, 'stdlib', timeout=200)
    assert out.startswith('500 ')
