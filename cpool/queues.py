"""Queue, SimpleQueue and JoinableQueue: messages in shared memory, managed in C.

No feeder thread and no pipe: put() pickles in the caller (so an unpicklable object raises
right there and the queue stays usable) and copies the message into shared memory; get()
copies it out. Common exact types (None, bool, int, float, str, bytes, bytearray) skip pickle.

Where messages live (src/core/ring.h): one memfd per queue holding a small resident "hot"
ring (4 MiB) used while readers keep up, and a sparse "cold" ring (memory only where written,
given back to the kernel once consumed) that takes the backlog and messages bigger than the hot
ring. The cold ring starts at 8 MiB of address space and grows on demand (shrinking back once
empty), so many queues fit in a limited address space (ulimit -v). So:
  - an unbounded queue's put() never waits for a reader while the address space lasts;
    a blocking put() of a big message may wait a few ms for a reader that is busy taking
    messages rather than spill (page faults cost more than the copy), never for an idle one;
  - a message may be as large as the address space allows; beyond that put() raises
    MemoryError naming the size;
  - a process that put items can always exit and be joined, read or not.
A process killed in the middle of put() or get() leaves the queue consistent (robust lock, and
counters published by one store at the end): a consumer killed mid-copy leaves the message for
the next one. Ctrl-C interrupts a blocking put/get/join, even when the process holding the
queue's lock is stopped, and a large copy between 8 MiB slices: an interrupted get() leaves
the message in the queue, an interrupted put() enqueued nothing.

Beyond the standard library: put_many(iterable) / get_many(max_messages) move a batch under
one lock; numpy arrays and other buffers are pickled with protocol 5 out-of-band buffers,
copied once into shared memory and received without another copy; a memoryview can be put
(it arrives as a memoryview); join(timeout) returns False at the timeout.
"""
import os
import queue as _queue

from . import _core
from . import context

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

# The standard library's feeder-thread stop marker; cpool has no feeder thread, but libraries
# (loky, joblib) import the name and compare items against it.
_sentinel = object()

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

    # The standard library's SimpleQueue closes both pipe ends in close(), so every use after it
    # is an OSError about the closed handle (a Queue's put says ValueError instead).
    def _check_open(self):
        if self._closed:
            raise OSError('handle is closed')

    def put(self, obj):
        self._check_open()
        Queue.put(self, obj)

    def get(self):
        self._check_open()
        return Queue.get(self)

    def empty(self):
        self._check_open()
        return Queue.empty(self)

    __class_getitem__ = classmethod(type(list[int]))


Queue.__class_getitem__ = classmethod(type(list[int]))
