"""What the robustness evaluation attacks and scores: attack settings, compiled attack runners,
the classifier-behind-purifier chain (EOT when the purifier is random), and the jitted scoring
functions (accuracy, purified images, input gradients for the sanity checks).

Runners are cached by attack name and static settings, so every purifier row reuses one compiled
attack per function attacked; eps and the step size stay traced arguments.
"""

import functools
import inspect
from typing import Any, Callable, List, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from sr_purify import attacks, purifiers
from sr_purify.evaluators.attacks import attack_label

# ---------------------------------------------------------------------------------------------
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
