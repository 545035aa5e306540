"""Starting a child as a fresh interpreter (spawn): the pickled Process goes through a pipe, the
fds it needs are inherited through exec under their own numbers."""
import os

from . import _core, popen_fork, resource_tracker, spawn, util

from .context import set_spawning_popen  # noqa: E402,F401  (a name the stdlib module has)

__all__ = ['Popen']


class _DupFd(object):
    def __init__(self, fd):
        self.fd = fd

    def detach(self):
        return self.fd


class Popen(popen_fork.Popen):
    method = 'spawn'
    DupFd = _DupFd

    def __init__(self, process_obj):
        self._fds = []
        super().__init__(process_obj)

    def duplicate_for_child(self, fd):
        self._fds.append(fd)
        return fd

    def _launch(self, process_obj):
        data = spawn.dump_for_child(self, process_obj)

        # The child holds the shared-memory watcher's pipe as every process of the program
        # does, so the segments it creates live until the whole program has ended.
        tracker_fd = resource_tracker.getfd()
        self._fds.append(tracker_fd)
        child_r, parent_w = os.pipe2(os.O_CLOEXEC)
        try:
            cmd = spawn.get_command_line(tracker_fd=tracker_fd, pipe_handle=child_r)
            self._fds.append(child_r)
            self.pid = util.spawnv_passfds(spawn.get_executable(), cmd, self._fds)
            self.sentinel = self._pidfd = _core.pidfd_open(self.pid)
            os.close(child_r)
            child_r = None
            # The child reads while we write, so a large pickle cannot fill the pipe for ever;
            # if the child dies first we get BrokenPipeError instead of hanging.
            with open(parent_w, 'wb', closefd=True) as f:
                parent_w = None
                f.write(data)
        finally:
            for fd in (child_r, parent_w):
                if fd is not None:
                    os.close(fd)
