"""Robustness of purifiers in front of a classifier C, under three attackers.

For a fixed test subset and every purifier P of `config.purifiers` (rows):
* clean accuracy of C, and of C∘P;
* for every attack of `config.attacks`:
  - oblivious: the attack on C alone, then P, then C;
  - adaptive (white-box): on C∘P end to end (BPDA through non-differentiable stages, EOT over
    `adaptive.eot_samples` draws when P is random), the attack itself and every attack of
    `adaptive.attacks` at its norm and eps (default APGD-CE and APGD-DLR, configs/evaluate.py);
    a sample counts as robust only if it resists all of them;
  - transfer: the attack on an independently trained classifier (`config.transfer`), then P, C
    (skipped, with a printed note, when no transfer checkpoint is given);
* per attacker and threat model (norm, eps), the per-sample worst case: correct on C∘P clean and
  under every listed attack of that norm and eps. Never across threat models: a worst case over
  L-inf 8/255 and L2 0.5 together is a robust accuracy for no threat model.

Every purified number is printed next to its adaptive counterpart. Sanity checks run with every
evaluation (`sanity_checks`, a pure function of the results): eps = 0 and clean C∘P agree sample
by sample with an independent forward pass of C∘P (its own jitted function, labels read from the
split, the same draw for random P), accuracy does not rise with eps, adaptive is not above
oblivious or transfer, gradients through P are finite and non-zero. Failures print as
'SANITY FAILED: ...'.

Layout: attack_runners.py (what is attacked), this module (the loop), robustness_checks.py,
robustness_report.py (tables, plot, grid, files); jobs/evaluate.py restores and runs them.
Outputs: the tables (printed and robustness_table.md), the `robustness` section of results.json,
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
    _first_success,
    _input_gradient,
    _predict_fn,
    _purified,
    adaptive_attacks,
    adaptive_settings,
    attack_label,
    attack_list,
    chain,
    labels_of,
    make_runner,
    prediction_key,
    reference_correct,
    reference_forward,
    split_labels,
    threat_models,
    zero_attack,
)
from sr_purify.evaluators.robustness_checks import ATTACKERS, sanity_checks

PyTree = Any
__all__ = [
    'ATTACKERS',
    'Row',
    'adaptive_settings',
    'attack_list',
    'evaluate',
    'grid_attack_index',
    'sanity_checks',
]


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
    in inference mode. Fields of `config` read: attacks, adaptive.attacks, adaptive.eot_samples,
    batch_size, seed, grid_samples, grid_attack, sanity_batches.

    Every attacker also runs its attacks of the first listed attack's threat model at eps = 0 on
    the first `sanity_batches` batches (0: all), for the eps = 0 sanity check; it reuses the
    compiled attacks. Each batch's clean C∘P also goes through `reference_forward`, the check's
    independent reference.
    """
    cfgs = attack_list(config)
    labels = labels_of(cfgs)
    templates, eot_samples = adaptive_settings(config, len(split.class_names))
    threats = threat_models(cfgs, labels)
    zero_cfg = zero_attack(cfgs)
    zero_label = attack_label(zero_cfg)
    sanity_batches = int(config.get('sanity_batches', 1))
    adaptive_cfgs = [adaptive_attacks(c, templates) for c in cfgs]
    oblivious_runs = [make_runner(c) for c in cfgs]
    adaptive_runs = [[make_runner(m) for m in ms] for ms in adaptive_cfgs]
    zero_oblivious = make_runner(zero_cfg)
    zero_adaptive = [make_runner(m) for m in adaptive_attacks(zero_cfg, templates)]
    replicated = sharding.replicated(mesh)
    # Per-sample results come back replicated, so every host can read them.
    correct_fn = jax.jit(_correct, static_argnums=0, out_shardings=replicated)
    purified_fn = jax.jit(_purified, static_argnums=0)
    gradient_fn = jax.jit(_input_gradient, static_argnums=0, out_shardings=replicated)
    first_success_fn = jax.jit(_first_success)
    classifier_params = jax.device_put(classifier_params, replicated)
    if transfer is not None:
        transfer = (transfer[0], jax.device_put(transfer[1], replicated))
    chains = [chain(classifier_fn, r.purifier, eot_samples) for r in rows]
    predicts = [_predict_fn(classifier_fn, r.purifier) for r in rows]
    # The eps = 0 check's reference: one plain forward pass of C∘P per row, jitted on its own.
    references = [
        jax.jit(reference_forward(classifier_fn, r.purifier), out_shardings=replicated)
        for r in rows
    ]
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
    # Per adaptive member (for the record of which attack did the work).
    members = [[[[] for _ in m] for m in adaptive_cfgs] for _ in range(n_rows)]
    # eps = 0 sanity attack: per attacker and row, on its batches.
    zero = {a: [[] for _ in range(n_rows)] for a in ATTACKERS}
    zero_masks = []
    clean_p = [[] for _ in range(n_rows)]
    # The independent reference: per row, per-sample correctness and near-ties.
    ref = [[] for _ in range(n_rows)]
    ties = [[] for _ in range(n_rows)]
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
        ref_labels = split_labels(split.labels, b, config.batch_size)
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
            k_pred = prediction_key(key_b, r)
            clean_p[r].append(fetch(correct_fn(predicts[r], params, x, y, k_pred)))
            ok_ref, tie = reference_correct(
                fetch(references[r](params[0], params[1], x, k_pred)), ref_labels
            )
            ref[r].append(ok_ref)
            ties[r].append(tie)
            for k in range(n_att):
                per['oblivious'][r][k].append(
                    fetch(correct_fn(predicts[r], params, x_obl[k], y, k_pred))
                )
                if x_tr is not None:
                    per['transfer'][r][k].append(
                        fetch(correct_fn(predicts[r], params, x_tr[k], y, k_pred))
                    )
            t = time.time()
            # Member 0 (the listed attack) uses the oblivious attacker's key; member j its fold.
            x_ad = [
                [
                    run(chains[r], params, x, k_ if j == 0 else jax.random.fold_in(k_, j), y)
                    for j, run in enumerate(runs)
                ]
                for runs, k_ in zip(adaptive_runs, attack_keys)
            ]
            jax.block_until_ready(x_ad)
            seconds['adaptive'] += time.time() - t
            ok_ad = []
            for k in range(n_att):
                oks = [fetch(correct_fn(predicts[r], params, xj, y, k_pred)) for xj in x_ad[k]]
                for j, ok in enumerate(oks):
                    members[r][k][j].append(ok)
                ok_ad.append(oks)
                per['adaptive'][r][k].append(np.logical_and.reduce(oks))
            if check_zero:
                x0_ad = [
                    run(
                        chains[r],
                        params,
                        x,
                        key_zero if j == 0 else jax.random.fold_in(key_zero, j),
                        y,
                    )
                    for j, run in enumerate(zero_adaptive)
                ]
                zero['adaptive'][r].append(
                    np.logical_and.reduce(
                        [fetch(correct_fn(predicts[r], params, x0, y, k_pred)) for x0 in x0_ad]
                    )
                )
                for attacker, x0 in (('oblivious', x0_obl), ('transfer', x0_tr)):
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
                # The grid's adaptive image: per sample, the first attack of the ensemble that
                # fools C∘P (the listed attack's where none does).
                x_ad_grid = first_success_fn(x_ad[grid_k], ok_ad[grid_k])
                samples['rows'][r] = {
                    'purified': sharding.first_rows(
                        purified_fn(purify_fns[r], pp, x, k_pred), num_grid, replicated
                    ),
                    'oblivious': sharding.first_rows(x_obl[grid_k], num_grid, replicated),
                    'oblivious_purified': sharding.first_rows(
                        purified_fn(purify_fns[r], pp, x_obl[grid_k], k_pred), num_grid, replicated
                    ),
                    'adaptive': sharding.first_rows(x_ad_grid, num_grid, replicated),
                    'adaptive_purified': sharding.first_rows(
                        purified_fn(purify_fns[r], pp, x_ad_grid, k_pred), num_grid, replicated
                    ),
                }
        logging.info('robustness evaluation: batch %d done', b + 1)

    mask = np.concatenate(masks).astype(bool)
    n = int(mask.sum())
    zero_mask = np.concatenate(zero_masks).astype(bool)
    n0 = int(zero_mask.sum())
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
                'step_size': None if c.step_size is None else float(c.step_size),
                'config': c.to_dict(),
                # What the adaptive attacker ran at this attack's norm and eps.
                'adaptive': labels_of(adaptive_cfgs[k]),
            }
            for k, (label, c) in enumerate(zip(labels, cfgs))
        ],
        # The templates, less the norm and eps they take from each listed attack.
        'adaptive': {
            'attacks': [
                {k: v for k, v in t.to_dict().items() if k not in ('norm', 'eps')}
                for t in templates
            ],
            'eot_samples': eot_samples,
        },
        'threat_models': [{k: v for k, v in t.items() if k != 'index'} for t in threats],
        'eps0_attack': {
            'label': zero_label,
            'adaptive': labels_of(adaptive_attacks(zero_cfg, templates)),
            'examples': n0,
            'batches': len(zero_masks),
        },
        'transfer': transfer is not None,
        'seconds': seconds,
        'purifiers': {},
    }
    for r, row in enumerate(rows):
        clean_r = np.concatenate(clean_p[r])[mask]
        ref_all = np.concatenate(ref[r])
        tie_all = np.concatenate(ties[r])
        ref_r, tie_r = ref_all[mask], tie_all[mask]
        # The eps = 0 batches are the first ones: their rows lead the concatenation.
        ref_0, tie_0 = ref_all[: len(zero_mask)][zero_mask], tie_all[: len(zero_mask)][zero_mask]
        entry = {
            'kind': row.purifier.kind,
            'source': row.source,
            'random': row.purifier.random,
            'differentiable': row.purifier.differentiable,
            'clean': float(clean_r.mean()),
            # The table's clean C∘P against the independent forward pass, sample by sample.
            'reference': {
                'clean': float(ref_r.mean()),
                'mismatches': int(((clean_r != ref_r) & ~tie_r).sum()),
                'near_ties': int(tie_r.sum()),
            },
            'gradient': gradient[r],
            'worst_case': {},
        }
        entry['eps0'] = {
            'examples': n0,
            'clean': float(ref_0.mean()),  # By the independent forward pass.
            'near_ties': int(tie_0.sum()),
            'mismatches': {},
        }
        for attacker in ATTACKERS:
            if zero[attacker][r]:
                got = np.concatenate(zero[attacker][r])[zero_mask]
                entry['eps0'][attacker] = float(got.mean())
                entry['eps0']['mismatches'][attacker] = int(((got != ref_0) & ~tie_0).sum())
            else:
                entry['eps0'][attacker] = None
                entry['eps0']['mismatches'][attacker] = None
        entry['adaptive_members'] = {
            labels[k]: {
                m: float(np.concatenate(members[r][k][j])[mask].mean())
                for j, m in enumerate(labels_of(adaptive_cfgs[k]))
            }
            for k in range(n_att)
        }
        for attacker in ATTACKERS:
            if attacker == 'transfer' and transfer is None:
                entry[attacker] = None
                entry['worst_case'][attacker] = None
                continue
            correct = [np.concatenate(per[attacker][r][k])[mask] for k in range(n_att)]
            entry[attacker] = {labels[k]: float(correct[k].mean()) for k in range(n_att)}
            entry['worst_case'][attacker] = {
                t['label']: float(
                    np.logical_and.reduce([clean_r] + [correct[k] for k in t['index']]).mean()
                )
                for t in threats
            }
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
