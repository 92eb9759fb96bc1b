"""Pixel losses, the denoiser objectives of denoised smoothing (and, in `distillation.py`, the
teacher-student losses).

Denoised smoothing (Salman et al., NeurIPS 2020) puts a denoiser D in front of a classifier C so
that randomized smoothing of C(D(.)) certifies C. D is trained on x + N(0, sigma^2) with

  gaussian_mse: mean((D(x + n) - x)^2),
  stability:    CE(C(D(x + n)), C's own prediction on the clean x), C frozen,

or a weighted sum of the two (`denoiser_terms` gives both); neither reads a data label. Images
and sigma are in the same [0, 1] pixel range (sigma 0.25 = 63.75/255), and the noise is not
clipped: it is the noise the smoothed classifier adds at certification.
"""

from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np

from sr_purify import registry

Sigma = Union[float, Sequence[float]]


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(pred - target))


def l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred - target))


def charbonnier(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    return jnp.mean(jnp.sqrt(jnp.square(pred - target) + eps * eps))


PIXEL_LOSSES = {'l1': l1, 'l2': l2, 'charbonnier': charbonnier}


def pixel_loss(name: str):
    return registry.lookup(PIXEL_LOSSES, name, 'pixel loss')


# ---------------------------------------------------------------------------------------------
# Denoised smoothing.


def sigma_values(sigma: Sigma) -> tuple:
    """`sigma` as a non-empty tuple of floats >= 0 (one value or several)."""
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(sigma, np.float64)))
    if not values or not all(np.isfinite(s) and s >= 0 for s in values):
        raise ValueError(f'the noise sigma must be one or more finite values >= 0; got {sigma}')
    return values


def add_gaussian_noise(x: jax.Array, key: jax.Array, sigma: Sigma) -> jax.Array:
    """x + n, n ~ N(0, sigma^2) per pixel, not clipped; x and sigma in the same [0, 1] range.

    One sigma (a float or a 1-tuple): n = sigma * normal(key, x.shape). Several: each example
    draws one of them uniformly, n = sigma[i] * normal(k_noise, x.shape) with
    `k_pick, k_noise = split(key)` and i = randint(k_pick, (batch,), 0, len(sigma)).
    """
    values = sigma_values(sigma)
    if len(values) == 1:
        return x + values[0] * jax.random.normal(key, x.shape, x.dtype)
    k_pick, k_noise = jax.random.split(key)
    pick = jax.random.randint(k_pick, (x.shape[0],), 0, len(values))
    std = jnp.asarray(values, x.dtype)[pick].reshape((-1,) + (1,) * (x.ndim - 1))
    return x + std * jax.random.normal(k_noise, x.shape, x.dtype)


def _hard_targets(logits: jax.Array) -> jax.Array:
    return jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=logits.dtype)


# C's own prediction on the clean image: its argmax (one-hot) or its softmax probabilities.
STABILITY_TARGETS = {'hard': _hard_targets, 'soft': jax.nn.softmax}


def cross_entropy(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """Mean over the batch of -sum(targets * log_softmax(logits)) (targets: probabilities)."""
    return jnp.mean(-jnp.sum(targets * jax.nn.log_softmax(logits, axis=-1), axis=-1))


def denoiser_terms(
    denoise: Callable[[jax.Array], jax.Array],
    x: jax.Array,
    key: jax.Array,
    sigma: Sigma,
    classifier: Optional[Tuple[Callable[[Any, jax.Array], jax.Array], Any]] = None,
    targets: str = 'hard',
    clip: bool = False,
) -> Dict[str, jax.Array]:
    """The denoiser objectives from one pass of D over x + n, n = `add_gaussian_noise`:

      'gaussian_mse': mean((D(x + n) - x)^2) over every pixel;
      'stability' (with `classifier` = (classify, params), classify(params, images) -> logits):
        CE(C(D(x + n)), C(x)'s `targets`), the targets from the clean x.

    C's parameters and the targets are frozen (stop_gradient): the gradient flows through C into
    D only. `clip`: C sees D's output clipped to [0, 1] (what `Purifier.purify` hands it); the
    MSE always sees the raw output.
    """
    y = denoise(add_gaussian_noise(x, key, sigma))
    terms = {'gaussian_mse': l2(y, x)}
    if classifier is not None:
        classify, params = classifier
        to_targets = registry.lookup(STABILITY_TARGETS, targets, 'stability target')
        params = jax.lax.stop_gradient(params)
        target = jax.lax.stop_gradient(to_targets(classify(params, x)))
        seen = jnp.clip(y, min=0.0, max=1.0) if clip else y
        terms['stability'] = cross_entropy(classify(params, seen), target)
    return terms
