"""Every name of the standard library's multiprocessing modules exists in cpool's module of the
same name, or is listed here (and in README's limitations) with the reason it is not."""
import importlib
import types

import pytest

MODULES = ['', 'connection', 'context', 'dummy', 'dummy.connection', 'forkserver', 'heap',
           'managers', 'pool', 'popen_fork', 'popen_forkserver', 'popen_spawn_posix', 'process',
           'queues', 'reduction', 'resource_sharer', 'resource_tracker', 'shared_memory',
           'sharedctypes', 'spawn', 'synchronize', 'util']

# Names of the stdlib's internals that have no counterpart in cpool's design.
NOT_PROVIDED = {
    'connection': {
        '_WaitSelector', '_winapi', '_init_timeout', '_check_timeout',  # wait/timeouts are C
        '_get_digest_name_and_payload',  # the handshake is cpool's own step-by-step routine
    },
    'heap': {'Arena', 'Heap', 'rebuild_arena', 'reduce_arena', 'assert_spawning',
             'defaultdict'},  # cpool's heap is one memfd arena managed in C, not mmap arenas
    'managers': {'rebuild_as_list', 'reduce_array'},  # arrays pickle as they are, in C
    'pool': {'_PoolCache', '_helper_reraises_exception'},  # results are tracked in C
    'process': {'_process_counter'},  # the counter is C's (shared with the fork path)
    'reduction': {'ABCMeta', '_C', '_rebuild_partial', '_reduce_method',
                  '_reduce_method_descriptor', '_reduce_partial'},  # copyreg handles these now
    'resource_tracker': {'ReentrantCallError', '_CLEANUP_FUNCS', '_HAVE_SIGMASK',
                         '_IGNORED_SIGNALS', 'cleanup_noop'},  # no tracker process: a pipe watcher
    'sharedctypes': {'template'},  # properties are built without exec'd source
    'synchronize': {'sem_unlink'},  # no named POSIX semaphores: futexes in a memfd
    'util': {'_cleanup_tests', '_remove_temp_dir'},  # the stdlib test suite's helpers
}


@pytest.mark.parametrize('name', MODULES)
def test_stdlib_names_exist_in_cpool(name):
    std = importlib.import_module('multiprocessing' + ('.' + name if name else ''))
    ours = importlib.import_module('cpool' + ('.' + name if name else ''))
    names = {n for n in dir(std) if not n.startswith('__')
             and not isinstance(getattr(std, n), types.ModuleType)}
    missing = sorted(n for n in names - NOT_PROVIDED.get(name, set()) if not hasattr(ours, n))
    assert not missing, 'cpool.%s lacks %s' % (name or '', missing)


def test_same_meaning_of_plain_values():
    import multiprocessing.managers as sm
    import multiprocessing.reduction as sr
    import multiprocessing.util as su
    import cpool.managers as cm
    import cpool.reduction as cr
    import cpool.util as cu
    assert cu.MAXFD == su.MAXFD
    assert cu.abstract_sockets_supported == su.abstract_sockets_supported
    assert cr.ACKNOWLEDGE == sr.ACKNOWLEDGE
    assert cm.HAS_SHMEM == sm.HAS_SHMEM
    import cpool.queues as cq
    import cpool.spawn as cs
    assert cq._ForkingPickler is cr.ForkingPickler
    assert cs.get_start_method() == __import__('cpool').get_start_method()


def test_core_stub_declares_what_the_extension_has():
    """cpool/_core.pyi (shipped with py.typed) names every function, class and class member
    of the C extension, and nothing it lacks."""
    import ast
    import os
    from cpool import _core
    tree = ast.parse(open(os.path.join(os.path.dirname(_core.__file__), '_core.pyi')).read())
    declared = {}
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            declared[node.name] = {n.name if isinstance(n, (ast.FunctionDef, ast.ClassDef)) else
                                   n.target.id for n in node.body
                                   if isinstance(n, (ast.FunctionDef, ast.AnnAssign))
                                   and not n.__dict__.get('name', '').startswith('__')}
        elif isinstance(node, ast.FunctionDef):
            declared[node.name] = None
    actual = {}
    for name in dir(_core):
        if name.startswith('__'):
            continue
        obj = getattr(_core, name)
        if isinstance(obj, type):
            own = set(vars(obj)) - {'__new__', '__init__', '__module__', '__doc__', '__dict__',
                                    '__weakref__', '__weaklistoffset__'}
            actual[name] = {m for m in own if not (m.startswith('__') and m.endswith('__'))}
        else:
            actual[name] = None
    assert set(declared) == set(actual)
    for name, members in actual.items():
        if members is not None and issubclass(getattr(_core, name), BaseException):
            continue  # exceptions: their attributes are set on the class by the module
        assert declared[name] == members, name
