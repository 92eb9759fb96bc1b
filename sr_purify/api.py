"""The Python entry point: a trained model from its folder, ready to use on arrays.

    import sr_purify
    sr = sr_purify.load_sr('workdirs/student')  # a teacher/student workdir, or an export folder
    big = sr.upscale(photo)                     # uint8 or float in [0, 1], any size, tiled
    victim = sr_purify.load_classifier('workdirs/classifier')
    labels = victim.predict(images)             # NHWC in [0, 1] -> class indices
    clean = sr_purify.load_purifier('workdirs/purifier').purify(images)

Everything goes through `restore.load` (the architecture comes from the job's config.json); an
export folder written by configs/export.py runs through the LiteRT interpreter instead of JAX.
"""

import dataclasses
import json
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from sr_purify import inference, purifiers, restore, sharding

# What configs/export.py writes beside its .tflite files: the scale and where they came from.
EXPORT_INFO = 'sr_model.json'
RUNTIMES = ('auto', 'jax', 'litert')


def is_export(path: str) -> bool:
    """Whether `path` is a folder written by the export job."""
    return os.path.isfile(os.path.join(path, EXPORT_INFO))


@dataclasses.dataclass
class SuperResolver:
    """An SR model: `upscale(image)` for whole images, `apply(batch)` for NHWC batches."""

    scale: int
    apply: Callable[[Any], Any]  # float32 (N, h, w, 3) in [0, 1] -> (N, h*s, w*s, 3)
    runtime: str  # 'jax' or 'litert'
    source: str  # the folder it came from (and the file, for LiteRT)
    model_config: Any = None
    tile: int = 192
    overlap: int = 24
    batch: int = 1  # tiles per call of apply: the local device count for JAX

    def upscale(
        self,
        image: np.ndarray,
        tile: Optional[int] = None,
        overlap: Optional[int] = None,
        self_ensemble: bool = False,
    ) -> np.ndarray:
        """`image` (HxW gray, HxWx3 RGB or HxWx4 RGBA; uint8, or float in [0, 1]) `scale` times
        larger, in the same layout and dtype kind, through overlapping tiles of `tile` pixels."""
        return inference.upscale_array(
            self.apply,
            np.asarray(image),
            self.scale,
            tile=self.tile if tile is None else tile,
            overlap=self.overlap if overlap is None else overlap,
            self_ensemble=self_ensemble,
            batch=self.batch,
        )


def load_sr(path: str, runtime: str = 'auto', int8: bool = False, threads: int = 0):
    """A SuperResolver from a teacher or student job's workdir (or its `student/` export), or
    from an export folder (configs/export.py). `runtime='auto'` runs an export folder's .tflite
    with LiteRT (`int8` picks the quantised one) and a workdir with JAX."""
    if runtime not in RUNTIMES:
        raise ValueError(f'unknown runtime {runtime!r}; valid: {", ".join(RUNTIMES)}')
    if is_export(path) and runtime in ('auto', 'litert'):
        from sr_purify import export  # LiteRT only: no TensorFlow, no jax compilation.

        with open(os.path.join(path, EXPORT_INFO)) as f:
            info = json.load(f)
        kind = 'int8' if int8 else 'f32'
        file = os.path.join(path, info['files'][kind])
        fixed = {
            tuple(int(d) for d in size.split('x')): os.path.join(path, names[kind])
            for size, names in info['files'].get('fixed', {}).items()
        }
        model = export.LiteRTByShape(file, fixed, num_threads=threads or os.cpu_count() or 1)
        return SuperResolver(int(info['scale']), model, 'litert', file, info.get('model'))
    if runtime == 'litert':
        raise ValueError(f'{path!r} is no export folder (no {EXPORT_INFO}); run configs/export.py')
    if is_export(path):  # runtime='jax' on an export folder: the checkpoint it was made from.
        with open(os.path.join(path, EXPORT_INFO)) as f:
            path = json.load(f)['checkpoint']
    model = restore.load(path, 'sr')
    apply, batch = _sharded_apply(model.module, model.params)
    return SuperResolver(
        model.scale, apply, 'jax', model.directory, model.model_config, batch=batch
    )


def _sharded_apply(module, params):
    """(apply, devices): apply runs a batch whose size the local device count divides split over
    those devices, any other batch on the first. On a CPU host split into devices (launch.py's
    default) each device runs its convolutions on its own core, so one image at a time would
    leave the other cores idle for a slim student."""
    devices = jax.local_devices()
    mesh = Mesh(np.asarray(devices), ('data',))  # local devices: inference is per process
    data, whole = sharding.data_sharding(mesh), sharding.replicated(mesh)
    forward = lambda p, x: module.apply({'params': p}, x)
    on_one = jax.jit(forward)
    split = jax.jit(forward, in_shardings=(whole, data), out_shardings=data)
    one_params = jax.device_put(params, devices[0])
    all_params = jax.device_put(params, whole) if len(devices) > 1 else one_params

    def apply(x):
        if len(devices) > 1 and x.shape[0] % len(devices) == 0:
            return split(all_params, x)
        return on_one(one_params, x)

    return apply, len(devices)


@dataclasses.dataclass
class Classifier:
    """A trained classifier: `logits(images)` and `predict(images)` on NHWC batches in [0, 1]."""

    logits: Callable[[Any], Any]
    num_classes: int
    source: str

    def predict(self, images: np.ndarray) -> np.ndarray:
        return np.asarray(jnp.argmax(self.logits(jnp.asarray(images, jnp.float32)), -1))


def load_classifier(path: str) -> Classifier:
    """A Classifier from a classifier job's workdir (BatchNorm in inference mode)."""
    model = restore.load(path, 'classifier')
    module, variables = model.module, jax.device_put(model.variables)
    logits = jax.jit(lambda x: module.apply(variables, x, train=False))
    return Classifier(logits, int(model.model_config.get('num_classes', 10)), model.directory)


@dataclasses.dataclass
class Purifier:
    """A trained purifier: `purify(images[, key])` maps NHWC [0, 1] images to purified ones."""

    purifier: purifiers.Purifier
    params: Any
    source: str

    def purify(self, images: np.ndarray, key: Optional[jax.Array] = None) -> np.ndarray:
        if self.purifier.random and key is None:
            key = jax.random.key(0)
        x = jnp.asarray(images, jnp.float32)
        return np.asarray(self.purifier.purify(self.params, x, key))


def load_purifier(path: str) -> Purifier:
    """A Purifier from a purifier job's workdir (or its `purifier/` export)."""
    purifier, params, _, step = purifiers.restore(path)
    return Purifier(purifier, params, f'{path} step {step}')
