"""sr_purify.models.conv: the convolution every model uses, whose input gradient is written out
so that XLA's CPU backend runs it fast inside attack loops. It must be the library convolution
exactly: same outputs, same input and kernel gradients, same parameters."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from sr_purify import models
from sr_purify.models import conv

NHWC = ('NHWC', 'HWIO', 'NHWC')

CASES = [
    (kernel, stride, padding, size, 1)
    for kernel, stride, padding, size in itertools.product(
        (1, 3),  # kernel size
        (1, 2),  # stride
        ('SAME', 'VALID', ((1, 2), (0, 1))),  # padding
        (7, 8),  # odd and even input sizes (stride 2 drops a row on odd ones)
    )
] + [
    (3, 1, 'SAME', 8, 2),
    (3, 2, 'SAME', 7, 2),
    (5, 2, 'VALID', 8, 1),
    (5, 1, ((2, 1), (1, 2)), 7, 1),
]


@pytest.mark.parametrize('kernel,stride,padding,size,dilation', CASES)
def test_conv_and_both_gradients_equal_the_library_convolution(
    kernel, stride, padding, size, dilation
):
    x = jax.random.normal(jax.random.key(0), (2, size, size + 1, 3))
    w = jax.random.normal(jax.random.key(1), (kernel, kernel, 3, 4))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)

    def library(x, w):
        return jax.lax.conv_general_dilated(
            x,
            w,
            (stride, stride),
            padding,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=dims,
        )

    def ours(x, w):
        return conv.conv_general_dilated(
            x,
            w,
            (stride, stride),
            padding,
            rhs_dilation=(dilation, dilation),
            dimension_numbers=dims,
        )

    want, want_vjp = jax.vjp(library, x, w)
    got, got_vjp = jax.vjp(ours, x, w)
    cotangent = jax.random.normal(jax.random.key(2), want.shape)
    np.testing.assert_allclose(got, want, atol=1e-5)
    for g, h in zip(got_vjp(cotangent), want_vjp(cotangent)):
        assert g.shape == h.shape
        np.testing.assert_allclose(g, h, atol=1e-4)


def _canonical_convs(fn, x):
    """How many convolutions in fn's jaxpr use the plain NHWC / HWIO / NHWC dimensions."""
    jaxpr = jax.make_jaxpr(fn)(x)
    count = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            lhs, rhs = (v.aval.shape for v in eqn.invars)
            dims = jax.lax.conv_dimension_numbers(lhs, rhs, NHWC)
            count += eqn.params['dimension_numbers'] == dims
    return count


@pytest.mark.parametrize('stride', [1, 2])
def test_the_input_gradient_is_a_plain_nhwc_convolution(stride):
    # JAX's own transpose rule gives the input gradient swapped kernel dimensions (the layout
    # XLA's CPU runs slowly inside loops); ours must be a plain NHWC/HWIO convolution.
    w = jnp.ones((3, 3, 2, 4))
    x = jnp.ones((1, 6, 6, 2))
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, NHWC)
    lib = lambda x: jnp.sum(  # noqa: E731
        jax.lax.conv_general_dilated(x, w, (stride,) * 2, 'SAME', dimension_numbers=dims)
    )
    ours = lambda x: jnp.sum(  # noqa: E731
        conv.conv_general_dilated(x, w, (stride,) * 2, 'SAME', dimension_numbers=dims)
    )
    assert _canonical_convs(jax.grad(lib), x) == 1  # the forward only
    assert _canonical_convs(jax.grad(ours), x) >= 2  # the forward and the input gradient


def test_other_layouts_and_groups_fall_back_to_the_library():
    x = jax.random.normal(jax.random.key(0), (1, 4, 6, 6))  # NCHW
    w = jax.random.normal(jax.random.key(1), (4, 2, 3, 3))  # OIHW, 2 groups
    dims = jax.lax.conv_dimension_numbers(x.shape, w.shape, ('NCHW', 'OIHW', 'NCHW'))
    args = dict(dimension_numbers=dims, feature_group_count=2)
    f = lambda x: conv.conv_general_dilated(x, w, (1, 1), 'SAME', **args)  # noqa: E731
    assert 'custom_vjp_call' not in str(jax.make_jaxpr(f)(x))
    want = jax.lax.conv_general_dilated(x, w, (1, 1), 'SAME', **args)
    np.testing.assert_array_equal(f(x), want)


@pytest.mark.parametrize(
    'cfg',
    [
        dict(name='resnet', depth=8),
        dict(name='nrp', features=8, growth=8, num_blocks=1),
        dict(name='edsr', scale=2, features=8, num_blocks=1),
    ],
    ids=lambda c: c['name'],
)
def test_models_keep_nn_conv_parameters_and_an_attack_loop_gradient(cfg):
    """The models use it, with nn.Conv's parameter tree, and the input gradient through a whole
    model inside a rolled fori_loop (as a long attack runs) equals the unrolled one."""
    model = models.build(ml_collections.ConfigDict(cfg))
    x = jax.random.uniform(jax.random.key(0), (2, 16, 16, 3))
    variables = model.init(jax.random.key(1), x)
    plain = _init_with_plain_convs(model, x)
    assert jax.tree.map(jnp.shape, plain) == jax.tree.map(jnp.shape, variables)

    def out(x):
        y = model.apply(variables, x)
        return jnp.sum(jnp.square(y[0] if isinstance(y, tuple) else y))

    def attack(x, unroll):
        step = lambda i, z: z + 1e-3 * jnp.sign(jax.grad(out)(z))  # noqa: E731
        return jax.lax.fori_loop(0, 3, step, x, unroll=unroll)

    rolled = jax.jit(lambda x: attack(x, 1))(x)
    np.testing.assert_allclose(rolled, jax.jit(lambda x: attack(x, True))(x), atol=1e-6)
    assert 'custom_vjp_call' in str(jax.make_jaxpr(out)(x))  # the model's convs are ours
    # And the gradient is the one flax's own nn.Conv gives.
    want = jax.grad(lambda x: _apply_with_plain_convs(model, variables, x))(x)
    np.testing.assert_allclose(jax.grad(out)(x), want, rtol=1e-4, atol=1e-6)


def _patched(model):
    """Context: the model's module builds its layers with flax's own nn.Conv."""
    import contextlib
    import sys

    module = sys.modules[type(model).__module__]

    @contextlib.contextmanager
    def patch():
        saved, module.Conv = module.Conv, nn.Conv
        try:
            yield
        finally:
            module.Conv = saved

    return patch()


def _init_with_plain_convs(model, x):
    with _patched(model):
        return model.init(jax.random.key(1), x)


def _apply_with_plain_convs(model, variables, x):
    with _patched(model):
        y = model.apply(variables, x)
    return jnp.sum(jnp.square(y[0] if isinstance(y, tuple) else y))
