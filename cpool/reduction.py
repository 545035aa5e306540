"""Pickling between processes: ForkingPickler, fd hand-over to children, SCM_RIGHTS fd passing.

cpool's C code pickles with the `pickle` module's C implementation directly (protocol 5), so
reducers registered here go into copyreg's table, where that fast path finds them too.
"""
import array
import copyreg
import io
import os
import pickle
import socket
import sys

from . import context

__all__ = ['send_handle', 'recv_handle', 'ForkingPickler', 'register', 'dump', 'DupFd',
           'sendfds', 'recvfds']

HAVE_SEND_HANDLE = True
ACKNOWLEDGE = sys.platform == 'darwin'  # a received fd needs an ack (macOS), as the stdlib says
# The running Python's default, as the standard library's ForkingPickler has it (4 up to 3.13,
# 5 from 3.14). The C paths (Connection.send, Queue, Pool) pickle with 5 on every version:
# they need its out-of-band buffers, and every supported Python reads it.
PROTOCOL = pickle.DEFAULT_PROTOCOL


class ForkingPickler(pickle.Pickler):
    """Pickler used for objects sent to other processes."""
    _extra_reducers = {}
    _copyreg_dispatch_table = copyreg.dispatch_table

    def __init__(self, file, protocol=None, *args, **kwargs):
        super().__init__(file, PROTOCOL if protocol is None else protocol, *args, **kwargs)
        self.dispatch_table = self._copyreg_dispatch_table.copy()
        # Objects of the standard library's multiprocessing that a program mixes in (its
        # Connections inside a stdlib Queue given to a cpool Process) pickle with the reducers
        # the stdlib registered for them; only a stdlib the program imported itself is looked at.
        stdlib = sys.modules.get('multiprocessing.reduction')
        if stdlib is not None and stdlib is not sys.modules[__name__]:
            self.dispatch_table.update(getattr(stdlib.ForkingPickler, '_extra_reducers', {}))
        self.dispatch_table.update(self._extra_reducers)

    @classmethod
    def register(cls, type, reduce):
        """Register a reduce function for a type, for ForkingPickler and cpool's C pickling."""
        cls._extra_reducers[type] = reduce
        copyreg.pickle(type, reduce)

    @classmethod
    def dumps(cls, obj, protocol=None):
        buf = io.BytesIO()
        cls(buf, protocol).dump(obj)
        return buf.getbuffer()

    loads = staticmethod(pickle.loads)


register = ForkingPickler.register


def dump(obj, file, protocol=None):
    """Replacement for pickle.dump() using ForkingPickler."""
    ForkingPickler(file, protocol).dump(obj)


# ---- handing fds to a child that is being started ----

def DupFd(fd):
    """An object that, unpickled in another process of this tree, gives it a copy of fd.

    While a child is being started (its Process object pickled) the fd goes with it; otherwise
    cpool.resource_sharer serves it on demand. Fork children inherit fds without any of this."""
    popen_obj = context.get_spawning_popen()
    if popen_obj is not None:
        return popen_obj.DupFd(popen_obj.duplicate_for_child(fd))
    # Anywhere else (sent through a Pipe or a Queue): served on demand to the process that
    # unpickles it, as the standard library does.
    from . import resource_sharer
    return resource_sharer.DupFd(fd)


# ---- SCM_RIGHTS over Unix sockets ----

def sendfds(sock, fds):
    """Send an array of fds over an AF_UNIX socket."""
    fds = array.array('i', fds)
    msg = bytes([len(fds) % 256])
    sock.sendmsg([msg], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def recvfds(sock, size):
    """Receive an array of fds over an AF_UNIX socket (close-on-exec, as every cpool fd)."""
    a = array.array('i')
    bytes_size = a.itemsize * size
    msg, ancdata, flags, addr = sock.recvmsg(1, socket.CMSG_SPACE(bytes_size),
                                             socket.MSG_CMSG_CLOEXEC)
    if not msg and not ancdata:
        raise EOFError
    try:
        if len(ancdata) != 1:
            raise RuntimeError('received %d items of ancdata' % len(ancdata))
        cmsg_level, cmsg_type, cmsg_data = ancdata[0]
        if cmsg_level == socket.SOL_SOCKET and cmsg_type == socket.SCM_RIGHTS:
            if len(cmsg_data) % a.itemsize != 0:
                raise ValueError
            a.frombytes(cmsg_data)
            if len(a) % 256 != msg[0]:
                raise AssertionError('Len is {0:n} but msg[0] is {1!r}'.format(len(a), msg[0]))
            return list(a)
    except (ValueError, IndexError):
        pass
    raise RuntimeError('Invalid data received')


def send_handle(conn, handle, destination_pid):
    """Send a handle (fd) over a Connection backed by a Unix socket."""
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        sendfds(s, [handle])


def recv_handle(conn):
    """Receive a handle (fd) sent by send_handle."""
    with socket.fromfd(conn.fileno(), socket.AF_UNIX, socket.SOCK_STREAM) as s:
        return recvfds(s, 1)[0]


# ---- sockets pickle by handing their fd over ----

def _reduce_socket(s):
    df = DupFd(s.fileno())
    return _rebuild_socket, (df, s.family, s.type, s.proto)


def _rebuild_socket(df, family, type, proto):
    fd = df.detach()
    return socket.socket(family, type, proto, fileno=fd)


register(socket.socket, _reduce_socket)


class AbstractReducer(object):
    """Compatibility with the standard library's reducer hook (context.reducer)."""
    ForkingPickler = ForkingPickler
    register = register
    dump = dump
    send_handle = send_handle
    recv_handle = recv_handle
    DupFd = DupFd
    sendfds = sendfds
    recvfds = recvfds
