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

Layout: attack_runners.py (what is attacked), this module (the loop), robustness_checks.py,
robustness_report.py (table, plot, grid, files); jobs/evaluate.py restores and runs them.
Outputs: the table (printed and robustness_table.md), the `robustness` section of results.json,
robustness_plot.png (matplotlib: accuracy against eps, a panel per attack, a line per purifier
and attacker) and robustness_grid.png (labelled columns).

eps and the step size are traced arguments of each compiled attack, so a sweep over eps compiles
each attack once per function attacked.
"""

import dataclasses
import functools
import logging
import time
from typing import Any, Callable, Dict, Optional, Sequence, Tuple

import jax
import ml_collections
import numpy as np

from sr_purify import classification_data as cdata
from sr_purify import purifiers, sharding
from sr_purify.evaluators.attack_runners import (
    _correct,
    _input_gradient,
    _predict_fn,
    _purified,
    attack_label,
    attack_list,
    chain,
    labels_of,
    make_runner,
    zero_attack,
)
from sr_purify.evaluators.robustness_checks import ATTACKERS, sanity_checks

PyTree = Any
__all__ = ['ATTACKERS', 'Row', 'attack_list', 'evaluate', 'grid_attack_index', 'sanity_checks']


@dataclasses.dataclass(eq=False)
class Row:
    """One purifier of the table: its label, the built purifier, its parameters, provenance."""

    label: str
    purifier: purifiers.Purifier
    params: PyTree
    source: str = ''


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
        masks.append(sharding.batch_mask(b, config.batch_size, len(split)))
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
            samples['clean'] = sharding.first_rows(x, num_grid, replicated)
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
                    'purified': sharding.first_rows(
                        purified_fn(purify_fns[r], pp, x, k_pred), num_grid, replicated
                    ),
                    'oblivious': sharding.first_rows(x_obl[grid_k], num_grid, replicated),
                    'oblivious_purified': sharding.first_rows(
                        purified_fn(purify_fns[r], pp, x_obl[grid_k], k_pred), num_grid, replicated
                    ),
                    'adaptive': sharding.first_rows(x_ad[grid_k], num_grid, replicated),
                    'adaptive_purified': sharding.first_rows(
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
