"""Real workloads as bioinformatics scripts write them: GC content of a FASTA and k-mer counts of a
FASTQ with Pool.imap, per-gene statistics with apply_async and ordered output, a FASTQ
producer/consumer pipeline over Queues, and per-gene statistics of a float64 expression matrix
(1,000 samples) that Pool workers read from SharedMemory or get as pickled row slices. The input
files (and the matrix) are generated (seeded) once per size in the data directory (in memory),
outside the timed part; each workload is timed from opening its input to its last output line,
pool start and shutdown included, as a user would see it.
"""
import importlib
import math
import os
import random
import time
from collections import Counter

perf = time.perf_counter
KMER = 6
SAMPLES = 12  # per gene: 6 controls then 6 treated


# ---- input files ----

def _write_atomic(path, lines):
    tmp = '%s.%d.tmp' % (path, os.getpid())
    with open(tmp, 'w') as f:
        f.writelines(lines)
    os.replace(tmp, path)


def _fasta_lines(n, rnd):
    for i in range(n):
        seq = ''.join(rnd.choices('ACGT', weights=(3, 2, 2, 3), k=rnd.randint(100, 1000)))
        yield '>contig_%06d\n' % i
        for j in range(0, len(seq), 80):
            yield seq[j:j + 80] + '\n'


def _fastq_lines(n, rnd):
    for i in range(n):
        seq = ''.join(rnd.choices('ACGT', k=150))
        qual = ''.join(chr(33 + q) for q in rnd.choices(range(2, 41), k=150))
        yield '@read_%07d\n%s\n+\n%s\n' % (i, seq, qual)


def _tsv_lines(n, rnd):
    yield 'gene\t' + '\t'.join('s%02d' % j for j in range(SAMPLES)) + '\n'
    for i in range(n):
        base = rnd.uniform(1, 500)
        shift = rnd.choice((0.5, 1, 1, 1, 2))
        vals = [rnd.gauss(base * (shift if j >= SAMPLES // 2 else 1), base * 0.1) for j in range(SAMPLES)]
        yield 'GENE%05d\t' % i + '\t'.join('%.3f' % max(v, 0.0) for v in vals) + '\n'


_GENERATORS = {'fasta': _fasta_lines, 'fastq': _fastq_lines, 'tsv': _tsv_lines}


def data_file(cfg, kind, n):
    """The path of a generated input of `n` records (made once, then reused by every module)."""
    path = os.path.join(cfg['data'], '%s_%d.%s' % (kind, n, kind))
    if not os.path.exists(path):
        _write_atomic(path, _GENERATORS[kind](n, random.Random(n)))
    return path


# ---- parsers (plain generators, as scripts write them) ----

def read_fasta(path):
    name, parts = None, []
    with open(path) as f:
        for line in f:
            line = line.rstrip()
            if line.startswith('>'):
                if name is not None:
                    yield name, ''.join(parts)
                name, parts = line[1:], []
            else:
                parts.append(line)
    if name is not None:
        yield name, ''.join(parts)


def read_fastq(path):
    with open(path) as f:
        while True:
            head = f.readline()
            if not head:
                return
            seq = f.readline().rstrip()
            f.readline()
            qual = f.readline().rstrip()
            yield head[1:].rstrip(), seq, qual


def batches(items, size):
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


# ---- the per-item work ----

def gc_content(record):
    name, seq = record
    return name, (seq.count('G') + seq.count('C')) / len(seq)


def count_kmers(seqs):
    counts = Counter()
    for seq in seqs:
        counts.update(seq[i:i + KMER] for i in range(len(seq) - KMER + 1))
    return counts


def gene_stats(gene, values):
    """Mean per group, log2 fold change and Welch's t of one gene's expression."""
    half = len(values) // 2
    a, b = values[:half], values[half:]
    ma, mb = sum(a) / half, sum(b) / half
    va = sum((x - ma) ** 2 for x in a) / (half - 1)
    vb = sum((x - mb) ** 2 for x in b) / (half - 1)
    se = math.sqrt(va / half + vb / half) or 1e-12
    return gene, ma, mb, math.log2((mb + 1) / (ma + 1)), (mb - ma) / se


def read_stats(record):
    name, seq, qual = record
    q = sum(map(ord, qual)) / len(qual) - 33
    return name, q, (seq.count('G') + seq.count('C')) / len(seq)


# ---- workloads: fn(mp, n, cfg) -> (records, seconds) ----

def fasta_gc_imap(mp, n, cfg):
    path = data_file(cfg, 'fasta', n)
    out = []
    t = perf()
    with mp.Pool(cfg['workers']) as pool:
        for name, gc in pool.imap(gc_content, read_fasta(path)):
            out.append('%s\t%.4f\n' % (name, gc))
    dt = perf() - t
    check_lines(out, n, 'contig_%06d' % (n - 1))
    return n, dt


def fastq_kmer_imap(mp, n, cfg):
    path = data_file(cfg, 'fastq', n)
    t = perf()
    total = Counter()
    with mp.Pool(cfg['workers']) as pool:
        for counts in pool.imap(count_kmers, batches((r[1] for r in read_fastq(path)), 500)):
            total.update(counts)
    dt = perf() - t
    check_kmers(total, n)
    return n, dt


def genes_apply_async(mp, n, cfg):
    path = data_file(cfg, 'tsv', n)
    out, errors = [], []
    t = perf()
    with mp.Pool(cfg['workers']) as pool:
        pending = []
        with open(path) as f:
            next(f)
            for line in f:
                gene, *vals = line.rstrip('\n').split('\t')
                pending.append(pool.apply_async(gene_stats, (gene, [float(v) for v in vals]),
                                                error_callback=errors.append))
        for r in pending:  # in input order, as the output file must be
            out.append('%s\t%.3f\t%.3f\t%.4f\t%.3f\n' % r.get())
    dt = perf() - t
    if errors:
        raise errors[0]
    check_lines(out, n, 'GENE%05d' % (n - 1))
    return n, dt


def _fastq_producer(path, tasks, consumers):
    for record in read_fastq(path):
        tasks.put(record)
    for _ in range(consumers):
        tasks.put(None)


def _fastq_consumer(tasks, results):
    while True:
        record = tasks.get()
        if record is None:
            results.put(None)
            return
        results.put(read_stats(record))


def fastq_queue_pipeline(mp, n, cfg):
    """One reader process, `workers` consumers, the parent collects: one Queue message per read."""
    path = data_file(cfg, 'fastq', n)
    w = cfg['workers']
    t = perf()
    tasks, results = mp.Queue(), mp.Queue()
    procs = [mp.Process(target=_fastq_producer, args=(path, tasks, w))]
    procs += [mp.Process(target=_fastq_consumer, args=(tasks, results)) for _ in range(w)]
    for p in procs:
        p.start()
    stats, done = {}, 0
    while done < w:
        item = results.get()
        if item is None:
            done += 1
        else:
            stats[item[0]] = item[1:]
    for p in procs:
        p.join()
    out = ['%s\t%.2f\t%.4f\n' % ((name,) + stats[name]) for name in sorted(stats)]
    dt = perf() - t
    check_lines(out, n, 'read_%07d' % (n - 1))
    return n, dt


# ---- checks: a fast wrong answer must not pass ----

# ---- an expression matrix: shared with the workers, or passed to them in slices ----

MATRIX_SAMPLES = 1000
MATRIX_CHUNK = 500  # genes per task: 4 MB of float64 as an argument
_matrices = {}      # n -> matrix, generated once per benchmark worker (outside the timing)
_attached = {}      # in a pool worker: segment name -> (SharedMemory, view)


def _matrix(n):
    if n not in _matrices:
        import numpy as np
        _matrices.clear()
        rng = np.random.default_rng(n)
        level = rng.normal(4.0, 1.5, size=(n, 1))
        _matrices[n] = np.exp(level + 0.3 * rng.standard_normal((n, MATRIX_SAMPLES)))
    return _matrices[n]


def _row_stats(rows):
    import numpy as np
    return np.stack([rows.mean(axis=1), rows.var(axis=1, ddof=1)])


def _shm_rows(task):
    module, name, shape, start, stop = task
    if name not in _attached:
        import numpy as np
        shm = importlib.import_module(module + '.shared_memory').SharedMemory(name)
        _attached[name] = shm, np.ndarray(shape, dtype=np.float64, buffer=shm.buf)
    return start, _row_stats(_attached[name][1][start:stop])


def _slice_rows(task):
    start, rows = task
    return start, _row_stats(rows)


def _module_name(mp):
    """'cpool' or 'multiprocessing', for the module itself or one of its contexts."""
    return getattr(mp, '__name__', None) or type(mp).__module__.rpartition('.')[0]


def _collect(mp, cfg, fn, tasks, n):
    import numpy as np
    stats = np.full((2, n), np.nan)
    with mp.Pool(cfg['workers']) as pool:
        for start, block in pool.imap_unordered(fn, tasks):
            stats[:, start:start + block.shape[1]] = block
    return stats


def _check_matrix_stats(stats, data):
    import numpy as np
    n = data.shape[0]
    if np.isnan(stats).any():
        raise AssertionError('genes without statistics')
    for row in (0, n // 2, n - 1):
        if not np.allclose(stats[:, row], _row_stats(data[row:row + 1])[:, 0]):
            raise AssertionError('wrong statistics for gene %d' % row)


def matrix_shm_stats(mp, n, cfg):
    """The matrix copied once into a SharedMemory block; tasks name row ranges of it."""
    import numpy as np
    data = _matrix(n)
    shared_memory = importlib.import_module(_module_name(mp) + '.shared_memory')
    t = perf()
    shm = shared_memory.SharedMemory(create=True, size=data.nbytes)
    try:
        matrix = np.ndarray(data.shape, dtype=np.float64, buffer=shm.buf)
        matrix[:] = data
        tasks = [(_module_name(mp), shm.name, data.shape, start, min(start + MATRIX_CHUNK, n))
                 for start in range(0, n, MATRIX_CHUNK)]
        stats = _collect(mp, cfg, _shm_rows, tasks, n)
        del matrix
    finally:
        shm.close()
        shm.unlink()
    dt = perf() - t
    _check_matrix_stats(stats, data)
    return n, dt


def matrix_args_stats(mp, n, cfg):
    """The same statistics, each task's rows pickled as its argument."""
    data = _matrix(n)
    t = perf()
    tasks = [(start, data[start:start + MATRIX_CHUNK]) for start in range(0, n, MATRIX_CHUNK)]
    stats = _collect(mp, cfg, _slice_rows, tasks, n)
    dt = perf() - t
    _check_matrix_stats(stats, data)
    return n, dt


def slice_stats(lines, part):
    """Per line of one slice of a file: GC share and longest homopolymer, as output lines."""
    out = []
    for line in lines:
        seq = line.rstrip('\n')
        run = best = 1
        for a, b in zip(seq, seq[1:]):
            run = run + 1 if a == b else 1
            best = max(best, run)
        out.append('%d\t%.4f\t%d\n' % (part, (seq.count('G') + seq.count('C')) / len(seq), best))
    return out


def line_slices_apply_async(mp, n, cfg):
    """A file's distinct lines (the reads of a FASTQ) split into 4 * workers slices, one
    apply_async per slice, lists of strings both ways, the results written in input order."""
    path = data_file(cfg, 'fastq', n)
    t = perf()
    with open(path) as f:
        lines = [line for i, line in enumerate(f) if i % 4 == 1]
    parts = 4 * cfg['workers']
    step = -(-len(lines) // parts)
    out = []
    with mp.Pool(cfg['workers']) as pool:
        pending = [pool.apply_async(slice_stats, (lines[i:i + step], k))
                   for k, i in enumerate(range(0, len(lines), step))]
        for r in pending:
            out.extend(r.get())
    dt = perf() - t
    if len(out) != n or not out[-1].startswith('%d\t' % (len(pending) - 1)):
        raise AssertionError('expected %d output lines in slice order, got %d' % (n, len(out)))
    return n, dt


_arrays = {}  # n -> the input arrays, made once per benchmark worker (outside the timing)
ARRAY_ELEMS = 1 << 20  # 8 MB of float64


def standardize(a):
    return (a - a.mean()) / a.std()


def numpy_map(mp, n, cfg):
    """Pool.map over n arrays of 8 MB float64, each returned standardized: the payload both ways."""
    import numpy as np
    if n not in _arrays:
        _arrays[n] = [np.random.default_rng(i).normal(5.0, 2.0, ARRAY_ELEMS) for i in range(n)]
    arrays = _arrays[n]
    with mp.Pool(cfg['workers']) as pool:
        pool.map(abs, range(4 * cfg['workers']), chunksize=1)  # workers started
        t = perf()
        out = pool.map(standardize, arrays)
        dt = perf() - t
    for i in (0, n - 1):
        if out[i].shape != arrays[i].shape or not np.allclose(out[i], standardize(arrays[i])):
            raise AssertionError('wrong result for array %d' % i)
    return n * arrays[0].nbytes / 1e6, dt


def check_lines(out, n, last_name):
    if len(out) != n or not out[-1].startswith(last_name + '\t'):
        raise AssertionError('expected %d output lines ending with %s, got %d' % (n, last_name, len(out)))


def check_kmers(total, n):
    expected = n * (150 - KMER + 1)
    if sum(total.values()) != expected:
        raise AssertionError('%d k-mers counted, expected %d' % (sum(total.values()), expected))
