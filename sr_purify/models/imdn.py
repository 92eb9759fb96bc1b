"""IMDN (Hui et al., ACM MM 2019), a lightweight SR student (the default student is the slim EDSR
in edsr.py).

Information multi-distillation blocks: each block runs four 3x3 convs; after each of the first three
a fraction of the channels is "distilled" (kept) and the rest is refined by the next conv; the
distilled parts are concatenated, fused by a 1x1 conv and reweighted by contrast-aware channel
attention (CCA), plus a block skip. Block outputs are concatenated and fused (1x1), then a 3x3 conv
and the global skip, then one conv + pixel shuffle straight to RGB (IMDN's single-stage upsampler,
also for x4). As EDSR: DIV2K mean subtracted and added back, NHWC in [0, 1], fully convolutional,
`return_features=True` also returns LR-resolution taps. 94,986 parameters at x2 with the defaults.
"""

from typing import Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_purify.image_ops import check_scale
from sr_purify.models.conv import Conv
from sr_purify.models.edsr import DIV2K_MEAN, Features, SubPixelOutput


class CCA(nn.Module):
    """Contrast-aware channel attention: per-channel (std + mean) -> 1x1 squeeze/excite, sigmoid."""

    features: int
    reduction: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        mean = jnp.mean(x, axis=(1, 2), keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=(1, 2), keepdims=True)
        # The epsilon keeps the gradient finite where a channel is constant (sqrt'(0) = inf).
        contrast = jnp.sqrt(var + 1e-12) + mean
        y = Conv(max(1, self.features // self.reduction), (1, 1), name='squeeze')(contrast)
        y = nn.relu(y)
        y = Conv(self.features, (1, 1), name='excite')(y)
        return x * nn.sigmoid(y)


class IMDB(nn.Module):
    """Information multi-distillation block (IMDN's IMDB)."""

    features: int
    distill_rate: float = 0.25
    negative_slope: float = 0.05
    cca_reduction: int = 16

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = int(self.features * self.distill_rate)
        if not 0 < d < self.features:
            raise ValueError(
                f'distill_rate {self.distill_rate} leaves {d} of {self.features} channels '
                'distilled; need 0 < distilled < features'
            )
        act = lambda t: nn.leaky_relu(t, self.negative_slope)
        y = act(Conv(self.features, (3, 3), name='conv_0')(x))
        distilled = [y[..., :d]]
        for i in (1, 2):
            y = act(Conv(self.features, (3, 3), name=f'conv_{i}')(y[..., d:]))
            distilled.append(y[..., :d])
        distilled.append(Conv(d, (3, 3), name='conv_3')(y[..., d:]))
        y = Conv(self.features, (1, 1), name='fuse')(jnp.concatenate(distilled, axis=-1))
        y = CCA(self.features, self.cca_reduction, name='cca')(y)
        return x + y


class IMDN(nn.Module):
    """IMDN student. Defaults are CPU-small (3 blocks x 32 ch, 94,986 parameters at x2).

    The paper's IMDN is `num_blocks=6, features=64` (about 0.7 M parameters).
    Taps: 'head' (first conv), 'block_{i}' (after IMDB i, 1-based), 'body' (after fuse, 3x3 conv and
    the global skip), all LR-resolution with `features` channels.
    """

    scale: int = 2
    num_blocks: int = 3
    features: int = 32
    distill_rate: float = 0.25
    negative_slope: float = 0.05
    cca_reduction: int = 16

    def __post_init__(self):
        check_scale(self.scale)
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, return_features: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Features]]:
        mean = jnp.asarray(DIV2K_MEAN, x.dtype)
        feats = {}
        h = Conv(self.features, (3, 3), name='head')(x - mean)
        feats['head'] = h
        y = h
        outs = []
        for i in range(self.num_blocks):
            y = IMDB(
                self.features,
                self.distill_rate,
                self.negative_slope,
                self.cca_reduction,
                name=f'block_{i + 1}',
            )(y)
            feats[f'block_{i + 1}'] = y
            outs.append(y)
        y = Conv(self.features, (1, 1), name='body_fuse')(jnp.concatenate(outs, axis=-1))
        y = nn.leaky_relu(y, self.negative_slope)
        y = Conv(self.features, (3, 3), name='body_conv')(y) + h
        feats['body'] = y
        y = SubPixelOutput(self.scale, 3, name='upsampler')(y) + mean
        return (y, feats) if return_features else y
