"""cpool: the standard library's multiprocessing API over a C core.

`import cpool as multiprocessing` runs existing programs unchanged; queues, locks and pools move
data through shared memory and futexes, and no blocking call waits for ever on a dead peer.
"""
import sys

from . import context

__version__ = '0.1.0'

# Every public name of the default context (Process, Pool, Queue, Lock, get_context, ...)
# becomes a module-level name, as in the standard library.
__all__ = [x for x in dir(context._default_context) if not x.startswith('_')]
globals().update((name, getattr(context._default_context, name)) for name in __all__)

SUBDEBUG = 5
SUBWARNING = 25

if '__main__' in sys.modules:
    sys.modules['__mp_main__'] = sys.modules['__main__']
