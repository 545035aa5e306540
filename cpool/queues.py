"""Queue, SimpleQueue and JoinableQueue: a ring of messages in shared memory, managed in C.

No feeder thread and no pipe: put() pickles in the caller (so an unpicklable object raises
right there and the queue stays usable) and copies the message into a shared-memory ring;
get() copies it out. An unbounded queue's put() does not block even when nobody reads (the ring
is a large sparse memfd: memory follows the backlog), and a process that put items can always
be joined, consumed or not. A process killed in the middle of put() or get() leaves the queue
consistent (robust lock + redo record). Ctrl-C interrupts a blocking put/get/join.

Beyond the standard library: put_many(iterable) / get_many(max_messages) move a batch under
one lock; large bytes/bytearray/memoryview/numpy payloads are copied once into shared memory
(pickle protocol 5 out-of-band buffers); join(timeout) returns False at the timeout.
"""
import os
import queue as _queue

from . import _core
from . import context

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

Empty = _queue.Empty
Full = _queue.Full


def _rebuild(cls, dupfd, joinable):
    # In a spawned child: map the parent's ring from the fd it was handed (then close that fd:
    # the queue keeps its own duplicate).
    fd = dupfd.detach() if hasattr(dupfd, 'detach') else dupfd
    q = cls.__new__(cls)
    try:
        _core.Queue.__init__(q, fd=fd, joinable=joinable)
    finally:
        os.close(fd)
    return q


class Queue(_core.Queue):
    """A process-shared FIFO queue (multiprocessing.Queue's API).

    The methods put/get/qsize/... are the C type's own, so a call goes straight to C (and
    __slots__ spares the method lookup a miss in an instance dict)."""

    __slots__ = ('_ctx', '__weakref__')

    def __init__(self, maxsize=0, *, ctx=None):
        if maxsize is None or maxsize <= 0:
            maxsize = 0
        _core.Queue.__init__(self, maxsize, joinable=self._is_joinable)
        self._ctx = ctx

    _is_joinable = False

    def __repr__(self):
        return '<%s.%s object at %#x>' % (type(self).__module__, type(self).__qualname__, id(self))

    def __reduce__(self):
        # Only to a child being started (spawn/forkserver); fork children inherit the mapping.
        context.assert_spawning(self)
        from .reduction import DupFd
        return _rebuild, (type(self), DupFd(self.fileno()), self._is_joinable)

    def join_thread(self):
        """Nothing to wait for (there is no feeder thread); the queue must be closed, as in
        the standard library."""
        assert self._closed, "Queue {0!r} not closed".format(self)

    def cancel_join_thread(self):
        """No feeder thread to abandon: items put are already in shared memory."""

    # A process may exit at any time after put(): nothing is left to flush.
    def _after_fork(self):
        pass


class JoinableQueue(Queue):
    """A Queue whose consumers call task_done() and whose join() waits for all of them."""
    __slots__ = ()
    _is_joinable = True


class SimpleQueue(Queue):
    """An unbounded queue with put/get/empty/close (multiprocessing.SimpleQueue's API)."""
    __slots__ = ()

    def __init__(self, *, ctx=None):
        Queue.__init__(self, 0, ctx=ctx)

    __class_getitem__ = classmethod(type(list[int]))


Queue.__class_getitem__ = classmethod(type(list[int]))
