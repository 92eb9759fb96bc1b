"""Tests for sr_purify.inference: tiled upscaling, layouts, self-ensemble, image files (CPU)."""

import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import skimage.data
from conftest import tiny_sr_workdir
from PIL import Image

from configs import common
from sr_purify import api, image_ops, inference, models, restore


@pytest.fixture(scope='module')
def net():
    """A tiny x2 EDSR with random weights (not its init, whose last conv is zero), jitted.

    The weights are drawn with numpy on shapes from `jax.eval_shape`: running flax's init op by op
    on CPU costs ~10 s of small compilations, this ~0.3 s. Kernels are half LeCun-normal: the output
    is then bicubic plus ~8 levels of texture, ~10 % saturated (full LeCun saturates ~45 %).
    """
    m = models.build(common.edsr(scale=2, num_blocks=2, features=8, bicubic_skip=True))
    shapes = jax.eval_shape(m.init, jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
    rng = np.random.default_rng(0)

    def draw(s):
        std = 0.5 * np.prod(s.shape[:-1]) ** -0.5 if len(s.shape) > 1 else 0.02
        return (std * rng.normal(size=s.shape)).astype(np.float32)

    params = jax.tree.map(draw, shapes)
    return jax.jit(lambda x: m.apply({'params': params}, x))


def nearest(scale):
    """An exactly local (receptive field 0) and flip/rotation-equivariant numpy 'network'."""
    return lambda x: np.repeat(np.repeat(x, scale, 1), scale, 2)


@pytest.fixture(scope='module')
def photo():
    return skimage.data.astronaut()[100:300, 150:318]  # 200 x 168 RGB uint8


def _diff(a, b):
    return np.abs(a.astype(np.int64) - b.astype(np.int64))


# --- tiling ----------------------------------------------------------------------------------


def test_tiled_equals_whole_image(net, photo):
    whole = inference.upscale_array(net, photo, 2, tile=0)
    tiled = inference.upscale_array(net, photo, 2, tile=48, overlap=16)
    assert inference.count_tiles(200, 168, 48, 16) == 5 * 4
    assert whole.dtype == tiled.dtype == np.uint8
    assert tiled.shape == (400, 336, 3)
    assert _diff(tiled, whole).max() <= 1
    # The network is not a no-op bicubic (else equality would be easy): it changes the image.
    assert _diff(whole, image_ops.imresize(photo, 2)).max() > 10


def test_tiles_without_overlap_differ(net, photo):
    # Proves the overlap is what makes the test above pass: without context the seams show.
    whole = inference.upscale_array(net, photo, 2, tile=0)
    seams = inference.upscale_array(net, photo, 2, tile=48, overlap=0)
    assert _diff(seams, whole).max() > 1


def test_every_tile_call_has_one_shape_and_progress_counts(net, photo):
    shapes = []

    def recording(x):
        shapes.append(x.shape)
        return net(x)

    done = []
    inference.upscale_array(recording, photo, 2, tile=48, overlap=16, progress=done.append)
    assert set(shapes) == {(1, 80, 80, 3)}  # tile + 2 * overlap, border windows shifted inside
    assert done == list(range(1, inference.count_tiles(200, 168, 48, 16) + 1))

    class Bar:  # what upscale_array needs of a tqdm bar
        n = 0

        def update(self, k):
            self.n += k

    bar = Bar()
    inference.upscale_array(nearest(2), photo, 2, tile=48, overlap=16, progress=bar)
    assert bar.n == 20
    # A window larger than the image is clamped to it: one tile of the whole image.
    assert inference.count_tiles(30, 20, 48, 16) == 1
    assert inference.count_tiles(30, 20, 0, 16) == 1


@pytest.mark.parametrize('self_ensemble', [False, True])
def test_batched_tiles_give_the_same_image_and_pad_the_last_call(net, photo, self_ensemble):
    # 20 tiles (4 with the self-ensemble's smaller image) in calls of 3, the last one padded.
    image = photo if not self_ensemble else photo[:96, :88]
    tiles = inference.count_tiles(*image.shape[:2], 48, 16)
    shapes = []

    def recording(x):
        shapes.append(x.shape)
        return net(x)

    one = inference.upscale_array(net, image, 2, tile=48, overlap=16, self_ensemble=self_ensemble)
    done = []
    batched = inference.upscale_array(
        recording, image, 2, 48, 16, self_ensemble, progress=done.append, batch=3
    )
    np.testing.assert_array_equal(batched, one)  # each tile's output is its own
    calls = -(-tiles // 3) * (8 if self_ensemble else 1)
    assert len(shapes) == calls and {s[0] for s in shapes} == {3}
    assert done == list(range(1, tiles + 1))  # padding is not counted as a tile
    # An image with fewer tiles than the batch runs them all in one unpadded call.
    shapes.clear()
    inference.upscale_array(recording, photo[:40, :40], 2, tile=0, batch=3)
    assert shapes == [(1, 40, 40, 3)]
    with pytest.raises(ValueError, match='batch must be >= 1'):
        inference.upscale_array(net, photo, 2, batch=0)


def test_load_sr_splits_a_batch_of_tiles_over_the_local_devices(tmp_path, photo):
    workdir = tiny_sr_workdir(tmp_path)
    model = restore.load(str(workdir), 'sr')
    module, params = model.module, model.params
    sr = api.load_sr(str(workdir))
    n = jax.local_device_count()
    assert n == 8 and sr.batch == n  # conftest's fake devices
    x = photo[:24, :24].astype(np.float32)[None] / 255.0
    xs = np.concatenate([x * (1 - k / 10) for k in range(n)])
    split = sr.apply(xs)
    assert len(split.sharding.device_set) == n  # one tile per device
    single = module.apply({'params': params}, xs)
    np.testing.assert_allclose(np.asarray(split), np.asarray(single), atol=1e-6)
    # A batch the devices do not divide runs on one device; whole images match either way.
    assert len(sr.apply(xs[:3]).sharding.device_set) == 1
    image = photo[:64, :56].astype(np.float32) / 255.0  # 4 x 4 tiles: two calls of 8
    plain = inference.upscale_array(lambda x: module.apply({'params': params}, x), image, 2, 16, 8)
    np.testing.assert_allclose(sr.upscale(image, tile=16, overlap=8), plain, atol=1e-6)


@pytest.mark.parametrize('shape', [(37, 53), (41, 29, 3)])
@pytest.mark.parametrize('tile', [8, 100])
@pytest.mark.parametrize('scale', [2, 3])
def test_odd_sizes_exact_shape_and_placement(shape, tile, scale):
    image = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = inference.upscale_array(nearest(scale), image, scale, tile=tile, overlap=3)
    assert out.shape == (shape[0] * scale, shape[1] * scale) + shape[2:]
    assert out.dtype == np.uint8
    # A network with no receptive field makes every tile's core land exactly where it belongs.
    np.testing.assert_array_equal(out, np.repeat(np.repeat(image, scale, 0), scale, 1))


def test_apply_of_the_wrong_scale_is_refused(photo):
    with pytest.raises(ValueError, match='scale=3'):
        inference.upscale_array(nearest(2), photo, 3, tile=48)


# --- layouts and dtypes ----------------------------------------------------------------------


def test_gray_stays_2d_and_is_the_channel_mean(net):
    gray = skimage.data.camera()[200:240, 220:256].astype(np.float64) / 255.0
    out = inference.upscale_array(net, gray, 2, tile=0)
    assert out.shape == (80, 72) and out.dtype == np.float32
    rgb = inference.upscale_array(net, np.stack([gray] * 3, axis=-1), 2, tile=0)
    np.testing.assert_allclose(out, rgb.mean(axis=-1), atol=1e-6)
    # HxWx1 is gray too and keeps its channel axis.
    out1 = inference.upscale_array(net, gray[..., None], 2, tile=0)
    np.testing.assert_array_equal(out1[..., 0], out)


def test_rgba_keeps_alpha_upscaled_by_bicubic(net, photo):
    rgb = photo[:40, :36]
    alpha = skimage.data.camera()[200:240, 220:256]
    out = inference.upscale_array(net, np.dstack([rgb, alpha]), 2, tile=0)
    assert out.shape == (80, 72, 4) and out.dtype == np.uint8
    np.testing.assert_array_equal(out[..., :3], inference.upscale_array(net, rgb, 2, tile=0))
    pil = np.asarray(Image.fromarray(alpha).resize((72, 80), Image.BICUBIC))
    assert _diff(out[..., 3], pil).max() <= 1
    # MATLAB bicubic agrees within 1 level away from the border (PIL renormalises there).
    assert _diff(out[4:-4, 4:-4, 3], image_ops.imresize(alpha, 2)[4:-4, 4:-4]).max() <= 1


def test_float_input_gives_float32_in_unit_range(net, photo):
    x = photo[:40, :36].astype(np.float64) / 255.0
    out = inference.upscale_array(net, x, 2, tile=0)
    assert out.dtype == np.float32 and out.shape == (80, 72, 3)
    assert out.min() >= 0.0 and out.max() <= 1.0
    # Same as the uint8 path up to its rounding.
    u8 = inference.upscale_array(net, photo[:40, :36], 2, tile=0)
    assert np.abs(out * 255.0 - u8).max() <= 0.5 + 1e-3


def test_unsupported_layouts_are_refused():
    with pytest.raises(ValueError, match='dtype'):
        inference.upscale_array(nearest(2), np.zeros((8, 8, 3), np.int32), 2)
    with pytest.raises(ValueError, match='HxWx3'):
        inference.upscale_array(nearest(2), np.zeros((8, 8, 2), np.uint8), 2)


# --- self-ensemble ---------------------------------------------------------------------------


def test_self_ensemble_of_an_equivariant_apply_is_the_plain_result():
    image = np.random.default_rng(1).uniform(size=(23, 31, 3))
    plain = inference.upscale_array(nearest(2), image, 2, tile=10, overlap=2)
    ens = inference.upscale_array(nearest(2), image, 2, tile=10, overlap=2, self_ensemble=True)
    np.testing.assert_array_equal(ens, plain)
    np.testing.assert_array_equal(ens, np.repeat(np.repeat(image, 2, 0), 2, 1).astype(np.float32))


def test_self_ensemble_of_the_network_differs_but_stays_in_range(net, photo):
    x = photo[:32, :32].astype(np.float32) / 255.0
    plain = inference.upscale_array(net, x, 2, tile=0)
    ens = inference.upscale_array(net, x, 2, tile=0, self_ensemble=True)
    assert ens.shape == plain.shape and ens.dtype == np.float32
    assert np.abs(ens - plain).max() > 1e-3
    assert ens.min() >= 0.0 and ens.max() <= 1.0


# --- files -----------------------------------------------------------------------------------


@pytest.fixture
def folder(tmp_path):
    d = tmp_path / 'in'
    d.mkdir()
    Image.fromarray(skimage.data.astronaut()[:30, :40]).save(d / 'rgb.png')
    Image.fromarray(skimage.data.camera()[:25, :33]).save(d / 'gray.png')
    Image.fromarray(skimage.data.coffee()[:28, :35]).save(d / 'photo.jpg', quality=90)
    (d / 'bad.png').write_bytes(np.random.default_rng(0).bytes(500))
    (d / 'notes.txt').write_text('not an image')
    return d


def test_upscale_files_writes_good_and_skips_bad(net, folder, tmp_path, caplog):
    out_dir = tmp_path / 'out'
    with caplog.at_level(logging.WARNING):
        result = inference.upscale_files(
            net, str(folder), str(out_dir), 2, tile=16, overlap=4, show_progress=False
        )
    assert sorted(os.listdir(out_dir)) == ['gray_x2.png', 'photo_x2.png', 'rgb_x2.png']
    assert sorted(os.path.basename(p) for p in result['written']) == sorted(os.listdir(out_dir))
    expected = {'rgb': ((80, 60), 'RGB'), 'gray': ((66, 50), 'L'), 'photo': ((70, 56), 'RGB')}
    for stem, (size, mode) in expected.items():
        with Image.open(out_dir / f'{stem}_x2.png') as img:
            assert (img.size, img.mode) == (size, mode)
    assert len(result['skipped']) == 1
    path, reason = result['skipped'][0]
    assert os.path.basename(path) == 'bad.png' and 'bad.png' in reason
    assert 'bad.png' in caplog.text
    assert result['seconds'] > 0


def test_list_inputs(folder, tmp_path):
    names = lambda paths: [os.path.basename(p) for p in paths]
    assert names(inference.list_inputs(folder)) == ['bad.png', 'gray.png', 'photo.jpg', 'rgb.png']
    assert names(inference.list_inputs(str(folder / '*.png'))) == ['bad.png', 'gray.png', 'rgb.png']
    assert names(inference.list_inputs(str(folder / 'rgb.png'))) == ['rgb.png']
    both = [str(folder / 'rgb.png'), str(folder / '*.jpg'), str(folder / 'rgb.png')]
    assert names(inference.list_inputs(both)) == ['rgb.png', 'photo.jpg']
    empty = tmp_path / 'empty_dir'
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match='empty_dir') as e:
        inference.list_inputs(empty)
    assert '\n' not in str(e.value) and 'glob' in str(e.value)
    with pytest.raises(FileNotFoundError, match='nothing_here'):
        inference.list_inputs(str(tmp_path / 'nothing_here*.png'))
    with pytest.raises(FileNotFoundError, match='missing.png'):
        inference.list_inputs(str(tmp_path / 'missing.png'))


def test_read_image_modes_and_write_png_round_trip(tmp_path):
    rgb = skimage.data.astronaut()[:12, :10]
    gray = rgb[..., 0]
    cases = {
        'L': (Image.fromarray(gray), (12, 10)),
        '1': (Image.fromarray(gray).convert('1'), (12, 10)),
        'RGB': (Image.fromarray(rgb), (12, 10, 3)),
        'LA': (Image.fromarray(np.dstack([gray, gray])), (12, 10, 4)),
        'RGBA': (Image.fromarray(np.dstack([rgb, gray])), (12, 10, 4)),
        'P': (Image.fromarray(rgb).convert('P'), (12, 10, 3)),
    }
    for name, (img, shape) in cases.items():
        img.save(tmp_path / f'{name}.png')
        out = inference.read_image(tmp_path / f'{name}.png')
        assert (name, out.shape, out.dtype) == (name, shape, np.uint8)
    p = Image.fromarray(rgb).convert('P')
    p.save(tmp_path / 'P_transparent.png', transparency=0)
    assert inference.read_image(tmp_path / 'P_transparent.png').shape == (12, 10, 4)
    # 16-bit gray is rescaled, not clipped at 255.
    Image.fromarray(np.full((4, 5), 65535, np.uint16)).save(tmp_path / 'deep.png')
    deep = inference.read_image(tmp_path / 'deep.png')
    assert deep.shape == (4, 5) and deep.dtype == np.uint8 and deep.min() == 255
    (tmp_path / 'junk.png').write_bytes(b'\x89PNG not really')
    with pytest.raises(ValueError, match='junk.png'):
        inference.read_image(tmp_path / 'junk.png')
    for array in (gray, rgb, np.dstack([rgb, gray])):
        inference.write_png(tmp_path / 'round.png', array)
        np.testing.assert_array_equal(inference.read_image(tmp_path / 'round.png'), array)
    assert inference.output_name('photos/cat.photo.jpg', 3) == 'cat.photo_x3.png'
