"""CIFAR classifiers and a label-free random feature extractor.

All take NHWC images in [0, 1] and normalise by the CIFAR-10 per-channel mean and std inside, so
attacks and purifiers only ever see [0, 1] images.

* `ResNet` (He et al. 2016, section 4.2): depth 6n+2, three stages of n basic blocks at widths
  16/32/64 (times `width`), BatchNorm, global average pool, linear head. `shortcut='A'` (default,
  the paper's CIFAR choice) is parameter-free: stride-2 subsampling plus zero channel padding;
  `shortcut='B'` uses a 1x1 conv + BN projection where the shape changes. ResNet-20 with option A
  has 269,722 parameters (the paper's 0.27 M; 272,474 with option B), plus 1,376 BatchNorm
  statistics (not parameters).
* `SmallCNN`: three 3x3 convs, for tests and as an independently trained transfer source.
* `RandomFeatureCNN`: a few conv + relu layers at random (never trained) weights; `__call__(x)`
  returns a feature map. The label-free feature extractor F of the purifier loss and of SSP.
"""

from typing import Dict, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

from sr_purify.models.conv import Conv

# CIFAR-10 training-set per-channel statistics of [0, 1] images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

Features = Dict[str, jax.Array]


def normalize(x: jax.Array) -> jax.Array:
    """Maps [0, 1] images to CIFAR-10 zero-mean, unit-std inputs."""
    mean = jnp.asarray(CIFAR10_MEAN, x.dtype)
    std = jnp.asarray(CIFAR10_STD, x.dtype)
    return (x - mean) / std


_conv_init = nn.initializers.variance_scaling(2.0, 'fan_in', 'normal')  # He et al. 2015


class BasicBlock(nn.Module):
    """Two 3x3 conv-BN layers and a shortcut; the first conv carries the stride."""

    features: int
    strides: int = 1
    shortcut: str = 'A'

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        norm = lambda name: nn.BatchNorm(
            use_running_average=not train, momentum=0.9, epsilon=1e-5, name=name
        )
        # Explicit padding 1 (not 'SAME', which pads stride-2 convs on one side only) keeps the
        # stride-2 conv centred on the even pixels that the shortcut's subsampling keeps.
        conv = lambda s, name: Conv(
            self.features,
            (3, 3),
            strides=s,
            padding=1,
            use_bias=False,
            kernel_init=_conv_init,
            name=name,
        )
        y = nn.relu(norm('bn_0')(conv(self.strides, 'conv_0')(x)))
        y = norm('bn_1')(conv(1, 'conv_1')(y))
        in_features = x.shape[-1]
        if self.strides != 1 or in_features != self.features:
            if self.shortcut == 'A':
                x = x[:, :: self.strides, :: self.strides, :]
                pad = self.features - in_features
                x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (pad // 2, pad - pad // 2)))
            else:
                x = Conv(
                    self.features,
                    (1, 1),
                    strides=self.strides,
                    padding='VALID',
                    use_bias=False,
                    kernel_init=_conv_init,
                    name='proj_conv',
                )(x)
                x = norm('proj_bn')(x)
        return nn.relu(x + y)


class ResNet(nn.Module):
    """CIFAR ResNet-(6n+2). Taps: 'stem', 'stage_1', 'stage_2', 'stage_3' (after each stage)."""

    depth: int = 20
    num_classes: int = 10
    width: int = 1
    shortcut: str = 'A'  # 'A': subsample + zero-pad (parameter-free); 'B': 1x1 conv + BN.

    def __post_init__(self):
        if self.depth < 8 or (self.depth - 2) % 6:
            raise ValueError(
                f'depth {self.depth} not supported; valid: 6n+2 for n >= 1 '
                '(8, 14, 20, 32, 44, 56, 110, ...)'
            )
        if self.shortcut not in ('A', 'B'):
            raise ValueError(f'shortcut {self.shortcut!r} not supported; valid: A, B')
        super().__post_init__()

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Features]]:
        n = (self.depth - 2) // 6
        feats = {}
        y = Conv(16 * self.width, (3, 3), use_bias=False, kernel_init=_conv_init, name='stem_conv')(
            normalize(x)
        )
        y = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name='stem_bn')(
            y
        )
        y = nn.relu(y)
        feats['stem'] = y
        for stage, base in enumerate((16, 32, 64)):
            for block in range(n):
                strides = 2 if stage > 0 and block == 0 else 1
                y = BasicBlock(
                    base * self.width,
                    strides,
                    self.shortcut,
                    name=f'stage_{stage + 1}_block_{block + 1}',
                )(y, train)
            feats[f'stage_{stage + 1}'] = y
        logits = nn.Dense(self.num_classes, name='head')(jnp.mean(y, axis=(1, 2)))
        return (logits, feats) if return_features else logits


class SmallCNN(nn.Module):
    """conv(f)-pool-conv(2f)-pool-conv(4f)-global mean-linear, ReLU, no BatchNorm.

    94,538 parameters at the default f=32. `train` is accepted for the classifier interface and
    ignored. Taps: 'conv_1', 'conv_2', 'conv_3' (after each conv's ReLU).
    """

    num_classes: int = 10
    features: int = 32

    @nn.compact
    def __call__(
        self, x: jax.Array, train: bool = False, return_features: bool = False
    ) -> Union[jax.Array, Tuple[jax.Array, Features]]:
        del train
        feats = {}
        y = normalize(x)
        for i in range(3):
            if i:
                y = nn.max_pool(y, (2, 2), strides=(2, 2))
            y = nn.relu(Conv(self.features * 2**i, (3, 3), name=f'conv_{i + 1}')(y))
            feats[f'conv_{i + 1}'] = y
        logits = nn.Dense(self.num_classes, name='head')(jnp.mean(y, axis=(1, 2)))
        return (logits, feats) if return_features else logits


class RandomFeatureCNN(nn.Module):
    """`num_layers` 3x3 conv + ReLU layers of `features` channels; returns the last feature map.

    Layers 2 .. 1 + `num_downsample` use stride 2, so the output is at 1 / 2**num_downsample of the
    input resolution. Meant to be used at its (He-normal) random initialisation, never trained.
    """

    features: int = 64
    num_layers: int = 3
    num_downsample: int = 1

    def __post_init__(self):
        if self.num_layers < 1 or not 0 <= self.num_downsample < self.num_layers:
            raise ValueError(
                f'need num_layers >= 1 and 0 <= num_downsample < num_layers; got '
                f'num_layers={self.num_layers}, num_downsample={self.num_downsample}'
            )
        super().__post_init__()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        y = normalize(x)
        for i in range(self.num_layers):
            strides = 2 if 1 <= i <= self.num_downsample else 1
            y = Conv(
                self.features,
                (3, 3),
                strides=strides,
                padding=1,
                kernel_init=_conv_init,
                name=f'conv_{i + 1}',
            )(y)
            y = nn.relu(y)
        return y
