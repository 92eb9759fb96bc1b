"""Models by name: `build(config.model)` returns a flax.linen module.

SR models map NHWC [0, 1] LR images to HR images and take `return_features=True` to also return a
dict of named intermediate features (for distillation). Classifiers take images in [0, 1] and
normalise inside. Adding a model = one entry in MODELS.
"""

import dataclasses
from typing import Any, Callable, Dict

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from sr_purify import registry
from sr_purify.models import classifiers, edsr, fsrcnn, imdn, nrp

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'edsr': edsr.EDSR,
    'imdn': imdn.IMDN,
    'fsrcnn': fsrcnn.FSRCNN,
    'resnet': classifiers.ResNet,
    'small_cnn': classifiers.SmallCNN,
    'random_cnn': classifiers.RandomFeatureCNN,
    'nrp': nrp.NRP,
}


def flatten_config(model_config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The flat `{name, scale, **fields}` that `build` takes.

    The student config keeps one field group per architecture (`model.edsr`, `model.imdn`, ...)
    so `--config.model.name=imdn` alone switches the student; a flat config comes back as it is.
    """
    fields = model_config.get(model_config.name)
    if not isinstance(fields, (ml_collections.ConfigDict, dict)):
        return model_config
    fields = fields.to_dict() if isinstance(fields, ml_collections.ConfigDict) else dict(fields)
    flat = dict(name=model_config.name, scale=model_config.scale, **fields)
    return ml_collections.ConfigDict(flat)


def parameter_count(params: Any) -> int:
    return int(sum(np.prod(x.shape) for x in jax.tree.leaves(params)))


def build(model_config: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
    """Builds `MODELS[model_config.name]` with the config's other fields as constructor arguments.

    An unknown field is refused with the valid field names, so a typo in a config never silently
    falls back to a default.
    """
    model_config = flatten_config(model_config)
    cls = registry.lookup(MODELS, model_config.name, 'model')
    kwargs = {k: v for k, v in model_config.items() if k != 'name'}
    kwargs.update(overrides)
    valid = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
    unknown = sorted(set(kwargs) - valid)
    if unknown:
        raise ValueError(
            f'model {model_config.name!r} has no field(s) {unknown}; '
            f'valid: {", ".join(sorted(valid))}'
        )
    return cls(**kwargs)
