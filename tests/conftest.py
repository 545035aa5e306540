"""Shared fixtures: the same case run against the standard library and cpool, per start method."""
import importlib
import os
import sys

import pytest

START_METHODS = ['fork', 'spawn', 'forkserver']

# CPOOL_TEST_DEFAULT_START=forkserver runs the suite with that start method as the default of
# both libraries, as Python 3.14 makes it on Linux: what 3.14 users get, tested on any Python.
_DEFAULT_START = os.environ.get('CPOOL_TEST_DEFAULT_START')


def pytest_configure(config):
    if not _DEFAULT_START:
        return
    if _DEFAULT_START not in START_METHODS:
        raise pytest.UsageError('CPOOL_TEST_DEFAULT_START must be one of %s, not %r'
                                % (START_METHODS, _DEFAULT_START))
    import multiprocessing
    import cpool
    multiprocessing.set_start_method(_DEFAULT_START, force=True)
    cpool.set_start_method(_DEFAULT_START, force=True)


def pytest_report_header(config):
    if _DEFAULT_START:
        return 'default start method (CPOOL_TEST_DEFAULT_START): %s' % _DEFAULT_START


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
