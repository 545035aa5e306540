"""Process-wide helpers: logging, finalizers, after-fork hooks, and the exit-time join of children."""
import atexit
import itertools
import os
import sys
import threading
import weakref

from subprocess import _args_from_interpreter_flags  # noqa: F401  (imported from here by loky)

from . import process

__all__ = ['sub_debug', 'debug', 'info', 'sub_warning', 'get_logger', 'log_to_stderr',
           'get_temp_dir', 'register_after_fork', 'is_exiting', 'Finalize', 'ForkAwareThreadLock',
           'ForkAwareLocal', 'close_all_fds_except', 'SUBDEBUG', 'SUBWARNING']

NOTSET = 0
SUBDEBUG = 5
DEBUG = 10
INFO = 20
SUBWARNING = 25

LOGGER_NAME = 'cpool'
DEFAULT_LOGGING_FORMAT = '[%(levelname)s/%(processName)s] %(message)s'

_logger = None
_log_to_stderr = False


def sub_debug(msg, *args):
    if _logger:
        _logger.log(SUBDEBUG, msg, *args, stacklevel=2)


def debug(msg, *args):
    if _logger:
        _logger.log(DEBUG, msg, *args, stacklevel=2)


def info(msg, *args):
    if _logger:
        _logger.log(INFO, msg, *args, stacklevel=2)


def sub_warning(msg, *args):
    if _logger:
        _logger.log(SUBWARNING, msg, *args, stacklevel=2)


def get_logger():
    """cpool's logger (created on first use, level NOTSET, no handler)."""
    global _logger
    import logging
    with logging._lock:
        if not _logger:
            _logger = logging.getLogger(LOGGER_NAME)
            _logger.propagate = 0
            logging.addLevelName(SUBDEBUG, 'SUBDEBUG')
            logging.addLevelName(SUBWARNING, 'SUBWARNING')
    return _logger


def log_to_stderr(level=None):
    """Send cpool's log to stderr (and to children's stderr)."""
    global _log_to_stderr
    import logging
    logger = get_logger()
    formatter = logging.Formatter(DEFAULT_LOGGING_FORMAT)
    handler = logging.StreamHandler()
    handler.setFormatter(formatter)
    logger.addHandler(handler)
    if level:
        logger.setLevel(level)
    _log_to_stderr = True
    return _logger


def get_temp_dir():
    """A private temporary directory for this process, removed at exit."""
    tempdir = process.current_process()._config.get('tempdir')
    if tempdir is None:
        import shutil
        import tempfile
        tempdir = tempfile.mkdtemp(prefix='pymp-')
        info('created temp directory %s', tempdir)
        Finalize(None, shutil.rmtree, args=(tempdir, True), exitpriority=-100)
        process.current_process()._set_config('tempdir', tempdir)
        # Forked children inherit the directory (and this config): only its creator removes it.
        process.current_process()._set_config('tempdir_owner', os.getpid())
    return tempdir


# ---- after-fork hooks ----

_afterfork_registry = weakref.WeakValueDictionary()
_afterfork_counter = itertools.count()


def _run_after_forkers():
    if not _afterfork_registry:
        return
    items = list(_afterfork_registry.items())
    items.sort()
    for (index, ident, func), obj in items:
        try:
            func(obj)
        except Exception as e:
            info('after forker raised exception %s', e)


def register_after_fork(obj, func):
    """Call func(obj) in a child started by fork, if obj is still alive then."""
    _afterfork_registry[(next(_afterfork_counter), id(obj), func)] = obj


# ---- finalizers ----

_finalizer_registry = {}
_finalizer_counter = itertools.count()


class Finalize(object):
    """Call callback(*args, **kwargs) when obj is collected, or at exit by exitpriority order."""

    def __init__(self, obj, callback, args=(), kwargs=None, exitpriority=None):
        if (exitpriority is not None) and not isinstance(exitpriority, int):
            raise TypeError("Exitpriority ({0!r}) must be None or int, not {1!s}".format(
                exitpriority, type(exitpriority)))
        if obj is not None:
            self._weakref = weakref.ref(obj, self)
        elif exitpriority is None:
            raise ValueError("Without object, exitpriority cannot be None")
        self._callback = callback
        self._args = args
        self._kwargs = kwargs or {}
        self._key = (exitpriority, next(_finalizer_counter))
        self._pid = os.getpid()
        _finalizer_registry[self._key] = self

    def __call__(self, wr=None, _finalizer_registry=_finalizer_registry,
                 sub_debug=sub_debug, getpid=os.getpid):
        """Run the callback unless already called or cancelled; returns its result."""
        try:
            del _finalizer_registry[self._key]
        except KeyError:
            sub_debug('finalizer no longer registered')
        else:
            if self._pid != getpid():
                sub_debug('finalizer ignored because different process')
                res = None
            else:
                sub_debug('finalizer calling %s with args %s and kwargs %s',
                          self._callback, self._args, self._kwargs)
                res = self._callback(*self._args, **self._kwargs)
            self._weakref = self._callback = self._args = \
                self._kwargs = self._key = None
            return res

    def cancel(self):
        """Cancel the finalizer without calling it."""
        try:
            del _finalizer_registry[self._key]
        except KeyError:
            pass
        else:
            self._weakref = self._callback = self._args = \
                self._kwargs = self._key = None

    def still_active(self):
        return self._key in _finalizer_registry

    def __repr__(self):
        try:
            obj = self._weakref()
        except (AttributeError, TypeError):
            obj = None
        if obj is None:
            return '<%s object, dead>' % self.__class__.__name__
        x = '<%s object, callback=%s' % (self.__class__.__name__,
                                         getattr(self._callback, '__name__', self._callback))
        if self._args:
            x += ', args=' + str(self._args)
        if self._kwargs:
            x += ', kwargs=' + str(self._kwargs)
        if self._key[0] is not None:
            x += ', exitpriority=' + str(self._key[0])
        return x + '>'


def _run_finalizers(minpriority=None):
    """Run finalizers whose exitpriority >= minpriority (all with a priority when None)."""
    if not _finalizer_registry:
        return
    if minpriority is None:
        f = lambda p: p[0] is not None
    else:
        f = lambda p: p[0] is not None and p[0] >= minpriority
    keys = [key for key in list(_finalizer_registry) if f(key)]
    keys.sort(reverse=True)
    for key in keys:
        finalizer = _finalizer_registry.get(key)
        if finalizer is not None:
            sub_debug('calling %s', finalizer)
            try:
                finalizer()
            except Exception:
                import traceback
                traceback.print_exc()
    if minpriority is None:
        _finalizer_registry.clear()


_exiting = False


def is_exiting():
    """Whether the interpreter is shutting down."""
    return _exiting or _exiting is None


def _exit_function(info=info, debug=debug, _run_finalizers=_run_finalizers,
                   active_children=process.active_children,
                   current_process=process.current_process):
    # At exit: high-priority finalizers, then daemonic children terminated and the others
    # joined (so no zombie is left), then the remaining finalizers.
    global _exiting
    if not _exiting:
        _exiting = True
        info('process shutting down')
        _run_finalizers(0)
        if current_process() is not None:
            for p in active_children():
                if p.daemon:
                    info('calling terminate() for daemon %s', p.name)
                    p._popen.terminate()
            for p in active_children():
                info('calling join() for process %s', p.name)
                p.join()
        _run_finalizers()


atexit.register(_exit_function)


class ForkAwareThreadLock(object):
    """A threading.Lock that is replaced by a fresh one in a forked child."""

    def __init__(self):
        self._lock = threading.Lock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release
        register_after_fork(self, ForkAwareThreadLock._at_fork_reinit)

    def _at_fork_reinit(self):
        self._lock._at_fork_reinit()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)


class ForkAwareLocal(threading.local):
    """A threading.local whose contents are cleared in a forked child."""

    def __init__(self):
        register_after_fork(self, lambda obj: obj.__dict__.clear())

    def __reduce__(self):
        return type(self), ()


try:
    MAXFD = os.sysconf('SC_OPEN_MAX')
except Exception:
    MAXFD = 256


def close_all_fds_except(fds):
    fds = list(fds) + [-1, MAXFD]
    fds.sort()
    for i in range(len(fds) - 1):
        os.closerange(fds[i] + 1, fds[i + 1])


# Linux has the abstract AF_UNIX namespace (the standard library's names for that fact).
def _platform_supports_abstract_sockets():
    return sys.platform in ('linux', 'android')


abstract_sockets_supported = _platform_supports_abstract_sockets()


def is_abstract_socket_namespace(address):
    """Whether an AF_UNIX address lives in Linux's abstract namespace (starts with a NUL)."""
    if not address:
        return False
    if isinstance(address, bytes):
        return address[0] == 0
    elif isinstance(address, str):
        return address[0] == "\0"
    raise TypeError(f'address type of {address!r} unrecognized')


def close_fds(*fds):
    """Close each fd."""
    for fd in fds:
        os.close(fd)


# One /dev/null reader opened in the parent and handed to every forked child as its sys.stdin:
# opening a fresh one in each child costs more than the rest of the child's start-up (every page
# the child touches is a copy-on-write fault). /dev/null has no state worth not sharing. Like the
# standard library's child stdin it does not own its fd (closefd=False), which stays open for the
# life of the process (in a spawned child it is sys.stdin itself, which exit handlers may read).
_devnull_stdin = None


def _prepare_devnull_stdin():
    global _devnull_stdin
    if _devnull_stdin is None:
        fd = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
        try:
            _devnull_stdin = open(fd, encoding="utf-8", closefd=False)
        except BaseException:
            os.close(fd)
            raise
    return _devnull_stdin


def _close_stdin():
    # A child must not share the parent's stdin: reading it would steal the parent's input.
    if sys.stdin is None:
        return
    try:
        sys.stdin.close()
    except (OSError, ValueError):
        pass
    try:
        stdin = _devnull_stdin
        if stdin is None or stdin.closed:
            stdin = _prepare_devnull_stdin() if stdin is None else None
        if stdin is None:
            fd = os.open(os.devnull, os.O_RDONLY)
            try:
                stdin = open(fd, encoding="utf-8", closefd=False)
            except:
                os.close(fd)
                raise
        sys.stdin = stdin
    except (OSError, ValueError):
        pass


def _flush_std_streams():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (AttributeError, ValueError):
            pass


def spawnv_passfds(path, args, passfds):
    """fork+exec path with args, only passfds inherited; returns the pid."""
    from . import _core
    return _core.spawnv_passfds(path, args, sorted(set(passfds)))
