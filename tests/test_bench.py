"""`python -m cpool.bench`: the runner, its reports, and what it does with failing or hanging cases."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A stand-in for a broken multiprocessing-like module: Pipe kills its process, Queue is missing,
# Lock hangs for ever, Process works (from the standard library) so the restarted worker is seen.
BROKEN = textwrap.dedent('''
    import os, signal, time
    from multiprocessing import Process

    def Pipe(duplex=True):
        os.kill(os.getpid(), signal.SIGKILL)

    def Queue(maxsize=0):
        raise NotImplementedError('no queues here')

    class _Lock:
        def acquire(self):
            time.sleep(3600)
        release = acquire

    def Lock():
        return _Lock()
''')


def bench(*args, env=None, timeout=120):
    e = dict(os.environ)
    e['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, (env or {}).get('PYTHONPATH'), e.get('PYTHONPATH')) if p)
    return subprocess.run([sys.executable, '-m', 'cpool.bench', '--no-progress', *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=e)


def test_help_explains_every_option():
    res = bench('--help')
    assert res.returncode == 0
    for opt in ('--quick', '--only', '--rounds', '--scale', '--modules', '--workers', '--timeout',
                '--out', '--no-progress', '--list'):
        assert opt in res.stdout


def test_list_names_every_case():
    from cpool._bench.cases import CASES
    res = bench('--list')
    assert res.returncode == 0
    assert [line.split()[0] for line in res.stdout.splitlines()] == list(CASES)


def test_unknown_case_is_an_error():
    res = bench('--only', 'no_such_case')
    assert res.returncode != 0 and 'no_such_case' in res.stderr


def test_bench_modules_do_not_import_multiprocessing():
    code = ("import sys; sys.modules['multiprocessing'] = None; import cpool.bench; "
            "from cpool._bench import worker, micro, bio, cases, others, report")
    subprocess.run([sys.executable, '-c', code], check=True, cwd=ROOT, timeout=60)


@pytest.mark.timeout(180)
def test_run_writes_table_json_and_chart(tmp_path):
    pytest.importorskip('matplotlib')
    res = bench('--modules', 'multiprocessing,multiprocessing:spawn', '--only', 'lock_uncontended,fasta_gc_imap',
                '--rounds', '2', '--scale', '0.02', '--out', str(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / 'bench.json').read_text())
    assert doc['meta']['modules'] == ['multiprocessing', 'multiprocessing:spawn']
    assert doc['meta']['cpu_count'] == os.cpu_count() and doc['meta']['rounds'] == 2
    for name in ('lock_uncontended', 'fasta_gc_imap'):
        cells = doc['cases'][name]['results']
        for cell in cells.values():
            assert cell['status'] == 'ok' and len(cell['runs']) == 2 and cell['median'] > 0
        assert cells['multiprocessing']['ratio'] == 1.0
        assert cells['multiprocessing:spawn']['ratio'] == pytest.approx(
            cells['multiprocessing:spawn']['median'] / cells['multiprocessing']['median'])
    assert 'multiprocessing:spawn vs multiprocessing: geometric mean' in res.stdout
    assert (tmp_path / 'bench.txt').read_text() == res.stdout
    png = (tmp_path / 'bench.png').read_bytes()
    assert png.startswith(b'\x89PNG') and len(png) > 10_000


@pytest.mark.timeout(120)
def test_failing_missing_and_hanging_cases_are_reported_and_the_run_goes_on(tmp_path):
    (tmp_path / 'brokenmp.py').write_text(BROKEN)
    res = bench('--modules', 'multiprocessing,brokenmp', '--only',
                'pipe_pingpong,queue_small,lock_uncontended,process_start_join',
                '--rounds', '2', '--scale', '0.01', '--timeout', '3', '--out', str(tmp_path / 'out'),
                env={'PYTHONPATH': str(tmp_path)})
    assert res.returncode == 0, res.stderr
    cells = {name: c['results']['brokenmp'] for name, c in
             json.loads((tmp_path / 'out' / 'bench.json').read_text())['cases'].items()}
    assert cells['pipe_pingpong']['status'] == 'failed'
    assert 'the worker died (killed by signal 9)' in cells['pipe_pingpong']['error']
    assert cells['queue_small']['status'] == 'n/a'
    assert 'no queues here' in cells['queue_small']['error']
    assert cells['lock_uncontended']['status'] == 'timeout'
    # a case that failed is not run again in the next round
    assert cells['lock_uncontended']['runs'] == []
    # the worker was restarted after the crash and the timeout
    assert cells['process_start_join']['status'] == 'ok' and len(cells['process_start_join']['runs']) == 2
    rows = {}
    for line in res.stdout.splitlines():
        if line.strip():
            rows.setdefault(line.split()[0], line)  # the table's row, not the notes under it
    assert 'FAILED' in rows['pipe_pingpong'] and 'TIMEOUT' in rows['lock_uncontended']
    assert 'n/a' in rows['queue_small']


def test_unsupported_cases_show_a_dash():
    from cpool._bench import report
    results = {'pool_map': {'unit': 'task/s', 'kind': 'micro', 'text': '', 'n': 1, 'results': {
        'multiprocessing': {'status': 'ok', 'runs': [2.0, 4.0, 3.0]},
        'cpool': {'status': 'ok', 'runs': [9.0, 6.0, 12.0]},
        'faster_fifo': {'status': 'unsupported', 'runs': []}}}}
    mods = ['multiprocessing', 'cpool', 'faster_fifo']
    report.summarize(results, mods)
    cell = results['pool_map']['results']
    assert cell['multiprocessing']['median'] == 3.0 and cell['cpool']['ratio'] == 3.0
    doc = {'meta': {'cpool_version': '0', 'date': 'd', 'python': '3', 'platform': 'p', 'cpu_count': 2,
                    'cpu_model': 'c', 'workers': 2, 'rounds': 3, 'scale': 1, 'modules': mods},
           'cases': results, 'headline': report.headline(results, mods)}
    row = [line for line in report.table(doc).splitlines() if line.startswith('pool_map')][0]
    assert row.split()[2:] == ['3', '9', '3.00x', '-']


@pytest.mark.timeout(180)
def test_other_libraries_run_their_equivalent_cases(tmp_path):
    import importlib.util
    libs = [m for m in ('faster_fifo', 'mpire', 'loky') if importlib.util.find_spec(m)]
    if not libs:
        pytest.skip('none of faster-fifo, mpire, loky is installed')
    res = bench('--modules', ','.join(['multiprocessing'] + libs), '--only', 'queue_small,pool_apply_async,genes_apply_async',
                '--rounds', '1', '--scale', '0.02', '--out', str(tmp_path))
    assert res.returncode == 0, res.stderr
    cases = json.loads((tmp_path / 'bench.json').read_text())['cases']
    from cpool._bench.others import LIBRARIES
    for lib in libs:
        for name, case in cases.items():
            expected = 'ok' if name in LIBRARIES[lib][1] else 'unsupported'
            assert case['results'][lib]['status'] == expected, (lib, name, case['results'][lib])


def test_serial_plain_loop_column(tmp_path):
    """The plain loop runs the pool cases in-process; every module's row shows its speed-up over
    it and the share of the machine's limit; cases without a Pool show '-' for it."""
    res = bench('--modules', 'multiprocessing,cpool,serial', '--only',
                'pool_map,fasta_gc_imap,queue_small', '--rounds', '1', '--scale', '0.02',
                '--workers', '2', '--out', str(tmp_path))
    assert res.returncode == 0, res.stderr
    doc = json.loads((tmp_path / 'bench.json').read_text())
    limit = min(2, os.cpu_count())
    for name in ('pool_map', 'fasta_gc_imap'):
        cells = doc['cases'][name]['results']
        assert cells['serial']['status'] == 'ok' and cells['serial']['vs_serial'] == 1.0
        for mod in ('multiprocessing', 'cpool'):
            v = cells[mod]['median'] / cells['serial']['median']
            assert cells[mod]['vs_serial'] == pytest.approx(v)
            row = next(line for line in res.stdout.splitlines() if line.startswith(name + ' '))
            assert '%.2fx %d%%' % (v, round(100 * v / limit)) in row
    q = doc['cases']['queue_small']['results']
    assert q['serial']['status'] == 'unsupported' and q['cpool']['vs_serial'] is None
    assert 'cpool vs the plain loop: geometric mean' in res.stdout
    assert 'serial vs multiprocessing' not in res.stdout  # the plain loop is no library
    # the plain loop runs the cases' very code: same results, no processes
    from cpool._bench import serial
    with serial.Pool(2) as p:
        got = []
        r = p.apply_async(divmod, (7, 2), callback=got.append)
        e = p.apply_async(divmod, (1, 0), error_callback=got.append)
        assert r.get() == (3, 1) and got[0] == (3, 1) and isinstance(got[1], ZeroDivisionError)
        with pytest.raises(ZeroDivisionError):
            e.get()
        assert p.map(abs, [-1, 2]) == [1, 2] and list(p.imap(abs, iter([-3]))) == [3]
        assert p.starmap(pow, [(2, 3)]) == [8]
