"""Teacher -> student distillation losses, chosen and weighted by `config.distill`.

`config.distill.losses` maps a loss name to its weight (0 switches it off):

* `pixel`: L1 between the student's SR output and the HR image (no teacher involved).
* `output`: L1 between the student's SR output and the teacher's.
* `feature` (FitNets, Romero et al. ICLR 2015): each student tap goes through a learned 1x1 conv
  adapter to the teacher tap's channel count; L1 (or L2, `feature_distance`) to the teacher tap.
* `affinity` (FAKD, He et al. ICIP 2020): spatial affinity matrices, L1 between teacher and student.
* `attention` (attention transfer, Zagoruyko & Komodakis ICLR 2017): L2 distance of normalised
  spatial attention maps.
* `upcycled` (data upcycling, after DUKD, Zhang et al. 2023, arXiv:2309.14162): extra inputs that
  have no HR image, so only the teacher can label them: `zoom_in`, an LR-sized crop of the HR
  patch itself, and `zoom_out`, the LR patch downscaled once more by the scale
  (`config.distill.upcycle`, a subset). Both networks see them; L1 between the student's and the
  teacher's SR, averaged over the kinds. It uses the teacher's outputs alone, so a teacher behind
  an API allows it. `config.distill.upcycle_labels='ground_truth'` is the control that tells the
  teacher's part from the extra inputs': zoom-outs labelled by the LR patch they came from, no
  teacher (zoom-ins have no ground truth, so only `zoom_out` is allowed there).

The last three need the teacher's intermediate features (`FEATURE_LOSSES`); they compare the taps
named by `config.distill.feature_pairs`, a list of (student tap, teacher tap), and each is averaged
over the pairs so a weight means the same whatever the number of pairs. Teacher and student taps
are at the same LR resolution; only `feature` needs matching channels, which its adapters provide.
Adapters are trained with the student but are not part of it: the exported student has none.

`teacher_access='outputs'` models a teacher served behind an API: only its SR outputs may be used,
so the feature losses are refused when the config is checked.
"""

from typing import Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sr_purify import image_ops, losses

LOSSES = ('pixel', 'output', 'feature', 'affinity', 'attention', 'upcycled')
FEATURE_LOSSES = ('feature', 'affinity', 'attention')
TEACHER_ACCESS = ('features', 'outputs')
FEATURE_DISTANCES = ('l1', 'l2')
UPCYCLE = ('zoom_in', 'zoom_out')
UPCYCLE_LABELS = ('teacher', 'ground_truth')

Features = Dict[str, jax.Array]
Pair = Tuple[str, str]


# ---------------------------------------------------------------------------------------------
# Config checks (before any work is done).


def active_losses(distill: ml_collections.ConfigDict) -> Dict[str, float]:
    """`{name: weight}` of the losses with non-zero weight; an unknown name lists the valid ones."""
    weights = dict(distill.losses)
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown:
        raise ValueError(f'unknown distillation loss {unknown[0]!r}; valid: {", ".join(LOSSES)}')
    for name, w in weights.items():
        if not isinstance(w, (int, float)) or w < 0:
            raise ValueError(f'distill.losses.{name} must be a weight >= 0, got {w!r}')
    active = {k: float(w) for k, w in weights.items() if w}
    if not active:
        raise ValueError(
            f'config.distill.losses gives every loss weight 0; give at least one of '
            f'{", ".join(LOSSES)} a positive weight'
        )
    return active


def uses_teacher_features(distill: ml_collections.ConfigDict) -> bool:
    return any(name in FEATURE_LOSSES for name in active_losses(distill))


def feature_pairs(distill: ml_collections.ConfigDict) -> Tuple[Pair, ...]:
    pairs = tuple((str(s), str(t)) for s, t in distill.get('feature_pairs', ()))
    if len(set(pairs)) != len(pairs):
        raise ValueError(f'config.distill.feature_pairs repeats a pair: {list(pairs)}')
    return pairs


def check_config(
    distill: ml_collections.ConfigDict,
    student_taps: Mapping[str, int] = None,
    teacher_taps: Mapping[str, int] = None,
) -> Dict[str, float]:
    """Validates `config.distill` and returns the active `{loss: weight}`.

    With the taps of both networks (`{name: channels}`) it also checks that every pair names taps
    that exist, listing the valid ones.
    """
    active = active_losses(distill)
    access = distill.get('teacher_access', 'features')
    if access not in TEACHER_ACCESS:
        raise ValueError(
            f'unknown distill.teacher_access {access!r}; valid: {", ".join(TEACHER_ACCESS)}'
        )
    wanted = [n for n in active if n in FEATURE_LOSSES]
    if access == 'outputs' and wanted:
        raise ValueError(
            f"distill.teacher_access=outputs allows only the teacher's SR outputs, "
            f'but losses {wanted} need its features; set their weights to 0 or use '
            f'teacher_access=features'
        )
    if 'upcycled' in active:
        kinds = tuple(distill.get('upcycle', UPCYCLE))
        bad = [k for k in kinds if k not in UPCYCLE]
        if bad or not kinds:
            raise ValueError(
                f'distill.upcycle must be a non-empty subset of '
                f'{", ".join(UPCYCLE)}; got {list(kinds)}'
            )
        labels = distill.get('upcycle_labels', 'teacher')
        if labels not in UPCYCLE_LABELS:
            raise ValueError(
                f'unknown distill.upcycle_labels {labels!r}; valid: {", ".join(UPCYCLE_LABELS)}'
            )
        if labels == 'ground_truth' and 'zoom_in' in kinds:
            raise ValueError(
                "distill.upcycle_labels='ground_truth' has no label for zoom_in "
                "inputs (they have no HR); set distill.upcycle=('zoom_out',)"
            )
    if distill.get('feature_distance', 'l1') not in FEATURE_DISTANCES:
        raise ValueError(
            f'unknown distill.feature_distance {distill.feature_distance!r}; valid: '
            f'{", ".join(FEATURE_DISTANCES)}'
        )
    if wanted:
        pairs = feature_pairs(distill)
        if not pairs:
            raise ValueError(
                f'losses {wanted} need config.distill.feature_pairs, a list of '
                f'(student tap, teacher tap), e.g. [("body", "body")]'
            )
        for who, taps, index in (('student', student_taps, 0), ('teacher', teacher_taps, 1)):
            if taps is None:
                continue
            for pair in pairs:
                if pair[index] not in taps:
                    raise ValueError(
                        f'feature pair {pair}: the {who} has no tap {pair[index]!r}; '
                        f'valid: {", ".join(taps)}'
                    )
    return active


# ---------------------------------------------------------------------------------------------
# The losses, on NHWC arrays.


def _safe_norm(x: jax.Array, axis) -> jax.Array:
    """L2 norm that is exactly 0 with a zero (not NaN) gradient where x is all zeros."""
    sq = jnp.sum(jnp.square(x), axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


pixel_loss = losses.l1  # The student against the HR image.


def output_loss(sr: jax.Array, teacher_sr: jax.Array) -> jax.Array:
    return losses.l1(sr, jax.lax.stop_gradient(teacher_sr))


def zoom_in_inputs(hr: jax.Array, patch: int, rng: jax.Array) -> jax.Array:
    """Upcycled inputs: a random `patch`^2 crop of each HR image (N, H, W, C), used as LR."""
    n, h, w, _ = hr.shape
    if h < patch or w < patch:
        raise ValueError(f'HR crops of {h}x{w} are smaller than the zoom-in patch {patch}')
    corners = jax.random.randint(rng, (n, 2), 0, jnp.array([h - patch + 1, w - patch + 1]))
    crop = lambda img, yx: jax.lax.dynamic_slice(
        img, (yx[0], yx[1], 0), (patch, patch, img.shape[-1])
    )
    return jax.vmap(crop)(hr, corners)


def zoom_out_inputs(lr: jax.Array, scale: int) -> jax.Array:
    """Upcycled inputs: the LR batch downscaled by `scale` (antialiased bicubic, 8-bit values)."""
    _, h, w, _ = lr.shape
    small = image_ops.resize_bicubic(lr, (max(h // scale, 1), max(w // scale, 1)))
    return jnp.round(jnp.clip(small, 0.0, 1.0) * 255.0) / 255.0


def upcycled_inputs(
    kinds: Sequence[str], lr: jax.Array, hr: jax.Array, scale: int, rng: jax.Array
) -> Dict[str, jax.Array]:
    """`{kind: inputs}` for the kinds of `config.distill.upcycle`."""
    make = {
        'zoom_in': lambda: zoom_in_inputs(hr, lr.shape[1], rng),
        'zoom_out': lambda: zoom_out_inputs(lr, scale),
    }
    return {k: make[k]() for k in kinds}


def adapter_name(pair: Pair) -> str:
    return f'{pair[0]}_to_{pair[1]}'


def init_adapters(
    rng: jax.Array,
    pairs: Sequence[Pair],
    student_taps: Mapping[str, int],
    teacher_taps: Mapping[str, int],
) -> Dict[str, Dict[str, jax.Array]]:
    """One 1x1 conv per pair (flax Conv layout: kernel (1, 1, C_s, C_t), bias (C_t,))."""
    init = nn.initializers.lecun_normal()
    adapters = {}
    for pair, key in zip(pairs, jax.random.split(rng, max(len(pairs), 1))):
        cs, ct = student_taps[pair[0]], teacher_taps[pair[1]]
        adapters[adapter_name(pair)] = {
            'kernel': init(key, (1, 1, cs, ct), jnp.float32),
            'bias': jnp.zeros((ct,), jnp.float32),
        }
    return adapters


def adapt(adapter: Mapping[str, jax.Array], f: jax.Array) -> jax.Array:
    """The 1x1 convolution: (N, H, W, C_s) -> (N, H, W, C_t)."""
    return jnp.einsum('nhwc,cd->nhwd', f, adapter['kernel'][0, 0]) + adapter['bias']


def feature_loss(
    student_f: jax.Array,
    teacher_f: jax.Array,
    adapter: Mapping[str, jax.Array],
    distance: str = 'l1',
) -> jax.Array:
    """FitNet hint: mean |adapt(F_s) - F_t| (or its square with distance 'l2')."""
    diff = adapt(adapter, student_f) - jax.lax.stop_gradient(teacher_f)
    return jnp.mean(jnp.abs(diff) if distance == 'l1' else jnp.square(diff))


def spatial_affinity(f: jax.Array, eps: float = 1e-7) -> jax.Array:
    """FAKD's spatial affinity: (N, H, W, C) -> (N, HW, HW).

    As in the paper and its code: each spatial position's C-vector is divided by its L2 norm
    (plus eps = 1e-7), F~_i = F_i / (||F_i||_2 + eps), and A = F~ F~^T over the HW positions,
    so A_ij is the cosine similarity of positions i and j (values in [-1, 1], diagonal 1).
    """
    n, h, w, c = f.shape
    f = f.reshape(n, h * w, c)
    f = f / (_safe_norm(f, -1)[..., None] + eps)
    return jnp.einsum('nic,njc->nij', f, f)


def affinity_loss(student_f: jax.Array, teacher_f: jax.Array) -> jax.Array:
    """FAKD: mean |A_s - A_t| over the N x HW x HW entries (the paper's (1/|A|) ||.||_1)."""
    a_t = jax.lax.stop_gradient(spatial_affinity(teacher_f))
    return jnp.mean(jnp.abs(spatial_affinity(student_f) - a_t))


def attention_map(f: jax.Array, p: float = 2.0, eps: float = 1e-12) -> jax.Array:
    """Attention transfer's map: mean over channels of |F|^p, flattened, L2-normalised: (N, HW)."""
    a = jnp.mean(jnp.abs(f) ** p, axis=-1).reshape(f.shape[0], -1)
    return a / jnp.maximum(_safe_norm(a, -1)[:, None], eps)


def attention_loss(student_f: jax.Array, teacher_f: jax.Array, p: float = 2.0) -> jax.Array:
    """Mean over the batch of ||a_s - a_t||_2 (the paper's beta/2 is left to the loss weight)."""
    a_t = jax.lax.stop_gradient(attention_map(teacher_f, p))
    return jnp.mean(_safe_norm(attention_map(student_f, p) - a_t, -1))


# ---------------------------------------------------------------------------------------------
# The weighted sum the trainer minimises.


def make_loss(distill: ml_collections.ConfigDict):
    """`loss(sr, feats, teacher_sr, teacher_feats, hr, adapters, upcycled=None) -> (total, terms)`.

    `feats` / `teacher_feats` are the networks' tap dicts (unused unless a feature loss is on);
    `adapters` is the dict `init_adapters` makes; `upcycled` is a list of (student SR, label)
    pairs, one per kind of upcycled input (needed when that loss is on). `terms` ({name: value})
    are unweighted; the total is weighted.
    """
    active = check_config(distill)
    pairs = feature_pairs(distill)
    distance = distill.get('feature_distance', 'l1')
    p = float(distill.get('attention_p', 2.0))

    def over_pairs(fn, feats, teacher_feats):
        return sum(fn(pair, feats[pair[0]], teacher_feats[pair[1]]) for pair in pairs) / len(pairs)

    def loss(sr, feats, teacher_sr, teacher_feats, hr, adapters, upcycled=None):
        terms = {}
        for name in active:
            if name == 'pixel':
                terms[name] = pixel_loss(sr, hr)
            elif name == 'output':
                terms[name] = output_loss(sr, teacher_sr)
            elif name == 'feature':
                terms[name] = over_pairs(
                    lambda pair, fs, ft: feature_loss(
                        fs, ft, adapters[adapter_name(pair)], distance
                    ),
                    feats,
                    teacher_feats,
                )
            elif name == 'affinity':
                terms[name] = over_pairs(
                    lambda _, fs, ft: affinity_loss(fs, ft), feats, teacher_feats
                )
            elif name == 'attention':
                terms[name] = over_pairs(
                    lambda _, fs, ft: attention_loss(fs, ft, p), feats, teacher_feats
                )
            elif name == 'upcycled':
                if upcycled is None:
                    raise ValueError(
                        'the upcycled loss needs (student SR, label) of the upcycled inputs'
                    )
                terms[name] = sum(output_loss(s, t) for s, t in upcycled) / len(upcycled)
        total = sum(active[name] * value for name, value in terms.items())
        return total, terms

    return loss
