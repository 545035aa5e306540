"""Starting a child with fork (done in C by _core.fork, as os.fork does it); the pidfd is its sentinel."""
import os
import signal

from . import _core
from . import util  # noqa: F401  (registers the exit-time join of children)

__all__ = ['Popen']


class Popen(object):
    method = 'fork'

    def __init__(self, process_obj):
        self.returncode = None
        self.sentinel = self._pidfd = None
        self._launch(process_obj)

    def duplicate_for_child(self, fd):
        return fd

    def _launch(self, process_obj):
        code = 1
        util._prepare_devnull_stdin()
        pid = _core.fork()
        if pid == 0:
            try:
                code = process_obj._bootstrap()
            finally:
                os._exit(code)
        self.pid = pid
        self.sentinel = self._pidfd = _core.pidfd_open(pid)

    def poll(self, flag=os.WNOHANG):
        if self.returncode is None:
            self.returncode = _core.wait_exit(self.pid, self.sentinel,
                                              0 if flag & os.WNOHANG else None)
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            self.returncode = _core.wait_exit(self.pid, self.sentinel, timeout)
        return self.returncode

    def _send_signal(self, sig):
        if self.returncode is None and self._pidfd is not None:
            try:
                # Through the pidfd: never signals an unrelated process that reused the pid.
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass
            except OSError:
                if self.wait(timeout=0.1) is None:
                    raise

    def terminate(self):
        self._send_signal(signal.SIGTERM)

    def kill(self):
        self._send_signal(signal.SIGKILL)

    def interrupt(self):
        self._send_signal(signal.SIGINT)

    def close(self):
        if self.sentinel is not None:
            os.close(self.sentinel)
            if self._pidfd == self.sentinel:
                self._pidfd = None
            self.sentinel = None

    def __del__(self):
        if getattr(self, 'sentinel', None) is not None:
            try:
                os.close(self.sentinel)
            except OSError:
                pass
