"""Whole programs run with cpool standing in for multiprocessing (`sys.modules` alias), in a fresh
interpreter each, and compared with the same program on the standard library."""
import os
import subprocess
import sys
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
    proc = subprocess.run([sys.executable, '-c', textwrap.dedent(source)], env=env,
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


@pytest.mark.timeout(180)
def test_joblib_multiprocessing_backend_under_alias():
    pytest.importorskip('joblib')
    pytest.importorskip('numpy')
    # Arrays above joblib's 1 MB max_nbytes go through its memmapping path.
    src = WHICH + """
    import numpy as np
    import joblib
    from joblib import Parallel, delayed
    def twice(a):
        return a * 2
    if __name__ == '__main__':
        small = Parallel(n_jobs=2, backend='multiprocessing')(
            delayed(twice)(np.arange(i)) for i in range(6))
        print([a.tolist() for a in small])
        big = Parallel(n_jobs=2, backend='multiprocessing')(
            delayed(twice)(np.full(300_000, i, dtype=np.float64)) for i in range(4))
        print([float(a.sum()) for a in big])
    """
    out = run_program(src, 'cpool', timeout=150)
    assert out == run_program(src, 'stdlib', timeout=150)
    assert '[0.0, 600000.0, 1200000.0, 1800000.0]' in out
