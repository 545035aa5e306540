"""Shared fixtures: the same case run against the standard library and cpool, per start method."""
import importlib
import os
import sys

import pytest

START_METHODS = ['fork', 'spawn', 'forkserver']


@pytest.fixture(params=['multiprocessing', 'cpool'])
def mpmod(request):
    """The module under test: the standard library's multiprocessing, then cpool."""
    return importlib.import_module(request.param)


@pytest.fixture(params=START_METHODS)
def start_method(request):
    return request.param


@pytest.fixture
def ctx(mpmod, start_method):
    """A context of mpmod for each start method (differential tests run on all six)."""
    return mpmod.get_context(start_method)


@pytest.fixture
def cctx(start_method):
    """A cpool context for each start method (cpool-only tests)."""
    import cpool
    return cpool.get_context(start_method)


def open_fds():
    """The fds open in this process (for leak checks)."""
    return set(int(x) for x in os.listdir('/proc/self/fd'))


def zombies():
    """Pids of this process's children that have exited and not been reaped."""
    me = os.getpid()
    out = []
    for pid in os.listdir('/proc'):
        if not pid.isdigit():
            continue
        try:
            with open('/proc/%s/stat' % pid) as f:
                fields = f.read().rsplit(')', 1)[1].split()
        except OSError:
            continue
        if fields[0] == 'Z' and int(fields[1]) == me:
            out.append(int(pid))
    return out


def running(pid):
    """Whether pid runs: a zombie (exited, not yet reaped by whoever inherited it) does not."""
    try:
        with open('/proc/%d/stat' % pid) as f:
            return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
    except OSError:
        return False
