"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and Barrier between processes.

Each lock, semaphore and event is a futex word in a 64-byte slot of cpool's shared-memory arena
(cpool.heap, src/core/arena.c): no named semaphores, no resource tracker, one fd per ~15000
objects. Lock, RLock, Semaphore, BoundedSemaphore and Event are subclasses of the C types, so
acquire/release/`with`/wait/set are single C calls, with no system call unless someone has to
sleep; a waiter spins briefly first when that has lately paid off (a peer on another core).
Blocking waits use CLOCK_MONOTONIC deadlines and wake every 80 ms to run signal handlers
(Ctrl-C interrupts any wait; the lock is then not taken) and to look for a dead owner.
Condition is the standard library's algorithm over three of these semaphores; Barrier is
threading.Barrier over that Condition with its state in shared memory.

Beyond the standard library:
- A Lock or RLock whose holder process dies is not lost: a waiter notices (within ~0.1 s) and
  takes it over, with an `OwnerDiedWarning` (a RuntimeWarning) saying that what the lock
  protected may be inconsistent. Turn the warning into an error
  (`warnings.simplefilter('error', OwnerDiedWarning)`) to get an exception instead; the lock is
  then not taken. Semaphores have no owner and are not taken over.
- Condition.notify waits at most NOTIFY_ACK_TIMEOUT seconds for each woken process to say it
  woke (the standard library waits for ever, so a waiter killed while sleeping hangs notify).
- A Barrier whose party died breaks when the others' timeout passes (BrokenBarrierError),
  as a threading.Barrier does.

Limits: an owner is recognised by its pid, so if the pid of a dead holder is reused by a new
process before anyone looks, the lock waits for that process instead. Lock.kind is cpool's own
MUTEX (2), not the standard library's SEMAPHORE (1): a Lock has an owner.
"""
import sys
import threading
import time

from . import _core
from . import context
from . import heap  # noqa: F401  (registers how arena handles reach spawned children)
from . import process

__all__ = ['Lock', 'RLock', 'Semaphore', 'BoundedSemaphore', 'Condition', 'Event', 'Barrier',
           'OwnerDiedWarning']

# The standard library's kind numbers, and cpool's own for Lock (a mutex with an owner pid).
RECURSIVE_MUTEX, SEMAPHORE, MUTEX = 0, 1, 2
SEM_VALUE_MAX = _core.SemLock.SEM_VALUE_MAX
OwnerDiedWarning = _core.OwnerDiedWarning
BrokenBarrierError = threading.BrokenBarrierError

# How long notify() waits for one woken process to report that it woke.
NOTIFY_ACK_TIMEOUT = 2.0


class SemLock(_core.SemLock):
    """Base of the locks and semaphores: the C lock itself (acquire, release, __enter__ and
    __exit__ are its C methods: one C call each), plus the Python API around it."""

    # No instance dict: `lock.acquire` then finds the C method without a dict lookup first.
    __slots__ = ('__weakref__',)

    def __new__(cls, kind, value, maxvalue, *, ctx=None):
        # The holder thread and recursion count are the creating process's: the C object
        # knows which process set them, so a forked child (by cpool or os.fork) holds nothing.
        return super().__new__(cls, kind, value, maxvalue)

    def __init__(self, *args, **kwargs):
        pass

    @property
    def _semlock(self):
        # The standard library keeps the C lock in this attribute; here the object is it.
        return self

    def __reduce__(self):
        context.assert_spawning(self)
        return heap.reduce_handle(self)

    def locked(self):
        """True if the lock is held (by any thread or process), or the semaphore is at zero:
        3.14's API, offered on every Python."""
        return self._get_value() == 0


class Semaphore(SemLock):
    __slots__ = ()

    def __new__(cls, value=1, *, ctx=None):
        return SemLock.__new__(cls, SEMAPHORE, value, SEM_VALUE_MAX)

    def get_value(self):
        return self._semlock._get_value()

    def __repr__(self):
        try:
            value = self._semlock._get_value()
        except Exception:
            value = 'unknown'
        return '<%s(value=%s)>' % (self.__class__.__name__, value)


class BoundedSemaphore(Semaphore):
    __slots__ = ()

    def __new__(cls, value=1, *, ctx=None):
        return SemLock.__new__(cls, SEMAPHORE, value, value)

    def __repr__(self):
        try:
            value = self._semlock._get_value()
        except Exception:
            value = 'unknown'
        return '<%s(value=%s, maxvalue=%s)>' % (self.__class__.__name__, value,
                                                self._semlock.maxvalue)


def _owner_name(semlock):
    if semlock._is_mine():
        name = process.current_process().name
        if threading.current_thread().name != 'MainThread':
            name += '|' + threading.current_thread().name
        return name
    if semlock._get_value() == 1:
        return 'None'
    if semlock._count() > 0:
        return 'SomeOtherThread'
    return 'SomeOtherProcess'


class Lock(SemLock):
    """A non-recursive lock; any process or thread may release it (as in the standard library)."""
    __slots__ = ()

    def __new__(cls, *, ctx=None):
        return SemLock.__new__(cls, MUTEX, 1, 1)

    def __repr__(self):
        try:
            name = _owner_name(self._semlock)
        except Exception:
            name = 'unknown'
        return '<%s(owner=%s)>' % (self.__class__.__name__, name)


class RLock(SemLock):
    """A recursive lock: only the thread that holds it may release it."""
    __slots__ = ()

    def __new__(cls, *, ctx=None):
        return SemLock.__new__(cls, RECURSIVE_MUTEX, 1, 1)

    def __repr__(self):
        try:
            name = _owner_name(self._semlock)
            if name == 'None':
                count = 0
            elif self._semlock._is_mine():
                count = self._semlock._count()
            else:
                count = 'nonzero'
        except Exception:
            name, count = 'unknown', 'unknown'
        return '<%s(%s, %s)>' % (self.__class__.__name__, name, count)


class Condition(object):
    """A condition variable over a Lock or RLock (an RLock of its own by default).

    Sleepers are counted in shared semaphores: notify(n) hands out at most n wake-ups and
    waits until that many sleepers took theirs, so a process that starts waiting after the
    notify cannot steal one."""

    def __init__(self, lock=None, *, ctx=None):
        ctx = ctx or context._default_context.get_context()
        self._lock = lock or ctx.RLock()
        self._sleeping_count = ctx.Semaphore(0)
        self._woken_count = ctx.Semaphore(0)
        self._wait_semaphore = ctx.Semaphore(0)
        self._make_methods()

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore)

    def __setstate__(self, state):
        (self._lock, self._sleeping_count, self._woken_count, self._wait_semaphore) = state
        self._make_methods()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def _make_methods(self):
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __repr__(self):
        try:
            num_waiters = (self._sleeping_count._semlock._get_value() -
                           self._woken_count._semlock._get_value())
        except Exception:
            num_waiters = 'unknown'
        return '<%s(%s, %s)>' % (self.__class__.__name__, self._lock, num_waiters)

    def wait(self, timeout=None):
        assert self._lock._semlock._is_mine(), 'must acquire() condition before using wait()'
        self._sleeping_count.release()
        # An RLock may be held several times: let go of all of them while sleeping.
        depth = self._lock._semlock._count()
        for _ in range(depth):
            self._lock.release()
        try:
            return self._wait_semaphore.acquire(True, timeout)
        finally:
            self._woken_count.release()
            for _ in range(depth):
                self._lock.acquire()

    def notify(self, n=1):
        assert self._lock._semlock._is_mine(), 'lock is not owned'
        # Sleepers that timed out since the last notify left a mark in woken_count: forget them.
        while self._woken_count.acquire(False):
            self._sleeping_count.acquire(False)
        woken = 0
        while woken < n and self._sleeping_count.acquire(False):
            self._wait_semaphore.release()
            woken += 1
        if not woken:
            return
        deadline = time.monotonic() + NOTIFY_ACK_TIMEOUT
        acked = 0
        while acked < woken:
            if not self._woken_count.acquire(True, max(0.0, deadline - time.monotonic())):
                # A sleeper that never answers was killed (or is stopped): leave its wake-up
                # to whoever waits next rather than wait for it for ever.
                return
            acked += 1
        # Sleepers that timed out just now may have left wake-ups nobody will take.
        while self._wait_semaphore.acquire(False):
            pass

    def notify_all(self):
        self.notify(n=sys.maxsize)

    def wait_for(self, predicate, timeout=None):
        result = predicate()
        if result:
            return result
        endtime = None if timeout is None else time.monotonic() + timeout
        waittime = None
        while not result:
            if endtime is not None:
                waittime = endtime - time.monotonic()
                if waittime <= 0:
                    break
            self.wait(waittime)
            result = predicate()
        return result


class Event(_core.Event):
    """A flag processes can wait for: one futex word; set/clear/is_set/wait are its C methods."""
    __slots__ = ('__weakref__',)

    def __new__(cls, *, ctx=None):
        return super().__new__(cls)

    def __init__(self, *, ctx=None):
        pass

    def __reduce__(self):
        context.assert_spawning(self)
        return heap.reduce_handle(self)

    def __repr__(self):
        set_status = 'set' if self.is_set() else 'unset'
        return f"<{type(self).__qualname__} at {id(self):#x} {set_status}>"


class Barrier(threading.Barrier):
    """threading.Barrier's logic with its condition and its two counters in shared memory."""

    def __init__(self, parties, action=None, timeout=None, *, ctx=None):
        ctx = ctx or context._default_context.get_context()
        wrapper = heap.BufferWrapper(8)
        cond = ctx.Condition()
        self.__setstate__((parties, action, timeout, cond, wrapper))
        self._state = 0
        self._count = 0

    def __setstate__(self, state):
        (self._parties, self._action, self._timeout, self._cond, self._wrapper) = state
        self._array = self._wrapper.create_memoryview().cast('i')

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._parties, self._action, self._timeout, self._cond, self._wrapper)

    @property
    def _state(self):
        return self._array[0]

    @_state.setter
    def _state(self, value):
        self._array[0] = value

    @property
    def _count(self):
        return self._array[1]

    @_count.setter
    def _count(self, value):
        self._array[1] = value
