"""`Conv`: flax's `nn.Conv` with an input gradient that XLA's CPU backend runs fast inside loops.

Why: an attack differentiates a model with respect to its input many times in one compiled
`fori_loop`. The input gradient that JAX derives for a convolution is a convolution whose kernel
dimensions are swapped (O and I). At the top level of a program XLA gives that kernel a layout
its fast kernels take; inside a while-loop body it does not, and that one convolution runs about
10x slower (jax#12868). Measured on a 2-core Intel Xeon (avx512f), batch 100 of 32x32x16, 3x3:
the autodiff input gradient in a rolled loop 474 ms per step, unrolled 54 ms; the same gradient
written as an ordinary NHWC/HWIO convolution with the kernel flipped and transposed 56 ms rolled.
So `Conv` keeps the forward pass and the kernel gradient exactly as JAX builds them and writes
only the input gradient out explicitly (the transpose rule of a strided convolution: the kernel
flipped and transposed, the cotangent dilated by the strides, JAX's padding formula).

Cases this does not cover (grouped or input-dilated convolutions, other layouts) fall back to
`jax.lax.conv_general_dilated` unchanged. Parameters are `nn.Conv`'s: same names, shapes and
initialisers, so checkpoints are unaffected.
"""

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

_NHWC = ('NHWC', 'HWIO', 'NHWC')


def _dilated(size: int, dilation: int) -> int:
    return 0 if size == 0 else 1 + dilation * (size - 1)


def _forward(x, w, strides, padding, rhs_dilation, precision):
    return jax.lax.conv_general_dilated(
        x,
        w,
        strides,
        padding,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _conv(x, w, strides, padding, rhs_dilation, precision):
    return _forward(x, w, strides, padding, rhs_dilation, precision)


def _conv_fwd(x, w, strides, padding, rhs_dilation, precision):
    return _forward(x, w, strides, padding, rhs_dilation, precision), (x, w)


def _conv_bwd(strides, padding, rhs_dilation, precision, residuals, g):
    x, w = residuals
    pads = []
    for axis, (low, _) in enumerate(padding):
        window = _dilated(w.shape[axis], rhs_dilation[axis])
        before = window - low - 1
        after = x.shape[axis + 1] + window - 1 - _dilated(g.shape[axis + 1], strides[axis]) - before
        pads.append((before, after))
    flipped = jnp.swapaxes(jnp.flip(w, (0, 1)), 2, 3)  # (kh, kw, O, I): an ordinary HWIO kernel
    dx = jax.lax.conv_general_dilated(
        g,
        flipped,
        (1,) * len(strides),
        pads,
        lhs_dilation=strides,
        rhs_dilation=rhs_dilation,
        dimension_numbers=_NHWC,
        precision=precision,
    )
    # The kernel gradient is JAX's own (its primal is recomputed in the trace, and XLA drops it).
    _, kernel_vjp = jax.vjp(lambda k: _forward(x, k, strides, padding, rhs_dilation, precision), w)
    (dw,) = kernel_vjp(g)
    return dx.astype(x.dtype), dw


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
    lhs,
    rhs,
    window_strides: Sequence[int],
    padding,
    lhs_dilation=None,
    rhs_dilation=None,
    dimension_numbers=None,
    feature_group_count: int = 1,
    precision=None,
    **kwargs,
):
    """`jax.lax.conv_general_dilated`, with the explicit input gradient for the plain 2-D NHWC
    case (what every model here uses); anything else goes to the library function as it is."""
    plain = (
        lhs.ndim == 4
        and feature_group_count == 1
        and not kwargs
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and dimension_numbers is not None
        and jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
        == jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    )
    if not plain:
        return jax.lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation=lhs_dilation,
            rhs_dilation=rhs_dilation,
            dimension_numbers=dimension_numbers,
            feature_group_count=feature_group_count,
            precision=precision,
            **kwargs,
        )
    strides = tuple(int(s) for s in window_strides)
    rhs_dilation = tuple(int(d) for d in (rhs_dilation or (1, 1)))
    if isinstance(padding, str):
        window = [_dilated(k, d) for k, d in zip(rhs.shape[:2], rhs_dilation)]
        padding = jax.lax.padtype_to_pads(lhs.shape[1:3], window, strides, padding)
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
    return _conv(lhs, rhs, strides, padding, rhs_dilation, precision)


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)
