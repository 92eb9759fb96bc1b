"""Convolutions with a selectable implementation: XLA's convolution or one matrix multiply.

`Conv(features, kernel_size, impl=...)` builds a `flax.linen.Conv`, so parameter names, shapes and
initialisers are those of `nn.Conv` and checkpoints are interchangeable between implementations:

* 'xla' (default): `lax.conv_general_dilated`, XLA's own convolution;
* 'matmul': a stride-1 'SAME' convolution as im2col patches (the k*k shifted copies of the padded
  input concatenated on channels) times the (k*k*C_in, C_out) kernel, i.e. one dot; anything else
  (strides, dilation, groups, other layouts) falls back to XLA's convolution;
* 'winograd': stride-1 'SAME' 3x3 convolutions by Winograd's minimal filtering F(2x2, 3x3)
  (Lavin & Gray, CVPR 2016): the input in overlapping 4x4 tiles of stride 2 goes through
  B^T d B (additions of strided slices: 4 copies of the input, not im2col's 9), the kernel
  through G g G^T, then 16 batched (tiles, C_in) x (C_in, C_out) dots (4 multiplies per output
  pixel and channel pair instead of 9) and A^T m A back to 2x2 outputs; other convolutions take
  the 'matmul' path (so 1x1 convolutions are plain dots).

`use_conv_impl('matmul')` switches every `nn.Conv` that a model builds while the context is open
(at trace time), so a model can be measured with another implementation without editing it
(`bench/sr_speed.py --conv_impl=matmul`).

Measured on the 2-core AMD EPYC CPU host with jaxlib 0.10.2: 'matmul' costs about twice the CPU
time of 'xla' (EDSR-baseline train step 3.8 vs 1.8 CPU-s, inference 1.07 vs 0.45): XLA builds the
9x patches slowly (a 64-channel 48x48 batch of 16: 150-200 ms for 85 MB), more than the dot gains.
So the models keep 'xla'; 'matmul' is here to measure on other hosts.

'winograd' on a 2-core Intel Xeon (avx512f), timed interleaved with 'xla' while a training job
held the other core (so ratios, not absolute times): one 3x3 conv of 64 channels on 16 x 48 x 48,
forward 135 vs 65 ms; two convs forward + backward 818 vs 751 ms; one 256 x 256 image 191 vs
70 ms forward. Slower: XLA does not fuse the strided-slice transforms into the 16 dots. In the
same run the backward pass was where the time goes: the kernel gradient of that conv took
295 ms against 70 ms for its forward and 70 ms for its input gradient, and neither patches nor
nine shifted dots beat it (262 / 386 ms), because XLA's dot contracting over the 36,864 pixels
of a (pixels, 64) pair ran at about 13 GFLOP/s there.
"""

import contextlib
import functools
from typing import Any, Iterator, List, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

CONV_IMPLS = ('xla', 'matmul', 'winograd')
_NHWC = lax.ConvDimensionNumbers((0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def _same_padding(kernel: Sequence[int]) -> Tuple[Tuple[int, int], ...]:
    return tuple(((k - 1) // 2, k // 2) for k in kernel)


def _plain_nhwc(
    lhs, rhs, window_strides, lhs_dilation, rhs_dilation, dimension_numbers, groups, kwargs
) -> bool:
    """An NHWC/HWIO stride-1 convolution without dilation or groups: what the dot paths take."""
    return (
        lhs.ndim == 4
        and dimension_numbers is not None
        and lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) == _NHWC
        and all(s == 1 for s in window_strides)
        and groups == 1
        and all(d == 1 for d in (lhs_dilation or (1, 1)))
        and all(d == 1 for d in (rhs_dilation or (1, 1)))
        and not kwargs
    )


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
    plain = _plain_nhwc(
        lhs,
        rhs,
        window_strides,
        lhs_dilation,
        rhs_dilation,
        dimension_numbers,
        feature_group_count,
        kwargs,
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


# F(2x2, 3x3) transforms (Lavin & Gray 2016): y = A^T [(G g G^T) * (B^T d B)] A for a 4x4 input
# tile d, a 3x3 kernel g and a 2x2 output tile y. B^T and A^T are applied as the additions below.
_WINOGRAD_G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], np.float32)


def _winograd_input(x: jax.Array, axis: int, tiles: int) -> List[jax.Array]:
    """B^T along `axis`: the 4 rows of every stride-2 tile, combined without copying 4x4 tiles."""

    def rows(a):  # rows 2i + a of every tile i
        return lax.slice_in_dim(x, a, a + 2 * tiles - 1, stride=2, axis=axis)

    r0, r1, r2, r3 = (rows(a) for a in range(4))
    return [r0 - r2, r1 + r2, r2 - r1, r1 - r3]


def _winograd_output(m: Sequence[jax.Array]) -> List[jax.Array]:
    """A^T along one index of the 4x4 transform domain: 4 arrays in, the 2 outputs of a tile out."""
    return [m[0] + m[1] + m[2], m[1] - m[2] - m[3]]


def conv_general_dilated_winograd(
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
    """`lax.conv_general_dilated` for NHWC/HWIO stride-1 'SAME' 3x3 convolutions by F(2x2, 3x3)."""
    same_3x3 = rhs.ndim == 4 and rhs.shape[:2] == (3, 3)
    pads = tuple(map(tuple, padding)) if not isinstance(padding, str) else padding
    if not (
        same_3x3
        and pads in ('SAME', ((1, 1), (1, 1)))
        and _plain_nhwc(
            lhs,
            rhs,
            window_strides,
            lhs_dilation,
            rhs_dilation,
            dimension_numbers,
            feature_group_count,
            kwargs,
        )
    ):  # The 'matmul' path: a dot for 1x1 convolutions, XLA's conv for the rest.
        return conv_general_dilated_matmul(
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
    n, h, w, cin = lhs.shape
    cout = rhs.shape[-1]
    th, tw = -(-h // 2), -(-w // 2)  # 2x2 output tiles; odd sizes are padded and cropped.
    x = jnp.pad(lhs, ((0, 0), (1, 2 * th - h + 1), (1, 2 * tw - w + 1), (0, 0)))
    # B^T d B: rows, then columns; 16 arrays of (N, th, tw, C_in).
    v = [c for r in _winograd_input(x, 1, th) for c in _winograd_input(r, 2, tw)]
    v = jnp.stack(v).reshape(16, n * th * tw, cin)
    g = jnp.asarray(_WINOGRAD_G, rhs.dtype)
    u = jnp.einsum('ai,ijco,bj->abco', g, rhs, g, precision=precision).reshape(16, cin, cout)
    m = jnp.einsum('tpc,tco->tpo', v, u, precision=precision)
    m = m.reshape(4, 4, n, th, tw, cout)
    # A^T m A: over the row index of the transform domain, then the column index.
    z = _winograd_output([m[a] for a in range(4)])  # 2 x (4, N, th, tw, C_out)
    y = jnp.stack([jnp.stack(_winograd_output([r[b] for b in range(4)])) for r in z])
    # y[a, b, n, i, j] is output pixel (2i + a, 2j + b).
    y = y.transpose(2, 3, 0, 4, 1, 5).reshape(n, 2 * th, 2 * tw, cout)
    return y[:, :h, :w]


def _impl_fn(impl: str):
    if impl not in CONV_IMPLS:
        raise ValueError(f'conv_impl {impl!r} not supported; valid: {", ".join(CONV_IMPLS)}')
    return {'matmul': conv_general_dilated_matmul, 'winograd': conv_general_dilated_winograd}.get(
        impl
    )


def Conv(
    features: int,
    kernel_size: Sequence[int],
    *,  # pylint: disable=invalid-name
    impl: str = 'xla',
    **kwargs,
) -> nn.Conv:
    """`nn.Conv(features, kernel_size, **kwargs)` computed by `impl` (one of CONV_IMPLS)."""
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
