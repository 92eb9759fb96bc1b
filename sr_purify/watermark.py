"""An invisible, key-derived watermark in every output of a deployed SR model, and its test.

The mark is a small fixed random network of the LR input, m_K(x) = a * (f - local mean of f),
f = tanh(z_K(x)), where K (a seed) draws the network's weights and a is the strength in 1/255
units (the watermark job sets it from a PSNR budget, `strength_for_cost`). z_K looks at the local
high-pass luminance of x only, so flat regions carry no mark, and it is an *even* function of that
high-pass signal (products of odd features): an SR network's own correction to bicubic is mostly
an odd (linear, sharpening) function of it, so the mark is close to orthogonal to anything a model
does on its own. The field is averaged over flips and quarter turns, so it commutes with them as
an SR mapping does: a thief that augments its (query, answer) pairs with them, as every SR recipe
does, learns the mark itself rather than an average that cancels it. Being a smooth function of a
few LR pixels, it is what a convolutional surrogate trained on the marked outputs learns
alongside the SR mapping, so copies inherit it (README "Ownership" measures how much).

Verification is a Monte-Carlo rank test (exact under the null, no distributional assumption):
the statistic projects a suspect's residual (its output minus the owner's clean model on the
probe images) on the owner's mark, both with what any SR model's residual and every key's mark
have in common projected out (`generic_basis`, `common_directions`); the same statistic under
`null_keys` fresh random keys gives its distribution when the suspect does not know K. Under H0
("not derived from the owner's model", so independent of K) the owner's statistic is
exchangeable with the null ones and p = (1 + #{null >= owner}) / (1 + null_keys) satisfies
P(p <= alpha) <= alpha.
"""

import dataclasses
import functools
from typing import Any, Dict, List, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sr_purify import image_ops

# Luma weights (BT.601, as the SR metrics use) and the high-pass that feeds the mark network.
_LUMA = np.array([65.481, 128.553, 24.966], np.float32) / 255.0
_BLUR = np.array([1, 4, 6, 4, 1], np.float32) / 16.0
HIDDEN = 8  # Channels of the mark network.
HP_GAIN = 12.0  # Natural LR high-pass has std ~0.02-0.05: this puts tanh in its curved range.
BORDER = 4  # LR pixels left out at each probe edge: the receptive field of the mark network.
Z_GAIN = 8.0  # z has std ~0.1: tanh(8 z) gives a unit mark of rms ~0.47.


def mark_weights(seed: int) -> Dict[str, jax.Array]:
    """The mark network's weights for key `seed` (HWIO, no biases: zero in, zero out)."""
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    return {
        'conv1': jax.random.normal(k1, (5, 5, 1, HIDDEN)) / 5.0,
        'conv2': jax.random.normal(k2, (3, 3, HIDDEN, HIDDEN)) / np.sqrt(9 * HIDDEN),
        'mix': jax.random.normal(k3, (HIDDEN // 2,)) / np.sqrt(HIDDEN // 2),
    }


def _conv(x, w, padding='SAME'):
    return jax.lax.conv_general_dilated(
        x, w, (1, 1), padding, dimension_numbers=('NHWC', 'HWIO', 'NHWC')
    )


def _minus_local_mean(y: jax.Array) -> jax.Array:
    """(N, h, w, 1) minus its 5x5 binomial blur; edge-replicated so borders carry no step."""
    k = jnp.asarray(_BLUR)
    padded = jnp.pad(y, ((0, 0), (2, 2), (2, 2), (0, 0)), mode='edge')
    blur = _conv(_conv(padded, k.reshape(5, 1, 1, 1), 'VALID'), k.reshape(1, 5, 1, 1), 'VALID')
    return y - blur


def high_pass(lr: jax.Array) -> jax.Array:
    """Luma minus its 5x5 binomial blur, (N, h, w, 1)."""
    return _minus_local_mean(jnp.tensordot(lr, jnp.asarray(_LUMA), axes=[[-1], [0]])[..., None])


# The dihedral group D4 (flips and quarter turns) as (flip, quarter turns): what every SR recipe
# augments its training pairs with, a thief's included.
DIHEDRAL = tuple((flip, turns) for flip in (False, True) for turns in range(4))


def transform(x: jax.Array, flip: bool, turns: int, axes=(-3, -2)) -> jax.Array:
    """An element of D4 on the spatial `axes` of `x`: an optional left-right flip, then turns."""
    if flip:
        x = jnp.flip(x, axes[1])
    return jnp.rot90(x, turns, axes=axes)


def untransform(x: jax.Array, flip: bool, turns: int, axes=(-3, -2)) -> jax.Array:
    """The inverse of `transform(., flip, turns)`."""
    x = jnp.rot90(x, -turns, axes=axes)
    return jnp.flip(x, axes[1]) if flip else x


def _orbit_kernels(w: jax.Array) -> jax.Array:
    """(kh, kw, I, O) -> (kh, kw, I, 8 O): the kernel under each inverse element of D4, one
    group of O output channels per element (in DIHEDRAL order)."""
    return jnp.concatenate([untransform(w, f, t, axes=(0, 1)) for f, t in DIHEDRAL], -1)


def mark_field(weights: Dict[str, jax.Array], lr: jax.Array) -> jax.Array:
    """The unit-amplitude mark at LR resolution, (N, h, w, 1): even in the high-pass and
    equivariant under flips and quarter turns, mark_field(g x) = g mark_field(x).

    Why equivariant: a thief trains on flipped and rotated (query, answer) pairs, so its surrogate
    learns the mark averaged over D4, and a mark that is not equivariant averages to almost
    nothing (0.3 % of a random-filter mark was inherited; README "Ownership"). The field is the
    D4 average of a random network z, (1/8) sum_g g^-1 z(g x), computed in one pass: z(g x)
    equals g applied to z with every kernel transformed by g^-1 (kernels of odd size, 'SAME'
    zero padding), so the 8 branches are 8 groups of channels of one network.

    Why the local mean is taken out last: the even network has a mean that follows texture (a key
    brightens or darkens busy regions), which the test cannot use (it projects out the constant
    and the local high-pass energy) but which costs PSNR: with it, the strength a 0.08 dB budget
    allows on Set5 ranged 2.4-7.0 over 12 keys, set by that mean (README "Ownership").
    """
    hidden = jnp.tanh(_conv(HP_GAIN * high_pass(lr), _orbit_kernels(weights['conv1'])))
    half = HIDDEN // 2
    fields = []
    # One dense convolution per branch: 2.7x faster on XLA's CPU than one grouped convolution.
    for i, (flip, turns) in enumerate(DIHEDRAL):
        kernel = untransform(weights['conv2'], flip, turns, axes=(0, 1))
        h = jnp.tanh(_conv(hidden[..., i * HIDDEN : (i + 1) * HIDDEN], kernel))
        z = jnp.sum(h[..., :half] * h[..., half:] * weights['mix'], axis=-1, keepdims=True)
        fields.append(jnp.tanh(Z_GAIN * z))
    return _minus_local_mean(sum(fields) / len(fields))


def mark(weights: Dict[str, jax.Array], lr: jax.Array, scale: int, strength: float) -> jax.Array:
    """The mark added to the SR output of `lr`: (N, h*s, w*s, 3), under 2 * `strength`/255 (a unit
    field in [-1, 1] minus its local mean), the same on every channel (a luminance change),
    upsampled smoothly so JPEG keeps most of it."""
    field = mark_field(weights, lr)
    n, h, w, _ = field.shape
    field = jax.image.resize(field, (n, h * scale, w * scale, 1), 'linear')
    return (strength / 255.0) * jnp.broadcast_to(field, (n, h * scale, w * scale, 3))


def strength_for_cost(
    sets: Sequence[Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]],
    scale: int,
    max_cost_db: float,
    highest: float = 64.0,
    iterations: int = 24,
) -> float:
    """The largest strength whose mark lowers no set's mean PSNR by more than `max_cost_db`.

    `sets`: per dataset, one (sr, unit_mark, hr) per image: the clean model's float output, the
    mark at strength 1 (`mark(..., strength=1)`) and the HR image. The marked output is what
    `Watermarked` serves, clip(sr + strength * unit_mark), scored as the SR metrics score it (8-bit,
    Y, `scale` shaved). Why a budget, not a fixed strength: at one strength the cost differs
    between keys by up to 2x (0.070 and 0.126 dB on Set5 at strength 9), so a fixed strength meets a
    budget only for some keys. Bisection: the cost crosses the budget once (it grows as strength^2
    once past the cross term with the model's own error)."""
    if max_cost_db <= 0:
        raise ValueError(f'watermark.max_cost_db must be > 0 (dB of PSNR), got {max_cost_db}')
    clean = [[image_ops.psnr(sr, hr, scale) for sr, _, hr in rows] for rows in sets]

    def cost(strength: float) -> float:
        return max(
            float(
                np.mean(
                    [
                        base - image_ops.psnr(np.clip(sr + strength * unit, 0, 1), hr, scale)
                        for (sr, unit, hr), base in zip(rows, bases)
                    ]
                )
            )
            for rows, bases in zip(sets, clean)
        )

    low, high = 0.0, float(highest)
    if cost(high) <= max_cost_db:
        return high
    for _ in range(iterations):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if cost(mid) <= max_cost_db else (low, mid)
    return low


class Watermarked(nn.Module):
    """`net`'s SR output plus the mark of key `seed`. The wrapper shares `net`'s scope, so its
    parameters are exactly the unmarked model's (restore and export see the same tree)."""

    net: nn.Module
    seed: int
    strength: float
    scale: int

    def setup(self):
        nn.share_scope(self, self.net)

    def __call__(self, x, **kwargs):
        out = self.net(x, **kwargs)
        sr = out[0] if isinstance(out, tuple) else out
        marked = jnp.clip(sr + mark(mark_weights(self.seed), x, self.scale, self.strength), 0, 1)
        return (marked, *out[1:]) if isinstance(out, tuple) else marked


# ---------------------------------------------------------------------------------------------
# Verification.


@dataclasses.dataclass(frozen=True)
class Decision:
    statistic: float  # the suspect's residual along the owner's mark (1/255 units, all probes)
    z: float  # (statistic - null mean) / null std: how many null deviations above chance
    p_value: float  # rank p-value, (1 + #{null >= statistic}) / (1 + null_keys)
    null_keys: int
    alpha: float
    inherited: float  # statistic / a perfect copy's: the fraction of the mark the suspect carries

    @property
    def derived(self) -> bool:
        return self.p_value <= self.alpha

    def as_dict(self) -> Dict[str, Any]:
        return dict(dataclasses.asdict(self), derived=self.derived)


def null_seeds(owner_seed: int, count: int) -> np.ndarray:
    """`count` seeds other than the owner's, the same for every verification of that owner."""
    rng = np.random.default_rng([owner_seed, 0x5EED])
    seeds = rng.choice(2**31 - 1, size=count + 1, replace=False).astype(np.int64)
    return seeds[seeds != owner_seed][:count]


def luma(x) -> jax.Array:
    y = jnp.tensordot(jnp.asarray(x, jnp.float32), jnp.asarray(_LUMA), axes=[[-1], [0]])
    return y[..., None]


def generic_basis(probes: np.ndarray, border: int = BORDER) -> jax.Array:
    """Per probe, an orthonormal basis (N, h*w, F) of what any SR model's residual is made of:
    a constant, the LR high-pass at each offset of a 7x7 window (the linear, sharpening part) and
    its square at each offset of a 3x3 window (edge energy). Projecting it out of residuals and
    marks alike removes most of a model's own behaviour and keeps what is specific to a key; it
    depends on the probes only, never on a key, so the rank test stays exact."""
    hp = np.asarray(high_pass(jnp.asarray(probes)))[..., 0]
    feats = [np.ones_like(hp)]
    feats += [np.roll(hp, (dy, dx), (1, 2)) for dy in range(-3, 4) for dx in range(-3, 4)]
    feats += [np.roll(hp, (dy, dx), (1, 2)) ** 2 for dy in range(-1, 2) for dx in range(-1, 2)]
    g = np.stack(feats, -1) * _inside(probes.shape[1:3], border)[None, ..., None]
    n, h, w, f = g.shape
    return jnp.asarray(np.linalg.qr(g.reshape(n, h * w, f))[0])


def _inside(shape, border: int) -> np.ndarray:
    """1 inside, 0 within `border` pixels of an edge (padding and tiling differ there)."""
    m = np.zeros(shape, np.float32)
    m[border : shape[0] - border, border : shape[1] - border] = 1
    return m


def to_lr(residuals_y: jax.Array, lr_hw) -> jax.Array:
    """The adjoint of the mark's linear upsampling, (..., H, W, 1) -> (..., h, w): a residual's
    inner product with an upsampled mark equals this one's with the LR mark field."""
    hr_shape = residuals_y.shape
    lead = hr_shape[:-3]
    up = lambda f: jax.image.resize(f, (*lead, *hr_shape[-3:]), 'linear')  # noqa: E731
    (down,) = jax.linear_transpose(up, jnp.zeros((*lead, *lr_hw, 1), jnp.float32))(residuals_y)
    return down[..., 0]


# What the marks of all keys have in common: the top COMMON_DIMS principal directions of the
# marks of COMMON_KEYS public keys (a fixed stream, never the owner's choice). A thief's own
# copying error is a smooth function of the high-pass too, so it projects onto every key's mark
# alike and widens the null; removing the common directions from residuals and marks narrows it.
# Measured (README "Ownership", 199 null keys): z of a 2,000-step IMDN thief 2.7 -> 3.7, of
# 1,000-step EDSR thieves 4.8 -> 5.9, at 30 of 200 (10 gave 3.6 / 5.3, 100 gave 2.8 / 5.9).
COMMON_KEYS = 200
COMMON_DIMS = 30
_PUBLIC_STREAM = 0xC0FFEE


def _remove(x, basis, common):
    """x (..., n, h*w) with the per-probe generic basis, then the common directions, removed."""
    x = x - jnp.einsum('npf,...nf->...np', basis, jnp.einsum('npf,...np->...nf', basis, x))
    flat = x.reshape(*x.shape[:-2], -1)
    flat = flat - jnp.einsum('...d,dq->...q', jnp.einsum('...q,dq->...d', flat, common), common)
    return flat.reshape(x.shape)


def _field(seed, probes, basis, common):
    """(n, h*w) key `seed`'s unit mark field inside the border, with `_remove` applied."""
    n, h, w, _ = probes.shape
    inside = jnp.asarray(_inside((h, w), BORDER))
    field = (mark_field(mark_weights(seed), probes)[..., 0] * inside).reshape(n, h * w)
    return _remove(field, basis, common)


def _fields(seeds, probes, basis, common):
    """(keys, n, h*w): `_field` of each seed, one key at a time.

    Not batched over keys: vmap turns the per-key kernels into one grouped convolution, which
    XLA's CPU backend ran 6.6x slower per key (3.2 s against 0.48 s for 63 probes of 96^2)."""
    return jax.lax.map(lambda seed: _field(seed, probes, basis, common), seeds)


def _scores(seeds, probes, basis, common, residuals_lr):
    """(keys, suspects) projections of each residual on the direction of each key's mark, both
    with the generic basis and the common directions projected out (detect_many divides by a
    perfect copy's to get the fraction). On the direction, not on the mark itself: a perfect copy
    of the owner's mark then scores above every other key's (Cauchy-Schwarz), which a key with a
    weaker, correlated mark could beat under the plain projection <r, m> / |m|^2."""
    n, h, w, _ = probes.shape
    inside = jnp.asarray(_inside((h, w), BORDER))
    r = _remove((residuals_lr * inside).reshape(residuals_lr.shape[0], n, h * w), basis, common)

    def one(seed):
        field = _field(seed, probes, basis, common)
        return jnp.einsum('snp,np->s', r, field) / jnp.sqrt(
            jnp.maximum(jnp.sum(field * field), 1e-12)
        )

    return jax.lax.map(one, seeds)  # One key at a time, as `_fields`.


@functools.lru_cache(maxsize=None)
def _sharded(fn, devices: Tuple[jax.Device, ...], replicated: int):
    """`fn(seeds, *replicated args)` compiled with the keys split over `devices`."""
    spec = jax.sharding.PartitionSpec
    return jax.jit(
        jax.shard_map(
            fn,
            mesh=jax.sharding.Mesh(np.array(devices), ('keys',)),
            in_specs=(spec('keys'),) + (spec(),) * replicated,
            out_specs=spec('keys'),
        )
    )


def _on_devices(fn, seeds: np.ndarray, *args) -> np.ndarray:
    """`fn` with the keys split over this host's devices: XLA runs each of these small
    convolutions on one thread, so one device per core (as launch.py sets up) is what uses all
    of them. Seeds are padded to a multiple of the device count with repeats, dropped after."""
    devices = tuple(jax.local_devices())
    padded = np.resize(seeds, -(-len(seeds) // len(devices)) * len(devices))
    run = _sharded(fn, devices, len(args))
    return np.asarray(run(jnp.asarray(padded, jnp.uint32), *args))[: len(seeds)]


def common_directions(
    probes: np.ndarray, basis: jax.Array, keys: int = COMMON_KEYS, dims: int = COMMON_DIMS
) -> jax.Array:
    """(dims, N*h*w) orthonormal: the top principal directions (uncentred) of the marks of `keys`
    public keys on these probes, after the generic basis. Depends on the probes only, never on
    the owner's or a suspect's key, so the rank test stays exact."""
    seeds = np.random.default_rng(_PUBLIC_STREAM).choice(2**31 - 1, size=keys, replace=False)
    n, h, w, _ = probes.shape
    none = jnp.zeros((0, n * h * w), jnp.float32)
    fields = _on_devices(_fields, seeds, jnp.asarray(probes), basis, none).reshape(keys, -1)
    fields = np.asarray(fields, np.float64)
    gram = fields @ fields.T
    values, vectors = np.linalg.eigh(gram)  # ascending
    top = vectors[:, ::-1][:, :dims] / np.sqrt(np.maximum(values[::-1][:dims], 1e-30))
    return jnp.asarray((top.T @ fields).astype(np.float32))


def detect_many(
    suspects: Sequence[np.ndarray],
    reference: np.ndarray,
    probes: np.ndarray,
    seed: int,
    strength: float,
    null_keys: int = 999,
    alpha: float = 1e-3,
) -> List[Decision]:
    """For each suspect (its outputs on `probes`: (N, h*s, w*s, 3) floats in [0, 1]): is it
    derived from the model marked with key `seed`? `reference` is the owner's clean model on the
    same probes ((N, h, w, 3) LR). The null keys are shared, so many suspects cost one pass.
    """
    probes = np.asarray(probes, np.float32)
    reference = np.asarray(reference, np.float32)
    scale = reference.shape[1] // probes.shape[1]
    for s in suspects:
        if np.shape(s) != reference.shape:
            raise ValueError(
                f'suspect outputs have shape {np.shape(s)}; the probes need {reference.shape} '
                f'({len(probes)} probes of {probes.shape[1]}x{probes.shape[2]} LR pixels, x{scale})'
            )
    # The last row is a perfect copy (the exact mark, unquantised): the scale of "all of it".
    copy = np.asarray(mark(mark_weights(seed), jnp.asarray(probes), scale, strength))
    stacked = np.stack([np.asarray(s, np.float32) - reference for s in suspects] + [copy])
    residuals = luma(stacked)
    # On Y the mark (added to R, G and B alike) is sum(_LUMA) * strength/255 times the field.
    unit = float(_LUMA.sum()) / 255.0 * scale**2
    residuals_lr = to_lr(residuals, probes.shape[1:3]) / unit
    seeds = np.concatenate([[seed], null_seeds(seed, null_keys)]).astype(np.uint32)
    basis = generic_basis(probes)
    common = common_directions(probes, basis)
    stats = _on_devices(
        _scores, seeds, jnp.asarray(probes), basis, common, jnp.asarray(residuals_lr)
    )
    stats = stats.astype(np.float64)
    full = stats[0, -1]
    decisions = []
    for owner, null in zip(stats[0, :-1], stats[1:, :-1].T):
        p = (1 + int(np.sum(null >= owner))) / (1 + len(null))
        z = (owner - null.mean()) / max(null.std(), 1e-12)
        decisions.append(Decision(float(owner), float(z), p, len(null), alpha, float(owner / full)))
    return decisions


def detect(
    suspect: np.ndarray, reference, probes, seed: int, strength: float, **kwargs
) -> Decision:
    """`detect_many` for one suspect."""
    return detect_many([suspect], reference, probes, seed, strength, **kwargs)[0]
