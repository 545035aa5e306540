"""Makes `import multiprocessing[.X]` give cpool's modules, in every interpreter of a suite run.

This directory is put first on PYTHONPATH by run_suite.py, so every Python process of the run
(the worker, spawned children, the forkserver, scripts the tests start) loads this file at startup.
It does nothing unless CPOOL_SUITE_TARGET=cpool. The standard library's multiprocessing is then
never imported: a name cpool lacks fails with ModuleNotFoundError, except resource_tracker (see
_MISSING_PLACEHOLDERS), which the CPython test module imports unconditionally at its top.
"""
import importlib
import importlib.abc
import importlib.util
import os
import sys
import types
import weakref

_PLACEHOLDER_DOC = ('cpool has no multiprocessing.%s (intended: memfd shared memory, no '
                    'POSIX named semaphores, so no resource tracker); any use of it fails')


class _MissingModule(types.ModuleType):
    """Stands for a stdlib submodule cpool does not have: importing works, every attribute fails."""

    def __getattr__(self, attr):
        if attr.startswith('__'):
            raise AttributeError(attr)
        raise AttributeError('cpool has no %s.%s (placeholder installed by the cpython suite '
                             'runner)' % (self.__name__, attr))


# Imported unconditionally at the top of test._test_multiprocessing: without a stand-in the whole
# suite would fail to import instead of the few tests that use it failing.
_MISSING_PLACEHOLDERS = ('resource_tracker',)


class _AliasLoader(importlib.abc.Loader):
    def __init__(self, module):
        self.module = module

    def create_module(self, spec):
        return self.module

    def exec_module(self, module):
        # The import system stamped our alias spec on the module: give cpool's own back.
        module.__spec__ = self.original_spec


def _add_placeholders(package):
    # `from multiprocessing import resource_tracker` looks the name up as cpool.resource_tracker
    # (the package's own __name__), so the stand-in goes on the package and in sys.modules.
    for last in _MISSING_PLACEHOLDERS:
        if hasattr(package, last) or importlib.util.find_spec('cpool.' + last) is not None:
            continue
        stand_in = _MissingModule('multiprocessing.' + last, _PLACEHOLDER_DOC % last)
        setattr(package, last, stand_in)
        sys.modules['multiprocessing.' + last] = stand_in


# Names test._test_multiprocessing reads while it is being imported (decorator arguments) or in
# its module/class fixtures (setUpModule, tearDownClass): one of them missing stops every test,
# in the worker and in each spawned child that imports the test module to unpickle a target. The
# runner fills them with the platform's fact or a neutral stand-in (which only switches off the
# fixtures' dangling-process bookkeeping, nothing a test asserts) and reports each gap.
_GAPS = [
    ('util', 'abstract_sockets_supported', lambda: sys.platform == 'linux'),
    ('process', '_dangling', lambda: weakref.WeakSet()),
    ('util', '_cleanup_tests', lambda: (lambda: None)),
]
FILLED_IN = []


def _fill_gaps():
    for modname, attr, make in _GAPS:
        mod = importlib.import_module('cpool.' + modname)
        if not hasattr(mod, attr):
            value = make()
            setattr(mod, attr, value)
            FILLED_IN.append('cpool.%s.%s (stand-in %s set by the runner)'
                             % (modname, attr, value if isinstance(value, bool)
                                else type(value).__name__))


class CpoolAliasFinder(importlib.abc.MetaPathFinder):
    """multiprocessing -> cpool, multiprocessing.X -> cpool.X (the same module objects)."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != 'multiprocessing' and not fullname.startswith('multiprocessing.'):
            return None
        target_name = 'cpool' + fullname[len('multiprocessing'):]
        try:
            module = importlib.import_module(target_name)
        except ModuleNotFoundError as exc:
            if exc.name != target_name:
                raise
            return None    # the path finders then fail on cpool's __path__: a clear error
        if fullname == 'multiprocessing':
            _add_placeholders(module)
            _fill_gaps()
        loader = _AliasLoader(module)
        loader.original_spec = module.__spec__
        return importlib.util.spec_from_loader(fullname, loader,
                                               is_package=hasattr(module, '__path__'))


def install():
    if any(isinstance(f, CpoolAliasFinder) for f in sys.meta_path):
        return
    stale = [m for m in sys.modules if m == 'multiprocessing' or m.startswith('multiprocessing.')]
    for name in stale:
        del sys.modules[name]
    sys.meta_path.insert(0, CpoolAliasFinder())


if os.environ.get('CPOOL_SUITE_TARGET') == 'cpool':
    install()
