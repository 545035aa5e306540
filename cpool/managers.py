"""Managers: a server process holding shared objects, and proxies that call them over Connections.

The wire protocol is the standard library's: a request is `(ident, methodname, args, kwds)`,
a reply `(kind, result)` with kind '#RETURN', '#ERROR', '#TRACEBACK', '#PROXY' or
'#UNSERIALIZABLE'; every connection runs the standard library's HMAC handshake before the
server unpickles a byte it sent.

Where cpool differs (same results, fewer failure modes, fewer round trips):
- References are counted per client *session*: each client process opens one anchor connection
  per manager, and the references it took are dropped when that connection closes, so a client
  that is killed leaks nothing in the manager.
- Creating a proxy is one round trip on the calling thread's connection (the standard library
  opens three fresh connections for create, incref and decref).
- A call interrupted between request and reply (Ctrl-C) throws its connection away instead of
  leaving a stale reply to be read by the next call.
- A server thread blocked for a client that dies (q.get(), lock.acquire(), event.wait()...)
  gives up without taking the item or the lock; locks a dead client held are released (a client
  that exits normally says so first, and the Locks it holds stay held, as in the standard
  library: another process may release them).
- A handshake that stalls is dropped after a deadline; a manager whose parent was killed exits.
"""
import array
import os
import pickle
import queue
import signal
import socket
import sys
import threading
import time
import types
from traceback import format_exc

from . import connection
from . import process
from . import util
from .connection import _server_handshake
from ._manager_server import (_PeerGone, _serving, _Queue, _Lock, _RLock, _Semaphore,
                              _BoundedSemaphore, _Condition, _Event)
from .context import ProcessError, get_spawning_popen
from .context import _default_context as _ctx  # noqa: E402
get_context = _ctx.get_context  # a name the stdlib module has (from the package)
from os import getpid  # noqa: F401

HAS_SHMEM = True  # cpool.shared_memory exists on every platform cpool runs on

__all__ = ['BaseManager', 'SyncManager', 'BaseProxy', 'Token']

_PROTOCOL = pickle.HIGHEST_PROTOCOL
_dumps = pickle.dumps
_loads = pickle.loads

# A client that has not finished the handshake within this many seconds is dropped.
HANDSHAKE_TIMEOUT = connection.CONNECTION_TIMEOUT

_dict_view_types = tuple(type(getattr({}, name)()) for name in ('items', 'keys', 'values'))


class Token(object):
    """Identifies a shared object: its typeid, its manager's address and its id there."""
    __slots__ = ('typeid', 'address', 'id')

    def __init__(self, typeid, address, id):
        (self.typeid, self.address, self.id) = (typeid, address, id)

    def __getstate__(self):
        return (self.typeid, self.address, self.id)

    def __setstate__(self, state):
        (self.typeid, self.address, self.id) = state

    def __repr__(self):
        return '%s(typeid=%r, address=%r, id=%r)' % (
            self.__class__.__name__, self.typeid, self.address, self.id)


# ---- one request/reply exchange ----

def dispatch(c, id, methodname, args=(), kwds={}):
    """Send a request to the manager over connection c and return the result (or raise)."""
    c.send((id, methodname, args, kwds))
    kind, result = c.recv()
    if kind == '#RETURN':
        return result
    try:
        raise convert_to_error(kind, result)
    finally:
        del result  # the traceback would keep the result alive


def convert_to_error(kind, result):
    if kind == '#ERROR':
        return result
    elif kind in ('#TRACEBACK', '#UNSERIALIZABLE'):
        if not isinstance(result, str):
            raise TypeError("Result {0!r} (kind '{1}') type is {2}, not str".format(
                result, kind, type(result)))
        if kind == '#UNSERIALIZABLE':
            return RemoteError('Unserializable message: %s\n' % result)
        return RemoteError(result)
    return ValueError('Unrecognized message type {!r}'.format(kind))


class RemoteError(Exception):
    """An error raised in the manager process, with its traceback as text."""

    def __str__(self):
        return '\n' + '-' * 75 + '\n' + str(self.args[0]) + '-' * 75


def all_methods(obj):
    """Names of the callable attributes of obj."""
    return [name for name in dir(obj) if callable(getattr(obj, name))]


def public_methods(obj):
    """Names of the callable attributes of obj that do not start with '_'."""
    return [name for name in all_methods(obj) if name[0] != '_']


def _set_nodelay(c):
    # Without TCP_NODELAY a small request can wait for the peer's delayed ACK (~40 ms).
    s = socket.socket(fileno=os.dup(c.fileno()))
    try:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError:
        pass
    finally:
        s.close()


def _is_inet(address):
    return isinstance(address, tuple)


# ---- the server, run in the manager process ----

class Server(object):
    """Holds the shared objects and serves one thread per client connection."""
    public = ['shutdown', 'create', 'accept_connection', 'get_methods', 'debug_info',
              'number_of_objects', 'dummy', 'incref', 'decref', 'open_session']
    # Control requests a persistent connection may make with ident None.
    _control = frozenset(['create', 'get_methods', 'debug_info', 'number_of_objects', 'dummy',
                          'incref', 'decref', 'leave_session'])

    def __init__(self, registry, address, authkey, serializer):
        if not isinstance(authkey, bytes):
            raise TypeError("Authkey {0!r} is type {1!s}, not bytes".format(
                authkey, type(authkey)))
        self.registry = registry
        self.authkey = process.AuthenticationString(authkey)
        Listener, Client = listener_client[serializer]
        self._serializer = serializer
        # No authkey for the Listener: each connection authenticates in its own thread, so a
        # client that stalls in the handshake cannot block accept() for the others.
        self.listener = Listener(address=address, backlog=128)
        self.address = self.listener.address
        self._inet = _is_inet(self.address)
        self.id_to_obj = {'0': (None, (), None)}
        self.id_to_refcount = {}
        self.id_to_local_proxy_obj = {}
        self.mutex = threading.Lock()
        # References held per client session (session id -> {ident: count}); a session ends
        # when its anchor connection closes, and its references are dropped then.
        self.session_refs = {}
        self.conn_session = {}
        # session id -> {'left': bool}: a client process that exits normally says so first
        # (leave_session), and the locks it still holds then stay held, as in the standard
        # library; only a client that vanished without a word has its locks released.
        self.session_state = {}
        self._next_session = 1
        self.stop_event = threading.Event()
        self._parent_pid = None

    def serve_forever(self):
        """Serve until shutdown() is requested (or the starting process dies)."""
        process.current_process()._manager_server = self
        try:
            accepter = threading.Thread(target=self.accepter, name='cpool-manager-accepter')
            accepter.daemon = True
            accepter.start()
            try:
                while not self.stop_event.is_set():
                    self.stop_event.wait(1)
                    if self._parent_pid is not None and os.getppid() != self._parent_pid:
                        util.info('manager: the process that started it died; exiting')
                        break
            except (KeyboardInterrupt, SystemExit):
                pass
        finally:
            if sys.stdout != sys.__stdout__:
                util.debug('resetting stdout, stderr')
                sys.stdout = sys.__stdout__
                sys.stderr = sys.__stderr__
            sys.exit(0)

    def accepter(self):
        while True:
            try:
                c = self.listener.accept()
            except OSError as e:
                if self.stop_event.is_set() or getattr(self.listener, '_listener', 1) is None:
                    return
                util.debug('manager accept failed: %r', e)
                time.sleep(0.01)  # EMFILE and the like: don't spin
                continue
            t = threading.Thread(target=self.handle_request, args=(c,))
            t.daemon = True
            t.start()

    def _handle_request(self, c):
        request = None
        try:
            # Nothing from this peer is unpickled before both challenges pass; every read of
            # the handshake is bounded in size and has a deadline, so a silent or slow peer
            # only costs a thread for a while.
            if self._inet:
                _set_nodelay(c)
            _server_handshake(getattr(c, '_conn', c), self.authkey, HANDSHAKE_TIMEOUT)
            request = c.recv()
            ignore, funcname, args, kwds = request
            if funcname not in self.public:  # not an assert: python -O must not open it up
                raise AssertionError('%r unrecognized' % (funcname,))
            func = getattr(self, funcname)
        except Exception:
            msg = ('#TRACEBACK', format_exc())
            if request is None:
                util.debug('manager: connection dropped before a request: %s', msg[1])
                return
        else:
            if funcname in ('accept_connection', 'open_session'):
                func(c, *args, **kwds)  # serves the connection until it closes
                return
            try:
                result = func(c, *args, **kwds)
            except Exception:
                msg = ('#TRACEBACK', format_exc())
            else:
                msg = ('#RETURN', result)
        try:
            c.send(msg)
        except Exception as e:
            try:
                c.send(('#TRACEBACK', format_exc()))
            except Exception:
                pass
            util.info('Failure to send message: %r', msg)
            util.info(' ... request was %r', request)
            util.info(' ... exception was %r', e)

    def handle_request(self, conn):
        """Authenticate a new connection and answer its first request."""
        try:
            self._handle_request(conn)
        except SystemExit:
            pass
        finally:
            self.conn_session.pop(conn, None)
            conn.close()

    def serve_client(self, conn):
        """Answer the requests of one client thread until its connection closes."""
        util.debug('starting server thread to service %r', threading.current_thread().name)
        recv_bytes = conn.recv_bytes
        send_bytes = conn.send_bytes
        id_to_obj = self.id_to_obj
        control = self._control
        _serving.conn = conn
        _serving.held = []
        state = self.session_state.get(self.conn_session.get(conn))
        try:
            self._serve_loop(conn, recv_bytes, send_bytes, id_to_obj, control)
        except _PeerGone:
            util.debug('peer gone during a blocking call -- exiting thread serving %r',
                       threading.current_thread().name)
        finally:
            # Locks a dead client held are released, or they would be held for ever; a client
            # that left in order meant to leave them held (another process may release them).
            held, _serving.held, _serving.conn = _serving.held, None, None
            left = state is not None and state['left']
            for lock in reversed(held):
                if left:
                    lock._forget_holder()
                else:
                    lock._release_for_dead_peer()

    def _serve_loop(self, conn, recv_bytes, send_bytes, id_to_obj, control):
        while True:
            try:
                data = recv_bytes()
            except (EOFError, OSError):
                util.debug('got EOF -- exiting thread serving %r',
                           threading.current_thread().name)
                return
            methodname = obj = ident = None
            try:
                ident, methodname, args, kwds = _loads(data)
                try:
                    obj, exposed, gettypeid = id_to_obj[ident]
                except KeyError:
                    if ident is None and methodname in control:
                        msg = ('#RETURN', getattr(self, methodname)(conn, *args, **kwds))
                        obj = exposed = None
                    else:
                        try:
                            obj, exposed, gettypeid = self.id_to_local_proxy_obj[ident]
                        except KeyError:
                            raise KeyError(ident) from None
                if exposed is not None:
                    if methodname not in exposed:
                        raise AttributeError('method %r of %r object is not in exposed=%r' %
                                             (methodname, type(obj), exposed))
                    function = getattr(obj, methodname)
                    try:
                        res = function(*args, **kwds)
                    except Exception as e:
                        msg = ('#ERROR', e)
                    else:
                        typeid = gettypeid and gettypeid.get(methodname, None)
                        if typeid:
                            rident, rexposed = self.create(conn, typeid, res)
                            msg = ('#PROXY', (rexposed, Token(typeid, self.address, rident)))
                        elif type(res) in _dict_view_types:
                            msg = ('#RETURN', list(res))
                        else:
                            msg = ('#RETURN', res)
            except AttributeError:
                if methodname is None:
                    msg = ('#TRACEBACK', format_exc())
                else:
                    try:
                        fallback_func = self.fallback_mapping[methodname]
                        msg = ('#RETURN', fallback_func(self, conn, ident, obj, *args, **kwds))
                    except Exception:
                        msg = ('#TRACEBACK', format_exc())
            except Exception:
                msg = ('#TRACEBACK', format_exc())
            try:
                try:
                    data = _dumps(msg, _PROTOCOL)
                except Exception:
                    data = _dumps(('#UNSERIALIZABLE', format_exc()), _PROTOCOL)
                msg = None
                send_bytes(data)
            except Exception as e:
                util.info('exception in thread serving %r', threading.current_thread().name)
                util.info(' ... exception was %r', e)
                return

    def fallback_getvalue(self, conn, ident, obj):
        return obj

    def fallback_str(self, conn, ident, obj):
        return str(obj)

    def fallback_repr(self, conn, ident, obj):
        return repr(obj)

    fallback_mapping = {
        '__str__': fallback_str,
        '__repr__': fallback_repr,
        '#GETVALUE': fallback_getvalue,
    }

    def dummy(self, c):
        pass

    def debug_info(self, c):
        """Text listing each shared object and its reference count."""
        with self.mutex:
            result = []
            for ident in sorted(self.id_to_refcount):
                if ident != '0':
                    result.append('  %s:       refcount=%s\n    %s' % (
                        ident, self.id_to_refcount[ident], str(self.id_to_obj[ident][0])[:75]))
            return '\n'.join(result)

    def number_of_objects(self, c):
        """Number of shared objects that clients hold references to."""
        return len(self.id_to_refcount)

    def shutdown(self, c):
        """Reply, then stop the server (its process exits)."""
        try:
            util.debug('manager received shutdown message')
            c.send(('#RETURN', None))
        except Exception:
            import traceback
            traceback.print_exc()
        finally:
            self.stop_event.set()

    def create(self, c, typeid, /, *args, **kwds):
        """Create a shared object with one reference (the caller's); return (id, exposed)."""
        callable, exposed, method_to_typeid, proxytype = self.registry[typeid]
        if callable is None:
            if kwds or (len(args) != 1):
                raise ValueError("Without callable, must have one non-keyword argument")
            obj = args[0]
        else:
            obj = callable(*args, **kwds)
        if exposed is None:
            exposed = public_methods(obj)
        if method_to_typeid is not None:
            if not isinstance(method_to_typeid, dict):
                raise TypeError("Method_to_typeid {0!r}: type {1!s}, not dict".format(
                    method_to_typeid, type(method_to_typeid)))
            exposed = list(exposed) + list(method_to_typeid)
        ident = '%x' % id(obj)
        util.debug('%r callable returned object with id %r', typeid, ident)
        with self.mutex:
            self.id_to_obj[ident] = (obj, set(exposed), method_to_typeid)
            if ident not in self.id_to_refcount:
                self.id_to_refcount[ident] = 0
        self.incref(c, ident)
        return ident, tuple(exposed)

    def get_methods(self, c, token):
        """The exposed methods of the object that token names."""
        return tuple(self.id_to_obj[token.id][1])

    def accept_connection(self, c, name, session=None):
        """Serve this connection for the calling thread of a client, until it closes."""
        threading.current_thread().name = name
        if session is not None and session in self.session_refs:
            self.conn_session[c] = session
        c.send(('#RETURN', None))
        self.serve_client(c)

    def open_session(self, c, name):
        """Open a client process's anchor: references it takes die with this connection."""
        threading.current_thread().name = name + '|anchor'
        with self.mutex:
            session = self._next_session
            self._next_session += 1
            self.session_refs[session] = {}
            self.session_state[session] = {'left': False}
        self.conn_session[c] = session
        try:
            c.send(('#RETURN', session))
            self.serve_client(c)
        finally:
            self._end_session(session)

    def leave_session(self, c):
        """The client process is exiting normally (see session_state)."""
        state = self.session_state.get(self.conn_session.get(c))
        if state is not None:
            state['left'] = True

    def _end_session(self, session):
        with self.mutex:
            refs = self.session_refs.pop(session, {})
            self.session_state.pop(session, None)
        if refs:
            util.debug('session %r ended holding %d objects; releasing them', session, len(refs))
        for ident, count in refs.items():
            for _ in range(count):
                try:
                    self.decref(None, ident, _session=False)
                except Exception as e:
                    util.debug('release of %r failed: %r', ident, e)

    def incref(self, c, ident, session=None):
        with self.mutex:
            try:
                self.id_to_refcount[ident] += 1
            except KeyError:
                # An object only the manager still references (a proxy stored inside another
                # shared object) gets a client reference again.
                if ident in self.id_to_local_proxy_obj:
                    self.id_to_refcount[ident] = 1
                    self.id_to_obj[ident] = self.id_to_local_proxy_obj[ident]
                    util.debug('Server re-enabled tracking & INCREF %r', ident)
                else:
                    raise
            if session is None:
                session = self.conn_session.get(c)
            refs = self.session_refs.get(session)
            if refs is not None:
                refs[ident] = refs.get(ident, 0) + 1

    def decref(self, c, ident, session=None, _session=True):
        if ident not in self.id_to_refcount and ident in self.id_to_local_proxy_obj:
            util.debug('Server DECREF skipping %r', ident)
            return
        with self.mutex:
            if self.id_to_refcount[ident] <= 0:
                raise AssertionError("Id {0!s} ({1!r}) has refcount {2:n}, not 1+".format(
                    ident, self.id_to_obj[ident], self.id_to_refcount[ident]))
            if _session:
                if session is None:
                    session = self.conn_session.get(c)
                refs = self.session_refs.get(session)
                if refs is not None and ident in refs:
                    refs[ident] -= 1
                    if not refs[ident]:
                        del refs[ident]
            self.id_to_refcount[ident] -= 1
            if self.id_to_refcount[ident] == 0:
                del self.id_to_refcount[ident]
        if ident not in self.id_to_refcount:
            # Two steps: the object may hold proxies whose disposal takes the mutex again.
            self.id_to_obj[ident] = (None, (), None)
            util.debug('disposing of obj with id %r', ident)
            with self.mutex:
                # A create() in between may have reused the id for a new object: keep that.
                if ident not in self.id_to_refcount:
                    self.id_to_obj.pop(ident, None)


class State(object):
    __slots__ = ['value']
    INITIAL = 0
    STARTED = 1
    SHUTDOWN = 2


# ---- the xmlrpclib serializer: the same protocol with XML-RPC bodies ----

class _XmlConnection(object):
    """A Connection whose messages are XML-RPC method calls (the 'xmlrpclib' serializer)."""

    def __init__(self, conn):
        import xmlrpc.client as xmlrpclib
        self._conn = conn
        self._xml_dumps = xmlrpclib.dumps
        self._xml_load = xmlrpclib.loads

    def send(self, obj):
        self._conn.send_bytes(self._xml_dumps((obj,), None, None, None, 1).encode('utf-8'))

    def recv(self):
        (obj,), method = self._xml_load(self._conn.recv_bytes().decode('utf-8'))
        return obj

    def send_bytes(self, data):
        # The server's fast path pickles; for XML-RPC re-encode the pickled reply.
        self.send(_loads(data))

    def recv_bytes(self):
        return _dumps(self.recv(), _PROTOCOL)

    def __getattr__(self, name):
        return getattr(self._conn, name)

    def __enter__(self):
        return self

    def __exit__(self, *args):
        self._conn.close()


class XmlListener(object):
    def __init__(self, *args, **kwds):
        self._listener = connection.Listener(*args, **kwds)

    def accept(self):
        return _XmlConnection(self._listener.accept())

    def close(self):
        self._listener.close()

    @property
    def address(self):
        return self._listener.address


def XmlClient(*args, **kwds):
    return _XmlConnection(connection.Client(*args, **kwds))


listener_client = {
    'pickle': (connection.Listener, connection.Client),
    'xmlrpclib': (XmlListener, XmlClient),
}


def _raise_if_not_initial(state, what='server'):
    if state.value != State.INITIAL:
        if state.value == State.STARTED:
            raise ProcessError("Already started %s" % what)
        elif state.value == State.SHUTDOWN:
            raise ProcessError("Manager has shut down")
        raise ProcessError("Unknown state {!r}".format(state.value))


# ---- the manager, in the user's process ----

class BaseManager(object):
    """Starts (or connects to) a server process and creates shared objects in it."""
    _registry = {}
    _Server = Server

    def __init__(self, address=None, authkey=None, serializer='pickle', ctx=None, *,
                 shutdown_timeout=1.0):
        if authkey is None:
            authkey = process.current_process().authkey
        if serializer not in listener_client:
            raise ValueError('unknown serializer %r' % (serializer,))
        self._address = address
        self._authkey = process.AuthenticationString(authkey)
        self._state = State()
        self._state.value = State.INITIAL
        self._serializer = serializer
        self._Listener, self._Client = listener_client[serializer]
        if ctx is None:
            from .context import _default_context
            ctx = _default_context.get_context()
        self._ctx = ctx
        self._shutdown_timeout = shutdown_timeout
        self._process = None

    def get_server(self):
        """A Server for this manager's registry; run it with serve_forever()."""
        _raise_if_not_initial(self._state)
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def connect(self):
        """Connect to a manager server that is already running at self.address."""
        conn = self._Client(self._address, authkey=self._authkey)
        try:
            dispatch(conn, None, 'dummy')
        finally:
            conn.close()
        self._state.value = State.STARTED

    def start(self, initializer=None, initargs=()):
        """Start a server process for this manager."""
        _raise_if_not_initial(self._state)
        if initializer is not None and not callable(initializer):
            raise TypeError('initializer must be a callable')
        reader, writer = connection.Pipe(duplex=False)
        self._process = self._ctx.Process(
            target=type(self)._run_server,
            args=(self._registry, self._address, self._authkey, self._serializer, writer,
                  initializer, initargs),
        )
        ident = ':'.join(str(i) for i in self._process._identity)
        self._process.name = type(self).__name__ + '-' + ident
        self._process.start()
        writer.close()
        try:
            self._address = reader.recv()
        except EOFError:
            self._process.join()
            raise ProcessError('the manager process died before serving (exit code %r)'
                               % self._process.exitcode) from None
        except BaseException:
            # Interrupted (Ctrl-C) before the shutdown finalizer exists: don't leave it behind.
            self._process.terminate()
            self._process.join()
            raise
        finally:
            reader.close()
        self._state.value = State.STARTED
        self.shutdown = util.Finalize(
            self, type(self)._finalize_manager,
            args=(self._process, self._address, self._authkey, self._state, self._Client,
                  self._shutdown_timeout),
            exitpriority=0)

    @classmethod
    def _run_server(cls, registry, address, authkey, serializer, writer,
                    initializer=None, initargs=()):
        """In the manager process: create the server, report its address, serve."""
        # Ctrl-C in the terminal reaches the whole process group; the manager must outlive it
        # until its owner shuts it down.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if initializer is not None:
            initializer(*initargs)
        server = cls._Server(registry, address, authkey, serializer)
        server._parent_pid = os.getppid()
        writer.send(server.address)
        writer.close()
        util.info('manager serving at %r', server.address)
        server.serve_forever()

    def _create(self, typeid, /, *args, **kwds):
        """Create a shared object; return its token and exposed methods (one reference held)."""
        assert self._state.value == State.STARTED, 'server not yet started'
        conn = self._Client(self._address, authkey=self._authkey)
        try:
            id, exposed = dispatch(conn, None, 'create', (typeid,) + args, kwds)
        finally:
            conn.close()
        return Token(typeid, self._address, id), exposed

    def join(self, timeout=None):
        """Join the manager process (if this manager started one)."""
        if self._process is not None:
            self._process.join(timeout)
            if not self._process.is_alive():
                self._process = None

    def _debug_info(self):
        with self._Client(self._address, authkey=self._authkey) as conn:
            return dispatch(conn, None, 'debug_info')

    def _number_of_objects(self):
        with self._Client(self._address, authkey=self._authkey) as conn:
            return dispatch(conn, None, 'number_of_objects')

    def __enter__(self):
        if self._state.value == State.INITIAL:
            self.start()
        if self._state.value != State.STARTED:
            if self._state.value == State.INITIAL:
                raise ProcessError("Unable to start server")
            elif self._state.value == State.SHUTDOWN:
                raise ProcessError("Manager has shut down")
            raise ProcessError("Unknown state {!r}".format(self._state.value))
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.shutdown()

    @staticmethod
    def _finalize_manager(process, address, authkey, state, _Client, shutdown_timeout):
        """Ask the manager process to stop; terminate, then kill it if it does not; join it."""
        if process.is_alive():
            util.info('sending shutdown message to manager')
            try:
                conn = _Client(address, authkey=authkey)
                try:
                    dispatch(conn, None, 'shutdown')
                finally:
                    conn.close()
            except Exception:
                pass
            process.join(timeout=shutdown_timeout)
            if process.is_alive():
                util.info('manager still alive')
                process.terminate()
                process.join(timeout=shutdown_timeout)
                if process.is_alive():
                    util.info('manager still alive after terminate')
                    process.kill()
                    process.join()
        else:
            process.join(0)  # reap it if it died on its own
        state.value = State.SHUTDOWN
        peer = BaseProxy._address_to_local.pop(address, None)
        if peer is not None:
            peer.close()

    @property
    def address(self):
        return self._address

    @classmethod
    def register(cls, typeid, callable=None, proxytype=None, exposed=None,
                 method_to_typeid=None, create_method=True):
        """Register a type (or callable) whose objects this manager's server can hold."""
        if '_registry' not in cls.__dict__:
            cls._registry = cls._registry.copy()
        if proxytype is None:
            proxytype = AutoProxy
        exposed = exposed or getattr(proxytype, '_exposed_', None)
        method_to_typeid = method_to_typeid or getattr(proxytype, '_method_to_typeid_', None)
        if method_to_typeid:
            for key, value in list(method_to_typeid.items()):
                assert type(key) is str, '%r is not a string' % key
                assert type(value) is str, '%r is not a string' % value
        cls._registry[typeid] = (callable, exposed, method_to_typeid, proxytype)

        if create_method:
            def temp(self, /, *args, **kwds):
                util.debug('requesting creation of a shared %r object', typeid)
                assert self._state.value == State.STARTED, 'server not yet started'
                return _create_proxy(self, typeid, proxytype, args, kwds)
            temp.__name__ = typeid
            temp.__qualname__ = cls.__qualname__ + '.' + typeid
            setattr(cls, typeid, temp)


def _create_proxy(manager, typeid, proxytype, args, kwds):
    # One round trip on this thread's connection: the server creates the object with one
    # reference, counted for this process's session, which the new proxy then owns.
    peer = _get_peer(manager._address, manager._authkey, manager._serializer)
    ident, exposed = peer.control('create', (typeid,) + args, kwds)
    token = Token(typeid, manager._address, ident)
    return proxytype(token, manager._serializer, manager=manager, authkey=manager._authkey,
                     exposed=exposed, incref=_ADOPT)


# ---- the client side: connections of this process to one manager ----

class ProcessLocalSet(set):
    """A set that is emptied in a forked child."""

    def __init__(self):
        util.register_after_fork(self, lambda obj: obj.clear())

    def __reduce__(self):
        return type(self), ()


_ADOPT = 'adopt'  # incref= value: the reference was already taken for this proxy


class _Peer(object):
    """This process's link to one manager: an anchor connection that owns the process's
    references (the server drops them when it closes, e.g. when this process is killed),
    one connection per calling thread, and the ids of the referents held."""

    def __init__(self, address, authkey, serializer):
        self.address = address
        self.authkey = authkey
        self.serializer = serializer
        self.Client = listener_client[serializer][1]
        self._reset()
        util.register_after_fork(self, _Peer._reset)

    def _reset(self):
        # Also run in a forked child: the parent's connections must not be used there.
        anchor = getattr(self, 'anchor', None)
        self.anchor = None
        self.session = None
        self.legacy = False  # the server is the standard library's: no sessions
        self.lock = threading.Lock()
        self.lock_owner = None
        self.tls = util.ForkAwareLocal()
        self.idset = set()
        self.pid = os.getpid()
        if anchor is not None:
            try:
                anchor.close()
            except Exception:
                pass

    def _open(self, funcname, args):
        name = process.current_process().name
        if threading.current_thread().name != 'MainThread':
            name += '|' + threading.current_thread().name
        conn = self.Client(self.address, authkey=self.authkey)
        try:
            if _is_inet(self.address):
                _set_nodelay(conn)
            result = dispatch(conn, None, funcname, (name,) + args)
        except BaseException:
            conn.close()
            raise
        return conn, result

    def ensure_session(self):
        if self.anchor is None and not self.legacy:
            with self.lock:
                # A finalizer run by the GC in here must not wait for this lock (see decref).
                self.lock_owner = threading.get_ident()
                try:
                    if self.anchor is None and not self.legacy:
                        try:
                            self.anchor, self.session = self._open('open_session', ())
                            # At a normal exit, tell the server before the connections drop
                            # (before the proxies' finalizers, priority 10, close them).
                            util.Finalize(self, _Peer._leave, args=(self.anchor, self.lock),
                                          exitpriority=100)
                        except RemoteError:
                            # A standard library manager: references are counted the
                            # standard library's way, over connections of their own.
                            self.legacy = True
                finally:
                    self.lock_owner = None
        return self.session

    def connection(self):
        try:
            return self.tls.connection
        except AttributeError:
            pass
        util.debug('thread %r does not own a connection', threading.current_thread().name)
        session = self.ensure_session()
        conn, _ = self._open('accept_connection', () if self.legacy else (session,))
        self.tls.connection = conn
        return conn

    def drop_connection(self, conn):
        # The exchange on conn was interrupted: a reply may still come, so never reuse it.
        if getattr(self.tls, 'connection', None) is conn:
            del self.tls.connection
        try:
            conn.close()
        except Exception:
            pass

    def control(self, funcname, args=(), kwds={}):
        """A server function (create, incref...) for this process's session."""
        self.ensure_session()
        if self.legacy:
            with self.Client(self.address, authkey=self.authkey) as conn:
                return dispatch(conn, None, funcname, args, kwds)
        return self.call(None, funcname, args, kwds)

    def exchange(self, ident, methodname, args, kwds):
        """One request/reply on this thread's connection; returns (kind, result)."""
        try:
            conn = self.tls.connection
        except AttributeError:
            conn = self.connection()
        # Pickled before anything is written: an unpicklable argument leaves conn usable.
        data = _dumps((ident, methodname, args, kwds), _PROTOCOL)
        try:
            conn.send_bytes(data)
            data = conn.recv_bytes()
        except BaseException as e:
            self.drop_connection(conn)
            if type(e) is EOFError:
                raise _manager_gone(self) from None
            raise
        # Unpickled after the exchange: a proxy in the reply may use this connection.
        return _loads(data)

    def call(self, ident, methodname, args=(), kwds={}):
        """One request/reply on this thread's connection; returns the result or raises."""
        kind, result = self.exchange(ident, methodname, args, kwds)
        if kind == '#RETURN':
            return result
        try:
            raise convert_to_error(kind, result)
        finally:
            del result

    @staticmethod
    def _leave(anchor, lock):
        # The server leaves the locks this process still holds held (see Server.session_state).
        if not lock.acquire(timeout=1.0):
            return
        try:
            if not anchor.closed:
                dispatch(anchor, None, 'leave_session')
        except Exception:
            pass  # the manager is gone, or this process's anchor was dropped
        finally:
            lock.release()

    def decref(self, ident):
        """Drop one reference (called from finalizers, possibly at any point of any thread)."""
        me = threading.get_ident()
        if self.anchor is not None and self.lock_owner != me and os.getpid() == self.pid:
            with self.lock:
                anchor = self.anchor
                if anchor is not None:
                    self.lock_owner = me
                    try:
                        dispatch(anchor, None, 'decref', (ident,))
                        return
                    except (EOFError, OSError):
                        self.anchor = None
                        raise
                    finally:
                        self.lock_owner = None
        # Re-entered from this thread's own exchange on the anchor (a finalizer run by the
        # GC in the middle of it), or no anchor: a connection of its own.
        with self.Client(self.address, authkey=self.authkey) as conn:
            dispatch(conn, None, 'decref', (ident,) if self.legacy else (ident, self.session))

    def close(self):
        anchor, self.anchor = self.anchor, None
        if anchor is not None:
            try:
                anchor.close()
            except Exception:
                pass
        conn = getattr(self.tls, 'connection', None)
        if conn is not None:
            del self.tls.connection
            try:
                conn.close()
            except Exception:
                pass


def _manager_gone(peer):
    return EOFError('the manager at %r closed the connection: its process has exited or was '
                    'killed' % (peer.address,))


_peers_mutex = threading.Lock()


def _get_peer(address, authkey, serializer):
    peer = BaseProxy._address_to_local.get(address)
    if peer is None:
        with _peers_mutex:
            peer = BaseProxy._address_to_local.get(address)
            if peer is None:
                peer = _Peer(address, authkey, serializer)
                BaseProxy._address_to_local[address] = peer
    return peer


class BaseProxy(object):
    """A reference to a shared object in a manager; methods run there."""
    _address_to_local = {}
    _mutex = util.ForkAwareThreadLock()

    def __init__(self, token, serializer, manager=None, authkey=None, exposed=None,
                 incref=True, manager_owned=False):
        if authkey is not None:
            self._authkey = process.AuthenticationString(authkey)
        elif manager is not None:
            self._authkey = manager._authkey
        else:
            self._authkey = process.current_process().authkey
        self._peer = _get_peer(token.address, self._authkey, serializer)
        self._token = token
        self._id = token.id
        self._manager = manager
        self._serializer = serializer
        self._Client = listener_client[serializer][1]
        # True for a proxy rebuilt inside the manager process itself (a proxy stored in
        # another shared object): it holds no reference of its own.
        self._owned_by_manager = manager_owned
        if incref == _ADOPT:
            self._track()
        elif incref:
            self._incref()
        util.register_after_fork(self, BaseProxy._after_fork)

    @property
    def _tls(self):
        return self._peer.tls

    @property
    def _idset(self):
        return self._peer.idset

    def _connect(self):
        self._peer.connection()

    def _callmethod(self, methodname, args=(), kwds={}):
        """Call a method of the referent and return a copy of the result."""
        kind, result = self._peer.exchange(self._id, methodname, args, kwds)
        if kind == '#RETURN':
            return result
        elif kind == '#PROXY':
            exposed, token = result
            token.address = self._token.address
            registry = self._manager._registry if self._manager is not None else None
            if registry is not None and token.typeid in registry:
                proxytype = registry[token.typeid][-1]
            else:
                proxytype = AutoProxy
            return proxytype(token, self._serializer, manager=self._manager,
                             authkey=self._authkey, exposed=exposed, incref=_ADOPT)
        try:
            raise convert_to_error(kind, result)
        finally:
            del result

    def _getvalue(self):
        """A copy of the referent."""
        return self._callmethod('#GETVALUE')

    def _incref(self):
        if self._owned_by_manager:
            util.debug('owned_by_manager skipped INCREF of %r', self._token.id)
            return
        peer = self._peer
        peer.control('incref', (self._id,))
        util.debug('INCREF %r', self._token.id)
        self._track()

    def _track(self):
        # This proxy now owns one reference: drop it when the proxy goes (or at exit).
        self._peer.idset.add(self._id)
        state = self._manager and self._manager._state
        self._close = util.Finalize(
            self, BaseProxy._decref,
            args=(self._token, self._peer, state),
            exitpriority=10)

    @staticmethod
    def _decref(token, peer, state):
        peer.idset.discard(token.id)
        if state is None or state.value == State.STARTED:
            try:
                util.debug('DECREF %r', token.id)
                peer.decref(token.id)
            except Exception as e:
                util.debug('... decref failed %s', e)
        else:
            util.debug('DECREF %r -- manager already shutdown', token.id)
        # No more references from this process: this thread's connection can go.
        if not peer.idset and getattr(peer.tls, 'connection', None) is not None:
            util.debug('thread %r has no more proxies so closing conn',
                       threading.current_thread().name)
            peer.tls.connection.close()
            del peer.tls.connection

    def _after_fork(self):
        self._manager = None
        try:
            self._incref()
        except Exception as e:
            util.info('incref failed: %s' % e)

    def __reduce__(self):
        kwds = {}
        if get_spawning_popen() is not None:
            kwds['authkey'] = self._authkey
        if getattr(self, '_isauto', False):
            kwds['exposed'] = self._exposed_
            return (RebuildProxy, (AutoProxy, self._token, self._serializer, kwds))
        return (RebuildProxy, (type(self), self._token, self._serializer, kwds))

    def __deepcopy__(self, memo):
        return self._getvalue()

    def __repr__(self):
        return '<%s object, typeid %r at %#x>' % (
            type(self).__name__, self._token.typeid, id(self))

    def __str__(self):
        """The referent's repr (or a fall-back if that fails)."""
        try:
            return self._callmethod('__repr__')
        except Exception:
            return repr(self)[:-1] + "; '__str__()' failed>"


def RebuildProxy(func, token, serializer, kwds):
    """Unpickle a proxy: in its own manager's process it holds no reference."""
    server = getattr(process.current_process(), '_manager_server', None)
    if server and server.address == token.address:
        util.debug('Rebuild a proxy owned by manager, token=%r', token)
        kwds['manager_owned'] = True
        if token.id not in server.id_to_local_proxy_obj:
            server.id_to_local_proxy_obj[token.id] = server.id_to_obj[token.id]
    incref = (kwds.pop('incref', True) and
              not getattr(process.current_process(), '_inheriting', False))
    return func(token, serializer, incref=incref, **kwds)


def _make_method(name):
    def method(self, /, *args, **kwds):
        return self._callmethod(name, args, kwds)
    method.__name__ = name
    return method


def MakeProxyType(name, exposed, _cache={}):
    """A proxy type (subclass of BaseProxy) with one forwarding method per exposed name."""
    exposed = tuple(exposed)
    try:
        return _cache[(name, exposed)]
    except KeyError:
        pass
    dic = {meth: _make_method(meth) for meth in exposed}
    ProxyType = type(name, (BaseProxy,), dic)
    ProxyType._exposed_ = exposed
    _cache[(name, exposed)] = ProxyType
    return ProxyType


def AutoProxy(token, serializer, manager=None, authkey=None, exposed=None, incref=True,
              manager_owned=False):
    """A proxy whose methods are the referent's exposed methods (asked from the server)."""
    _Client = listener_client[serializer][1]
    if authkey is None and manager is not None:
        authkey = manager._authkey
    if authkey is None:
        authkey = process.current_process().authkey
    if exposed is None:
        with _Client(token.address, authkey=authkey) as conn:
            exposed = dispatch(conn, None, 'get_methods', (token,))
    ProxyType = MakeProxyType('AutoProxy[%s]' % token.typeid, exposed)
    proxy = ProxyType(token, serializer, manager=manager, authkey=authkey, incref=incref,
                      manager_owned=manager_owned)
    proxy._isauto = True
    return proxy



# ---- types registered with SyncManager ----

class Namespace(object):
    def __init__(self, /, **kwds):
        self.__dict__.update(kwds)

    def __repr__(self):
        temp = ['%s=%r' % (name, value) for name, value in list(self.__dict__.items())
                if not name.startswith('_')]
        temp.sort()
        return '%s(%s)' % (self.__class__.__name__, ', '.join(temp))


class Value(object):
    def __init__(self, typecode, value, lock=True):
        self._typecode = typecode
        self._value = value

    def get(self):
        return self._value

    def set(self, value):
        self._value = value

    def __repr__(self):
        return '%s(%r, %r)' % (type(self).__name__, self._typecode, self._value)

    value = property(get, set)


def Array(typecode, sequence, lock=True):
    return array.array(typecode, sequence)


def _Pool(*args, **kwds):
    # Imported when first used, in the manager process.
    from .pool import Pool
    return Pool(*args, **kwds)


class IteratorProxy(BaseProxy):
    _exposed_ = ('__next__', 'send', 'throw', 'close')

    def __iter__(self):
        return self

    def __next__(self, *args):
        return self._callmethod('__next__', args)

    def send(self, *args):
        return self._callmethod('send', args)

    def throw(self, *args):
        return self._callmethod('throw', args)

    def close(self, *args):
        return self._callmethod('close', args)


class AcquirerProxy(BaseProxy):
    _exposed_ = ('acquire', 'release', 'locked')

    def acquire(self, blocking=True, timeout=None):
        args = (blocking,) if timeout is None else (blocking, timeout)
        return self._callmethod('acquire', args)

    def release(self):
        return self._callmethod('release')

    def locked(self):
        """3.14's API: whether the served lock is held (a served semaphore has no locked())."""
        return self._callmethod('locked')

    def __enter__(self):
        return self._callmethod('acquire')

    def __exit__(self, exc_type, exc_val, exc_tb):
        return self._callmethod('release')


class ConditionProxy(AcquirerProxy):
    _exposed_ = ('acquire', 'release', 'wait', 'notify', 'notify_all')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))

    def notify(self, n=1):
        return self._callmethod('notify', (n,))

    def notify_all(self):
        return self._callmethod('notify_all')

    # The predicate loop of cpool's own Condition; only wait() differs (a call to the manager).
    def wait_for(self, predicate, timeout=None):
        from .synchronize import Condition
        return Condition.wait_for(self, predicate, timeout)


class EventProxy(BaseProxy):
    _exposed_ = ('is_set', 'set', 'clear', 'wait')

    def is_set(self):
        return self._callmethod('is_set')

    def set(self):
        return self._callmethod('set')

    def clear(self):
        return self._callmethod('clear')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))


class BarrierProxy(BaseProxy):
    _exposed_ = ('__getattribute__', 'wait', 'abort', 'reset')

    def wait(self, timeout=None):
        return self._callmethod('wait', (timeout,))

    def abort(self):
        return self._callmethod('abort')

    def reset(self):
        return self._callmethod('reset')

    @property
    def parties(self):
        return self._callmethod('__getattribute__', ('parties',))

    @property
    def n_waiting(self):
        return self._callmethod('__getattribute__', ('n_waiting',))

    @property
    def broken(self):
        return self._callmethod('__getattribute__', ('broken',))


class NamespaceProxy(BaseProxy):
    _exposed_ = ('__getattribute__', '__setattr__', '__delattr__')

    def __getattr__(self, key):
        if key[0] == '_':
            return object.__getattribute__(self, key)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__getattribute__', (key,))

    def __setattr__(self, key, value):
        if key[0] == '_':
            return object.__setattr__(self, key, value)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__setattr__', (key, value))

    def __delattr__(self, key):
        if key[0] == '_':
            return object.__delattr__(self, key)
        callmethod = object.__getattribute__(self, '_callmethod')
        return callmethod('__delattr__', (key,))


class ValueProxy(BaseProxy):
    _exposed_ = ('get', 'set')

    def get(self):
        return self._callmethod('get')

    def set(self, value):
        return self._callmethod('set', (value,))

    value = property(get, set)

    __class_getitem__ = classmethod(types.GenericAlias)


BaseListProxy = MakeProxyType('BaseListProxy', (
    '__add__', '__contains__', '__delitem__', '__getitem__', '__len__',
    '__mul__', '__reversed__', '__rmul__', '__setitem__',
    'append', 'clear', 'copy', 'count', 'extend', 'index', 'insert', 'pop', 'remove',
    'reverse', 'sort', '__imul__'
))


class ListProxy(BaseListProxy):
    def __iadd__(self, value):
        self._callmethod('extend', (value,))
        return self

    def __imul__(self, value):
        self._callmethod('__imul__', (value,))
        return self

    __class_getitem__ = classmethod(types.GenericAlias)


# clear/copy on lists, fromkeys and the | operators on dicts, and the set proxy: what 3.14-3.15
# added, offered on every Python (copy, fromkeys and | return plain values, as there).
_BaseDictProxy = MakeProxyType('DictProxy', (
    '__contains__', '__delitem__', '__getitem__', '__ior__', '__iter__', '__len__',
    '__or__', '__reversed__', '__ror__',
    '__setitem__', 'clear', 'copy', 'fromkeys', 'get', 'items',
    'keys', 'pop', 'popitem', 'setdefault', 'update', 'values'
))
_BaseDictProxy._method_to_typeid_ = {
    '__iter__': 'Iterator',
}


def _served_inplace(name):
    """An in-place operator that changes the served object; the proxy stays the name bound to
    it (the served method's return value, a copy of the object, is not wanted)."""
    def op(self, value):
        self._callmethod(name, (value,))
        return self
    op.__name__ = name
    return op


class DictProxy(_BaseDictProxy):
    __ior__ = _served_inplace('__ior__')
    __class_getitem__ = classmethod(types.GenericAlias)


_BaseSetProxy = MakeProxyType('SetProxy', (
    '__and__', '__contains__', '__iand__', '__ior__',
    '__isub__', '__iter__', '__ixor__', '__len__', '__or__', '__rand__',
    '__ror__', '__rsub__', '__rxor__', '__sub__', '__xor__',
    '__ge__', '__gt__', '__le__', '__lt__',
    'add', 'clear', 'copy', 'difference', 'difference_update', 'discard',
    'intersection', 'intersection_update', 'isdisjoint', 'issubset',
    'issuperset', 'pop', 'remove', 'symmetric_difference',
    'symmetric_difference_update', 'union', 'update',
))
# Iterating goes through a served Iterator, as a dict's does (pickling the set's iterator would
# send a snapshot list of the whole set in one message).
_BaseSetProxy._method_to_typeid_ = {
    '__iter__': 'Iterator',
}


class SetProxy(_BaseSetProxy):
    __ior__ = _served_inplace('__ior__')
    __iand__ = _served_inplace('__iand__')
    __ixor__ = _served_inplace('__ixor__')
    __isub__ = _served_inplace('__isub__')
    __class_getitem__ = classmethod(types.GenericAlias)


ArrayProxy = MakeProxyType('ArrayProxy', ('__len__', '__getitem__', '__setitem__'))


BasePoolProxy = MakeProxyType('PoolProxy', (
    'apply', 'apply_async', 'close', 'imap', 'imap_unordered', 'join',
    'map', 'map_async', 'starmap', 'starmap_async', 'terminate',
))
BasePoolProxy._method_to_typeid_ = {
    'apply_async': 'AsyncResult',
    'map_async': 'AsyncResult',
    'starmap_async': 'AsyncResult',
    'imap': 'Iterator',
    'imap_unordered': 'Iterator',
}


class PoolProxy(BasePoolProxy):
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.terminate()


class SyncManager(BaseManager):
    """A manager serving the synchronization types of `threading` and `queue`, plus `dict`,
    `list`, `Namespace`, `Value`, `Array` and `Pool`. `cpool.Manager()` returns a started one."""


SyncManager.register('Queue', _Queue)
SyncManager.register('JoinableQueue', _Queue)
SyncManager.register('Event', _Event, EventProxy)
SyncManager.register('Lock', _Lock, AcquirerProxy)
SyncManager.register('RLock', _RLock, AcquirerProxy)
SyncManager.register('Semaphore', _Semaphore, AcquirerProxy)
SyncManager.register('BoundedSemaphore', _BoundedSemaphore, AcquirerProxy)
SyncManager.register('Condition', _Condition, ConditionProxy)
SyncManager.register('Barrier', threading.Barrier, BarrierProxy)
SyncManager.register('Pool', _Pool, PoolProxy)
SyncManager.register('list', list, ListProxy)
SyncManager.register('dict', dict, DictProxy)
SyncManager.register('set', set, SetProxy)
SyncManager.register('Value', Value, ValueProxy)
SyncManager.register('Array', Array, ArrayProxy)
SyncManager.register('Namespace', Namespace, NamespaceProxy)
# types returned by methods of PoolProxy (and DictProxy.__iter__)
SyncManager.register('Iterator', proxytype=IteratorProxy, create_method=False)
SyncManager.register('AsyncResult', create_method=False)


# ---- SharedMemoryManager: a manager that unlinks the segments it tracks when it stops ----

def _shared_memory():
    # Imported on use: a program that imports cpool.shared_memory gets a cleanup watcher before
    # its first child (see cpool.process), which Manager() users need not pay for.
    from . import shared_memory
    return shared_memory


class _SharedMemoryTracker(object):
    """The names of the segments a SharedMemoryServer unlinks at shutdown."""

    def __init__(self, name, segment_names=None):
        self.shared_memory_context_name = name
        self.segment_names = [] if segment_names is None else segment_names

    def register_segment(self, segment_name):
        """Track segment_name (unlinked at shutdown)."""
        util.debug('Register segment %r in pid %d', segment_name, os.getpid())
        self.segment_names.append(segment_name)

    def destroy_segment(self, segment_name):
        """Stop tracking segment_name and unlink it."""
        util.debug('Destroy segment %r in pid %d', segment_name, os.getpid())
        self.segment_names.remove(segment_name)
        try:
            segment = _shared_memory().SharedMemory(segment_name)
        except FileNotFoundError:
            # Unlinked by its user already: nothing is left to do, and the other segments must
            # still go (the standard library's shutdown stops at the first such name).
            return
        segment.close()
        segment.unlink()

    def unlink(self):
        """Unlink every tracked segment."""
        for segment_name in self.segment_names[:]:
            self.destroy_segment(segment_name)

    def __del__(self):
        self.unlink()

    def __getstate__(self):
        return (self.shared_memory_context_name, self.segment_names)

    def __setstate__(self, state):
        self.__init__(*state)


class SharedMemoryServer(Server):
    """A manager Server that also tracks shared-memory segments and unlinks them when it stops
    (shutdown, or the end of its process otherwise than by a signal)."""

    public = Server.public + ['track_segment', 'release_segment', 'list_segments']

    def __init__(self, *args, **kwargs):
        Server.__init__(self, *args, **kwargs)
        address = self.address
        if isinstance(address, bytes):  # a Linux abstract-namespace address
            address = os.fsdecode(address)
        self.shared_memory_context = _SharedMemoryTracker('shm_%s_%d' % (address, os.getpid()))
        util.debug('SharedMemoryServer started by pid %d', os.getpid())

    def serve_forever(self):
        try:
            Server.serve_forever(self)
        finally:
            # Also when the server stops because the process that started it died.
            self.shared_memory_context.unlink()

    def create(self, c, typeid, /, *args, **kwargs):
        """Create a shared object; a proxy type marked _shared_memory_proxy also gets the
        server's shared_memory_context."""
        if hasattr(self.registry[typeid][-1], '_shared_memory_proxy'):
            kwargs['shared_memory_context'] = self.shared_memory_context
        return Server.create(self, c, typeid, *args, **kwargs)

    def shutdown(self, c):
        """Unlink every tracked segment, then stop the server."""
        try:
            self.shared_memory_context.unlink()
        finally:
            Server.shutdown(self, c)

    def track_segment(self, c, segment_name):
        """Track segment_name: it is unlinked when the server stops."""
        self.shared_memory_context.register_segment(segment_name)

    def release_segment(self, c, segment_name):
        """Unlink segment_name now and stop tracking it."""
        self.shared_memory_context.destroy_segment(segment_name)

    def list_segments(self, c):
        """The names of the segments the server tracks."""
        return self.shared_memory_context.segment_names


class SharedMemoryManager(BaseManager):
    """A BaseManager whose server unlinks, when it stops, the SharedMemory blocks and
    ShareableLists made with its SharedMemory(size) and ShareableList(sequence) methods."""

    _Server = SharedMemoryServer

    def __init__(self, *args, **kwargs):
        # The manager process then holds the same shared-memory watcher as this one, so its
        # unlinks at shutdown take the names off the list of the watcher that has them.
        from . import resource_tracker
        resource_tracker.ensure_running()
        BaseManager.__init__(self, *args, **kwargs)
        util.debug('%s created by pid %d', type(self).__name__, os.getpid())

    def get_server(self):
        """A SharedMemoryServer for this manager; run it with serve_forever()."""
        _raise_if_not_initial(self._state, 'SharedMemoryServer')
        return self._Server(self._registry, self._address, self._authkey, self._serializer)

    def _tracked(self, make, name_of):
        # Created here, tracked there: if the server cannot take it, nobody would unlink it.
        with self._Client(self._address, authkey=self._authkey) as conn:
            obj = make()
            try:
                dispatch(conn, None, 'track_segment', (name_of(obj),))
            except BaseException:
                shm = getattr(obj, 'shm', obj)
                shm.close()
                shm.unlink()
                raise
        return obj

    def SharedMemory(self, size):
        """A new SharedMemory block of size bytes, unlinked when the manager shuts down."""
        return self._tracked(lambda: _shared_memory().SharedMemory(None, create=True, size=size),
                             lambda sms: sms.name)

    def ShareableList(self, sequence):
        """A new ShareableList holding sequence, unlinked when the manager shuts down."""
        return self._tracked(lambda: _shared_memory().ShareableList(sequence),
                             lambda sl: sl.shm.name)


__all__.append('SharedMemoryManager')
