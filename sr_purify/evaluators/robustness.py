"""Robustness of purifiers in front of a classifier C, under three attackers.

For a fixed test subset and every purifier P of `config.purifiers` (rows):
* clean accuracy of C, and of C∘P;
* for every attack of `config.attacks`:
  - oblivious: the attack on C alone, then P, then C;
  - adaptive (white-box): the attack on C∘P end to end (BPDA through non-differentiable stages,
    EOT over `adaptive.eot_samples` draws when P is random), with `adaptive.steps` steps if set;
  - transfer: the attack on an independently trained classifier (`config.transfer`), then P, C
    (skipped, with a printed note, when no transfer checkpoint is given);
* per attacker, the per-sample worst case: correct on C∘P clean and under every attack.

Every purified number is printed next to its adaptive counterpart. Sanity checks run with every
evaluation (`sanity_checks`, a pure function of the results): eps = 0 gives the clean accuracy,
accuracy does not rise with eps, adaptive is not above oblivious or transfer, gradients through P
are finite and non-zero. Failures print as 'SANITY FAILED: ...'.

Outputs: the table (printed and robustness_table.md), the `robustness` section of results.json,
robustness_plot.png (accuracy against eps per attacker, drawn with PIL) and robustness_grid.png.

eps and the step size are traced arguments of each compiled attack, so a sweep over eps compiles
each attack once per function attacked.
"""

import dataclasses
import functools
import inspect
import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sr_purify import attacks, purifiers, reporting, sharding
from sr_purify import classification_data as cdata
from sr_purify.evaluators.attacks import attack_label

ATTACKERS = ('oblivious', 'adaptive', 'transfer')
PyTree = Any


@dataclasses.dataclass(eq=False)
class Row:
    """One purifier of the table: its label, the built purifier, its parameters, provenance."""

    label: str
    purifier: purifiers.Purifier
    params: PyTree
    source: str = ''


# ---------------------------------------------------------------------------------------------
# Configuration.


def attack_list(config: ml_collections.ConfigDict) -> List[ml_collections.ConfigDict]:
    """The configured attacks, validated."""
    return attacks.classifier_attacks(config.attacks)


def zero_attack(cfgs: Sequence[ml_collections.ConfigDict]) -> ml_collections.ConfigDict:
    """The sanity attack: the first attack at eps = 0 (same compiled program: eps is traced)."""
    zero = ml_collections.ConfigDict(cfgs[0].to_dict())
    zero.eps = 0.0
    return zero


def labels_of(cfgs: Sequence[ml_collections.ConfigDict]) -> List[str]:
    """Unique table labels ('pgd linf 8/255 x10'); repeated ones get '#k'."""
    labels = [attack_label(c) for c in cfgs]
    out, seen = [], {}
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        out.append(label if labels.count(label) == 1 else f'{label} #{seen[label]}')
    return out


@functools.lru_cache(maxsize=None)
def _runner(name: str, static: Tuple[Tuple[str, Any], ...]):
    """Jitted `(fn, params, x, key, labels, eps, step_size) -> x_adv`; eps and step traced."""
    attack = attacks.ATTACKS[name]
    takes_step = 'step_size' in inspect.signature(attack).parameters

    def run(fn, params, x, key, labels, eps, step_size):
        kwargs = dict(static, eps=eps)
        if takes_step:
            kwargs['step_size'] = step_size
        return attack(fn, params, x, key, labels, **kwargs)

    return jax.jit(run, static_argnums=0)


def make_runner(cfg: ml_collections.ConfigDict, steps: int = 0) -> Callable:
    """`run(fn, params, x, key, labels) -> x_adv` for one attack config (`steps` > 0 overrides)."""
    attack = attacks.ATTACKS[cfg.name]
    accepted = inspect.signature(attack).parameters
    static = {
        k: cfg[k]
        for k in ('steps', 'norm', 'random_start', 'restarts', 'targeted', 'decay')
        if k in accepted
    }
    if steps and 'steps' in static:
        static['steps'] = int(steps)
    compiled = _runner(cfg.name, tuple(sorted(static.items())))
    eps = np.float32(cfg.eps)
    step = None if cfg.step_size is None else np.float32(cfg.step_size)

    def run(fn, params, x, key, labels):
        return compiled(fn, params, x, key, labels, eps, step)

    return run


# ---------------------------------------------------------------------------------------------
# The functions attacked and scored.


def chain(classifier_fn: Callable, purifier: purifiers.Purifier, eot_samples: int = 1):
    """C∘P as an attack function of params (classifier params, purifier params): plain when P is
    deterministic, `attacks.eot(...)` when it is random."""
    if purifier.random:

        def with_key(params, x, key):
            return classifier_fn(params[0], purifier.purify(params[1], x, key))

        return attacks.eot(with_key, max(int(eot_samples), 1))

    def deterministic(params, x):
        return classifier_fn(params[0], purifier.purify(params[1], x))

    return deterministic


def _predict_fn(classifier_fn: Callable, purifier: purifiers.Purifier):
    """`(params, x, key) -> logits` of C∘P with one draw (the key is unused when deterministic)."""

    def predict(params, x, key):
        return classifier_fn(
            params[0], purifier.purify(params[1], x, key if purifier.random else None)
        )

    return predict


def _correct(predict, params, x, labels, key):
    return jnp.argmax(predict(params, x, key), axis=-1) == labels


def _purified(purify, params, x, key):
    return purify(params, x, key)


def _input_gradient(predict, params, x, labels, key):
    """Norm and finiteness of d sum CE(C(P(x))) / dx (BPDA where P is not differentiable)."""

    def loss(x_):
        logits = predict(params, x_, key).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    g = jax.grad(loss)(x)
    return jnp.sqrt(jnp.sum(jnp.square(g))), jnp.all(jnp.isfinite(g))


# ---------------------------------------------------------------------------------------------
# Evaluation.


def evaluate(
    config: ml_collections.ConfigDict,
    classifier_fn: Callable,
    classifier_params: PyTree,
    rows: Sequence[Row],
    split: cdata.Split,
    mesh,
    transfer: Optional[Tuple[Callable, PyTree]] = None,
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Runs every attacker on `split`; returns (results, samples for the grid).

    `classifier_fn(params, x) -> logits` and the transfer source's `(fn, params)` are attacked
    in inference mode. Fields of `config` read: attacks, adaptive.steps, adaptive.eot_samples,
    batch_size, seed, grid_samples, grid_attack, sanity_batches.

    Every attacker also runs the first attack at eps = 0 on the first `sanity_batches` batches
    (0: all), for the eps = 0 sanity check; it reuses the compiled attack.
    """
    cfgs = attack_list(config)
    labels = labels_of(cfgs)
    zero_cfg = zero_attack(cfgs)
    zero_label = attack_label(zero_cfg)
    sanity_batches = int(config.get('sanity_batches', 1))
    adaptive_steps = int(config.adaptive.get('steps', 0))
    eot_samples = int(config.adaptive.get('eot_samples', 1))
    oblivious_runs = [make_runner(c) for c in cfgs]
    adaptive_runs = [make_runner(c, adaptive_steps) for c in cfgs]
    zero_oblivious, zero_adaptive = make_runner(zero_cfg), make_runner(zero_cfg, adaptive_steps)
    replicated = sharding.replicated(mesh)
    # Per-sample results come back replicated, so every host can read them.
    correct_fn = jax.jit(_correct, static_argnums=0, out_shardings=replicated)
    purified_fn = jax.jit(_purified, static_argnums=0)
    gradient_fn = jax.jit(_input_gradient, static_argnums=0, out_shardings=replicated)
    classifier_params = jax.device_put(classifier_params, replicated)
    if transfer is not None:
        transfer = (transfer[0], jax.device_put(transfer[1], replicated))
    chains = [chain(classifier_fn, r.purifier, eot_samples) for r in rows]
    predicts = [_predict_fn(classifier_fn, r.purifier) for r in rows]
    purify_fns = [
        r.purifier.purify
        if r.purifier.random
        else functools.partial(lambda p, params, x, key: p.purify(params, x), r.purifier)
        for r in rows
    ]
    row_params = [(classifier_params, jax.device_put(r.params, replicated)) for r in rows]
    identity = purifiers.build(ml_collections.ConfigDict(dict(kind='none')))
    plain_predict = _predict_fn(classifier_fn, identity)
    grid_k = grid_attack_index(config, cfgs)
    num_grid = int(config.get('grid_samples', 4))
    key = jax.random.key(config.seed)

    n_att, n_rows = len(cfgs), len(rows)
    masks, clean = [], []
    per = {a: [[[] for _ in range(n_att)] for _ in range(n_rows)] for a in ATTACKERS}
    # eps = 0 sanity attack: (clean C∘P, eps = 0 result) per attacker and row, on its batches.
    zero = {a: [[] for _ in range(n_rows)] for a in ATTACKERS}
    zero_clean, zero_masks = [[] for _ in range(n_rows)], []
    clean_p = [[] for _ in range(n_rows)]
    seconds = {a: 0.0 for a in ATTACKERS}
    gradient = [None] * n_rows
    samples = {'clean': None, 'rows': [{} for _ in range(n_rows)], 'attack': labels[grid_k]}

    def fetch(a):
        return np.asarray(jax.device_get(a))

    for b, batch in enumerate(
        cdata.eval_batches(
            split,
            global_batch=config.batch_size,
            process_index=jax.process_index(),
            process_count=jax.process_count(),
        )
    ):
        g = sharding.to_global(batch, mesh)
        x, y = g['image'], g['label']
        masks.append(_global_mask(b, config.batch_size, len(split)))
        key_b = jax.random.fold_in(key, b)
        attack_keys = [jax.random.fold_in(key_b, k) for k in range(n_att)]
        key_zero = jax.random.fold_in(key_b, n_att)
        check_zero = sanity_batches <= 0 or b < sanity_batches
        if check_zero:
            zero_masks.append(masks[-1])
            x0_obl = zero_oblivious(classifier_fn, classifier_params, x, key_zero, y)
            x0_tr = (
                None
                if transfer is None
                else zero_oblivious(transfer[0], transfer[1], x, key_zero, y)
            )
        clean.append(fetch(correct_fn(plain_predict, (classifier_params, {}), x, y, key_b)))
        t = time.time()
        x_obl = [
            run(classifier_fn, classifier_params, x, k_, y)
            for run, k_ in zip(oblivious_runs, attack_keys)
        ]
        jax.block_until_ready(x_obl)
        seconds['oblivious'] += time.time() - t
        x_tr = None
        if transfer is not None:
            t = time.time()
            x_tr = [
                run(transfer[0], transfer[1], x, k_, y)
                for run, k_ in zip(oblivious_runs, attack_keys)
            ]
            jax.block_until_ready(x_tr)
            seconds['transfer'] += time.time() - t
        if b == 0:
            samples['clean'] = _first(x, num_grid, replicated)
        for r in range(n_rows):
            params = row_params[r]
            # One draw per (batch, purifier) for every prediction, so eps = 0 reproduces clean.
            k_pred = jax.random.fold_in(jax.random.fold_in(key_b, 1_000_000), r)
            clean_p[r].append(fetch(correct_fn(predicts[r], params, x, y, k_pred)))
            for k in range(n_att):
                per['oblivious'][r][k].append(
                    fetch(correct_fn(predicts[r], params, x_obl[k], y, k_pred))
                )
                if x_tr is not None:
                    per['transfer'][r][k].append(
                        fetch(correct_fn(predicts[r], params, x_tr[k], y, k_pred))
                    )
            t = time.time()
            x_ad = [run(chains[r], params, x, k_, y) for run, k_ in zip(adaptive_runs, attack_keys)]
            jax.block_until_ready(x_ad)
            seconds['adaptive'] += time.time() - t
            for k in range(n_att):
                per['adaptive'][r][k].append(
                    fetch(correct_fn(predicts[r], params, x_ad[k], y, k_pred))
                )
            if check_zero:
                zero_clean[r].append(clean_p[r][-1])
                x0_ad = zero_adaptive(chains[r], params, x, key_zero, y)
                for attacker, x0 in (
                    ('oblivious', x0_obl),
                    ('adaptive', x0_ad),
                    ('transfer', x0_tr),
                ):
                    if x0 is not None:
                        zero[attacker][r].append(
                            fetch(correct_fn(predicts[r], params, x0, y, k_pred))
                        )
            if b == 0:
                norm, finite = gradient_fn(predicts[r], params, x, y, k_pred)
                gradient[r] = {
                    'norm': float(norm),
                    'finite': bool(finite),
                    'via': 'exact'
                    if rows[r].purifier.differentiable
                    else 'BPDA (identity backward)',
                }
                pp = row_params[r][1]
                samples['rows'][r] = {
                    'purified': _first(
                        purified_fn(purify_fns[r], pp, x, k_pred), num_grid, replicated
                    ),
                    'oblivious': _first(x_obl[grid_k], num_grid, replicated),
                    'oblivious_purified': _first(
                        purified_fn(purify_fns[r], pp, x_obl[grid_k], k_pred), num_grid, replicated
                    ),
                    'adaptive': _first(x_ad[grid_k], num_grid, replicated),
                    'adaptive_purified': _first(
                        purified_fn(purify_fns[r], pp, x_ad[grid_k], k_pred), num_grid, replicated
                    ),
                }
        logging.info('robustness evaluation: batch %d done', b + 1)

    mask = np.concatenate(masks).astype(bool)
    n = int(mask.sum())
    zero_mask = np.concatenate(zero_masks).astype(bool)
    acc = lambda parts: float(np.concatenate(parts)[mask].mean())
    results: Dict[str, Any] = {
        'examples': n,
        'clean': acc(clean),
        'attacks': [
            {
                'label': label,
                'name': c.name,
                'norm': c.norm,
                'eps': float(c.eps),
                'steps': int(c.steps),
                'adaptive_steps': adaptive_steps or int(c.steps),
                'step_size': None if c.step_size is None else float(c.step_size),
                'config': c.to_dict(),
            }
            for label, c in zip(labels, cfgs)
        ],
        'adaptive': {'steps': adaptive_steps, 'eot_samples': eot_samples},
        'eps0_attack': {
            'label': zero_label,
            'examples': int(zero_mask.sum()),
            'batches': len(zero_masks),
        },
        'transfer': transfer is not None,
        'seconds': seconds,
        'purifiers': {},
    }
    for r, row in enumerate(rows):
        clean_r = np.concatenate(clean_p[r])[mask]
        entry = {
            'kind': row.purifier.kind,
            'source': row.source,
            'random': row.purifier.random,
            'differentiable': row.purifier.differentiable,
            'clean': float(clean_r.mean()),
            'gradient': gradient[r],
            'worst_case': {},
        }
        entry['eps0'] = {
            'examples': int(zero_mask.sum()),
            'clean': float(np.concatenate(zero_clean[r])[zero_mask].mean()),
        }
        for attacker in ATTACKERS:
            entry['eps0'][attacker] = (
                float(np.concatenate(zero[attacker][r])[zero_mask].mean())
                if zero[attacker][r]
                else None
            )
        for attacker in ATTACKERS:
            if attacker == 'transfer' and transfer is None:
                entry[attacker] = None
                entry['worst_case'][attacker] = None
                continue
            robust = clean_r.copy()
            entry[attacker] = {}
            for k, c in enumerate(cfgs):
                correct = np.concatenate(per[attacker][r][k])[mask]
                entry[attacker][labels[k]] = float(correct.mean())
                if c.eps > 0:
                    robust &= correct
            entry['worst_case'][attacker] = float(robust.mean())
        results['purifiers'][row.label] = entry
    results['sanity'] = sanity_checks(results)
    return results, samples


def grid_attack_index(config, cfgs) -> int:
    """`config.grid_attack` if >= 0, else the L-inf attack with eps nearest 8/255 (eps > 0)."""
    k = int(config.get('grid_attack', -1))
    if k >= 0:
        if k >= len(cfgs):
            raise ValueError(f'grid_attack {k} is out of range; there are {len(cfgs)} attacks')
        return k
    candidates = [i for i, c in enumerate(cfgs) if c.eps > 0]
    if not candidates:
        return 0
    linf = [i for i in candidates if cfgs[i].norm == 'linf'] or candidates
    return min(linf, key=lambda i: abs(cfgs[i].eps - 8 / 255))


def _first(x, count: int, replicated) -> np.ndarray:
    return np.asarray(jax.device_get(jax.jit(lambda a: a[:count], out_shardings=replicated)(x)))


def _global_mask(b: int, global_batch: int, n: int) -> np.ndarray:
    return (np.arange(b * global_batch, (b + 1) * global_batch) < n).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# Sanity checks: a pure function of the results dict.


def sanity_checks(results: Dict[str, Any]) -> Dict[str, Any]:
    """{'passed', 'checks': [{'check', 'ok', 'detail'}], 'failures': [detail]}.

    * eps0: every attacker's accuracy at eps = 0 equals the clean accuracy of C∘P on the same
      images (the sanity attack in `eps0`, and any listed attack with eps = 0);
    * monotone: per purifier, attacker and attack (name, norm, steps), accuracy does not rise with
      eps (clean C∘P is the eps = 0 point), tolerance one sample;
    * adaptive_vs_oblivious / adaptive_vs_transfer: the white-box attacker is not weaker than the
      oblivious or the transfer attacker, tolerance one sample;
    * gradient: d loss / dx through C∘P (BPDA where needed) is finite and non-zero.
    """
    n = max(int(results['examples']), 1)
    tol = 1.0 / n + 1e-9
    checks = []

    def add(check, ok, detail):
        checks.append({'check': check, 'ok': bool(ok), 'detail': detail})

    meta = results['attacks']
    pct = lambda v: f'{100 * v:.1f}%'
    for label, r in results['purifiers'].items():
        zero = r.get('eps0')
        if zero:
            n0 = max(int(zero['examples']), 1)
            for attacker in ATTACKERS:
                if zero.get(attacker) is not None:
                    add(
                        'eps0',
                        abs(zero[attacker] - zero['clean']) <= 0.5 / n0,
                        f'{label}, {attacker}: {pct(zero[attacker])} at eps 0 vs clean+P '
                        f'{pct(zero["clean"])} on the same {n0} images',
                    )
        for attacker in ATTACKERS:
            accs = r.get(attacker)
            if accs is None:
                continue
            for a in meta:
                if a['eps'] == 0:
                    ok = abs(accs[a['label']] - r['clean']) <= 0.5 / n
                    add(
                        'eps0',
                        ok,
                        f'{label}, {attacker}, {a["label"]}: {pct(accs[a["label"]])} '
                        f'at eps 0 vs clean+P {pct(r["clean"])}',
                    )
            groups: Dict[Tuple, List] = {}
            for a in meta:
                if a['eps'] > 0:
                    groups.setdefault((a['name'], a['norm'], a['steps']), []).append(a)
            for (name, norm, steps), group in groups.items():
                points = [(0.0, r['clean'], 'clean+P')] + sorted(
                    (a['eps'], accs[a['label']], a['label']) for a in group
                )
                for (e0, a0, l0), (e1, a1, l1) in zip(points, points[1:]):
                    if e1 > e0:
                        add(
                            'monotone',
                            a1 <= a0 + tol,
                            f'{label}, {attacker}: {pct(a1)} at {l1} vs {pct(a0)} at {l0}',
                        )
        for a in meta:
            if a['eps'] == 0:
                continue
            ad = r['adaptive'][a['label']]
            for other in ('oblivious', 'transfer'):
                if r.get(other) is None:
                    continue
                ot = r[other][a['label']]
                add(
                    f'adaptive_vs_{other}',
                    ad <= ot + tol,
                    f'{label}, {a["label"]}: adaptive {pct(ad)} vs {other} {pct(ot)}',
                )
        g = r.get('gradient')
        if g is not None:
            add(
                'gradient',
                g['finite'] and g['norm'] > 0,
                f'{label}: |d loss / dx| = {g["norm"]:.3g} ({g["via"]}), '
                f'{"finite" if g["finite"] else "NOT finite"}',
            )
    failures = [c['detail'] for c in checks if not c['ok']]
    return {'passed': not failures, 'checks': checks, 'failures': failures}


def sanity_lines(sanity: Dict[str, Any]) -> List[str]:
    """Summary lines, one per check kind, and a loud line per failure."""
    lines = []
    kinds = []
    for c in sanity['checks']:
        if c['check'] not in kinds:
            kinds.append(c['check'])
    describe = {
        'eps0': 'eps = 0 gives the clean accuracy of C∘P',
        'monotone': 'accuracy does not rise with eps (tolerance one sample)',
        'adaptive_vs_oblivious': 'adaptive accuracy <= oblivious (tolerance one sample)',
        'adaptive_vs_transfer': 'adaptive accuracy <= transfer (tolerance one sample)',
        'gradient': 'gradients through C∘P are finite and non-zero',
    }
    for kind in kinds:
        group = [c for c in sanity['checks'] if c['check'] == kind]
        bad = [c for c in group if not c['ok']]
        status = 'ok' if not bad else 'FAILED'
        lines.append(
            f'sanity {status}: {describe.get(kind, kind)} '
            f'({len(group) - len(bad)}/{len(group)} pass)'
        )
    for detail in sanity['failures']:
        lines.append(f'SANITY FAILED: {detail}')
    return lines


# ---------------------------------------------------------------------------------------------
# Table, plot, grid.


def table(results: Dict[str, Any], percent: bool = True) -> Tuple[List[str], List[List[Any]]]:
    """(header, rows): purifier, clean, clean+P, then per attack (eps > 0) oblivious | adaptive |
    transfer, then the worst case per attacker. Accuracies in percent (strings) or fractions."""
    fmt = (lambda v: '-' if v is None else f'{100 * v:.1f}') if percent else (lambda v: v)
    attack_labels = [a['label'] for a in results['attacks'] if a['eps'] > 0]
    header = ['purifier', 'clean', 'clean+P']
    for label in attack_labels:
        header += [f'{label} obl', 'adapt', 'transfer']
    header += ['worst obl', 'worst adapt', 'worst transfer']
    rows = []
    for name, r in results['purifiers'].items():
        row = [name, fmt(results['clean']), fmt(r['clean'])]
        for label in attack_labels:
            for attacker in ATTACKERS:
                row.append(fmt(None if r[attacker] is None else r[attacker][label]))
        for attacker in ATTACKERS:
            row.append(fmt(r['worst_case'][attacker]))
        rows.append(row)
    return header, rows


_PALETTE = [
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (127, 127, 127),
    (188, 189, 34),
    (23, 190, 207),
]


def _plot_group(results):
    """The attacks on the x axis: the largest (name, norm, steps) group, L-inf preferred."""
    groups: Dict[Tuple, List] = {}
    for a in results['attacks']:
        if a['eps'] > 0:
            groups.setdefault((a['norm'] != 'linf', a['name'], a['norm'], a['steps']), []).append(a)
    if not groups:
        return None, []
    key = min(groups, key=lambda k: (k[0], -len(groups[k])))
    return key[2], sorted(groups[key], key=lambda a: a['eps'])


def plot(results: Dict[str, Any]) -> np.ndarray:
    """Accuracy (%) against eps, one panel per attacker, one line per purifier (PIL drawing)."""
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    norm, group = _plot_group(results)
    attackers = [
        a for a in ATTACKERS if any(r[a] is not None for r in results['purifiers'].values())
    ]
    pw, ph, left, right, top, bottom = 330, 260, 48, 14, 28, 40
    names = list(results['purifiers'])
    legend_h = 18 * ((len(names) + 2) // 3) + 10
    img = Image.new('RGB', (pw * len(attackers), ph + legend_h), 'white')
    draw = ImageDraw.Draw(img)
    scale = 255.0 if norm == 'linf' else 1.0
    xs = [0.0] + [a['eps'] * scale for a in group]
    x_max = max(xs) if max(xs) > 0 else 1.0
    for p, attacker in enumerate(attackers):
        ox = p * pw
        x0, x1, y0, y1 = ox + left, ox + pw - right, top, ph - bottom
        to_x = lambda e: x0 + (x1 - x0) * e / x_max
        to_y = lambda v: y1 - (y1 - y0) * v
        draw.rectangle([x0, y0, x1, y1], outline='black')
        for v in (0.0, 0.25, 0.5, 0.75, 1.0):
            y = to_y(v)
            draw.line([x0 - 4, y, x0, y], fill='black')
            if 0.0 < v < 1.0:  # Grid lines inside the frame only.
                draw.line([x0 + 1, y, x1 - 1, y], fill=(225, 225, 225))
            draw.text((ox + 8, y - 6), f'{100 * v:.0f}', fill='black', font=font)
        for e in xs:
            x = to_x(e)
            draw.line([x, y1, x, y1 + 4], fill='black')
            draw.text((x - 8, y1 + 7), f'{e:g}', fill='black', font=font)
        unit = 'eps (/255, L-inf)' if norm == 'linf' else f'eps ({norm})'
        draw.text((x0 + (x1 - x0) / 2 - 40, y1 + 22), unit, fill='black', font=font)
        draw.text((x0 + 4, 8), f'{attacker}: accuracy (%)', fill='black', font=font)
        for i, name in enumerate(names):
            r = results['purifiers'][name]
            if r[attacker] is None:
                continue
            pts = [(to_x(0.0), to_y(r['clean']))] + [
                (to_x(a['eps'] * scale), to_y(r[attacker][a['label']])) for a in group
            ]
            color = _PALETTE[i % len(_PALETTE)]
            draw.line(pts, fill=color, width=2)
            for px, py in pts:
                draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=color)
    for i, name in enumerate(names):
        lx = 12 + (i % 3) * (img.width // 3)
        ly = ph + 4 + 18 * (i // 3)
        color = _PALETTE[i % len(_PALETTE)]
        draw.line([lx, ly + 7, lx + 24, ly + 7], fill=color, width=3)
        draw.text((lx + 30, ly + 1), name, fill='black', font=font)
    return np.asarray(img)


def grid(samples: Dict[str, Any], names: Sequence[str]) -> np.ndarray:
    """Per purifier, per sample: clean | P(clean) | oblivious adv | P(it) | adaptive adv | P(it)."""
    clean = samples['clean']
    up = 3 if clean.shape[1] <= 64 else 1
    size = (clean.shape[1] * up, clean.shape[2] * up)
    rows = []
    for r, _ in enumerate(names):
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
    return reporting.image_grid(rows)


# ---------------------------------------------------------------------------------------------
# The job.


def load_rows(entries: Sequence[ml_collections.ConfigDict], mesh, seed: int = 0) -> List[Row]:
    """Purifier rows from `config.purifiers`: a trained job's export when `checkpoint` is set,
    else the kind itself (trainable kinds at their starting point, e.g. the distilled student)."""
    rows, seen = [], set()
    for entry in entries:
        label = entry.get('label', '') or entry.kind
        if label in seen:
            raise ValueError(f'two purifier rows are labelled {label!r}; set distinct labels')
        seen.add(label)
        if entry.get('checkpoint', ''):
            purifier, params, saved, step = purifiers.restore(entry.checkpoint, mesh)
            if saved.kind != entry.kind:
                raise ValueError(
                    f'purifier row {label!r} is {entry.kind!r} but {entry.checkpoint} '
                    f'holds a {saved.kind!r} purifier'
                )
            source = f'{entry.checkpoint} step {step}'
        else:
            purifier = purifiers.build(entry, mesh)
            params = purifiers.initial_params(purifier, entry, jax.random.key(seed))
            source = 'untrained' if purifier.kind in purifiers.TRAINABLE else 'no parameters'
            if purifier.kind == 'sr_resample' and entry.get('student_checkpoint', ''):
                source = f'student {entry.student_checkpoint}, not fine-tuned'
        rows.append(Row(label, purifier, params, source))
    return rows


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
            f'- {a["label"]}: oblivious/transfer {a["steps"]} steps, adaptive '
            f'{a["adaptive_steps"]} steps, step {step}, random start '
            f'{a["config"]["random_start"]}, restarts {a["config"]["restarts"]}'
        )
    lines.append(
        f'- adaptive: gradients through C∘P end to end; BPDA (identity backward) for '
        f'non-differentiable stages (jpeg); EOT over {results["adaptive"]["eot_samples"]} '
        f'draws for random purifiers'
    )
    lines.append(f'- transfer: {transfer_note}')
    z = results.get('eps0_attack')
    if z:
        lines.append(
            f'- sanity: {z["label"]} (the first attack at eps = 0) by every attacker on '
            f'the first {z["examples"]} images'
        )
    lines.append(
        '- worst case: a sample counts only if C∘P is right on it clean and under every '
        'attack (eps > 0) of that attacker'
    )
    return lines


def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Evaluate job, mode 'robustness'. Returns the `robustness` results section."""
    from sr_purify import models
    from sr_purify.trainers import classifier as classifier_trainer

    attack_list(config)  # Fail fast on attack settings, then checkpoints, then data.
    variables, step = classifier_trainer.restore(
        config.classifier.checkpoint, config.classifier.model
    )
    classifier_fn = classifier_trainer.make_predict(models.build(config.classifier.model))
    transfer, transfer_note = None, ''
    if config.transfer.get('checkpoint', ''):
        t_vars, t_step = classifier_trainer.restore(
            config.transfer.checkpoint, config.transfer.model, flag='--config.transfer.checkpoint'
        )
        transfer = (classifier_trainer.make_predict(models.build(config.transfer.model)), t_vars)
        transfer_note = (
            f'adversarial examples made on {config.transfer.model.name} '
            f'({config.transfer.checkpoint}, step {t_step}), same attack settings'
        )
    else:
        transfer_note = (
            'skipped: no --config.transfer.checkpoint given (e.g. the workdir of '
            'configs/classifier.py:small_cnn)'
        )
        print(f'note: transfer attacker {transfer_note}', flush=True)
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.batch_size, mesh)
    rows = load_rows(config.purifiers, mesh, config.seed)
    data = config.data
    split = cdata.subset(
        cdata.load_split(data, data.eval_split), data.eval_examples, data.subset_seed
    )
    t0 = time.time()
    results, samples = evaluate(config, classifier_fn, variables, rows, split, mesh, transfer)
    results.update(
        classifier={
            'checkpoint': config.classifier.checkpoint,
            'step': step,
            'model': config.classifier.model.to_dict(),
        },
        transfer_note=transfer_note,
        data=split.source,
        wall_s=time.time() - t0,
    )
    report(
        workdir,
        results,
        samples,
        rows,
        config,
        title=(
            f'Robustness of {config.classifier.model.name} ({config.classifier.checkpoint}, '
            f'step {step}) behind each purifier, {results["examples"]} '
            f'{data.eval_split} images, accuracy %'
        ),
    )
    return results


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
    text = reporting.log_table(title, header, table_rows)
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
            'Settings:',
            *notes,
            '',
            'Purifiers:',
            *sources,
            '',
            'Sanity checks:',
            *sanity,
            '',
            'Plot robustness_plot.png: accuracy against eps per attacker (eps 0 = clean '
            'C∘P). Grid robustness_grid.png, per purifier and sample: clean | P(clean) | '
            f'oblivious adversarial | P(it) | adaptive adversarial | P(it), attack '
            f'{samples.get("attack", "")}.',
        ]
    )
    reporting.write_text(workdir, 'robustness_table.md', md)
    reporting.update_results(workdir, 'robustness', results)
    writer = writer or reporting.create_writer(workdir)
    scalars = {}
    for name, r in results['purifiers'].items():
        scalars[f'robustness/{name}/clean'] = r['clean']
        for attacker in ATTACKERS:
            if r['worst_case'][attacker] is not None:
                scalars[f'robustness/{name}/worst_{attacker}'] = r['worst_case'][attacker]
    writer.write_scalars(0, scalars)
    reporting.write_grid(workdir, 'robustness_plot.png', plot(results), writer)
    if samples.get('clean') is not None:
        reporting.write_grid(
            workdir, 'robustness_grid.png', grid(samples, [r.label for r in rows]), writer
        )
    writer.flush()
    return md
