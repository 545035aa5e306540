"""Each program in examples/ runs with cpool and with the standard library and prints the same."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, 'examples')

# example -> (extra arguments, the cpool modules it needs)
CASES = {
    'gc_content': ([], ('pool',)),
    'kmer_count': (['--canonical', '--top', '30'], ('pool',)),
    'gene_stats': ([], ('pool',)),
    'fastq_quality': (['--workers', '3'], ('queues',)),
    'parallel_writers': ([], ('synchronize',)),
    # 2,000 x 300 here; the example's default is 20,000 genes x 1,000 samples (160 MB)
    'shared_matrix': (['--genes', '2000', '--samples', '300', '--chunk', '150'],
                      ('shared_memory',)),
}


def run(name, module, *args, timeout=60):
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(p for p in (ROOT, env.get('PYTHONPATH')) if p)
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, name + '.py'), '--module', module, *args],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def same_output(name, *args, rc=0):
    std = run(name, 'multiprocessing', *args)
    assert std.returncode == rc, std.stderr
    ours = run(name, 'cpool', *args)
    assert ours.returncode == rc, ours.stderr
    assert ours.stdout == std.stdout
    assert ours.stdout.strip()
    return ours


def test_every_example_is_listed():
    assert sorted(f[:-3] for f in os.listdir(EXAMPLES) if f.endswith('.py')) == sorted(CASES)


@pytest.mark.timeout(150)
@pytest.mark.parametrize('name', sorted(CASES))
def test_example_same_output(name):
    args, _parts_exercised = CASES[name]
    same_output(name, *args)


@pytest.mark.timeout(150)
def test_gc_content_of_a_file(tmp_path):
    fa = tmp_path / 'x.fa'
    fa.write_text('>a desc\nACGTNN\nggcc\n>b\nNNNN\n>c\nAT\n')
    out = same_output('gc_content', str(fa), '--chunksize', '1').stdout.splitlines()
    assert out[:3] == ['a\t10\t0.7500', 'b\t4\t0.0000', 'c\t2\t0.0000']


@pytest.mark.timeout(150)
def test_gene_stats_reports_a_bad_line_and_keeps_the_others(tmp_path):
    tsv = tmp_path / 'm.tsv'
    tsv.write_text('gene\tc1\tc2\tt1\tt2\nG1\t1\t3\t5\t7\nG2\t1\tNA\t3\t4\nG3\t2\t2\t2\t2\n')
    res = same_output('gene_stats', str(tsv), '--chunk', '1', rc=1)
    assert 'G1\t2.000\t6.000' in res.stdout and 'G3\t2.000\t2.000' in res.stdout
    assert "line 3 (G2): could not convert string to float: 'NA'" in res.stderr


@pytest.mark.timeout(150)
def test_parallel_writers_keeps_the_bound():
    res = same_output('parallel_writers', '--samples', '6', '--max-active', '2', '--reads', '600', '--block', '400')
    assert 'blocks whole: yes' in res.stdout and 'at most 2 samples at once: yes' in res.stdout


@pytest.mark.timeout(150)
@pytest.mark.parametrize('method', ['spawn', 'forkserver'])
@pytest.mark.parametrize('name, args, parts', [
    ('gc_content', ['--records', '300'], ('pool',)),
    ('fastq_quality', ['--reads', '1500'], ('queues',)),  # a Queue handed to spawned Processes
    ('parallel_writers', ['--samples', '4', '--reads', '300'], ('synchronize',)),  # Lock, Semaphore
    ('shared_matrix', ['--genes', '1000', '--samples', '100', '--chunk', '100'],
     ('shared_memory',)),  # workers attach by name
])
def test_example_under_other_start_methods(name, args, parts, method):  # noqa: ARG001
    same_output(name, *args, '--start-method', method)


@pytest.mark.timeout(150)
def test_shared_matrix_writes_every_gene_computed_on_the_shared_buffer(tmp_path):
    std_out, ours_out = tmp_path / 'std.tsv', tmp_path / 'ours.tsv'
    args = ['--genes', '1200', '--samples', '50', '--chunk', '70', '--top', '3']
    std = run('shared_matrix', 'multiprocessing', *args, '--out', str(std_out))
    ours = run('shared_matrix', 'cpool', *args, '--out', str(ours_out))
    assert (std.returncode, ours.returncode) == (0, 0), ours.stderr + std.stderr
    assert ours.stdout == std.stdout
    assert '18 tasks computed on the shared buffer of 18' in ours.stdout
    lines = ours_out.read_text().splitlines()
    assert lines == std_out.read_text().splitlines() and len(lines) == 1201
    assert lines[1].startswith('GENE00001\t') and lines[-1].startswith('GENE01200\t')


# Every example once more on a Dask LocalCluster started by the example (cpool.dask): the same
# arguments, then those that size the cluster (2 workers).
DASK_CASES = {
    'gc_content': (['--records', '300'], ['--processes', '2']),
    'gene_stats': (['--genes', '500'], ['--processes', '2']),
    'kmer_count': (['--canonical', '--top', '30'], ['--processes', '2']),
    'fastq_quality': (['--reads', '1500'], ['--workers', '2']),  # Pool tasks, not Processes
    # Dask's Lock and Semaphore; --max-active 1 below the cluster's 2 threads, so it bounds
    'parallel_writers': (['--samples', '5', '--max-active', '1', '--reads', '400'], []),
    'shared_matrix': (['--genes', '2000', '--samples', '300', '--chunk', '150'],
                      ['--processes', '2']),  # the matrix sent once to each worker
}


def test_every_example_runs_on_dask():
    assert sorted(DASK_CASES) == sorted(CASES)


@pytest.mark.stress  # a cluster started per run: 10-20 s on a loaded machine
@pytest.mark.timeout(200)
@pytest.mark.parametrize('name', sorted(DASK_CASES))
def test_example_on_dask_same_output(name):
    pytest.importorskip('distributed')
    args, cluster_args = DASK_CASES[name]
    std = run(name, 'multiprocessing', *args)
    assert std.returncode == 0, std.stderr
    ours = run(name, 'cpool', *args)
    assert ours.returncode == 0, ours.stderr
    on_dask = run(name, 'cpool', *args, '--dask', 'local', *cluster_args, timeout=150)
    assert on_dask.returncode == 0, on_dask.stderr[-3000:]
    assert on_dask.stdout == ours.stdout == std.stdout and on_dask.stdout.strip()
