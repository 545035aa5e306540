"""`python -m cpool.bench`: cpool and the standard library's multiprocessing side by side.

Runs the micro cases (pipe, queue, lock, event, process start, pool, manager) and real
bioinformatics workloads (GC content and k-mer counts of a generated FASTA/FASTQ with Pool.imap,
per-gene statistics with apply_async, a FASTQ pipeline over Queues, per-gene statistics of a
float64 matrix read from SharedMemory or passed as slices) for every module in one run,
interleaved (A B A B ...) over the rounds, and prints the medians and the ratio of each module to
the first. faster-fifo, mpire and loky join in on the cases they have an equivalent for when they
are installed. Each module runs in its own worker interpreter; a case that fails, is missing or
hangs past its deadline is reported as such in the table, and the run goes on.
"""
import argparse
import datetime
import fnmatch
import importlib.util
import json
import os
import platform
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from cpool._bench import report
from cpool._bench.cases import CASES
from cpool._bench.others import LIBRARIES

THIRD_PARTY = ('faster_fifo', 'mpire', 'loky')
QUICK = {'rounds': 2, 'scale': 0.1, 'timeout': 30.0}
FULL = {'rounds': 3, 'scale': 1.0, 'timeout': 120.0}


class Worker:
    """One module's worker interpreter (cpool._bench.worker), restarted after a crash or timeout."""

    def __init__(self, spec, cfg, logdir):
        self.spec, self.cfg = spec, cfg
        self.log_path = os.path.join(logdir, 'worker-%s.log' % spec.replace(':', '-'))
        self.proc = None

    def _start(self):
        rfd, wfd = os.pipe()
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ)
        env['PYTHONPATH'] = os.pathsep.join(p for p in (root, env.get('PYTHONPATH')) if p)
        with open(self.log_path, 'ab') as log:
            self.proc = subprocess.Popen(
                [sys.executable, '-m', 'cpool._bench.worker', self.spec, str(wfd),
                 str(self.cfg['workers']), self.cfg['data']],
                stdin=subprocess.PIPE, stdout=log, stderr=log, pass_fds=(wfd,), env=env,
                start_new_session=True)  # its own process group: a kill takes its children too
        os.close(wfd)
        self.rfd, self.buf = rfd, b''

    def run(self, case, n, timeout):
        """The worker's reply for one case, or a 'timeout'/'failed' reply if it hangs or dies."""
        if self.proc is None:
            self._start()
        try:
            self.proc.stdin.write(json.dumps({'case': case, 'n': n}).encode() + b'\n')
            self.proc.stdin.flush()
        except BrokenPipeError:
            return self._died()
        deadline = time.monotonic() + timeout
        while b'\n' not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.kill()
                return {'status': 'timeout', 'error': 'no result within %g s (the worker was killed)' % timeout}
            if select.select([self.rfd], [], [], min(left, 0.5))[0]:
                chunk = os.read(self.rfd, 1 << 16)
                if not chunk:
                    return self._died()
                self.buf += chunk
            elif self.proc.poll() is not None:
                return self._died()
        line, self.buf = self.buf.split(b'\n', 1)
        return json.loads(line)

    def _died(self):
        code = self.proc.wait()
        self.kill()
        how = 'killed by signal %d' % -code if code < 0 else 'exit code %d' % code
        return {'status': 'failed', 'error': 'the worker died (%s); see %s' % (how, self.log_path)}

    def kill(self):
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.proc.stdin.close()
        os.close(self.rfd)
        self.proc = None

    def close(self):
        if self.proc is None:
            return
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            pass
        try:  # whatever the cases left behind in the worker's process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait()
        os.close(self.rfd)
        self.proc = None


class Progress:
    """tqdm when installed, else one status line on stderr."""

    def __init__(self, total, enabled):
        self.total, self.done, self.bar = total, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
            except ImportError:
                pass
            else:
                self.bar = tqdm(total=total, unit='run', file=sys.stderr, dynamic_ncols=True,
                                bar_format='{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]')

    def show(self, text):
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.enabled:
            end = '\r' if sys.stderr.isatty() else '\n'
            sys.stderr.write('\x1b[2K' * sys.stderr.isatty() + '[%3d/%d] %s%s' % (self.done + 1, self.total, text, end))
            sys.stderr.flush()

    def step(self, k=1):
        self.done += k
        if self.bar is not None:
            self.bar.update(k)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.enabled and sys.stderr.isatty():
            sys.stderr.write('\x1b[2K')


def _cpu_model():
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or 'unknown CPU'


def _source_commit():
    """The git commit of the cpool source being measured, when it runs from a checkout."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(['git', '-C', root, 'describe', '--always', '--dirty', '--exclude', '*'],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _version(spec):
    name = spec.partition(':')[0]
    try:
        from importlib.metadata import version
        return version(name.replace('_', '-'))
    except Exception:
        return 'stdlib' if name == 'multiprocessing' else '?'


def select_cases(only):
    """Case names matching --only (names, shell patterns, or the kinds 'micro'/'workload')."""
    if not only:
        return list(CASES)
    pats = [p.strip() for p in only.split(',') if p.strip()]
    names = [n for n, c in CASES.items() if any(fnmatch.fnmatchcase(n, p) or p == c.kind for p in pats)]
    unknown = [p for p in pats if not any(fnmatch.fnmatchcase(n, p) or p == c.kind for n, c in CASES.items())]
    if unknown:
        raise SystemExit('unknown case(s) %s; --list shows them' % ', '.join(unknown))
    return names


def default_modules():
    # serial, the plain loop, runs the pool cases in-process: the "vs serial" columns
    return (['multiprocessing', 'cpool', 'serial'] +
            [m for m in THIRD_PARTY if importlib.util.find_spec(m)])


def supports(spec, case):
    name = spec.partition(':')[0]
    return name not in LIBRARIES or case in LIBRARIES[name][1]


def compile_bytecode(modules):
    """Compile the packages under test to bytecode where it is missing, as an installed package
    has it. Without it (an editable install with PYTHONDONTWRITEBYTECODE set) each worker compiles
    the package from source, and the compiler's freed memory stays in the heap: a few MiB more to
    copy and tear down at every fork, which the standard library's precompiled modules do not
    pay. Best effort: a read-only install is left as it is."""
    import compileall
    for spec in modules:
        name = spec.partition(':')[0]
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            continue
        for path in found.submodule_search_locations:
            try:
                compileall.compile_dir(path, quiet=2)
            except OSError:
                pass


def run(args):
    names = select_cases(args.only)
    modules = args.modules
    compile_bytecode(modules)
    datadir = tempfile.mkdtemp(prefix='cpool-bench-')
    logdir = args.out or datadir
    cfg = {'workers': args.workers, 'data': datadir}
    workers = {m: Worker(m, cfg, logdir) for m in modules}
    results = {}
    todo = sum(1 for c in names for m in modules if supports(m, c)) * args.rounds
    progress = Progress(todo, not args.no_progress)
    interrupted = False
    try:
        for name in names:
            case = CASES[name]
            n = max(1, int(round(case.n * args.scale)))
            cells = {m: {'status': 'ok' if supports(m, name) else 'unsupported', 'runs': [], 'seconds': []}
                     for m in modules}
            results[name] = {'unit': case.unit, 'kind': case.kind, 'text': case.text, 'n': n,
                             'results': cells}
            for rnd in range(args.rounds):
                for mod in modules:
                    cell = cells[mod]
                    if cell['status'] == 'unsupported':
                        continue
                    if cell['status'] != 'ok':  # failed once: report it, don't wait for it again
                        progress.step()
                        continue
                    progress.show('%s · %s · round %d/%d' % (name, mod, rnd + 1, args.rounds))
                    reply = workers[mod].run(name, n, args.timeout)
                    progress.step()
                    if reply['status'] == 'ok':
                        cell['runs'].append(reply['units'] / reply['seconds'])
                        cell['seconds'].append(reply['seconds'])
                    else:
                        cell['status'] = reply['status']
                        if reply.get('error'):
                            cell['error'] = reply['error']
    except KeyboardInterrupt:
        interrupted = True
        # the case being measured when Ctrl-C came has no complete round: leave it out
        if name in results and any(c['status'] == 'ok' and not c['runs'] for c in results[name]['results'].values()):
            del results[name]
    finally:
        progress.close()
        for w in workers.values():
            w.kill() if interrupted else w.close()
        shutil.rmtree(datadir, ignore_errors=True)
    return results, interrupted


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog='python -m cpool.bench',
        description=__doc__.split('\n\n')[1].replace('\n', ' '),
        epilog='Cases (--list shows them with their units): micro: %s; workloads: %s. '
               'Ratios > 1 mean faster than the first module. Example: python -m cpool.bench --quick '
               '--out bench-results' % (
                   ', '.join(n for n, c in CASES.items() if c.kind == 'micro'),
                   ', '.join(n for n, c in CASES.items() if c.kind == 'workload')))
    ap.add_argument('--quick', action='store_true',
                    help='a first look in under a minute: --rounds %(rounds)d --scale %(scale)g '
                         '--timeout %(timeout)g unless those are given' % QUICK)
    ap.add_argument('--only', default='', metavar='CASES',
                    help="comma-separated case names, shell patterns ('pool_*') or kinds "
                         "('micro', 'workload'); default: every case")
    ap.add_argument('--rounds', type=int, metavar='N',
                    help='measurements per case and module, interleaved A B A B; the table shows '
                         'their median (default %d)' % FULL['rounds'])
    ap.add_argument('--scale', type=float, metavar='F',
                    help='multiply every case\'s size (messages, tasks, records) by F; 1 takes a '
                         'second or more per measurement with multiprocessing (default %g)' % FULL['scale'])
    ap.add_argument('--modules', metavar='M,M,...',
                    help='what to compare, the first is the baseline of the ratios: '
                         'multiprocessing-compatible modules (cpool, multiprocessing, or a context '
                         'such as cpool:spawn), and the libraries %s on the cases they have an '
                         'equivalent for (default: multiprocessing,cpool and those of the '
                         'libraries that are installed)' % ', '.join(THIRD_PARTY))
    ap.add_argument('--workers', type=int, default=max(2, min(4, os.cpu_count() or 2)), metavar='N',
                    help='processes per pool and consumers in the pipeline (default %(default)s)')
    ap.add_argument('--timeout', type=float, metavar='SECONDS',
                    help='deadline of one measurement; a case past it is killed and reported as '
                         'TIMEOUT (default %g, %g with --quick)' % (FULL['timeout'], QUICK['timeout']))
    ap.add_argument('--out', metavar='DIR',
                    help='write bench.json (every measurement and the machine), bench.txt (the '
                         'table), bench.png (a chart of the ratios) and the workers\' logs to DIR')
    ap.add_argument('--no-progress', action='store_true', help='no progress bar or status line on stderr')
    ap.add_argument('--list', action='store_true', help='list the cases and exit')
    args = ap.parse_args(argv)

    if args.list:
        for name, c in CASES.items():
            print('%-22s %-9s %-8s %s' % (name, c.kind, c.unit, c.text))
        return 0
    preset = QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.rounds < 1 or args.scale <= 0 or args.timeout <= 0 or args.workers < 1:
        ap.error('--rounds, --scale, --timeout and --workers must be positive')
    args.modules = [m.strip() for m in args.modules.split(',') if m.strip()] if args.modules else default_modules()
    if len(args.modules) < 1:
        ap.error('--modules: give at least one module')
    if args.out:
        os.makedirs(args.out, exist_ok=True)

    started = datetime.datetime.now(datetime.timezone.utc)
    results, interrupted = run(args)
    from cpool import __version__
    doc = {
        'meta': {
            'date': started.strftime('%Y-%m-%d %H:%M UTC'),
            'python': platform.python_version(),
            'implementation': platform.python_implementation(),
            'platform': '%s %s' % (platform.system(), platform.machine()),
            'kernel': platform.release(),
            'cpu_count': os.cpu_count(),
            'cpu_model': _cpu_model(),
            'cpool_version': __version__,
            'cpool_commit': _source_commit(),
            'modules': args.modules,
            'versions': {m: _version(m) for m in args.modules},
            'workers': args.workers, 'rounds': args.rounds, 'scale': args.scale,
            'timeout': args.timeout, 'quick': args.quick, 'interrupted': interrupted,
            'seconds': round((datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(), 1),
        },
        'cases': report.summarize(results, args.modules),
    }
    doc['headline'] = report.headline(doc['cases'], args.modules)
    text = report.table(doc)
    if interrupted:
        text += '(interrupted: the table holds the cases finished before Ctrl-C)\n'
    sys.stdout.write(text)
    if args.out:
        report.write_json(doc, os.path.join(args.out, 'bench.json'))
        with open(os.path.join(args.out, 'bench.txt'), 'w') as f:
            f.write(text)
        try:
            report.chart(doc, os.path.join(args.out, 'bench.png'))
        except ImportError:
            print('matplotlib is not installed: no chart (pip install matplotlib)', file=sys.stderr)
        print('results written to %s' % args.out, file=sys.stderr)
    return 130 if interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
