"""Models by name: `build(config.model)` returns a flax.linen module.

SR models map NHWC [0, 1] LR images to HR images and take `return_features=True` to also return a
dict of named intermediate features (for distillation). Classifiers take images in [0, 1] and
normalise inside. Adding a model = one entry in MODELS.
"""

import dataclasses
from typing import Any, Callable, Dict

import flax.linen as nn
import ml_collections

from sr_purify import registry
from sr_purify.models import classifiers, edsr, nrp, students

MODELS: Dict[str, Callable[..., nn.Module]] = {
    'edsr': edsr.EDSR,
    'imdn': students.IMDN,
    'fsrcnn': students.FSRCNN,
    'resnet': classifiers.ResNet,
    'small_cnn': classifiers.SmallCNN,
    'random_cnn': classifiers.RandomFeatureCNN,
    'nrp': nrp.NRP,
}


def build(model_config: ml_collections.ConfigDict, **overrides: Any) -> nn.Module:
    """Builds `MODELS[model_config.name]` with the config's other fields as constructor arguments.

    An unknown field is refused with the valid field names, so a typo in a config never silently
    falls back to a default.
    """
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
