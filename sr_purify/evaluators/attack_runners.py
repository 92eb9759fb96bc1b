"""What the robustness evaluation attacks and scores: attack settings (the listed attacks, the
adaptive attacker's ensemble, the threat models), compiled attack runners, the
classifier-behind-purifier chain (EOT when the purifier is random), the jitted scoring functions
(accuracy, purified images, input gradients for the sanity checks) and the independent forward
pass that the eps = 0 check compares against.

Runners are cached by attack name and static settings, so every purifier row reuses one compiled
attack per function attacked; eps and the step size stay traced arguments.
"""

import functools
import inspect
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sr_purify import attacks, purifiers
from sr_purify.evaluators.attacks import attack_label, threat_label

# ---------------------------------------------------------------------------------------------
# Configuration.


def attack_list(config: ml_collections.ConfigDict) -> List[ml_collections.ConfigDict]:
    """The configured attacks, validated."""
    return attacks.classifier_attacks(config.attacks)


def adaptive_settings(
    config: ml_collections.ConfigDict, num_classes: Optional[int] = None
) -> Tuple[List[ml_collections.ConfigDict], int]:
    """(the adaptive attacker's extra attacks, validated; its EOT draws) from `config.adaptive`.

    `adaptive.attacks` are templates: each runs at the norm and eps of every listed attack (their
    own `norm` and `eps` are ignored); an empty list leaves the listed attack alone. Given
    `num_classes`, a DLR member on fewer than 3 classes raises here, before anything compiles.
    """
    templates = list(config.adaptive.get('attacks', None) or [])
    if templates:
        attacks.classifier_attacks(templates)
    dlr = [i for i, t in enumerate(templates) if t.get('loss', 'ce') == 'dlr']
    if num_classes is not None and num_classes < 3 and dlr:
        raise ValueError(
            f'config.adaptive.attacks[{dlr[0]}] is APGD-DLR, whose loss needs at least 3 '
            f'classes; the data has {num_classes}: set --config.adaptive.attacks[{dlr[0]}].loss=ce'
        )
    eot_samples = int(config.adaptive.get('eot_samples', 1))
    if eot_samples < 1:
        raise ValueError(f'adaptive.eot_samples must be an int >= 1; got {eot_samples}')
    return templates, eot_samples


def adaptive_attacks(
    cfg: ml_collections.ConfigDict, templates: Sequence[ml_collections.ConfigDict]
) -> List[ml_collections.ConfigDict]:
    """What the adaptive attacker runs at `cfg`'s threat model: `cfg` itself, then every template
    at `cfg.norm` and `cfg.eps`. A sample counts as robust only if it resists all of them."""
    out = [cfg]
    for template in templates:
        member = ml_collections.ConfigDict(template.to_dict())
        member.norm, member.eps = cfg.norm, float(cfg.eps)
        attacks.validate(member)
        out.append(member)
    return out


def threat_models(
    cfgs: Sequence[ml_collections.ConfigDict], labels: Sequence[str]
) -> List[Dict[str, Any]]:
    """The threat models of the listed attacks with eps > 0, in order of first appearance:
    [{'label': 'linf 8/255', 'norm', 'eps', 'attacks': [their labels], 'index': [their indices]}].
    The per-sample worst case is taken within one threat model, never across them."""
    groups: Dict[Tuple[str, float], Dict[str, Any]] = {}
    for k, (c, label) in enumerate(zip(cfgs, labels)):
        if c.eps <= 0:
            continue
        group = groups.setdefault(
            (c.norm, float(c.eps)),
            dict(
                label=threat_label(c.norm, c.eps),
                norm=c.norm,
                eps=float(c.eps),
                attacks=[],
                index=[],
            ),
        )
        group['attacks'].append(label)
        group['index'].append(k)
    return list(groups.values())


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
        for k in ('steps', 'norm', 'random_start', 'restarts', 'targeted', 'decay', 'loss')
        if k in accepted and k in cfg
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


def prediction_key(key_batch: jax.Array, row: int) -> jax.Array:
    """The one draw per (batch, purifier) with which every prediction of that row is scored."""
    return jax.random.fold_in(jax.random.fold_in(key_batch, 1_000_000), row)


def reference_forward(classifier_fn: Callable, purifier: purifiers.Purifier):
    """`(classifier_params, purifier_params, x, key) -> logits`: C(P(x)) by a plain forward pass,
    to be jitted on its own (not through `_predict_fn` or `_correct`), so the eps = 0 check
    compares the attack-and-score path against something that shares neither. A random P uses
    `key` (the same draw as the scoring), so the comparison is exact for it too."""

    def forward(classifier_params, purifier_params, x, key):
        purified = (
            purifier.purify(purifier_params, x, key)
            if purifier.random
            else purifier.purify(purifier_params, x)
        )
        return classifier_fn(classifier_params, purified)

    return forward


# A reference prediction whose top-2 logit gap is below this fraction of its largest |logit| is
# a near-tie: two compiled programs may round it either way, so the eps = 0 check does not count
# it as a mismatch (it reports how many there were).
TIE_RTOL = 1e-4


def reference_correct(logits: np.ndarray, labels: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """(correct, near_tie) per sample on the host, from the reference logits and labels."""
    logits = np.asarray(logits, np.float64)
    top2 = np.sort(logits, axis=-1)[:, -2:]
    scale = np.maximum(1.0, np.abs(logits).max(axis=-1))
    near_tie = (top2[:, 1] - top2[:, 0]) <= TIE_RTOL * scale
    return np.argmax(logits, axis=-1) == labels, near_tie


def split_labels(labels: np.ndarray, batch: int, global_batch: int) -> np.ndarray:
    """Labels of global batch `batch` read from the split itself (0 for the padding), not from
    the input pipeline: the eps = 0 check's reference labels."""
    idx = np.arange(batch * global_batch, (batch + 1) * global_batch)
    valid = idx < len(labels)
    return np.where(valid, np.asarray(labels)[np.where(valid, idx, 0)], 0).astype(np.int64)


def _first_success(xs, correct):
    """Per sample, the first of `xs` that is misclassified (`correct` False), else the first."""
    out = xs[0]
    for x_j, c_j in reversed(list(zip(xs, correct))):
        out = jnp.where(jnp.logical_not(c_j).reshape((-1,) + (1,) * (x_j.ndim - 1)), x_j, out)
    return out


def _purified(purify, params, x, key):
    return purify(params, x, key)


def _input_gradient(predict, params, x, labels, key):
    """Norm and finiteness of d sum CE(C(P(x))) / dx (BPDA where P is not differentiable)."""

    def loss(x_):
        logits = predict(params, x_, key).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum()

    g = jax.grad(loss)(x)
    return jnp.sqrt(jnp.sum(jnp.square(g))), jnp.all(jnp.isfinite(g))
