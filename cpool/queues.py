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

Code written against the standard library's internals finds what it reaches for:
`_reader` / `_writer`, Connection-like ends whose `fileno()` can be waited on with `select`,
`connection.wait()` or `selectors` (readable exactly while the queue holds a message: the ring's
eventfd, kept up to date once someone asks for it, see src/core/ring.h), `recv()` / `send()`,
`recv_bytes()` / `send_bytes()` with pickles on the wire, `close()`; and the
`_on_queue_feeder_error(e, obj)` hook: a subclass that overrides it (concurrent.futures does) gets
it called for an object put() cannot pickle, as the standard library's feeder thread calls it,
instead of the exception.
"""
import os
import queue as _queue
import weakref

from . import _core
from . import context
# Names the standard library's queues module has from its imports; code reaches for them there.
from .reduction import ForkingPickler as _ForkingPickler  # noqa: E402,F401
from .util import debug, info, Finalize, register_after_fork, is_exiting  # noqa: E402,F401

__all__ = ['Queue', 'SimpleQueue', 'JoinableQueue']

# The standard library's feeder-thread stop marker; cpool has no feeder thread, but libraries
# (loky, joblib) import the name and compare items against it.
_sentinel = object()

Empty = _queue.Empty
Full = _queue.Full


def _rebuild(cls, dupfd, dupnotify, joinable):
    # In a spawned child: map the parent's ring from the fds it was handed (then close them:
    # the queue keeps its own duplicates).
    fd, notify_fd = (d.detach() if hasattr(d, 'detach') else d for d in (dupfd, dupnotify))
    q = cls.__new__(cls)
    try:
        _core.Queue.__init__(q, fd=fd, notify_fd=notify_fd, joinable=joinable)
    finally:
        os.close(fd)
        os.close(notify_fd)
    return q


class _End(object):
    """One end of a queue as the standard library's Queue._reader / _writer Connection shows it.

    Holds the queue weakly (the queue holds its ends), so an end outliving its queue is closed."""
    __slots__ = ('_queue', '_closed', '__weakref__')

    def __init__(self, queue):
        self._queue = weakref.ref(queue)
        self._closed = False

    def _open_queue(self):
        q = self._queue()
        if self._closed or q is None or q._closed:
            raise OSError('handle is closed')
        return q

    @property
    def closed(self):
        q = self._queue()
        return self._closed or q is None or q._closed

    def close(self):
        self._closed = True

    def __repr__(self):
        return '<%s of %r%s>' % (type(self).__name__, self._queue(), ' closed' if self.closed else '')


class _Reader(_End):
    readable, writable = True, False

    def fileno(self):
        """An eventfd that polls readable exactly while the queue holds a message."""
        return self._open_queue()._notify_arm()

    def recv(self):
        return _core.Queue.get(self._open_queue())

    def recv_bytes(self, maxlength=None):
        # The message as its pickle, as it would have crossed the standard library's pipe.
        from .reduction import ForkingPickler
        data = bytes(ForkingPickler.dumps(self.recv()))
        if maxlength is not None and len(data) > maxlength:
            raise OSError("bad message length")
        return data

    def poll(self, timeout=0.0):
        from .connection import wait
        return bool(wait([self], timeout))


class _Writer(_End):
    readable, writable = False, True

    def send(self, obj):
        _core.Queue.put(self._open_queue(), obj)

    def send_bytes(self, buf, offset=0, size=None):
        view = memoryview(buf).cast('B')
        if offset < 0 or offset > len(view):
            raise ValueError("offset out of bounds")
        if size is None:
            size = len(view) - offset
        elif size < 0 or offset + size > len(view):
            raise ValueError("buffer length < offset + size")
        self._open_queue()._put_pickled(view[offset:offset + size])


class Queue(_core.Queue):
    """A process-shared FIFO queue (multiprocessing.Queue's API).

    The methods put/get/qsize/... are the C type's own, so a call goes straight to C (and
    __slots__ spares the method lookup a miss in an instance dict)."""

    __slots__ = ('_ctx', '_ends', '__weakref__')

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
        return _rebuild, (type(self), DupFd(self.fileno()), DupFd(self._notify_fileno()),
                          self._is_joinable)

    def _end(self, which):
        try:
            ends = self._ends
        except AttributeError:
            ends = self._ends = (_Reader(self), _Writer(self))
        return ends[which]

    @property
    def _reader(self):
        return self._end(0)

    @property
    def _writer(self):
        return self._end(1)

    def _poll(self, timeout=0.0):
        return self._reader.poll(timeout)

    @staticmethod
    def _on_queue_feeder_error(e, obj):
        """Called for an object that cannot be put, when a subclass overrides it (the standard
        library's hook). Queue itself raises in put() instead; a subclass that chains to this
        gets the standard library's report."""
        import traceback
        traceback.print_exc()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls._on_queue_feeder_error is not Queue._on_queue_feeder_error and 'put' not in cls.__dict__:
            cls.put = Queue._put_to_feeder_hook
            cls.put_nowait = Queue._put_nowait_to_feeder_hook

    def _put_to_feeder_hook(self, obj, block=True, timeout=None):
        # A subclass with its own _on_queue_feeder_error: the errors the standard library's feeder
        # thread would meet (pickling, size) go to the hook; Full and a closed queue still raise.
        try:
            _core.Queue.put(self, obj, block, timeout)
        except Full:
            raise
        except Exception as e:
            if self._closed:
                raise
            self._on_queue_feeder_error(e, obj)

    def _put_nowait_to_feeder_hook(self, obj):
        return self.put(obj, False)

    def _terminate_broken(self):
        # concurrent.futures (3.12+) closes a queue this way when its pool broke.
        self._reader.close()
        self.close()
        self.join_thread()

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
