"""The robustness evaluator's attack paths: the eps = 0 check against planted bugs, the APGD-DLR
loss, the adaptive attacker's default budget, and EOT, BPDA and PRNG keys as the evaluator uses
them (configs/evaluate.py:robustness).

Hand-set linear classifiers with three classes on 6x6 images: gradients, the DLR loss and the
expected EOT gradient have closed forms.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import evaluate as evaluate_config
from configs import purifier as purifier_config
from sr_purify import attacks, purifiers, sharding
from sr_purify import classification_data as cdata
from sr_purify.evaluators import attack_runners, robustness, robustness_report

SIDE = 6
DIM = SIDE * SIDE * 3
CLASSES = 3
# Keys from XLA's RngBitGenerator where a test makes its own: threefry programs are slow to
# compile on a small CPU (the evaluator itself makes threefry keys from config.seed).
rng = functools.partial(jax.random.key, impl='rbg')


def band_classifier(structure=0.1):
    """Class c sums the brightness of rows [2c, 2c + 2): a band image is classified by its band."""
    w = np.zeros((SIDE, SIDE, 3, CLASSES), np.float32)
    for c in range(CLASSES):
        w[2 * c : 2 * c + 2, :, :, c] = structure
    params = {'w': jnp.asarray(w.reshape(DIM, CLASSES)), 'b': jnp.zeros((CLASSES,), jnp.float32)}
    fn = lambda p, x: x.reshape(x.shape[0], -1) @ p['w'] + p['b']
    return fn, params


def band_split():
    """Three clear images (band c bright, label c) and five ambiguous ones (bands 0 and 1 equally
    bright, label 0): noise in a random purifier decides the ambiguous ones."""
    images = np.full((8, SIDE, SIDE, 3), 0.2, np.float32)
    for c in range(CLASSES):
        images[c, 2 * c : 2 * c + 2] = 0.8
    images[3:, :4] = 0.5
    labels = np.array([0, 1, 2, 0, 0, 0, 0, 0], np.int32)
    return cdata.Split(np.round(images * 255).astype(np.uint8), labels, ('a', 'b', 'c'), 'bands')


def purifier(kind='none', noise=0.0):
    cfg = purifier_config.purifier_config(kind)
    cfg.input_noise = noise
    return purifiers.build(cfg)


def tiny_config(seed=0):
    config = evaluate_config.robustness_config()
    config.seed = seed
    config.attacks = [
        attacks.attack_config(
            name='pgd', eps=4 / 255, steps=2, step_size=2 / 255, random_start=False
        )
    ]
    # One APGD-DLR member: the ensemble and the DLR path, at two iterations.
    config.adaptive.attacks = [attacks.attack_config(name='apgd', loss='dlr', steps=2)]
    config.adaptive.eot_samples = 2
    config.sanity_batches = 0
    config.batch_size = 8
    config.grid_samples = 2
    return config


# ---------------------------------------------------------------------------------------------
# (a) The eps = 0 check compares against an independent forward pass; planted bugs fail it.


def runner_moves_x(monkeypatch):
    """The attack runner returns the images upside down at eps = 0 (a projection that moves x)."""
    real = robustness.make_runner

    def planted(cfg, *args):
        run = real(cfg, *args)
        if cfg.eps > 0:
            return run
        return lambda fn, params, x, key, labels: jnp.flip(run(fn, params, x, key, labels), 1)

    monkeypatch.setattr(robustness, 'make_runner', planted)


def labels_shifted(monkeypatch):
    """The scoring compares each prediction with its neighbour's label."""
    real = robustness._correct
    planted = lambda predict, params, x, labels, key: real(
        predict, params, x, jnp.roll(labels, 1), key
    )
    monkeypatch.setattr(robustness, '_correct', planted)


def key_ignored(monkeypatch):
    """The scoring of a random purifier ignores its key and reuses one fixed draw."""
    real = robustness._correct
    planted = lambda predict, params, x, labels, key: real(
        predict, params, x, labels, jax.random.key(123)
    )
    monkeypatch.setattr(robustness, '_correct', planted)


@pytest.mark.parametrize('plant', [None, runner_moves_x, labels_shifted, key_ignored])
def test_eps0_check_flags_planted_bugs(plant, monkeypatch):
    if plant is not None:
        plant(monkeypatch)
    fn, params = band_classifier()
    rows = [robustness.Row('noisy', purifier(noise=0.3), {}, 'test')]
    results, _ = robustness.evaluate(
        tiny_config(), fn, params, rows, band_split(), sharding.make_mesh()
    )
    r = results['purifiers']['noisy']
    failed = {c['check'] for c in results['sanity']['checks'] if not c['ok']}
    if plant is None:
        assert results['sanity']['passed'], results['sanity']['failures']
        assert r['eps0']['mismatches'] == {'oblivious': 0, 'adaptive': 0, 'transfer': None}
        assert r['reference']['mismatches'] == 0 and r['reference']['clean'] == r['clean']
        # The draw decides some ambiguous images, so a wrong key is visible.
        assert 0 < r['clean'] < 1
        return
    assert 'eps0' in failed, results['sanity']['failures']
    assert any('samples differ' in f for f in results['sanity']['failures'])
    if plant is not runner_moves_x:
        # The old check (eps 0 against clean C∘P, both through the scoring) is blind to a
        # scoring bug: both sides agree, and only the independent reference disagrees.
        assert r['eps0']['oblivious'] == r['eps0']['adaptive'] == r['clean']
        assert r['reference']['mismatches'] > 0
    else:
        assert r['eps0']['mismatches']['oblivious'] > 0
        assert r['eps0']['mismatches']['adaptive'] > 0
        assert r['reference']['mismatches'] == 0  # Clean scoring is fine; the runner is not.


def test_reference_helpers():
    logits = np.array([[2.0, 1.0, 0.0], [1.0, 1.0 + 1e-6, 0.0], [-5.0, 0.0, 3.0]])
    correct, tie = attack_runners.reference_correct(logits, np.array([0, 0, 2]))
    np.testing.assert_array_equal(correct, [True, False, True])
    np.testing.assert_array_equal(tie, [False, True, False])
    # Labels come from the split by global position; padding gets 0.
    labels = np.array([3, 1, 4, 1, 5])
    np.testing.assert_array_equal(attack_runners.split_labels(labels, 0, 3), [3, 1, 4])
    np.testing.assert_array_equal(attack_runners.split_labels(labels, 1, 3), [1, 5, 0])


# ---------------------------------------------------------------------------------------------
# (c) The DLR loss and the adaptive attacker's default budget.


def test_dlr_loss_closed_form_and_invariance():
    z = jnp.array([[3.0, 1.0, 2.0, 0.0]] * 3 + [[0.5, 4.0, -1.0, 2.0]])
    y = jnp.array([0, 2, 3, 1])
    # Sorted: 3 > 2 > 1 (z_pi1 - z_pi3 = 2); last row 4 > 2 > 0.5 (3.5).
    want = [-(3 - 2) / 2, -(2 - 3) / 2, -(0 - 3) / 2, -(4 - 2) / 3.5]
    got = attacks.dlr_loss(z, y)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # Shift and positive scale of the logits leave it unchanged (CE does not have this).
    np.testing.assert_allclose(attacks.dlr_loss(7.0 * z - 3.0, y), want, rtol=1e-5)
    # A tie between y and another top logit: zero margin, not the runner-up.
    np.testing.assert_allclose(attacks.dlr_loss(jnp.array([[2.0, 2.0, 0.0]]), jnp.array([1])), [0])
    # Gradient of the first row w.r.t. z: -(e_y - e_pi2) / 2 + (z_y - z_pi2) (e_pi1 - e_pi3) / 4.
    g = jax.grad(lambda v: attacks.dlr_loss(v[None], y[:1])[0])(z[0])
    np.testing.assert_allclose(g, [-0.5 + 0.25, -0.25, 0.5, 0.0], atol=1e-6)
    with pytest.raises(ValueError, match='at least 3 classes'):
        attacks.dlr_loss(jnp.zeros((2, 2)), jnp.zeros(2, jnp.int32))


def test_apgd_dlr_beats_ce_on_saturated_logits():
    """Logits scaled by 1e4 saturate the softmax: CE's gradient underflows to zero, so APGD-CE
    cannot move; DLR is scale-invariant and still finds the nearby band."""
    fn, params = band_classifier(structure=1e4)
    x = np.full((2, SIDE, SIDE, 3), 0.2, np.float32)
    # Band 0 leads band 1 by 0.02 per pixel (8/255 of L-inf undoes that), a logit margin of 7200.
    x[:, 0:2] = 0.45
    x[:, 2:4] = 0.43
    x, y = jnp.asarray(x), jnp.zeros(2, jnp.int32)
    apgd = lambda **loss: jax.jit(
        functools.partial(attacks.apgd, fn, params, eps=8 / 255, steps=4, **loss)
    )(x, rng(0), y)
    run = lambda loss: apgd(loss=loss)
    pred = lambda xs: np.asarray(jnp.argmax(fn(params, xs), -1))
    np.testing.assert_array_equal(pred(x), [0, 0])
    x_ce, x_dlr = run('ce'), run('dlr')
    np.testing.assert_array_equal(pred(x_ce), [0, 0])
    np.testing.assert_array_equal(pred(x_dlr), [1, 1])
    assert float(jnp.max(jnp.abs(x_dlr - x))) <= 8 / 255 + 1e-6
    # The default loss is CE: the same program as before the option existed.
    np.testing.assert_array_equal(apgd(), x_ce)


@pytest.mark.parametrize(
    'overrides,message',
    [
        (dict(name='pgd', loss='dlr'), "loss='dlr' has no effect on 'pgd'"),
        (dict(name='apgd', loss='cw'), "invalid loss 'cw'; valid: ce, dlr"),
        (dict(name='apgd', loss='dlr', targeted=True), "loss='dlr' with targeted=True"),
    ],
)
def test_loss_option_is_validated(overrides, message):
    with pytest.raises(ValueError, match=message):
        attacks.validate(attacks.attack_config(**overrides))


def test_dlr_member_on_two_classes_fails_before_compiling():
    config = evaluate_config.robustness_config()
    assert len(attack_runners.adaptive_settings(config, num_classes=10)[0]) == 2
    with pytest.raises(ValueError, match=r'adaptive.attacks\[1\] is APGD-DLR.*the data has 2'):
        attack_runners.adaptive_settings(config, num_classes=2)
    config.adaptive.eot_samples = 0
    with pytest.raises(ValueError, match='adaptive.eot_samples must be an int >= 1'):
        attack_runners.adaptive_settings(config)


def test_default_adaptive_budget_and_its_printed_line():
    cpu = evaluate_config.get_config('robustness')
    full = evaluate_config.get_config('robustness,full')
    # The strong attacker is the default on every host; only an override reduces it.
    for config, steps in ((cpu, 100), (full, 100)):
        members = config.adaptive.attacks
        assert [(m.name, m.loss, m.steps, m.restarts) for m in members] == [
            ('apgd', 'ce', steps, 1),
            ('apgd', 'dlr', steps, 1),
        ]
        assert all(m.random_start for m in members) and config.adaptive.eot_samples == 20
    assert (cpu.eval_examples, full.eval_examples) == (500, 0)  # `full`: the whole test set.
    cfg = cpu.attacks[2]
    at = attack_runners.adaptive_attacks(cfg, cpu.adaptive.attacks)
    assert attack_runners.labels_of(at) == [
        'pgd linf 8/255 x10',
        'apgd linf 8/255 x100',
        'apgd-dlr linf 8/255 x100',
    ]
    l2 = attack_runners.adaptive_attacks(cpu.attacks[4], cpu.adaptive.attacks)
    assert [(m.norm, m.eps) for m in l2] == [('l2', 0.5)] * 3
    line = lambda config: robustness_report.budget_line(
        {
            'adaptive': {
                'attacks': [m.to_dict() for m in config.adaptive.attacks],
                'eot_samples': config.adaptive.eot_samples,
            }
        }
    )
    assert 'apgd-ce x100 (1 restart) + apgd-dlr x100 (1 restart)' in line(cpu)
    assert 'EOT over 20 draws' in line(cpu) and 'BPDA' in line(cpu)
    assert 'Reduced' not in line(cpu) and 'Reduced' not in line(full)
    for member in cpu.adaptive.attacks:  # The override a CPU user in a hurry makes.
        member.steps = 20
    assert "Reduced budget: 20 APGD iterations, not AutoAttack's 100" in line(cpu)


# ---------------------------------------------------------------------------------------------
# (d) EOT, BPDA and keys as the evaluator uses them, on functions with known gradients.


def test_chain_eot_gradient_is_the_expected_gradient():
    """C linear, P = x + sigma * noise (no clipping: x in [0.3, 0.7], sigma 0.02). For the
    margin z_0 - z_1 every draw has the gradient w_0 - w_1, so EOT gives it exactly; for
    0.5 ||z||^2 the gradient is W W^T (x + sigma * mean noise), within Monte-Carlo error of
    the expectation W W^T x."""
    gen = np.random.default_rng(0)
    w = jnp.asarray(gen.normal(size=(DIM, CLASSES)).astype(np.float32) * 0.1)
    fn = lambda p, x: x.reshape(x.shape[0], -1) @ p
    sigma, n = 0.02, 64
    noisy = purifier(noise=sigma)
    chained = attack_runners.chain(fn, noisy, eot_samples=n)
    assert isinstance(chained, attacks.RandomFn) and chained.samples == n
    assert not isinstance(attack_runners.chain(fn, purifier(), eot_samples=n), attacks.RandomFn)
    x = jnp.asarray(gen.uniform(0.3, 0.7, size=(2, SIDE, SIDE, 3)).astype(np.float32))
    key = rng(1)
    params = (w, {})
    grad = jax.jit(
        lambda loss: attacks.loss_and_grad(loss, chained, params, x, key)[2], static_argnums=0
    )

    margin = lambda z: z[:, 0] - z[:, 1]
    exact = jnp.broadcast_to((w[:, 0] - w[:, 1]).reshape(SIDE, SIDE, 3), x.shape)
    np.testing.assert_allclose(grad(margin), exact, rtol=1e-5, atol=1e-6)

    square = lambda z: 0.5 * jnp.sum(jnp.square(z), axis=-1)
    got = np.asarray(grad(square)).reshape(2, DIM)
    # The draws EOT makes: split(key, n), each P's noise sigma * normal(k, x.shape).
    draws = jnp.stack([noisy.purify({}, x, k) for k in jax.random.split(key, n)])
    wwt = np.asarray(w @ w.T, np.float64)
    by_draws = np.asarray(draws.mean(0), np.float64).reshape(2, DIM) @ wwt
    np.testing.assert_allclose(got, by_draws, rtol=1e-4, atol=1e-6)
    expected = np.asarray(x, np.float64).reshape(2, DIM) @ wwt
    # Per coordinate, the mean of n draws has std sigma / sqrt(n) * ||row of W W^T||.
    std = sigma / np.sqrt(n) * np.sqrt(np.sum(np.square(wwt), axis=0))
    assert np.max(np.abs(got - expected) / std) < 5
    assert np.max(np.abs(got - expected)) > 0  # It is a Monte-Carlo estimate, not exact.


def test_jpeg_row_attacks_through_bpda_with_the_identity_vjp():
    """The jpeg row's chain: forward = C(real JPEG(x)), backward = C's VJP at the JPEG output
    passed through unchanged. For C linear, d sum(v * C(P(x))) / dx = W v; the evaluator's
    input-gradient check gets the CE gradient W (softmax(z) - onehot) at z = C(JPEG(x))."""
    fn, params = band_classifier()
    jpeg = purifier('jpeg')
    assert not jpeg.differentiable
    chained = attack_runners.chain(fn, jpeg)
    x_np = np.asarray(band_split().images, np.float32)[:2] / 255.0
    x = jnp.asarray(x_np)
    np.testing.assert_allclose(
        chained((params, {}), x), fn(params, jnp.asarray(purifiers._jpeg_host(x_np, 75))), atol=1e-5
    )
    v = jnp.asarray([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    g = jax.jit(jax.grad(lambda x_: jnp.sum(v * chained((params, {}), x_))))(x)
    np.testing.assert_allclose(g, (v @ params['w'].T).reshape(x.shape), rtol=1e-6, atol=1e-7)
    # Without BPDA there is no gradient at all: the host callback has no derivative rule.
    raw = lambda x_: jnp.sum(fn(params, purifiers.jpeg_compress(x_, 75)))
    with pytest.raises(ValueError, match='Pure callbacks do not support JVP'):
        jax.grad(raw)(x)

    labels = jnp.asarray([0, 1])
    predict = attack_runners._predict_fn(fn, jpeg)
    norm, finite = jax.jit(attack_runners._input_gradient, static_argnums=0)(
        predict, (params, {}), x, labels, None
    )
    z = fn(params, jnp.asarray(purifiers._jpeg_host(x_np, 75)))
    ce_grad = (jax.nn.softmax(z) - jax.nn.one_hot(labels, CLASSES)) @ params['w'].T
    assert bool(finite)
    np.testing.assert_allclose(float(norm), float(jnp.linalg.norm(ce_grad)), rtol=1e-4)


def test_keys_give_new_draws_and_the_same_key_reproduces():
    fn, params = band_classifier()
    x = jnp.asarray(np.asarray(band_split().images, np.float32) / 255.0)
    y = jnp.asarray(band_split().labels)
    noisy = purifier(noise=0.3)
    predict = jax.jit(attack_runners._predict_fn(fn, noisy))
    k0, k1 = rng(0), rng(1)
    a, again, b = (predict((params, {}), x, k) for k in (k0, k0, k1))
    np.testing.assert_array_equal(a, again)
    assert float(jnp.max(jnp.abs(a - b))) > 0.1
    # A deterministic row ignores the key.
    plain = jax.jit(attack_runners._predict_fn(fn, purifier()))
    np.testing.assert_array_equal(plain((params, {}), x, k0), plain((params, {}), x, k1))
    # The reference forward pass takes the same draw as the scoring for the same key.
    reference = jax.jit(attack_runners.reference_forward(fn, noisy))
    np.testing.assert_array_equal(reference(params, {}, x, k0), a)
    # Scoring draws differ per batch and per row, and repeat for the same (batch, row).
    keys = [
        attack_runners.prediction_key(jax.random.fold_in(k0, b_), r)
        for b_, r in ((0, 0), (0, 1), (1, 0), (0, 0))
    ]
    data = [tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys]
    assert len(set(data[:3])) == 3 and data[3] == data[0]
    # The adaptive attacker's EOT attack: random start and draws follow the key.
    cfg = attacks.attack_config(name='pgd', eps=4 / 255, steps=2, step_size=2 / 255)
    run = attack_runners.make_runner(cfg)
    chained = attack_runners.chain(fn, noisy, eot_samples=2)
    a, again, b = (run(chained, (params, {}), x, k, y) for k in (k0, k0, k1))
    np.testing.assert_array_equal(a, again)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-3
