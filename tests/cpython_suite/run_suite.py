#!/usr/bin/env python3
"""Runs CPython's own multiprocessing test suite (test._test_multiprocessing) against cpool.

Every Python process of a run imports `multiprocessing` as cpool (alias/sitecustomize.py, first on
PYTHONPATH, active when CPOOL_SUITE_TARGET=cpool); --target stdlib runs the same tests on the
standard library, the baseline that tells a cpool difference from a test that fails here anyway.

Each test class runs in its own worker interpreter (a subprocess in its own session, with a temp
dir as cwd). The worker streams one JSON line per event, and a faulthandler watchdog, re-armed at
every test start and end, dumps the stack and exits when one test (or a class fixture) outlives
--timeout. The parent then records that test as `timeout` (or `crash` if the worker died another
way), kills what is left of the worker's session and starts a new worker for the class's remaining
tests, so one hang costs one test, not the run.

    python tests/cpython_suite/run_suite.py -m fork -k 'WithProcessesTestLock*'
    python tests/cpython_suite/run_suite.py -m fork,spawn --json out.json          # every class
    python tests/cpython_suite/run_suite.py --expected tests/cpython_suite/expected_pass.txt

Exit status: 0, or 1 when --expected is given and an expected-pass test did not pass.
"""
import argparse
import concurrent.futures
import fnmatch
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))
ALIAS_DIR = os.path.join(HERE, 'alias')
DEFAULT_REPO = os.path.dirname(os.path.dirname(HERE))
TEST_MODULE = 'cpsuite_tests'      # alias/cpsuite_tests.py: the generated test classes
# The classes the CI guard covers (--curated): the Process, Connection, Lock..Barrier,
# Value/Array, shared_memory, Queue, Pool and Manager tests, in their processes/threads/manager flavours.
CURATED = [
    'With*TestProcess', 'With*TestSubclassingProcess', 'With*TestQueue', 'TestSimpleQueue',
    'With*TestLock', 'With*TestSemaphore', 'With*TestCondition', 'With*TestEvent',
    'With*TestBarrier', 'With*TestValue', 'With*TestArray', 'With*TestSharedCTypes',
    'With*TestSharedMemory',
    'With*TestConnection', 'With*TestListener', 'With*TestListenerClient', 'With*TestPoll',
    'TestWait', 'With*TestPool', 'With*TestPoolWorkerErrors', 'With*TestPoolWorkerLifetime',
    'TestInitializers', 'With*TestContainers', 'With*TestMyManager', 'With*TestRemoteManager',
    'With*TestManagerRestart', 'TestSyncManagerTypes',
]
BAD = ('fail', 'error', 'timeout', 'crash', 'notrun', 'upass')
ORDER = ('pass', 'skip', 'xfail') + BAD


# ---------------------------------------------------------------------------------------- worker

class _StreamingResult(unittest.TestResult):
    """Writes each test's start and outcome as a JSON line the moment it happens (a worker killed
    by the watchdog has already told the parent everything before the hang)."""

    def __init__(self, out, timeout):
        super().__init__()
        self.out = out
        self.timeout = timeout
        self.reported = set()
        self.fixture_errors = []
        self.subtest_failures = {}

    def emit(self, **event):
        self.out.write(json.dumps(event) + '\n')
        self.out.flush()

    def _arm(self):
        import faulthandler
        faulthandler.dump_traceback_later(self.timeout, exit=True, file=self.trace_file)

    def startTest(self, test):
        super().startTest(test)
        self._arm()
        self.started = time.monotonic()
        self.emit(event='start', id=_short_id(test))

    def stopTest(self, test):
        super().stopTest(test)
        tid = _short_id(test)
        if tid in self.subtest_failures and tid not in self.reported:
            status, detail = self.subtest_failures[tid]
            self._result(test, status, detail)
        self._arm()     # covers tearDownClass and the next setUpClass too

    def _result(self, test, status, detail=''):
        tid = _short_id(test)
        if tid in self.reported:
            return
        self.reported.add(tid)
        self.emit(event='result', id=tid, status=status, detail=detail,
                  seconds=round(time.monotonic() - self.started, 3))

    def _is_fixture(self, test):
        return not isinstance(test, unittest.TestCase)

    def addSuccess(self, test):
        tid = _short_id(test)
        if tid not in self.subtest_failures:
            self._result(test, 'pass')

    def addFailure(self, test, err):
        self._result(test, 'fail', self._exc_info_to_string(err, test))

    def addError(self, test, err):
        detail = self._exc_info_to_string(err, test)
        if self._is_fixture(test):      # setUpModule/setUpClass/tearDownClass (_ErrorHolder)
            self.fixture_errors.append((test.description, detail))
            self.emit(event='fixture_error', id=test.description, detail=detail)
        else:
            self._result(test, 'error', detail)

    def addSkip(self, test, reason):
        if self._is_fixture(test):
            self.fixture_errors.append((test.description, 'skipped: ' + reason))
            return
        self._result(test, 'skip', reason)

    def addExpectedFailure(self, test, err):
        self._result(test, 'xfail', self._exc_info_to_string(err, test))

    def addUnexpectedSuccess(self, test):
        self._result(test, 'upass', 'unexpected success')

    def addSubTest(self, test, subtest, err):
        if err is not None:
            status = 'fail' if issubclass(err[0], test.failureException) else 'error'
            tid = _short_id(test)
            prev = self.subtest_failures.get(tid)
            detail = '%s\n%s' % (subtest.id(), self._exc_info_to_string(err, test))
            if prev is None:
                self.subtest_failures[tid] = (status, detail)
            else:
                self.subtest_failures[tid] = (prev[0], prev[1] + '\n' + detail)


def _short_id(test):
    """'Class.test_name' (the module is always the same)."""
    parts = test.id().split('.')
    return '.'.join(parts[-2:])


def worker_main(args):
    """Runs the given tests of one start method in this interpreter; events go to args.events."""
    # A runner started in the background (`cmd &` in a script) hands its workers SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler: the tests that Ctrl-C a blocking
    # wait would wait out their timeout instead. Give the worker a normal interpreter's setup.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.getsignal(signal.SIGQUIT) is signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    out = open(args.events, 'a', buffering=1)
    result = _StreamingResult(out, args.timeout)
    result.trace_file = open(args.trace, 'w')
    result._arm()           # importing the suite and setUpModule are watched too
    try:
        import importlib
        mod = importlib.import_module(TEST_MODULE)
    except BaseException:
        result.emit(event='import_error', detail=traceback.format_exc())
        return 2
    mp = sys.modules.get('multiprocessing')
    result.emit(event='info', target=getattr(mp, '__name__', None),
                filled_in=getattr(mod, 'FILLED_IN', []), python=sys.version.split()[0])
    if args.list:
        loader = unittest.defaultTestLoader
        for name in sorted(dir(mod)):
            obj = getattr(mod, name)
            if isinstance(obj, type) and issubclass(obj, unittest.TestCase):
                for test_name in loader.getTestCaseNames(obj):
                    result.emit(event='test', id='%s.%s' % (name, test_name))
        return 0
    names = ['%s.%s' % (TEST_MODULE, t) for t in args.tests]
    suite = unittest.defaultTestLoader.loadTestsFromNames(names)
    suite.run(result)
    import faulthandler
    faulthandler.cancel_dump_traceback_later()
    if os.environ.get('CPOOL_SUITE_TARGET') == 'cpool':
        # Nothing may have slipped past the alias to the standard library's package.
        stdlib_mp = os.path.join(os.path.dirname(os.__file__), 'multiprocessing')
        leaked = sorted(name for name, m in list(sys.modules.items())
                        if (getattr(m, '__file__', None) or '').startswith(stdlib_mp))
        if leaked:
            result.emit(event='fixture_error', id='stdlib multiprocessing imported',
                        detail='the run imported %s' % ', '.join(leaked))
    for tid in args.tests:
        if tid not in result.reported:
            why = '\n'.join('%s: %s' % fe for fe in result.fixture_errors) or 'not run'
            skipped = result.fixture_errors and all(
                d.startswith('skipped: ') for _, d in result.fixture_errors)
            result.emit(event='result', id=tid, status='skip' if skipped else 'notrun',
                        detail=why, seconds=0)
    return 0


# ---------------------------------------------------------------------------------------- parent

def _worker_env(args, start_method):
    env = dict(os.environ)
    path = [ALIAS_DIR, os.path.abspath(args.repo)]
    if env.get('PYTHONPATH'):
        path.append(env['PYTHONPATH'])
    env['PYTHONPATH'] = os.pathsep.join(path)
    env['CPOOL_SUITE_TARGET'] = args.target
    env['CPOOL_SUITE_START_METHOD'] = start_method
    env['PYTHONFAULTHANDLER'] = '1'
    return env


def _run_worker(args, start_method, tests, listing=False):
    """One worker interpreter; returns (events, exitcode, stack dumped by the watchdog, log)."""
    workdir = tempfile.mkdtemp(prefix='cpsuite-')
    events_path = os.path.join(workdir, 'events.jsonl')
    trace_path = os.path.join(workdir, 'hang-trace.txt')
    log_path = os.path.join(workdir, 'worker.log')
    cmd = [args.python, os.path.abspath(__file__), '--worker', '--events', events_path,
           '--trace', trace_path, '--timeout', str(args.timeout)]
    cmd += ['--list'] if listing else ['--tests'] + list(tests)
    # A last resort if even the in-process watchdog cannot act (it runs without the GIL, so this
    # only fires when the worker is stuck in a way no Python-level code controls).
    deadline = args.timeout * (len(tests) + 3) + 30
    rundir = os.path.join(workdir, 'cwd')
    os.mkdir(rundir)
    with open(log_path, 'wb') as log:
        proc = subprocess.Popen(cmd, cwd=rundir, env=_worker_env(args, start_method),
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            exitcode = proc.wait(deadline)
        except subprocess.TimeoutExpired:
            exitcode = 'killed by the runner after %ss' % deadline
        # Whatever the tests left running in the worker's session (this runner started it).
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    events = []
    if os.path.exists(events_path):
        with open(events_path) as f:
            for line in f:
                try:
                    events.append(json.loads(line))
                except ValueError:
                    pass        # a line cut short by the kill
    trace = _read(trace_path)
    log = _read(log_path)
    shutil.rmtree(workdir, ignore_errors=True)
    return events, exitcode, trace, log


def _read(path):
    try:
        with open(path, errors='replace') as f:
            return f.read()
    except OSError:
        return ''


def list_tests(args, start_method):
    events, exitcode, trace, log = _run_worker(args, start_method, [], listing=True)
    tests = [e['id'] for e in events if e['event'] == 'test']
    if not tests:
        err = [e['detail'] for e in events if e['event'] == 'import_error']
        raise SystemExit('cannot list the suite for %s (exit %s):\n%s' %
                         (start_method, exitcode, (err[0] if err else log)[-4000:]))
    info = [e for e in events if e['event'] == 'info']
    return tests, (info[0] if info else {})


_NOISE = ('Traceback (most recent call last)', 'Exception ignored', 'Warning:')


def run_class(args, start_method, tests):
    """Runs the tests of one class, restarting the worker after each hang or crash."""
    results = {}
    notes = []
    remaining = list(tests)
    while remaining:
        events, exitcode, trace, log = _run_worker(args, start_method, remaining)
        if any(m in log for m in _NOISE):
            # The tests passed or not, the output shows what users would see: a traceback
            # printed by a background thread or a child is worth a look.
            notes.append('worker output has tracebacks/warnings:\n' + log[-4000:])
        started = None
        for e in events:
            if e['event'] == 'start':
                started = e['id']
            elif e['event'] == 'result':
                results[e['id']] = e
                if e['id'] == started:
                    started = None
            elif e['event'] == 'import_error':
                for t in remaining:
                    results[t] = dict(id=t, status='error', seconds=0,
                                      detail='suite import failed:\n' + e['detail'])
            elif e['event'] == 'fixture_error' and not e['id'].startswith('setUp'):
                notes.append('%s: %s' % (e['id'], e['detail']))
        done = [t for t in remaining if t in results]
        if started is not None and started not in results:
            status = 'timeout' if trace.strip() else 'crash'
            detail = ('no result within %ss; stack at the deadline:\n%s' % (args.timeout, trace)
                      if status == 'timeout' else
                      'worker exited (%s) during the test; its output ends with:\n%s'
                      % (exitcode, log[-3000:]))
            results[started] = dict(id=started, status=status, detail=detail,
                                    seconds=args.timeout)
            done.append(started)
        elif exitcode != 0 and trace.strip():
            notes.append('worker stopped by the watchdog outside a test (class fixture or '
                         'module teardown hang after %s):\n%s' % (done[-1:] or '-', trace[:3000]))
        if not done:        # no progress (the worker died before its first test)
            for t in remaining:
                results[t] = dict(id=t, status='crash', seconds=0,
                                  detail='worker exited (%s) before running a test:\n%s'
                                  % (exitcode, (trace or log)[-3000:]))
            break
        remaining = [t for t in remaining if t not in results]
    return results, notes


def run_jobs(args, jobs, all_results, class_notes):
    """Runs (method, class, tests) jobs, args.jobs at a time, into all_results/class_notes."""
    jobs = sorted(jobs, key=lambda j: -len(j[2]))     # longest first: a short tail
    with concurrent.futures.ThreadPoolExecutor(max(1, args.jobs)) as ex:
        futs = {ex.submit(run_class, args, m, ts): (m, cls) for m, cls, ts in jobs}
        for fut in concurrent.futures.as_completed(futs):
            method, cls = futs[fut]
            results, notes = fut.result()
            if notes:
                class_notes['%s %s' % (method, cls)] = notes
            for tid, r in sorted(results.items()):
                all_results[(method, tid)] = r
                if args.verbose or r['status'] in BAD:
                    print('%-7s %-8s %s  %s' % (r['status'], method, tid,
                                                first_error_line(r.get('detail', ''))
                                                if r['status'] in BAD else ''), flush=True)


def _select(tests, patterns, excludes):
    def match(t, pats):
        return any(fnmatch.fnmatchcase(t, p) or fnmatch.fnmatchcase(t.split('.')[0], p)
                   for p in pats)
    out = [t for t in tests if not patterns or match(t, patterns)]
    return [t for t in out if not match(t, excludes)]


def read_expected(path):
    """{start_method: [test ids]} from lines 'METHOD Class.test' ('#' starts a comment)."""
    expected = {}
    with open(path) as f:
        for line in f:
            line = line.split('#', 1)[0].strip()
            if line:
                method, tid = line.split()
                expected.setdefault(method, []).append(tid)
    return expected


def first_error_line(detail):
    """The exception line of a traceback (what the report groups by); for a hang, the innermost
    frames of the main thread at the deadline."""
    lines = [ln for ln in (detail or '').strip().splitlines() if ln.strip()]
    if lines and lines[0].startswith('no result within'):
        # faulthandler's watchdog lists every thread, the main thread last; innermost frame first.
        heads = [i for i, ln in enumerate(lines)
                 if ln.startswith(('Thread 0x', 'Current thread 0x'))]
        if heads:
            frames = [f.strip().replace('File ', '') for f in lines[heads[-1] + 1:heads[-1] + 4]
                      if f.startswith('  File')]
            return 'hang in ' + ' <- '.join(frames)[:400]
        return lines[0]
    for ln in reversed(lines):
        if not ln.startswith(' ') and not ln.startswith('Traceback'):
            return ln.strip()[:300]
    return lines[-1].strip()[:300] if lines else ''


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('-m', '--start-methods', default='fork',
                   help='comma-separated start methods (default fork)')
    p.add_argument('-k', '--select', action='append', default=[],
                   help='fnmatch pattern on Class or Class.test (repeatable)')
    p.add_argument('--curated', action='store_true',
                   help='select the classes the CI guard covers (CURATED)')
    p.add_argument('-x', '--exclude', action='append', default=[],
                   help='fnmatch pattern of tests to leave out (repeatable)')
    p.add_argument('--expected', help='run only these tests; exit 1 if one does not pass')
    p.add_argument('--timeout', type=float, default=60.0, help='seconds per test (default 60)')
    p.add_argument('-j', '--jobs', type=int, default=2, help='workers at once (default 2)')
    p.add_argument('--retries', type=int, default=None,
                   help='re-run tests that did not pass this many times (default: 1 with '
                        '--expected, else 0)')
    p.add_argument('--target', choices=['cpool', 'stdlib'], default='cpool')
    p.add_argument('--repo', default=DEFAULT_REPO, help='directory holding the cpool package')
    p.add_argument('--python', default=sys.executable)
    p.add_argument('--json', help='write every result (with full tracebacks) here')
    p.add_argument('--write-expected', metavar='PATH',
                   help='write the tests that passed as an expectation list')
    p.add_argument('-v', '--verbose', action='store_true', help='print each test as it ends')
    p.add_argument('--worker', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--list', action='store_true', help=argparse.SUPPRESS)
    p.add_argument('--events', help=argparse.SUPPRESS)
    p.add_argument('--trace', help=argparse.SUPPRESS)
    p.add_argument('--tests', nargs='*', default=[], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args)

    if args.curated:
        args.select = args.select + CURATED
    expected = read_expected(args.expected) if args.expected else None
    if args.retries is None:
        args.retries = 1 if expected else 0
    methods = list(expected) if expected else args.start_methods.split(',')
    t0 = time.monotonic()
    jobs = []
    infos = {}
    for method in methods:
        tests, infos[method] = list_tests(args, method)
        chosen = expected[method] if expected else _select(tests, args.select, args.exclude)
        unknown = sorted(set(chosen) - set(tests))
        if unknown:
            print('not in the suite for %s: %s' % (method, ', '.join(unknown)))
        by_class = {}
        for t in chosen:
            if t in tests:
                by_class.setdefault(t.split('.')[0], []).append(t)
        jobs += [(method, cls, ts) for cls, ts in by_class.items()]
    for method, info in infos.items():
        print('%s: target %s, Python %s' % (method, info.get('target'), info.get('python')))
        for gap in info.get('filled_in', []):
            print('  import-time gap filled in: %s' % gap)

    all_results = {}
    class_notes = {}
    run_jobs(args, jobs, all_results, class_notes)
    flaky = []
    if args.retries:
        # The machine is shared and some of the suite's tests are timing-sensitive: a test that
        # fails once and passes on a fresh run is reported as flaky, not as a regression.
        for _ in range(args.retries):
            again = {}
            for (m, t), r in sorted(all_results.items()):
                if r['status'] in BAD:
                    again.setdefault((m, t.split('.')[0]), []).append(t)
            if not again:
                break
            print('retrying %d test(s) that did not pass' % sum(map(len, again.values())))
            before = dict(all_results)
            run_jobs(args, [(m, c, ts) for (m, c), ts in again.items()], all_results,
                     class_notes)
            for key, r in all_results.items():
                if before[key]['status'] in BAD and r['status'] not in BAD:
                    flaky.append((key, before[key]))

    counts = {}
    for (method, tid), r in all_results.items():
        counts.setdefault(method, dict.fromkeys(ORDER, 0))[r['status']] += 1
    print('\n== summary (%.0fs, timeout %ss per test, target %s)' %
          (time.monotonic() - t0, args.timeout, args.target))
    for method, c in counts.items():
        print('%-10s %s' % (method, '  '.join('%s %d' % (k, v) for k, v in c.items() if v)))
    for (m, t), first in flaky:
        print('flaky %s %s: %s the first time (%s), then passed' %
              (m, t, first['status'], first_error_line(first.get('detail', ''))))
    for where, notes in sorted(class_notes.items()):
        for n in notes:
            print('note %s: %s' % (where, first_error_line(n.split('\n', 1)[0]) or n[:200]))
    if args.json:
        with open(args.json, 'w') as f:
            json.dump({'target': args.target, 'timeout': args.timeout, 'infos': infos,
                       'notes': class_notes,
                       'flaky': [dict(r, start_method=m) for (m, _), r in flaky],
                       'results': [dict(r, start_method=m) for (m, _), r in
                                   sorted(all_results.items())]}, f, indent=1)
    if args.write_expected:
        with open(args.write_expected, 'w') as f:
            f.write('# Tests of CPython %s test._test_multiprocessing that pass on cpool\n'
                    '# (run_suite.py --write-expected, then curated by hand). One per line:\n'
                    '# START_METHOD Class.test\n' % '.'.join(map(str, sys.version_info[:2])))
            for (m, t), r in sorted(all_results.items()):
                if r['status'] == 'pass':
                    f.write('%s %s\n' % (m, t))
    if expected is not None:
        regressions = [(m, t, r['status']) for (m, t), r in sorted(all_results.items())
                       if r['status'] not in ('pass', 'skip', 'xfail')]
        skipped = [(m, t) for (m, t), r in sorted(all_results.items()) if r['status'] == 'skip']
        for m, t in skipped:
            print('warning: expected to pass but skipped here: %s %s' % (m, t))
        if regressions:
            print('\n%d expected-pass test(s) did not pass:' % len(regressions))
            for m, t, s in regressions:
                print('  %s %s %s' % (s, m, t))
            return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
