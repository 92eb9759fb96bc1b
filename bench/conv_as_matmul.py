"""Convolutions with a selectable implementation: XLA's convolution or one matrix multiply.

`Conv(features, kernel_size, impl=...)` builds a `flax.linen.Conv`, so parameter names, shapes and
initialisers are those of `nn.Conv` and checkpoints are interchangeable between implementations:

* 'xla' (default): `lax.conv_general_dilated`, XLA's own convolution;
* 'matmul': a stride-1 'SAME' convolution as im2col patches (the k*k shifted copies of the padded
  input concatenated on channels) times the (k*k*C_in, C_out) kernel, i.e. one dot; anything else
  (strides, dilation, groups, other layouts) falls back to XLA's convolution.

`use_conv_impl('matmul')` switches every `nn.Conv` that a model builds while the context is open
(at trace time), so a model can be measured with another implementation without editing it
(`bench/sr_speed.py --conv_impl=matmul`).

Measured on the 2-core AMD EPYC CPU host with jaxlib 0.10.2: 'matmul' costs about twice the CPU
time of 'xla' (EDSR-baseline train step 3.8 vs 1.8 CPU-s, inference 1.07 vs 0.45): XLA builds the
9x patches slowly (a 64-channel 48x48 batch of 16: 150-200 ms for 85 MB), more than the dot gains.
So the models keep 'xla'; 'matmul' is here to measure on other hosts.
"""

import contextlib
import functools
from typing import Any, Iterator, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('xla', 'matmul')
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _same_padding(kernel: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    return tuple(((k - 1) // 2, k // 2) for k in kernel)


def conv_general_dilated_matmul(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: Union[str, Sequence[Tuple[int, int]]],
    lhs_dilation: Optional[Sequence[int]] = None,
    rhs_dilation: Optional[Sequence[int]] = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    **kwargs,
) -> jax.Array:
    """`lax.conv_general_dilated` for NHWC/HWIO stride-1 convolutions as one dot over patches."""
    plain = (
        lhs.ndim == 4
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
        and all(s == 1 for s in window_strides)
        and feature_group_count == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and not kwargs
    )
    if not plain or (isinstance(padding, str) and padding != 'SAME'):
        return lax.conv_general_dilated(
            lhs,
            rhs,
            window_strides,
            padding,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            precision=precision,
            **kwargs,
        )
    kh, kw, cin, cout = rhs.shape
    pads = _same_padding((kh, kw)) if isinstance(padding, str) else tuple(map(tuple, padding))
    if kh * kw > 1:
        n, h, w, _ = lhs.shape
        x = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
        ho, wo = h + sum(pads[0]) - kh + 1, w + sum(pads[1]) - kw + 1
        lhs = jnp.concatenate(
            [x[:, i : i + ho, j : j + wo] for i in range(kh) for j in range(kw)], axis=-1
        )
    elif any(p for pair in pads for p in pair):
        lhs = jnp.pad(lhs, ((0, 0), *pads, (0, 0)))
    return jnp.dot(lhs, rhs.reshape(kh * kw * cin, cout), precision=precision)


def _impl_fn(impl: str):
    if impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl {impl!r} not supported; valid: {", ".join(CONV_IMPLS)}')
    return conv_general_dilated_matmul if impl == 'matmul' else None


def Conv(
    features: int,
    kernel_size: Sequence[int],
    *,  # pylint: disable=invalid-name
    impl: str = 'xla',
    **kwargs,
) -> nn.Conv:
    """`nn.Conv(features, kernel_size, **kwargs)` computed by `impl` ('xla' or 'matmul')."""
    return nn.Conv(features, kernel_size, conv_general_dilated=_impl_fn(impl), **kwargs)


def conv_factory(impl: str = 'xla'):
    """`Conv` with `impl` bound, e.g. `conv = conv_factory(self.conv_impl)`."""
    _impl_fn(impl)
    return functools.partial(Conv, impl=impl)


@contextlib.contextmanager
def use_conv_impl(impl: str) -> Iterator[None]:
    """Within the context, every `nn.Conv` call without its own `conv_general_dilated` uses `impl`.

    It acts when a function is traced (wrap the `model.apply` inside the jitted function).
    """
    fn = _impl_fn(impl)

    def interceptor(next_fun, args, kwargs, context):
        module = context.module
        if (
            fn is not None
            and isinstance(module, nn.Conv)
            and context.method_name == '__call__'
            and module.conv_general_dilated is None
        ):
            # The module is rebuilt on every apply, so setting the field here lasts one call.
            object.__setattr__(module, 'conv_general_dilated', fn)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(interceptor):
        yield
