"""Process objects and the per-process state: current_process, parent_process, active_children."""
import os
import signal
import sys
import threading
import weakref
from weakref import WeakSet  # noqa: F401  (a name the stdlib module has)

from . import _core

__all__ = ['BaseProcess', 'current_process', 'active_children', 'parent_process']

try:
    ORIGINAL_DIR = os.path.abspath(os.getcwd())
except OSError:
    ORIGINAL_DIR = None


def current_process():
    """The Process object of the running process."""
    return _current_process


def active_children():
    """Children of this process that are still alive (finished ones are reaped on the way)."""
    _cleanup()
    return list(_children)


def parent_process():
    """The parent's Process object, or None in the main process."""
    global _parent_process
    me = _current_process
    if _parent_process is None and me._parent_pid is not None:
        # Made on first use from what the child's Process object knows: a child that never
        # asks saves the work (and its copy-on-write page faults).
        _parent_process = _ParentProcess(me._parent_name, me._parent_pid,
                                         getattr(me, '_parent_sentinel', None))
    return _parent_process


def _cleanup():
    # Reap children that have finished, so they neither stay zombies nor stay listed.
    for p in list(_children):
        if (child_popen := p._popen) and child_popen.poll() is not None:
            _children.discard(p)


class BaseProcess(object):
    """Process objects represent activity run in a separate process.

    Same API as threading.Thread: pass target/args/kwargs or override run()."""

    def _Popen(self):
        raise NotImplementedError

    def __init__(self, group=None, target=None, name=None, args=(), kwargs={},
                 *, daemon=None):
        assert group is None, 'group argument must be None for now'
        count = _core.next_process_count()
        self._identity = _current_process._identity + (count,)
        # Shared with the creating process, never mutated: every writer replaces the dict
        # (_set_config), so sharing is a copy that costs nothing until someone writes.
        self._config = _current_process._config
        self._parent_pid = os.getpid()
        self._parent_name = _current_process.name
        self._popen = None
        self._closed = False
        self._target = target
        self._args = tuple(args)
        self._kwargs = dict(kwargs)
        # The default name is made when first asked for: most are never read, and every object
        # a start allocates costs copy-on-write faults after the fork.
        self._lazy_name = name or None
        if daemon is not None:
            self.daemon = daemon
        _dangling.add(self)

    def _check_closed(self):
        if self._closed:
            raise ValueError("process object is closed")

    def run(self):
        """Method to be run in the child process; calls target(*args, **kwargs)."""
        if self._target:
            self._target(*self._args, **self._kwargs)

    def start(self):
        """Start the child process."""
        self._check_closed()
        assert self._popen is None, 'cannot start a process twice'
        assert self._parent_pid == os.getpid(), \
            'can only start a process object created by current process'
        assert not _current_process._config.get('daemon'), \
            'daemonic processes are not allowed to have children'
        if _children:
            _cleanup()
        if 'cpool.shared_memory' in sys.modules:
            # A program that uses shared memory gets its one watcher before its first child,
            # so a segment a forked child creates outlives that child (spawn and forkserver
            # children are handed the watcher in any case).
            from . import resource_tracker
            resource_tracker.ensure_running()
        self._popen = self._Popen(self)
        # The child has what it needs; drop our references so the objects can be freed.
        del self._target, self._args, self._kwargs
        # Listed after the fork: the child does not inherit itself as a child, and the set is
        # written only after the fork (a page written on both sides of it faults twice).
        _children.add(self)

    def interrupt(self):
        """Send SIGINT to the child (3.14's API, on every Python): by default it raises
        KeyboardInterrupt there, so finally blocks and context managers run; exit code 1."""
        self._check_closed()
        if self._popen is not None:
            self._popen.interrupt()

    def terminate(self):
        """Send SIGTERM to the child."""
        self._check_closed()
        if self._popen is not None:
            self._popen.terminate()

    def kill(self):
        """Send SIGKILL to the child."""
        self._check_closed()
        if self._popen is not None:
            self._popen.kill()

    def join(self, timeout=None):
        """Wait until the child ends, or timeout seconds pass."""
        self._check_closed()
        assert self._parent_pid == os.getpid(), 'can only join a child process'
        assert self._popen is not None, 'can only join a started process'
        res = self._popen.wait(timeout)
        if res is not None:
            _children.discard(self)

    def is_alive(self):
        """Whether the child is running."""
        self._check_closed()
        if self is _current_process:
            return True
        assert self._parent_pid == os.getpid(), 'can only test a child process'
        if self._popen is None:
            return False
        returncode = self._popen.poll()
        if returncode is None:
            return True
        _children.discard(self)
        return False

    def close(self):
        """Release the resources of a finished process; most methods raise ValueError after it."""
        if self._popen is not None:
            if self._popen.poll() is None:
                raise ValueError("Cannot close a process while it is still running. "
                                 "You should first call join() or terminate().")
            self._popen.close()
            self._popen = None
            _children.discard(self)
        self._closed = True

    @property
    def name(self):
        if self._lazy_name is None:
            self._lazy_name = type(self).__name__ + '-' + ':'.join(str(i) for i in self._identity)
        return self._lazy_name

    @name.setter
    def name(self, name):
        assert isinstance(name, str), 'name must be a string'
        self._lazy_name = name

    # The standard library's attribute, which libraries read directly (loky's popen does).
    @property
    def _name(self):
        return self.name

    @_name.setter
    def _name(self, name):
        self._lazy_name = name

    @property
    def daemon(self):
        """Whether the process is daemonic (terminated, not joined, when its parent exits)."""
        return self._config.get('daemon', False)

    @daemon.setter
    def daemon(self, daemonic):
        assert self._popen is None, 'process has already started'
        self._set_config('daemon', daemonic)

    @property
    def authkey(self):
        return self._config['authkey']

    @authkey.setter
    def authkey(self, authkey):
        self._set_config('authkey', AuthenticationString(authkey))

    def _set_config(self, key, value):
        # A new dict: the old one may be shared with other Process objects (see __init__).
        config = dict(self._config)
        config[key] = value
        self._config = config

    @property
    def exitcode(self):
        """Return code: None while running, -N if killed by signal N."""
        self._check_closed()
        if self._popen is None:
            return self._popen
        return self._popen.poll()

    @property
    def ident(self):
        """Process id (None before start)."""
        self._check_closed()
        if self is _current_process:
            return os.getpid()
        else:
            return self._popen and self._popen.pid

    pid = ident

    @property
    def sentinel(self):
        """An fd that becomes readable when the process ends (usable with connection.wait)."""
        self._check_closed()
        if self._popen is None:
            raise ValueError("process not started")
        return self._popen.sentinel

    def __repr__(self):
        exitcode = None
        if self is _current_process:
            status = 'started'
        elif self._closed:
            status = 'closed'
        elif self._parent_pid != os.getpid():
            status = 'unknown'
        elif self._popen is None:
            status = 'initial'
        else:
            exitcode = self._popen.poll()
            status = 'started' if exitcode is None else 'stopped'
        info = [type(self).__name__, 'name=%r' % self.name]
        if self._popen is not None:
            info.append('pid=%s' % self._popen.pid)
        info.append('parent=%s' % self._parent_pid)
        info.append(status)
        if exitcode is not None:
            exitcode = _exitcode_to_name.get(exitcode, exitcode)
            info.append('exitcode=%s' % exitcode)
        if self.daemon:
            info.append('daemon')
        return '<%s>' % ' '.join(info)

    def _bootstrap(self, parent_sentinel=None):
        """Run in a spawned or forkserver child: become the current process, run(), turn the
        outcome into an exit code. A forked child runs the same sequence in C
        (child_main in src/process.c), calling back into _child_exitcode and the helpers here."""
        global _current_process, _parent_process, _children
        util = sys.modules['cpool.util']  # imported by every Popen; no import machinery here
        try:
            if self._start_method is not None:
                _child_start_method(self._start_method)
            _core.reset_process_count()
            if _children:
                _children = set()
            util._close_stdin()
            old_process = _current_process
            _current_process = self
            _parent_process = None
            self._parent_sentinel = parent_sentinel
            if threading._HAVE_THREAD_NATIVE_ID:
                threading.main_thread()._set_native_id()
            try:
                self._after_fork()
            finally:
                # The parent's finalizers belong to the parent.
                del old_process
            util.info('child process calling self.run()')
            try:
                self.run()
                exitcode = 0
            finally:
                # The child's own children are joined and its finalizers run, as at any exit:
                # here up to 3.12; from 3.13 on from atexit, after the threads are joined.
                if not _EXIT_FUNCTION_FROM_ATEXIT:
                    util._exit_function()
        except BaseException as e:
            exitcode = _child_exitcode(self, e)
        finally:
            if threading.active_count() > 1 or getattr(threading, '_threading_atexits', None):
                threading._shutdown()  # joins the non-daemon threads run() left behind
            util.info('process exiting with exitcode %d', exitcode)
            util._flush_std_streams()
            if threading.active_count() == 1:
                # A forkserver child ends with os._exit, past the C atexit handler that gives
                # back its references to shared locks (a thread still running keeps them).
                _core.arena_release_all()
        return exitcode

    @staticmethod
    def _after_fork():
        from . import util
        if util._finalizer_registry:
            util._finalizer_registry.clear()
        util._run_after_forkers()


# 3.13+: a child's atexit callbacks run at its exit (util._exit_function among them); before,
# the bootstrap called util._exit_function itself and a child ran no atexit callback.
_EXIT_FUNCTION_FROM_ATEXIT = sys.version_info >= (3, 13)


def _child_start_method(method):
    # A child started by a context's Process keeps that context's start method as its default.
    sys.modules['cpool.context']._force_start_method(method)


def _child_exitcode(process_obj, exc):
    """The exit code of a child whose run() (or exit sequence) raised exc: SystemExit's code,
    else 1 with the traceback on stderr, as the standard library reports it."""
    if isinstance(exc, SystemExit):
        if exc.code is None:
            return 0
        if isinstance(exc.code, int):
            return exc.code
        sys.stderr.write(str(exc.code) + '\n')
        return 1
    import traceback
    sys.stderr.write('Process %s:\n' % process_obj.name)
    traceback.print_exception(type(exc), exc, exc.__traceback__)
    return 1


class AuthenticationString(bytes):
    """An authkey: refuses to be pickled except while a child is being started."""

    def __reduce__(self):
        from .context import get_spawning_popen
        if get_spawning_popen() is None:
            raise TypeError('Pickling an AuthenticationString object is '
                            'disallowed for security reasons')
        return AuthenticationString, (bytes(self),)


class _ParentProcess(BaseProcess):
    """The parent as seen from a child: its sentinel turns readable when the parent ends."""

    def __init__(self, name, pid, sentinel):
        self._identity = ()
        self._name = name
        self._pid = pid
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._sentinel_fd = sentinel
        self._config = {}

    @property
    def sentinel(self):
        if self._sentinel_fd is None:
            self._sentinel_fd = _parent_sentinel(self._pid)
        return self._sentinel_fd

    def is_alive(self):
        return not _fd_readable(self.sentinel, 0)

    @property
    def ident(self):
        return self._pid

    def join(self, timeout=None):
        _fd_readable(self.sentinel, timeout)

    pid = ident


def _fd_readable(fd, timeout):
    import select
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(None if timeout is None else max(0.0, timeout) * 1000))


# False in a child of the forkserver, whose OS parent is the server, not its Process parent.
_parent_is_ppid = True


def _parent_sentinel(pid):
    # A pidfd of the parent, made on first use; if the parent is already gone (a fork or spawn
    # child was re-parented) an fd that is readable at once stands in for it.
    from . import _core
    if os.getppid() == pid or not _parent_is_ppid:
        try:
            return _core.pidfd_open(pid)
        except OSError:
            pass
    r, w = os.pipe2(os.O_CLOEXEC)
    os.close(w)
    return r


class _MainProcess(BaseProcess):
    def __init__(self):
        self._identity = ()
        self._name = 'MainProcess'
        self._parent_pid = None
        self._popen = None
        self._closed = False
        self._config = {'authkey': AuthenticationString(os.urandom(32)),
                        'semprefix': '/mp'}

    def close(self):
        pass


_parent_process = None
_current_process = _MainProcess()
_children = set()
# Every Process object still alive, as the standard library keeps it: leak checks (CPython's
# test support, libraries' test suites) read it.
_dangling = weakref.WeakSet()
del _MainProcess

_exitcode_to_name = {}
for name, signum in list(signal.__dict__.items()):
    if name[:3] == 'SIG' and '_' not in name:
        _exitcode_to_name[-signum] = f'-{name}'
del name, signum
