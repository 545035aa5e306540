"""Lock, RLock, Semaphore, BoundedSemaphore, Condition, Event and Barrier between processes.

Each lock, semaphore and event is a futex word in a 64-byte slot of cpool's shared-memory arena
(cpool.heap, src/core/arena.c): no named semaphores, no resource tracker, one fd per ~15000
objects. Lock, RLock, Semaphore, BoundedSemaphore and Event are subclasses of the C types, so
acquire/release/`with`/wait/set are single C calls, with no system call unless someone has to
sleep; a waiter spins briefly first when that has lately paid off (a peer on another core).
Blocking waits use CLOCK_MONOTONIC deadlines and wake every 80 ms to run signal handlers
(Ctrl-C interrupts any wait; the lock is then not taken) and to look for a dead owner.
Condition keeps its sleepers in a shared table (one futex word each, named by pid and start
time); Barrier is threading.Barrier over that Condition with its state in shared memory.

Beyond the standard library:
- A Lock or RLock whose holder process dies is not lost: a waiter notices (within ~0.1 s) and
  takes it over, with an `OwnerDiedWarning` (a RuntimeWarning) saying that what the lock
  protected may be inconsistent. Turn the warning into an error
  (`warnings.simplefilter('error', OwnerDiedWarning)`) to get an exception instead; the lock is
  then not taken. Semaphores have no owner and are not taken over.
- Condition.notify never waits for the woken to answer (the standard library waits for ever,
  so a waiter killed while sleeping hangs its notify); a killed sleeper is passed over, and the
  next live one woken in its place. At most 255 threads and processes wait on one Condition.
- A Barrier whose party died while waiting breaks within ~0.1 s of the death
  (BrokenBarrierError for every party waiting and for any that arrives later), and one whose
  last party arrives after another died breaks instead of passing.

An owner is recognised by its pid and its start time (/proc/PID/stat): when the pid of a dead
holder was given to a new process, the start times differ and the holder is dead all the same.
Start times count clock ticks (10 ms), so only a pid reused within the tick the holder started
in would be mistaken, which the kernel's pid allocation never does in practice.
Lock.kind is cpool's own MUTEX (2), not the standard library's SEMAPHORE (1): a Lock has an
owner.
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


class _Reading(object):
    """A count read on demand, in the shape of a Semaphore's get_value()."""
    __slots__ = ('get_value',)

    def __init__(self, get_value):
        self.get_value = get_value


class Condition(object):
    """A condition variable over a Lock or RLock (an RLock of its own by default).

    Each sleeper takes a slot in shared memory naming it by pid and start time
    (_core.CondWaiters) and sleeps on that slot alone: notify(n) marks the n oldest sleepers
    woken and returns at once, without waiting for them to answer, so a process that starts
    waiting after the notify cannot steal a wake-up, and a sleeper that was killed is passed
    over (the next live one is woken instead)."""

    def __init__(self, lock=None, *, ctx=None):
        ctx = ctx or context._default_context.get_context()
        self._lock = lock or ctx.RLock()
        self._waiters = _core.CondWaiters()
        # Whether notify frees a dead sleeper's slot; a Barrier keeps them to count its dead.
        self._reclaim = True
        self._make_methods()

    def __getstate__(self):
        context.assert_spawning(self)
        return (self._lock, self._waiters, self._reclaim)

    def __setstate__(self, state):
        (self._lock, self._waiters, self._reclaim) = state
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
            num_waiters = self._waiters._sleeping()
        except Exception:
            num_waiters = 'unknown'
        return '<%s(%s, %s)>' % (self.__class__.__name__, self._lock, num_waiters)

    # The standard library's counters, read by code that checks for sleepers (CPython's own
    # tests do: sleeping minus woken, and the wake-ups not yet taken). Here sleepers are the
    # table's, and a wake-up is never left lying about.
    @property
    def _sleeping_count(self):
        return _Reading(self._waiters._sleeping)

    @property
    def _woken_count(self):
        return _Reading(int)

    _wait_semaphore = _woken_count

    def _sleep(self, timeout, watch):
        # 1 woken, 0 timed out, 2 (watch) another sleeper died.
        assert self._lock._semlock._is_mine(), 'must acquire() condition before using wait()'
        slot = self._waiters._enlist()
        # An RLock may be held several times: let go of all of them while sleeping.
        depth = self._lock._semlock._count()
        for _ in range(depth):
            self._lock.release()
        try:
            return self._waiters._sleep(slot, timeout, watch)
        finally:
            for _ in range(depth):
                self._lock.acquire()

    def wait(self, timeout=None):
        return self._sleep(timeout, False) == 1

    def notify(self, n=1):
        assert self._lock._semlock._is_mine(), 'lock is not owned'
        self._waiters._notify(n, self._reclaim)

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
        cond._reclaim = False  # a party that died sleeping stays counted until _reap_dead
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

    # A party that died while waiting never takes back its count: each death the waiters'
    # table reports (a sleeper checks every 30 ms while it waits) breaks the barrier and
    # gives the count back, under the lock.

    def _reap_dead(self):
        dead = self._cond._waiters._reap()
        if dead:
            self._count -= dead
        return dead

    def _release(self):
        if self._reap_dead():
            self._break()
            raise BrokenBarrierError
        super()._release()
        self._reap_dead()  # died just as it was released: its count, not its wake-up, is back

    def _wait(self, timeout):
        # threading.Barrier._wait, its wait_for written out to see a death while sleeping.
        endtime = None if timeout is None else time.monotonic() + timeout
        while self._state == 0:
            left = None if endtime is None else endtime - time.monotonic()
            if (left is not None and left <= 0) or self._cond._sleep(left, True) == 2:
                if self._state == 0:
                    self._break()
                raise BrokenBarrierError
        if self._state < 0:
            raise BrokenBarrierError
        assert self._state == 1

    def _break(self):
        super()._break()
        self._reap_dead()
