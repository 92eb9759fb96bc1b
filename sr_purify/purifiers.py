"""Purifiers by name: `build(config.purifier)` gives a pure `purify(params, x[, key]) -> x'`.

Every purifier maps NHWC images in [0, 1] to images of the same shape in [0, 1].

kind               what                                                 trained random  grad
none               identity                                             no      no      exact
bicubic_resample   antialiased bicubic down by `scale`, bicubic back up no      no      exact
jpeg               real JPEG (PIL, on the host) at `jpeg_quality`       no      no      BPDA
sr_resample        antialiased bicubic down, the student SR network up  yes     no      exact
nrp                NRP residual generator (models 'nrp'), same size     yes     no      exact

`input_noise > 0` adds Gaussian noise of that std before any kind, which makes it random: attacks
then need EOT (`Purifier.random` says so). JPEG runs through `jax.pure_callback` and is wrapped in
`attacks.bpda` (identity backward), so the same function serves prediction and adaptive attacks.

Feature extractors F for the purifier's training loss and its SSP perturbations are here too
(`build_feature`): 'random_cnn', 'classifier' (early layers of a trained classifier) or 'teacher'
(the SR teacher's features of the image itself).
"""

import dataclasses
import io
import logging
from typing import Any, Callable, Dict, Optional, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sr_purify import attacks, image_ops, models, registry
from sr_purify import restore as restore_lib

PyTree = Any

KINDS = ('none', 'bicubic_resample', 'jpeg', 'sr_resample', 'nrp')
TRAINABLE = frozenset({'sr_resample', 'nrp'})
# Non-differentiable kinds: their gradient is the BPDA approximation (identity backward).
NON_DIFFERENTIABLE = frozenset({'jpeg'})
HOST_CALLBACK = frozenset({'jpeg'})  # Run by PIL on the host through jax.pure_callback.
# Kinds that are random by themselves (none); `input_noise > 0` makes any kind random.
RANDOM = frozenset()


@dataclasses.dataclass(frozen=True, eq=False)
class Purifier:
    """A built purifier. Hashed by identity, so its functions can be static jit arguments.

    Attributes:
      kind: one of KINDS.
      raw: `raw(params, x) -> y`, the network output before clipping (trained kinds' loss sees
        values outside [0, 1]); for untrained kinds the purified image itself.
      init: `init(rng) -> params` at a random initialisation ({} for untrained kinds).
      random: whether the output depends on a key (then `purify` needs one and attacks need EOT).
      differentiable: False where gradients are the BPDA approximation.
      trainable: whether there are parameters to train.
      module: the flax module of a trained kind (None otherwise).
    """

    kind: str
    raw: Callable[[PyTree, jax.Array], jax.Array]
    init: Callable[[jax.Array], PyTree]
    random: bool
    differentiable: bool
    trainable: bool
    input_noise: float = 0.0
    module: Any = None
    # Whether `raw` can leave [0, 1]. Kinds whose output is always in range skip the clip, which
    # would otherwise halve the gradient at pixels exactly 0 or 1 (so 'none' is the identity).
    clip: bool = True

    def add_noise(self, x: jax.Array, key: Optional[jax.Array]) -> jax.Array:
        """x with this purifier's input noise (clipped to [0, 1]); x itself when it has none."""
        if self.input_noise <= 0:
            return x
        if key is None:
            raise ValueError(
                f'purifier {self.kind!r} with input_noise={self.input_noise} is '
                'random and needs a PRNG key'
            )
        noise = self.input_noise * jax.random.normal(key, x.shape, x.dtype)
        return jnp.clip(x + noise, min=0.0, max=1.0)

    def purify(self, params: PyTree, x: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
        """x' in [0, 1] with x's shape; `key` is required when `random`."""
        y = self.raw(params, self.add_noise(x, key))
        return jnp.clip(y, min=0.0, max=1.0) if self.clip else y

    def abstract_params(self) -> PyTree:
        return jax.eval_shape(self.init, jax.random.key(0))


# ---------------------------------------------------------------------------------------------
# JPEG on the host.


def _jpeg_host(x: np.ndarray, quality: int) -> np.ndarray:
    """Encode + decode every image (any leading dims) with PIL at `quality`; float32 [0, 1]."""
    from PIL import Image

    x = np.asarray(x)
    flat = x.reshape((-1,) + x.shape[-3:])
    out = np.empty(flat.shape, np.float32)
    for i, im in enumerate(flat):
        buf = io.BytesIO()
        u8 = np.round(np.clip(im, 0.0, 1.0) * 255.0).astype(np.uint8)
        Image.fromarray(u8).save(buf, format='JPEG', quality=int(quality))
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert('RGB'), np.float32) / 255.0
    return out.reshape(x.shape).astype(x.dtype)


def jpeg_compress(x: jax.Array, quality: int, mesh=None) -> jax.Array:
    """Real JPEG (PIL) of an NHWC [0, 1] batch inside jitted code, via `jax.pure_callback`.

    Not differentiable; wrap in `attacks.bpda`. With a `mesh`, each device compresses its own
    share of the batch (sharded on 'data'): a callback on a batch sharded over several devices
    otherwise gathers it to one device, and with fake CPU devices that collective deadlocks.
    """

    def callback(v):
        return jax.pure_callback(
            lambda a: _jpeg_host(a, quality),
            jax.ShapeDtypeStruct(v.shape, v.dtype),
            v,
            vmap_method='expand_dims',
        )

    if mesh is None or mesh.shape.get('data', 1) == 1:
        return callback(x)
    from jax.sharding import PartitionSpec as P

    return jax.shard_map(callback, mesh=mesh, in_specs=P('data'), out_specs=P('data'))(x)


# ---------------------------------------------------------------------------------------------
# Building purifiers.


def uses_host_callbacks(config: ml_collections.ConfigDict) -> bool:
    """True if a job config runs a purifier on the host (jpeg): see perf.reserve_callback_thread."""
    entries = list(config.get('purifiers', None) or []) + list(config.get('denoisers', None) or [])
    if config.get('purifier', None) is not None:
        entries.append(config.purifier)
    return any(e.get('kind') in HOST_CALLBACK for e in entries)


def _check_kind(kind: str) -> str:
    registry.lookup({k: k for k in KINDS}, kind, 'purifier kind')
    return kind


def _downscale(x: jax.Array, scale: int) -> jax.Array:
    h, w = x.shape[1:3]
    if h % scale or w % scale:
        raise ValueError(
            f'images of {h}x{w} are not divisible by the purifier scale {scale}; '
            f'use a scale that divides both'
        )
    return image_ops.resize_bicubic(x, (h // scale, w // scale))


def student_module(cfg: ml_collections.ConfigDict):
    """The SR student of an sr_resample purifier, from `cfg.student` (configs/student.py style)."""
    student = models.build(cfg.student)
    if student.scale != cfg.scale:
        raise ValueError(
            f'purifier.scale is {cfg.scale} but the student is x{student.scale}; set '
            f'--config.purifier.student.scale={cfg.scale}'
        )
    return student


def build(cfg: ml_collections.ConfigDict, mesh=None) -> Purifier:
    """The purifier `cfg.kind` (no I/O: trained parameters come from `initial_params`/`restore`)."""
    kind = _check_kind(cfg.kind)
    noise = float(cfg.get('input_noise', 0.0))
    if noise < 0:
        raise ValueError(f'purifier.input_noise must be >= 0, got {noise}')
    common = dict(
        kind=kind,
        random=kind in RANDOM or noise > 0,
        differentiable=kind not in NON_DIFFERENTIABLE,
        trainable=kind in TRAINABLE,
        input_noise=noise,
    )
    no_params = lambda rng: {}
    scale = int(cfg.get('scale', 2))
    if kind == 'none':
        return Purifier(raw=lambda p, x: x, init=no_params, clip=False, **common)
    if kind == 'bicubic_resample':

        def raw(params, x):
            del params
            return jax.image.resize(_downscale(x, scale), x.shape, method='bicubic')

        return Purifier(raw=raw, init=no_params, **common)
    if kind == 'jpeg':
        quality = int(cfg.get('jpeg_quality', 75))
        if not 1 <= quality <= 100:
            raise ValueError(f'purifier.jpeg_quality must be in 1..100, got {quality}')
        stage = attacks.bpda(lambda x: jpeg_compress(x, quality, mesh))
        # Decoded 8-bit images are in [0, 1] already.
        return Purifier(raw=lambda p, x: stage(x), init=no_params, clip=False, **common)
    if kind == 'sr_resample':
        student = student_module(cfg)

        def raw(params, x):
            return student.apply({'params': params}, _downscale(x, scale))

        def init(rng):
            return student.init(rng, jnp.zeros((1, 16, 16, 3), jnp.float32))['params']

        return Purifier(raw=raw, init=init, module=student, **common)
    # nrp
    generator = models.build(ml_collections.ConfigDict(dict(name='nrp', **cfg.nrp.to_dict())))

    def init(rng):
        params = generator.init(rng, jnp.zeros((1, 32, 32, 3), jnp.float32))['params']
        # Zero the last conv so the generator starts as the identity (as the student starts as
        # bicubic): training then only learns the correction, instead of first undoing a random
        # residual that puts the untrained output near 10 dB PSNR.
        params = dict(params)
        params['tail_1'] = jax.tree.map(jnp.zeros_like, params['tail_1'])
        return params

    return Purifier(
        raw=lambda p, x: generator.apply({'params': p}, x), init=init, module=generator, **common
    )


def initial_params(purifier: Purifier, cfg: ml_collections.ConfigDict, rng: jax.Array) -> PyTree:
    """Starting parameters for training: a trained purifier's (`init_checkpoint`, e.g. the MSE
    denoiser that Salman et al. 2020 fine-tune with the stability loss), else the distilled
    student for sr_resample, else random."""
    if cfg.get('init_checkpoint', ''):
        return _params_of_same_purifier(purifier, cfg.init_checkpoint)
    if purifier.kind != 'sr_resample':
        return purifier.init(rng)
    if not cfg.get('student_checkpoint', ''):
        logging.warning(
            'purifier sr_resample: no student_checkpoint given, so the SR network '
            'starts from a random initialisation (pass --config.purifier.'
            'student_checkpoint=<student workdir> to start from the distilled student)'
        )
        return purifier.init(rng)
    student = restore_lib.load(
        cfg.student_checkpoint,
        'sr',
        model_config=cfg.student,
        flag='--config.purifier.student_checkpoint',
        what='student',
    )
    logging.info('purifier sr_resample: student from %s step %d', student.directory, student.step)
    return student.params


def _one_line(value) -> str:
    return str(value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value)


def _params_of_same_purifier(purifier: Purifier, checkpoint: str) -> PyTree:
    """A purifier job's parameters, checked to fit `purifier` (kind, tree, every shape)."""
    flag = '--config.purifier.init_checkpoint'
    saved, params, saved_cfg, step = restore(checkpoint, flag=flag)
    want = purifier.abstract_params()
    fits = saved.kind == purifier.kind and jax.tree.structure(params) == jax.tree.structure(want)
    fits = fits and all(
        np.shape(a) == b.shape for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want))
    )
    if not fits:
        raise ValueError(
            f'{flag}={checkpoint} holds a {saved.kind!r} purifier whose parameters do not fit '
            f'the configured {purifier.kind!r} one; give both the same kind and architecture '
            f'(its config.json: {_one_line(saved_cfg.get(saved.kind, saved_cfg.kind))})'
        )
    logging.info('purifier %s: starting from %s step %d', purifier.kind, checkpoint, step)
    return params


def restore(
    checkpoint: str, mesh=None, flag: str = '--config.purifiers[i].checkpoint'
) -> Tuple[Purifier, PyTree, ml_collections.ConfigDict, int]:
    """(purifier, params, its config, step) of a trained purifier job (its workdir or export)."""
    saved = restore_lib.load(checkpoint, 'purifier', flag=flag)
    cfg = saved.config.purifier
    purifier = build(cfg, mesh)
    return purifier, saved.params, cfg, saved.step


# ---------------------------------------------------------------------------------------------
# Feature extractors F (label-free targets of SSP and of the feature loss).

FEATURE_KINDS = ('random_cnn', 'classifier', 'teacher')


@dataclasses.dataclass(frozen=True, eq=False)
class FeatureExtractor:
    """`fn(params, x) -> features` with fixed `params`; `logits(params, x)` for classifier F."""

    kind: str
    fn: Callable[[PyTree, jax.Array], jax.Array]
    params: PyTree
    logits: Optional[Callable[[PyTree, jax.Array], jax.Array]] = None
    source: str = ''


def _pick_tap(feats: Dict[str, jax.Array], layer: str, what: str) -> jax.Array:
    if layer not in feats:
        raise ValueError(f'{what} has no feature layer {layer!r}; valid: {", ".join(feats)}')
    return feats[layer]


def build_feature(
    cfg: ml_collections.ConfigDict, image_shape: Tuple[int, int, int] = (32, 32, 3)
) -> FeatureExtractor:
    """F from `config.purifier.feature`; its parameters are restored or initialised here, once."""
    kind = registry.lookup({k: k for k in FEATURE_KINDS}, cfg.kind, 'feature extractor')
    x = jnp.zeros((1, *image_shape), jnp.float32)
    if kind == 'random_cnn':
        net = models.build(
            ml_collections.ConfigDict(dict(name='random_cnn', **cfg.random_cnn.to_dict()))
        )
        params = net.init(jax.random.key(cfg.get('seed', 0)), x)
        return FeatureExtractor(kind, net.apply, params, source=f'random_cnn seed {cfg.seed}')
    if kind == 'classifier':
        restored = restore_lib.load(
            cfg.checkpoint,
            'classifier',
            model_config=cfg.classifier,
            flag='--config.purifier.feature.checkpoint',
        )
        net, variables, step = restored.module, restored.variables, restored.step
        _, feats = jax.eval_shape(lambda: net.apply(variables, x, return_features=True))
        _pick_tap(feats, cfg.layer, f'classifier {cfg.classifier.name}')
        layer = cfg.layer

        def fn(v, images):
            return net.apply(v, images, train=False, return_features=True)[1][layer]

        def logits(v, images):
            return net.apply(v, images, train=False)

        return FeatureExtractor(
            kind,
            fn,
            variables,
            logits,
            source=f'{cfg.classifier.name} {cfg.checkpoint} step {step}',
        )
    # teacher: the SR network's features of the image itself (as an LR input).
    restored = restore_lib.load(
        cfg.checkpoint,
        'sr',
        model_config=cfg.teacher,
        flag='--config.purifier.feature.checkpoint',
        what='teacher',
    )
    net, params, step = restored.module, restored.params, restored.step
    _, feats = jax.eval_shape(lambda: net.apply({'params': params}, x, return_features=True))
    _pick_tap(feats, cfg.layer, f'teacher {cfg.teacher.name}')
    layer = cfg.layer

    def fn(p, images):
        return net.apply({'params': p}, images, return_features=True)[1][layer]

    return FeatureExtractor(kind, fn, params, source=f'teacher {cfg.checkpoint} step {step}')
