"""Label-free attacks: push a function's output away from its clean output.

Both attacks maximise a distortion D(F(x + delta), F(x)) over an eps-ball with
I-FGSM-style steps; they differ in their defaults and in what F is:

* `ssp`, the self-supervised perturbation of NRP (Naseer et al., CVPR 2020),
  attacks a feature extractor (F = features, D = mean squared error);
* `sr_attack`, the basic attack of Choi et al. (ICCV 2019), attacks a
  super-resolution network (F = SR image, D = squared L2 distance).

They take the common signature `attack(fn, params, x, key, labels=None, ...)`
and ignore labels. F may return any pytree (e.g. several feature maps); the
distortion is summed over its leaves.

Why the random start is mandatory: D(F(x + delta), F(x)) has an exactly zero
gradient at delta = 0 (the difference is zero there), so a sign step from the
clean image never moves. NRP's released code starts from Gaussian noise;
Choi et al.'s released code sidesteps it by measuring the distance to the HR
ground truth instead of to SR(lr). We start uniformly within one step of x
(radius min(step_size, eps)), not anywhere in the eps-ball: that breaks the
symmetry, and it keeps Choi et al.'s schedule (T steps of eps / T, a total
travel of eps) able to reach the boundary from the start point.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp

from sr_purify.attacks import gradient, wrappers


def _require_random_start(random_start: bool, name: str):
    if not random_start:
        raise ValueError(
            f'{name} needs random_start=True: its distortion loss has zero gradient at the clean '
            'input, so an attack starting there never moves'
        )


def _per_sample_sum(tree: Any, reduce: Callable[..., jax.Array]) -> jax.Array:
    """Sum over leaves of a per-sample reduction (each leaf has the batch first)."""
    leaves = jax.tree.leaves(tree)
    return sum(reduce(leaf.astype(jnp.float32), axis=tuple(range(1, leaf.ndim))) for leaf in leaves)


def _distortion_attack(fn, params, x, key, *, eps, steps, step_size, norm, reduce):
    """I-FGSM ascent on sum_leaves reduce((F(x_adv) - F(x))^2), from near x."""
    gradient._check_norm(norm)
    k_ref, k_start, k_loop = jax.random.split(key, 3)
    # The clean output is a constant target; for a random F, its EOT mean.
    reference = jax.lax.stop_gradient(wrappers.call(fn, params, x, k_ref))

    def distortion(out):
        diff = jax.tree.map(lambda o, r: jnp.square(o - r), out, reference)
        return _per_sample_sum(diff, reduce)

    def body(i, x_adv):
        key_i = jax.random.fold_in(k_loop, i)
        _, _, grad = wrappers.loss_and_grad(distortion, fn, params, x_adv, key_i)
        step = step_size * gradient.steepest_direction(grad, norm)
        return gradient.project(x_adv + step, x, eps, norm)

    x0 = gradient.uniform_in_ball(k_start, x, jnp.minimum(step_size, eps), norm)
    return wrappers.loop(0, steps, body, x0)


def ssp(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 16 / 255,
    steps: int = 100,
    step_size: float | None = 0.01,
    norm: str = 'linf',
    random_start: bool = True,
):
    """Self-supervised perturbation (Naseer et al., CVPR 2020, NRP).

    Maximises the MSE between `fn(params, x + delta)` and `fn(params, x)` for
    any feature function fn; no labels. Defaults follow the authors' released
    code (github.com/Muzammal-Naseer/NRP, ssp.py): eps = 16/255, step_size =
    0.01 in [0, 1] pixel units (not 1/255), 100 iterations, L-inf, MSE of VGG-16
    features. One difference: they start from N(0, 1) noise, which their first
    projection clips to the corners of the ball; we start within one step of x.
    `step_size=None` uses eps / steps.
    """
    del labels
    _require_random_start(random_start, 'ssp')
    if step_size is None:
        step_size = eps / max(steps, 1)
    return _distortion_attack(
        fn, params, x, key, eps=eps, steps=steps, step_size=step_size, norm=norm, reduce=jnp.mean
    )


def sr_attack(
    fn,
    params,
    x,
    key,
    labels=None,
    *,
    eps: float = 8 / 255,
    steps: int = 50,
    step_size: float | None = None,
    norm: str = 'linf',
    random_start: bool = True,
):
    """Basic adversarial attack on super-resolution (Choi et al., ICCV 2019).

    Perturbs the LR input x within the eps-ball to maximise
    ||SR(x + delta) - SR(x)||_2^2 with I-FGSM iterations. Defaults follow the
    paper and its released code (github.com/idearibosome/tf-sr-attack,
    models/ifgsm.py): T = 50 iterations with step alpha / T where alpha = eps
    (used when step_size is None), L-inf. Their code compares against the HR
    ground truth; we measure the change of the SR output itself, so no HR image
    is needed, hence the random start (see the module docstring).
    """
    del labels
    _require_random_start(random_start, 'sr_attack')
    if step_size is None:
        step_size = eps / max(steps, 1)
    return _distortion_attack(
        fn, params, x, key, eps=eps, steps=steps, step_size=step_size, norm=norm, reduce=jnp.sum
    )
