"""Where a pool's time went: Pool(stats=True), then pool.stats() -- what the workers spent in the
task functions, in moving tasks and results, and waiting, what the parent spent encoding tasks
and taking results, the speed-up over a plain loop this implies, and what to change."""

__all__ = ['PoolStats', 'WorkerStats']

_NS = 1e-9


class WorkerStats(object):
    """One worker slot's totals (over every process that ran in it), in seconds."""

    __slots__ = ('tasks', 'run', 'decode', 'encode', 'wait')

    def __init__(self, tasks, run, decode, encode, wait):
        self.tasks, self.run, self.decode, self.encode, self.wait = tasks, run, decode, encode, wait

    def __sub__(self, other):
        return WorkerStats(*(getattr(self, k) - getattr(other, k) for k in self.__slots__))

    def __repr__(self):
        return ('WorkerStats(tasks=%d, run=%.6f, decode=%.6f, encode=%.6f, wait=%.6f)'
                % tuple(getattr(self, k) for k in self.__slots__))


class PoolStats(object):
    """A snapshot of a pool's time counters. Seconds throughout.

    wall: the pool's age when taken (or the span between two snapshots: ``b - a``);
    workers: a WorkerStats per worker slot -- tasks run (a map chunk is one task, as for
    maxtasksperchild), time in the task functions (run), unpickling tasks (decode), encoding
    and handing back results (encode), waiting for and taking tasks (wait);
    parent_encode / parent_decode: the parent's time building task messages and taking
    results (callbacks not included)."""

    def __init__(self, wall, workers, parent_encode, parent_decode):
        self.wall = wall
        self.workers = workers
        self.parent_encode = parent_encode
        self.parent_decode = parent_decode

    @classmethod
    def _from_core(cls, d):
        return cls(d['age_ns'] * _NS, [WorkerStats(t[0], *(x * _NS for x in t[1:]))
                                        for t in d['slots']],
                   d['encode_ns'] * _NS, d['decode_ns'] * _NS)

    def __sub__(self, other):
        return PoolStats(self.wall - other.wall,
                         [a - b for a, b in zip(self.workers, other.workers)],
                         self.parent_encode - other.parent_encode,
                         self.parent_decode - other.parent_decode)

    @property
    def tasks(self):
        return sum(w.tasks for w in self.workers)

    @property
    def busy(self):
        """Seconds in the task functions, all workers together: what a plain loop would take
        if the functions ran as fast in one process."""
        return sum(w.run for w in self.workers)

    @property
    def transport(self):
        """Seconds the workers spent decoding tasks and encoding results."""
        return sum(w.decode + w.encode for w in self.workers)

    @property
    def speedup(self):
        """busy / wall: the speed-up over a plain loop that the span implies."""
        return self.busy / self.wall if self.wall > 0 else 0.0

    @property
    def utilisation(self):
        """The share of the workers' time spent in the task functions."""
        n = len(self.workers)
        return self.busy / (self.wall * n) if self.wall > 0 and n else 0.0

    def advice(self):
        """What the numbers suggest, as sentences (empty when nothing stands out)."""
        out = []
        tasks, busy, wall = self.tasks, self.busy, self.wall
        if not tasks or wall <= 0:
            return ['no task ran in this span']
        per_task = busy / tasks
        if per_task < 200e-6:
            out.append('tasks are short (%s of work each): a larger chunksize, or more work per '
                       'call, spreads the fixed cost of a task over more work' % _fmt(per_task))
        if self.transport > 0.25 * busy:
            out.append('the workers spend %.0f%% as long moving arguments and results as '
                       'working: send less (indices, file names, shared memory) or do more '
                       'per task' % (100 * self.transport / busy if busy else 100))
        parent = self.parent_encode + self.parent_decode
        if parent > 0.5 * wall:
            out.append('the parent is busy %.0f%% of the time encoding tasks and taking '
                       'results: it limits the pool' % (100 * parent / wall))
        waiting = sum(w.wait for w in self.workers) / len(self.workers)
        if waiting > 0.5 * wall:
            out.append('the workers wait for tasks %.0f%% of the time: too few tasks in flight, '
                       'or the parent cannot hand them out faster' % (100 * waiting / wall))
        if self.speedup < 1.0:
            out.append('this is slower than a plain loop would be (%.2fx)' % self.speedup)
        return out

    def __str__(self):
        lines = ['pool stats over %s: %d tasks, %s in the task functions -> %.2fx a plain loop, '
                 '%.0f%% of %d workers' % (_fmt(self.wall), self.tasks, _fmt(self.busy),
                                           self.speedup, 100 * self.utilisation,
                                           len(self.workers)),
                 '  worker   tasks       run    decode    encode      wait']
        for i, w in enumerate(self.workers):
            lines.append('  %6d %7d %9s %9s %9s %9s' % (i, w.tasks, _fmt(w.run), _fmt(w.decode),
                                                      _fmt(w.encode), _fmt(w.wait)))
        lines.append('  parent: encoding tasks %s, taking results %s'
                     % (_fmt(self.parent_encode), _fmt(self.parent_decode)))
        lines.extend('  - ' + a for a in self.advice())
        return '\n'.join(lines)

    def __repr__(self):
        return ('<PoolStats wall=%.3fs tasks=%d busy=%.3fs speedup=%.2fx>'
                % (self.wall, self.tasks, self.busy, self.speedup))


def _fmt(seconds):
    if seconds >= 1:
        return '%.2f s' % seconds
    if seconds >= 1e-3:
        return '%.1f ms' % (seconds * 1e3)
    return '%.0f us' % (seconds * 1e6)
