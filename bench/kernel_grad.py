"""Kernel gradient of a 3x3 'SAME' convolution: JAX's own against formulations written by hand.

Run by hand (never in CI), ideally on one core to see one device's share of a step:

  taskset -c 0 python bench/kernel_grad.py --shape=8,48,48,64,64 --repeats=7

Prints the median time of the forward convolution, JAX's input gradient and each kernel
gradient (checked against JAX's to 1e-4 relative), timed in turns so that load hits them alike.
Candidates: `jax` (the transpose rule: a convolution with batch and feature dimensions swapped),
`shift` (nine dots of a shifted input window against the cotangent), `patch` (one dot of the
9-fold patches against the cotangent), `patch_t` (the same with both operands channel-major, a
plain (M, K) x (N, K)^T dot) and `per_image` (one dot per image, then a sum). README "Speed
against PyTorch" has what they gave (no hand-written form won clearly, so `Conv` keeps JAX's).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

NHWC = ('NHWC', 'HWIO', 'NHWC')


def candidates(n, h, w, c, o):
    def forward(x, k):
        return lax.conv_general_dilated(x, k, (1, 1), 'SAME', dimension_numbers=NHWC)

    def padded(x):
        return jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))

    def windows(xp):
        return [xp[:, i : i + h, j : j + w] for i in range(3) for j in range(3)]

    def kg_jax(x, g, k):
        return jax.vjp(lambda k: forward(x, k), k)[1](g)[0]

    def kg_shift(x, g, k):
        dots = [jnp.einsum('nhwc,nhwo->co', v, g) for v in windows(padded(x))]
        return jnp.stack(dots).reshape(3, 3, c, o)

    def kg_patch(x, g, k):
        p = jnp.concatenate(windows(padded(x)), -1).reshape(-1, 9 * c)
        return lax.dot_general(p, g.reshape(-1, o), (((0,), (0,)), ((), ()))).reshape(3, 3, c, o)

    def kg_patch_t(x, g, k):
        xt = jnp.transpose(padded(x), (3, 0, 1, 2))  # (C, N, H + 2, W + 2)
        p = jnp.concatenate(
            [xt[:, :, i : i + h, j : j + w] for i in range(3) for j in range(3)], 0
        ).reshape(9 * c, -1)
        gt = jnp.transpose(g, (3, 0, 1, 2)).reshape(o, -1)
        return lax.dot_general(p, gt, (((1,), (1,)), ((), ()))).reshape(3, 3, c, o)

    def kg_per_image(x, g, k):
        p = jnp.concatenate(windows(padded(x)), -1).reshape(n, h * w, 9 * c)
        per = jnp.einsum('nqk,nqo->nko', p, g.reshape(n, h * w, o))
        return per.sum(0).reshape(3, 3, c, o)

    def input_grad(x, g, k):
        return jax.vjp(lambda a: forward(a, k), x)[1](g)[0]

    return {
        'forward': lambda x, g, k: forward(x, k),
        'input_grad': input_grad,
        'kg_jax': kg_jax,
        'kg_shift': kg_shift,
        'kg_patch': kg_patch,
        'kg_patch_t': kg_patch_t,
        'kg_per_image': kg_per_image,
    }


def main():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--shape', default='8,48,48,64,64', help='N,H,W,C_in,C_out')
    p.add_argument('--repeats', type=int, default=5)
    args = p.parse_args()
    n, h, w, c, o = (int(v) for v in args.shape.split(','))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, w, c)), jnp.float32)
    g = jnp.asarray(rng.standard_normal((n, h, w, o)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((3, 3, c, o)), jnp.float32)
    fns = {name: jax.jit(f) for name, f in candidates(n, h, w, c, o).items()}
    ref = np.asarray(fns['kg_jax'](x, g, k))
    for name, f in fns.items():
        out = np.asarray(f(x, g, k))
        if name.startswith('kg_'):
            err = np.abs(out - ref).max() / np.abs(ref).max()
            assert err < 1e-4, f'{name}: relative error {err}'
    times = {name: [] for name in fns}
    for _ in range(args.repeats):
        for name, f in fns.items():
            t = time.perf_counter()
            f(x, g, k).block_until_ready()
            times[name].append(time.perf_counter() - t)
    flop = 2 * n * h * w * 9 * c * o
    print(f'shape {args.shape}: {flop / 1e9:.2f} GFLOP each; median of {args.repeats} turns')
    for name, v in times.items():
        m = float(np.median(v))
        print(f'{name:13s} {m * 1e3:8.1f} ms  {flop / m / 1e9:6.1f} GFLOP/s')


if __name__ == '__main__':
    main()
