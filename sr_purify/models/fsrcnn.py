"""FSRCNN (Dong et al., ECCV 2016) with ESPCN's sub-pixel output, the smallest SR student.

5x5 feature extraction (d), 1x1 shrink (s), m 3x3 mapping layers, 1x1 expand (d), then a 3x3 conv
to 3*scale^2 channels and a pixel shuffle in place of the 9x9 deconvolution. Channel-wise PReLU as
the paper (or ReLU). As EDSR: DIV2K mean subtracted and added back, NHWC in [0, 1], fully
convolutional, `return_features=True` also returns LR-resolution taps. 17,132 parameters at x2.
"""

from typing import Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_purify.image_ops import check_scale
from sr_purify.models.conv import Conv
from sr_purify.models.edsr import DIV2K_MEAN, Features, SubPixelOutput


class ChannelPReLU(nn.Module):
    """PReLU with one learned negative slope per channel (as FSRCNN), initialised to 0.25."""

    init_slope: float = 0.25

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        slope = self.param(
            'slope', nn.initializers.constant(self.init_slope), (x.shape[-1],), jnp.float32
        )
        return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class FSRCNN(nn.Module):
    """FSRCNN(d, s, m) with a sub-pixel (pixel shuffle) output instead of the deconvolution.

    Defaults are the paper's d=56, s=12, m=4 (17,132 parameters at x2 on RGB).
    Taps: 'head' (after feature extraction, d ch), 'map_{i}' (after mapping layer i, 1-based, s ch),
    'body' (after expanding, d ch), all at LR resolution.
    """

    scale: int = 2
    features: int = 56  # d
    shrink: int = 12  # s
    num_maps: int = 4  # m
    activation: str = 'prelu'  # 'prelu' (channel-wise, as the paper) or 'relu'

    def __post_init__(self):
        check_scale(self.scale)
        if self.activation not in ('prelu', 'relu'):
            raise ValueError(f'activation {self.activation!r} not supported; valid: prelu, relu')
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, return_features: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Features]]:
        def act(name):
            return ChannelPReLU(name=name) if self.activation == 'prelu' else nn.relu

        mean = jnp.asarray(DIV2K_MEAN, x.dtype)
        feats = {}
        y = act('head_act')(Conv(self.features, (5, 5), name='head')(x - mean))
        feats['head'] = y
        y = act('shrink_act')(Conv(self.shrink, (1, 1), name='shrink')(y))
        for i in range(self.num_maps):
            y = act(f'map_{i + 1}_act')(Conv(self.shrink, (3, 3), name=f'map_{i + 1}')(y))
            feats[f'map_{i + 1}'] = y
        y = act('expand_act')(Conv(self.features, (1, 1), name='expand')(y))
        feats['body'] = y
        y = SubPixelOutput(self.scale, 3, name='upsampler')(y) + mean
        return (y, feats) if return_features else y
