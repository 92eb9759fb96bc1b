"""SR robustness (configs/evaluate.py:sr_robustness): the attacks' budgets, eps = 0, the closed
form of a linear model, the universal perturbation, the defences, bad inputs, and the mode end to
end on a 2-step teacher."""

import json
import logging
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import RecordingWriter, tiny_sr_config
from PIL import Image as PILImage

from configs import evaluate as evaluate_config
from sr_purify import image_ops, jobs, restore
from sr_purify.evaluators import (
    sr_defences,
    sr_robustness,
    sr_robustness_attacks,
    sr_robustness_report,
)
from sr_purify.evaluators.sr import make_lr
from sr_purify.image_ops import Image


def nearest(params, x):
    """f(x) = w * nearest-neighbour x2 upsampling: linear, per pixel, dihedrally equivariant."""
    return params['w'] * jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


LINEAR = sr_robustness.SRModel('linear', nearest, {'w': jnp.float32(1.0)}, 2)


class TinySR(nn.Module):
    """x2 nearest upsampling plus a random 3x3 conv residual (pixel shuffle): not equivariant."""

    @nn.compact
    def __call__(self, x):
        y = nn.Conv(12, (3, 3))(x)
        n, h, w, _ = y.shape
        y = y.reshape(n, h, w, 2, 2, 3).transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, 3)
        return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2) + 0.5 * y


def _tiny_apply(params, x):
    return TinySR().apply(params, x)


TINY = sr_robustness.SRModel(
    'tiny', _tiny_apply, TinySR().init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))), 2
)


def settings(**kw) -> sr_robustness.Settings:
    base = dict(eps_255=(2, 4), steps=4, universal_steps=2, universal_patch=8, eot_draws=2)
    return sr_robustness.Settings(**{**base, **kw})


def small_defences(*names):
    cfg = sr_defences.default_settings()
    cfg.median_smoothing.samples = 3
    return [sr_defences.build(n, cfg) for n in names]


def textured(shape, seed, low=0, high=256):
    return np.random.default_rng(seed).integers(low, high, shape).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# The attacks.


def test_every_attack_stays_in_the_eps_ball_and_in_0_1():
    hr = textured((16, 20, 3), 0)
    hr[:8, :10] = 0  # Black and white regions, where the [0, 1] clip matters.
    hr[-8:, -10:] = 255
    (sample,) = sr_robustness.prepare([Image('a', hr)], 2)
    x, eps = sample.x, 8 / 255
    median = sr_robustness.defended(small_defences('median_smoothing')[0], _tiny_apply, 2)
    for fn in (_tiny_apply, median):
        x_adv = sr_robustness.basic_attack(fn, TINY.params, x, jax.random.key(1), eps, steps=4)
        d = np.asarray(x_adv - x)
        assert np.abs(d).max() <= eps + 1e-6 and np.abs(d).max() >= eps - 1e-6
        # Inside [0, 1], and on its edges where the black and white regions push it out.
        assert float(x_adv.min()) == 0.0 and float(x_adv.max()) == 1.0
    samples = sr_robustness.prepare([Image('a', hr), Image('g', textured((12, 14), 1))], 2)
    delta = sr_robustness.universal_perturbation(TINY, samples, jax.random.key(2), eps, 3, patch=8)
    assert np.abs(delta).max() <= eps + 1e-6 and np.abs(delta).max() >= eps - 1e-6
    for s in samples:
        x_adv = np.asarray(sr_robustness.apply_universal(jnp.asarray(delta), s.x, eps))
        assert np.abs(x_adv - np.asarray(s.x)).max() <= eps + 1e-6
        assert x_adv.min() >= 0.0 and x_adv.max() <= 1.0


def test_eps_zero_leaves_every_psnr_unchanged_exactly():
    # Two models of one function (compiled once), so that transfer runs too.
    other = sr_robustness.SRModel('linear_0.8', nearest, {'w': jnp.float32(0.8)}, 2)
    compiled = sr_robustness_attacks._basic._cache_size()
    results, _ = sr_robustness.evaluate(
        [LINEAR, other],
        [('S', [Image('a', textured((16, 20, 3), 3))])],
        settings(eps_255=(0, 4)),
        small_defences('resize', 'median_smoothing'),
        transfer=[('linear', 'linear_0.8')],
    )
    # One compiled attack per function attacked and shape (f, resize∘f, median∘f), whatever the
    # eps and the parameters: eps and the step are traced.
    assert sr_robustness_attacks._basic._cache_size() - compiled == 3
    entry = results['datasets']['S']
    for name in ('linear', 'linear_0.8'):
        m = entry['models'][name]
        for attack in ('basic', 'universal'):
            assert m[attack]['0/255']['psnr_hr'] == m['clean']
            assert m[attack]['0/255']['psnr_change'] == math.inf
            assert m[attack]['4/255']['psnr_change'] < 60  # Not vacuous: eps > 0 changes it.
        for d in m['defences'].values():
            for attacker in ('oblivious', 'adaptive'):
                assert d[attacker]['0/255']['psnr_hr'] == d['clean']
                assert d[attacker]['0/255']['drop'] == 0.0
                assert d[attacker]['4/255']['psnr_change'] < 60
    t = entry['transfer']['linear->linear_0.8']
    assert t['basic']['0/255']['psnr_hr'] == t['universal']['0/255']['psnr_hr'] == t['clean']


def photos():
    """Crops of two scikit-image photos: one colour, one gray (natural images, high PSNR)."""
    import skimage.data

    return [
        Image('rgb', skimage.data.astronaut()[100:124, 180:208]),
        Image('gray', skimage.data.camera()[200:224, 240:268]),
    ]


@pytest.fixture(scope='module')
def teacher(tmp_path_factory):
    """A teacher job's workdir (2 steps of the tiny config) and a folder of the photos."""
    images = tmp_path_factory.mktemp('images')
    for im in photos():
        PILImage.fromarray(im.pixels).save(images / f'{im.name}.png')
    c = tiny_sr_config()
    c.eval.datasets = [str(images)]
    workdir = tmp_path_factory.mktemp('teacher')
    jobs.get('teacher')(c, str(workdir), writer=RecordingWriter())
    return workdir, images


def test_attacked_psnr_falls_as_eps_grows_on_a_trained_model(teacher):
    workdir, images = teacher
    model = sr_robustness.restored_model('teacher', restore.load(str(workdir), 'sr'), 2)
    results, _ = sr_robustness.evaluate(
        [sr_robustness.bicubic(2), model],
        [('S', photos())],
        settings(eps_255=(1, 2, 4, 8), steps=5, universal_steps=4),
    )
    for name, m in results['datasets']['S']['models'].items():
        for attack in ('basic', 'universal'):
            # The attack maximises the output change, not the error against HR: at 1/255 the
            # attacked PSNR may sit a hair above the clean one; from there on it falls.
            hr = [m[attack][k]['psnr_hr'] for k in results['eps_labels']]
            change = [m[attack][k]['psnr_change'] for k in results['eps_labels']]
            assert all(a > b for a, b in zip(hr, hr[1:])), (name, attack, hr)
            assert hr[-1] < m['clean'] - 0.5, (name, attack, m['clean'], hr)
            assert all(a > b for a, b in zip(change, change[1:])), (name, attack, change)


def _tiled(delta: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The universal patch tiled over x (1, h, w, c) by hand; gray takes the channel mean."""
    h, w, c = x.shape[1:]
    t = np.tile(delta, (h // delta.shape[0] + 1, w // delta.shape[1] + 1, 1))[:h, :w]
    return (t.mean(-1, keepdims=True) if c == 1 else t)[None]


def test_the_universal_perturbation_is_one_array_shared_by_every_image():
    images = [
        Image('a', textured((16, 20, 3), 7)),
        Image('b', textured((14, 18, 3), 8)),  # LR 7 x 9: not a multiple of the patch.
        Image('g', textured((12, 16), 9)),
    ]
    results, samples = sr_robustness.evaluate(
        [TINY], [('S', images)], settings(eps_255=(4,), universal_steps=3)
    )
    (delta,) = samples['universal']['S']['tiny'].values()
    assert isinstance(delta, np.ndarray) and delta.shape == (8, 8, 3)
    eps = 4 / 255
    rows = results['datasets']['S']['models']['tiny']['images']
    for im, s, row in zip(images, sr_robustness.prepare(images, 2), rows):
        x = np.asarray(s.x)
        x_adv = np.clip(np.clip(x + _tiled(delta, x), x - eps, x + eps), 0, 1)
        fn = sr_robustness.image_fn(_tiny_apply, x.shape[-1])
        clean = sr_robustness.run_model(fn, TINY.params, s.x)
        out = sr_robustness.run_model(fn, TINY.params, jnp.asarray(x_adv, jnp.float32))
        hr = image_ops.modcrop(im.pixels, 2)
        assert row['universal']['4/255']['psnr_change'] == sr_robustness.psnr(out, clean, 2)
        assert row['universal']['4/255']['psnr_hr'] == sr_robustness.psnr(out, hr, 2)


def test_the_table_equals_the_closed_form_of_a_linear_model():
    """f = nearest x2 upsampling. The worst case of ||f(x + d) - f(x)||^2 over ||d||_inf <= eps
    is any d = +-eps everywhere (both attacks reach it: the gradient's sign is d's own), so on a
    gray image, in the interior of [0, 1], every output pixel moves by exactly k/255 for eps =
    k/255: PSNR(f(x + d), f(x)) = 20 log10(255 / k). On a flat image f(x) = HR, so the attacked
    PSNR against HR is the same number and the clean one is inf."""
    flat = [
        Image('flat100', np.full((16, 20), 100, np.uint8)),
        Image('flat150', np.full((12, 14), 150, np.uint8)),
    ]
    texture = [Image('texture', textured((16, 20), 10, low=60, high=200))]
    results, _ = sr_robustness.evaluate(
        [LINEAR],
        [('flat', flat), ('texture', texture)],
        # Universal steps of eps (the largest) reach the corners in two steps.
        settings(eps_255=(2, 4), steps=4, universal_steps=2, universal_step_size=4 / 255),
        small_defences('self_ensemble'),
    )
    closed = {f'{k}/255': 20 * math.log10(255 / k) for k in (2, 4)}
    hr = texture[0].pixels
    by_hand = np.repeat(np.repeat(make_lr(hr, 2).astype(np.float64), 2, 0), 2, 1)
    mse = np.mean((by_hand - hr)[2:-2, 2:-2] ** 2)
    clean = {'flat': math.inf, 'texture': 10 * math.log10(255**2 / mse)}
    rows = sr_robustness_report.attack_rows(results)
    assert len(rows) == 2 * 2 * 2
    for set_name, model, attack, label, clean_psnr, attacked, drop, change in rows:
        assert model == 'linear' and attack in ('basic', 'universal')
        assert clean_psnr == pytest.approx(clean[set_name], abs=1e-9)
        assert change == pytest.approx(closed[label], abs=1e-9)
        if set_name == 'flat':
            assert attacked == pytest.approx(closed[label], abs=1e-9) and drop == math.inf
        else:  # |rmse(f(x + d), HR) - rmse(f(x), HR)| <= k (triangle inequality).
            rmse = 255 * 10 ** (-attacked / 20)
            assert abs(rmse - math.sqrt(mse)) <= int(label.split('/')[0]) + 1e-9
    # The self-ensemble of f is f: both attackers reach the same closed form through it.
    for set_name in ('flat', 'texture'):
        d = results['datasets'][set_name]['models']['linear']['defences']['self_ensemble']
        assert d['cost'] == pytest.approx(0.0, abs=1e-9)
        for attacker in ('oblivious', 'adaptive'):
            for label, value in closed.items():
                assert d[attacker][label]['psnr_change'] == pytest.approx(value, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The defences.


def test_the_self_ensemble_of_an_equivariant_model_is_the_model():
    x = jax.random.uniform(jax.random.key(3), (2, 5, 7, 3))  # Not square: the rotations transpose.
    for fn, params in ((nearest, {'w': 0.7}), (sr_robustness.bicubic(2).fn, {})):
        ensemble = sr_defences.self_ensemble(fn, params, x)
        np.testing.assert_allclose(ensemble, fn(params, x), atol=1e-5)
    # A model that is not equivariant changes: the ensemble is no pass-through.
    gap = sr_defences.self_ensemble(_tiny_apply, TINY.params, x) - _tiny_apply(TINY.params, x)
    assert float(jnp.abs(gap).max()) > 1e-2


def test_defences_by_name_reject_an_unknown_name_listing_the_valid_ones():
    with pytest.raises(
        ValueError,
        match=(
            r"unknown SR defence 'jpeg'; valid: input_purifier, median_smoothing, resize, "
            r'self_ensemble'
        ),
    ):
        sr_defences.build('jpeg')
    cfg = sr_defences.default_settings()
    cfg.resize.factor = 1.5
    with pytest.raises(ValueError, match=r'invalid defence.resize.factor 1.5; valid: a number in'):
        sr_defences.build('resize', cfg)
    # input_purifier needs a trained purifier: tests/test_sr_input_purifier.py builds it.
    plain = set(sr_defences.DEFENCES) - {'input_purifier'}
    assert {d.name for d in small_defences(*plain)} == plain


# ---------------------------------------------------------------------------------------------
# The evaluate mode.


def _config(teacher_dir, images, **fields) -> ml_collections.ConfigDict:
    c = evaluate_config.get_config('sr_robustness')
    c.teacher.checkpoint = c.student.checkpoint = str(teacher_dir)
    c.datasets = (str(images),)
    c.eps_255 = (2, 4)
    c.attack.steps, c.universal.steps, c.universal.patch = 2, 2, 8
    c.defences = ('resize',)
    c.grid_crop = 8
    for k, v in fields.items():
        c[k] = v
    return c


@pytest.fixture
def launcher(monkeypatch):
    import launch

    # handle_error clears the root logger's handlers; keep pytest's own ones.
    monkeypatch.setattr(logging.getLogger(), 'handlers', list(logging.getLogger().handlers))
    return launch


def test_bad_inputs_are_one_line_errors(teacher, tmp_path, launcher, capsys):
    workdir, images = teacher
    classifier = tmp_path / 'classifier'
    classifier.mkdir()
    (classifier / 'config.json').write_text(json.dumps({'trainer': 'classifier'}))
    missing = str(tmp_path / 'nowhere')
    cases = [
        (dict(eps_255=(-1, 2)), r'invalid eps_255 \(-1, 2\); valid: a non-empty tuple'),
        (dict(scale=4), r'teacher \(.*\) is trained for x2, not x4; pass --config.scale=2'),
        (dict(others=(str(classifier),)), r"is a classifier job's workdir, not an SR model"),
        # The defence names are checked before any checkpoint is read.
        (dict(defences=('jpeg',), others=(missing,)), r"unknown SR defence 'jpeg'; valid: "),
    ]
    for fields, message in cases:
        config = _config(workdir, images, **fields)
        with pytest.raises(ValueError, match=message) as info:
            jobs.get('evaluate')(config, str(tmp_path / 'out'))
        capsys.readouterr()
        assert launcher.handle_error(info.value, str(tmp_path)) == 2
        err = capsys.readouterr().err
        assert err.startswith('error: ') and err.count('\n') == 1, err
    assert not (tmp_path / 'error.log').exists()


def test_the_mode_end_to_end_writes_table_json_plot_and_grid(teacher, tmp_path):
    workdir, images = teacher
    # Two sets of one colour photo of one size each: every function compiles once.
    sets = [tmp_path / 'Set_a', tmp_path / 'Set_b']
    for folder, pixels in zip(sets, (photos()[0].pixels, photos()[0].pixels[::-1])):
        folder.mkdir()
        PILImage.fromarray(pixels).save(folder / 'photo.png')
    config = _config(workdir, images)
    config.datasets = tuple(str(s) for s in sets)
    out = tmp_path / 'eval'
    jobs.get('evaluate')(config, str(out))
    results = json.loads((out / 'results.json').read_text())['sr_robustness']
    assert set(results['datasets']) == {'Set_a', 'Set_b'}
    assert results['eps_labels'] == ['2/255', '4/255'] and results['transfer'] == [
        'teacher->student',
        'student->teacher',
    ]
    for entry in results['datasets'].values():
        assert set(entry['models']) == {'bicubic', 'teacher', 'student'}
        for m in entry['models'].values():
            assert set(m) == {'clean', 'basic', 'universal', 'defences', 'images'}
            for attack in ('basic', 'universal'):
                assert set(m[attack]) == {'2/255', '4/255'}
                assert set(m[attack]['4/255']) == {'psnr_hr', 'psnr_change', 'drop'}
            assert set(m['defences']['resize']) == {'clean', 'cost', 'oblivious', 'adaptive'}
        t = entry['transfer']['teacher->student']
        assert set(t) == {'source', 'target', 'clean', 'basic', 'universal'}
        # Teacher and student are the same checkpoint here, attacked with the same keys: the
        # transferred perturbations are the student's own.
        assert t['basic'] == entry['models']['student']['basic']
    for name in ('sr_robustness_table.md', 'sr_robustness_plot.png', 'sr_robustness_grid.png'):
        assert (out / name).stat().st_size > 0
    assert 'universal from teacher' in (out / 'sr_robustness_table.md').read_text()
    with PILImage.open(out / 'sr_robustness_grid.png') as grid:
        assert grid.size[0] > 5 * 16 and grid.size[1] > 3 * 16  # 5 columns, 3 model rows.
    # A defence whose settings are not all numbers (the input purifier's checkpoint and kind).
    results['defences']['input_purifier'] = {
        'settings': {'checkpoint': '/purifier', 'kind': 'nrp', 'step': 3},
        'random': False,
    }
    line = [s for s in sr_robustness_report.notes(results) if 'input_purifier' in s][0]
    assert line.startswith('- defence input_purifier (checkpoint /purifier, kind nrp, step 3):')
