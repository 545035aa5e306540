"""Starting children as fresh interpreters (spawn and forkserver): the command line, the data the
child needs before it can unpickle its Process object, and preparing the child's __main__."""
import os
import runpy
import sys
import types

from . import process, util


# The standard library's spawn module has these (from its context); the default context's.
def get_start_method(allow_none=False):
    from .context import _default_context
    return _default_context.get_start_method(allow_none)


def set_start_method(method, force=False):
    from .context import _default_context
    return _default_context.set_start_method(method, force)

__all__ = ['_main', 'freeze_support', 'set_executable', 'get_executable',
           'get_preparation_data', 'get_command_line', 'import_main_path']

WINEXE = False
WINSERVICE = False

_python_exe = sys.executable


def set_executable(exe):
    """The interpreter spawned children run (default: sys.executable)."""
    global _python_exe
    _python_exe = os.fsdecode(exe) if exe is not None else None


def get_executable():
    return _python_exe


def is_forking(argv):
    """Whether the command line is that of a child being spawned."""
    return len(argv) >= 2 and argv[1] == '--multiprocessing-fork'


def freeze_support():
    """In a frozen executable started as a child, run the child's code and exit."""
    if is_forking(sys.argv):
        kwds = {}
        for arg in sys.argv[2:]:
            name, value = arg.split('=')
            kwds[name] = None if value == 'None' else int(value)
        spawn_main(**kwds)
        sys.exit()


# Where the cpool package lives, so a fresh interpreter finds it even when cpool is not installed
# (a source checkout on PYTHONPATH-less sys.path, as in its own test suite).
_CPOOL_PARENT_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def get_command_line(**kwds):
    """The argv of a spawned child."""
    if getattr(sys, 'frozen', False):
        return ([sys.executable, '--multiprocessing-fork'] +
                ['%s=%r' % item for item in kwds.items()])
    prog = ('import sys; sys.path.insert(0, %r); from cpool.spawn import spawn_main; '
            'spawn_main(%s)')
    prog %= (_CPOOL_PARENT_DIR, ', '.join('%s=%r' % item for item in kwds.items()))
    import subprocess
    opts = subprocess._args_from_interpreter_flags()
    exe = get_executable()
    return [exe] + opts + ['-c', prog, '--multiprocessing-fork']


def spawn_main(pipe_handle, parent_pid=None, tracker_fd=None):
    """Entry point of a spawned child: read what the parent sent on pipe_handle and run it."""
    assert is_forking(sys.argv), "Not forking"
    if tracker_fd is not None:
        from . import resource_tracker
        resource_tracker._resource_tracker._adopt(tracker_fd)
    exitcode = _main(pipe_handle, None)
    sys.exit(exitcode)


def dump_for_child(popen, process_obj):
    """What a spawned or forkserver child reads first: the preparation data, then the Process.

    Pickled while popen is the spawning popen, so objects holding fds hand them to popen."""
    import io
    from . import context, reduction
    prep_data = get_preparation_data(process_obj.name)
    buf = io.BytesIO()
    # A Process given objects of the standard library's multiprocessing (concurrent.futures
    # without the alias puts a stdlib Queue subclass on a cpool context) pickles them through
    # the stdlib's own spawning check; popen has the DupFd/duplicate_for_child they ask of it.
    # Only a stdlib already imported by the program is told: cpool never imports it.
    stdlib_context = sys.modules.get('multiprocessing.context')
    if stdlib_context is context or not hasattr(stdlib_context, 'set_spawning_popen'):
        stdlib_context = None
    context.set_spawning_popen(popen)
    if stdlib_context is not None:
        stdlib_context.set_spawning_popen(popen)
    try:
        reduction.dump(prep_data, buf)
        reduction.dump(process_obj, buf)
    finally:
        context.set_spawning_popen(None)
        if stdlib_context is not None:
            stdlib_context.set_spawning_popen(None)
    return buf.getbuffer()


def _main(fd, parent_sentinel):
    from . import reduction
    with os.fdopen(fd, 'rb', closefd=True) as from_parent:
        process.current_process()._inheriting = True
        try:
            preparation_data = reduction.pickle.load(from_parent)
            prepare(preparation_data)
            self = reduction.pickle.load(from_parent)
        finally:
            del process.current_process()._inheriting
    return self._bootstrap(parent_sentinel)


def _check_not_importing_main():
    if getattr(process.current_process(), '_inheriting', False):
        raise RuntimeError('''
        An attempt has been made to start a new process before the
        current process has finished its bootstrapping phase.

        This probably means that you are not using fork to start your
        child processes and you have forgotten to use the proper idiom
        in the main module:

            if __name__ == '__main__':
                freeze_support()
                ...

        The "freeze_support()" line can be omitted if the program
        is not going to be frozen to produce an executable.

        To fix this issue, refer to the "Safe importing of main module"
        section in https://docs.python.org/3/library/multiprocessing.html
        ''')


def get_preparation_data(name):
    """What a spawned child needs before it can unpickle its Process object."""
    _check_not_importing_main()
    from .context import _default_context
    d = dict(log_to_stderr=util._log_to_stderr,
             authkey=process.current_process().authkey)
    if util._logger is not None:
        d['log_level'] = util._logger.getEffectiveLevel()
    sys_path = sys.path.copy()
    # '' means "the directory the parent started in", which the child must not reinterpret.
    sys_path = [process.ORIGINAL_DIR if p == '' else p for p in sys_path]
    d.update(name=name, sys_path=sys_path, sys_argv=sys.argv, orig_dir=process.ORIGINAL_DIR,
             dir=os.getcwd(), start_method=_default_context.get_start_method())
    # The child re-imports the parent's main module under the name __mp_main__ so that
    # functions defined there can be unpickled; `if __name__ == '__main__':` blocks don't run.
    main_module = sys.modules['__main__']
    main_mod_name = getattr(main_module.__spec__, "name", None)
    if main_mod_name is not None:
        d['init_main_from_name'] = main_mod_name
    else:
        main_path = getattr(main_module, '__file__', None)
        if main_path is not None:
            if not os.path.isabs(main_path) and process.ORIGINAL_DIR is not None:
                main_path = os.path.join(process.ORIGINAL_DIR, main_path)
            d['init_main_from_path'] = os.path.normpath(main_path)
    return d


old_main_modules = []


def prepare(data):
    """Make this (child) process like its parent before unpickling the Process object."""
    from .context import _default_context
    if 'name' in data:
        process.current_process().name = data['name']
    if 'authkey' in data:
        process.current_process().authkey = data['authkey']
    if data.get('log_to_stderr'):
        util.log_to_stderr()
    if 'log_level' in data:
        util.get_logger().setLevel(data['log_level'])
    if 'sys_path' in data:
        sys.path = data['sys_path']
    if 'sys_argv' in data:
        sys.argv = data['sys_argv']
    if 'dir' in data:
        os.chdir(data['dir'])
    if 'orig_dir' in data:
        process.ORIGINAL_DIR = data['orig_dir']
    if 'start_method' in data:
        _default_context.set_start_method(data['start_method'], force=True)
    if 'init_main_from_name' in data:
        _fixup_main_from_name(data['init_main_from_name'])
    elif 'init_main_from_path' in data:
        _fixup_main_from_path(data['init_main_from_path'])


def _install_main(main_content):
    old_main_modules.append(sys.modules['__main__'])
    main_module = types.ModuleType("__mp_main__")
    main_module.__dict__.update(main_content)
    sys.modules['__main__'] = sys.modules['__mp_main__'] = main_module


def _fixup_main_from_name(mod_name):
    # A package's __main__ runs its code unconditionally: never re-run it.
    if mod_name == "__main__" or mod_name.endswith(".__main__"):
        return
    if getattr(sys.modules['__main__'].__spec__, "name", None) == mod_name:
        return
    _install_main(runpy.run_module(mod_name, run_name="__mp_main__", alter_sys=True))


def _fixup_main_from_path(main_path):
    main_name = os.path.splitext(os.path.basename(main_path))[0]
    if main_name == 'ipython':  # IPython's launcher has no __main__ guard
        return
    if getattr(sys.modules['__main__'], '__file__', None) == main_path:
        return
    _install_main(runpy.run_path(main_path, run_name="__mp_main__"))


def import_main_path(main_path):
    """Set sys.modules['__main__'] to the module at main_path."""
    _fixup_main_from_path(main_path)
