"""Pixel losses (and, in `distillation.py`, the teacher-student losses)."""

import jax
import jax.numpy as jnp

from sr_purify import registry


def l1(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.abs(pred - target))


def l2(pred: jax.Array, target: jax.Array) -> jax.Array:
    return jnp.mean(jnp.square(pred - target))


def charbonnier(pred: jax.Array, target: jax.Array, eps: float = 1e-3) -> jax.Array:
    return jnp.mean(jnp.sqrt(jnp.square(pred - target) + eps * eps))


PIXEL_LOSSES = {'l1': l1, 'l2': l2, 'charbonnier': charbonnier}


def pixel_loss(name: str):
    return registry.lookup(PIXEL_LOSSES, name, 'pixel loss')
