"""Objects a manager's server serves for SyncManager's Queue, Lock, RLock, Semaphore,
BoundedSemaphore, Condition and Event, whose blocking calls notice that their caller died.

A server thread blocked in q.get() for a client that was killed would otherwise wake up
later and take an item (or a lock) for nobody. Blocking waits run in slices; between
slices the thread checks its client's connection (set in _serving by the server's request
loop in cpool.managers), which never has anything to read during a call unless the client
hung up; then _PeerGone abandons the call and the server releases what the client held."""
import queue
import threading
import time


class _PeerGone(BaseException):
    """The client whose call was blocked went away: the call is abandoned."""


_serving = threading.local()
_SLICE = 0.1


def _check_peer():
    conn = getattr(_serving, 'conn', None)
    if conn is not None:
        try:
            gone = conn.poll(0)
        except (OSError, EOFError, ValueError):
            gone = True
        if gone:
            raise _PeerGone()


def _sliced(wait, timeout, exc=None):
    """wait(t) until it gives a true result, in slices of at most _SLICE with the client
    checked between them; timeout None is for ever. With exc, wait signals "not yet" by
    raising exc instead of returning a false value."""
    if getattr(_serving, 'conn', None) is None:
        return wait(timeout)
    if timeout is not None and timeout < 0:
        timeout = 0
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        t = _SLICE if deadline is None else max(0.0, min(_SLICE, deadline - time.monotonic()))
        if exc is None:
            r = wait(t)
            if r:
                return r
        else:
            try:
                return wait(t)
            except exc:
                if deadline is not None and time.monotonic() >= deadline:
                    raise
                r = None
        if deadline is not None and time.monotonic() >= deadline:
            return r
        _check_peer()


class _Queue(queue.Queue):
    def get(self, block=True, timeout=None):
        if not block:
            return super().get(False)
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        item = _sliced(lambda t: queue.Queue.get(self, True, t), timeout, queue.Empty)
        try:
            _check_peer()
        except _PeerGone:
            # Taken for a client that died while it waited: back at the front for the others.
            with self.mutex:
                self.queue.appendleft(item)
                self.not_empty.notify()
            raise
        return item

    def put(self, item, block=True, timeout=None):
        if not block:
            return super().put(item, False)
        if timeout is not None and timeout < 0:
            raise ValueError("'timeout' must be a non-negative number")
        return _sliced(lambda t: queue.Queue.put(self, item, True, t), timeout, queue.Full)

    def join(self):
        if getattr(_serving, 'conn', None) is None:
            return super().join()
        with self.all_tasks_done:
            while self.unfinished_tasks:
                self.all_tasks_done.wait(_SLICE)
                if self.unfinished_tasks:
                    _check_peer()


def _remove_identical(lst, x):
    for i in range(len(lst) - 1, -1, -1):
        if lst[i] is x:
            del lst[i]
            return True
    return False


class _Acquirer(object):
    """A threading lock or semaphore; locks remember which client holds them, so that a
    client that dies holding one does not lock everyone else out for ever."""
    _factory = None
    _owned = False

    def __init__(self, *args):
        self._lock = self._factory(*args)
        self._holders = []  # the `held` lists of the serving threads holding the lock

    def acquire(self, blocking=True, timeout=-1):
        if not blocking:
            if timeout not in (-1, None):
                raise ValueError("can't specify a timeout for a non-blocking call")
            ok = self._lock.acquire(False)
        else:
            wait = lambda t: self._lock.acquire(True, -1 if t is None else t)
            ok = _sliced(wait, None if timeout in (-1, None) else timeout)
            if ok:
                try:
                    _check_peer()
                except _PeerGone:
                    self._lock.release()  # got it for a client that died meanwhile
                    raise
        if ok and self._owned:
            held = getattr(_serving, 'held', None)
            if held is not None:
                held.append(self)
                self._holders.append(held)
        return ok

    def release(self):
        if self._owned and self._holders:
            mine = getattr(_serving, 'held', None)
            if not _remove_identical(self._holders, mine):
                if self._owner_checked():
                    mine = self._holders.pop()
            if mine is not None:
                _remove_identical(mine, self)
        self._lock.release()

    def _owner_checked(self):
        return True

    def _forget_holder(self):
        # The client left in order holding the lock: it stays held, as in the standard library.
        _remove_identical(self._holders, getattr(_serving, 'held', None))

    def _release_for_dead_peer(self):
        _Acquirer._forget_holder(self)  # not an RLock's: it comes back here
        try:
            self._lock.release()
        except RuntimeError:
            pass

    __enter__ = acquire

    def __exit__(self, *args):
        self.release()

    def __repr__(self):
        return repr(self._lock)


class _Lock(_Acquirer):
    _factory = staticmethod(threading.Lock)
    _owned = True

    def locked(self):
        return self._lock.locked()


class _RLock(_Acquirer):
    _factory = staticmethod(threading.RLock)
    _owned = True

    def _owner_checked(self):
        # Only the owning thread may release an RLock: a stray release raises below.
        return False

    def _forget_holder(self):
        # Owned by the server thread that served the departed client: nobody could ever
        # release it again, so it is released even though the client left in order.
        self._release_for_dead_peer()

    def locked(self):
        # threading.RLock has locked() from 3.14 only; before, a serving thread that does not
        # own the lock probes it without blocking (its own hold would make the probe succeed).
        if hasattr(self._lock, 'locked'):
            return self._lock.locked()
        if self._lock._is_owned():
            return True
        if self._lock.acquire(False):
            self._lock.release()
            return False
        return True

    # What threading.Condition needs to wait on this lock.
    def _is_owned(self):
        return self._lock._is_owned()

    def _release_save(self):
        return self._lock._release_save()

    def _acquire_restore(self, state):
        self._lock._acquire_restore(state)


class _Semaphore(_Acquirer):
    _factory = staticmethod(threading.Semaphore)


class _BoundedSemaphore(_Acquirer):
    _factory = staticmethod(threading.BoundedSemaphore)


class _Condition(threading.Condition):
    def __init__(self, lock=None):
        super().__init__(_RLock() if lock is None else lock)
        if isinstance(self._lock, _Acquirer):
            self.acquire = self._lock.acquire
            self.release = self._lock.release

    def wait(self, timeout=None):
        if getattr(_serving, 'conn', None) is None:
            return super().wait(timeout)
        # threading.Condition's own wait, with only the sleep on the waiter lock sliced: a
        # notify that lands between two slices releases that lock, so the next slice sees it.
        # (Slicing super().wait() instead lost such a notify: the timed-out slice dropped its
        # waiter after notify() had taken it, and the next slice waited for another one.)
        if not self._is_owned():
            raise RuntimeError("cannot wait on un-acquired lock")
        waiter = threading.Lock()
        waiter.acquire()
        self._waiters.append(waiter)
        saved_state = self._release_save()
        gotit = False
        try:
            gotit = _sliced(lambda t: waiter.acquire(True, t), timeout)
            return gotit
        finally:
            self._acquire_restore(saved_state)
            if not gotit:
                try:
                    self._waiters.remove(waiter)
                except ValueError:
                    pass


class _Event(threading.Event):
    def wait(self, timeout=None):
        return _sliced(super().wait, timeout)
