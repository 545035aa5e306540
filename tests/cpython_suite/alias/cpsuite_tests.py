"""The CPython multiprocessing test classes for one start method (CPOOL_SUITE_START_METHOD).

A real module (not a dict built in the runner) so that spawned and forkserver children can import
the generated test classes by name, as test_multiprocessing_spawn does in CPython.
"""
import os

from test.support import script_helper

# script_helper runs child interpreters with -I (no PYTHONPATH, so no alias and the stdlib's
# multiprocessing) unless the interpreter "requires the environment": say it does, so scripts the
# tests start also run against the module under test.
script_helper.__dict__['__cached_interp_requires_environment'] = True

import test._test_multiprocessing as _suite  # noqa: E402

try:
    from sitecustomize import FILLED_IN     # the gaps the alias had to fill (cpool target only)
except ImportError:
    FILLED_IN = []

_suite.install_tests_in_module_dict(globals(), os.environ.get('CPOOL_SUITE_START_METHOD', 'fork'))
