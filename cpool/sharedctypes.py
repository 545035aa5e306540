"""ctypes objects in shared memory: RawValue, RawArray, Value, Array, synchronized, copy.

The memory comes from cpool's arena (cpool.heap): a slot run for small objects, a memfd of its
own above 16 KiB. Children get the objects by inheritance (fork) or as Process arguments
(spawn, forkserver); pickling them any other way raises RuntimeError, as in the standard library.
"""
import ctypes
import weakref

from . import heap
from . import reduction
from .context import assert_spawning, _default_context
from .context import _default_context as _ctx  # noqa: E402
get_context = _ctx.get_context  # a name the stdlib module has (from the package)
from .reduction import ForkingPickler as _ForkingPickler  # noqa: F401

__all__ = ['RawValue', 'RawArray', 'Value', 'Array', 'copy', 'synchronized']

typecode_to_type = {
    'c': ctypes.c_char, 'u': ctypes.c_wchar,
    'b': ctypes.c_byte, 'B': ctypes.c_ubyte,
    'h': ctypes.c_short, 'H': ctypes.c_ushort,
    'i': ctypes.c_int, 'I': ctypes.c_uint,
    'l': ctypes.c_long, 'L': ctypes.c_ulong,
    'q': ctypes.c_longlong, 'Q': ctypes.c_ulonglong,
    'f': ctypes.c_float, 'd': ctypes.c_double,
}


def _get_context(ctx):
    return ctx or _default_context.get_context()


def _new_value(type_):
    wrapper = heap.BufferWrapper(ctypes.sizeof(type_))
    return rebuild_ctype(type_, wrapper, None)


def RawValue(typecode_or_type, *args):
    """A ctypes object in shared memory, initialised with args (zeroed without)."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    obj = _new_value(type_)  # the memory is born zeroed
    obj.__init__(*args)
    return obj


def RawArray(typecode_or_type, size_or_initializer):
    """A ctypes array in shared memory: zeroed of that size, or a copy of the sequence."""
    type_ = typecode_to_type.get(typecode_or_type, typecode_or_type)
    if isinstance(size_or_initializer, int):
        return _new_value(type_ * size_or_initializer)
    result = _new_value(type_ * len(size_or_initializer))
    result.__init__(*size_or_initializer)
    return result


def _with_lock(obj, lock, ctx):
    if lock is False:
        return obj
    if lock in (True, None):
        lock = _get_context(ctx).RLock()
    if not hasattr(lock, 'acquire'):
        raise AttributeError("%r has no method 'acquire'" % lock)
    return synchronized(obj, lock, ctx=ctx)


def Value(typecode_or_type, *args, lock=True, ctx=None):
    """RawValue behind a lock (an RLock of its own unless one is given; none with lock=False)."""
    return _with_lock(RawValue(typecode_or_type, *args), lock, ctx)


def Array(typecode_or_type, size_or_initializer, *, lock=True, ctx=None):
    """RawArray behind a lock (an RLock of its own unless one is given; none with lock=False)."""
    return _with_lock(RawArray(typecode_or_type, size_or_initializer), lock, ctx)


def copy(obj):
    """A copy of a ctypes object, in new shared memory."""
    new_obj = _new_value(type(obj))
    ctypes.pointer(new_obj)[0] = obj
    return new_obj


def synchronized(obj, lock=None, ctx=None):
    """Wrap a ctypes object so every access holds lock."""
    assert not isinstance(obj, SynchronizedBase), 'object already synchronized'
    ctx = _get_context(ctx)
    if isinstance(obj, ctypes._SimpleCData):
        return Synchronized(obj, lock, ctx)
    if isinstance(obj, ctypes.Array):
        if obj._type_ is ctypes.c_char:
            return SynchronizedString(obj, lock, ctx)
        return SynchronizedArray(obj, lock, ctx)
    cls = type(obj)
    try:
        scls = class_cache[cls]
    except KeyError:
        props = {name: make_property(name) for name, *_ in cls._fields_}
        scls = class_cache[cls] = type('Synchronized' + cls.__name__, (SynchronizedBase,), props)
    return scls(obj, lock, ctx)


# ---- pickling: only to a child being started, by handing over the shared memory ----

def reduce_ctype(obj):
    wrapper = getattr(obj, '_wrapper', None)
    if wrapper is None:
        # An ordinary ctypes object of a type we registered: pickles as ctypes does it.
        return obj.__reduce_ex__(reduction.PROTOCOL)
    assert_spawning(obj)
    if isinstance(obj, ctypes.Array):
        return rebuild_ctype, (obj._type_, wrapper, obj._length_)
    return rebuild_ctype, (type(obj), wrapper, None)


def rebuild_ctype(type_, wrapper, length):
    if length is not None:
        type_ = type_ * length
    reduction.register(type_, reduce_ctype)
    obj = type_.from_buffer(wrapper.create_memoryview())
    obj._wrapper = wrapper
    return obj


# ---- synchronized wrappers ----

prop_cache = {}
class_cache = weakref.WeakKeyDictionary()


def make_property(name):
    try:
        return prop_cache[name]
    except KeyError:
        pass

    def fget(self):
        with self._lock:
            return getattr(self._obj, name)

    def fset(self, value):
        with self._lock:
            setattr(self._obj, name, value)

    prop_cache[name] = prop = property(fget, fset, doc='%s, read and written under the lock' % name)
    return prop


class SynchronizedBase(object):

    def __init__(self, obj, lock=None, ctx=None):
        self._obj = obj
        self._lock = lock if lock else _get_context(ctx).RLock()
        self.acquire = self._lock.acquire
        self.release = self._lock.release

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *args):
        return self._lock.__exit__(*args)

    def __reduce__(self):
        assert_spawning(self)
        return synchronized, (self._obj, self._lock)

    def get_obj(self):
        return self._obj

    def get_lock(self):
        return self._lock

    def __repr__(self):
        return '<%s wrapper for %s>' % (type(self).__name__, self._obj)


class Synchronized(SynchronizedBase):
    value = make_property('value')


class SynchronizedArray(SynchronizedBase):

    def __len__(self):
        return len(self._obj)

    def __getitem__(self, i):
        with self:
            return self._obj[i]

    def __setitem__(self, i, value):
        with self:
            self._obj[i] = value

    def __getslice__(self, start, stop):
        with self:
            return self._obj[start:stop]

    def __setslice__(self, start, stop, values):
        with self:
            self._obj[start:stop] = values


class SynchronizedString(SynchronizedArray):
    value = make_property('value')
    raw = make_property('raw')
