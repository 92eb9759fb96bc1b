"""Tests for sr_purify.attacks: budgets, strength ordering, EOT/BPDA, no retracing.

CPU only, tiny flax models; the classifier is trained inside the test on an
easy synthetic 4-class task, so attack strength can be compared meaningfully.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from sr_purify import attacks
from sr_purify.attacks import wrappers

NUM_CLASSES = 4
SHAPE = (8, 8, 3)
# Uniform LeCun init: XLA on this CPU takes about a second to compile each
# normal draw, which would dominate this file's run time.
INIT = nn.initializers.variance_scaling(1.0, 'fan_in', 'uniform')
# Keys from XLA's RngBitGenerator: threefry programs take about a second each
# to compile on this CPU, which would dominate the run time. The attacks work
# with any key type; test_jitted_attack_does_not_retrace uses threefry keys.
rng = functools.partial(jax.random.key, impl='rbg')


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(32, kernel_init=INIT)(x))
        return nn.Dense(NUM_CLASSES, kernel_init=INIT)(x)


class ConvFeatures(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(8, (3, 3), kernel_init=INIT)(x))
        return nn.Conv(8, (3, 3), kernel_init=INIT)(x)


class TinySR(nn.Module):
    """Conv -> conv to 3 * 2 * 2 channels -> pixel shuffle (x2).

    No skip connection: an identity-like path would make every corner of the
    eps-ball change the output about equally, leaving nothing to find.
    """

    @nn.compact
    def __call__(self, x):
        b, h, w, _ = x.shape
        y = nn.relu(nn.Conv(16, (3, 3), kernel_init=INIT)(x))
        y = nn.Conv(3 * 4, (3, 3), kernel_init=INIT)(y)
        return y.reshape(b, h, w, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, 3)


def apply_fn(module):
    return lambda params, x: module.apply(params, x)


def make_data(key, n):
    """Four classes: a fixed +-1 template per class plus uniform noise, in [0, 1].

    The template amplitude (0.03) is below 8/255, so a perturbation of that size
    can move a sample onto another class's template; clean accuracy is ~98 %.
    """
    k_labels, k_noise = jax.random.split(key)
    templates = jax.random.rademacher(rng(42), (NUM_CLASSES,) + SHAPE).astype(jnp.float32)
    labels = jax.random.randint(k_labels, (n,), 0, NUM_CLASSES)
    noise = jax.random.uniform(k_noise, (n,) + SHAPE, minval=-0.2, maxval=0.2)
    return jnp.clip(0.5 + 0.03 * templates[labels] + noise, min=0.0, max=1.0), labels


@pytest.fixture(scope='module')
def trained():
    """(fn, params, x_test, y_test): an MLP trained to >= 95 % clean accuracy."""
    model = MLP()
    x_train, y_train = make_data(rng(0), 1024)
    x_test, y_test = make_data(rng(1), 64)
    params = model.init(rng(2), x_train[:1])
    tx = optax.adam(3e-3)

    def step(_, carry):
        params, opt_state = carry
        loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
            model.apply(p, x_train), y_train
        ).mean()
        updates, opt_state = tx.update(jax.grad(loss)(params), opt_state)
        return optax.apply_updates(params, updates), opt_state

    params, _ = jax.jit(lambda p: jax.lax.fori_loop(0, 300, step, (p, tx.init(p))))(params)
    fn = apply_fn(model)
    assert accuracy(fn, params, x_test, y_test) >= 0.95
    return fn, params, x_test, y_test


def accuracy(fn, params, x, y):
    return float(jnp.mean(jnp.argmax(fn(params, x), -1) == y))


def run(name, fn, params, x, key, labels=None, **overrides):
    attack = attacks.make_attack(attacks.attack_config(name=name, **overrides))
    return jax.jit(attack, static_argnums=0)(fn, params, x, key, labels)


def perturbation_norm(d, norm):
    d = d.reshape(d.shape[0], -1)
    return jnp.abs(d).max(-1) if norm == 'linf' else jnp.sqrt(jnp.sum(d * d, -1))


# ---------------------------------------------------------------------------
# Budgets, valid range and eps = 0, for every attack and norm.

CASES = [(name, norm) for name in sorted(attacks.ATTACKS) for norm in ('linf', 'l2')]


@pytest.mark.parametrize('name,norm', CASES)
def test_stays_in_ball_and_range(name, norm):
    model = MLP()
    fn = apply_fn(model)
    x = jax.random.uniform(rng(3), (16,) + SHAPE)
    # Push some pixels onto the box boundary, where clipping matters.
    x = jnp.clip(2 * x - 0.5, min=0.0, max=1.0)
    labels = jax.random.randint(rng(4), (16,), 0, NUM_CLASSES)
    params = model.init(rng(5), x)
    attack = attacks.ATTACKS[name]

    # eps is traced, so eps = 0 reuses the compiled attack (and sweeps over eps
    # never recompile).
    @jax.jit
    def run_eps(eps):
        settings = {} if name == 'fgsm' else dict(steps=3)
        if name not in ('fgsm', 'apgd'):
            settings['step_size'] = eps / 2
        if name in ('pgd', 'apgd'):
            settings['restarts'] = 2  # The restart selection must keep the budget too.
        return attack(fn, params, x, rng(6), labels, eps=eps, norm=norm, **settings)

    eps = 0.05 if norm == 'linf' else 0.5
    x_adv = run_eps(eps)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert float(perturbation_norm(x_adv - x, norm).max()) <= eps + 1e-6
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(jnp.abs(x_adv - x).max()) > 0.0  # It did something.
    np.testing.assert_array_equal(np.asarray(run_eps(0.0)), np.asarray(x))


# ---------------------------------------------------------------------------
# Strength on a trained classifier.


def test_strength_ordering(trained):
    fn, params, x, y = trained
    key = rng(7)
    eps = 8 / 255
    clean = accuracy(fn, params, x, y)
    acc_fgsm = accuracy(fn, params, run('fgsm', fn, params, x, key, y, eps=eps), y)
    acc_pgd = accuracy(
        fn, params, run('pgd', fn, params, x, key, y, eps=eps, steps=10, step_size=eps / 4), y
    )
    acc_apgd = accuracy(fn, params, run('apgd', fn, params, x, key, y, eps=eps, steps=20), y)
    mi = run('mifgsm', fn, params, x, key, y, eps=eps, steps=10)
    acc_mi = accuracy(fn, params, mi, y)
    assert acc_pgd <= acc_fgsm <= clean
    assert acc_pgd <= 0.5 * clean, (clean, acc_fgsm, acc_pgd)
    assert acc_mi <= 0.5 * clean, (clean, acc_mi)
    assert acc_apgd <= acc_pgd + 1 / len(y), (acc_apgd, acc_pgd)


def test_default_l2_pgd_uses_the_whole_l2_budget(trained):
    # No eps or step given: the L2 default budget (0.5) and PGD's step rule (2.5 eps / steps)
    # must carry the perturbation to the sphere, not leave it at an L-inf-sized step's reach
    # (10 steps of 2/255 travel 0.08). No random start: the steps alone must get there.
    fn, params, x, y = trained
    x_adv = run('pgd', fn, params, x, rng(10), y, norm='l2', random_start=False)
    norms = np.asarray(perturbation_norm(x_adv - x, 'l2'))
    assert np.all(norms <= 0.5 + 1e-4)
    assert np.median(norms) >= 0.45, np.median(norms)


def test_apgd_checkpoints_match_the_paper():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 for 100 iterations.
    assert attacks.apgd_checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert attacks.apgd_checkpoints(1) == []


def test_restarts_keep_worst_case(trained):
    fn, params, x, y = trained
    key = rng(8)
    # A small budget and few steps, so single runs leave some samples correct.
    kwargs = dict(eps=3 / 255, steps=3, step_size=1 / 255)
    one = run('pgd', fn, params, x, key, y, restarts=1, **kwargs)
    three = run('pgd', fn, params, x, key, y, restarts=3, **kwargs)
    wrong_one = np.asarray(jnp.argmax(fn(params, one), -1) != y)
    wrong_three = np.asarray(jnp.argmax(fn(params, three), -1) != y)
    assert 0 < wrong_one.sum() < len(y)  # The test is informative.
    assert np.all(wrong_three[wrong_one])  # Per sample: never weaker.
    assert accuracy(fn, params, three, y) <= accuracy(fn, params, one, y)
    # Samples that stay correct keep the highest loss over restarts.
    ce = lambda xa: optax.softmax_cross_entropy_with_integer_labels(fn(params, xa), y)
    still = ~wrong_three
    assert np.all(np.asarray(ce(three))[still] >= np.asarray(ce(one))[still] - 1e-5)


def test_targeted_pgd_reaches_target(trained):
    fn, params, x, y = trained
    target = (y + 1) % NUM_CLASSES
    x_adv = run(
        'pgd',
        fn,
        params,
        x,
        rng(9),
        target,
        eps=32 / 255,
        steps=20,
        step_size=4 / 255,
        targeted=True,
    )
    hit = jnp.mean(jnp.argmax(fn(params, x_adv), -1) == target)
    assert float(hit) >= 0.9


# ---------------------------------------------------------------------------
# Exact steps, starts and APGD's schedule, on problems small enough to follow by hand.

# A linear two-class model on (1, 1, 2, 2) images around 0.5: z = (0, W . (x - 0.5)), so the
# CE of class 0 has gradient sigmoid(z_1) W, along W / ||W||_2 = W / 13 and with sign(W) as its
# sign; the zero weight gets no gradient.
W = np.array([3.0, -4.0, 0.0, 12.0], np.float32)


def linear(params, x):
    del params
    z1 = jnp.sum(W * (x.reshape(x.shape[0], -1) - 0.5), -1)
    return jnp.stack([jnp.zeros_like(z1), z1], -1)


def test_attacks_step_exactly_along_the_steepest_direction():
    x, y, key = jnp.full((1, 1, 2, 2), 0.5), jnp.zeros(1, jnp.int32), rng(24)
    l2 = dict(eps=0.13, steps=2, step_size=0.05, norm='l2')

    @jax.jit
    def steps(x):
        return (
            attacks.fgsm(linear, None, x, key, y, eps=0.1),
            attacks.fgm(linear, None, x, key, y, eps=0.13),
            attacks.pgd(linear, None, x, key, y, random_start=False, **l2),
            attacks.mifgsm(linear, None, x, key, y, **l2),
            attacks.mifgsm(linear, None, x, key, y, eps=0.1, steps=2, step_size=0.03),
        )

    fgsm, fgm, pgd, mifgsm_l2, mifgsm_linf = (np.asarray(v).reshape(-1) for v in steps(x))
    # One step of eps: along sign(g) for FGSM (a zero gradient moves nothing), along g / ||g||
    # for FGM (0.13 * W / 13).
    np.testing.assert_allclose(fgsm, 0.5 + 0.1 * np.sign(W), atol=1e-6)
    np.testing.assert_allclose(fgm, 0.5 + 0.01 * W, atol=1e-6)
    # Two L2 steps of 0.05 inside a 0.13 ball: 0.1 along W / 13, which the projection keeps as
    # it is. MI-FGSM's momentum (a sum of g / ||g||_1) stays along W.
    np.testing.assert_allclose(pgd, 0.5 + 0.1 * W / 13, atol=1e-6)
    np.testing.assert_allclose(mifgsm_l2, 0.5 + 0.1 * W / 13, atol=1e-6)
    # L-inf MI-FGSM: sign steps; the coordinate without gradient stays put.
    np.testing.assert_allclose(mifgsm_linf, 0.5 + 0.06 * np.sign(W), atol=1e-6)


def test_project_keeps_inner_points_and_scales_outer_ones_onto_the_sphere():
    x = jnp.full((2, 1, 2, 2), 0.5)
    delta = jnp.stack([0.001 * W, 0.02 * W]).reshape(x.shape)  # L2 norms 0.013 and 0.26.
    got = np.asarray(jax.jit(attacks.project, static_argnums=3)(x + delta, x, 0.13, 'l2') - x)
    got = got.reshape(2, -1)
    np.testing.assert_allclose(got, np.stack([0.001 * W, 0.01 * W]), atol=1e-6)


def peaks(uc, q):
    """Two-class logits of one-pixel images: with u = (x - 0.5) * 8 (x's offset in units of
    eps = 1/8), z = (0, q - (u - uc)^2) per sample, so the CE of class 0 grows towards u = uc
    (its gradient has the sign of uc - u, and is 0 at uc) and the attack succeeds (class 1 on
    top) where (u - uc)^2 < q. The iterates below are dyadic, so float32 holds them exactly."""
    uc, q = jnp.asarray(uc, jnp.float32), jnp.asarray(q, jnp.float32)

    def fn(params, x):
        del params
        z1 = q - jnp.square((x.reshape(-1) - 0.5) * 8 - uc)
        return jnp.stack([jnp.zeros_like(z1), z1], -1)

    return fn


def recording(fn, seen):
    """fn, appending every input it is evaluated at (in order) to `seen`."""

    def rec(params, x):
        jax.debug.callback(lambda v: seen.append(np.array(v)), x, ordered=True)
        return fn(params, x)

    return rec


def test_apgd_follows_the_hand_computed_trace():
    # Units of eps = 1/8 around x = 0.5 (ball [-1, 1]); eta starts at 2. Sample 0 ascends
    # towards uc = 3/16 and never succeeds, sample 1 towards 13/16 and succeeds within 5/16 of
    # it. Default momentum (0.75); rho = 0.5; checkpoints after iterations 2, 3, ..., 9.
    # Sample 0, step by step (d = distance to uc, the loss falls with d):
    #   u0 = 0 (d 3/16). u1 = P(0 + 2) = 1 (the first step has no momentum; d 13/16).
    #   u2 = 1 + 0.75 (P(1 - 2) - 1) + 0.25 (1 - 0) = -1/4 (d 7/16: one increase).
    #   Checkpoint 2 (2 steps): 1 increase is not < 0.5 * 2, but the best loss (u0's) has not
    #   improved: eta = 1, restart from u0. u3 = 0 + 0.75 * 1 = 3/4 (d 9/16).
    #   Checkpoint 3: 0 increases < 0.5: eta = 1/2, restart from u0. u4 = 3/8 (d 3/16, a tie
    #   with u0: neither an increase nor a new best). Checkpoint 4: eta = 1/4, restart from u0.
    #   u5 = 3/16 = uc (the best point). Checkpoint 5: 1 increase, not < 0.5, and the step was
    #   halved at checkpoint 4: keep eta. u6 = uc + 0 (no gradient) + 0.25 (uc - 0) = 15/64.
    #   Checkpoint 6: halve, restart from uc, where it then stays.
    assert attacks.apgd_checkpoints(10) == [2, 3, 4, 5, 6, 7, 8, 9]
    seen = []
    fn = recording(peaks([3 / 16, 13 / 16], [-1.0, (5 / 16) ** 2]), seen)
    x, labels = jnp.full((2, 1, 1, 1), 0.5), jnp.zeros(2, jnp.int32)
    apgd = lambda x: attacks.apgd(
        fn, None, x, rng(25), labels, eps=1 / 8, steps=10, rho=0.5, random_start=False
    )
    x_adv = jax.jit(apgd)(x)
    jax.effects_barrier()
    trace = (np.stack(seen).reshape(len(seen), 2) - 0.5) * 8  # The start and 10 iterates.
    expected_0 = [0, 1, -1 / 4, 3 / 4, 3 / 8, 3 / 16, 15 / 64, 3 / 16, 3 / 16, 3 / 16, 3 / 16]
    expected_1 = [0, 1, -1 / 4, 3 / 8, 1 / 4, 5 / 8, 13 / 16, 49 / 64, 13 / 16, 13 / 16, 13 / 16]
    np.testing.assert_array_equal(trace, np.stack([expected_0, expected_1], -1))
    # Sample 0 returns its highest-loss iterate (u5); sample 1 the first one that succeeds (u1,
    # not the later, higher-loss ones).
    np.testing.assert_array_equal((np.asarray(x_adv).reshape(2) - 0.5) * 8, [3 / 16, 1])


def test_apgd_defaults_to_100_steps():
    seen = []
    fn = recording(peaks([0.5], [-1.0]), seen)
    jax.jit(lambda x: attacks.apgd(fn, None, x, rng(26), jnp.zeros(1, jnp.int32)))(
        jnp.full((1, 1, 1, 1), 0.5)
    )
    jax.effects_barrier()
    assert len(seen) == 1 + 100  # The start, then one evaluation per step.


def test_pgd_default_step_is_2_5_eps_over_steps():
    # Two steps of 2.5 * (1/8) / 2 (1.25 in units of eps) from u = 0 towards uc = 3/16:
    # u1 = P(1.25) = 1, then u2 = 1 - 1.25 = -1/4.
    fn, x, y = peaks([3 / 16], [-1.0]), jnp.full((1, 1, 1, 1), 0.5), jnp.zeros(1, jnp.int32)
    pgd = lambda x: attacks.pgd(
        fn, None, x, rng(27), y, eps=1 / 8, steps=2, step_size=None, random_start=False
    )
    got = jax.jit(pgd)(x)
    np.testing.assert_array_equal((np.asarray(got).reshape(1) - 0.5) * 8, [-1 / 4])


def test_uniform_in_ball_draws_uniformly_from_the_ball():
    x, eps = jnp.full((4096, 1, 1, 2), 0.5), 0.25  # Far enough from 0 and 1: no clipping.
    # L2 in d = 2 dimensions: P(radius <= t eps) = t^2, so (radius / eps)^2 is uniform on [0, 1].
    draw = jax.jit(
        lambda x: [
            attacks.uniform_in_ball(k, x, eps, n) for k, n in [(rng(28), 'l2'), (rng(29), 'linf')]
        ]
    )
    l2, linf = (np.asarray(d - x) for d in draw(x))
    r2 = np.sum(np.square(l2), (1, 2, 3)) / eps**2
    assert r2.max() <= 1 + 1e-5
    assert abs(r2.mean() - 0.5) < 0.03 and abs(np.mean(r2 < 0.25) - 0.25) < 0.03
    # L-inf: every coordinate uniform on [-eps, eps].
    a = np.abs(linf) / eps
    assert a.max() <= 1 + 1e-6 and abs(a.mean() - 0.5) < 0.03


def test_apgd_starts_uniformly_in_the_linf_ball_or_at_x():
    # With no steps APGD returns its start: a uniform draw from the L-inf ball (each coordinate
    # uniform on [-eps, eps], mean |delta| eps / 2), or x itself without a random start.
    x, y, eps = jnp.full((1024, 1, 2, 2), 0.5), jnp.zeros(1024, jnp.int32), 0.25
    starts = jax.jit(
        lambda x: [
            attacks.apgd(linear, None, x, rng(30), y, eps=eps, steps=0, random_start=r)
            for r in (True, False)
        ]
    )
    random, plain = starts(x)
    a = np.abs(np.asarray(random - x)) / eps
    assert a.max() <= 1 + 1e-6 and abs(a.mean() - 0.5) < 0.03
    np.testing.assert_array_equal(plain, x)


def test_targeted_apgd_restarts_keep_samples_that_reach_the_target():
    # No gradient (class 1 iff x > 0.5): each restart's random start alone decides whether a
    # sample reaches target 1, with chance 1/2. Keeping every restart's hits, 4 restarts reach
    # it for about 15/16 of the samples, among them every sample that the first restart (the
    # restarts=1 run) brought there.
    def step_fn(params, x):
        del params
        z1 = jnp.where(x.reshape(-1) > 0.5, 1.0, -1.0)
        return jnp.stack([jnp.zeros_like(z1), z1], -1)

    x, target = jnp.full((64, 1, 1, 1), 0.5), jnp.ones(64, jnp.int32)

    @jax.jit
    def hits(x):
        return [
            jnp.argmax(step_fn(None, x_adv), -1) == target
            for x_adv in [
                attacks.apgd(
                    step_fn, None, x, rng(31), target, eps=1 / 8, steps=1, restarts=r, targeted=True
                )
                for r in (1, 4)
            ]
        ]

    one, four = (np.asarray(h) for h in hits(x))
    assert 0 < one.sum() < 64
    assert np.all(four[one]) and four.sum() >= 52, (one.sum(), four.sum())


def test_bfloat16_images_stay_bfloat16():
    x = jnp.full((2, 1, 2, 2), 0.5, jnp.bfloat16)

    @jax.jit
    def outputs(x):
        starts = [attacks.uniform_in_ball(rng(32), x, 0.1, norm) for norm in attacks.NORMS]
        projected = [attacks.project(x + 0.3, x, 0.1, norm) for norm in attacks.NORMS]
        y = jnp.zeros(2, jnp.int32)
        return starts + projected + [attacks.apgd(linear, None, x, rng(33), y, eps=0.1, steps=2)]

    assert [v.dtype for v in outputs(x)] == [jnp.bfloat16] * 5


@pytest.mark.parametrize('name', ['fgsm', 'pgd', 'mifgsm', 'apgd'])
def test_gradient_attacks_name_a_bad_norm_and_missing_labels(name):
    attack, x = getattr(attacks, name), jnp.full((1, 1, 2, 2), 0.5)
    with pytest.raises(ValueError, match=r"^unknown norm 'l3'; valid: l2, linf$"):
        attack(linear, None, x, rng(0), jnp.zeros(1, jnp.int32), norm='l3')
    message = (
        rf'^{name} attacks a classifier and needs labels \(true classes, or target classes when '
        r'targeted=True\); got labels=None$'
    )
    with pytest.raises(ValueError, match=message):
        attack(linear, None, x, rng(0))


# ---------------------------------------------------------------------------
# Label-free attacks.


def test_ssp_raises_feature_distance_beyond_random():
    model = ConvFeatures()
    fn = apply_fn(model)
    x = jax.random.uniform(rng(10), (8,) + SHAPE)
    params = model.init(rng(11), x)
    eps = 16 / 255
    dist = lambda xa: float(jnp.mean(jnp.square(fn(params, xa) - fn(params, x))))
    x_adv = run('ssp', fn, params, x, rng(12), steps=10)  # No labels needed.
    # A random perturbation with the same L-inf norm (corners of the ball).
    noise = eps * jax.random.rademacher(rng(13), x.shape).astype(x.dtype)
    x_rand = jnp.clip(x + noise, min=0.0, max=1.0)
    assert dist(x_adv) > 1.5 * dist(x_rand), (dist(x_adv), dist(x_rand))


def test_sr_attack_raises_output_change_beyond_random():
    model = TinySR()
    fn = apply_fn(model)
    lr = jax.random.uniform(rng(14), (8,) + SHAPE)
    params = model.init(rng(15), lr)
    eps = 8 / 255
    change = lambda xa: float(jnp.sum(jnp.square(fn(params, xa) - fn(params, lr))))
    x_adv = run('sr', fn, params, lr, rng(16), steps=10)
    noise = eps * jax.random.rademacher(rng(17), lr.shape).astype(lr.dtype)
    x_rand = jnp.clip(lr + noise, min=0.0, max=1.0)
    assert fn(params, lr).shape == (8, 16, 16, 3)
    assert change(x_adv) > 1.5 * change(x_rand), (change(x_adv), change(x_rand))


def test_label_free_needs_random_start():
    with pytest.raises(ValueError, match='random_start'):
        attacks.validate(attacks.attack_config(name='sr', random_start=False))
    x = jnp.full((1,) + SHAPE, 0.5)
    with pytest.raises(ValueError, match='random_start=True'):
        attacks.ssp(lambda p, v: v, None, x, rng(0), random_start=False)


# ---------------------------------------------------------------------------
# EOT and BPDA.


def noise(key, shape):
    return jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)


def toy(params, x, key):
    del params
    return jnp.sum(x * (1.0 + noise(key, x.shape)), axis=(1, 2, 3))


def test_eot_gradient_is_mean_of_per_draw_gradients():
    n = 5
    key = rng(18)
    x = jax.random.uniform(rng(19), (3,) + SHAPE)
    keys = jax.random.split(key, n)
    # The definition, draw by draw with the same keys. A Python loop, not vmap:
    # rbg keys draw different numbers under vmap.
    grad_one = jax.jit(
        lambda k, loss: jax.grad(lambda x_: loss(toy(None, x_, k)).sum())(x), static_argnums=1
    )
    per_draw_grads = lambda loss: jnp.stack([grad_one(k, loss) for k in keys])
    identity = lambda out: out
    by_hand = per_draw_grads(identity).mean(0)
    # Linear in x: the gradient is the mean of (1 + noise_i).
    analytic = jnp.mean(jnp.stack([1.0 + noise(k, x.shape) for k in keys]), 0)
    averaged = attacks.eot(toy, n)
    got = jax.grad(lambda x_: averaged(None, x_, key).sum())(x)
    np.testing.assert_allclose(got, by_hand, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, analytic, rtol=1e-5, atol=1e-5)

    # Attacks average the loss, not the output: for a non-linear loss the
    # gradient is still the mean of the per-draw loss gradients.
    square = lambda out: jnp.square(out)
    per_sample, _, grad = attacks.loss_and_grad(square, averaged, None, x, key)
    np.testing.assert_allclose(grad, per_draw_grads(square).mean(0), rtol=1e-4, atol=1e-3)
    per_draw_loss = jnp.stack([square(toy(None, x, k)) for k in keys])
    np.testing.assert_allclose(per_sample, per_draw_loss.mean(0), rtol=1e-5)
    # ... which differs from the gradient of the loss of the mean output.
    of_mean = jax.grad(lambda x_: square(averaged(None, x_, key)).sum())(x)
    assert float(jnp.abs(of_mean - grad).max()) > 1.0


def test_attacks_draw_fresh_randomness_every_step():
    seen = []

    def noisy(params, x, key):
        jax.debug.callback(
            lambda k: seen.append(tuple(np.asarray(k).ravel())), jax.random.key_data(key)
        )
        return MLP().apply(params, x + 0.01 * noise(key, x.shape))

    x = jax.random.uniform(rng(20), (4,) + SHAPE)
    labels = jnp.arange(4) % NUM_CLASSES
    params = MLP().init(rng(21), x)
    attack = attacks.make_attack(attacks.attack_config(steps=3, eot_samples=2))
    attack(attacks.random_fn(noisy), params, x, rng(22), labels)
    jax.effects_barrier()
    assert len(seen) == 3 * 2 and len(set(seen)) == 6


def test_restart_scoring_of_a_random_function_draws_its_own_key():
    seen = []

    def noisy(params, x, key):
        jax.debug.callback(
            lambda k: seen.append(tuple(np.asarray(k).ravel())), jax.random.key_data(key)
        )
        return linear(params, x + 0.01 * noise(key, x.shape))

    x, labels = jnp.full((2, 1, 2, 2), 0.5), jnp.zeros(2, jnp.int32)
    pgd = lambda x: attacks.pgd(
        attacks.random_fn(noisy), None, x, rng(34), labels, eps=0.1, steps=1, restarts=2
    )
    jax.jit(pgd)(x)
    jax.effects_barrier()
    # Per restart: one draw for its step, one for scoring its result; all different.
    assert len(seen) == 2 * 2 and len(set(seen)) == 4


def test_bpda_forward_is_forward_and_gradient_is_backward():
    x = jnp.array([0.2, 0.7, 1.4, -0.6])
    w = jnp.array([1.0, 2.0, 3.0, 4.0])
    rounded = attacks.bpda(jnp.round)
    np.testing.assert_array_equal(rounded(x), jnp.round(x))
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(w * rounded(v)))(x), w)
    # Without BPDA the gradient of round is zero everywhere.
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.sum(w * jnp.round(v)))(x), 0 * w)
    # A custom backward and extra non-differentiated arguments (a key here).
    noisy_round = attacks.bpda(
        lambda v, k: jnp.round(v + jax.random.uniform(k, v.shape)), backward=lambda v, k: 2.0 * v
    )
    g = jax.jit(jax.grad(lambda v: jnp.sum(w * noisy_round(v, rng(0)))))(x)
    np.testing.assert_allclose(g, 2.0 * w)


def test_bpda_gives_zero_gradient_to_float_int_and_key_arguments():
    # Extra arguments of every kind (a float32 strength, an int quality, a PRNG key) get a zero
    # cotangent of their own type, so jax.grad over them works and the image's gradient is the
    # backward pass's; a bfloat16 backward (a cheaper approximation) still returns x's dtype.
    x = jnp.array([0.2, 0.7, 1.4, -0.6])
    w = jnp.array([1.0, 2.0, 3.0, 4.0])

    def quantize(v, strength, quality, key):
        return strength * jnp.round(v * quality) / quality + 0.0 * jax.random.uniform(key, v.shape)

    stage = attacks.bpda(quantize, backward=lambda v, s, q, k: (3.0 * v).astype(jnp.bfloat16))
    loss = lambda v, s: jnp.sum(w * stage(v, s, 4, rng(1)))
    gx, gs = jax.jit(jax.grad(loss, argnums=(0, 1)))(x, jnp.float32(2.0))
    assert gx.dtype == x.dtype and gs.dtype == jnp.float32
    np.testing.assert_allclose(gx, 3.0 * w)
    assert float(gs) == 0.0
    grads = jax.grad(lambda v, q: loss(v, 1.0) + 0 * q, argnums=(0, 1), allow_int=True)(x, 3)
    assert grads[1].dtype == jax.dtypes.float0


def test_bpda_backward_of_another_shape_is_a_clear_error():
    stage = attacks.bpda(jnp.round, backward=lambda v: v[:2])
    with pytest.raises(ValueError, match=r'^bpda: backward output shape \(2,\) differs from '):
        jax.grad(lambda v: stage(v).sum())(jnp.ones(4))


@pytest.mark.parametrize(
    'lower, upper, unroll',
    [(0, 3, 3), (20, 40, 20), (0, wrappers.MAX_UNROLL, wrappers.MAX_UNROLL), (0, 33, 1)],
)
def test_loops_up_to_max_unroll_trips_are_unrolled_longer_ones_rolled(lower, upper, unroll):
    # CPU convolutions run several times slower inside a rolled loop (jax#12868); the attack
    # loops rely on this rule. The scan's `unroll` is its trip count when fully unrolled.
    body = lambda i, c: c * 1.01 + i
    jaxpr = jax.make_jaxpr(lambda c: wrappers.loop(lower, upper, body, c))(1.0).jaxpr
    (scan,) = [e for e in jaxpr.eqns if e.primitive.name == 'scan']
    assert (scan.params['length'], scan.params['unroll']) == (upper - lower, unroll)
    expected = 1.0
    for i in range(lower, upper):
        expected = expected * 1.01 + i
    assert float(wrappers.loop(lower, upper, body, 1.0)) == pytest.approx(expected, rel=1e-6)


def test_call_passes_params_input_and_key():
    f = lambda p, x, k: p * x + jax.random.uniform(k, x.shape)
    x, key = jnp.arange(3.0), rng(3)
    got = wrappers.call(attacks.random_fn(f), 2.0, x, key)
    np.testing.assert_array_equal(got, f(2.0, x, jax.random.split(key, 1)[0]))
    np.testing.assert_array_equal(wrappers.call(lambda p, x: p * x, 2.0, x, key), 2.0 * x)


def test_random_fn_wrappers():
    f = lambda p, x, k: p * x + jax.random.uniform(k, x.shape)
    x, key = jnp.ones(3), rng(2)
    one = attacks.random_fn(f)
    assert one.fn is f and one.samples == 1
    five = attacks.eot(one, 5)
    assert five.fn is f and five.samples == 5  # the draw function, not the 1-draw wrapper
    assert attacks.random_fn(five) is five  # already random: kept with its draw count
    # Calling a RandomFn averages the output over its draws, parameters included.
    keys = jax.random.split(key, 5)
    by_hand = jnp.mean(jnp.stack([f(2.0, x, k) for k in keys]), 0)
    np.testing.assert_allclose(five(2.0, x, key), by_hand, rtol=1e-6)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match=rf'^samples must be an int >= 1; got {bad!r}$'):
            attacks.RandomFn(f, bad)


# ---------------------------------------------------------------------------
# Compilation, configuration and input checks.


def test_jitted_attack_does_not_retrace(trained):
    """eps, step_size and the key are traced: new values reuse the one compiled program."""
    fn, params, x, y = trained
    traces = []

    @jax.jit
    def attack_batch(params, x, key, labels, eps, step_size):
        traces.append(1)  # A Python side effect: runs once per trace, never per call.
        return attacks.pgd(
            fn, params, x, key, labels, eps=eps, steps=3, step_size=step_size, random_start=True
        )

    runs = [
        (jax.random.key(0), 4 / 255, 1 / 255),
        (jax.random.key(1), 4 / 255, 1 / 255),  # A new key.
        (jax.random.key(1), 16 / 255, 1 / 255),  # A new eps.
        (jax.random.key(1), 16 / 255, 8 / 255),  # A new step size.
    ]
    outs = [attack_batch(params, x, key, y, eps, step) for key, eps, step in runs]
    assert len(traces) == 1
    # Each call used its own values, not the first call's: the budget follows eps ...
    for out, (_, eps, _) in zip(outs, runs):
        assert float(jnp.max(jnp.abs(out - x))) <= eps + 1e-6
    assert float(jnp.max(jnp.abs(outs[2] - x))) > 4 / 255 + 1e-3
    # ... and a new key or a new step size moves the result.
    assert not np.allclose(outs[0], outs[1])
    assert not np.allclose(outs[2], outs[3])


@pytest.mark.parametrize(
    'overrides,message',
    [
        (dict(name='pgdd'), "unknown attack 'pgdd'; valid: apgd, fgsm, mifgsm, pgd, sr, ssp"),
        (dict(norm='l3'), "unknown norm 'l3'; valid: l2, linf"),
        (dict(eps=-0.1), 'invalid eps -0.1; valid: a number >= 0'),
        (dict(step_size=-1.0), 'invalid step_size -1.0; valid: a number >= 0'),
        (dict(steps=-1), 'invalid steps -1; valid: an int >= 0'),
        (dict(restarts=0), 'invalid restarts 0; valid: an int >= 1'),
        (dict(name='mifgsm', restarts=3), 'restarts=3 has no effect on'),
    ],
)
def test_validate_names_bad_value_and_choices(overrides, message):
    with pytest.raises(ValueError) as info:
        attacks.validate(attacks.attack_config(**overrides))
    assert message in str(info.value)
    assert '\n' not in str(info.value)
    with pytest.raises(ValueError):
        attacks.make_attack(attacks.attack_config(**overrides))


def test_config_defaults_and_locking():
    cfg = attacks.attack_config()
    assert (cfg.name, cfg.norm, cfg.eps, cfg.steps, cfg.step_size) == (
        'pgd',
        'linf',
        8 / 255,
        10,
        None,
    )
    # Each norm gets its own budget, and PGD's step follows it (2.5 eps / steps).
    assert attacks.attack_config(norm='l2').eps == 0.5
    assert cfg.random_start and cfg.restarts == 1 and not cfg.targeted and cfg.eot_samples == 1
    assert attacks.attack_config(name='ssp').eps == 16 / 255
    assert attacks.attack_config(name='ssp', eps=0.1).step_size == 0.01
    assert attacks.attack_config(name='mifgsm').step_size is None
    assert attacks.attack_config(eps=0.3, step_size=0.01).step_size == 0.01
    assert set(attacks.ATTACKS) == {'fgsm', 'pgd', 'mifgsm', 'apgd', 'ssp', 'sr'}
    assert attacks.LABEL_FREE == {'ssp', 'sr'}
    with pytest.raises(ValueError, match='unknown attack config field'):
        attacks.attack_config(epsilon=0.1)
    with pytest.raises(AttributeError):
        attacks.attack_config().epsilon = 0.1


def test_check_images_and_labels():
    good = jnp.full((2,) + SHAPE, 0.5)
    attacks.check_images(good)
    with pytest.raises(ValueError, match=r'range \[-0.1, 0.5\]'):
        attacks.check_images(good.at[0, 0, 0, 0].set(-0.1))
    with pytest.raises(ValueError, match=r'range \[0.5, 1.5\]'):
        attacks.check_images(good.at[0, 0, 0, 0].set(1.5))
    with pytest.raises(ValueError, match=r'rank-4 NHWC.*shape \(8, 8, 3\)'):
        attacks.check_images(good[0])
    with pytest.raises(ValueError, match='float'):
        attacks.check_images(jnp.zeros((2,) + SHAPE, jnp.uint8))

    fn = apply_fn(MLP())
    params = MLP().init(rng(0), good)
    attack = attacks.make_attack(attacks.attack_config(steps=1))
    with pytest.raises(ValueError, match='needs labels'):
        attack(fn, params, good, rng(0))
    with pytest.raises(ValueError, match=r'\[0, 1\]'):
        attack(fn, params, good * 3, rng(0), jnp.zeros(2, jnp.int32))
    with pytest.raises(ValueError, match='labels must be integer'):
        attack(fn, params, good, rng(0), jnp.zeros(3, jnp.int32))
