"""Tests for bench/conv_as_matmul.py (by hand: python -m pytest bench): its convs equal XLA's."""

import conv_as_matmul as layers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from sr_purify.models import edsr

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _xla(x, w):
    return lax.conv_general_dilated(
        x, w, (1, 1), 'SAME', dimension_numbers=NHWC, precision='highest'
    )


IMPLS = {
    'matmul': layers.conv_general_dilated_matmul,
    'winograd': layers.conv_general_dilated_winograd,
}


@pytest.mark.parametrize('impl', sorted(IMPLS))
@pytest.mark.parametrize(
    'kernel,cin,cout,size',
    [
        ((3, 3), 5, 7, (9, 11)),
        ((3, 3), 4, 3, (8, 8)),
        ((3, 3), 2, 2, (1, 1)),
        ((1, 1), 6, 4, (9, 11)),
        ((5, 5), 3, 8, (9, 11)),
    ],
)
def test_conv_impl_matches_xla(impl, kernel, cin, cout, size):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, *size, cin)), jnp.float32)
    w = jnp.asarray(rng.normal(size=kernel + (cin, cout)), jnp.float32)
    ref = _xla(x, w)

    def conv(x, w):
        return IMPLS[impl](x, w, (1, 1), 'SAME', dimension_numbers=NHWC, precision='highest')

    np.testing.assert_allclose(conv(x, w), ref, rtol=1e-5, atol=1e-5)
    # Gradients too (the training path differentiates through the patches or tiles).
    loss = lambda f: lambda x, w: jnp.sum(f(x, w) * ref)
    g_ref = jax.grad(loss(_xla), (0, 1))(x, w)
    g_got = jax.grad(loss(conv), (0, 1))(x, w)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)


def test_winograd_runs_3x3_convolutions_as_dots():
    x = jnp.ones((1, 6, 6, 3))
    w = jnp.ones((3, 3, 3, 4))
    fn = lambda x, w: layers.conv_general_dilated_winograd(
        x, w, (1, 1), 'SAME', dimension_numbers=NHWC
    )
    text = jax.jit(fn).lower(x, w).as_text()
    assert 'stablehlo.convolution' not in text and 'stablehlo.dot_general' in text


def test_strided_conv_falls_back_to_xla():
    x = jnp.ones((1, 8, 8, 2))
    w = jnp.ones((3, 3, 2, 3))
    ref = lax.conv_general_dilated(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)
    got = layers.conv_general_dilated_matmul(x, w, (2, 2), 'SAME', dimension_numbers=NHWC)
    np.testing.assert_array_equal(got, ref)


def test_conv_params_are_nn_conv_params():
    x = jnp.ones((1, 6, 6, 3))
    a = layers.Conv(4, (3, 3), impl='xla').init(jax.random.key(0), x)
    b = layers.Conv(4, (3, 3), impl='matmul').init(jax.random.key(0), x)
    assert jax.tree.map(jnp.shape, a) == {'params': {'kernel': (3, 3, 3, 4), 'bias': (4,)}}
    jax.tree.map(np.testing.assert_array_equal, a, b)


@pytest.mark.parametrize('impl', sorted(IMPLS))
def test_use_conv_impl_switches_a_model_without_editing_it(impl):
    model = edsr.EDSR(num_blocks=1, features=8, bicubic_skip=True)
    x = jnp.asarray(np.random.default_rng(1).random((1, 10, 10, 3)), jnp.float32)
    params = model.init(jax.random.key(0), x)
    ref = model.apply(params, x)
    with layers.use_conv_impl(impl):
        got = model.apply(params, x)
        text = jax.jit(model.apply).lower(params, x).as_text()
    assert 'stablehlo.convolution' not in text
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


def test_unknown_impl_lists_valid():
    with pytest.raises(ValueError, match='valid: xla, matmul, winograd'):
        layers.conv_factory('strassen')
