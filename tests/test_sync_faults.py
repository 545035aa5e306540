"""Fault cases of the synchronisation objects, Listener and forkserver: a lock holder whose pid
was reused, barrier parties and condition waiters killed, silent clients, a killed forkserver
parent. Counts of what was delivered decide, not timings (bounds are generous)."""
import glob
import os
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


# ---- forkserver: nothing left in the temp folder when the parent is SIGKILLed ----

_FORKSERVER_PARENT = textwrap.dedent('''
    import sys, time
    import cpool
    ctx = cpool.get_context('forkserver')
    p = ctx.Process(target=time.sleep, args=(30,))
    p.start()
    print(p.pid, flush=True)
    time.sleep(60)
''')


def _pymp_dirs():
    return set(glob.glob(os.path.join(tempfile.gettempdir(), 'pymp-*')))


def test_forkserver_dir_removed_after_parent_sigkill():
    before = _pymp_dirs()
    env = dict(os.environ, PYTHONPATH=ROOT)
    parent = subprocess.Popen([sys.executable, '-c', _FORKSERVER_PARENT], env=env,
                              stdout=subprocess.PIPE, text=True)
    child = None
    try:
        child = int(parent.stdout.readline())
        created = _pymp_dirs() - before
        assert created, 'the forkserver made no socket directory'
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 1.0
        while (_pymp_dirs() & created) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not (_pymp_dirs() & created)
    finally:
        parent.kill()
        parent.wait(10)
        if child:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass
