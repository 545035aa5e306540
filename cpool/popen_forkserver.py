"""Starting a child through the forkserver: the child is the server's, so its exit code comes
back over a status pipe, which is also the sentinel."""
import os
import select

from . import _core, forkserver, popen_fork, spawn

from .context import set_spawning_popen  # noqa: E402,F401  (a name the stdlib module has)

__all__ = ['Popen']


class _DupFd(object):
    def __init__(self, ind):
        self.ind = ind

    def detach(self):
        return forkserver.get_inherited_fds()[self.ind]


class Popen(popen_fork.Popen):
    method = 'forkserver'
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return len(self._fds) - 1

    def _launch(self, process_obj):
        data = spawn.dump_for_child(self, process_obj)
        try:
            self.sentinel, w = forkserver.connect_to_new_process(self._fds)
            with open(w, 'wb', closefd=True) as f:
                f.write(data)
            self.pid = forkserver.read_signed(self.sentinel)
        except (EOFError, ConnectionError) as e:
            # Seen when the server exited at start, e.g. on_error='fail' and a preload failed.
            e.add_note('Forkserver process may have crashed; its stderr says why '
                       '(see set_forkserver_preload(on_error=...))')
            raise
        try:
            # Signals go through a pidfd (this child is the server's, not ours).
            self._pidfd = _core.pidfd_open(self.pid)
        except ProcessLookupError:
            self._pidfd = None

    def _wait_ready(self, timeout):
        p = select.poll()
        p.register(self.sentinel, select.POLLIN)
        # poll() is retried after signals by Python (PEP 475), running handlers: Ctrl-C raises.
        return bool(p.poll(None if timeout is None else max(0, timeout) * 1000))

    def poll(self, flag=os.WNOHANG):
        return self.wait(0 if flag & os.WNOHANG else None)

    def wait(self, timeout=None):
        if self.returncode is None:
            if not self._wait_ready(timeout):
                return None
            try:
                self.returncode = forkserver.read_signed(self.sentinel)
            except (OSError, EOFError):
                # The server died before reporting: the code is unknown, but the child is gone
                # or orphaned; the standard library reports 255 here too.
                self.returncode = 255
        return self.returncode

    def close(self):
        super().close()
        if self._pidfd is not None:
            os.close(self._pidfd)
            self._pidfd = None

    def __del__(self):
        super().__del__()
        if getattr(self, '_pidfd', None) is not None:
            try:
                os.close(self._pidfd)
            except OSError:
                pass
