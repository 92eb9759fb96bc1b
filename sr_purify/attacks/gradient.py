"""Gradient attacks on classifiers: FGSM/FGM, PGD, MI-FGSM and APGD (CE or DLR loss).

All attacks share one signature,

    attack(fn, params, x, key, labels, *, eps, ...) -> x_adv,

where `fn` is a deterministic `fn(params, x) -> logits` or a `RandomFn`
(see `wrappers.py`), x is an NHWC batch in [0, 1] and labels are the true
classes (or the target classes when `targeted=True`). Everything is pure and
jit-able; the number of steps and restarts is static.

Every iterate is projected onto the eps-ball around x and clipped to [0, 1].
For both norms the box clip can only shrink each coordinate's distance to x
(x itself lies in the box), so projecting first and clipping second keeps the
result inside both sets.
"""

import math
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from sr_purify.attacks import wrappers

NORMS = ('l2', 'linf')
# Losses APGD can ascend: cross-entropy, or the Difference of Logits Ratio (Croce & Hein 2020).
LOSSES = ('ce', 'dlr')

# Floor for norms we divide by: a zero gradient or perturbation stays zero
# instead of becoming NaN.
_TINY = 1e-12


# ----------------------------------------------------------------------------
# Norm geometry shared by all attacks (also used by label_free.py).


def _check_norm(norm: str):
    if norm not in NORMS:
        raise ValueError(f'unknown norm {norm!r}; valid: {", ".join(NORMS)}')


def _per_sample_l2(v: jax.Array) -> jax.Array:
    """L2 norm of every sample, shaped (B, 1, 1, ...) to broadcast against v."""
    axes = tuple(range(1, v.ndim))
    return jnp.sqrt(jnp.sum(jnp.square(v), axis=axes, keepdims=True))


def steepest_direction(grad: jax.Array, norm: str) -> jax.Array:
    """Unit-norm ascent direction: sign(g) for L-inf, g / ||g||_2 for L2."""
    if norm == 'linf':
        return jnp.sign(grad)
    return grad / jnp.maximum(_per_sample_l2(grad), _TINY)


def project(x_adv: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """Projects x_adv onto {z : ||z - x|| <= eps} and then onto [0, 1]."""
    if norm == 'linf':
        # Clip x_adv itself (not x + clip(delta)) so eps = 0 gives x bit-exactly.
        x_adv = jnp.clip(x_adv, min=x - eps, max=x + eps)
    else:
        delta = x_adv - x
        scale = jnp.minimum(1.0, eps / jnp.maximum(_per_sample_l2(delta), _TINY))
        x_adv = x + delta * scale.astype(delta.dtype)
    return jnp.clip(x_adv, min=0.0, max=1.0)


def uniform_in_ball(key: jax.Array, x: jax.Array, eps, norm: str) -> jax.Array:
    """A point drawn uniformly from the eps-ball around x, clipped to [0, 1]."""
    if norm == 'linf':
        delta = jax.random.uniform(key, x.shape, x.dtype, minval=-1.0, maxval=1.0) * eps
    else:
        # Uniform in the L2 ball: a uniform direction times radius eps * U^(1/d).
        k_dir, k_rad = jax.random.split(key)
        direction = jax.random.normal(k_dir, x.shape, x.dtype)
        direction = direction / jnp.maximum(_per_sample_l2(direction), _TINY)
        dim = math.prod(x.shape[1:])
        u = jax.random.uniform(k_rad, (x.shape[0],) + (1,) * (x.ndim - 1), x.dtype)
        delta = direction * eps * u ** (1.0 / dim)
    return project(x + delta, x, eps, norm)


# ----------------------------------------------------------------------------
# Objective.


def dlr_loss(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Difference of Logits Ratio (Croce & Hein, ICML 2020, Eq. 6), per sample:

        DLR(z, y) = -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12),

    with z_pi1 >= z_pi2 >= z_pi3 the sorted logits. Positive once y is no longer the top class;
    invariant to shifting and (positively) scaling the logits, so a classifier cannot hide behind
    saturated or rescaled logits. Needs at least 3 classes.
    """
    z = logits.astype(jnp.float32)
    if z.shape[-1] < 3:
        raise ValueError(
            f'the DLR loss needs at least 3 classes (it divides by z_pi1 - z_pi3); '
            f"got logits of shape {z.shape}; use loss='ce'"
        )
    top, top_idx = jax.lax.top_k(z, 3)
    z_y = jnp.take_along_axis(z, labels[:, None], axis=-1)[:, 0]
    # The largest other logit: the runner-up where y is on top, else the top one.
    other = jnp.where(top_idx[:, 0] == labels, top[:, 1], top[:, 0])
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)


def _objective(
    labels: jax.Array, targeted: bool, loss: str = 'ce'
) -> Callable[[jax.Array], jax.Array]:
    """Per-sample quantity every attack *ascends*: CE(y), or -CE(target); DLR(y) for
    loss='dlr' (untargeted only: the targeted DLR needs the true class and the target)."""
    if loss not in LOSSES:
        raise ValueError(f'unknown loss {loss!r}; valid: {", ".join(LOSSES)}')
    if loss == 'dlr' and targeted:
        raise ValueError("loss='dlr' is untargeted; use loss='ce' for a targeted attack")

    def per_sample(logits):
        if loss == 'dlr':
            return dlr_loss(logits, labels)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
        return -ce if targeted else ce

    return per_sample


def _succeeded(logits: jax.Array, labels: jax.Array, targeted: bool) -> jax.Array:
    """Per-sample attack success: misclassified, or classified as the target."""
    pred = jnp.argmax(logits, axis=-1)
    return pred == labels if targeted else pred != labels


def _require_labels(labels, name: str):
    if labels is None:
        raise ValueError(
            f'{name} attacks a classifier and needs labels (true classes, or '
            'target classes when targeted=True); got labels=None'
        )


def _best_of_restarts(
    run_once, fn, params, x, key, labels, targeted, restarts: int, loss: str = 'ce'
):
    """Runs `run_once(key) -> x_adv` `restarts` times and keeps each sample's worst case.

    A restart replaces the kept result for a sample if it succeeds where the
    kept one did not, or if neither succeeds and its loss (`loss`, the attack's)
    is higher; the first success is kept. Restart r uses `fold_in(key, r)`, so the
    first restart is the same run as `restarts=1` with the same key and more
    restarts can only be stronger.
    """
    objective = _objective(labels, targeted, loss)

    def score(x_adv, k):
        logits = wrappers.call(fn, params, x_adv, k)
        return objective(logits), _succeeded(logits, labels, targeted)

    def body(r, carry):
        best_x, best_loss, best_ok = carry
        k = jax.random.fold_in(key, r)
        x_adv = run_once(k)
        # Restart r's own randomness derives from fold_in(key, r) by split, so a
        # fold_in gives the scoring draw (used only by random functions) a fresh key.
        loss, ok = score(x_adv, jax.random.fold_in(k, 1))
        better = ~best_ok & (ok | (loss > best_loss))
        sel = better.reshape((-1,) + (1,) * (x.ndim - 1))
        return (jnp.where(sel, x_adv, best_x), jnp.where(better, loss, best_loss), best_ok | ok)

    batch = x.shape[0]
    init = (x, jnp.full((batch,), -jnp.inf, jnp.float32), jnp.zeros((batch,), bool))
    if restarts == 1:
        return run_once(jax.random.fold_in(key, 0))
    best_x, _, _ = wrappers.loop(0, restarts, body, init)
    return best_x


# ----------------------------------------------------------------------------
# Attacks.


def fgsm(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 8 / 255,
    norm: str = 'linf',
    targeted: bool = False,
) -> jax.Array:
    """Fast Gradient Sign Method (Goodfellow et al. 2015); FGM for norm='l2'.

    One step of length eps along the steepest ascent direction of the CE loss
    (descent of the CE to the target when targeted).
    """
    _check_norm(norm)
    _require_labels(labels, 'fgsm')
    _, _, grad = wrappers.loss_and_grad(_objective(labels, targeted), fn, params, x, key)
    return project(x + eps * steepest_direction(grad, norm), x, eps, norm)


def fgm(fn, params, x, key, labels=None, *, eps: float = 0.5, targeted: bool = False):
    """L2 fast gradient method: one step of L2 length eps along the gradient."""
    return fgsm(fn, params, x, key, labels, eps=eps, norm='l2', targeted=targeted)


def pgd(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = 2 / 255,
    norm: str = 'linf',
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
) -> jax.Array:
    """Projected Gradient Descent (Madry et al. 2018), L-inf or L2.

    Returns the last iterate of each restart; across restarts each sample keeps
    its worst case. `step_size=None` uses Madry's 2.5 * eps / steps.
    """
    _check_norm(norm)
    _require_labels(labels, 'pgd')
    if step_size is None:
        step_size = 2.5 * eps / max(steps, 1)
    objective = _objective(labels, targeted)

    def run_once(k):
        k_start, k_loop = jax.random.split(k)
        x0 = uniform_in_ball(k_start, x, eps, norm) if random_start else x

        def body(i, x_adv):
            _, _, grad = wrappers.loss_and_grad(
                objective, fn, params, x_adv, jax.random.fold_in(k_loop, i)
            )
            return project(x_adv + step_size * steepest_direction(grad, norm), x, eps, norm)

        return wrappers.loop(0, steps, body, x0)

    return _best_of_restarts(run_once, fn, params, x, key, labels, targeted, restarts)


def mifgsm(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 8 / 255,
    steps: int = 10,
    step_size: float | None = None,
    decay: float = 1.0,
    norm: str = 'linf',
    targeted: bool = False,
) -> jax.Array:
    """Momentum Iterative FGSM (Dong et al. CVPR 2018).

    g_{t+1} = decay * g_t + grad_t / ||grad_t||_1 (per sample), then a step
    along sign(g_{t+1}) (L-inf) or g_{t+1} / ||g_{t+1}||_2 (L2). The paper's
    defaults: decay 1.0, step eps / steps (used when step_size is None), no
    random start.
    """
    _check_norm(norm)
    _require_labels(labels, 'mifgsm')
    if step_size is None:
        step_size = eps / max(steps, 1)
    objective = _objective(labels, targeted)

    def body(i, carry):
        x_adv, momentum = carry
        key_i = jax.random.fold_in(key, i)
        _, _, grad = wrappers.loss_and_grad(objective, fn, params, x_adv, key_i)
        l1 = jnp.sum(jnp.abs(grad), axis=tuple(range(1, grad.ndim)), keepdims=True)
        momentum = decay * momentum + grad / jnp.maximum(l1, _TINY)
        x_adv = project(x_adv + step_size * steepest_direction(momentum, norm), x, eps, norm)
        return x_adv, momentum

    x_adv, _ = wrappers.loop(0, steps, body, (x, jnp.zeros_like(x)))
    return x_adv


def apgd_checkpoints(steps: int) -> list[int]:
    """Iterations at which APGD may halve its step (Croce & Hein 2020, Sec. 3.2).

    The paper's w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22,
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), in integer arithmetic
    (segments of 0.22 steps, each 0.03 steps shorter, at least 0.06 steps), so
    float rounding cannot shift a checkpoint: 100 steps give
    22, 41, 57, 70, 80, 87, 93, 99.
    """
    segment = max(int(0.22 * steps), 1)
    shrink, shortest = max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    checks, w = [], segment
    while w < steps:
        checks.append(w)
        segment = max(segment - shrink, shortest)
        w += segment
    return checks


def apgd(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 8 / 255,
    steps: int = 100,
    norm: str = 'linf',
    random_start: bool = True,
    restarts: int = 1,
    targeted: bool = False,
    momentum: float = 0.75,
    rho: float = 0.75,
    loss: str = 'ce',
) -> jax.Array:
    """APGD-CE, Auto-PGD on the cross-entropy (Croce & Hein, ICML 2020, Alg. 1);
    APGD-DLR with loss='dlr' (the `dlr_loss`, untargeted, at least 3 classes).

    Step size starts at 2 * eps and is halved per sample at the checkpoints of
    `apgd_checkpoints` when (1) the loss increased in fewer than rho of the
    steps since the last checkpoint, or (2) the step was not halved at the last
    checkpoint and the best loss has not improved since; on halving, the
    iterate restarts from the best point found. Updates use momentum 0.75:
    x_{k+1} = P(x_k + a (z_{k+1} - x_k) + (1 - a)(x_k - x_{k-1})), a = momentum.

    Returns, per sample, the first iterate that succeeds (misclassified, or the
    target reached), else the highest-loss iterate.
    """
    _check_norm(norm)
    _require_labels(labels, 'apgd')
    objective = _objective(labels, targeted, loss)
    checks = apgd_checkpoints(steps)
    # Static per-iteration tables: is iteration k+1 a checkpoint, and how long
    # was the segment that ends there.
    is_check = [False] * (steps + 1)
    seg_len = [1] * (steps + 1)
    prev = 0
    for w in checks:
        is_check[w], seg_len[w], prev = True, w - prev, w
    is_check, seg_len = jnp.array(is_check), jnp.array(seg_len, jnp.float32)
    expand = lambda v: v.reshape((-1,) + (1,) * (x.ndim - 1))

    def run_once(k):
        k_start, k_loop = jax.random.split(k)
        x0 = uniform_in_ball(k_start, x, eps, norm) if random_start else x
        loss0, out0, grad0 = wrappers.loss_and_grad(
            objective, fn, params, x0, jax.random.fold_in(k_loop, 0)
        )
        ok0 = _succeeded(out0, labels, targeted)
        batch = x.shape[0]
        state = dict(
            x_cur=x0,
            x_prev=x0,
            grad=grad0,
            loss_cur=loss0,
            x_best=x0,
            grad_best=grad0,
            loss_best=loss0,
            x_found=x0,
            found=ok0,
            eta=jnp.full((batch,), 2.0 * eps, x.dtype),
            n_increase=jnp.zeros((batch,), jnp.float32),
            loss_best_at_check=loss0,
            reduced_at_check=jnp.zeros((batch,), bool),
        )

        def body(i, s):
            # Gradient step to z, then momentum; the first step is the plain
            # x^(1) = P(x^(0) + eta * direction), as in the paper.
            x_cur, x_prev = s['x_cur'], s['x_prev']
            step = expand(s['eta']) * steepest_direction(s['grad'], norm)
            z = project(x_cur + step, x, eps, norm)
            a = jnp.where(i == 0, 1.0, momentum).astype(x.dtype)
            x_new = project(x_cur + a * (z - x_cur) + (1 - a) * (x_cur - x_prev), x, eps, norm)
            loss, out, grad = wrappers.loss_and_grad(
                objective, fn, params, x_new, jax.random.fold_in(k_loop, i + 1)
            )
            ok = _succeeded(out, labels, targeted)

            s = dict(s)
            s['x_found'] = jnp.where(expand(ok & ~s['found']), x_new, s['x_found'])
            s['found'] = s['found'] | ok
            s['n_increase'] = s['n_increase'] + (loss > s['loss_cur'])
            improved = loss > s['loss_best']
            s['x_best'] = jnp.where(expand(improved), x_new, s['x_best'])
            s['grad_best'] = jnp.where(expand(improved), grad, s['grad_best'])
            s['loss_best'] = jnp.where(improved, loss, s['loss_best'])
            s['x_prev'], s['x_cur'], s['grad'], s['loss_cur'] = s['x_cur'], x_new, grad, loss

            def at_checkpoint(s):
                s = dict(s)
                few_increases = s['n_increase'] < rho * seg_len[i + 1]
                stalled = ~s['reduced_at_check'] & (s['loss_best'] <= s['loss_best_at_check'])
                halve = few_increases | stalled
                s['eta'] = jnp.where(halve, s['eta'] / 2, s['eta'])
                # Restart halved samples from their best point, without momentum.
                s['x_cur'] = jnp.where(expand(halve), s['x_best'], s['x_cur'])
                s['x_prev'] = jnp.where(expand(halve), s['x_best'], s['x_prev'])
                s['grad'] = jnp.where(expand(halve), s['grad_best'], s['grad'])
                s['loss_cur'] = jnp.where(halve, s['loss_best'], s['loss_cur'])
                s['reduced_at_check'] = halve
                s['loss_best_at_check'] = s['loss_best']
                s['n_increase'] = jnp.zeros_like(s['n_increase'])
                return s

            return jax.lax.cond(is_check[i + 1], at_checkpoint, lambda s: s, s)

        s = wrappers.loop(0, steps, body, state)
        return jnp.where(expand(s['found']), s['x_found'], s['x_best'])

    return _best_of_restarts(run_once, fn, params, x, key, labels, targeted, restarts, loss)
