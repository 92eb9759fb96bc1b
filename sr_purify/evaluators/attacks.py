"""Attacks on a trained classifier: clean accuracy, accuracy under each attack, worst case.

For a fixed test subset (`config.data.eval_examples`, the first N of a seeded permutation) every
attack of `config.attacks` runs in fixed-shape batches sharded over the mesh (each attack is
compiled once). Reported per attack: accuracy on its adversarial examples and the mean L-inf and L2
norms of the perturbations. The worst case, per threat model (norm and eps: L-inf 8/255, L2 0.5,
never across them), counts a sample as robust only if it is classified correctly clean and under
every attack of that threat model (attacks at eps = 0 are no threat model). Outputs: a printed
table, attacks_table.md, the `attacks` section of results.json, TensorBoard scalars and
attacks_grid.png (clean | magnified perturbation | adversarial, per attack).
"""

import logging
import time
from typing import Any, Dict, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sr_purify import attacks, models, reporting, sharding
from sr_purify import classification_data as cdata


def threat_label(norm: str, eps: float) -> str:
    """'linf 8/255' or 'l2 0.5': a threat model (norm and budget) as the tables name it."""
    k = eps * 255
    text = f'{round(k)}/255' if norm == 'linf' and abs(k - round(k)) < 1e-6 else f'{eps:g}'
    return f'{norm} {text}'


def attack_label(cfg: ml_collections.ConfigDict) -> str:
    """'pgd linf 8/255 x10', 'pgd l2 0.5 x10' or 'apgd-dlr linf 8/255 x100': what the table
    calls an attack."""
    name = cfg.name + ('-dlr' if cfg.get('loss', 'ce') == 'dlr' else '')
    steps = '' if cfg.name == 'fgsm' else f' x{cfg.steps}'
    return f'{name} {threat_label(cfg.norm, cfg.eps)}{steps}'


def _labels(cfgs: Sequence[ml_collections.ConfigDict]) -> List[str]:
    labels = [attack_label(c) for c in cfgs]
    seen: Dict[str, int] = {}
    out = []
    for label in labels:  # Two configs with one label (e.g. other step sizes) stay apart.
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f'{label} #{seen[label]}')
    return out


def perturbation_tile(delta: np.ndarray, magnify: float) -> np.ndarray:
    """0.5 + magnify * delta, clipped to [0, 1]: grey where the attack changed nothing."""
    return np.clip(0.5 + magnify * delta, 0.0, 1.0)


def report(
    workdir: str, config: ml_collections.ConfigDict, result: Dict[str, Any], samples, step: int
) -> None:
    """Prints the table; writes attacks_table.md, results.json, scalars and the grid."""
    writer = reporting.create_writer(workdir)
    data = config.data
    title = (
        f'Attacks on {config.classifier.model.name} ({config.classifier.checkpoint}, step '
        f'{step}), {result["examples"]} {data.eval_split} images'
    )
    header = ['attack', 'accuracy', 'mean L-inf', 'mean L2', 'seconds']
    rows = [['clean', result['clean']['accuracy'], 0.0, 0.0, result['clean']['seconds']]]
    for label, r in result['per_attack'].items():
        rows.append([label, r['accuracy'], r['mean_linf'], r['mean_l2'], r['seconds']])
    for threat, w in result['worst_case'].items():
        rows.append([f'worst case {threat}', w['accuracy'], '-', '-', '-'])
    table = reporting.log_table(title, header, rows)
    magnify = config.get('grid_magnify', 10.0)
    note = (
        f'Grid attacks_grid.png, one row per sample: clean, then for each attack in table '
        f'order the perturbation shown as 0.5 + {magnify:g} x delta and the adversarial '
        f'image. Norms are of x_adv - x on [0, 1] images (8/255 = 0.0314). The worst case '
        f'of a threat model (norm and eps) counts a sample as robust only if it is correct clean '
        f'and under every attack of that threat model; it is never taken across threat models. '
        f'Seconds include compilation.'
    )
    reporting.write_text(workdir, 'attacks_table.md', f'# {title}\n\n{table}\n\n{note}')
    reporting.update_results(workdir, 'attacks', result)
    scalars = {'attacks/clean/accuracy': result['clean']['accuracy']}
    for threat, w in result['worst_case'].items():
        scalars[f'attacks/worst_case_{threat.replace("/", "_").replace(" ", "_")}/accuracy'] = w[
            'accuracy'
        ]
    for label, r in result['per_attack'].items():
        scalars[f'attacks/{label.replace("/", "_").replace(" ", "_")}/accuracy'] = r['accuracy']
    writer.write_scalars(step, scalars)
    if samples['clean'] is not None:
        reporting.write_grid(
            workdir,
            'attacks_grid.png',
            grid(samples, magnify, list(result['per_attack'])),
            writer,
            step,
        )
    writer.flush()


def evaluate(
    config: ml_collections.ConfigDict, variables, split: cdata.Split, mesh
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Runs every attack of `config.attacks` on `split`.

    Returns (results, samples): samples holds the first `config.grid_samples` clean images and
    their adversarial versions under each attack, for the grid.
    """
    cfgs = list(config.attacks)
    labels = _labels(cfgs)
    model = models.build(config.classifier.model)

    def predict_logits(variables, x):
        return model.apply(variables, x, train=False)

    replicated = sharding.replicated(mesh)
    variables = jax.device_put(variables, replicated)

    def correct(variables, x, labels):
        return jnp.argmax(predict_logits(variables, x), -1) == labels

    def measure(variables, x, x_adv, labels):
        delta = (x_adv - x).reshape(x.shape[0], -1)
        return {
            'correct': correct(variables, x_adv, labels),
            'linf': jnp.max(jnp.abs(delta), axis=1),
            'l2': jnp.sqrt(jnp.sum(jnp.square(delta), axis=1)),
        }

    # Per-sample results come back replicated, so every host can read them.
    measure = jax.jit(measure, out_shardings=replicated)
    clean_correct = jax.jit(correct, out_shardings=replicated)
    # One function object for every call: the attacks take it as a static argument, so each
    # attack compiles once for the (fixed) batch shape.
    fn = predict_logits
    runners = [jax.jit(attacks.make_attack(cfg), static_argnums=0) for cfg in cfgs]
    key = jax.random.key(config.seed)
    num_grid = config.get('grid_samples', 6)

    masks, clean, per = [], [], [dict(correct=[], linf=[], l2=[]) for _ in cfgs]
    seconds = np.zeros(len(cfgs))
    clean_seconds = 0.0
    samples = {'clean': None, 'adv': [None] * len(cfgs)}
    for b, batch in enumerate(
        cdata.eval_batches(
            split,
            global_batch=config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    ):
        g = sharding.to_global(batch, mesh)
        masks.append(sharding.batch_mask(b, config.batch_size, len(split)))
        t = time.time()
        clean.append(np.asarray(jax.device_get(clean_correct(variables, g['image'], g['label']))))
        clean_seconds += time.time() - t
        if b == 0:
            samples['clean'] = sharding.first_rows(g['image'], num_grid, replicated)
        for k, run_attack in enumerate(runners):
            t = time.time()
            x_adv = run_attack(
                fn,
                variables,
                g['image'],
                jax.random.fold_in(jax.random.fold_in(key, k), b),
                g['label'],
            )
            m = jax.device_get(measure(variables, g['image'], x_adv, g['label']))
            seconds[k] += time.time() - t
            for name in per[k]:
                per[k][name].append(np.asarray(m[name]))
            if b == 0:
                samples['adv'][k] = sharding.first_rows(x_adv, num_grid, replicated)
        logging.info('attack evaluation: batch %d done', b + 1)

    mask = np.concatenate(masks).astype(bool)
    n = int(mask.sum())
    clean = np.concatenate(clean)[mask]
    robust: Dict[str, Dict[str, Any]] = {}  # threat model -> its samples' robustness, attacks
    result: Dict[str, Any] = {
        'examples': n,
        'clean': {'accuracy': float(clean.mean()), 'seconds': clean_seconds},
        'per_attack': {},
    }
    for k, (cfg, label) in enumerate(zip(cfgs, labels)):
        correct = np.concatenate(per[k]['correct'])[mask]
        linf = np.concatenate(per[k]['linf'])[mask]
        l2 = np.concatenate(per[k]['l2'])[mask]
        if cfg.eps > 0:
            threat = robust.setdefault(
                threat_label(cfg.norm, cfg.eps), {'robust': clean.copy(), 'attacks': []}
            )
            threat['robust'] &= correct
            threat['attacks'].append(label)
        result['per_attack'][label] = {
            'config': cfg.to_dict(),
            'accuracy': float(correct.mean()),
            'mean_linf': float(linf.mean()),
            'max_linf': float(linf.max()),
            'mean_l2': float(l2.mean()),
            'max_l2': float(l2.max()),
            'seconds': float(seconds[k]),
            'images_per_sec': n / float(seconds[k]),
        }
    result['worst_case'] = {
        threat: {
            'accuracy': float(t['robust'].mean()),
            'robust': int(t['robust'].sum()),
            'attacks': t['attacks'],
        }
        for threat, t in robust.items()
    }
    return result, samples


def grid(samples: Dict[str, Any], magnify: float, labels: Sequence[str] = ()) -> np.ndarray:
    """Rows of clean | (perturbation x magnify, adversarial) per attack, tiles enlarged 3x.

    `labels` are the attacks' table labels, in the order of `samples['adv']`; given, they
    head the columns ('<label> delta', '<label> adv').
    """
    clean = samples['clean']
    up = 3 if clean.shape[1] <= 64 else 1  # Tiny CIFAR tiles are hard to see at 1:1.
    size = (clean.shape[1] * up, clean.shape[2] * up)
    rows = []
    for i in range(len(clean)):
        row = [reporting.nearest_upscale(clean[i], size)]
        for adv in samples['adv']:
            row.append(
                reporting.nearest_upscale(perturbation_tile(adv[i] - clean[i], magnify), size)
            )
            row.append(reporting.nearest_upscale(adv[i], size))
        rows.append(row)
    columns = ['clean'] + [f'{label} {kind}' for label in labels for kind in ('delta', 'adv')]
    return reporting.image_grid(rows, labels=columns if labels else ())
