"""Connections: Pipe, wait, Listener and Client, as in the standard library's multiprocessing.connection.

`Connection` is the C type from cpool._core itself (framing, I/O and pickling in C, no Python frame
per message), on the standard library's wire format so both can talk over one fd. Listener and
Client speak the running Python's authentication handshake, so they interoperate with the
standard library's in both directions.
"""
import itertools
import os
import selectors
import socket
import struct
import sys
import tempfile
import time

from . import _core
from . import reduction
from . import util
from .util import is_abstract_socket_namespace  # noqa: F401  (used below, and a name here)
from .context import AuthenticationError, BufferTooShort  # noqa: F401  (public names here)

__all__ = ['Client', 'Listener', 'Pipe', 'wait']

Connection = _core.Connection
Pipe = _core.Pipe
wait = _core.wait
_ConnectionBase = Connection  # the standard library's base class name, for isinstance checks
_ForkingPickler = reduction.ForkingPickler

BUFSIZE = 8192
# A very generous bound for the handshake on a local connection (the standard library's value);
# cpool also applies it to the server's reads so a silent client cannot hold accept() for ever.
CONNECTION_TIMEOUT = 20.

_mmap_counter = itertools.count()

default_family = 'AF_UNIX'
families = ['AF_INET', 'AF_UNIX']


# ---- pickling: a Connection reaches a child being started through a duplicated fd ----

def reduce_connection(conn):
    df = reduction.DupFd(conn.fileno())
    return rebuild_connection, (df, conn.readable, conn.writable)


def rebuild_connection(df, readable, writable):
    return Connection(df.detach(), readable, writable)


reduction.register(Connection, reduce_connection)


# ---- addresses ----

def arbitrary_address(family):
    """An arbitrary free address for the given family."""
    if family == 'AF_INET':
        return ('localhost', 0)
    elif family == 'AF_UNIX':
        # A fresh name in this process's private (0700) temporary directory.
        return tempfile.mktemp(prefix='listener-', dir=util.get_temp_dir())
    else:
        raise ValueError('unrecognized family')


def _validate_family(family):
    if family == 'AF_PIPE':
        raise ValueError('Family %s is not recognized.' % family)


def address_type(address):
    """The family of an address: 'AF_INET' for a tuple, 'AF_UNIX' for a path or abstract name."""
    if type(address) == tuple:
        return 'AF_INET'
    elif type(address) is str and address.startswith('\\\\'):
        return 'AF_PIPE'
    elif type(address) is str or is_abstract_socket_namespace(address):
        return 'AF_UNIX'
    else:
        raise ValueError('address type of %r unrecognized' % (address,))


# ---- Listener / Client ----

class Listener(object):
    """A bound, listening socket; accept() returns authenticated Connections when authkey is set."""

    def __init__(self, address=None, family=None, backlog=1, authkey=None):
        family = family or (address and address_type(address)) or default_family
        address = address or arbitrary_address(family)
        _validate_family(family)
        if authkey is not None and not isinstance(authkey, bytes):
            raise TypeError('authkey should be a byte string')
        self._listener = SocketListener(address, family, backlog)
        self._authkey = authkey

    def accept(self):
        """Accept a connection; with an authkey, it is authenticated before it is returned."""
        if self._listener is None:
            raise OSError('listener is closed')
        if not _authenticates(self._authkey):
            return self._listener.accept()
        return self._listener.accept_authenticated(self._authkey, CONNECTION_TIMEOUT)

    def close(self):
        """Close the listening socket (and remove its file)."""
        listener = self._listener
        if listener is not None:
            self._listener = None
            listener.close()

    @property
    def address(self):
        return self._listener._address

    @property
    def last_accepted(self):
        return self._listener._last_accepted

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        self.close()


def Client(address, family=None, authkey=None):
    """A Connection to the Listener at address (authenticated when authkey is given)."""
    family = family or address_type(address)
    _validate_family(family)
    if authkey is not None and not isinstance(authkey, bytes):
        raise TypeError('authkey should be a byte string')
    c = SocketClient(address)
    if authkey is not None:
        try:
            answer_challenge(c, authkey)
            deliver_challenge(c, authkey)
        except BaseException:
            c.close()
            raise
    return c


class SocketListener(object):
    """A socket bound to an address and listening. Unix sockets are owner-only (0600)."""

    def __init__(self, address, family, backlog=1):
        self._socket = socket.socket(getattr(socket, family))
        unix_path = family == 'AF_UNIX' and not is_abstract_socket_namespace(address)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.setblocking(True)
            if unix_path:
                # Linux gives the socket file the mode of the socket's inode (less the umask),
                # so the file is born 0600: no window where others could connect.
                os.fchmod(self._socket.fileno(), 0o600)
            self._socket.bind(address)
            self._socket.listen(backlog)
            self._address = self._socket.getsockname()
        except OSError:
            self._socket.close()
            raise
        self._family = family
        self._last_accepted = None
        self._pending = []  # _PendingHandshake: connections whose handshake is under way
        if unix_path:
            self._unlink = util.Finalize(self, os.unlink, args=(address,), exitpriority=0)
        else:
            self._unlink = None

    def accept(self):
        s, self._last_accepted = self._socket.accept()
        s.setblocking(True)
        return Connection(s.detach())

    def accept_authenticated(self, authkey, timeout):
        """The first connection to pass the handshake. Handshakes run side by side: new
        connections are accepted while earlier ones are silent, and a connection still mid-way
        when this returns carries on at the next call. A peer that fails (a wrong key, no
        answer within timeout, a hang-up) is closed, nothing it sent unpickled, and its error
        raised here, as the standard library's accept() raises its handshake's error."""
        with selectors.DefaultSelector() as selector:
            selector.register(self._socket, selectors.EVENT_READ)
            for h in self._pending:
                selector.register(h.sock, selectors.EVENT_READ, h)
            while True:
                now = time.monotonic()
                for h in [h for h in self._pending if h.deadline <= now]:
                    self._drop(h, selector)
                    raise AuthenticationError('no answer to the authentication challenge '
                                              'within %g s' % timeout)
                wait = min([h.deadline for h in self._pending], default=now + 3600) - now
                for key, _ in selector.select(max(wait, 0)):
                    h = key.data
                    if h is None:
                        h = self._accept_pending(authkey, time.monotonic() + timeout, selector)
                        if h is None or not h.done:
                            continue
                    else:
                        try:
                            if not h.readable():
                                continue
                        except BaseException:
                            self._drop(h, selector)
                            raise
                    selector.unregister(h.sock)
                    self._pending.remove(h)
                    h.steps.close()
                    h.sock.setblocking(True)
                    self._last_accepted = h.address
                    return Connection(h.sock.detach())

    def _accept_pending(self, authkey, deadline, selector):
        # Non-blocking: a connection another process or thread took first is not waited for.
        self._socket.setblocking(False)
        try:
            s, address = self._socket.accept()
        except (BlockingIOError, InterruptedError):
            return None
        finally:
            self._socket.setblocking(True)
        try:
            h = _PendingHandshake(s, address, authkey, deadline)
        except OSError:
            s.close()  # gone before the challenge could be sent
            return None
        except BaseException:
            s.close()
            raise
        self._pending.append(h)
        selector.register(s, selectors.EVENT_READ, h)
        return h

    def _drop(self, h, selector):
        selector.unregister(h.sock)
        self._pending.remove(h)
        h.close()  # dropped at once: nothing it sent is ever unpickled

    def close(self):
        pending, self._pending = self._pending, []
        for h in pending:
            h.close()
        try:
            self._socket.close()
        finally:
            unlink = self._unlink
            if unlink is not None:
                self._unlink = None
                unlink()


def SocketClient(address):
    """A Connection to the socket at address."""
    family = address_type(address)
    with socket.socket(getattr(socket, family)) as s:
        s.setblocking(True)
        s.connect(address)
        return Connection(s.detach())


# ---- authentication: the running Python's standard library handshake ----
#
# The server sends b'#CHALLENGE#' + a random message, the client answers with an HMAC of it
# keyed by authkey, the server replies b'#WELCOME#' or b'#FAILURE#'; then the roles swap.
# Every read takes at most 256 bytes, so a peer announcing a huge length is refused before
# anything is allocated, and nothing is unpickled before both directions succeeded.
# Python <= 3.11 uses a 20-byte message and a raw HMAC-MD5. From 3.12 the message is
# b'{digest}' + 40 random bytes and the answer b'{digest}' + the HMAC; a 20-byte challenge or a
# 16-byte answer marks a legacy peer (raw HMAC-MD5), which the modern side still accepts.

_MODERN = sys.version_info >= (3, 12)
MESSAGE_LENGTH = 40 if _MODERN else 20
_MAX_HANDSHAKE = 256
_CHALLENGE = b'#CHALLENGE#'
_WELCOME = b'#WELCOME#'
_FAILURE = b'#FAILURE#'
CHALLENGE, WELCOME, FAILURE = _CHALLENGE, _WELCOME, _FAILURE

_ALLOWED_DIGESTS = frozenset({b'md5', b'sha256', b'sha384', b'sha3_256', b'sha3_384'})
_MAX_DIGEST_LEN = max(len(d) for d in _ALLOWED_DIGESTS)
_MD5ONLY_MESSAGE_LENGTH = 20
_MD5_DIGEST_LEN = 16
_LEGACY_LENGTHS = (_MD5ONLY_MESSAGE_LENGTH, _MD5_DIGEST_LEN)


def _authenticates(authkey):
    # 3.12+ authenticates whenever a key is given; 3.11 only for a non-empty one.
    return authkey is not None if _MODERN else bool(authkey)


def _recv_small(connection, timeout):
    """One handshake message of at most 256 bytes; with a timeout when we are the server."""
    if timeout is not None and isinstance(connection, Connection):
        try:
            return connection._recv_bytes_timeout(_MAX_HANDSHAKE, timeout)
        except TimeoutError:
            raise AuthenticationError('no answer to the authentication challenge within %g s'
                                      % timeout) from None
    return connection.recv_bytes(_MAX_HANDSHAKE)


def _check_authkey(authkey):
    if not isinstance(authkey, bytes):
        raise ValueError("Authkey must be bytes, not {0!s}".format(type(authkey)))


def _split_digest(message):
    """(digest name, payload) of a challenge or answer; '' for the legacy HMAC-MD5 form."""
    if len(message) in _LEGACY_LENGTHS:
        return '', message
    if message.startswith(b'{'):
        end = message.find(b'}', 1, _MAX_DIGEST_LEN + 2)
        if end > 0 and message[1:end] in _ALLOWED_DIGESTS:
            return message[1:end].decode('ascii'), message[end + 1:]
    raise AuthenticationError('unsupported message length, missing digest prefix, '
                              'or unsupported digest: message=%r' % (message,))


def _create_response(authkey, message):
    """The answer to a challenge message: an HMAC of it keyed by authkey."""
    import hmac
    if not _MODERN:
        return hmac.new(authkey, message, 'md5').digest()
    name = _split_digest(message)[0]
    if not name:
        try:
            return hmac.new(authkey, message, 'md5').digest()
        except ValueError:  # no MD5 (FIPS): answer in the modern form; a legacy peer refuses
            name = 'sha256'
    # The MAC covers the whole message, digest prefix included, so it cannot be downgraded.
    return b'{%s}%s' % (name.encode('ascii'), hmac.new(authkey, message, name).digest())


def _verify_challenge(authkey, message, response):
    """Raise AuthenticationError unless response is the right answer to message."""
    import hmac
    if not _MODERN:
        if not hmac.compare_digest(hmac.new(authkey, message, 'md5').digest(), response):
            raise AuthenticationError('digest received was wrong')
        return
    name, mac = _split_digest(response)
    name = name or 'md5'
    try:
        expected = hmac.new(authkey, message, name).digest()
    except ValueError:
        raise AuthenticationError('response_digest=%r unsupported' % name) from None
    if len(expected) != len(mac):
        raise AuthenticationError('expected %r of length %d got %d'
                                  % (name, len(expected), len(mac)))
    if not hmac.compare_digest(expected, mac):
        raise AuthenticationError('digest received was wrong')


# The handshake is written once, as steps: each side is a generator that yields a message to
# send, or None to ask for the next message received (sent back into it). A blocking driver
# runs it on a Connection; the Listener runs many at once on non-blocking sockets, so a peer
# that never speaks does not hold up the clients behind it.

def _deliver_steps(authkey, digest_name):
    _check_authkey(authkey)
    message = os.urandom(MESSAGE_LENGTH)
    if _MODERN:
        message = b'{%s}%s' % (digest_name.encode('ascii'), message)
    yield _CHALLENGE + message
    answer = yield None
    try:
        _verify_challenge(authkey, message, answer)
    except AuthenticationError:
        yield _FAILURE
        raise
    yield _WELCOME


def _answer_steps(authkey):
    _check_authkey(authkey)
    message = yield None
    if not message.startswith(_CHALLENGE):
        raise AuthenticationError('Protocol error, expected challenge: message=%r' % (message,))
    message = message[len(_CHALLENGE):]
    if len(message) < _MD5ONLY_MESSAGE_LENGTH:
        raise AuthenticationError('challenge too short: %d bytes' % len(message))
    yield _create_response(authkey, message)
    if (yield None) != _WELCOME:
        raise AuthenticationError('digest sent was rejected')


def _server_steps(authkey):
    yield from _deliver_steps(authkey, 'sha256')
    yield from _answer_steps(authkey)


def _run_steps(steps, connection, timeout):
    """Drive handshake steps on a blocking connection."""
    reply = None
    while True:
        try:
            out = steps.send(reply)
        except StopIteration:
            return
        if out is None:
            reply = _recv_small(connection, timeout)
        else:
            connection.send_bytes(out)
            reply = None


def deliver_challenge(connection, authkey, digest_name='sha256'):
    """Challenge the peer to prove it knows authkey (AuthenticationError if not)."""
    _run_steps(_deliver_steps(authkey, digest_name), connection, None)


def answer_challenge(connection, authkey):
    """Prove to the peer that we know authkey (AuthenticationError if it refuses)."""
    _run_steps(_answer_steps(authkey), connection, None)


def _server_handshake(connection, authkey, timeout):
    _run_steps(_server_steps(authkey), connection, timeout)


class _PendingHandshake(object):
    """A connection accepted by a Listener whose handshake is under way: a non-blocking socket,
    the frame being read (exactly one frame at a time, so nothing the client sends after the
    handshake is consumed here) and the server's steps."""

    def __init__(self, sock, address, authkey, deadline):
        sock.setblocking(False)
        self.sock = sock
        self.address = address
        self.deadline = deadline
        self.steps = _server_steps(authkey)
        self.header = b''
        self.body = None
        self.need = 4
        self.done = self._advance(None)

    def _advance(self, reply):
        """Run the steps until they want a message: False, or True when they finished."""
        while True:
            try:
                out = self.steps.send(reply)
            except StopIteration:
                return True
            if out is None:
                return False
            # A handshake message is under 300 bytes: it fits in any empty socket buffer.
            self.sock.setblocking(True)
            try:
                self.sock.sendall(struct.pack('!i', len(out)) + out)
            finally:
                self.sock.setblocking(False)
            reply = None

    def readable(self):
        """Read what is there; True once the handshake succeeded. Raises AuthenticationError
        (a bad answer), OSError (an oversized message, a reset) or EOFError (the peer left),
        as the blocking handshake on a Connection does."""
        while True:
            try:
                chunk = self.sock.recv(self.need)
            except (BlockingIOError, InterruptedError):
                return False
            if not chunk:
                raise EOFError('the client closed the connection during the handshake')
            self.need -= len(chunk)
            if self.body is None:
                self.header += chunk
                if self.need:
                    continue
                size, = struct.unpack('!i', self.header)
                if not 0 <= size <= _MAX_HANDSHAKE:
                    raise OSError('bad message length')  # what Connection says, unread
                self.body, self.need = b'', size
                if size:
                    continue
            else:
                self.body += chunk
                if self.need:
                    continue
            message, self.header, self.body, self.need = self.body, b'', None, 4
            if self._advance(message):
                return True

    def close(self):
        self.steps.close()
        self.sock.close()


# ---- xmlrpc serialization (the managers' serializer='xmlrpclib') ----

class ConnectionWrapper(object):
    """A Connection whose send/recv use other dumps/loads functions."""

    def __init__(self, conn, dumps, loads):
        self._conn = conn
        self._dumps = dumps
        self._loads = loads
        for attr in ('fileno', 'close', 'poll', 'recv_bytes', 'send_bytes'):
            setattr(self, attr, getattr(conn, attr))

    def send(self, obj):
        self._conn.send_bytes(self._dumps(obj))

    def recv(self):
        return self._loads(self._conn.recv_bytes())


def _xml_dumps(obj):
    import xmlrpc.client
    return xmlrpc.client.dumps((obj,), None, None, None, 1).encode('utf-8')


def _xml_loads(s):
    import xmlrpc.client
    (obj,), method = xmlrpc.client.loads(s.decode('utf-8'))
    return obj


class XmlListener(Listener):
    def accept(self):
        return ConnectionWrapper(Listener.accept(self), _xml_dumps, _xml_loads)


def XmlClient(*args, **kwds):
    return ConnectionWrapper(Client(*args, **kwds), _xml_dumps, _xml_loads)
