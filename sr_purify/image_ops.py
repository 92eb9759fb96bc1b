"""Image ops and SR metrics in the SR literature's convention (EDSR/RCAN MATLAB scripts).

Host-side functions (numpy/scipy, float64) reproduce MATLAB exactly: `rgb2ycbcr` luma,
`imresize` bicubic with antialiasing, PSNR on the shaved Y channel, and Wang et al.'s
`ssim_index`. `resize_bicubic` is the in-graph (jax) resize for jitted code.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
from scipy import ndimage

# The SR scales every model, pipeline and benchmark table supports.
SCALES = (2, 3, 4)


@dataclasses.dataclass
class Image:
    """A named evaluation image."""

    name: str
    pixels: np.ndarray  # uint8, HxWx3 (or HxW for grayscale evaluation images)


def check_scale(scale: int) -> int:
    """`scale`, or a ValueError listing the valid scales."""
    if scale not in SCALES:
        raise ValueError(f'scale {scale!r} not supported; valid: {", ".join(map(str, SCALES))}')
    return scale


# ---------------------------------------------------------------------------
# Colour, cropping, quantization
# ---------------------------------------------------------------------------

# MATLAB rgb2ycbcr, Y row (BT.601, studio swing), for inputs in [0, 255].
_Y_COEFFS = np.array([65.481, 128.553, 24.966]) / 255.0


def rgb_to_y(img):
    """BT.601 luma as MATLAB `rgb2ycbcr` for [0, 255] float images, in [16, 235].

    RGB input is HWC or NHWC (channels last). A 2-D (or single-channel) image is
    grayscale: its Y is the gray value itself, as the MATLAB scoring scripts do.
    """
    img = np.asarray(img, dtype=np.float64)
    if img.ndim == 2:
        return img
    if img.shape[-1] == 1:
        return img[..., 0]
    if img.shape[-1] != 3:
        raise ValueError(f'expected 3 channels last, got shape {img.shape}')
    return 16.0 + img @ _Y_COEFFS


def _spatial_axes(img):
    # 2-D and HWC: H, W are axes 0, 1; NHWC: axes 1, 2.
    return (1, 2) if img.ndim == 4 else (0, 1)


def modcrop(img, scale: int):
    """Crops H and W (top-left anchored) to multiples of `scale`."""
    img = np.asarray(img)
    ah, aw = _spatial_axes(img)
    h, w = img.shape[ah], img.shape[aw]
    index = [slice(None)] * img.ndim
    index[ah] = slice(0, h - h % scale)
    index[aw] = slice(0, w - w % scale)
    return img[tuple(index)]


def shave(img, border: int):
    """Removes `border` pixels from each side of H and W."""
    img = np.asarray(img)
    if border == 0:
        return img
    ah, aw = _spatial_axes(img)
    index = [slice(None)] * img.ndim
    index[ah] = slice(border, -border)
    index[aw] = slice(border, -border)
    return img[tuple(index)]


def quantize(x):
    """Float image in [0, 1] -> round(clip(255 x)) as float in [0, 255].

    This is what saving as 8-bit PNG and re-reading does before evaluation.
    """
    return np.round(np.clip(np.asarray(x, dtype=np.float64) * 255.0, 0.0, 255.0))


# ---------------------------------------------------------------------------
# MATLAB imresize (bicubic)
# ---------------------------------------------------------------------------


def _cubic(x):
    # Keys cubic convolution kernel with a = -0.5 (MATLAB's 'bicubic').
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return (1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * (
        (ax > 1) & (ax <= 2)
    )


def _resize_matrix(in_len: int, out_len: int, scale: float) -> np.ndarray:
    """Dense (out_len, in_len) matrix equal to MATLAB imresize's `contributions`.

    Follows MATLAB's imresize.m: antialiased kernel when downscaling, weights
    normalised per output pixel, out-of-range taps mirrored symmetrically
    (index sequence 1..n, n..1). Taps that hit the same input pixel are summed,
    which is what MATLAB's weighted sum over repeated indices does.
    """
    kernel_width = 4.0
    if scale < 1:  # antialiasing: stretch the kernel by 1/scale
        kernel = lambda x: scale * _cubic(scale * x)
        kernel_width /= scale
    else:
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)  # 1-based like MATLAB
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # output pixel centre in input coords
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    indices = left[:, None] + np.arange(taps)[None, :]
    weights = kernel(u[:, None] - indices)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(in_len), np.arange(in_len)[::-1]])
    cols = mirror[np.mod(indices.astype(np.int64) - 1, 2 * in_len)]
    matrix = np.zeros((out_len, in_len))
    np.add.at(matrix, (np.repeat(np.arange(out_len), taps), cols.ravel()), weights.ravel())
    return matrix


def _to_uint8(x):
    # MATLAB's double -> uint8 conversion: round half away from zero, saturate.
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def imresize(img, scale: float | None = None, output_shape=None):
    """MATLAB `imresize(img, scale, 'bicubic')` (antialiased when downscaling).

    `img` is 2-D or HWC. Give either `scale` (output size ceil(scale * size), as
    MATLAB) or `output_shape` (H, W). uint8 input returns uint8 and, like MATLAB,
    rounds after each 1-D pass; float input returns float64 (no rounding).
    Each pass is one matrix product with a precomputed weight matrix.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f'expected a 2-D or HWC image, got shape {img.shape}')
    in_shape = img.shape[:2]
    if output_shape is not None:
        out_shape = tuple(int(s) for s in output_shape)
        scales = [o / i for o, i in zip(out_shape, in_shape)]
    elif scale is not None:
        scales = [float(scale)] * 2
        out_shape = tuple(int(math.ceil(scale * s)) for s in in_shape)
    else:
        raise ValueError('give scale or output_shape')
    is_uint8 = img.dtype == np.uint8
    out = img.astype(np.float64)
    # MATLAB resizes the dimension with the smallest scale first (stable sort,
    # so H before W when equal).
    for axis in sorted((0, 1), key=lambda a: scales[a]):
        matrix = _resize_matrix(in_shape[axis], out_shape[axis], scales[axis])
        out = np.moveaxis(np.tensordot(matrix, out, axes=(1, axis)), 0, axis)
        if is_uint8:  # MATLAB keeps the class between passes
            out = np.clip(np.floor(out + 0.5), 0, 255)
    return _to_uint8(out) if is_uint8 else out


# ---------------------------------------------------------------------------
# In-graph resize (jax)
# ---------------------------------------------------------------------------


def resize_bicubic(x, shape):
    """Bicubic resize of an NHWC float batch to spatial `shape` = (H, W), in jax.

    `jax.image.resize(method='bicubic', antialias=True)` uses MATLAB's kernel
    (a = -0.5) and antialiasing but drops out-of-image taps (renormalising)
    where MATLAB mirrors edge pixels, and does not round between passes. It
    thus differs from `imresize` only near borders: <= 0.02 dB on the
    bicubic-baseline PSNR. Jittable and differentiable.
    """
    import jax  # local import: the host-side metrics do not need jax

    n, _, _, c = x.shape
    return jax.image.resize(
        x, (n, int(shape[0]), int(shape[1]), c), method='bicubic', antialias=True
    )


# ---------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------


def _prepare(img, y_channel: bool, border: int):
    """To [0, 255] float64, Y (optionally), shaved. Floats in [0, 1] are quantized."""
    img = np.asarray(img)
    if img.dtype == np.uint8:
        img = img.astype(np.float64)
    elif np.issubdtype(img.dtype, np.floating):
        img = quantize(img)
    else:
        raise TypeError(f'expected uint8 or float image, got {img.dtype}')
    if y_channel:
        img = rgb_to_y(img)
    return shave(img, border)


def psnr(sr, hr, scale: int, y_channel: bool = True) -> float:
    """PSNR (dB) of one image, SR convention.

    Inputs: uint8 in [0, 255] or float in [0, 1] (dtype decides; floats are
    quantized to 8 bits first, as if saved as PNG). Y channel (if `y_channel`),
    `scale` pixels shaved from each border, 10 log10(255^2 / MSE) on the
    unrounded [0, 255] Y values. Identical images give inf.
    """
    a = _prepare(sr, y_channel, scale)
    b = _prepare(hr, y_channel, scale)
    mse = np.mean((a - b) ** 2)
    return float('inf') if mse == 0 else float(10.0 * np.log10(255.0**2 / mse))


def _gaussian_1d(size: int = 11, sigma: float = 1.5):
    x = np.arange(size) - (size - 1) / 2.0
    g = np.exp(-(x * x) / (2.0 * sigma * sigma))
    return g / g.sum()  # fspecial('gaussian') is this outer product, normalised


def _filter_valid(img, g):
    # Separable 2-D filtering, keeping only the 'valid' region (no padding used).
    r = len(g) // 2
    out = ndimage.correlate1d(img, g, axis=0, mode='constant')
    out = ndimage.correlate1d(out, g, axis=1, mode='constant')
    return out[r:-r, r:-r]


def ssim_map(a, b, data_range: float = 255.0):
    """SSIM map of two 2-D float images (Wang et al. 2004, MATLAB ssim_index).

    11x11 Gaussian window (sigma 1.5), K1 = 0.01, K2 = 0.03, 'valid' filtering,
    so the map is (H - 10, W - 10).
    """
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    g = _gaussian_1d()
    mu_a, mu_b = _filter_valid(a, g), _filter_valid(b, g)
    var_a = _filter_valid(a * a, g) - mu_a * mu_a
    var_b = _filter_valid(b * b, g) - mu_b * mu_b
    cov = _filter_valid(a * b, g) - mu_a * mu_b
    return ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a * mu_a + mu_b * mu_b + c1) * (var_a + var_b + c2)
    )


def ssim(sr, hr, scale: int, y_channel: bool = True) -> float:
    """Mean SSIM of one image, SR convention (inputs as in `psnr`).

    Computed on the shaved [0, 255] Y (if `y_channel`, else per channel and
    averaged) with L = 255.
    """
    a = _prepare(sr, y_channel, scale)
    b = _prepare(hr, y_channel, scale)
    if a.ndim == 2:
        return float(ssim_map(a, b).mean())
    return float(np.mean([ssim_map(a[..., c], b[..., c]).mean() for c in range(a.shape[-1])]))
