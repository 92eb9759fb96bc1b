"""What the SR robustness evaluation attacks and scores: the models (bicubic, restored SR
checkpoints; a gray image goes through an RGB model replicated in, channel mean out), the images
(HR mod-cropped, LR by MATLAB-style bicubic), the basic attack of Choi et al. 2019 compiled once
per image shape (eps and the step traced), the universal perturbation tiled over each image, the
defended functions, and the PSNR of the SR convention. See sr_robustness.py for the evaluation.
"""

import dataclasses
import functools
from typing import Any, Callable, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sr_purify import attacks, image_ops
from sr_purify.evaluators import sr_defences
from sr_purify.evaluators.sr import make_lr
from sr_purify.image_ops import Image
from sr_purify.models import parameter_count

PyTree = Any


@dataclasses.dataclass(frozen=True, eq=False)
class SRModel:
    """A model of the table: `fn(params, x) -> sr` on NHWC RGB batches in [0, 1]."""

    name: str
    fn: Callable[[PyTree, jax.Array], jax.Array]
    params: PyTree
    scale: int
    source: str = ''


# ---------------------------------------------------------------------------------------------
# Models.


def _bicubic(scale: int, params, x: jax.Array) -> jax.Array:
    del params
    return image_ops.resize_bicubic(x, (x.shape[1] * scale, x.shape[2] * scale))


def bicubic(scale: int) -> SRModel:
    """Bicubic upscaling: the linear baseline, whose output change is bounded by the input's."""
    image_ops.check_scale(scale)
    return SRModel('bicubic', functools.partial(_bicubic, scale), {}, scale, 'no parameters')


def _module_apply(module, variables, x):
    return module.apply(variables, x)


@functools.lru_cache(maxsize=None)
def _module_fn(module):
    """One function object per architecture (flax modules compare by their fields), so models of
    the same architecture share their compiled attacks; the parameters are traced."""
    return functools.partial(_module_apply, module)


def restored_model(name: str, restored, scale: int, flag: str = '') -> SRModel:
    """An SR model from `restore.load(path, 'sr')`; a ValueError unless it is an x`scale` one."""
    if restored.scale != scale:
        raise ValueError(
            f'{name} ({restored.directory}) is trained for x{restored.scale}, not x{scale}; pass '
            f'--config.scale={restored.scale}, or {flag or "a checkpoint"} trained at x{scale}'
        )
    source = (
        f'{restored.directory} step {restored.step}, {parameter_count(restored.params):,} params'
    )
    return SRModel(name, _module_fn(restored.module), restored.variables, scale, source)


def _gray(fn, params, x):
    """A gray image through an RGB model: replicated in, channel mean out."""
    return jnp.mean(fn(params, jnp.repeat(x, 3, axis=-1)), axis=-1, keepdims=True)


@functools.lru_cache(maxsize=None)
def image_fn(fn, channels: int):
    """The function of an image's own channels: `fn` (RGB) or its gray form (one object per
    (fn, channels), so jitted attacks reuse their compiled code)."""
    return fn if channels == 3 else functools.partial(_gray, fn)


@functools.lru_cache(maxsize=None)
def defended(defence, fn, eot_draws: int):
    """defence∘fn as the adaptive attacker differentiates it (one object per argument tuple)."""
    return sr_defences.attack_fn(defence, fn, eot_draws)


# ---------------------------------------------------------------------------------------------
# Images, attacks, scores.


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    name: str
    hr: np.ndarray  # uint8, mod-cropped, HxW (gray) or HxWx3
    x: jax.Array  # float32 LR (1, h, w, channels) in [0, 1]


def prepare(images: Sequence[Image], scale: int) -> List[Sample]:
    out = []
    for im in images:
        hr = image_ops.modcrop(im.pixels, scale)
        lr = make_lr(hr, scale).astype(np.float32) / 255.0
        if lr.ndim == 2:
            lr = lr[..., None]
        out.append(Sample(im.name, hr, jnp.asarray(lr[None])))
    return out


def psnr(sr: jax.Array, reference, scale: int) -> float:
    """PSNR (Y, shaved, SR quantised) of a (1, H, W, C) output against HR or another output."""
    ref = np.asarray(reference)
    return image_ops.psnr(np.asarray(sr)[0], ref[0] if ref.ndim == 4 else ref, scale)


@functools.partial(jax.jit, static_argnums=0)
def run_model(fn, params, x):
    """fn(params, x), compiled once per (fn, shape)."""
    return fn(params, x)


@functools.partial(jax.jit, static_argnums=(0, 1))
def run_defence(defence, fn, params, x, key):
    """defence(fn, params, x, key): one draw when the defence is random."""
    return defence(fn, params, x, key)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _basic(fn, steps: int, params, x, key, eps, step_size):
    return attacks.sr_attack(fn, params, x, key, eps=eps, steps=steps, step_size=step_size)


def _step(step_size: Optional[float], eps: float, steps: int) -> np.float32:
    return np.float32(eps / max(steps, 1) if step_size is None else step_size)


def basic_attack(fn, params, x, key, eps: float, steps: int, step_size=None) -> jax.Array:
    """The basic attack of Choi et al. on `fn(params, x)`, compiled once per shape of x."""
    return _basic(fn, int(steps), params, x, key, np.float32(eps), _step(step_size, eps, steps))


def tile(delta: jax.Array, shape: Sequence[int]) -> jax.Array:
    """The (p, q, 3) patch tiled from the top-left corner to an NHWC `shape` (batch 1); a gray
    shape (one channel) takes its channel mean."""
    h, w, c = shape[1:]
    p, q = delta.shape[:2]
    tiled = jnp.tile(delta, (-(-h // p), -(-w // q), 1))[:h, :w]
    if c == 1:
        tiled = jnp.mean(tiled, axis=-1, keepdims=True)
    return tiled[None]


def apply_universal(delta: jax.Array, x: jax.Array, eps) -> jax.Array:
    """x + tile(delta), projected onto the eps-ball around x and [0, 1]."""
    return attacks.project(x + tile(delta, x.shape), x, eps, 'linf')


run_universal = jax.jit(apply_universal)


@functools.partial(jax.jit, static_argnums=0)
def _universal_grad(fn, params, x, reference, delta, eps):
    def loss(d):
        return jnp.mean(jnp.square(fn(params, apply_universal(d, x, eps)) - reference))

    return jax.grad(loss)(delta)


def universal_perturbation(
    model: SRModel,
    samples: Sequence[Sample],
    key,
    eps: float,
    steps: int,
    step_size: Optional[float] = None,
    patch: int = 32,
    references: Optional[Sequence[jax.Array]] = None,
) -> np.ndarray:
    """One (patch, patch, 3) perturbation with L-inf norm <= eps for every image of `samples`."""
    step = _step(step_size, eps, steps)
    eps32 = np.float32(eps)
    start = np.float32(min(float(step), eps))
    delta = jax.random.uniform(key, (patch, patch, 3), jnp.float32, -1.0, 1.0) * start
    fns = [image_fn(model.fn, s.x.shape[-1]) for s in samples]
    if references is None:
        references = [run_model(f, model.params, s.x) for f, s in zip(fns, samples)]
    for _ in range(steps):
        grad = sum(
            _universal_grad(f, model.params, s.x, r, delta, eps32)
            for f, s, r in zip(fns, samples, references)
        )
        delta = jnp.clip(delta + step * jnp.sign(grad), -eps32, eps32)
    return np.asarray(delta)
