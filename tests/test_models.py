"""Tests for sr_purify.models: shapes, taps, exact parameter counts, registry errors (CPU)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sr_purify import models
from sr_purify.models import edsr


def _key(seed=0):
    # 'rbg' keys make flax init several times faster to compile on CPU than the default threefry.
    return jax.random.key(seed, impl='rbg')


def _build(name, **fields):
    return models.build(ml_collections.ConfigDict(dict(name=name, **fields)))


@functools.lru_cache(maxsize=None)
def _init_sr(name, scale):
    """(model, params) of SR_MODELS[name] at `scale`, once per test session.

    The parameter tree comes from tracing `init` (jax.eval_shape), filled with numpy Gaussians: the
    same tree as `init` gives (test_sr_init_matches_shapes checks that) without compiling the
    initialisers, which costs seconds per model on CPU.
    """
    fields, _ = SR_MODELS[name]
    model = _build(name, scale=scale, **fields)
    shapes = jax.eval_shape(lambda: model.init(_key(), jnp.zeros((1, 12, 12, 3))))
    rng = np.random.default_rng(scale)
    fill = lambda s: jnp.asarray(rng.normal(size=s.shape) / np.sqrt(np.prod(s.shape[:-1])), s.dtype)
    return model, jax.tree.map(fill, shapes)


def _param_count(model, shape=(1, 12, 12, 3), collection='params'):
    """Exact number of entries in `collection`, from shapes only (no compute)."""
    variables = jax.eval_shape(lambda: model.init(_key(), jnp.zeros(shape)))
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(variables[collection]))


# name -> (config fields, {tap: channels}) for the default students and the slim EDSR.
SR_MODELS = {
    'edsr': (
        dict(num_blocks=4, features=32),
        {'head': 32, 'block_1': 32, 'block_2': 32, 'block_3': 32, 'block_4': 32, 'body': 32},
    ),
    'imdn': ({}, {'head': 32, 'block_1': 32, 'block_2': 32, 'block_3': 32, 'body': 32}),
    'fsrcnn': ({}, {'head': 56, 'map_1': 12, 'map_2': 12, 'map_3': 12, 'map_4': 12, 'body': 56}),
}

EDSR_BASELINE_X2 = 1_369_859


# --- pixel shuffle ----------------------------------------------------------------------------


def test_pixel_shuffle_hand_example():
    # One pixel, 4 channels, scale 2: channel i*2 + j lands at (i, j).
    x = jnp.arange(4.0).reshape(1, 1, 1, 4)
    np.testing.assert_array_equal(edsr.pixel_shuffle(x, 2)[0, ..., 0], [[0.0, 1.0], [2.0, 3.0]])
    # Two output channels: channel c takes input channels c*4 .. c*4 + 3.
    x = jnp.arange(8.0).reshape(1, 1, 1, 8)
    out = edsr.pixel_shuffle(x, 2)
    np.testing.assert_array_equal(out[0, ..., 0], [[0.0, 1.0], [2.0, 3.0]])
    np.testing.assert_array_equal(out[0, ..., 1], [[4.0, 5.0], [6.0, 7.0]])


@pytest.mark.parametrize('s', [2, 3])
def test_pixel_shuffle_matches_pytorch_index_formula(s):
    n, h, w, c = 2, 3, 2, 2
    x = np.random.default_rng(0).normal(size=(n, h, w, c * s * s)).astype(np.float32)
    out = np.asarray(edsr.pixel_shuffle(jnp.asarray(x), s))
    assert out.shape == (n, h * s, w * s, c)
    expected = np.empty_like(out)
    for b in range(n):
        for y in range(h):
            for xx in range(w):
                for ch in range(c):
                    for i in range(s):
                        for j in range(s):
                            expected[b, y * s + i, xx * s + j, ch] = x[
                                b, y, xx, ch * s * s + i * s + j
                            ]
    np.testing.assert_array_equal(out, expected)


# --- SR models --------------------------------------------------------------------------------


@pytest.mark.parametrize('scale', [2, 3, 4])
@pytest.mark.parametrize('name', sorted(SR_MODELS))
def test_sr_shapes_and_taps(name, scale):
    _, taps = SR_MODELS[name]
    model, params = _init_sr(name, scale)
    rng = np.random.default_rng(scale)
    for shape in [(2, 12, 12, 3), (1, 7, 10, 3)]:  # square, and non-square with odd sides
        x = jnp.asarray(rng.uniform(size=shape), jnp.float32)
        y = model.apply(params, x)
        n, h, w, _ = shape
        assert y.shape == (n, h * scale, w * scale, 3)
        assert y.dtype == jnp.float32
        y2, feats = model.apply(params, x, return_features=True)
        np.testing.assert_array_equal(y, y2)
        assert list(feats) == list(taps)  # names, in network order
        for tap, channels in taps.items():
            assert feats[tap].shape == (n, h, w, channels), tap
        assert np.all(np.isfinite(y))


@functools.lru_cache(maxsize=None)
def _real_init_sr(name):
    """(model, params) of SR_MODELS[name] at x2 from the model's own `init` (on a 5x5 input)."""
    fields, _ = SR_MODELS[name]
    model = _build(name, scale=2, **fields)
    return model, model.init(_key(), jnp.zeros((1, 5, 5, 3)))


@pytest.mark.parametrize('name', sorted(SR_MODELS))
def test_sr_init_matches_shapes(name):
    _, filled = _init_sr(name, 2)
    _, params = _real_init_sr(name)  # init at another input size: the same tree
    shape_of = lambda t: jax.tree.map(lambda a: (a.shape, a.dtype), t)
    assert shape_of(params) == shape_of(filled)
    assert all(np.all(np.isfinite(p)) for p in jax.tree.leaves(params))


@pytest.mark.parametrize('name', sorted(SR_MODELS))
@pytest.mark.parametrize('scale', [1, 5])
def test_sr_bad_scale_lists_valid(name, scale):
    fields, _ = SR_MODELS[name]
    with pytest.raises(ValueError, match='valid: 2, 3, 4'):
        model = _build(name, scale=scale, **fields)
        model.init(_key(), jnp.zeros((1, 12, 12, 3)))


def test_edsr_baseline_param_count():
    # EDSR-baseline x2 (16 blocks, 64 ch), the paper's 1.37 M:
    #   head 3*64*9+64 = 1,792; 16 blocks * 2*(64*64*9+64) = 1,181,696; body conv 36,928;
    #   upsampler 64*256*9+256 = 147,712; tail 64*3*9+3 = 1,731.
    assert _param_count(_build('edsr', scale=2)) == EDSR_BASELINE_X2


def test_slim_edsr_param_count():
    # Slim EDSR x2 (4 blocks, 32 ch):
    #   head 3*32*9+32 = 896; 4 blocks * 2*(32*32*9+32) = 4 * 18,496 = 73,984;
    #   body conv 32*32*9+32 = 9,248; upsampler 32*128*9+128 = 36,992; tail 32*3*9+3 = 867.
    #   896 + 73,984 + 9,248 + 36,992 + 867 = 121,987.
    assert _param_count(_build('edsr', scale=2, num_blocks=4, features=32)) == 121_987
    # With ESPCN's output layer instead of upsampler + tail,
    #   to_rgb 32*12*9+12 = 3,468: 896 + 73,984 + 9,248 + 3,468 = 87,596.
    assert (
        _param_count(_build('edsr', scale=2, num_blocks=4, features=32, upsampler='espcn'))
        == 87_596
    )


@pytest.mark.parametrize('upsampler', ['edsr', 'espcn'])
def test_edsr_with_bicubic_skip_starts_as_exact_bicubic(upsampler):
    model = _build(
        'edsr', scale=2, num_blocks=1, features=8, bicubic_skip=True, upsampler=upsampler
    )
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 6, 7, 3)), jnp.float32)
    params = model.init(_key(), x)
    np.testing.assert_array_equal(model.apply(params, x), edsr.upsample_bicubic(x, 2))


def test_edsr_unknown_upsampler_lists_valid():
    with pytest.raises(ValueError, match="unknown upsampler 'nearest'; valid: edsr, espcn"):
        _param_count(_build('edsr', upsampler='nearest'))


def test_imdn_param_count():
    # IMDN x2, 3 blocks x 32 ch, 8 distilled / 24 refined channels, CCA reduction 16:
    #   head 896;
    #   block: conv_0 32*32*9+32 = 9,248; conv_1, conv_2 24*32*9+32 = 6,944 each;
    #          conv_3 24*8*9+8 = 1,736; fuse 32*32+32 = 1,056; CCA 32*2+2 + 2*32+32 = 162
    #          -> 26,090; three blocks 78,270;
    #   body_fuse 96*32+32 = 3,104; body_conv 9,248; upsampler 32*12*9+12 = 3,468.
    assert _param_count(_build('imdn', scale=2)) == 896 + 78_270 + 3_104 + 9_248 + 3_468
    assert _param_count(_build('imdn', scale=2)) == 94_986


def test_fsrcnn_param_count():
    # FSRCNN(56, 12, 4) x2, RGB: head 3*56*25+56 = 4,256; shrink 56*12+12 = 684;
    #   4 maps * (12*12*9+12) = 5,232; expand 12*56+56 = 728; upsampler 56*12*9+12 = 6,060;
    #   PReLU slopes 56 + 12 + 4*12 + 56 = 172.
    assert _param_count(_build('fsrcnn', scale=2)) == 17_132
    # Same with ReLU: no slopes.
    assert _param_count(_build('fsrcnn', scale=2, activation='relu')) == 17_132 - 172


def test_imdn_grad_finite_on_constant_input():
    # A flat image makes every CCA channel constant: sqrt'(0) would give NaN without the epsilon.
    model, params = _real_init_sr('imdn')
    x = jnp.full((1, 6, 6, 3), 0.5)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x))))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_fsrcnn_bad_activation():
    with pytest.raises(ValueError, match='valid: prelu, relu'):
        _build('fsrcnn', activation='gelu')


# --- classifiers ------------------------------------------------------------------------------


def test_resnet20_param_count():
    # Option A shortcuts (parameter-free). Convs have no bias; each BN has scale + bias.
    #   stem 3*16*9 + 32 = 464; stage 1: 3 * (2*16*16*9 + 2*32) = 14,016;
    #   stage 2: (16*32*9 + 32*32*9 + 128) + 2 * (2*32*32*9 + 128) = 51,072;
    #   stage 3: (32*64*9 + 64*64*9 + 256) + 2 * (2*64*64*9 + 256) = 203,520; head 64*10+10 = 650.
    model = _build('resnet')
    assert _param_count(model, (1, 32, 32, 3)) == 269_722
    # Running mean and variance of 16 + 6*16 + 6*32 + 6*64 = 688 channels.
    assert _param_count(model, (1, 32, 32, 3), 'batch_stats') == 1_376


def test_resnet_logits_taps_and_batch_stats():
    model = _build('resnet', depth=8, width=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(4, 32, 32, 3)), jnp.float32)
    variables = model.init(_key(), x)
    logits, feats = model.apply(variables, x, return_features=True)
    assert logits.shape == (4, 10)
    assert {k: v.shape for k, v in feats.items()} == {
        'stem': (4, 32, 32, 32),
        'stage_1': (4, 32, 32, 32),
        'stage_2': (4, 16, 16, 64),
        'stage_3': (4, 8, 8, 128),
    }
    # train=True uses batch statistics and returns updated running averages.
    logits_train, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    assert logits_train.shape == (4, 10)
    old = jax.tree.leaves(variables['batch_stats'])
    new = jax.tree.leaves(updates['batch_stats'])
    assert len(old) == len(new) and all(np.any(o != n) for o, n in zip(old, new))
    # Evaluation mode changes nothing.
    _, same = model.apply(variables, x, train=False, mutable=['batch_stats'])
    jax.tree.map(np.testing.assert_array_equal, same['batch_stats'], variables['batch_stats'])


def test_resnet_option_a_shortcut_exact():
    # With every variable zero the residual branch is 0 (BN scale and bias 0), so a downsampling
    # block returns relu(shortcut): the even pixels, channels zero-padded 8 on each side (16 -> 32).
    block = models.classifiers.BasicBlock(32, strides=2, shortcut='A')
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 4, 6, 16)), jnp.float32)
    shapes = jax.eval_shape(lambda: block.init(_key(), x, train=False))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    y = block.apply(zeros, x, train=False)
    expected = np.pad(np.asarray(x)[:, ::2, ::2, :], ((0, 0), (0, 0), (0, 0), (8, 8)))
    np.testing.assert_allclose(y, expected, atol=1e-6)


def test_resnet_shortcut_b_and_bad_config():
    # Option B adds a 1x1 conv + BN projection where the shape changes (stages 2 and 3):
    # 16*32 + 2*32 + 32*64 + 2*64 = 2,752 more parameters than option A.
    model = _build('resnet', shortcut='B')
    x = jax.ShapeDtypeStruct((2, 16, 16, 3), jnp.float32)
    variables = jax.eval_shape(model.init, _key(), x)
    assert 'proj_conv' in variables['params']['stage_2_block_1']
    assert 'proj_conv' not in variables['params']['stage_2_block_2']
    assert _param_count(model, (1, 32, 32, 3)) == 269_722 + 2_752
    assert jax.eval_shape(model.apply, variables, x).shape == (2, 10)
    with pytest.raises(ValueError, match='6n\\+2'):
        _build('resnet', depth=21)
    with pytest.raises(ValueError, match='valid: A, B'):
        _build('resnet', shortcut='C')


def test_small_cnn():
    model = _build('small_cnn', num_classes=7)
    x = jnp.zeros((3, 32, 32, 3))
    variables = model.init(_key(), x)
    assert set(variables) == {'params'}
    logits, feats = model.apply(variables, x, train=True, return_features=True)
    assert logits.shape == (3, 7)
    assert {k: v.shape for k, v in feats.items()} == {
        'conv_1': (3, 32, 32, 32),
        'conv_2': (3, 16, 16, 64),
        'conv_3': (3, 8, 8, 128),
    }


def test_random_cnn_features():
    model = _build('random_cnn', features=16, num_layers=3, num_downsample=2)
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 32, 24, 3)), jnp.float32)
    f = model.apply(model.init(_key(), x), x)
    assert f.shape == (2, 8, 6, 16)
    assert np.all(f >= 0) and np.any(f > 0)
    with pytest.raises(ValueError, match='num_downsample'):
        _build('random_cnn', num_layers=2, num_downsample=2)


# --- purifier ---------------------------------------------------------------------------------


def test_nrp_same_shape_residual():
    model = _build('nrp', num_blocks=1, features=16, growth=8)
    variables = model.init(_key(), jnp.zeros((1, 8, 8, 3)))
    for shape in [(2, 16, 16, 3), (1, 9, 14, 3)]:
        x = jnp.asarray(np.random.default_rng(0).uniform(size=shape), jnp.float32)
        y = model.apply(variables, x)
        assert y.shape == x.shape and y.dtype == x.dtype
        assert np.all(np.isfinite(y)) and np.any(y != x)


def test_nrp_default_param_count():
    # Dense block (32 ch, growth 16, 4 layers): 32*16*9+16 + 48*16*9+16 + 64*16*9+16 + 80*16*9+16
    #   + 96*32*9+32 = 60,000; RRDB = 3 dense blocks = 180,000; two RRDBs 360,000;
    #   head 896, trunk 9,248, tail_0 9,248, tail_1 32*3*9+3 = 867.
    assert _param_count(_build('nrp')) == 380_259


# --- registry ---------------------------------------------------------------------------------


def test_build_unknown_name_lists_valid():
    with pytest.raises(
        ValueError, match='valid: .*fsrcnn.*imdn.*nrp.*random_cnn.*resnet.*small_cnn'
    ):
        _build('vdsr')


def test_build_unknown_field_lists_valid():
    with pytest.raises(ValueError, match=r"no field\(s\) \['blocks'\]; valid: .*num_blocks"):
        _build('imdn', blocks=3)


def test_build_overrides():
    model = models.build(ml_collections.ConfigDict(dict(name='imdn', scale=2)), scale=4)
    assert isinstance(model, models.imdn.IMDN) and model.scale == 4
