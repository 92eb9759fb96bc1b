"""The certify evaluation's report: the table (certified accuracy at each radius, per noise level
and denoiser), the adaptive attack's sanity lines, the certified-accuracy-against-radius plot,
and the files they go to (certify_table.md, the `certify` section of results.json,
certify_plot.png, TensorBoard scalars). The per-image CSVs are certify.py's."""

from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from sr_purify import reporting
from sr_purify.evaluators import certify


def table(results: Dict[str, Any], percent: bool = True) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows): sigma, denoiser, certified accuracy at each radius, abstentions, mean
    radius of the right predictions, images/s. Accuracies in percent (strings) or fractions."""
    fmt = (lambda v: f'{100 * v:.1f}') if percent else (lambda v: v)
    radii = [f'{r:g}' for r in results['settings']['radii']]
    header = ['sigma', 'denoiser'] + [f'r={r}' for r in radii]
    header += ['abstain', 'mean radius', 'images/s']
    rows = []
    for e in results['entries']:
        rate = e['images_per_s']
        rows.append(
            [f'{e["sigma"]:g}', e['denoiser']]
            + [fmt(e['certified'][r]) for r in radii]
            + [fmt(e['abstain']), f'{e["mean_radius_correct"]:.3f}']
            + ['-' if rate is None else f'{rate:.3g}']
        )
    return header, rows


def attack_table(results: Dict[str, Any]) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows) of the smoothed attack: certified vs empirical accuracy per radius."""
    header = ['sigma', 'denoiser', 'radius', 'certified', 'empirical', 'broken certs', 'check']
    rows = []
    for e in results['entries']:
        for a in (e.get('attack') or {}).get('radii', []):
            ok = a['empirical'] >= a['certified']
            rows.append(
                [
                    f'{e["sigma"]:g}',
                    e['denoiser'],
                    f'{a["radius"]:g}',
                    f'{100 * a["certified"]:.1f}',
                    f'{100 * a["empirical"]:.1f}',
                    a['violations'],
                    'ok' if ok else 'BROKEN',
                ]
            )
    return header, rows


def curve(certs: Sequence[certify.Certificate], grid: np.ndarray) -> np.ndarray:
    """Certified accuracy at every radius of `grid`."""
    return np.asarray(
        certify.certified_accuracy(
            [c.prediction for c in certs], [c.label for c in certs], [c.radius for c in certs], grid
        )
    )


_LINESTYLES = ('-', '--', ':', '-.')


def plot(results: Dict[str, Any], per_image: Dict[Tuple[float, str], Sequence]) -> np.ndarray:
    """Certified accuracy (%) against the L2 radius: one curve per (sigma, denoiser), colour
    per denoiser and line style per sigma; crosses mark the empirical accuracy under the
    smoothed attack. An RGB uint8 (H, W, 3) image."""
    # Figure + Agg canvas, not pyplot: no global state, no display.
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sigmas = list(dict.fromkeys(e['sigma'] for e in results['entries']))
    names = list(dict.fromkeys(e['denoiser'] for e in results['entries']))
    colors = colormaps['tab10'].colors
    top = max([c.radius for certs in per_image.values() for c in certs] + [1.0])
    grid = np.linspace(0.0, 1.05 * top, 256)
    fig = Figure(figsize=(7.0, 4.2), dpi=100, layout='constrained')
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for e in results['entries']:
        color = colors[names.index(e['denoiser']) % len(colors)]
        style = _LINESTYLES[sigmas.index(e['sigma']) % len(_LINESTYLES)]
        certs = per_image[(e['sigma'], e['denoiser'])]
        ax.plot(
            grid,
            100 * curve(certs, grid),
            color=color,
            linestyle=style,
            linewidth=1.6,
            label=f'{e["denoiser"]}, sigma {e["sigma"]:g}',
        )
        for a in (e.get('attack') or {}).get('radii', []):
            ax.plot(a['radius'], 100 * a['empirical'], 'x', color=color, markersize=7)
    ax.set_xlabel('L2 radius')
    ax.set_ylabel('certified accuracy (%)')
    ax.set_ylim(-2, 102)
    ax.grid(True, color='0.9')
    ax.legend(fontsize='small', loc='upper right')
    ax.set_title('Certified accuracy of the smoothed classifier (x: empirical under attack)')
    fig.canvas.draw()
    return np.ascontiguousarray(np.asarray(fig.canvas.buffer_rgba())[..., :3])


def settings_lines(results: Dict[str, Any]) -> List[str]:
    s = results['settings']
    a = s['attack']
    lines = [
        f'- CERTIFY (Cohen et al. 2019): n0 = {s["n0"]} selection and n = {s["n"]} estimation '
        f'draws per image, alpha = {s["alpha"]:g}, noise batch {s["batch"]}, seed {s["seed"]}; '
        'an abstention counts as wrong',
        '- certified accuracy at r: prediction right and certified radius >= r',
    ]
    if a['steps'] and a['images']:
        lines.append(
            f'- attack: L2 PGD on the soft smoothed classifier ({a["steps"]} steps, '
            f'{a["samples"]} noise draws per step, Madry step 2.5 r / steps) on the first '
            f'{a["images"]} images; empirical = majority vote of {a["n"]} draws at the '
            'attacked image'
        )
    else:
        lines.append('- attack: not run (attack.steps = 0 or attack.num_images = 0)')
    return lines


def report(
    workdir: str,
    results: Dict[str, Any],
    per_image: Dict[Tuple[float, str], Sequence],
    title: str,
    writer=None,
) -> str:
    """Prints the tables and sanity lines; writes the md, json and plot."""
    header, rows = table(results)
    text = reporting.log_table(title, header, rows)
    attack_text = ''
    a_header, a_rows = attack_table(results)
    if a_rows:
        attack_text = reporting.log_table(
            'Smoothed attack vs certificate (accuracy %)', a_header, a_rows
        )
    notes = settings_lines(results)
    sanity = certify.sanity_lines(results['sanity'])
    sources = [f'- {e["denoiser"]}: {e["kind"]} ({e["source"]})' for e in results['entries']]
    sources = list(dict.fromkeys(sources))
    if reporting.is_writer():
        print('\n'.join(notes + sanity) + '\n', flush=True)
    parts = [f'# {title}', '', text, '']
    if a_rows:
        parts += ['Smoothed attack vs certificate (accuracy %):', '', attack_text, '']
    parts += ['Settings:', *notes, '', 'Denoisers:', *sources, '', 'Sanity checks:', *sanity, '']
    csvs = ', '.join(e['csv'] for e in results['entries'])
    parts.append(
        'Plot certify_plot.png: certified accuracy against the L2 radius, a curve per sigma and '
        f'denoiser. Per-image rows: {csvs} (index,label,prediction,radius,correct; prediction '
        '-1 = abstain).'
    )
    md = '\n'.join(parts)
    reporting.write_text(workdir, 'certify_table.md', md)
    reporting.update_results(workdir, 'certify', results)
    writer = writer or reporting.create_writer(workdir)
    scalars = {}
    for e in results['entries']:
        for r, acc in e['certified'].items():
            scalars[f'certify/sigma{e["sigma"]:g}/{e["denoiser"]}/r{r}'] = acc
    writer.write_scalars(0, scalars)
    reporting.write_grid(workdir, 'certify_plot.png', plot(results, per_image), writer)
    writer.flush()
    return md
