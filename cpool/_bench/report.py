"""What a run produces: medians and ratios per case, the text table, the JSON document and the chart."""
import json
import math
import statistics

# what a cell shows for a module without a number
NO_NUMBER = {'n/a': 'n/a', 'failed': 'FAILED', 'timeout': 'TIMEOUT', 'unsupported': '-'}


def summarize(results, modules):
    """Fill in each module's median and its ratio to the first module (the baseline), in place."""
    base = modules[0]
    for case in results.values():
        cells = case['results']
        for cell in cells.values():
            cell['median'] = statistics.median(cell['runs']) if cell['status'] == 'ok' else None
        bmed = cells.get(base, {}).get('median')
        for cell in cells.values():
            cell['ratio'] = cell['median'] / bmed if bmed and cell['median'] is not None else None
    return results


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def headline(results, modules):
    """Geometric means of each module's ratio over the cases both it and the baseline ran."""
    out = {}
    for mod in modules[1:]:
        per_kind = {}
        for case in results.values():
            r = case['results'].get(mod, {}).get('ratio')
            if r:
                per_kind.setdefault(case['kind'], []).append(r)
        every = [r for rs in per_kind.values() for r in rs]
        if every:
            out[mod] = {'all': geomean(every), 'cases': len(every),
                        **{k: geomean(v) for k, v in per_kind.items()}}
    return out


def human(x):
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if x >= div:
            return '%.3g%s' % (x / div, suffix)
    return '%.3g' % x


def table(doc):
    meta, results, modules = doc['meta'], doc['cases'], doc['meta']['modules']
    base = modules[0]
    lines = [
        'cpool %s benchmark  %s' % (meta['cpool_version'], meta['date']),
        'Python %s  %s  %d CPUs (%s)  pool size %d  rounds %d  scale %g' % (
            meta['python'], meta['platform'], meta['cpu_count'], meta['cpu_model'],
            meta['workers'], meta['rounds'], meta['scale']),
        'medians of throughput (higher is better); ratio = module / %s' % base,
        '',
    ]
    head = ['case', 'unit', base] + [h for m in modules[1:] for h in (m, 'ratio')]
    rows = []
    for name, case in results.items():
        row = [name, case['unit']]
        for mod in modules:
            cell = case['results'].get(mod, {'status': 'unsupported'})
            if cell['status'] == 'ok':
                row.append(human(cell['median']))
                if mod != base:
                    row.append('%.2fx' % cell['ratio'] if cell['ratio'] else '')
            else:
                row.append(NO_NUMBER[cell['status']])
                if mod != base:
                    row.append('')
        rows.append(row)
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(len(head))]

    def fmt(r):
        left = ['%-*s' % (w, c) for w, c in zip(widths[:2], r[:2])]
        right = ['%*s' % (w, c) for w, c in zip(widths[2:], r[2:])]
        return '  '.join(left + right).rstrip()

    lines.append(fmt(head))
    lines.append(fmt(['-' * w for w in widths]))
    kind = None
    for name, row in zip(results, rows):
        if results[name]['kind'] != kind and kind is not None:
            lines.append('')
        kind = results[name]['kind']
        lines.append(fmt(row))
    lines.append('')
    for mod, h in doc['headline'].items():
        parts = ', '.join('%s %.2fx' % (k, h[k]) for k in ('micro', 'workload') if k in h)
        lines.append('%s vs %s: geometric mean %.2fx over %d cases (%s)' % (
            mod, base, h['all'], h['cases'], parts))
    problems = [(name, mod, cell) for name, case in results.items()
                for mod, cell in case['results'].items() if cell['status'] in ('n/a', 'failed', 'timeout')]
    if problems:
        lines.append('')
        lines.append('not measured:')
        for name, mod, cell in problems:
            lines.append('  %s / %s: %s: %s' % (name, mod, cell['status'], cell.get('error', '')))
    return '\n'.join(lines) + '\n'


def write_json(doc, path):
    with open(path, 'w') as f:
        json.dump(doc, f, indent=1)
        f.write('\n')


PALETTE = {'cpool': '#0b7a75'}
OTHER_COLORS = ['#e07a5f', '#81b29a', '#f2cc8f', '#3d405b', '#9c89b8', '#b8b8b8']


def chart(doc, path):
    """Horizontal bars of each module's speed-up over the baseline per case, on a log axis."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    meta, results, modules = doc['meta'], doc['cases'], doc['meta']['modules']
    base, others = modules[0], modules[1:]
    colors, spare = {}, iter(OTHER_COLORS)
    for mod in others:
        own = PALETTE.get(mod)
        colors[mod] = own if own else next(spare, '#888888')

    names = list(results)
    # keep only the modules that ran something, so empty columns do not take room
    shown = [m for m in others if any(results[c]['results'].get(m, {}).get('status') != 'unsupported'
                                      for c in names)] or others
    band = 0.8 / max(1, len(shown))
    ratios = [c['results'][m]['ratio'] for c in results.values() for m in shown
              if c['results'].get(m, {}).get('ratio')]
    lo = min(ratios + [1.0]) / 1.6
    hi = max(ratios + [1.0]) * 1.9

    height = 1.2 + 0.28 * len(names) * max(1, len(shown)) ** 0.6 + 0.9
    fig, ax = plt.subplots(figsize=(10, height), dpi=130)
    ax.set_xscale('log')
    ax.set_xlim(lo, hi)
    ypos, labels, y, kind = [], [], 0.0, None
    for name in names:
        if kind is not None and results[name]['kind'] != kind:
            y += 0.6  # a gap between micro cases and workloads
        kind = results[name]['kind']
        ypos.append(y)
        labels.append(name)
        y += 1.0
    for k, mod in enumerate(shown):
        off = (k - (len(shown) - 1) / 2) * band
        for name, yc in zip(names, ypos):
            cell = results[name]['results'].get(mod, {'status': 'unsupported'})
            yy = yc + off
            if cell.get('ratio'):
                r = cell['ratio']
                ax.barh(yy, r - 1.0, left=1.0, height=band * 0.9, color=colors[mod],
                        alpha=1.0 if r >= 1 else 0.55, edgecolor='none', zorder=2)
                ax.text(r * (1.04 if r >= 1 else 0.96), yy, '%.2f×' % r if r < 10 else '%.1f×' % r,
                        va='center', ha='left' if r >= 1 else 'right', fontsize=7.5,
                        color='#222222', zorder=3)
            elif cell['status'] != 'unsupported':
                ax.text(1.04, yy, NO_NUMBER[cell['status']].lower(), va='center', ha='left',
                        fontsize=7.5, color='#b03a2e', style='italic', zorder=3)
    ax.axvline(1.0, color='#333333', lw=1.0, zorder=1)
    ax.set_yticks(ypos)
    ax.set_yticklabels(labels, fontsize=9)
    ax.invert_yaxis()
    ax.grid(axis='x', which='major', color='#dddddd', lw=0.8, zorder=0)
    ax.grid(axis='x', which='minor', color='#eeeeee', lw=0.5, zorder=0)
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: '%g×' % v))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for side in ('top', 'right', 'left'):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis='y', length=0)
    ax.set_xlabel('throughput relative to %s (log scale; right of the line is faster)' % base, fontsize=9)
    fig.suptitle('Speed-up over the standard library\'s %s' % base if base == 'multiprocessing'
                 else 'Speed-up over %s' % base, fontsize=13, fontweight='bold', x=0.02, ha='left')
    ax.set_title('%s · Python %s · %d CPUs · pool size %d · medians of %d round(s) · %s' % (
        meta['platform'], meta['python'], meta['cpu_count'], meta['workers'], meta['rounds'],
        meta['date']), fontsize=8.5, color='#555555', loc='left')
    ax.legend(handles=[Patch(color=colors[m], label=m) for m in shown], loc='lower right',
              fontsize=8.5, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
