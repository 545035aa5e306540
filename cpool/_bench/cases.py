"""The list of benchmark cases: name -> function, size at --scale 1, unit, kind and a one-line description."""
import collections

from . import bio, micro

Case = collections.namedtuple('Case', 'fn n unit kind text')

CASES = {
    'pipe_pingpong': Case(micro.pipe_pingpong, 20_000, 'rt/s', 'micro',
                          'Pipe: send an int, wait for the echo'),
    'pipe_10mb': Case(micro.pipe_10mb, 100, 'MB/s', 'micro',
                      'Pipe: send_bytes of 10 MB to a reader process'),
    'queue_small': Case(micro.queue_small, 100_000, 'msg/s', 'micro',
                        'Queue: a process puts ints, the parent gets them'),
    'queue_1mb': Case(micro.queue_1mb, 300, 'msg/s', 'micro',
                      'Queue: a process puts 1 MB bytes objects'),
    'lock_uncontended': Case(micro.lock_uncontended, 500_000, 'op/s', 'micro',
                             'Lock: acquire + release, one process'),
    'lock_contended': Case(micro.lock_contended, 50_000, 'op/s', 'micro',
                           'Lock: 2 processes increment a Value under one Lock'),
    'event_pingpong': Case(micro.event_pingpong, 10_000, 'rt/s', 'micro',
                           'Event: set/wait/clear round trips between 2 processes'),
    'process_start_join': Case(micro.process_start_join, 200, 'proc/s', 'micro',
                               'Process: start + join of a no-op process'),
    'pool_map': Case(micro.pool_map, 200_000, 'task/s', 'micro',
                     'Pool.map of x*x, default chunksize'),
    'pool_map_chunk1': Case(micro.pool_map_chunk1, 20_000, 'task/s', 'micro',
                            'Pool.map of x*x, chunksize=1'),
    'pool_apply_async': Case(micro.pool_apply_async, 20_000, 'task/s', 'micro',
                             'Pool.apply_async of a+b, then get() each'),
    'pool_imap': Case(micro.pool_imap, 20_000, 'task/s', 'micro',
                      'Pool.imap of x*x (chunksize=1), in order'),
    'pool_imap_unordered': Case(micro.pool_imap_unordered, 20_000, 'task/s', 'micro',
                                'Pool.imap_unordered of x*x (chunksize=1)'),
    'pool_apply_latency': Case(micro.pool_apply_latency, 3_000, 'call/s', 'micro',
                               'Pool.apply: one blocking call at a time'),
    'manager_list_append': Case(micro.manager_list_append, 5_000, 'call/s', 'micro',
                                'Manager().list().append'),
    'fasta_gc_imap': Case(bio.fasta_gc_imap, 20_000, 'rec/s', 'workload',
                          'GC content per FASTA record, Pool.imap'),
    'fastq_kmer_imap': Case(bio.fastq_kmer_imap, 40_000, 'read/s', 'workload',
                            '6-mer counts of FASTQ reads, Pool.imap over batches, merged Counters'),
    'genes_apply_async': Case(bio.genes_apply_async, 10_000, 'gene/s', 'workload',
                              'per-gene fold change + t statistic from a TSV, apply_async, ordered output'),
    'fastq_queue_pipeline': Case(bio.fastq_queue_pipeline, 40_000, 'read/s', 'workload',
                                 'FASTQ reader -> Queue -> 2 quality-stat processes -> Queue -> parent'),
    'matrix_shm_stats': Case(bio.matrix_shm_stats, 20_000, 'gene/s', 'workload',
                             'per-gene mean/var of a genes x 1000 float64 matrix in SharedMemory, '
                             'Pool.imap_unordered of row ranges'),
    'line_slices_apply_async': Case(bio.line_slices_apply_async, 200_000, 'line/s', 'workload',
                                    "a file's lines in 4 * workers slices, apply_async each, "
                                    'lists of strings both ways, output in order'),
    'numpy_map': Case(bio.numpy_map, 48, 'MB/s', 'workload',
                      'Pool.map over 8 MB float64 arrays, each returned standardized'),
    'matrix_args_stats': Case(bio.matrix_args_stats, 20_000, 'gene/s', 'workload',
                              'the same, the row slices pickled as task arguments'),
}
