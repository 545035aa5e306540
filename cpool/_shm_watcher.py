"""The watcher that unlinks a program's tracked shared-memory segments once the whole program ends.

It reads lines "R name" / "U name" from a pipe (the fd named on its command line) whose write
end every process of the program holds (inherited over fork, passed by fd to spawn and
forkserver children); EOF arrives only when the last of them has exited, however it exited
(SIGKILL included), and then every name still registered is unlinked, silently.
"""
import os
import signal
import sys


def main(fd=0):
    # Ctrl-C and SIGTERM to the program's group must not take the cleanup away.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    names = set()
    pending = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except InterruptedError:
            continue
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            verb, _, name = line.decode("utf-8", "surrogateescape").partition(" ")
            if verb == "R":
                names.add(name)
            elif verb == "U":
                names.discard(name)
    if not names:
        return
    # Run as a script (python -S -I .../cpool/_shm_watcher.py): cpool is found beside us.
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if package_parent not in sys.path:
        sys.path.insert(0, package_parent)
    from cpool import _core
    for name in names:
        try:
            _core.shm_unlink(name)
        except OSError:
            pass


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
    sys.exit(0)
