"""Defences for the SR service: transforms around a super-resolution network f.

A defence wraps the bare model `f(params, x) -> sr` (NHWC, LR in, SR out, floats in [0, 1]) into
`defence(f, params, x, key) -> sr`. Chosen by name (`config.defences`); an unknown name fails
listing the valid ones.

* `self_ensemble`: the geometric self-ensemble (EDSR+, Lim et al. 2017; a defence in Choi et al.
  ICCV 2019): the mean of T^-1(f(T(x))) over the 8 dihedral transforms T (4 rotations, each with
  and without a horizontal flip). Deterministic and differentiable. An equivariant f gives f.
* `resize`: the resizing defence of Choi et al. 2019, deterministic: bicubic downscale of the LR
  by `resize.factor` (antialiased), bicubic back up to the LR size, clip to [0, 1], then f.
  Chosen over the random-resize variant because a service that resizes by a fixed factor gives
  the same output for the same input, and the attacker it faces needs no EOT. Differentiable
  (linear up to the clip).
* `median_smoothing`: median randomized smoothing (Chaouai & Tamaazousti 2024): the per-pixel
  median of f(x + n_i) over `median_smoothing.samples` Gaussian draws n_i ~ N(0, sigma^2)
  (not clipped, so the noise stays zero-mean at black and white pixels). Random; differentiable
  almost everywhere (the gradient reaches the sample each median picks, and the noise is
  additive), so the adaptive attacker uses EOT over `adaptive.eot_draws` draws with exact
  gradients.
* `input_purifier`: f(P(x)) with P the SR service's self-supervised input purifier, trained on
  LR images only by `configs/purifier.py:sr_service` and restored from
  `input_purifier.checkpoint` (that job's workdir). Deterministic (unless P has input noise) and
  differentiable: the adaptive attacker differentiates through P.

No defence here has a non-differentiable stage, so the adaptive attacker needs no BPDA: it
differentiates defence and model end to end (`attack_fn`).
"""

import dataclasses
import functools
from typing import Any, Callable, Dict, Optional

import jax
import jax.numpy as jnp
import ml_collections

from sr_purify import attacks, image_ops, purifiers, registry

SRFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True, eq=False)
class Defence:
    """A named defence: `run(f, params, x, key) -> sr`; `key` is used only when `random`."""

    name: str
    run: Callable[..., jax.Array]
    random: bool
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __call__(self, sr_fn: SRFn, params, x: jax.Array, key: Optional[jax.Array] = None):
        if self.random and key is None:
            raise ValueError(f'defence {self.name!r} is random and needs a PRNG key')
        return self.run(sr_fn, params, x, key)


# ---------------------------------------------------------------------------------------------
# The transforms.

# The 8 dihedral transforms as (quarter turns, flip). Those with an even number of quarter turns
# keep the image's shape, the others transpose it: each group goes through f as one batch.
_SAME_SHAPE = ((0, False), (0, True), (2, False), (2, True))
_TRANSPOSED = ((1, False), (1, True), (3, False), (3, True))


def _forward(x: jax.Array, turns: int, flip: bool) -> jax.Array:
    y = jnp.rot90(x, turns, axes=(1, 2))
    return jnp.flip(y, axis=2) if flip else y


def _inverse(y: jax.Array, turns: int, flip: bool) -> jax.Array:
    y = jnp.flip(y, axis=2) if flip else y
    return jnp.rot90(y, -turns, axes=(1, 2))


def self_ensemble(sr_fn: SRFn, params, x: jax.Array, key=None) -> jax.Array:
    """Mean over the 8 flips / rotations T of T^-1(f(T(x)))."""
    del key
    total = None
    for group in (_SAME_SHAPE, _TRANSPOSED):
        batch = jnp.concatenate([_forward(x, t, f) for t, f in group], axis=0)
        outs = jnp.split(sr_fn(params, batch), len(group), axis=0)
        part = sum(_inverse(y, t, f) for y, (t, f) in zip(outs, group))
        total = part if total is None else total + part
    return total / 8.0


def resize(sr_fn: SRFn, params, x: jax.Array, key=None, *, factor: float) -> jax.Array:
    """f(bicubic_up(bicubic_down(x, factor))), the resized LR clipped to [0, 1]."""
    del key
    h, w = x.shape[1:3]
    small = (max(1, round(h * factor)), max(1, round(w * factor)))
    y = image_ops.resize_bicubic(image_ops.resize_bicubic(x, small), (h, w))
    return sr_fn(params, jnp.clip(y, 0.0, 1.0))


def median_smoothing(
    sr_fn: SRFn, params, x: jax.Array, key: jax.Array, *, sigma: float, samples: int
) -> jax.Array:
    """Per-pixel median of f(x + n_i), n_i ~ N(0, sigma^2), i = 1..samples (one batch)."""
    noise = sigma * jax.random.normal(key, (samples,) + x.shape, x.dtype)
    noisy = (x[None] + noise).reshape((samples * x.shape[0],) + x.shape[1:])
    out = sr_fn(params, noisy)
    ranked = jnp.sort(out.reshape((samples, x.shape[0]) + out.shape[1:]), axis=0)
    middle = samples // 2  # An even count takes the mean of the two middle values.
    return ranked[middle] if samples % 2 else 0.5 * (ranked[middle - 1] + ranked[middle])


def input_purifier(
    sr_fn: SRFn, params, x: jax.Array, key=None, *, purifier, purifier_params
) -> jax.Array:
    """f(P(x)), P a trained purifier (LR in, LR out) with its parameters fixed.

    P is an RGB network; a gray x (Set14 has two) goes through it as the SR models do:
    replicated to three channels in, channel mean out.
    """
    if x.shape[-1] == 1:
        rgb = purifier.purify(purifier_params, jnp.repeat(x, 3, axis=-1), key)
        return sr_fn(params, jnp.mean(rgb, axis=-1, keepdims=True))
    return sr_fn(params, purifier.purify(purifier_params, x, key))


# ---------------------------------------------------------------------------------------------
# By name.


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _invalid(name: str, field: str, value, valid: str) -> ValueError:
    return ValueError(f'invalid defence.{name}.{field} {value!r}; valid: {valid}')


def _build_self_ensemble(settings) -> Defence:
    del settings
    return Defence('self_ensemble', self_ensemble, random=False)


def _build_resize(settings) -> Defence:
    factor = settings.get('factor', None)
    if not (_is_number(factor) and 0 < factor < 1):
        raise _invalid('resize', 'factor', factor, 'a number in (0, 1)')
    return Defence(
        'resize',
        functools.partial(resize, factor=float(factor)),
        random=False,
        settings={'factor': float(factor)},
    )


def _build_median_smoothing(settings) -> Defence:
    sigma, samples = settings.get('sigma', None), settings.get('samples', None)
    if not (_is_number(sigma) and sigma >= 0):
        raise _invalid('median_smoothing', 'sigma', sigma, 'a number >= 0')
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise _invalid('median_smoothing', 'samples', samples, 'an int >= 1')
    return Defence(
        'median_smoothing',
        functools.partial(median_smoothing, sigma=float(sigma), samples=samples),
        random=True,
        settings={'sigma': float(sigma), 'samples': samples},
    )


def _build_input_purifier(settings) -> Defence:
    checkpoint = settings.get('checkpoint', '')
    if not checkpoint:
        raise ValueError(
            'defence input_purifier needs --config.defence.input_purifier.checkpoint=<the '
            'workdir of a configs/purifier.py:sr_service job>'
        )
    purifier, pparams, _, step = purifiers.restore(
        checkpoint, flag='--config.defence.input_purifier.checkpoint'
    )
    pparams = jax.tree.map(jnp.asarray, pparams)
    return Defence(
        'input_purifier',
        functools.partial(input_purifier, purifier=purifier, purifier_params=pparams),
        random=purifier.random,
        settings={'checkpoint': str(checkpoint), 'kind': purifier.kind, 'step': int(step)},
    )


DEFENCES = {
    'self_ensemble': _build_self_ensemble,
    'resize': _build_resize,
    'median_smoothing': _build_median_smoothing,
    'input_purifier': _build_input_purifier,
}


def default_settings() -> ml_collections.ConfigDict:
    """`config.defence`: each defence's settings (CPU-sized; see the module docstring)."""
    return ml_collections.ConfigDict(
        dict(
            self_ensemble={},
            resize=dict(factor=0.75),
            median_smoothing=dict(sigma=0.02, samples=9),
            input_purifier=dict(checkpoint=''),  # a configs/purifier.py:sr_service workdir
        )
    )


def build(name: str, settings: Optional[ml_collections.ConfigDict] = None) -> Defence:
    """The defence `name` with its settings from `settings[name]` (`default_settings()` if None);
    an unknown name raises a ValueError listing the valid ones."""
    builder = registry.lookup(DEFENCES, name, 'SR defence')
    settings = default_settings() if settings is None else settings
    return builder(settings.get(name, None) or {})


def bare(sr_fn: SRFn, params, x: jax.Array, key=None) -> jax.Array:
    """No defence: f itself (the signature of a defence)."""
    del key
    return sr_fn(params, x)


def _with_key(defence: Defence, sr_fn: SRFn, params, x, key):
    return defence(sr_fn, params, x, key)


def _without_key(defence: Defence, sr_fn: SRFn, params, x):
    return defence(sr_fn, params, x)


def attack_fn(defence: Defence, sr_fn: SRFn, eot_draws: int):
    """defence∘f as the function an attack differentiates (the adaptive attacker): plain when
    the defence is deterministic, `attacks.eot(..., eot_draws)` when it is random. Build it once
    per (defence, model) and reuse it: jitted attacks key their compiled code on it."""
    if defence.random:
        return attacks.eot(functools.partial(_with_key, defence, sr_fn), max(int(eot_draws), 1))
    return functools.partial(_without_key, defence, sr_fn)
