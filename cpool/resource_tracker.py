"""The standard library's resource_tracker names, over cpool's tracker-less cleanup.

cpool runs no tracker server: a tracked shared-memory segment is unlinked by a small watcher
process that outlives every process of the program (see cpool.shared_memory). register() and
unregister() add a name to / take it from that watcher's list, so code written for the standard
library (``resource_tracker.unregister(shm._name, "shared_memory")``) runs unchanged and is
honoured. Other resource types ("semaphore", "folder", ...) are accepted and need no cleanup in
cpool: its semaphores live in memfd arenas that vanish with their last user.
"""
import os
import sys
import threading

_WATCHER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_shm_watcher.py")

__all__ = ["ensure_running", "register", "unregister", "getfd", "ResourceTracker", "main"]


class ResourceTracker:
    """One per program: the write end of the pipe into the watcher, started on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._fd = None
        self._pid = None
        self._owner = None

    def getfd(self):
        self.ensure_running()
        return self._fd

    def ensure_running(self):
        """Start the watcher unless this process has its pipe (started it, was forked from a
        process that had it, or was handed it as a spawn/forkserver child)."""
        with self._lock:
            if self._fd is not None:
                return
            rfd, wfd = os.pipe2(os.O_CLOEXEC)
            try:
                # Run as a script, -S -I: the watcher imports nothing of cpool or site-packages
                # until it has something to unlink, so it starts in a fraction of the time. Its
                # own session: Ctrl-C to the program's group cannot reach it before it ignores
                # SIGINT. posix_spawn, not Popen: no Popen object left to warn "still running"
                # at exit (the watcher outlives this process by design).
                # The read end keeps its number (dup2 onto 0 would keep close-on-exec if it
                # were 0 already); another holder of a read end does not delay the EOF.
                os.set_inheritable(rfd, True)
                pid = os.posix_spawn(
                    sys.executable,
                    [sys.executable, "-S", "-I", _WATCHER_SCRIPT, str(rfd)], os.environ,
                    file_actions=[(os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0)],
                    setsid=True)
            finally:
                os.close(rfd)
            self._fd, self._pid, self._owner = wfd, pid, os.getpid()

    def _adopt(self, fd):
        """In a spawn or forkserver child: use the pipe of the parent's watcher (fd, inherited
        through exec), so what this process registers outlives it until the program ends."""
        with self._lock:
            # Not passed on to programs this child execs (they are not cpool processes).
            os.set_inheritable(fd, False)
            self._fd, self._pid, self._owner = fd, None, None

    def _send(self, verb, name):
        self.ensure_running()
        msg = ("%s %s\n" % (verb, name)).encode("utf-8", "surrogateescape")
        if len(msg) > 512:
            raise ValueError("shared memory name too long")
        os.write(self._fd, msg)

    def register(self, name, rtype):
        if rtype == "shared_memory":
            self._send("R", name)

    def unregister(self, name, rtype):
        if rtype == "shared_memory":
            self._send("U", name)

    def _stop(self):
        """For tests: close our write end; the watcher cleans up once every holder has."""
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


_resource_tracker = ResourceTracker()
# A thread may hold the lock while another forks: the child gets a fresh one.
os.register_at_fork(after_in_child=lambda: setattr(_resource_tracker, '_lock', threading.Lock()))
ensure_running = _resource_tracker.ensure_running
register = _resource_tracker.register
unregister = _resource_tracker.unregister
getfd = _resource_tracker.getfd


def main(fd):
    """Run the watcher loop on fd (the stdlib's main(fd) runs its tracker server)."""
    from cpool._shm_watcher import main as watch
    watch(fd)
