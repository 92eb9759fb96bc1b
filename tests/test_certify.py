"""Randomized-smoothing certification (sr_purify/evaluators/certify.py) and the certify mode.

Closed forms on a linear two-class classifier on a 2x2x1 input, logits (-s, s), s = w.z + b:
its smoothed class probability is Phi(margin / (sigma ||w||)), so the certified radius must
come close to, and never exceed, the distance |w.x + b| / ||w|| to the decision boundary; with
w = 0 it is a constant classifier (every draw agrees, so p_A's lower bound is alpha^(1/n)
exactly). w and b are traced parameters and every library test uses the same six images,
n0 and n, so the whole file compiles few programs (each takes seconds on 2 cores).
"""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import RecordingWriter
from scipy import stats

from configs import evaluate as evaluate_config
from sr_purify import checkpointing, models, purifiers, restore, sharding
from sr_purify.evaluators import certify, certify_report, robustness

ALPHA = 0.001
SIGMA = 0.25
SHAPE = (2, 2, 1)
W = np.asarray([1.0, -1.0, 0.5, 2.0], np.float32)
UNIT = (W / np.linalg.norm(W)).reshape(SHAPE)
X0 = np.full(SHAPE, 0.5, np.float32)
# The boundary w.x + b = 0 passes through X0.
LINEAR = (jnp.asarray(W), jnp.float32(-W @ X0.reshape(-1)))
CONSTANT = (jnp.zeros(4), jnp.float32(1.0))  # s = 1: always class 1.
# Signed distances to the boundary (class 1 where positive); 0 is a tie.
DISTANCES = (-0.45, -0.2, 0.0, 0.1, 0.3, 0.45)
N0, N, BATCH = 100, 10_000, 4_000  # The last batch of draws is half masked.
SETTINGS = dict(n0=N0, n=N, alpha=ALPHA, batch=BATCH)


def linear(params, z, key):
    """Two classes, logits (-s, s) with s = w.z + b."""
    del key
    w, b = params
    s = z.reshape(z.shape[0], -1) @ w + b
    return jnp.stack([-s, s], axis=-1)


def images_at(distances):
    return np.stack([X0 + d * UNIT for d in distances]).astype(np.float32)


IMAGES = images_at(DISTANCES)
INDICES = list(range(len(DISTANCES)))
LABELS = np.asarray([int(d > 0) for d in DISTANCES], np.int32)


@pytest.fixture(scope='module')
def mesh():
    return sharding.make_mesh()


@pytest.fixture(scope='module')
def linear_run(mesh):
    """CERTIFY and PREDICT on the six images (PREDICT reuses CERTIFY's program for n)."""
    key = jax.random.key(0)
    preds, radii = certify.certify(
        linear, LINEAR, IMAGES, INDICES, key, sigma=SIGMA, mesh=mesh, **SETTINGS
    )
    predicted = certify.predict(
        linear, LINEAR, IMAGES, INDICES, key, sigma=SIGMA, n=N, alpha=ALPHA, batch=BATCH, mesh=mesh
    )
    return preds, radii, predicted


# ---------------------------------------------------------------------------------------------
# Closed forms.


def test_constant_classifier_bound_is_alpha_to_the_one_over_n(mesh):
    keys = certify._stream_keys(jax.random.key(0), INDICES, certify.ESTIMATE)
    counts = certify.sample_counts(linear, CONSTANT, IMAGES, keys, N, SIGMA, mesh=mesh, batch=BATCH)
    np.testing.assert_array_equal(counts, [[0, N]] * len(IMAGES))
    assert certify.lower_confidence_bound(N, N, ALPHA) == pytest.approx(ALPHA ** (1 / N), 1e-12)
    preds, radii = certify.certify(
        linear, CONSTANT, IMAGES, INDICES, jax.random.key(0), sigma=SIGMA, mesh=mesh, **SETTINGS
    )
    np.testing.assert_array_equal(preds, [1] * len(IMAGES))
    np.testing.assert_allclose(radii, SIGMA * stats.norm.ppf(ALPHA ** (1 / N)), rtol=1e-12)


def test_linear_radius_is_close_to_and_never_above_the_boundary_distance(linear_run):
    preds, radii, _ = linear_run
    for d, pred, radius in zip(DISTANCES, preds, radii):
        if d == 0:
            continue
        assert pred == int(d > 0), d
        # P(class A) = Phi(|d| / sigma) exactly; 10000 draws put the bound within 0.03.
        assert radius <= abs(d), (d, radius)
        assert radius >= abs(d) - 0.03, (d, radius)


def test_a_tie_abstains_in_certify_and_predict(linear_run):
    preds, radii, predicted = linear_run
    tie = DISTANCES.index(0.0)
    assert preds[tie] == certify.ABSTAIN and radii[tie] == 0.0
    assert predicted[tie] == certify.ABSTAIN
    # PREDICT decides where one class clearly wins (P = Phi(0.1 / 0.25) = 0.66 or more).
    np.testing.assert_array_equal(np.delete(predicted, tie), np.delete(LABELS, tie))
    # From counts: an exact tie abstains in both; a clear winner does not.
    tied = certify.certify_from_counts(np.asarray([5, 5]), np.asarray([50, 50]), SIGMA, ALPHA)
    assert tied == (certify.ABSTAIN, 0.0)
    assert certify.predict_from_counts(np.asarray([50, 50, 0]), ALPHA) == certify.ABSTAIN
    assert certify.predict_from_counts(np.asarray([3, 90, 7]), ALPHA) == 1
    # 60 vs 40 of 100 is not significant at alpha = 0.001 (p = 0.057): PREDICT abstains.
    assert certify.predict_from_counts(np.asarray([60, 40]), ALPHA) == certify.ABSTAIN


def test_certified_accuracy_counts_abstentions_as_wrong():
    preds = [0, 1, certify.ABSTAIN, 2, 1]
    labels = [0, 1, 1, 0, 1]
    radii = [0.3, 0.6, 0.0, 0.9, 0.1]
    acc = certify.certified_accuracy(preds, labels, radii, [0.0, 0.25, 0.5, 1.0])
    assert acc == [3 / 5, 2 / 5, 1 / 5, 0.0]


# ---------------------------------------------------------------------------------------------
# Determinism and device counts.


def test_counts_are_deterministic_and_the_same_on_1_and_8_devices(mesh):
    keys = certify._stream_keys(jax.random.key(3), INDICES, certify.ESTIMATE)
    count = lambda m, ks=keys: certify.sample_counts(
        linear, LINEAR, IMAGES, ks, N, SIGMA, mesh=m, batch=BATCH
    )
    eight = count(mesh)
    assert eight.sum(axis=1).tolist() == [N] * len(IMAGES)
    assert abs(eight[DISTANCES.index(0.0), 0] - N / 2) < 4 * np.sqrt(N) / 2  # The tie: ~N/2.
    np.testing.assert_array_equal(count(mesh), eight)
    np.testing.assert_array_equal(count(sharding.make_mesh([('data', 1)])), eight)
    other = certify._stream_keys(jax.random.key(4), INDICES, certify.ESTIMATE)
    assert not np.array_equal(count(mesh, other), eight)


# ---------------------------------------------------------------------------------------------
# Bad settings fail in one line before any sampling.


def never_called(params, z, key):
    raise AssertionError('sampled before validating the settings')


@pytest.mark.parametrize(
    'change,message',
    [
        (dict(sigma=0.0), r'sigma must be > 0'),
        (dict(sigma=-0.25), r'sigma must be > 0'),
        (dict(n0=0), r'n0 must be an int >= 1'),
        (dict(n=0), r'n must be an int >= 1'),
        (dict(alpha=0.0), r'alpha must be in \(0, 1\)'),
        (dict(alpha=1.0), r'alpha must be in \(0, 1\)'),
        (dict(batch=12), r'global batch 12 is not divisible by the 8 devices'),
    ],
)
def test_bad_settings_fail_in_one_line_before_sampling(mesh, tmp_path, change, message):
    settings = {**dict(sigma=SIGMA, n0=10, n=100, alpha=ALPHA, batch=16, mesh=mesh), **change}
    x = np.zeros((1, *SHAPE), np.float32)
    with pytest.raises(ValueError, match=message) as e:
        certify.certify(never_called, None, x, [0], jax.random.key(0), **settings)
    assert '\n' not in str(e.value)
    path = str(tmp_path / 'c.csv')
    with pytest.raises(ValueError, match=message):
        certify.certify_csv(path, never_called, None, x, np.zeros(1), jax.random.key(0), **settings)
    assert not os.path.exists(path)


def tiny_certify_config(**overrides):
    c = evaluate_config.certify_config()
    c.sigmas, c.n0, c.n, c.batch = (SIGMA,), 8, 32, 16
    c.radii = (0.0, 0.1)
    c.attack.steps = 0
    c.update(overrides)
    return c


def test_a_denoiser_of_another_shape_fails_before_sampling(mesh, tmp_path):
    halving = purifiers.Purifier(
        kind='none',
        raw=lambda p, x: x[:, ::2, ::2],
        init=lambda rng: {},
        random=False,
        differentiable=True,
        trainable=False,
    )
    rows = [robustness.Row('halving', halving, {}, 'test')]
    images, labels = np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32)
    with pytest.raises(
        ValueError,
        match=r"denoiser 'halving' maps \(4, 4, 1\) images to \(2, 2, 1\), but the classifier "
        r'takes \(4, 4, 1\)',
    ) as e:
        certify.evaluate(
            tiny_certify_config(),
            lambda p, x: x.reshape(2, -1),
            {},
            rows,
            images,
            labels,
            mesh,
            str(tmp_path),
        )
    assert '\n' not in str(e.value) and not os.listdir(tmp_path)
    # A classifier that cannot take the (right-shaped) output says so in one line too.
    rows = [
        robustness.Row('none', purifiers.build(ml_collections.ConfigDict(dict(kind='none'))), {})
    ]
    with pytest.raises(ValueError, match=r"classifier does not take the output of denoiser 'none'"):
        certify.evaluate(
            tiny_certify_config(),
            lambda p, x: x.reshape(x.shape[0], 5, -1) @ jnp.ones((3, 2)),
            {},
            rows,
            images,
            labels,
            mesh,
            str(tmp_path),
        )
    c = tiny_certify_config()
    c.denoisers[0].sigmas = (0.3,)
    with pytest.raises(ValueError, match=r"denoiser 'none' is restricted to sigmas \(0.3,\)"):
        certify.evaluate(c, lambda p, x: x[:, 0, 0], {}, rows, images, labels, mesh, str(tmp_path))


# ---------------------------------------------------------------------------------------------
# Resuming a preempted run.


def test_a_resumed_csv_is_bitwise_the_uninterrupted_one(mesh, tmp_path):
    # Nine images in groups of six (the second padded), near the boundary so results vary.
    distances = np.linspace(-0.3, 0.3, 9)
    x, labels = images_at(distances), (distances > 0).astype(np.int32)
    run = lambda path, settings=None: certify.certify_csv(
        str(path),
        linear,
        LINEAR,
        x,
        labels,
        jax.random.key(7),
        sigma=SIGMA,
        mesh=mesh,
        images_per_call=6,
        settings=settings,
        **SETTINGS,
    )
    whole, info = run(tmp_path / 'whole.csv', {'n': N})
    assert info['computed'] == 9 and info['resumed'] == 0
    assert {r.prediction for r in whole} == {0, 1, certify.ABSTAIN}
    expected = (tmp_path / 'whole.csv').read_text()
    lines = expected.splitlines(keepends=True)
    assert lines[0] == certify.CSV_HEADER + '\n' and len(lines) == 10
    # Preempted after seven rows, in the middle of writing the eighth (inside the second group).
    cut = tmp_path / 'cut.csv'
    cut.write_text(''.join(lines[:8]) + lines[8][:5])
    (tmp_path / 'cut.csv.settings.json').write_text(json.dumps({'n': N}))
    again, info = run(cut, {'n': N})
    assert info['computed'] == 2 and info['resumed'] == 7
    assert cut.read_text() == expected
    assert again == whole
    _, info = run(cut, {'n': N})  # Nothing left to do.
    assert info['computed'] == 0
    with pytest.raises(ValueError, match=r'cut.csv was written with other settings \(n differ\)'):
        run(cut, {'n': 2 * N})


# ---------------------------------------------------------------------------------------------
# The adaptive attack on the smoothed classifier.


def test_smoothed_attack_breaks_what_is_not_certified_and_never_beats_the_certificate(
    linear_run, mesh
):
    preds, radii, _ = linear_run
    radius = 0.2
    x_adv = certify.smooth_attack(
        linear,
        LINEAR,
        IMAGES,
        LABELS,
        INDICES,
        jax.random.key(0),
        sigma=SIGMA,
        radius=radius,
        samples=8,
        steps=5,
        mesh=mesh,
    )
    moved = np.sqrt(((x_adv - IMAGES) ** 2).reshape(len(IMAGES), -1).sum(-1))
    assert np.all(moved <= radius + 1e-5)
    correct = certify.empirical_correct(
        linear,
        LINEAR,
        x_adv,
        LABELS,
        INDICES,
        jax.random.key(0),
        sigma=SIGMA,
        n=N,
        batch=BATCH,
        mesh=mesh,
    )
    # The attack crosses the boundary where it is nearer than the radius (then P = Phi(0.4) or
    # more for the other class) and cannot where it is farther; d = -0.2 sits on the radius.
    expected = {-0.45: True, 0.0: False, 0.1: False, 0.3: True, 0.45: True}
    for d, ok in zip(DISTANCES, correct):
        if d in expected:
            assert bool(ok) == expected[d], d
    certified = (preds == LABELS) & (radii >= radius)
    assert certified.sum() == 3  # |d| = 0.45, 0.3, 0.45.
    assert correct.mean() >= certified.mean() and not np.any(certified & ~correct)
    # The sanity check flags an attack that beats the certificate.
    planted = {'radius': radius, 'certified': 0.5, 'empirical': 0.4, 'violations': 1}
    results = {
        'entries': [
            {'sigma': SIGMA, 'denoiser': 'none', 'attack': {'images': 6, 'radii': [planted]}}
        ]
    }
    sanity = certify.sanity_checks(results)
    assert not sanity['passed']
    assert certify.sanity_lines(sanity)[0].startswith('BROKEN: sigma 0.25, none, r = 0.2:')


# ---------------------------------------------------------------------------------------------
# The evaluate mode end to end, on a tiny classifier's workdir.


@pytest.fixture(scope='module')
def tiny_workdirs(tmp_path_factory):
    """A small_cnn classifier workdir (random weights, saved as the classifier job would) and a
    folder of 8x8 test images in two classes."""
    from PIL import Image

    root = tmp_path_factory.mktemp('certify')
    model = ml_collections.ConfigDict(dict(name='small_cnn', num_classes=2, features=4))
    # Weights by hand (flax init would compile a program per random draw): small random convs,
    # and a head for which bright images are class 0, so predictions follow the input.
    rng = np.random.default_rng(0)
    abstract = restore.abstract_variables(models.build(model), 'classifier', (8, 8, 3))['params']
    params = jax.tree.map(lambda a: (0.3 * rng.normal(size=a.shape)).astype(a.dtype), abstract)
    params['head']['kernel'] = np.stack([np.full(16, 4.0), np.full(16, -4.0)], -1)
    params['head']['kernel'] = params['head']['kernel'].astype(np.float32)
    wd = root / 'classifier'
    ckpt = checkpointing.Checkpointer(str(wd / 'checkpoints'), asynchronous=False)
    ckpt.save(1, {'params': params})
    ckpt.close()
    (wd / 'config.json').write_text(json.dumps({'trainer': 'classifier', 'model': model.to_dict()}))
    for c, level in (('bright', 200), ('dark', 50)):
        os.makedirs(root / 'data' / 'test' / c)
        for i in range(3):
            pixels = np.clip(level + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / 'data' / 'test' / c / f'{i}.png')
    return root, model


def test_certify_mode_writes_its_report_and_resumes(tiny_workdirs, tmp_path, capsys):
    from sr_purify.jobs import evaluate as evaluate_job

    root, model = tiny_workdirs
    c = evaluate_config.get_config('certify')
    c.classifier.model = model
    c.classifier.checkpoint = str(root / 'classifier')
    c.data.source, c.data.path, c.data.cache_dir = 'folder', str(root / 'data'), str(tmp_path)
    c.denoisers = [
        evaluate_config.purifier_entry('none'),
        evaluate_config.purifier_entry('bicubic_resample', label='bicubic'),
    ]
    c.denoisers[1].sigmas = (0.25,)
    c.num_images = 4
    # n0 = n = batch and the attack's n too: one counting program per denoiser.
    c.sigmas, c.n0, c.n, c.batch = (0.25, 0.5), 32, 32, 32
    c.radii = (0.0, 0.25, 0.5)
    c.attack.update(num_images=2, radii=(0.25,), steps=1, samples=8, n=32)
    wd = tmp_path / 'eval'
    result = evaluate_job.train_and_evaluate(c, str(wd))

    entries = [(e['sigma'], e['denoiser']) for e in result['entries']]
    assert entries == [(0.25, 'none'), (0.25, 'bicubic'), (0.5, 'none')]
    out = capsys.readouterr().out
    assert 'images/s' in out and 'BROKEN' not in out and 'sanity ok:' in out
    for name in ('certify_table.md', 'results.json', 'certify_plot.png'):
        assert (wd / name).exists(), name
    saved = json.loads((wd / 'results.json').read_text())['certify']
    csvs = {e['csv']: e for e in saved['entries']}
    assert sorted(csvs) == [
        'certify_sigma0.25_bicubic.csv',
        'certify_sigma0.25_none.csv',
        'certify_sigma0.5_none.csv',
    ]
    for name, e in csvs.items():
        rows = certify.read_csv(str(wd / name))
        assert [r.index for r in rows] == [0, 1, 2, 3]
        by_hand = certify.certified_accuracy(
            [r.prediction for r in rows],
            [r.label for r in rows],
            [r.radius for r in rows],
            [0.0, 0.25, 0.5],
        )
        assert list(e['certified'].values()) == by_hand
        assert e['attack']['radii'][0]['empirical'] >= e['attack']['radii'][0]['certified']
    # At n = 32 only sigma 0.5 can certify r = 0.25 (the largest radius is sigma * 0.86): that
    # entry must certify something there, or the comparison above checks nothing.
    assert csvs['certify_sigma0.5_none.csv']['attack']['radii'][0]['certified'] > 0
    header, rows = certify_report.table(saved)
    assert header[:5] == ['sigma', 'denoiser', 'r=0', 'r=0.25', 'r=0.5'] and len(rows) == 3

    # Preempted while writing the last entry: the rerun computes the two missing rows only
    # and ends with the same files and numbers.
    last = wd / 'certify_sigma0.5_none.csv'
    expected = last.read_text()
    last.write_text(''.join(expected.splitlines(keepends=True)[:3]) + '2,1,')
    again = evaluate_job.train_and_evaluate(c, str(wd))
    assert last.read_text() == expected
    assert [e['computed'] for e in again['entries']] == [0, 0, 2]
    strip = lambda r: [
        {k: v for k, v in e.items() if k not in ('computed', 'resumed', 'images_per_s')}
        for e in r['entries']
    ]
    assert strip(again) == strip(result)
    per_image = {
        (e['sigma'], e['denoiser']): certify.read_csv(str(wd / e['csv'])) for e in again['entries']
    }
    md = certify_report.report(str(tmp_path), again, per_image, 'toy', writer=RecordingWriter())
    assert '| 0.25 | bicubic |' in md
