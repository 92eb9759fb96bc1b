"""Function wrappers that attacks understand: random stages (EOT) and BPDA.

Attacks call the function under attack through `loss_and_grad`, which is the
one place that knows how a function is called:

* a plain function is deterministic and called as `fn(params, x)`;
* a `RandomFn` (made by `random_fn` or `eot`) is called as
  `fn.fn(params, x, key)` with `fn.samples` fresh keys per call; the attack
  folds its iteration number into its key, so every iteration draws new
  randomness.

Tagging the random functions (instead of inspecting signatures) keeps the
common, deterministic case free of boilerplate and never guesses wrong about a
`functools.partial` or a jitted function.
"""

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RandomFn:
    """A function `fn(params, x, key)` whose output depends on a PRNG key.

    Attributes:
      fn: the random function.
      samples: how many independent draws an attack averages per gradient
        (Expectation over Transformation, Athalye et al. 2018).

    Attacks average the *loss* over the draws, so the gradient they follow is
    E_k[grad L(fn(x, k))], the EOT definition, for any loss. Calling the object
    directly returns the mean *output* over the draws (for prediction under a
    random defence); for a loss that is linear in the output both coincide.

    Frozen (hence hashable), so it can be a static argument of `jax.jit`.
    """

    fn: Callable[..., Any]
    samples: int = 1

    def __post_init__(self):
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f'samples must be an int >= 1; got {self.samples!r}')

    def __call__(self, params, x, key):
        return _mean_over_draws(lambda k: self.fn(params, x, k), key, self.samples)


# Convolutions inside a rolled XLA while-loop run several times slower on CPU than the same steps
# unrolled (jax#12868: 10-step PGD on ResNet-20 took 30.8 s rolled, 2.5 s as separate steps), so
# loops of up to MAX_UNROLL iterations are unrolled; longer ones stay rolled to bound compile time.
MAX_UNROLL = 32


def loop(lower: int, upper: int, body, init):
    """`jax.lax.fori_loop`, fully unrolled when the (static) trip count is at most MAX_UNROLL."""
    unroll = isinstance(upper, int) and isinstance(lower, int) and upper - lower <= MAX_UNROLL
    return jax.lax.fori_loop(lower, upper, body, init, unroll=True if unroll else 1)


def random_fn(fn: Callable[..., Any]) -> RandomFn:
    """Marks `fn(params, x, key)` as random: one fresh draw per attack step."""
    return fn if isinstance(fn, RandomFn) else RandomFn(fn, 1)


def eot(fn_with_key: Callable[..., Any], n: int) -> RandomFn:
    """Expectation over Transformation with `n` draws per gradient.

    `fn_with_key(params, x, key)`; draw i uses `jax.random.split(key, n)[i]`.
    Wrapping a `RandomFn` replaces its sample count.
    """
    inner = fn_with_key.fn if isinstance(fn_with_key, RandomFn) else fn_with_key
    return RandomFn(inner, n)


def _mean_over_draws(draw: Callable[[jax.Array], Any], key: jax.Array, n: int):
    """Mean of the pytree `draw(k)` over `n` keys split from `key`.

    Accumulates in a loop rather than vmapping, so memory does not grow with n.
    """
    keys = jax.random.split(key, n)
    first = draw(keys[0])
    if n == 1:
        return first

    def body(i, acc):
        return jax.tree.map(jnp.add, acc, draw(keys[i]))

    total = loop(1, n, body, first)
    return jax.tree.map(lambda t: t / n, total)


def call(fn, params, x, key):
    """Output of a deterministic or random `fn` (mean over its draws)."""
    if isinstance(fn, RandomFn):
        return fn(params, x, key)
    return fn(params, x)


def loss_and_grad(per_sample_loss: Callable[[Any], jax.Array], fn, params, x, key):
    """Per-sample loss, model output and input gradient, EOT-averaged if random.

    Args:
      per_sample_loss: maps the model output to a loss of shape (batch,).
      fn: a deterministic `fn(params, x)` or a `RandomFn`.
      params: the parameters of `fn` (never differentiated).
      x: the input batch.
      key: PRNG key; unused for deterministic functions.

    Returns:
      (loss, output, grad): loss of shape (batch,), averaged over the draws; the
      output averaged over the draws; the gradient of sum(loss) w.r.t. x. The
      batch is summed, not averaged, so each sample's gradient is its own and
      does not shrink with the batch size.
    """

    def value_and_grad(apply):
        def total(x_):
            out = apply(x_)
            loss = per_sample_loss(out)
            return loss.sum(), (loss, out)

        (_, (loss, out)), grad = jax.value_and_grad(total, has_aux=True)(x)
        return loss, out, grad

    if isinstance(fn, RandomFn):
        return _mean_over_draws(
            lambda k: value_and_grad(lambda x_: fn.fn(params, x_, k)), key, fn.samples
        )
    return value_and_grad(lambda x_: fn(params, x_))


def _zero_cotangent(a):
    """Zero cotangent for a non-differentiated argument (float0 for ints/keys)."""
    a = jnp.asarray(a) if not isinstance(a, jax.Array) else a
    if jnp.issubdtype(a.dtype, jnp.inexact):
        return jnp.zeros_like(a)
    return np.zeros(a.shape, dtype=jax.dtypes.float0)


def _identity(x, *args):
    del args
    return x


def bpda(forward: Callable[..., jax.Array], backward: Callable[..., jax.Array] | None = None):
    """Backward Pass Differentiable Approximation (Athalye et al. 2018).

    Returns `stage(x, *args)` that computes `forward(x, *args)` in the forward
    pass and, in the backward pass, the VJP of `backward(x, *args)` at the same
    x (identity by default, the usual choice for JPEG, quantisation or a
    purifier that approximately returns its input). `forward` need not be
    differentiable. Extra `args` (e.g. a PRNG key or a quality factor) are passed
    to both and receive zero gradient.
    """
    backward = _identity if backward is None else backward

    @jax.custom_vjp
    def stage(x, *args):
        return forward(x, *args)

    def stage_fwd(x, *args):
        return forward(x, *args), (x, args)

    def stage_bwd(res, g):
        x, args = res
        out, vjp = jax.vjp(lambda x_: backward(x_, *args), x)
        if out.shape != g.shape:
            raise ValueError(
                f'bpda: backward output shape {out.shape} differs from forward output shape '
                f'{g.shape}; backward must approximate forward, so their shapes must match'
            )
        (gx,) = vjp(g.astype(out.dtype))
        return (gx, *jax.tree.map(_zero_cotangent, args))

    stage.defvjp(stage_fwd, stage_bwd)
    return stage
