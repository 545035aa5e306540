"""How many CPUs this process may use: the Pool's default size per Python version, and
usable_cpu_count(), which also honours a cgroup CPU quota (containers, batch jobs)."""
import math
import os
import sys

__all__ = ['usable_cpu_count', 'default_pool_size']

# Where the kernel shows cgroups; module attributes so that tests can point them at a fake tree.
_CGROUP_ROOT = '/sys/fs/cgroup'
_PROC_SELF_CGROUP = '/proc/self/cgroup'
_PROC_SELF_MOUNTINFO = '/proc/self/mountinfo'

# The environment switch that makes Pool() (processes=None) use usable_cpu_count().
POOL_SIZE_ENV = 'CPOOL_POOL_PROCESSES'


def _affinity_count():
    # os.process_cpu_count() (3.13+) is this plus the -X cpu_count / PYTHON_CPU_COUNT override.
    if hasattr(os, 'process_cpu_count'):
        return os.process_cpu_count()
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count()


def _read(path):
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _quota_cpus(quota, period):
    # A quota of q microseconds per period p lets the group run q/p CPUs' worth: rounded up, as
    # loky does, so that a 1.5-CPU quota still gets 2 workers (each then runs 75% of the time).
    try:
        quota, period = int(quota), int(period)
    except (TypeError, ValueError):
        return None  # 'max' or unreadable: no limit
    if quota <= 0 or period <= 0:
        return None  # -1 in cgroup v1 means no limit
    return max(1, math.ceil(quota / period))


def _cgroup_mounts():
    """[(version, mount point, cgroup path at the mount's root)] for the unified (v2)
    hierarchy and v1's cpu controller, from /proc/self/mountinfo (a hybrid system mounts v2
    at /sys/fs/cgroup/unified, a pure v2 one at /sys/fs/cgroup)."""
    text = _read(_PROC_SELF_MOUNTINFO)
    if text is None:
        return [(2, _CGROUP_ROOT, '/'), (1, os.path.join(_CGROUP_ROOT, 'cpu'), '/')]
    out = []
    for line in text.splitlines():
        left, sep, right = line.partition(' - ')
        fields, tail = left.split(), right.split()
        if not sep or len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == 'cgroup2':
            out.append((2, fields[4], fields[3]))
        elif tail[0] == 'cgroup' and 'cpu' in tail[2].split(','):
            out.append((1, fields[4], fields[3]))
    return out


def _own_cgroup_dirs():
    """The directories of this process's cgroup and its ancestors up to each mount's root,
    innermost first: [(version, dir), ...]."""
    text = _read(_PROC_SELF_CGROUP)
    if text is None:
        return []
    paths = {}
    for line in text.splitlines():
        parts = line.split(':', 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == '':
            paths[2] = path
        elif 'cpu' in controllers.split(','):
            paths[1] = path
    out = []
    for version, mount, root in _cgroup_mounts():
        path = paths.get(version)
        if path is None:
            continue
        # The path is relative to the hierarchy's root; the mount shows the subtree at root
        # (inside a cgroup namespace both read "/": the mount is the group itself).
        rel = os.path.relpath(path, root) if path.startswith(root) else '.'
        d = os.path.normpath(os.path.join(mount, rel))
        while True:
            out.append((version, d))
            if len(d) <= len(mount):
                break
            d = os.path.dirname(d)
    return out


def _cgroup_count():
    """The tightest CPU quota on this process's cgroup or an ancestor, in whole CPUs; None
    when no quota applies. A quota set on a parent (a SLURM job, a pod) limits its children."""
    best = None
    seen = set()
    for version, d in _own_cgroup_dirs():
        if d in seen:
            continue
        seen.add(d)
        if version == 2:
            text = _read(os.path.join(d, 'cpu.max'))
            n = _quota_cpus(*text.split()[:2]) if text and len(text.split()) >= 2 else None
        else:
            n = _quota_cpus(_read(os.path.join(d, 'cpu.cfs_quota_us')),
                            _read(os.path.join(d, 'cpu.cfs_period_us')))
        if n is not None and (best is None or n < best):
            best = n
    return best


def usable_cpu_count():
    """The CPUs this process can really use: the smallest of the CPUs in the system, the
    process's CPU affinity (taskset, SLURM's --cpus-per-task, numactl) and the cgroup CPU
    quota (cgroup v2 cpu.max or v1 cpu.cfs_quota_us/cpu.cfs_period_us, of the process's own
    cgroup or any ancestor: docker --cpus, Kubernetes limits, systemd CPUQuota). At least 1.

    loky.cpu_count() is the peer; this one also finds a quota set on a parent cgroup when the
    process is not in a cgroup namespace, and has no LOKY_MAX_CPU_COUNT override."""
    counts = [n for n in (os.cpu_count(), _affinity_count(), _cgroup_count()) if n]
    return max(1, min(counts)) if counts else 1


def default_pool_size():
    """Pool(processes=None)'s size: what the standard library of the running Python uses
    (os.process_cpu_count() from 3.13, so CPU affinity counts; os.cpu_count() before), or
    usable_cpu_count() when CPOOL_POOL_PROCESSES=usable is set in the environment."""
    choice = os.environ.get(POOL_SIZE_ENV, '')
    if choice == 'usable':
        return usable_cpu_count()
    if choice not in ('', 'default'):
        raise ValueError("%s must be 'usable' or 'default', not %r" % (POOL_SIZE_ENV, choice))
    if sys.version_info >= (3, 13):
        return os.process_cpu_count() or 1
    return os.cpu_count() or 1
