"""SharedMemory and ShareableList: the standard library's API over named POSIX segments.

Segments are named as the standard library names them ("/psm_" + hex), created and attached in
C (shm_open close-on-exec, ftruncate, fstat), so cpool and standard-library processes attach to
each other's segments.

Cleanup, without a tracker server: a segment created with track=True is registered with a
watcher process (cpool._shm_watcher) that reads from a pipe whose write end every process of
the program holds: inherited over fork, passed by fd to spawn and forkserver children. The
kernel delivers EOF to the watcher only when the
last holder has exited -- normal exit, exception or SIGKILL alike -- and only then does it
unlink what is still registered. So a segment is never unlinked while any process of the
program runs (even if its creator exited), and is always unlinked once all have ended. unlink()
and resource_tracker.unregister() take a name off the watcher's list; nothing ever prints a
"leaked" warning. Why a pipe: EOF on a pipe is the one signal of "all of these processes are
gone" that needs no polling and cannot be missed. Only the creator registers a segment (the
standard library's 3.13 also registers on attach with track=True, so an attaching process that
exits takes the segment from the others). The watcher starts at the first tracked segment, the
first spawn/forkserver child, or the first child of a process that has imported this module.
Limitation: a forked child that imports this module only after the fork, in a program whose
main process never did, starts its own watcher; its segments then live until it and its own
children have ended.
"""
import mmap
import os
import secrets
import struct
import types

from cpool import _core, resource_tracker
from functools import partial  # noqa: F401  (a name the stdlib module has)

__all__ = ["SharedMemory", "ShareableList"]

_USE_POSIX = True
_O_CREX = os.O_CREAT | os.O_EXCL
_SHM_SAFE_NAME_LENGTH = 14
_SHM_NAME_PREFIX = "/psm_"


def _make_filename():
    nbytes = (_SHM_SAFE_NAME_LENGTH - len(_SHM_NAME_PREFIX)) // 2
    return _SHM_NAME_PREFIX + secrets.token_hex(nbytes)


class SharedMemory:
    """A named block of shared memory, created (create=True) or attached by name."""

    _name = None
    _fd = -1
    _mmap = None
    _buf = None
    # shm_open's flags and mode, as in the standard library (a subclass may set _flags to
    # O_CREAT | O_RDWR to attach-or-create).
    _flags = os.O_RDWR
    _mode = 0o600
    _prepend_leading_slash = True
    _track = True

    def __init__(self, name=None, create=False, size=0, *, track=True):
        if not size >= 0:
            raise ValueError("'size' must be a positive integer")
        if create:
            self._flags = _O_CREX | os.O_RDWR
            if size == 0:
                raise ValueError("'size' must be a positive number different from zero")
        if name is None and not self._flags & os.O_EXCL:
            raise ValueError("'name' can only be None if create=True")
        self._track = track
        if name is None:
            while True:
                name = _make_filename()
                try:
                    self._fd, size = _core.shm_open(name, self._flags, self._mode, size)
                except FileExistsError:
                    continue
                break
        else:
            name = "/" + name if self._prepend_leading_slash else name
            self._fd, size = _core.shm_open(name, self._flags, self._mode,
                                            size if create else 0)
        self._name = name
        try:
            self._mmap = mmap.mmap(self._fd, size)
        except BaseException:
            self.close_fd_only()
            if create:
                _core.shm_unlink(name)
            raise
        self._size = size
        self._buf = memoryview(self._mmap)
        # Only the creator registers: an attaching process that exits must not take the
        # segment away from the others (the standard library's 3.13 does, with track=True).
        if create and track:
            resource_tracker.register(self._name, "shared_memory")

    def close_fd_only(self):
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        try:
            self.close()
        except OSError:
            pass

    def __reduce__(self):
        return (self.__class__, (self.name, False, self.size))

    def __repr__(self):
        return f"{self.__class__.__name__}({self.name!r}, size={self.size})"

    @property
    def buf(self):
        "A memoryview of contents of the shared memory block."
        return self._buf

    @property
    def name(self):
        "Unique name that identifies the shared memory block."
        reported = self._name
        if self._prepend_leading_slash and self._name.startswith("/"):
            reported = self._name[1:]
        return reported

    @property
    def size(self):
        "Size in bytes."
        return self._size

    def close(self):
        """Closes access to the shared memory from this instance but does
        not destroy the shared memory block."""
        if self._buf is not None:
            self._buf.release()
            self._buf = None
        if self._mmap is not None:
            self._mmap.close()
            self._mmap = None
        self.close_fd_only()

    def unlink(self):
        """Requests that the underlying shared memory block be destroyed.

        Called once across all handles; the segment goes away once every handle is closed."""
        if self._name:
            _core.shm_unlink(self._name)
            if self._track:
                resource_tracker.unregister(self._name, "shared_memory")


_encoding = "utf8"


class ShareableList:
    """A fixed-length list of int/float/bool/str/bytes/None in one shared segment, laid out as
    the standard library lays it out: count, end offsets, packed values, struct formats, and
    one back-transform code per item."""

    _types_mapping = {int: "q", float: "d", bool: "xxxxxxx?", str: "%ds", bytes: "%ds",
                      type(None): "xxxxxx?x"}
    _alignment = 8
    _back_transforms_mapping = {
        0: lambda value: value,
        1: lambda value: value.rstrip(b"\x00").decode(_encoding),
        2: lambda value: value.rstrip(b"\x00"),
        3: lambda _value: None,
    }

    @staticmethod
    def _extract_recreation_code(value):
        if not isinstance(value, (str, bytes, type(None))):
            return 0
        if isinstance(value, str):
            return 1
        if isinstance(value, bytes):
            return 2
        return 3

    def __init__(self, sequence=None, *, name=None):
        if name is None or sequence is not None:
            sequence = sequence or ()
            formats = [
                self._types_mapping[type(item)]
                if not isinstance(item, (str, bytes))
                else self._types_mapping[type(item)] % (
                    self._alignment * (len(item) // self._alignment + 1),)
                for item in sequence
            ]
            self._list_len = len(formats)
            assert sum(len(fmt) <= 8 for fmt in formats) == self._list_len
            offset = 0
            self._allocated_offsets = [0]
            for fmt in formats:
                offset += self._alignment if fmt[-1] != "s" else int(fmt[:-1])
                self._allocated_offsets.append(offset)
            codes = [self._extract_recreation_code(item) for item in sequence]
            requested = struct.calcsize(
                "q" + self._format_size_metainfo + "".join(formats)
                + self._format_packing_metainfo + self._format_back_transform_codes)
            self.shm = SharedMemory(name, create=True, size=requested)
        else:
            self.shm = SharedMemory(name)

        if sequence is not None:
            _enc = _encoding
            struct.pack_into("q" + self._format_size_metainfo, self.shm.buf, 0,
                             self._list_len, *self._allocated_offsets)
            struct.pack_into("".join(formats), self.shm.buf, self._offset_data_start,
                             *(v.encode(_enc) if isinstance(v, str) else v for v in sequence))
            struct.pack_into(self._format_packing_metainfo, self.shm.buf,
                             self._offset_packing_formats, *(v.encode(_enc) for v in formats))
            struct.pack_into(self._format_back_transform_codes, self.shm.buf,
                             self._offset_back_transform_codes, *codes)
        else:
            self._list_len = len(self)
            self._allocated_offsets = list(struct.unpack_from(
                self._format_size_metainfo, self.shm.buf, 1 * 8))

    def _get_packing_format(self, position):
        position = position if position >= 0 else position + self._list_len
        if position >= self._list_len or self._list_len < 0:
            raise IndexError("Requested position out of range.")
        v = struct.unpack_from("8s", self.shm.buf,
                               self._offset_packing_formats + position * 8)[0]
        return v.rstrip(b"\x00").decode(_encoding)

    def _get_back_transform(self, position):
        if position >= self._list_len or self._list_len < 0:
            raise IndexError("Requested position out of range.")
        code = struct.unpack_from("b", self.shm.buf,
                                  self._offset_back_transform_codes + position)[0]
        return self._back_transforms_mapping[code]

    def _set_packing_format_and_transform(self, position, fmt_as_str, value):
        if position >= self._list_len or self._list_len < 0:
            raise IndexError("Requested position out of range.")
        struct.pack_into("8s", self.shm.buf, self._offset_packing_formats + position * 8,
                         fmt_as_str.encode(_encoding))
        struct.pack_into("b", self.shm.buf, self._offset_back_transform_codes + position,
                         self._extract_recreation_code(value))

    def __getitem__(self, position):
        position = position if position >= 0 else position + self._list_len
        try:
            offset = self._offset_data_start + self._allocated_offsets[position]
            (v,) = struct.unpack_from(self._get_packing_format(position), self.shm.buf, offset)
        except IndexError:
            raise IndexError("index out of range")
        return self._get_back_transform(position)(v)

    def __setitem__(self, position, value):
        position = position if position >= 0 else position + self._list_len
        try:
            item_offset = self._allocated_offsets[position]
            offset = self._offset_data_start + item_offset
            current_format = self._get_packing_format(position)
        except IndexError:
            raise IndexError("assignment index out of range")
        if not isinstance(value, (str, bytes)):
            new_format = self._types_mapping[type(value)]
            encoded_value = value
        else:
            allocated_length = self._allocated_offsets[position + 1] - item_offset
            encoded_value = value.encode(_encoding) if isinstance(value, str) else value
            if len(encoded_value) > allocated_length:
                raise ValueError("bytes/str item exceeds available storage")
            # A str/bytes slot keeps its format; another type's slot (8 bytes) becomes one.
            new_format = current_format if current_format[-1] == "s" else "%ds" % allocated_length
        self._set_packing_format_and_transform(position, new_format, value)
        struct.pack_into(new_format, self.shm.buf, offset, encoded_value)

    def __reduce__(self):
        return partial_from_name, (self.shm.name,)

    def __len__(self):
        return struct.unpack_from("q", self.shm.buf, 0)[0]

    def __repr__(self):
        return f"{self.__class__.__name__}({list(self)}, name={self.shm.name!r})"

    @property
    def format(self):
        "The struct packing format used by all currently stored items."
        return "".join(self._get_packing_format(i) for i in range(self._list_len))

    @property
    def _format_size_metainfo(self):
        return "q" * (self._list_len + 1)

    @property
    def _format_packing_metainfo(self):
        return "8s" * self._list_len

    @property
    def _format_back_transform_codes(self):
        return "b" * self._list_len

    @property
    def _offset_data_start(self):
        return (self._list_len + 2) * 8

    @property
    def _offset_packing_formats(self):
        return self._offset_data_start + self._allocated_offsets[-1]

    @property
    def _offset_back_transform_codes(self):
        return self._offset_packing_formats + self._list_len * 8

    def count(self, value):
        "L.count(value) -> integer -- return number of occurrences of value."
        return sum(value == entry for entry in self)

    def index(self, value):
        """L.index(value) -> integer -- return first index of value.
        Raises ValueError if the value is not present."""
        for position, entry in enumerate(self):
            if value == entry:
                return position
        raise ValueError(f"{value!r} not in this container")

    __class_getitem__ = classmethod(types.GenericAlias)


def partial_from_name(name):
    return ShareableList(name=name)

