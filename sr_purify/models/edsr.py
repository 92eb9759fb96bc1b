"""EDSR (Lim et al., CVPRW 2017): residual blocks without batch norm, global skip, pixel shuffle.

The teacher is an EDSR; the slim student is the same module with few blocks and narrow width.
Inputs and outputs are NHWC images in [0, 1]; the MeanShift of the original is folded into a fixed
(RGB mean) subtraction and addition so a user never normalises by hand.
"""

from typing import Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_purify.image_ops import check_scale
from sr_purify.models.conv import Conv

UPSAMPLERS = ('edsr', 'espcn')

# DIV2K RGB mean used by EDSR's MeanShift.
DIV2K_MEAN = (0.4488, 0.4371, 0.4040)

Features = Dict[str, jax.Array]


def pixel_shuffle(x: jax.Array, scale: int) -> jax.Array:
    """Depth-to-space (N, H, W, C*s*s) -> (N, H*s, W*s, C), channel order as torch PixelShuffle."""
    n, h, w, c = x.shape
    oc = c // (scale * scale)
    x = x.reshape(n, h, w, oc, scale, scale)
    x = x.transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(n, h * scale, w * scale, oc)


class SubPixelOutput(nn.Module):
    """One 3x3 conv to `channels * scale**2` then pixel shuffle (ESPCN / IMDN output stage).

    `zero_init`: a zero kernel, so that with a bicubic skip the untrained network is bicubic."""

    scale: int
    channels: int = 3
    zero_init: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.zeros if self.zero_init else nn.initializers.lecun_normal()
        x = Conv(self.channels * self.scale * self.scale, (3, 3), kernel_init=init, name='conv')(x)
        return pixel_shuffle(x, self.scale)


class Upsampler(nn.Module):
    """Conv + pixel shuffle; x4 as two x2 stages (as EDSR), x2 and x3 in one."""

    features: int
    scale: int

    @nn.compact
    def __call__(self, x):
        check_scale(self.scale)
        stages = [2, 2] if self.scale == 4 else [self.scale]
        for i, s in enumerate(stages):
            x = Conv(self.features * s * s, (3, 3), name=f'conv_{i}')(x)
            x = pixel_shuffle(x, s)
        return x


class ResBlock(nn.Module):
    features: int
    res_scale: float = 1.0

    @nn.compact
    def __call__(self, x):
        y = Conv(self.features, (3, 3), name='conv_0')(x)
        y = nn.relu(y)
        y = Conv(self.features, (3, 3), name='conv_1')(y)
        return x + self.res_scale * y


def upsample_bicubic(x: jax.Array, scale: int) -> jax.Array:
    n, h, w, c = x.shape
    return jax.image.resize(x, (n, h * scale, w * scale, c), method='bicubic')


class EDSR(nn.Module):
    """EDSR. `return_features=True` also returns named taps for distillation.

    Taps: 'head' (after the first conv), 'block_{i}' (after residual block i, 1-based), 'body'
    (after the body's last conv plus the long skip), all at LR resolution with `features` channels.
    `bicubic_skip=True` adds the bicubic upscaled input to the output (global residual learning
    as in VDSR); it adds no parameters and lets short CPU runs beat bicubic from the start. The
    published EDSR has it off.

    `upsampler`: 'edsr' (the published one: conv to features x s^2, pixel shuffle, then a 3x3
    conv at HR resolution to RGB) or 'espcn' (one conv straight to 3 x s^2 channels and a pixel
    shuffle, as ESPCN, Shi et al. CVPR 2016, and IMDN end): no HR-resolution conv, which for the
    slim student is 30 % of its FLOPs and of its CPU latency.
    """

    scale: int = 2
    num_blocks: int = 16
    features: int = 64
    res_scale: float = 1.0
    bicubic_skip: bool = False
    upsampler: str = 'edsr'

    @nn.compact
    def __call__(
        self, x: jax.Array, return_features: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Features]]:
        mean = jnp.asarray(DIV2K_MEAN, x.dtype)
        feats = {}
        h = Conv(self.features, (3, 3), name='head')(x - mean)
        feats['head'] = h
        y = h
        for i in range(self.num_blocks):
            y = ResBlock(self.features, self.res_scale, name=f'block_{i + 1}')(y)
            feats[f'block_{i + 1}'] = y
        y = Conv(self.features, (3, 3), name='body_conv')(y) + h
        feats['body'] = y
        if self.upsampler not in UPSAMPLERS:
            raise ValueError(
                f'unknown upsampler {self.upsampler!r}; valid: {", ".join(UPSAMPLERS)}'
            )
        # Zero last conv with the bicubic skip: the untrained network is exactly bicubic, and
        # training only adds detail.
        if self.upsampler == 'espcn':
            y = SubPixelOutput(self.scale, zero_init=self.bicubic_skip, name='to_rgb')(y)
        else:
            y = Upsampler(self.features, self.scale, name='upsampler')(y)
            init = nn.initializers.zeros if self.bicubic_skip else nn.initializers.lecun_normal()
            y = Conv(3, (3, 3), kernel_init=init, name='tail')(y)
        y = y + (upsample_bicubic(x, self.scale) if self.bicubic_skip else mean)
        return (y, feats) if return_features else y
