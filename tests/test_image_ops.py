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


def test_rgb_to_y_grayscale_and_channel_layouts():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    for img in (gray, gray[..., None]):  # HxW and HxWx1 are grayscale: Y is the value itself
        y = ops.rgb_to_y(img)
        assert y.dtype == np.float64 and y.shape == (3, 4)
        np.testing.assert_array_equal(y, gray)
    column = np.zeros((4, 1, 3))  # a one-pixel-wide RGB image is RGB, not grayscale
    column[..., 1] = 255.0
    np.testing.assert_allclose(ops.rgb_to_y(column), np.full((4, 1), 16.0 + 128.553))
    with pytest.raises(ValueError, match=r'^expected 3 channels last, got shape \(2, 2, 4\)$'):
        ops.rgb_to_y(np.zeros((2, 2, 4)))


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
    # float32 model outputs are scored in float64, like every other metric input.
    assert ops.quantize(x.astype(np.float32)).dtype == np.float64


def test_check_scale_lists_the_valid_scales():
    assert [ops.check_scale(s) for s in (2, 3, 4)] == [2, 3, 4]
    with pytest.raises(ValueError, match=r'^scale 5 not supported; valid: 2, 3, 4$'):
        ops.check_scale(5)


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


def test_psnr_of_unit_mse_and_of_identical_images_without_numpy_warnings():
    hr = np.full((12, 12), 100, np.uint8)
    sr = hr + np.uint8(1)  # gray: Y is the value itself, so MSE is exactly 1
    assert ops.psnr(sr, hr, 2) == pytest.approx(20 * math.log10(255), abs=1e-12)
    with np.errstate(all='raise'):  # inf comes from the MSE == 0 branch, not a divide by zero
        assert ops.psnr(hr, hr, 2) == math.inf


def test_metrics_take_uint8_and_any_float_and_reject_other_dtypes():
    rng = np.random.default_rng(4)
    sr, hr = _pair(rng)
    assert ops.psnr(sr.astype(np.float32) / 255, hr, 2) == ops.psnr(sr, hr, 2)
    with pytest.raises(TypeError, match=r'^expected uint8 or float image, got int32$'):
        ops.psnr(sr.astype(np.int32), hr, 2)


def test_ssim_on_rgb_is_the_mean_of_the_channel_ssims():
    rng = np.random.default_rng(5)
    sr, hr = _pair(rng, (40, 36, 3))
    sr[..., 1] = hr[..., 1]  # green identical (SSIM 1): the channel mean must see it
    a, b = ops.shave(sr.astype(np.float64), 2), ops.shave(hr.astype(np.float64), 2)
    per_channel = [ops.ssim_map(a[..., c], b[..., c]).mean() for c in range(3)]
    assert per_channel[1] == pytest.approx(1.0, abs=1e-12) and max(per_channel[::2]) < 0.95
    assert ops.ssim(sr, hr, 2, y_channel=False) == pytest.approx(np.mean(per_channel), abs=1e-12)


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


# 0.7: a scale whose kernel taps do not sum to 1 before normalisation (at 1/k and 2/3 they do).
@pytest.mark.parametrize('scale', [1 / 4, 1 / 3, 1 / 2, 0.7, 1.5, 2, 3, 4])
def test_imresize_constant_stays_constant(scale):
    img = np.full((23, 30, 3), 77, np.uint8)
    out = ops.imresize(img, scale)
    assert out.dtype == np.uint8
    assert np.all(out == 77)
    out_f = ops.imresize(np.full((23, 30), 0.3), scale)
    assert out_f.dtype == np.float64
    np.testing.assert_allclose(out_f, 0.3, atol=1e-12)


@pytest.mark.parametrize('scale', [1.5, 2, 3, 4])
def test_imresize_upscale_reproduces_quadratics_in_the_interior(scale):
    # Keys' cubic (a = -0.5) reproduces polynomials up to degree 2: inside the mirrored border,
    # output pixel i (1-based) is f at its centre in input coordinates, i / s + (1 - 1 / s) / 2.
    f = lambda t: 0.3 * t * t - 2.0 * t + 5.0
    n = 24
    column = f(np.arange(1, n + 1, dtype=np.float64))
    img = np.repeat(column[:, None], 5, axis=1)
    out_len = int(n * scale)
    out = ops.imresize(img, output_shape=(out_len, 5))
    centres = np.arange(1, out_len + 1) / scale + 0.5 * (1 - 1 / scale)
    inside = slice(int(3 * scale), -int(3 * scale))
    np.testing.assert_allclose(out[inside, 2], f(centres)[inside], rtol=0, atol=1e-9)


@pytest.mark.parametrize('scale', [1 / 4, 1 / 3, 1 / 2, 2, 3, 4])
def test_imresize_mirrors_the_border_symmetrically(scale):
    # MATLAB mirrors out-of-range taps (1..n, n..1): resizing a symmetrically padded image and
    # cropping the padding's image gives the unpadded result exactly (pad a multiple of 1/scale).
    rng = np.random.default_rng(6)
    img = rng.uniform(0, 255, (24, 36))
    pad = 12
    padded = ops.imresize(np.pad(img, pad, mode='symmetric'), scale)
    crop = int(pad * scale)
    np.testing.assert_allclose(padded[crop:-crop, crop:-crop], ops.imresize(img, scale), atol=1e-9)


def test_imresize_uint8_saturates_between_passes_and_resizes_the_smaller_scale_first():
    # MATLAB keeps uint8 between its 1-D passes (rounding and saturating) and resizes the
    # dimension with the smaller scale first. A one-pass resize (the other axis at scale 1, which
    # is the identity) chained by hand in that order is the reference; the other order, and
    # passes without saturation, give other images (checked, so the test can fail).
    # Black and white pixels at random: bicubic rings below 0 and above 255 between passes.
    img = np.random.default_rng(7).choice(np.array([0, 255], np.uint8), (24, 24))
    out_shape = (16, 9)  # scales 2/3 (H) and 3/8 (W): W first
    width_first = ops.imresize(ops.imresize(img, output_shape=(24, 9)), output_shape=out_shape)
    height_first = ops.imresize(ops.imresize(img, output_shape=(16, 24)), output_shape=out_shape)
    result = ops.imresize(img, output_shape=out_shape)
    np.testing.assert_array_equal(result, width_first)
    assert np.any(result != height_first)
    unsaturated = ops.imresize(
        ops.imresize(img.astype(np.float64), output_shape=(24, 9)), output_shape=out_shape
    )
    assert np.any(result != np.clip(np.floor(unsaturated + 0.5), 0, 255))


def test_imresize_errors():
    with pytest.raises(
        ValueError, match=r'^expected a 2-D or HWC image, got shape \(1, 4, 4, 3\)$'
    ):
        ops.imresize(np.zeros((1, 4, 4, 3)), 2)
    with pytest.raises(ValueError, match=r'^give scale or output_shape$'):
        ops.imresize(np.zeros((4, 4)))


def test_imresize_keeps_black_and_white_uint8():
    for value in (0, 255):
        img = np.full((9, 12, 3), value, np.uint8)
        assert np.all(ops.imresize(ops.imresize(img, 1 / 3), 3) == value)


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
