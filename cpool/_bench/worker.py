"""The child that runs cases for one module: `python -m cpool._bench.worker SPEC RESULT_FD WORKERS DATA_DIR`.

SPEC is a multiprocessing-compatible module (`cpool`, `multiprocessing`, `cpool:spawn` for a
context) or a library from `others.LIBRARIES`. The parent writes one JSON request per line on
stdin ({"case": name, "n": n}); the worker answers one JSON line per request on RESULT_FD. Running
each module in its own interpreter keeps the comparison fair (nothing of one module is loaded in
the other's process) and lets the parent kill a hanging or crashed case without losing the run.
"""
import importlib
import json
import os
import sys
import traceback

SUBMODULES = ('connection', 'queues', 'synchronize', 'sharedctypes', 'pool', 'managers',
              'shared_memory')


def load(spec):
    """The object the cases use as `mp`, and the case names it runs (None: all)."""
    from .others import LIBRARIES
    name, _, method = spec.partition(':')
    if name in LIBRARIES:
        factory, cases = LIBRARIES[name]
        return factory(), set(cases)
    mod = importlib.import_module(name)
    # import what the cases will need now, so no case pays for a first import; a part that is
    # missing or broken fails only the cases that use it, with the error they meet
    for sub in SUBMODULES:
        try:
            importlib.import_module('%s.%s' % (name, sub))
        except Exception:
            pass
    return (mod.get_context(method) if method else mod), None


def classify(exc):
    """'n/a' for a part the module does not have (yet), 'failed' for anything else."""
    if isinstance(exc, (ImportError, NotImplementedError)):
        return 'n/a'
    return 'failed'


def serve(spec, out, cfg):
    from .cases import CASES
    try:
        mp, supported = load(spec)
    except BaseException as exc:
        mp, load_error = None, exc
    else:
        load_error = None
    for line in sys.stdin:
        req = json.loads(line)
        name = req['case']
        if load_error is not None:
            reply = {'status': classify(load_error), 'error': _describe(load_error)}
        elif supported is not None and name not in supported:
            reply = {'status': 'unsupported'}
        else:
            try:
                units, seconds = CASES[name].fn(mp, req['n'], cfg)
                reply = {'status': 'ok', 'units': units, 'seconds': seconds}
            except Exception as exc:
                traceback.print_exc()
                reply = {'status': classify(exc), 'error': _describe(exc)}
        out.write(json.dumps(reply) + '\n')
        out.flush()


def _describe(exc):
    text = '%s: %s' % (type(exc).__name__, exc)
    return text if len(text) < 300 else text[:297] + '...'


def main():
    spec, fd, workers, data = sys.argv[1:5]
    os.set_inheritable(int(fd), False)  # exec-started children (spawn, forkserver) must not hold it
    out = os.fdopen(int(fd), 'w')
    serve(spec, out, {'workers': int(workers), 'data': data})


if __name__ == '__main__':
    main()
