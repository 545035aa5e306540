"""The forkserver start method: a small server process, started once, that forks a child per
request; the parent sends it the child's fds over a Unix socket (SCM_RIGHTS)."""
import atexit
import errno
import os
import selectors
import signal
import socket
import struct
import sys
import threading

from . import _core, process, reduction, resource_tracker, spawn, util

__all__ = ['ensure_running', 'get_inherited_fds', 'connect_to_new_process',
           'set_forkserver_preload']

MAXFDS_TO_SEND = 256
SIGNED_STRUCT = struct.Struct('q')  # large enough for pid_t


class ForkServer(object):

    def __init__(self):
        self._forkserver_address = None
        self._forkserver_alive_fd = None
        self._forkserver_pid = None
        self._inherited_fds = None
        self._lock = threading.Lock()
        self._preload_modules = ['__main__']
        # The default list names '__main__' but the standard library's server never imports
        # it (3.11-3.13.0: it is never handed the path), so each child imports the main script
        # itself, with the parent's sys.argv, as spawn does. Only a list the user sets makes
        # the server import it.
        self._preload_main = False
        self._preload_on_error = 'ignore'

    def _stop(self):
        # For tests: stop the server and forget it.
        with self._lock:
            if self._forkserver_pid is None:
                return
            os.close(self._forkserver_alive_fd)
            self._forkserver_alive_fd = None
            os.waitpid(self._forkserver_pid, 0)
            self._forkserver_pid = None
            if not util.is_abstract_socket_namespace(self._forkserver_address):
                try:
                    os.unlink(self._forkserver_address)
                except OSError:
                    pass
            self._forkserver_address = None

    def set_forkserver_preload(self, modules_names, *, on_error='ignore'):
        """Modules the server imports once, so forked children start with them loaded.

        on_error (3.15's API, on every Python) says what a module that fails to import does in
        the server: 'ignore' it, 'warn' (an ImportWarning on the server's stderr) or 'fail'
        (the server exits, and starting a process raises, with a note saying why)."""
        if not all(type(mod) is str for mod in modules_names):
            raise TypeError('module_names must be a list of strings')
        if on_error not in ('ignore', 'warn', 'fail'):
            raise ValueError("on_error must be 'ignore', 'warn', or 'fail', not %r" % (on_error,))
        self._preload_modules = modules_names
        self._preload_main = '__main__' in modules_names
        self._preload_on_error = on_error

    def get_inherited_fds(self):
        """In a child of the server: the fds its parent handed over, in DupFd index order."""
        return self._inherited_fds

    def connect_to_new_process(self, fds):
        """Ask the server for a new child; returns (status_r, data_w).

        The child's pickled data is written to data_w; status_r yields the child's pid, then
        its exit code, and turns readable-at-EOF if the server dies."""
        self.ensure_running()
        if len(fds) + 3 >= MAXFDS_TO_SEND:
            raise ValueError('too many fds')
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as client:
            client.connect(self._forkserver_address)
            parent_r, child_w = os.pipe2(os.O_CLOEXEC)
            child_r, parent_w = os.pipe2(os.O_CLOEXEC)
            # The child gets the shared-memory watcher's pipe of *this* process (the server
            # may have been started before the watcher was).
            allfds = [child_r, child_w, resource_tracker.getfd()] + list(fds)
            try:
                reduction.sendfds(client, allfds)
                return parent_r, parent_w
            except:
                os.close(parent_r)
                os.close(parent_w)
                raise
            finally:
                os.close(child_r)
                os.close(child_w)

    def ensure_running(self):
        """Start the server unless it runs already (restarted if it died)."""
        with self._lock:
            if self._forkserver_pid is not None:
                try:
                    pid, status = os.waitpid(self._forkserver_pid, os.WNOHANG)
                except ChildProcessError:
                    # State inherited through a bare os.fork(): the server is the parent's
                    # child and goes on serving it; this process starts its own.
                    pid = -1
                if not pid:
                    return
                os.close(self._forkserver_alive_fd)
                self._forkserver_address = None
                self._forkserver_alive_fd = None
                self._forkserver_pid = None

            cmd = ('import sys; sys.path.insert(0, %r); from cpool.forkserver import main; '
                   'main(%d, %d, %r, **%r)')
            if self._preload_modules:
                prep = spawn.get_preparation_data('ignore')
                data = {'sys_path': prep['sys_path']}
                if self._preload_main and 'init_main_from_path' in prep:
                    # The script's top level may read its arguments: it gets the parent's.
                    data['main_path'] = prep['init_main_from_path']
                    data['sys_argv'] = prep['sys_argv']
                if self._preload_on_error != 'ignore':
                    data['on_error'] = self._preload_on_error
            else:
                data = {}
            tempdir = util.get_temp_dir()
            if process.current_process()._config.get('tempdir_owner') == os.getpid():
                data['remove_dir'] = True  # ours to remove if we are killed; a forked child's not

            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as listener:
                address = os.path.join(tempdir, 'fs-%d-%s' % (os.getpid(),
                                                                          os.urandom(6).hex()))
                listener.bind(address)
                os.chmod(address, 0o600)
                listener.listen()
                # The server exits when alive_w closes, i.e. when this process (and every
                # process that inherited alive_w) has exited.
                alive_r, alive_w = os.pipe2(os.O_CLOEXEC)
                try:
                    fds_to_pass = [listener.fileno(), alive_r]
                    cmd %= (spawn._CPOOL_PARENT_DIR, listener.fileno(), alive_r,
                            self._preload_modules, data)
                    exe = spawn.get_executable()
                    import subprocess
                    args = [exe] + subprocess._args_from_interpreter_flags() + ['-c', cmd]
                    pid = util.spawnv_passfds(exe, args, fds_to_pass)
                except:
                    os.close(alive_w)
                    raise
                finally:
                    os.close(alive_r)
                self._forkserver_address = address
                self._forkserver_alive_fd = alive_w
                self._forkserver_pid = pid


def _preload(preload, main_path, sys_path, sys_argv, on_error):
    # The main script may raise anything (it is run, not just imported); a module, ImportError.
    if sys_path is not None:
        sys.path[:] = sys_path
    if '__main__' in preload and main_path is not None:
        if sys_argv is not None:
            sys.argv[:] = sys_argv  # the script's top level may read its arguments
        process.current_process()._inheriting = True
        try:
            spawn.import_main_path(main_path)
        except Exception as e:
            _preload_failed(on_error, '__main__ from %r' % main_path, e)
        finally:
            del process.current_process()._inheriting
    for modname in preload:
        if modname == '__main__':
            continue
        try:
            __import__(modname)
        except ImportError as e:
            _preload_failed(on_error, 'module %r' % modname, e)


def _preload_failed(on_error, what, exc):
    if on_error == 'fail':
        raise exc
    if on_error == 'warn':
        import warnings
        warnings.warn('Failed to preload %s: %s' % (what, exc), ImportWarning, stacklevel=3)


def main(listener_fd, alive_r, preload, main_path=None, sys_path=None, sys_argv=None,
         on_error='ignore', remove_dir=False):
    """The server's loop: fork a child per request, report each child's exit code."""
    if preload:
        _preload(preload, main_path, sys_path, sys_argv, on_error)

    util._close_stdin()
    sig_r, sig_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)

    def sigchld_handler(*_unused):
        pass  # the wake-up fd does the work

    handlers = {
        signal.SIGCHLD: sigchld_handler,
        # Ctrl-C goes to the whole process group: the user's program decides, not the server.
        signal.SIGINT: signal.SIG_IGN,
    }
    old_handlers = {sig: signal.signal(sig, val) for (sig, val) in handlers.items()}
    signal.set_wakeup_fd(sig_w)
    pid_to_fd = {}

    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, fileno=listener_fd) as listener, \
            selectors.DefaultSelector() as selector:
        _forkserver._forkserver_address = listener.getsockname()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(alive_r, selectors.EVENT_READ)
        selector.register(sig_r, selectors.EVENT_READ)
        while True:
            try:
                while True:
                    rfds = [key.fileobj for (key, events) in selector.select()]
                    if rfds:
                        break
                if alive_r in rfds:
                    # EOF: the process that started us is gone. Killed, it could not remove
                    # our socket and its temp directory: do it here, so nothing is left.
                    _remove_socket(listener.getsockname(), remove_dir)
                    raise SystemExit
                if sig_r in rfds:
                    os.read(sig_r, 65536)
                    while True:
                        try:
                            pid, sts = os.waitpid(-1, os.WNOHANG)
                        except ChildProcessError:
                            break
                        if pid == 0:
                            break
                        child_w = pid_to_fd.pop(pid, None)
                        if child_w is not None:
                            returncode = os.waitstatus_to_exitcode(sts)
                            try:
                                write_signed(child_w, returncode)
                            except BrokenPipeError:
                                pass  # the parent is gone
                            os.close(child_w)
                if listener in rfds:
                    with listener.accept()[0] as s:
                        fds = reduction.recvfds(s, MAXFDS_TO_SEND + 1)
                        if len(fds) > MAXFDS_TO_SEND:
                            raise RuntimeError('Too many ({0:n}) fds to send'.format(len(fds)))
                        child_r, child_w, tracker_fd, *fds = fds
                        s.close()
                        pid = _core.fork()
                        if pid == 0:
                            code = 1
                            try:
                                listener.close()
                                selector.close()
                                unused_fds = [alive_r, child_w, sig_r, sig_w]
                                unused_fds.extend(pid_to_fd.values())
                                if process._EXIT_FUNCTION_FROM_ATEXIT:
                                    # 3.13+: the child's atexit callbacks are its own.
                                    atexit._clear()
                                    atexit.register(util._exit_function)
                                code = _serve_one(child_r, tracker_fd, fds, unused_fds,
                                                  old_handlers)
                            except Exception:
                                sys.excepthook(*sys.exc_info())
                                sys.stderr.flush()
                            finally:
                                if process._EXIT_FUNCTION_FROM_ATEXIT:
                                    atexit._run_exitfuncs()
                                    util._flush_std_streams()
                                os._exit(code)
                        else:
                            try:
                                write_signed(child_w, pid)
                            except BrokenPipeError:
                                pass
                            pid_to_fd[pid] = child_w
                            os.close(child_r)
                            os.close(tracker_fd)
                            for fd in fds:
                                os.close(fd)
            except OSError as e:
                if e.errno != errno.ECONNABORTED:
                    raise


def _remove_socket(address, remove_dir):
    """Unlink the server's socket file and, when the server's parent created it, its directory
    if nothing else is left in it (the parent's private temp dir: whatever else it holds is not
    ours; a forked child's server leaves it to the process that made it, which still uses it)."""
    if not address or util.is_abstract_socket_namespace(address):
        return
    try:
        os.unlink(address)
        if remove_dir:
            os.rmdir(os.path.dirname(address))
    except OSError:
        pass  # already removed by the parent's exit, or the directory still holds its files


def _serve_one(child_r, tracker_fd, fds, unused_fds, handlers):
    # In a fresh child of the server: back to default signal handling, then run as spawn does.
    signal.set_wakeup_fd(-1)
    for sig, val in handlers.items():
        signal.signal(sig, val)
    for fd in unused_fds:
        os.close(fd)
    _forkserver._inherited_fds = fds
    resource_tracker._resource_tracker._adopt(tracker_fd)
    _forkserver._forkserver_pid = None
    _forkserver._forkserver_alive_fd = None
    process._parent_is_ppid = False
    return spawn._main(child_r, None)


def read_signed(fd):
    data = b''
    length = SIGNED_STRUCT.size
    while len(data) < length:
        s = os.read(fd, length - len(data))
        if not s:
            raise EOFError('unexpected EOF')
        data += s
    return SIGNED_STRUCT.unpack(data)[0]


def write_signed(fd, n):
    msg = SIGNED_STRUCT.pack(n)
    while msg:
        nbytes = os.write(fd, msg)
        if nbytes == 0:
            raise RuntimeError('should not get here')
        msg = msg[nbytes:]


_forkserver = ForkServer()
ensure_running = _forkserver.ensure_running
get_inherited_fds = _forkserver.get_inherited_fds
connect_to_new_process = _forkserver.connect_to_new_process
set_forkserver_preload = _forkserver.set_forkserver_preload
