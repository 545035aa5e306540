"""Contexts: the objects behind the module-level API, one per start method (fork, spawn, forkserver).

Each context carries the same factories as the `cpool` module (Process, Pool, Queue, Lock, ...)
and makes objects that start their children with its start method. Factories import their module
on first use, as the standard library does, so `import cpool` stays cheap.
"""
import os
import sys
import threading

from . import process
from . import _core

__all__ = ()

# Exceptions live in the C module so that the C code raises exactly these classes.
ProcessError = _core.ProcessError
BufferTooShort = _core.BufferTooShort
TimeoutError = _core.TimeoutError
AuthenticationError = _core.AuthenticationError
WorkerLostError = _core.WorkerLostError
OwnerDiedWarning = _core.OwnerDiedWarning


class BaseContext(object):
    ProcessError = ProcessError
    BufferTooShort = BufferTooShort
    TimeoutError = TimeoutError
    AuthenticationError = AuthenticationError
    WorkerLostError = WorkerLostError
    OwnerDiedWarning = OwnerDiedWarning

    current_process = staticmethod(process.current_process)
    parent_process = staticmethod(process.parent_process)
    active_children = staticmethod(process.active_children)

    def cpu_count(self):
        """Number of CPUs in the system (not those usable by this process: see os.sched_getaffinity)."""
        num = os.cpu_count()
        if num is None:
            raise NotImplementedError('cannot determine number of cpus')
        return num

    def usable_cpu_count(self):
        """cpool's own: the CPUs this process can use (affinity and cgroup CPU quota counted);
        Pool() uses it as its default size when CPOOL_POOL_PROCESSES=usable is set."""
        from ._cpus import usable_cpu_count
        return usable_cpu_count()

    def Manager(self):
        """A started SyncManager: shared objects served by a manager process."""
        from .managers import SyncManager
        m = SyncManager(ctx=self.get_context())
        m.start()
        return m

    def Pipe(self, duplex=True):
        """Two Connection objects joined by a pipe (a socketpair when duplex)."""
        from .connection import Pipe
        return Pipe(duplex)

    def Lock(self):
        from .synchronize import Lock
        return Lock(ctx=self.get_context())

    def RLock(self):
        from .synchronize import RLock
        return RLock(ctx=self.get_context())

    def Condition(self, lock=None):
        from .synchronize import Condition
        return Condition(lock, ctx=self.get_context())

    def Semaphore(self, value=1):
        from .synchronize import Semaphore
        return Semaphore(value, ctx=self.get_context())

    def BoundedSemaphore(self, value=1):
        from .synchronize import BoundedSemaphore
        return BoundedSemaphore(value, ctx=self.get_context())

    def Event(self):
        from .synchronize import Event
        return Event(ctx=self.get_context())

    def Barrier(self, parties, action=None, timeout=None):
        from .synchronize import Barrier
        return Barrier(parties, action, timeout, ctx=self.get_context())

    def Queue(self, maxsize=0):
        from .queues import Queue
        return Queue(maxsize, ctx=self.get_context())

    def JoinableQueue(self, maxsize=0):
        from .queues import JoinableQueue
        return JoinableQueue(maxsize, ctx=self.get_context())

    def SimpleQueue(self):
        from .queues import SimpleQueue
        return SimpleQueue(ctx=self.get_context())

    def Pool(self, processes=None, initializer=None, initargs=(),
             maxtasksperchild=None, **kwargs):
        """A pool of worker processes; keyword extras (task_timeout, ...) are cpool's own."""
        from .pool import Pool
        return Pool(processes, initializer, initargs, maxtasksperchild,
                    context=self.get_context(), **kwargs)

    def RawValue(self, typecode_or_type, *args):
        from .sharedctypes import RawValue
        return RawValue(typecode_or_type, *args)

    def RawArray(self, typecode_or_type, size_or_initializer):
        from .sharedctypes import RawArray
        return RawArray(typecode_or_type, size_or_initializer)

    def Value(self, typecode_or_type, *args, lock=True):
        from .sharedctypes import Value
        return Value(typecode_or_type, *args, lock=lock, ctx=self.get_context())

    def Array(self, typecode_or_type, size_or_initializer, *, lock=True):
        from .sharedctypes import Array
        return Array(typecode_or_type, size_or_initializer, lock=lock, ctx=self.get_context())

    def freeze_support(self):
        """Run the child's code if this frozen executable was started as a child; else nothing."""
        if getattr(sys, 'frozen', False):
            from .spawn import freeze_support
            freeze_support()

    def get_logger(self):
        from .util import get_logger
        return get_logger()

    def log_to_stderr(self, level=None):
        from .util import log_to_stderr
        return log_to_stderr(level)

    def allow_connection_pickling(self):
        # Connections always pickle through cpool's reduction; kept for compatibility.
        from . import connection  # noqa: F401

    def set_executable(self, executable):
        from .spawn import set_executable
        set_executable(executable)

    def set_forkserver_preload(self, module_names, *, on_error='ignore'):
        from .forkserver import set_forkserver_preload
        set_forkserver_preload(module_names, on_error=on_error)

    def get_context(self, method=None):
        if method is None:
            return self
        try:
            ctx = _concrete_contexts[method]
        except KeyError:
            raise ValueError('cannot find context for %r' % method) from None
        ctx._check_available()
        return ctx

    def get_start_method(self, allow_none=False):
        return self._name

    def set_start_method(self, method, force=False):
        raise ValueError('cannot set start method of concrete context')

    @property
    def reducer(self):
        return globals().get('reduction')

    def _check_available(self):
        pass


class Process(process.BaseProcess):
    """A process started with the default context's start method."""
    _start_method = None

    @staticmethod
    def _Popen(process_obj):
        ctx = _default_context._actual_context or _default_context.get_context()
        return ctx.Process._Popen(process_obj)

    @staticmethod
    def _after_fork():
        return _default_context.get_context().Process._after_fork()


class DefaultContext(BaseContext):
    Process = Process

    def __init__(self, context):
        self._default_context = context
        self._actual_context = None

    def get_context(self, method=None):
        if method is None:
            if self._actual_context is None:
                self._actual_context = self._default_context
            return self._actual_context
        return super().get_context(method)

    def set_start_method(self, method, force=False):
        if self._actual_context is not None and not force:
            raise RuntimeError('context has already been set')
        if method is None and force:
            self._actual_context = None
            return
        self._actual_context = self.get_context(method)

    def get_start_method(self, allow_none=False):
        if self._actual_context is None:
            if allow_none:
                return None
            self._actual_context = self._default_context
        return self._actual_context._name

    def get_all_start_methods(self):
        """The start methods, the default first (as the standard library lists them)."""
        default = self._default_context.get_start_method()
        return [default] + [m for m in ('fork', 'spawn', 'forkserver') if m != default]


class ForkProcess(process.BaseProcess):
    _start_method = 'fork'

    @staticmethod
    def _Popen(process_obj):
        # On first use this method replaces itself with popen_fork.Popen, a C type: calling it
        # then runs no Python frame around the fork, whose locals the parent would write after
        # the fork (copy-on-write faults).
        from .popen_fork import Popen
        ForkProcess._Popen = staticmethod(Popen)
        return Popen(process_obj)


class SpawnProcess(process.BaseProcess):
    _start_method = 'spawn'

    @staticmethod
    def _Popen(process_obj):
        from .popen_spawn_posix import Popen
        return Popen(process_obj)

    @staticmethod
    def _after_fork():
        pass


class ForkServerProcess(process.BaseProcess):
    _start_method = 'forkserver'

    @staticmethod
    def _Popen(process_obj):
        from .popen_forkserver import Popen
        return Popen(process_obj)


class ForkContext(BaseContext):
    _name = 'fork'
    Process = ForkProcess


class SpawnContext(BaseContext):
    _name = 'spawn'
    Process = SpawnProcess


class ForkServerContext(BaseContext):
    _name = 'forkserver'
    Process = ForkServerProcess

    def _check_available(self):
        from . import reduction
        if not reduction.HAVE_SEND_HANDLE:
            raise ValueError('forkserver start method not available')


_concrete_contexts = {
    'fork': ForkContext(),
    'spawn': SpawnContext(),
    'forkserver': ForkServerContext(),
}
# The standard library's default on the running Python: fork up to 3.13, forkserver from 3.14.
if sys.version_info >= (3, 14):
    _default_context = DefaultContext(_concrete_contexts['forkserver'])
else:
    _default_context = DefaultContext(_concrete_contexts['fork'])


# ---- state of a process being spawned: objects use it to decide how they pickle ----

_tls = threading.local()


def get_spawning_popen():
    return getattr(_tls, 'spawning_popen', None)


def set_spawning_popen(popen):
    _tls.spawning_popen = popen


def assert_spawning(obj):
    if get_spawning_popen() is None:
        raise RuntimeError(
            '%s objects should only be shared between processes'
            ' through inheritance' % type(obj).__name__
        )


def _force_start_method(method):
    # In a child: objects it creates use the start method it was started with.
    ctx = _concrete_contexts[method]
    if _default_context._actual_context is not ctx:
        _default_context._actual_context = ctx
