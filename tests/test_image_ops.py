"""Tests for sr_purify.image_ops (CPU, a few seconds)."""

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from sr_purify import image_ops as ops

BENCH_DIR = Path(__file__).resolve().parents[1].parent / 'shared' / 'data' / 'sr_benchmarks'


def _pair(rng, shape=(48, 40, 3), noise=20.0):
    """A smooth-ish uint8 HR image and a noisy copy (so SSIM is well away from 0)."""
    hr = rng.uniform(0, 255, shape)
    hr = (hr + np.roll(hr, 1, 0) + np.roll(hr, 1, 1)) / 3.0
    sr = hr + rng.normal(0, noise, shape)
    to_u8 = lambda x: np.clip(np.round(x), 0, 255).astype(np.uint8)
    return to_u8(sr), to_u8(hr)


# --- colour, cropping, quantization -----------------------------------------


def test_rgb_to_y_exact_pixels():
    px = np.array(
        [[[0, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255]]], dtype=np.float64
    )
    y = ops.rgb_to_y(px)
    np.testing.assert_allclose(
        y[0], [16.0, 235.0, 16 + 65.481, 16 + 128.553, 16 + 24.966], atol=1e-12
    )
    # NHWC batch gives the same per image.
    np.testing.assert_allclose(ops.rgb_to_y(px[None])[0], y, atol=0)
    # Grayscale (2-D) is scored as its gray value.
    gray = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.testing.assert_array_equal(ops.rgb_to_y(gray), gray)


def test_modcrop_and_shave_shapes():
    img = np.zeros((37, 50, 3))
    assert ops.modcrop(img, 2).shape == (36, 50, 3)
    assert ops.modcrop(img, 3).shape == (36, 48, 3)
    assert ops.modcrop(img, 4).shape == (36, 48, 3)
    assert ops.modcrop(np.zeros((37, 50)), 4).shape == (36, 48)
    assert ops.modcrop(np.zeros((2, 37, 50, 3)), 4).shape == (2, 36, 48, 3)
    # Top-left anchored.
    a = np.arange(35).reshape(5, 7)
    np.testing.assert_array_equal(ops.modcrop(a, 2), a[:4, :6])
    assert ops.shave(img, 4).shape == (29, 42, 3)
    assert ops.shave(np.zeros((37, 50)), 3).shape == (31, 44)
    assert ops.shave(img, 0).shape == img.shape
    np.testing.assert_array_equal(ops.shave(a, 1), a[1:-1, 1:-1])


def test_quantize():
    x = np.array([-0.1, 0.0, 0.5 / 255, 1.4 / 255, 0.5, 1.0, 1.2])
    np.testing.assert_array_equal(ops.quantize(x), [0, 0, 0, 1, 128, 255, 255])


# --- PSNR / SSIM ------------------------------------------------------------


def test_psnr_closed_form():
    hr = np.zeros((20, 24, 3), np.uint8)
    sr = hr.copy()
    sr[..., 0] = 10  # red +10 everywhere -> Y +10 * 65.481 / 255 everywhere
    dy = 10 * 65.481 / 255
    assert ops.psnr(sr, hr, 2) == pytest.approx(10 * math.log10(255**2 / dy**2), abs=1e-10)
    # On RGB: one of three channels off by 10 -> MSE = 100 / 3.
    assert ops.psnr(sr, hr, 2, y_channel=False) == pytest.approx(
        10 * math.log10(255**2 / (100 / 3)), abs=1e-10
    )


def test_psnr_identical_and_shave():
    rng = np.random.default_rng(0)
    hr = rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)
    assert ops.psnr(hr, hr, 4) == math.inf
    sr = hr.copy()
    sr[:4] = 255 - sr[:4]  # damage only the 4-pixel border ...
    sr[:, -4:] = 255 - sr[:, -4:]
    assert ops.psnr(sr, hr, 4) == math.inf  # ... which scale 4 shaves off
    assert math.isfinite(ops.psnr(sr, hr, 3))  # but scale 3 does not


def test_psnr_float_inputs_are_quantized():
    rng = np.random.default_rng(1)
    sr, hr = _pair(rng)
    jitter = rng.uniform(-0.4, 0.4, sr.shape)  # below half a level: lost in quantization
    sr_f = (sr + jitter) / 255.0
    assert ops.psnr(sr_f, hr / 255.0, 2) == ops.psnr(sr, hr, 2)
    assert ops.ssim(sr_f, hr / 255.0, 2) == ops.ssim(sr, hr, 2)


@pytest.mark.parametrize('shape', [(48, 40, 3), (41, 37)])
def test_psnr_ssim_match_skimage(shape):
    rng = np.random.default_rng(2)
    sr, hr = _pair(rng, shape)
    scale = 3
    a = ops.shave(ops.rgb_to_y(sr.astype(np.float64)), scale)
    b = ops.shave(ops.rgb_to_y(hr.astype(np.float64)), scale)

    ref_psnr = peak_signal_noise_ratio(b, a, data_range=255)
    assert ops.psnr(sr, hr, scale) == pytest.approx(ref_psnr, rel=1e-6)

    # skimage filters the whole image (reflect padding) and then averages its map
    # over the image minus a (win - 1) / 2 = 5 pixel border. With truncate=3.5 its
    # Gaussian has radius int(3.5 * 1.5 + 0.5) = 5, i.e. the same normalised 11x11
    # window, so inside that border no padded pixel is touched: its map there equals
    # our 'valid' map, and its mean is the mean over exactly our valid region.
    ref_ssim, ref_map = structural_similarity(
        a,
        b,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        full=True,
    )
    ours_map = ops.ssim_map(a, b)
    assert ours_map.shape == (a.shape[0] - 10, a.shape[1] - 10)
    np.testing.assert_allclose(ours_map, ref_map[5:-5, 5:-5], rtol=1e-9, atol=1e-12)
    assert 0.2 < ref_ssim < 0.95  # a meaningful (not degenerate) comparison
    assert ops.ssim(sr, hr, scale) == pytest.approx(ref_ssim, rel=1e-4)
    assert ops.ssim(hr, hr, scale) == pytest.approx(1.0, abs=1e-12)


# --- imresize (MATLAB) and resize_bicubic (jax) -----------------------------


@pytest.mark.parametrize('scale', [1 / 4, 1 / 3, 1 / 2, 2, 3, 4])
def test_imresize_constant_stays_constant(scale):
    img = np.full((23, 30, 3), 77, np.uint8)
    out = ops.imresize(img, scale)
    assert out.dtype == np.uint8
    assert np.all(out == 77)
    out_f = ops.imresize(np.full((23, 30), 0.3), scale)
    assert out_f.dtype == np.float64
    np.testing.assert_allclose(out_f, 0.3, atol=1e-12)


def test_imresize_periodic_pattern_downscale_is_mean():
    # Columns alternate 10, 200; a checkerboard alternates 0, 100. Away from the
    # borders (where MATLAB's mirroring breaks the period) an x2 antialiased
    # downscale averages each pair: its symmetric taps pair pixels of both phases.
    cols = np.tile(np.array([10.0, 200.0]), (40, 20))
    out = ops.imresize(cols, 1 / 2)
    np.testing.assert_allclose(out[3:-3, 3:-3], 105.0, atol=1e-10)
    board = 100.0 * (np.indices((40, 40)).sum(0) % 2)
    out = ops.imresize(board.astype(np.uint8), 1 / 2)
    assert np.all(out[3:-3, 3:-3] == 50)


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_imresize_shapes(scale):
    for h, w in [(37, 50), (36, 48), (5, 7)]:
        out = ops.imresize(np.zeros((h, w, 3), np.uint8), 1 / scale)
        assert out.shape == (math.ceil(h / scale), math.ceil(w / scale), 3)
        assert ops.imresize(out, scale).shape == (out.shape[0] * scale, out.shape[1] * scale, 3)
    assert ops.imresize(np.zeros((37, 50)), output_shape=(20, 11)).shape == (20, 11)


def test_resize_bicubic_matches_imresize_in_interior():
    rng = np.random.default_rng(3)
    img = rng.uniform(0, 1, (2, 32, 40, 3)).astype(np.float32)
    out = np.asarray(ops.resize_bicubic(img, (16, 20)))
    assert out.shape == (2, 16, 20, 3)
    ref = ops.imresize(img[0].astype(np.float64), 1 / 2)
    # Same kernel and antialiasing; only border handling differs.
    np.testing.assert_allclose(out[0, 3:-3, 3:-3], ref[3:-3, 3:-3], atol=1e-5)


# --- bicubic baseline on the SR benchmarks -----------------------------------

PUBLISHED_BICUBIC = {  # EDSR / RCAN papers, PSNR (dB) on Y, shave = scale
    'Set5': {2: 33.66, 3: 30.39, 4: 28.42},
    'Set14': {2: 30.24, 3: 27.55, 4: 26.00},
    'BSD100': {2: 29.56, 3: 27.21, 4: 25.96},
}


@pytest.mark.parametrize('name', list(PUBLISHED_BICUBIC))
def test_bicubic_baseline_reproduces_published_table(name):
    folder = BENCH_DIR / name / 'HR'
    files = sorted(folder.glob('*.png'))
    if not files:
        reason = f'SR benchmark images not found at {folder}'
        print(reason)
        pytest.skip(reason)
    images = [np.asarray(Image.open(f)) for f in files]  # grayscale stays 2-D
    for scale, published in PUBLISHED_BICUBIC[name].items():
        psnrs, ssims = [], []
        for img in images:
            hr = ops.modcrop(img, scale)
            lr = ops.imresize(hr, 1 / scale)
            sr = ops.imresize(lr, scale)
            assert lr.dtype == sr.dtype == np.uint8 and sr.shape == hr.shape
            psnrs.append(ops.psnr(sr, hr, scale))
            if name == 'Set5' and scale == 4:
                ssims.append(ops.ssim(sr, hr, scale))
        mean_psnr = float(np.mean(psnrs))
        print(f'{name} x{scale}: {mean_psnr:.3f} dB (published {published})')
        assert abs(mean_psnr - published) < 0.03
        if ssims:
            print(f'{name} x{scale} SSIM: {np.mean(ssims):.4f} (published 0.8104)')
            assert abs(np.mean(ssims) - 0.8104) < 0.005
