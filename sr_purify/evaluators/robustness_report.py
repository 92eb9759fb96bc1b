"""The robustness evaluation's report: the table (every purified number beside its adaptive
counterpart) with the adaptive attacker's budget under it, the worst case per threat model,
settings and provenance lines, the accuracy-against-eps plot, the image grid, and the files they
go to (robustness_table.md, results.json, robustness_plot.png, robustness_grid.png, TensorBoard
scalars)."""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from sr_purify import reporting
from sr_purify.evaluators.robustness import Row
from sr_purify.evaluators.robustness_checks import ATTACKERS, sanity_lines

# ---------------------------------------------------------------------------------------------
# Table, plot, grid.


def _formatter(percent: bool):
    return (lambda v: '-' if v is None else f'{100 * v:.1f}') if percent else (lambda v: v)


def table(results: Dict[str, Any], percent: bool = True) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows): purifier, clean, clean+P, then per attack (eps > 0) oblivious | adaptive |
    transfer. Accuracies in percent (strings) or fractions."""
    fmt = _formatter(percent)
    attack_labels = [a['label'] for a in results['attacks'] if a['eps'] > 0]
    header = ['purifier', 'clean', 'clean+P']
    for label in attack_labels:
        header += [f'{label} obl', 'adapt', 'transfer']
    rows = []
    for name, r in results['purifiers'].items():
        row = [name, fmt(results['clean']), fmt(r['clean'])]
        for label in attack_labels:
            for attacker in ATTACKERS:
                row.append(fmt(None if r[attacker] is None else r[attacker][label]))
        rows.append(row)
    return header, rows


def worst_table(results: Dict[str, Any], percent: bool = True) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows): purifier, then per threat model (norm, eps) the worst case of each
    attacker: correct on C∘P clean and under every listed attack of that norm and eps."""
    fmt = _formatter(percent)
    threats = [t['label'] for t in results['threat_models']]
    header = ['purifier']
    for label in threats:
        header += [f'worst {label} obl', 'adapt', 'transfer']
    rows = []
    for name, r in results['purifiers'].items():
        row = [name]
        for label in threats:
            for attacker in ATTACKERS:
                worst = r['worst_case'][attacker]
                row.append(fmt(None if worst is None else worst[label]))
        rows.append(row)
    return header, rows


# AutoAttack's APGD budget (Croce & Hein 2020): 100 iterations.
AUTOATTACK_STEPS = 100


def _member_text(cfg: Dict[str, Any]) -> str:
    name = cfg['name'] + ('-' + cfg.get('loss', 'ce') if cfg['name'] == 'apgd' else '')
    restarts = cfg['restarts']
    return f'{name} x{cfg["steps"]} ({restarts} restart{"" if restarts == 1 else "s"})'


def budget_line(results: Dict[str, Any]) -> str:
    """The adaptive attacker's budget, printed under the table."""
    adaptive = results['adaptive']
    members = ['the listed attack'] + [_member_text(c) for c in adaptive['attacks']]
    line = (
        f"Adaptive attacker budget: at each attack's norm and eps, {' + '.join(members)}, "
        f'per-sample worst case; EOT over {adaptive["eot_samples"]} draws for random purifiers; '
        'BPDA (identity backward) for non-differentiable ones (jpeg).'
    )
    apgd = [c['steps'] for c in adaptive['attacks'] if c['name'] == 'apgd']
    short = [steps for steps in apgd if steps < AUTOATTACK_STEPS]
    if not apgd:
        line += ' No APGD: weaker than AutoAttack.'
    elif short:
        line += (
            f" Reduced budget: {max(short)} APGD iterations, not AutoAttack's "
            f'{AUTOATTACK_STEPS} (the CPU default; robustness,full runs {AUTOATTACK_STEPS}).'
        )
    return line


_LINESTYLES = {'oblivious': '-', 'adaptive': '--', 'transfer': ':'}
_MARKERS = {'oblivious': 'o', 'adaptive': 's', 'transfer': '^'}


def _plot_groups(results) -> List[Tuple[str, List[Dict[str, Any]]]]:
    """(panel title, its attacks by eps) per (name, norm, steps) with eps > 0, L-inf first."""
    groups: Dict[Tuple, List] = {}
    for a in results['attacks']:
        if a['eps'] > 0:
            groups.setdefault((a['name'], a['norm'], a['steps']), []).append(a)
    out = []
    for name, norm, steps in sorted(groups, key=lambda k: k[1] != 'linf'):  # Stable: in order.
        title = f'{name} {norm}' + ('' if name == 'fgsm' else f' x{steps}')
        out.append((title, sorted(groups[(name, norm, steps)], key=lambda a: a['eps'])))
    return out


def plot(results: Dict[str, Any]) -> np.ndarray:
    """Accuracy (%) against eps: one panel per attack (name, norm, steps), one line per purifier
    (colour) and attacker (line style); eps 0 is clean C∘P. An RGB uint8 (H, W, 3) image."""
    # Figure + Agg canvas, not pyplot: no global state, no display, safe in a training job.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    groups = _plot_groups(results)
    names = list(results['purifiers'])
    colors = colormaps['tab10'].colors
    attackers = [
        a for a in ATTACKERS if any(r[a] is not None for r in results['purifiers'].values())
    ]
    panels = max(len(groups), 1)
    fig = Figure(figsize=(4.2 * panels + 1.8, 3.6), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, panels, squeeze=False)[0]
    for ax, (title, group) in zip(axes, groups):
        linf = group[0]['norm'] == 'linf'
        scale = 255.0 if linf else 1.0  # L-inf eps read as k/255, as in the table.
        xs = [0.0] + [a['eps'] * scale for a in group]
        for i, name in enumerate(names):
            r = results['purifiers'][name]
            for attacker in attackers:
                if r[attacker] is None:
                    continue
                ys = [r['clean']] + [r[attacker][a['label']] for a in group]
                ax.plot(
                    xs,
                    [100 * y for y in ys],
                    color=colors[i % len(colors)],
                    linestyle=_LINESTYLES[attacker],
                    marker=_MARKERS[attacker],
                    markersize=4,
                    linewidth=1.6,
                )
        ax.set_title(title)
        ax.set_xticks(xs, [f'{x:g}' for x in xs])
        ax.set_xlabel('eps (/255, L-inf)' if linf else f'eps ({group[0]["norm"]})')
        ax.set_ylabel('accuracy (%)')
        ax.set_ylim(-2, 102)
        ax.grid(True, color='0.9')
    if not groups:
        axes[0].text(0.5, 0.5, 'no attack with eps > 0', ha='center', va='center')
        axes[0].set_axis_off()
    # One legend for all panels: colours name the purifiers, line styles the attackers.
    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(names))]
    handles += [
        Line2D([], [], color='black', linestyle=_LINESTYLES[a], marker=_MARKERS[a], markersize=4)
        for a in attackers
    ]
    fig.legend(handles, names + attackers, loc='outside right center', fontsize='small')
    fig.suptitle('Accuracy of C∘P against eps (eps 0 = clean C∘P)')
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


GRID_COLUMNS = (
    'clean',
    'P(clean)',
    'oblivious adv',
    'P(oblivious adv)',
    'adaptive adv',
    'P(adaptive adv)',
)


def grid(samples: Dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """Per purifier, per sample: clean | P(clean) | oblivious adv | P(it) | adaptive adv | P(it);
    the purifier's name labels each of its rows."""
    clean = samples['clean']
    up = 3 if clean.shape[1] <= 64 else 1
    size = (clean.shape[1] * up, clean.shape[2] * up)
    rows, row_labels = [], []
    for r, name in enumerate(names):
        s = samples['rows'][r]
        if not s:
            continue
        for i in range(len(clean)):
            tiles = [
                clean[i],
                s['purified'][i],
                s['oblivious'][i],
                s['oblivious_purified'][i],
                s['adaptive'][i],
                s['adaptive_purified'][i],
            ]
            rows.append([reporting.nearest_upscale(t, size) for t in tiles])
            row_labels.append(name)
    return reporting.image_grid(rows, labels=GRID_COLUMNS, row_labels=row_labels)


# ---------------------------------------------------------------------------------------------
# The job.


def settings_lines(results: Dict[str, Any], transfer_note: str) -> List[str]:
    lines = []
    for a in results['attacks']:
        step = (
            'default rule'
            if a['step_size'] is None
            else (
                f'{a["step_size"] * 255:.3g}/255' if a['norm'] == 'linf' else f'{a["step_size"]:g}'
            )
        )
        lines.append(
            f'- {a["label"]}: step {step}, random start {a["config"]["random_start"]}, '
            f'restarts {a["config"]["restarts"]}; adaptive: {", ".join(a["adaptive"])}'
        )
    lines.append(
        f'- adaptive: gradients through C∘P end to end; BPDA (identity backward) for '
        f'non-differentiable stages (jpeg); EOT over {results["adaptive"]["eot_samples"]} '
        f"draws for random purifiers; at each attack's norm and eps it runs the attack itself "
        + (
            'and '
            + ', '.join(_member_text(c) for c in results['adaptive']['attacks'])
            + ' (random start as configured), and a sample counts only if it resists all'
            if results['adaptive']['attacks']
            else 'only'
        )
    )
    lines.append(f'- transfer: {transfer_note}')
    z = results.get('eps0_attack')
    if z:
        lines.append(
            f'- sanity: {z["label"]} (the first attack at eps = 0; the adaptive attacker all of '
            f'{", ".join(z.get("adaptive", [z["label"]]))}) by every attacker on the first '
            f'{z["examples"]} images, compared sample by sample with an independent forward '
            'pass of C∘P'
        )
    lines.append(
        '- worst case, per threat model (norm, eps), never across them: a sample counts only '
        'if C∘P is right on it clean and under every listed attack of that norm and eps by '
        'that attacker'
    )
    return lines


def report(
    workdir: str,
    results: Dict[str, Any],
    samples,
    rows: Sequence[Row],
    config,
    title: str,
    writer=None,
) -> str:
    """Prints the table, settings and sanity lines; writes the md, json, plot and grid."""
    header, table_rows = table(results)
    budget = budget_line(results)
    text = reporting.log_table(title, header, table_rows)
    if reporting.is_writer():
        print(budget, flush=True)  # The budget belongs to the table: printed right under it.
    worst_header, worst_rows = worst_table(results)
    worst_title = 'Worst case per threat model (correct clean and under every attack of it), %'
    worst_text = reporting.log_table(worst_title, worst_header, worst_rows)
    notes = settings_lines(results, results.get('transfer_note', ''))
    sources = [
        f'- {r.label}: {r.purifier.kind} ({r.source}; '
        f'{"random" if r.purifier.random else "deterministic"}, '
        f'{"differentiable" if r.purifier.differentiable else "BPDA"})'
        for r in rows
    ]
    sanity = sanity_lines(results['sanity'])
    if reporting.is_writer():
        print('\n'.join(notes + sanity) + '\n', flush=True)
    md = '\n'.join(
        [
            f'# {title}',
            '',
            text,
            '',
            budget,
            '',
            f'## {worst_title}',
            '',
            worst_text,
            '',
            'Settings:',
            *notes,
            '',
            'Purifiers:',
            *sources,
            '',
            'Sanity checks:',
            *sanity,
            '',
            'Plot robustness_plot.png: accuracy against eps per attack, a line per purifier '
            'and attacker (eps 0 = clean C∘P). Grid robustness_grid.png, per purifier and '
            'sample: clean | P(clean) | oblivious adversarial | P(it) | adaptive '
            f'adversarial | P(it), attack {samples.get("attack", "")}.',
        ]
    )
    reporting.write_text(workdir, 'robustness_table.md', md)
    reporting.update_results(workdir, 'robustness', results)
    writer = writer or reporting.create_writer(workdir)
    scalars = {}
    for name, r in results['purifiers'].items():
        scalars[f'robustness/{name}/clean'] = r['clean']
        for attacker in ATTACKERS:
            for threat, value in (r['worst_case'][attacker] or {}).items():
                tag = threat.replace('/', '_').replace(' ', '_')
                scalars[f'robustness/{name}/worst_{attacker}/{tag}'] = value
    writer.write_scalars(0, scalars)
    reporting.write_grid(workdir, 'robustness_plot.png', plot(results), writer)
    if samples.get('clean') is not None:
        reporting.write_grid(
            workdir, 'robustness_grid.png', grid(samples, [r.label for r in rows]), writer
        )
    writer.flush()
    return md
