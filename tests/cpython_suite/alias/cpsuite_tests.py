"""The CPython multiprocessing test classes for one start method (CPOOL_SUITE_START_METHOD).

A real module (not a dict built in the runner) so that spawned and forkserver children can import
the generated test classes by name, as test_multiprocessing_spawn does in CPython.
"""
import importlib
import os
import sys
import weakref

from test.support import script_helper

# script_helper runs child interpreters with -I (no PYTHONPATH, so no alias and the stdlib's
# multiprocessing) unless the interpreter "requires the environment": say it does, so scripts the
# tests start also run against the module under test.
script_helper.__dict__['__cached_interp_requires_environment'] = True

# Names the test module reads while it is being imported (decorator arguments, class bodies): one
# missing name would stop the whole suite, so the runner fills it with the platform's fact and
# reports the gap (FILLED_IN) instead. Only read at import time; the tests themselves see cpool.
# The same for private names only the suite's module/class fixtures use (setUpModule,
# tearDownClass): without them no test runs at all. The stand-ins disable the fixture's
# dangling-process bookkeeping, nothing a test asserts.
_IMPORT_TIME_NAMES = [
    ('multiprocessing.util', 'abstract_sockets_supported', sys.platform == 'linux'),
    ('multiprocessing.process', '_dangling', weakref.WeakSet()),
    ('multiprocessing.util', '_cleanup_tests', lambda: None),
]
FILLED_IN = []
for _modname, _attr, _fact in _IMPORT_TIME_NAMES:
    _mod = importlib.import_module(_modname)
    if not hasattr(_mod, _attr):
        setattr(_mod, _attr, _fact)
        FILLED_IN.append('%s.%s (stand-in %r set by the runner)' % (_mod.__name__, _attr, _fact))

import test._test_multiprocessing as _suite  # noqa: E402

_suite.install_tests_in_module_dict(globals(), os.environ.get('CPOOL_SUITE_START_METHOD', 'fork'))
