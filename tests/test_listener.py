"""Listener/Client: both families, interop with the standard library both ways, and security."""
import os
import pickle
import socket
import stat
import struct
import sys
import threading
import time
import tracemalloc

import multiprocessing.connection as mc
import pytest

import cpool
from cpool import connection as cc

MODS = {'cpool': cc, 'stdlib': mc}
FAMILIES = ['AF_UNIX', 'AF_INET']


def run_client(cmod, address, authkey, results, payload='ping'):
    try:
        c = cmod.Client(address, authkey=authkey)
        c.send(payload)
        results.append(c.recv())
        c.close()
    except Exception as e:  # reported to the test thread
        results.append(e)


def start_client(*args, **kw):
    t = threading.Thread(target=run_client, args=args, kwargs=kw, daemon=True)
    t.start()
    return t


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('server,client', [('cpool', 'cpool'), ('cpool', 'stdlib'),
                                           ('stdlib', 'cpool')])
@pytest.mark.parametrize('authkey', [None, b'secret key'])
def test_listener_client_interop(server, client, family, authkey):
    with MODS[server].Listener(family=family, authkey=authkey) as listener:
        results = []
        t = start_client(MODS[client], listener.address, authkey, results)
        conn = listener.accept()
        assert conn.recv() == 'ping'
        conn.send(('pong', family))
        t.join(10)
        assert results == [('pong', family)]
        if family == 'AF_INET':
            assert listener.last_accepted[0] == '127.0.0.1'
        conn.close()


@pytest.mark.parametrize('server,client', [('cpool', 'cpool'), ('cpool', 'stdlib'),
                                           ('stdlib', 'cpool')])
def test_wrong_key_and_listener_keeps_serving(server, client):
    with MODS[server].Listener(authkey=b'right') as listener:
        results = []
        t = start_client(MODS[client], listener.address, b'wrong', results)
        with pytest.raises(cpool.AuthenticationError if server == 'cpool'
                           else mc.AuthenticationError):
            listener.accept()
        t.join(10)
        assert len(results) == 1 and type(results[0]).__name__ == 'AuthenticationError'
        t = start_client(MODS[client], listener.address, b'right', results)
        conn = listener.accept()
        assert conn.recv() == 'ping'
        conn.send('served')
        t.join(10)
        assert results[1] == 'served'


def raw_connect(address):
    s = socket.socket(socket.AF_UNIX if isinstance(address, str) else socket.AF_INET)
    s.connect(address)
    return s


def read_frame(s):
    n = struct.unpack('!i', s.recv(4, socket.MSG_WAITALL))[0]
    return s.recv(n, socket.MSG_WAITALL)


@pytest.mark.parametrize('family', FAMILIES)
def test_giant_length_before_auth_is_dropped(family):
    with cc.Listener(family=family, authkey=b'k') as listener:
        def attacker():
            s = raw_connect(listener.address)
            assert read_frame(s).startswith(b'#CHALLENGE#')
            s.sendall(struct.pack('!i', 0x7ffffff0) + b'x' * 1000)
            try:
                attacker.closed = s.recv(100) == b''  # the server hangs up, sends nothing more
            except ConnectionResetError:  # hung up with our bytes unread
                attacker.closed = True
            s.close()
        t = threading.Thread(target=attacker, daemon=True)
        tracemalloc.start()
        try:
            t.start()
            with pytest.raises(OSError, match='bad message length'):
                listener.accept()
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        t.join(10)
        assert attacker.closed
        assert peak < 10 << 20
        results = []
        t = start_client(cc, listener.address, b'k', results)
        c = listener.accept()
        assert c.recv() == 'ping'
        c.send('ok')
        t.join(10)
        assert results == ['ok']


class _Boom:
    def __reduce__(self):
        return (_mark_unpickled, ())


UNPICKLED = []


def _mark_unpickled():
    UNPICKLED.append(1)
    return 'unpickled!'


def test_nothing_unpickled_before_auth():
    with cc.Listener(authkey=b'k') as listener:
        def attacker():
            s = raw_connect(listener.address)
            read_frame(s)
            data = pickle.dumps(_Boom())
            s.sendall(struct.pack('!i', len(data)) + data)
            attacker.reply = read_frame(s)
            s.close()
        t = threading.Thread(target=attacker, daemon=True)
        t.start()
        with pytest.raises(cpool.AuthenticationError):
            listener.accept()
        t.join(10)
        assert attacker.reply == b'#FAILURE#'
        assert UNPICKLED == []


def test_silent_client_does_not_hold_accept(monkeypatch):
    monkeypatch.setattr(cc, 'CONNECTION_TIMEOUT', 0.5)
    with cc.Listener(authkey=b'k') as listener:
        s = raw_connect(listener.address)
        t0 = time.monotonic()
        with pytest.raises(cpool.AuthenticationError, match='no answer'):
            listener.accept()
        assert time.monotonic() - t0 < 5
        s.close()


def test_unix_socket_owner_only():
    with cc.Listener() as listener:
        path = listener.address
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_ISSOCK(os.stat(path).st_mode)
    assert not os.path.exists(path)  # removed on close


def test_explicit_unix_path_owner_only(tmp_path):
    path = str(tmp_path / 'sock')
    with cc.Listener(path, authkey=b'a') as listener:
        assert listener.address == path
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        results = []
        t = start_client(cc, path, b'a', results)
        c = listener.accept()
        c.send(c.recv())
        t.join(10)
        assert results == ['ping']


def test_abstract_unix_address():
    name = '\0cpool-test-%d' % os.getpid()
    assert cc.address_type(name) == 'AF_UNIX'
    assert cc.address_type(name.encode()) == 'AF_UNIX'
    with cc.Listener(name, authkey=b'z') as listener:
        results = []
        t = start_client(mc, name, b'z', results)
        c = listener.accept()
        c.send(c.recv())
        t.join(10)
        assert results == ['ping']


def test_addresses_and_bad_arguments():
    assert cc.address_type(('localhost', 1)) == 'AF_INET'
    assert cc.address_type('/tmp/x') == 'AF_UNIX'
    with pytest.raises(TypeError):  # as the standard library
        cc.address_type(3)
    assert cc.arbitrary_address('AF_INET') == ('localhost', 0)
    from cpool import util
    assert os.path.dirname(cc.arbitrary_address('AF_UNIX')) == util.get_temp_dir()
    with pytest.raises(ValueError):
        cc.arbitrary_address('AF_BOGUS')
    with pytest.raises(TypeError, match='authkey should be a byte string'):
        cc.Listener(authkey='str')
    with pytest.raises(TypeError, match='authkey should be a byte string'):
        cc.Client(('localhost', 1), authkey='str')
    a, b = cc.Pipe()
    with pytest.raises(ValueError, match='Authkey must be bytes'):
        cc.deliver_challenge(a, 'str')
    with pytest.raises(ValueError, match='Authkey must be bytes'):
        cc.answer_challenge(a, 'str')
    listener = cc.Listener()
    listener.close()
    listener.close()
    with pytest.raises(OSError, match='listener is closed'):
        listener.accept()


def test_challenge_functions_over_a_pipe_with_stdlib():
    """deliver/answer_challenge are the running Python's protocol: they pair with the stdlib's."""
    a, b = cc.Pipe()
    b2 = mc.Connection(os.dup(b.fileno()))
    b.close()
    errs = []

    def other():
        try:
            mc.answer_challenge(b2, b'key')
            mc.deliver_challenge(b2, b'key')
        except Exception as e:
            errs.append(e)
    t = threading.Thread(target=other)
    t.start()
    cc.deliver_challenge(a, b'key')
    cc.answer_challenge(a, b'key')
    t.join(10)
    assert errs == []


@pytest.mark.skipif(sys.version_info < (3, 12), reason='3.12+ digest negotiation')
def test_modern_challenge_has_digest_prefix():
    a, b = cc.Pipe()
    errs = []

    def server():
        try:
            cc.deliver_challenge(a, b'k', 'sha384')
        except cpool.AuthenticationError as e:
            errs.append(e)
    t = threading.Thread(target=server, daemon=True)
    t.start()
    msg = b.recv_bytes(256)
    assert msg.startswith(b'#CHALLENGE#{sha384}')
    b.send_bytes(b'{md5}' + b'x' * 16)  # a wrong MAC: refused
    assert b.recv_bytes(256) == b'#FAILURE#'
    t.join(10)
    assert len(errs) == 1


def _serve_one(address, authkey, n):
    c = cc.Client(address, authkey=authkey)
    for i in range(n):
        c.send(c.recv() + 1)


def test_listener_with_processes(cctx):
    with cc.Listener(family='AF_INET', authkey=b'procs') as listener:
        p = cctx.Process(target=_serve_one, args=(listener.address, b'procs', 3))
        p.start()
        c = listener.accept()
        x = 0
        for _ in range(3):
            c.send(x)
            x = c.recv()
        assert x == 3
        p.join(30)
        assert p.exitcode == 0


def test_xml_listener_client():
    with cc.XmlListener(authkey=b'x') as listener:
        results = []

        def client():
            c = cc.XmlClient(listener.address, authkey=b'x')
            c.send({'a': [1, 2.5, 'three']})
            results.append(c.recv())
        t = threading.Thread(target=client, daemon=True)
        t.start()
        c = listener.accept()
        got = c.recv()
        c.send(got['a'])
        t.join(10)
        assert got == {'a': [1, 2.5, 'three']}
        assert results == [[1, 2.5, 'three']]


class _FakeConnection:
    def __init__(self, replies):
        self.replies = list(replies)
        self.sent = []

    def recv_bytes(self, size=None):
        return self.replies.pop(0) if self.replies else b''

    def send_bytes(self, data):
        self.sent.append(data)


@pytest.mark.parametrize('mod', [cc, mc])
def test_challenge_failures_with_fake_connections(mod):
    """As CPython's own tests: bogus answers give AuthenticationError, never another error."""
    with pytest.raises(mod.AuthenticationError):
        mod.deliver_challenge(_FakeConnection([b'something bogus']), b'abc')
    with pytest.raises(mod.AuthenticationError):
        mod.answer_challenge(_FakeConnection([b'#CHALLENGE#', b'something bogus']), b'abc')
    fake = _FakeConnection([b'#CHALLENGE#' + b'm' * 48, b'#FAILURE#'])
    with pytest.raises(mod.AuthenticationError):
        mod.answer_challenge(fake, b'abc')


@pytest.mark.skipif(sys.version_info < (3, 12), reason='3.12+ digest negotiation')
def test_create_and_verify_match_stdlib():
    key = b'supadupasecretkey'
    for msg in [b'is-twenty-bytes-long', b'{sha256}' + b'x' * 40, b'{md5}' + b'y' * 40]:
        ours = cc._create_response(key, msg)
        assert ours == mc._create_response(key, msg)
        cc._verify_challenge(key, msg, ours)
        mc._verify_challenge(key, msg, ours)
        with pytest.raises(cpool.AuthenticationError):
            cc._verify_challenge(key, msg, ours[:-1] + bytes([ours[-1] ^ 1]))
