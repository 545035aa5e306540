"""The plain loop: an in-process stand-in for Pool (no processes, no pickling) that runs each case's
very code, so the table answers "does my script get faster with a Pool than without one"."""


class AsyncResult:
    """A call that has already run: get() gives its value or raises its exception."""

    def __init__(self, fn, args, kwds, callback, error_callback):
        try:
            self._value, self._ok = fn(*args, **kwds), True
        except Exception as exc:
            self._value, self._ok = exc, False
        if self._ok and callback is not None:
            callback(self._value)
        elif not self._ok and error_callback is not None:
            error_callback(self._value)

    def ready(self):
        return True

    def successful(self):
        return self._ok

    def wait(self, timeout=None):
        pass

    def get(self, timeout=None):
        if self._ok:
            return self._value
        raise self._value


class Pool:
    """Pool's methods over a plain loop in the calling process, in the order a Pool returns."""

    def __init__(self, processes=None, initializer=None, initargs=()):
        if initializer is not None:
            initializer(*initargs)

    def apply(self, fn, args=(), kwds={}):
        return fn(*args, **kwds)

    def apply_async(self, fn, args=(), kwds={}, callback=None, error_callback=None):
        return AsyncResult(fn, args, kwds, callback, error_callback)

    def map(self, fn, iterable, chunksize=None):
        return list(map(fn, iterable))

    def starmap(self, fn, iterable, chunksize=None):
        return [fn(*args) for args in iterable]

    def imap(self, fn, iterable, chunksize=1):
        return map(fn, iterable)  # lazy, as Pool.imap reads its input

    imap_unordered = imap

    def close(self):
        pass

    def terminate(self):
        pass

    def join(self):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
