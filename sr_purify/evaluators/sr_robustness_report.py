"""The SR robustness evaluation's report: the attack table (clean, attacked and the drop per
model, attack and eps, transfer included), the defence table (clean cost, oblivious and adaptive
drops), the PSNR-against-eps plot, the image grid, and the files they go to
(sr_robustness_table.md, the `sr_robustness` section of results.json, sr_robustness_plot.png,
sr_robustness_grid.png)."""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from sr_purify import reporting

ATTACK_HEADER = [
    'dataset',
    'model',
    'attack',
    'eps',
    'clean PSNR',
    'attacked PSNR',
    'drop',
    'PSNR(f(x+d), f(x))',
]
DEFENCE_HEADER = [
    'dataset',
    'model',
    'defence',
    'clean PSNR',
    'clean cost',
    'eps',
    'oblivious drop',
    'adaptive drop',
    'oblivious PSNR(D(x+d), D(x))',
    'adaptive PSNR(D(x+d), D(x))',
]


def attack_rows(results: Dict[str, Any]) -> List[List[Any]]:
    """Rows of ATTACK_HEADER: every model under the basic and universal attacks, then transfer."""
    rows = []
    for set_name, entry in results['datasets'].items():
        for name, m in entry['models'].items():
            for attack in ('basic', 'universal'):
                for label, r in m.get(attack, {}).items():
                    rows.append(
                        [
                            set_name,
                            name,
                            attack,
                            label,
                            m['clean'],
                            r['psnr_hr'],
                            r['drop'],
                            r['psnr_change'],
                        ]
                    )
        for t in entry['transfer'].values():
            for attack in ('basic', 'universal'):
                for label, r in t.get(attack, {}).items():
                    rows.append(
                        [
                            set_name,
                            t['target'],
                            f'{attack} from {t["source"]}',
                            label,
                            t['clean'],
                            r['psnr_hr'],
                            r['drop'],
                            r['psnr_change'],
                        ]
                    )
    return rows


def defence_rows(results: Dict[str, Any]) -> List[List[Any]]:
    """Rows of DEFENCE_HEADER: per model 'none' (the basic attack on f) then each defence."""
    rows = []
    for set_name, entry in results['datasets'].items():
        for name, m in entry['models'].items():
            if not m['defences']:
                continue
            for label, r in m['basic'].items():
                rows.append(
                    [
                        set_name,
                        name,
                        'none',
                        m['clean'],
                        0.0,
                        label,
                        r['drop'],
                        r['drop'],
                        r['psnr_change'],
                        r['psnr_change'],
                    ]
                )
            for d_name, d in m['defences'].items():
                for label in d['oblivious']:
                    ob, ad = d['oblivious'][label], d['adaptive'][label]
                    rows.append(
                        [
                            set_name,
                            name,
                            d_name,
                            d['clean'],
                            d['cost'],
                            label,
                            ob['drop'],
                            ad['drop'],
                            ob['psnr_change'],
                            ad['psnr_change'],
                        ]
                    )
    return rows


def plot(results: Dict[str, Any]) -> np.ndarray:
    """PSNR against eps, one panel per set: top PSNR(f(x + delta), HR) (eps 0 = clean), bottom
    PSNR(f(x + delta), f(x)); a colour per model, a line style per attack (transfer dotted). An
    RGB uint8 (H, W, 3) image."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sets = list(results['datasets'])
    eps = results['eps_255']
    order = np.argsort(eps)
    xs = [eps[i] for i in order]
    labels = [results['eps_labels'][i] for i in order]
    colors = colormaps['tab10'].colors
    model_names = list(results['models'])
    styles = {'basic': ('-', 'o'), 'universal': ('--', 's'), 'transfer': (':', '^')}
    fig = Figure(figsize=(5.0 * len(sets) + 2.2, 7.0), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, len(sets), squeeze=False)
    used = set()
    for c, set_name in enumerate(sets):
        entry = results['datasets'][set_name]
        lines: List[Tuple[str, str, float, Dict[str, Any]]] = []
        for name, m in entry['models'].items():
            for attack in ('basic', 'universal'):
                if attack in m:
                    lines.append((name, attack, m['clean'], m[attack]))
        for t in entry['transfer'].values():
            lines.append((t['target'], 'transfer', t['clean'], t['basic']))
        for name, attack, clean, by_eps in lines:
            used.add(attack)
            color = colors[model_names.index(name) % len(colors)]
            style, marker = styles[attack]
            kw = dict(color=color, linestyle=style, marker=marker, markersize=4, linewidth=1.5)
            top = [by_eps[label]['psnr_hr'] for label in labels]
            if 0.0 not in xs:  # eps 0 is the clean PSNR.
                axes[0, c].plot([0.0] + xs, [clean] + top, **kw)
            else:
                axes[0, c].plot(xs, top, **kw)
            # PSNR(f(x), f(x)) is inf: the lower panel starts at the first eps > 0.
            low = [(x, by_eps[label]['psnr_change']) for x, label in zip(xs, labels) if x > 0]
            axes[1, c].plot([p[0] for p in low], [p[1] for p in low], **kw)
        axes[0, c].set_title(f'{set_name} x{results["scale"]}: PSNR(f(x+d), HR)')
        axes[1, c].set_title(f'{set_name}: PSNR(f(x+d), f(x))')
        for r in range(2):
            axes[r, c].set_xlabel('eps (/255, L-inf)')
            axes[r, c].set_ylabel('PSNR (dB, Y)')
            axes[r, c].grid(True, color='0.9')
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[i % len(colors)], lw=2) for i in range(len(model_names))]
    names = list(model_names)
    for attack, (style, marker) in styles.items():
        if attack in used:
            handles.append(Line2D([], [], color='black', linestyle=style, marker=marker))
            names.append(
                'transfer (basic, from the other model)' if attack == 'transfer' else attack
            )
    fig.legend(handles, names, loc='outside right center', fontsize='small')
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


GRID_MIN_TILE = 96  # Pixels; smaller crops are pixel-replicated up to this.
GRID_COLUMNS = ('clean LR', 'perturbation (magnified)', 'SR of clean', 'SR of attacked', 'HR')


def _crop(a: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    return a[y : y + size, x : x + size]


def grid(samples: Dict[str, Any], crop: int = 48) -> np.ndarray:
    """Per model: clean LR | perturbation (0.5 + delta / (2 eps)) | SR of clean | SR of attacked
    | HR, centre crops of `crop` LR pixels, LR tiles pixel-replicated to the HR size."""
    g = samples['grid']
    scale, eps = g['scale'], g['eps']
    rows, row_labels = [], []
    for name, a in g['rows']:
        x = np.asarray(a['x'])[0]
        h, w = x.shape[:2]
        c = min(crop, h, w)
        y0, x0 = (h - c) // 2, (w - c) // 2
        size = (c * scale, c * scale)
        lr = _crop(x, y0, x0, c)
        delta = _crop(np.asarray(a['x_adv'])[0] - x, y0, x0, c)
        magnified = 0.5 + delta / (2 * eps) if eps > 0 else np.full_like(delta, 0.5)
        hr = _crop(np.asarray(a['hr']), y0 * scale, x0 * scale, c * scale)
        tiles = [
            reporting.nearest_upscale(lr, size),
            reporting.nearest_upscale(np.clip(magnified, 0, 1), size),
            _crop(np.asarray(a['clean'])[0], y0 * scale, x0 * scale, c * scale),
            _crop(np.asarray(a['attacked'])[0], y0 * scale, x0 * scale, c * scale),
            hr,
        ]
        up = max(1, -(-GRID_MIN_TILE // (c * scale)))  # Small crops: room for the labels.
        big = (c * scale * up, c * scale * up)
        tiles = [reporting.nearest_upscale(t, big) if up > 1 else t for t in tiles]
        rows.append([t[..., 0] if t.ndim == 3 and t.shape[-1] == 1 else t for t in tiles])
        row_labels.append(name)
    return reporting.image_grid(rows, labels=GRID_COLUMNS, row_labels=row_labels)


def notes(results: Dict[str, Any]) -> List[str]:
    s = results['settings']
    step = 'eps / steps' if s['step_size'] is None else f'{255 * s["step_size"]:.3g}/255'
    u_step = (
        'eps / steps'
        if s['universal_step_size'] is None
        else f'{255 * s["universal_step_size"]:.3g}/255'
    )
    lines = [
        f'- PSNR on Y, {results["scale"]} pixels shaved, outputs quantised to 8 bits; means of '
        'per-image PSNR; drop = clean PSNR - attacked PSNR (against HR)',
        f'- basic: Choi et al. 2019, L-inf, {s["steps"]} steps of {step}, random start, each '
        'image at its own size',
    ]
    if s['universal_steps'] > 0:
        lines.append(
            f'- universal: one {s["universal_patch"]}x{s["universal_patch"]}x3 LR patch per set '
            f"and eps, tiled from each image's top-left corner, {s['universal_steps']} steps "
            f'of {u_step}'
        )
    if results['transfer']:
        lines.append(
            f"- transfer ({', '.join(results['transfer'])}): the source model's perturbations fed "
            "to the target; drop against the target's clean PSNR"
        )
    for name, d in results['defences'].items():
        settings = ', '.join(
            f'{k} {v:g}' if isinstance(v, (int, float)) else f'{k} {v}'
            for k, v in d['settings'].items()
        )
        how = (
            f'random: EOT over {s["eot_draws"]} draws, exact gradients'
            if d['random']
            else 'deterministic: exact gradients'
        )
        lines.append(
            f'- defence {name}{f" ({settings})" if settings else ""}: oblivious = basic attack on '
            f'f fed to D∘f; adaptive = basic attack on D∘f ({s["adaptive_steps"] or s["steps"]} '
            f"steps; {how}); drop against D∘f's clean PSNR, cost = clean of f - clean of D∘f"
        )
    return lines


def report(
    workdir: str,
    results: Dict[str, Any],
    samples: Dict[str, Any],
    title: str,
    grid_crop: int = 48,
    writer=None,
) -> str:
    """Prints the tables, writes sr_robustness_table.md, results.json, the plot and the grid."""
    attack_table = reporting.log_table(title, ATTACK_HEADER, attack_rows(results))
    d_rows = defence_rows(results)
    defence_table = (
        reporting.log_table(f'{title}: defences', DEFENCE_HEADER, d_rows) if d_rows else ''
    )
    lines = notes(results)
    if reporting.is_writer():
        print('\n'.join(lines) + '\n', flush=True)
    parts = [f'# {title}', '', attack_table, '']
    if defence_table:
        parts += ['Defences (drops in dB, each against its own clean PSNR):', '', defence_table, '']
    parts += ['Settings:', *lines, '', 'Models:']
    parts += [f'- {name}: {m["source"]}' for name, m in results['models'].items()]
    parts += [
        '',
        'Plot sr_robustness_plot.png: PSNR against eps per set and model. Grid '
        'sr_robustness_grid.png: clean LR | perturbation (0.5 + delta / (2 eps)) | SR of clean | '
        'SR of attacked | HR, basic attack'
        + (
            f' at {samples["grid"]["eps_label"]} on {samples["grid"]["image"]}'
            if samples.get('grid')
            else ''
        )
        + '.',
    ]
    md = '\n'.join(parts)
    reporting.write_text(workdir, 'sr_robustness_table.md', md)
    reporting.update_results(workdir, 'sr_robustness', results)
    writer = writer or reporting.create_writer(workdir)
    reporting.write_grid(workdir, 'sr_robustness_plot.png', plot(results), writer)
    if samples.get('grid'):
        reporting.write_grid(workdir, 'sr_robustness_grid.png', grid(samples, grid_crop), writer)
    writer.flush()
    return md


def summary_rows(results: Dict[str, Any], models: Sequence[str]) -> List[List[Any]]:
    """The benchmark's rows: per set, model and eps: the drop with no defence, then per defence
    its clean cost and its oblivious and adaptive drops."""
    rows = []
    for set_name, entry in results['datasets'].items():
        for name in models:
            m = entry['models'][name]
            for label, r in m['basic'].items():
                rows.append([set_name, name, label, 'none', 0.0, r['drop'], r['drop']])
                for d_name, d in m['defences'].items():
                    rows.append(
                        [
                            set_name,
                            name,
                            label,
                            d_name,
                            d['cost'],
                            d['oblivious'][label]['drop'],
                            d['adaptive'][label]['drop'],
                        ]
                    )
    return rows
