"""Starting a child with fork: _core.ForkPopen forks in C as os.fork does it and runs the child's
bootstrap in C too; the pidfd is the sentinel and carries the signals."""
import threading

from . import _core
from . import process
from . import util  # also registers the exit-time join of children

__all__ = ['Popen']

# What the C bootstrap of a forked child reads and calls (fork_setup in src/process.c).
_core.fork_setup(vars(process), vars(util), util._afterfork_registry.data, vars(threading))


class Popen(_core.ForkPopen):
    """pid, sentinel, returncode; poll(flag), wait(timeout), terminate(), kill(), close().

    The spawn and forkserver Popens subclass it and replace _launch (and the forkserver's
    poll/wait/close, whose child is the server's)."""
    __slots__ = ()
    method = 'fork'
