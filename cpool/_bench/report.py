"""What a run produces: medians and ratios per case, the text table, the JSON document and the chart."""
import json
import math
import statistics

SERIAL = 'serial'  # the plain loop (cpool._bench.serial): no pool at all

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
        smed = cells.get(SERIAL, {}).get('median')
        for cell in cells.values():
            cell['ratio'] = cell['median'] / bmed if bmed and cell['median'] is not None else None
            # the speed-up over the same code in a plain loop (when the run has one)
            cell['vs_serial'] = (cell['median'] / smed if smed and cell['median'] is not None
                                 else None)
    return results


def geomean(values):
    values = [v for v in values if v]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def headline(results, modules):
    """Geometric means of each module's ratio over the cases both it and the baseline ran."""
    out = {}
    for mod in modules[1:]:
        if mod == SERIAL:
            continue
        per_kind = {}
        for case in results.values():
            r = case['results'].get(mod, {}).get('ratio')
            if r:
                per_kind.setdefault(case['kind'], []).append(r)
        every = [r for rs in per_kind.values() for r in rs]
        if every:
            out[mod] = {'all': geomean(every), 'cases': len(every),
                        **{k: geomean(v) for k, v in per_kind.items()}}
        vs = [c['results'][mod]['vs_serial'] for c in results.values()
              if c['results'].get(mod, {}).get('vs_serial')]
        if vs and mod in out:
            out[mod]['vs_serial'] = geomean(vs)
            out[mod]['vs_serial_cases'] = len(vs)
    return out


def serial_cell(cell, limit):
    """'1.46x 73%': the speed-up over the plain loop and its fraction of the machine's limit
    (min(workers, CPUs)), or '' when the case has no plain-loop number."""
    v = cell.get('vs_serial')
    return '%.2fx %d%%' % (v, round(100 * v / limit)) if v else ''


def human(x):
    for div, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'k')):
        if x >= div:
            return '%.3g%s' % (x / div, suffix)
    return '%.3g' % x


def table(doc):
    meta, results, modules = doc['meta'], doc['cases'], doc['meta']['modules']
    base = modules[0]
    lines = [
        'cpool %s%s benchmark  %s' % (meta['cpool_version'],
                                      ' (%s)' % meta['cpool_commit'] if meta.get('cpool_commit') else '',
                                      meta['date']),
        'Python %s  %s  %d CPUs (%s)  pool size %d  rounds %d  scale %g' % (
            meta['python'], meta['platform'], meta['cpu_count'], meta['cpu_model'],
            meta['workers'], meta['rounds'], meta['scale']),
        'medians of throughput (higher is better); ratio = module / %s' % base,
    ]
    with_serial = SERIAL in modules
    limit = max(1, min(meta['workers'], meta['cpu_count']))
    if with_serial:
        lines.append('vs serial = module / the plain loop (no pool), then that speed-up as a share '
                     'of the limit min(workers, CPUs) = %d' % limit)
    lines.append('')
    shown = [m for m in modules if m != SERIAL] + ([SERIAL] if with_serial else [])
    head = ['case', 'unit']
    for mod in shown:  # the same columns per module as each row below
        head.append(mod)
        if mod not in (base, SERIAL):
            head.append('ratio')
        if with_serial and mod != SERIAL:
            head.append('vs serial')
    rows = []
    for name, case in results.items():
        row = [name, case['unit']]
        for mod in shown:
            cell = case['results'].get(mod, {'status': 'unsupported'})
            ok = cell['status'] == 'ok'
            row.append(human(cell['median']) if ok else NO_NUMBER[cell['status']])
            if mod not in (base, SERIAL):
                row.append('%.2fx' % cell['ratio'] if ok and cell['ratio'] else '')
            if with_serial and mod != SERIAL:
                row.append(serial_cell(cell, limit) if ok else '')
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
        if h.get('vs_serial'):
            lines.append('%s vs the plain loop: geometric mean %.2fx over %d cases (limit %dx)' % (
                mod, h['vs_serial'], h['vs_serial_cases'], limit))
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
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator
    from matplotlib.transforms import blended_transform_factory

    meta, results, modules = doc['meta'], doc['cases'], doc['meta']['modules']
    base, others = modules[0], modules[1:]
    spare = iter(OTHER_COLORS)
    colors = {m: PALETTE.get(m) or next(spare, '#888888') for m in others}

    # one bar (or one line of text) per module that ran the case; cases separated by a gap
    bars, ticks, sections, y, kind = [], [], [], 0.0, None
    for name, case in results.items():
        if case['kind'] != kind:
            y += 1.6 if kind is not None else 0.9
            kind = case['kind']
            sections.append((y - 1.0, 'micro cases' if kind == 'micro' else 'bioinformatics workloads'))
        rows = [(m, case['results'][m]) for m in others
                if case['results'].get(m, {}).get('status', 'unsupported') != 'unsupported']
        if not rows:
            rows = [(None, None)]
        ticks.append((y + (len(rows) - 1) / 2, name))
        for mod, cell in rows:
            bars.append((y, mod, cell))
            y += 1.0
        y += 0.55
    ratios = [c['ratio'] for _, _, c in bars if c and c.get('ratio')]
    lo, hi = min(ratios + [0.5]) / 1.5, max(ratios + [2.0]) * 1.6

    fig_h = 1.45 + 0.165 * y
    fig, ax = plt.subplots(figsize=(10, fig_h), dpi=130)
    top = 1.0 - 1.15 / fig_h
    fig.subplots_adjust(left=0.2, right=0.97, top=top, bottom=0.5 / fig_h)
    ax.set_xscale('log')
    ax.set_xlim(lo, hi)
    for yy, mod, cell in bars:
        if cell is None:
            continue
        r = cell.get('ratio')
        if r:
            ax.barh(yy, r - 1.0, left=1.0, height=0.82, color=colors[mod], edgecolor='none', zorder=2)
            ax.text(r * (1.03 if r >= 1 else 0.97), yy, ('%.2f×' if r < 10 else '%.1f×') % r,
                    va='center', ha='left' if r >= 1 else 'right', fontsize=7, color='#222222', zorder=3)
        else:
            ax.text(1.03, yy, '%s: %s' % (mod, NO_NUMBER[cell['status']].lower()), va='center',
                    ha='left', fontsize=7, color='#b03a2e', style='italic', zorder=3)
    left_margin = blended_transform_factory(fig.transFigure, ax.transData)
    for ys, label in sections:
        ax.text(0.015, ys, label.upper(), transform=left_margin, fontsize=7.5,
                color='#777777', fontweight='bold', va='center', ha='left')
    ax.axvline(1.0, color='#333333', lw=1.0, zorder=1)
    ax.set_yticks([t for t, _ in ticks])
    ax.set_yticklabels([n for _, n in ticks], fontsize=8.5)
    ax.set_ylim(y - 0.2, -0.2)
    ax.grid(axis='x', which='both', color='#e6e6e6', lw=0.6, zorder=0)
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: '%g×' % v))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.tick_params(axis='x', labelsize=8)
    ax.tick_params(axis='y', length=0)
    for side in ('top', 'right', 'left'):
        ax.spines[side].set_visible(False)
    ax.set_xlabel('throughput relative to %s (log scale; right of the line is faster)' % base, fontsize=8.5)
    inch = 1.0 / fig_h
    fig.text(0.015, 1 - 0.3 * inch, 'Speed-up over the standard library\'s multiprocessing'
             if base == 'multiprocessing' else 'Speed-up over %s' % base,
             fontsize=13, fontweight='bold', va='top')
    fig.text(0.015, 1 - 0.62 * inch, '%s · %s · Python %s · %d CPUs · pool size %d · median of %d '
             'round(s) at scale %g · %s' % (meta['platform'], meta['cpu_model'], meta['python'],
                                          meta['cpu_count'], meta['workers'], meta['rounds'],
                                          meta['scale'], meta['date']),
             fontsize=7.5, color='#555555', va='top')
    fig.legend(handles=[Patch(color=colors[m], label=m) for m in others], loc='upper left',
               bbox_to_anchor=(0.01, 1 - 0.78 * inch), ncol=len(others), fontsize=8.5,
               frameon=False, handlelength=1.2)
    fig.savefig(path)
    plt.close(fig)
