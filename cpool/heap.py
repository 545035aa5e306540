"""Shared memory for synchronize and sharedctypes: the arena handles of cpool._core and how they
reach child processes.

Locks, events and small values live in 64-byte slots of a per-process arena of memfd chunks
(a few fds for thousands of objects); values bigger than 16 KiB get a memfd of their own.
Children started by fork inherit everything (the C arena takes the child's references before
the fork); children started by spawn or forkserver get each chunk's fd through
`reduction.DupFd` when the Process object is pickled, which is the only pickling allowed.
"""
import sys

from . import _core
from . import context
from . import reduction

__all__ = ['BufferWrapper', 'arena_stats']

arena_stats = _core.arena_stats


class BufferWrapper(object):
    """`size` bytes of zeroed shared memory (the standard library's heap.BufferWrapper API)."""

    def __init__(self, size):
        if size < 0:
            raise ValueError("Size {0:n} out of range".format(size))
        if sys.maxsize <= size:
            raise OverflowError("Size {0:n} too large".format(size))
        self._block = _core.SharedBlock(size)
        self._size = size

    def create_memoryview(self):
        return memoryview(self._block)


# ---- handing arena handles to a child being spawned ----

def reduce_handle(handle):
    """Reduce an arena handle (a _core.SemLock, Event, CondWaiters or SharedBlock, or a subclass) for the
    child being spawned: the child's reference is taken now, the chunk's fd goes by DupFd."""
    context.assert_spawning(handle)
    fd, slot = handle._export()
    try:
        df = reduction.DupFd(fd)
    except BaseException:
        handle._unexport()
        raise
    if isinstance(handle, _core.SharedBlock):
        return _rebuild_handle, (type(handle), df, slot, len(handle))
    return _rebuild_handle, (type(handle), df, slot)


def _rebuild_handle(cls, df, slot, *extra):
    return cls._attach(df.detach(), slot, *extra)


for _t in (_core.SemLock, _core.Event, _core.CondWaiters, _core.SharedBlock):
    reduction.register(_t, reduce_handle)
del _t


# A forked or forkserver child gives its references back when it exits: the bootstraps
# (src/process.c child_main, process.BaseProcess._bootstrap) call _core.arena_release_all, as
# the C atexit handler does in the main process and in spawned children.
