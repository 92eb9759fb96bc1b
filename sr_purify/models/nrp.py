"""NRP-style purifier generator (Naseer et al., CVPR 2020, "A Self-supervised Approach for
Adversarial Robustness").

A same-size residual generator: 3x3 conv head, `num_blocks` residual-in-residual dense blocks
(RRDB, Wang et al. ESRGAN 2018, in a "lite" form: narrow width and growth), a trunk conv with a long
skip, then conv-LeakyReLU-conv to a 3-channel residual. Output = x + residual, not clipped: the
caller clips to [0, 1] (so a training loss can see, and penalise, values outside the range).
Defaults are CPU-small (2 RRDBs x 32 ch, growth 16): 380,259 parameters.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_purify.models.conv import Conv

# ESRGAN initialises its dense-block convs with Kaiming-normal weights scaled by 0.1, which keeps
# the deep residual-in-residual stack close to identity at the start: variance 0.1**2 * 2 / fan_in.
_small_init = nn.initializers.variance_scaling(0.02, 'fan_in', 'normal')


class ResidualDenseBlock(nn.Module):
    """`num_layers` densely connected 3x3 convs (growth channels each, LeakyReLU 0.2), a 3x3 fuse
    back to `features`, scaled residual."""

    features: int
    growth: int
    num_layers: int = 4
    res_scale: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inputs = [x]
        for i in range(self.num_layers):
            y = Conv(self.growth, (3, 3), kernel_init=_small_init, name=f'conv_{i}')(
                jnp.concatenate(inputs, axis=-1)
            )
            inputs.append(nn.leaky_relu(y, 0.2))
        y = Conv(self.features, (3, 3), kernel_init=_small_init, name='fuse')(
            jnp.concatenate(inputs, axis=-1)
        )
        return x + self.res_scale * y


class RRDB(nn.Module):
    """Residual-in-residual dense block: `num_dense` dense blocks and a scaled outer residual."""

    features: int
    growth: int
    num_dense: int = 3
    dense_layers: int = 4
    res_scale: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = x
        for i in range(self.num_dense):
            y = ResidualDenseBlock(
                self.features, self.growth, self.dense_layers, self.res_scale, name=f'rdb_{i}'
            )(y)
        return x + self.res_scale * y


class NRP(nn.Module):
    """Purifier generator: `__call__(x)` returns x + residual with x's shape (any H, W)."""

    num_blocks: int = 2
    features: int = 32
    growth: int = 16
    num_dense: int = 3  # dense blocks per RRDB (ESRGAN: 3)
    dense_layers: int = 4  # growth convs per dense block (ESRGAN: 4)
    res_scale: float = 0.2

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = Conv(self.features, (3, 3), name='head')(x)
        y = h
        for i in range(self.num_blocks):
            y = RRDB(
                self.features,
                self.growth,
                self.num_dense,
                self.dense_layers,
                self.res_scale,
                name=f'block_{i + 1}',
            )(y)
        y = Conv(self.features, (3, 3), name='trunk_conv')(y) + h
        y = nn.leaky_relu(Conv(self.features, (3, 3), name='tail_0')(y), 0.2)
        residual = Conv(x.shape[-1], (3, 3), name='tail_1')(y)
        return x + residual
