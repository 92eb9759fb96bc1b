"""Pure, batched, jit-able adversarial attacks on functions, not models.

Inputs are NHWC float images in [0, 1]. Input normalisation belongs to the
function under attack, never to the attack. Every attack returns x_adv with
||x_adv - x|| <= eps in its norm and x_adv in [0, 1]; eps = 0 returns x
exactly.

The function convention
-----------------------
An attack receives a function and its parameters, so the same code attacks a
classifier, a purifier + classifier chain, an SR network or a feature
extractor:

* deterministic: a plain `fn(params, x) -> output` (logits, features, or an SR
  image). `params` is any pytree, e.g. a flax variables dict with
  batch_stats; run the model in inference mode (batch statistics in training
  mode would couple the samples of a batch).
* random: `fn(params, x, key) -> output`, tagged with `random_fn(fn)` (one
  draw per attack step) or `eot(fn, n)` (n draws per step, Expectation over
  Transformation). Attacks fold the step number into their key, so every step
  sees fresh randomness. Untagged functions are always called with two
  arguments; there is no signature sniffing.

EOT averages the *loss* over the n draws (the gradient is the mean of the
per-draw gradients, E_k[grad L(fn(x, k))]), which is the definition for any
loss, the cross-entropy included. Calling an `eot(...)` function directly
returns its mean output over the draws, for prediction. With
`cfg.eot_samples > 1`, `make_attack` wraps a random fn in `eot` itself; a
deterministic fn is called once (its expectation is itself).

Non-differentiable stages (JPEG, quantisation) go through
`bpda(forward, backward=identity)`: forward in the forward pass, the VJP of
backward in the backward pass. Compose freely, e.g.

    chain = lambda p, x: classifier.apply(p, bpda(quantise)(x))
    noisy = eot(lambda p, x, k: classifier.apply(p, x + 0.03 * normal(k, x.shape)), 8)

Attacks (all `attack(fn, params, x, key, labels=None, **settings) -> x_adv`)
----------------------------------------------------------------------------
name    what                                  settings (config fields it reads)
fgsm    one step: FGSM (linf) / FGM (l2)      eps norm targeted
pgd     Madry et al. 2018                     eps steps step_size norm random_start restarts
                                              targeted
mifgsm  momentum I-FGSM, Dong et al. 2018     eps steps step_size decay norm targeted
apgd    APGD, Croce & Hein 2020               eps steps norm random_start restarts targeted
        (loss 'ce': APGD-CE; 'dlr': APGD-DLR) loss
ssp     NRP self-supervised perturbation      eps steps step_size norm random_start (no labels)
sr      Choi et al. 2019 basic SR attack      eps steps step_size norm random_start (no labels)

`step_size=None` picks the attack's rule: 2.5 eps / steps (pgd), eps / steps
(mifgsm, ssp, sr); APGD sets its own step (2 eps, halved adaptively). A field
an attack does not read must keep its neutral value (random_start=False,
restarts=1, targeted=False, loss='ce'), or `validate` raises. For norm='l2' pass an L2
budget or leave eps out for the norm's default (0.5; 8/255 for linf).

Classifier attacks take labels (the target classes when targeted=True) and
ascend the per-sample cross-entropy summed over the batch. Label-free attacks
(`LABEL_FREE`) ignore labels.

Usage:

    cfg = attacks.attack_config(name='pgd', eps=4 / 255)
    attack = attacks.make_attack(cfg)
    x_adv = jax.jit(attack, static_argnums=0)(fn, params, x, key, labels)
"""

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from ml_collections import config_dict

from sr_purify.attacks.gradient import (
    LOSSES,
    NORMS,
    apgd,
    apgd_checkpoints,
    dlr_loss,
    fgm,
    fgsm,
    mifgsm,
    pgd,
    project,
    uniform_in_ball,
)
from sr_purify.attacks.label_free import sr_attack, ssp
from sr_purify.attacks.wrappers import RandomFn, bpda, eot, loss_and_grad, random_fn

ATTACKS: dict[str, Callable[..., jax.Array]] = {
    'fgsm': fgsm,
    'pgd': pgd,
    'mifgsm': mifgsm,
    'apgd': apgd,
    'ssp': ssp,
    'sr': sr_attack,
}
LABEL_FREE = frozenset({'ssp', 'sr'})

# Config fields each attack consumes (all others must keep their neutral value).
_SETTINGS = {
    'fgsm': ('eps', 'norm', 'targeted'),
    'pgd': ('eps', 'steps', 'step_size', 'norm', 'random_start', 'restarts', 'targeted'),
    'mifgsm': ('eps', 'steps', 'step_size', 'decay', 'norm', 'targeted'),
    'apgd': ('eps', 'steps', 'norm', 'random_start', 'restarts', 'targeted', 'loss'),
    'ssp': ('eps', 'steps', 'step_size', 'norm', 'random_start'),
    'sr': ('eps', 'steps', 'step_size', 'norm', 'random_start'),
}
# A field an attack ignores must hold this value, so a setting never
# silently does nothing (e.g. restarts=5 for mifgsm).
_NEUTRAL = {'random_start': False, 'restarts': 1, 'targeted': False, 'loss': 'ce'}

_BASE = dict(
    name='pgd',
    norm='linf',
    eps=None,
    steps=10,
    step_size=None,
    random_start=True,
    restarts=1,
    targeted=False,
    decay=1.0,
    eot_samples=1,
    loss='ce',
)
# The usual CIFAR-scale budget of each norm, used when no eps is given; the L2 one is not a
# rescaled L-inf one (8/255 as an L2 radius on a 32x32x3 image moves almost nothing).
DEFAULT_EPS = {'linf': 8 / 255, 'l2': 0.5}
# Paper defaults per attack; step_size None means "the attack's own rule" (2.5 eps / steps for
# pgd: 2/255 at the default 8/255 and 10 steps, 0.125 at L2 0.5; eps / steps for mifgsm and sr;
# APGD adapts its step itself).
_NAME_DEFAULTS = {
    'fgsm': dict(steps=1, step_size=None, random_start=False),
    'pgd': {},
    'mifgsm': dict(step_size=None, random_start=False),
    'apgd': dict(steps=100, step_size=None),
    'ssp': dict(eps=16 / 255, steps=100, step_size=0.01),
    'sr': dict(steps=50, step_size=None),
}


def attack_config(**overrides) -> ml_collections.ConfigDict:
    """Attack settings: the common defaults, then the named attack's, then overrides.

    Defaults: name='pgd', norm='linf', eps=DEFAULT_EPS[norm] (8/255 L-inf, 0.5 L2), steps=10,
    step_size=None (the attack's rule, e.g. PGD's 2.5 eps / steps = 2/255), random_start=True,
    restarts=1, targeted=False, decay=1.0, eot_samples=1, loss='ce' (apgd's 'dlr': APGD-DLR).
    Naming another attack applies its paper defaults for any field not given
    (e.g. name='ssp' gives eps=16/255, steps=100, step_size=0.01). The result is
    locked: a misspelt field raises.
    """
    unknown = sorted(set(overrides) - set(_BASE))
    if unknown:
        raise ValueError(
            f'unknown attack config field(s) {", ".join(unknown)}; '
            f'valid: {", ".join(sorted(_BASE))}'
        )
    name = overrides.get('name', _BASE['name'])
    values = {**_BASE, **_NAME_DEFAULTS.get(name, {}), **overrides}
    if values['eps'] is None:  # An unknown norm gets the L-inf budget; validate() rejects it.
        values['eps'] = DEFAULT_EPS.get(values['norm'], DEFAULT_EPS['linf'])
    if values['step_size'] is None:
        # A typed placeholder, so it can still be set from the command line.
        values['step_size'] = config_dict.placeholder(float)
    cfg = ml_collections.ConfigDict(values)
    cfg.lock()
    return cfg


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def classifier_attacks(cfgs) -> list:
    """`cfgs` as a list, each validated and aimed at a classifier (not label-free), not empty."""
    cfgs = list(cfgs)
    if not cfgs:
        raise ValueError('config.attacks is empty; give at least one classifier attack')
    for cfg in cfgs:
        validate(cfg)
        if cfg.name in LABEL_FREE:
            raise ValueError(
                f'attack {cfg.name!r} is label-free and does not target a classifier; '
                f'valid here: {", ".join(sorted(set(ATTACKS) - LABEL_FREE))}'
            )
    return cfgs


def validate(cfg) -> None:
    """Raises a one-line ValueError naming the bad value and the valid choices."""
    if cfg.name not in ATTACKS:
        raise ValueError(f'unknown attack {cfg.name!r}; valid: {", ".join(sorted(ATTACKS))}')
    if cfg.norm not in NORMS:
        raise ValueError(f'unknown norm {cfg.norm!r}; valid: {", ".join(NORMS)}')
    checks = (
        ('eps', _is_number(cfg.eps) and cfg.eps >= 0, 'a number >= 0'),
        (
            'step_size',
            cfg.step_size is None or (_is_number(cfg.step_size) and cfg.step_size >= 0),
            "a number >= 0, or None for the attack's default",
        ),
        ('steps', _is_int(cfg.steps) and cfg.steps >= 0, 'an int >= 0'),
        ('restarts', _is_int(cfg.restarts) and cfg.restarts >= 1, 'an int >= 1'),
        ('eot_samples', _is_int(cfg.eot_samples) and cfg.eot_samples >= 1, 'an int >= 1'),
        ('decay', _is_number(cfg.decay) and cfg.decay >= 0, 'a number >= 0'),
        ('loss', cfg.get('loss', 'ce') in LOSSES, ', '.join(LOSSES)),
    )
    for field, ok, valid in checks:
        if not ok:
            raise ValueError(f'invalid {field} {cfg[field]!r}; valid: {valid}')
    used = _SETTINGS[cfg.name]
    for field, neutral in _NEUTRAL.items():
        if field not in used and cfg.get(field, neutral) != neutral:
            users = sorted(n for n, s in _SETTINGS.items() if field in s)
            raise ValueError(
                f'{field}={cfg[field]!r} has no effect on {cfg.name!r}; set it to '
                f'{neutral!r} or use one of: {", ".join(users)}'
            )
    if cfg.get('loss', 'ce') == 'dlr' and cfg.targeted:
        raise ValueError(
            "loss='dlr' with targeted=True is invalid; valid: loss='ce' for a targeted attack "
            '(the DLR loss here is untargeted)'
        )
    if cfg.name in LABEL_FREE and not cfg.random_start:
        raise ValueError(
            f'random_start=False is invalid for {cfg.name!r}; valid: True '
            '(its loss has zero gradient at the clean input)'
        )


def check_images(x) -> None:
    """Raises a one-line ValueError unless x is a rank-4 NHWC float batch in [0, 1].

    Reads the values, so call it on concrete arrays only (outside jit).
    """
    shape, dtype = getattr(x, 'shape', None), getattr(x, 'dtype', None)
    if shape is None or len(shape) != 4 or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f'images must be a rank-4 NHWC float array (batch, height, width, '
            f'channels) in [0, 1]; got shape {shape} dtype {dtype}'
        )
    # Reduce where the array lives; only two scalars travel to the host.
    lo, hi = float(jnp.min(x)), float(jnp.max(x))
    if not (lo >= 0.0 and hi <= 1.0):  # Also rejects NaN.
        raise ValueError(
            f'image values must lie in [0, 1]; got range [{lo:.4g}, {hi:.4g}] '
            f'for shape {tuple(shape)}'
        )


def _check_labels(labels, x) -> None:
    shape, dtype = getattr(labels, 'shape', None), getattr(labels, 'dtype', None)
    if shape != (x.shape[0],) or not jnp.issubdtype(dtype, jnp.integer):
        raise ValueError(
            f'labels must be integer class indices of shape ({x.shape[0]},) for this '
            f'batch; got shape {shape} dtype {dtype}'
        )


def make_attack(cfg) -> Callable[..., jax.Array]:
    """Returns `attack(fn, params, x, key, labels=None) -> x_adv` for a config.

    Static settings are bound with functools.partial, so the returned function
    jits as a whole: `jax.jit(attack, static_argnums=0)` (fn must be hashable:
    plain functions, partials and `RandomFn` are). Inputs are checked when they
    are concrete; under jit the checks are skipped (they cost a device read).
    """
    validate(cfg)
    name = cfg.name
    settings = {field: cfg.get(field, _BASE[field]) for field in _SETTINGS[name]}
    bound = functools.partial(ATTACKS[name], **settings)
    samples = cfg.eot_samples

    def attack(fn, params, x, key, labels=None):
        if name not in LABEL_FREE and labels is None:
            raise ValueError(
                f'{name!r} attacks a classifier and needs labels (the target classes '
                'when targeted=True); got labels=None'
            )
        if not isinstance(x, jax.core.Tracer):
            check_images(x)
            if name not in LABEL_FREE and not isinstance(labels, jax.core.Tracer):
                _check_labels(labels, x)
        if samples > 1 and isinstance(fn, RandomFn):
            fn = eot(fn, samples)
        return bound(fn, params, x, key, None if name in LABEL_FREE else labels)

    return attack


__all__ = [
    'ATTACKS',
    'LABEL_FREE',
    'LOSSES',
    'NORMS',
    'RandomFn',
    'apgd',
    'apgd_checkpoints',
    'attack_config',
    'bpda',
    'check_images',
    'dlr_loss',
    'eot',
    'fgm',
    'fgsm',
    'loss_and_grad',
    'make_attack',
    'mifgsm',
    'pgd',
    'project',
    'random_fn',
    'sr_attack',
    'ssp',
    'uniform_in_ball',
    'validate',
]
