"""The output watermark: the watermark job marks a tiny SR model, verification flags it (and what
it served) but not the clean model, the rank test's false-positive rate is at most alpha under a
simulated null, the wrapper keeps the parameter tree, and the errors are one line."""

import json

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data
from conftest import tiny_sr_config, tiny_sr_workdir
from PIL import Image

from configs import verify as verify_config
from configs import watermark as watermark_config
from sr_purify import image_ops, inference, models, restore
from sr_purify import watermark as wm
from sr_purify.jobs import verify as verify_job
from sr_purify.jobs import watermark as watermark_job

# STRENGTH: about what the 0.08 dB budget gives on the CPU student (7.7-11.5 over 12 keys).
SEED, STRENGTH, NULL_KEYS, ALPHA = 1234, 8.0, 199, 0.01
PROBE, SCALE = 24, 2  # 2 HR images of 96x96 -> LR 48x48 -> 8 probes of 24x24.


@pytest.fixture(scope='module')
def images(tmp_path_factory):
    """Two 96x96 photos (the mark lives on texture, so natural content, not noise)."""
    root = tmp_path_factory.mktemp('wm_images')
    astronaut = Image.fromarray(skimage.data.astronaut()).resize((96, 96), Image.LANCZOS)
    cat = Image.fromarray(skimage.data.chelsea()[40:232, 120:312]).resize((96, 96), Image.LANCZOS)
    astronaut.save(root / 'astronaut.png')
    cat.save(root / 'chelsea.png')
    return root


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    return tiny_sr_workdir(tmp_path_factory.mktemp('source'))


def mark_config(source, images) -> ml_collections.ConfigDict:
    c = watermark_config.get_config()
    c.checkpoint = str(source)
    c.watermark.seed, c.watermark.strength = SEED, STRENGTH
    c.probes.datasets, c.probes.size = [str(images)], PROBE
    c.null_keys, c.alpha = NULL_KEYS, ALPHA
    c.eval.datasets = [str(images)]
    return c


@pytest.fixture(scope='module')
def marked(source, images, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('marked')
    result = watermark_job.train_and_evaluate(mark_config(source, images), str(workdir))
    return dict(workdir=workdir, result=result)


@pytest.fixture(scope='module')
def probes(images):
    return watermark_job.probe_tiles([str(images)], SCALE, PROBE)


@pytest.fixture(scope='module')
def source_outputs(source, probes):
    """The clean source model's served (8-bit) outputs on the probes."""
    return served(restore.load(str(source), 'sr'), probes)


def verify(owner, suspect, workdir, **overrides) -> dict:
    c = verify_config.get_config()
    c.owner, c.suspect = str(owner), str(suspect)
    c.update(overrides)
    return verify_job.train_and_evaluate(c, str(workdir))


def served(model, probes) -> np.ndarray:
    return watermark_job.run_batched(jax.jit(lambda x: model.apply(x)), probes)


def _one_line(excinfo):
    return len(str(excinfo.value).splitlines()) == 1


# ---------------------------------------------------------------------------------------------
# 1. The job and verification.


def test_the_job_writes_a_marked_model_folder_and_detects_its_own_mark(
    marked, source, images, probes
):
    workdir, result = marked['workdir'], marked['result']
    config = json.loads((workdir / 'config.json').read_text())
    assert config['trainer'] == 'watermark' and config['source'] == str(source)
    assert (config['watermark']['seed'], config['watermark']['strength']) == (SEED, STRENGTH)
    assert config['model']['name'] == 'edsr' and config['model']['scale'] == SCALE
    files = sorted(p.name for p in (workdir / 'probes').iterdir())
    assert files == [f'probe_{i:03d}.png' for i in range(8)] and len(probes) == 8
    stored = verify_job.read_probes(str(workdir))
    # 8-bit LR tiles, stored losslessly: verification reads back the very probes.
    np.testing.assert_array_equal(stored.astype(np.float32), probes)
    assert result['probes'] == 8 and result['strength'] == STRENGTH
    on_marked, on_clean = result['detect']['watermarked'], result['detect']['unmarked']
    assert on_marked['p_value'] == 1 / (1 + NULL_KEYS) and on_marked['derived']
    assert on_marked['null_keys'] == NULL_KEYS and on_marked['z'] > 6
    # All of the mark but what the 8-bit rounding and the clip to [0, 1] take.
    assert 0.8 < on_marked['inherited'] < 1.05
    assert on_clean == dict(on_clean, statistic=0.0, p_value=1.0, derived=False)
    assert set(result['cost']) == {images.name}
    cost = result['cost'][images.name]
    # Small either way (a zero-mean mark can even meet the model's own error and help a little).
    assert -0.05 < cost['psnr_cost_db'] < 1.0 and np.isfinite(cost['ssim_cost'])
    assert json.loads((workdir / 'results.json').read_text())['watermark']['probes'] == 8
    assert (workdir / 'watermark_table.md').is_file() and (workdir / 'detection_table.md').is_file()


def test_strength_0_marks_at_the_largest_strength_within_the_psnr_budget(source, images, tmp_path):
    c = mark_config(source, images)
    c.watermark.strength, c.watermark.max_cost_db = 0.0, 0.05
    c.watermark.calibrate_on = [str(images)]
    result = watermark_job.train_and_evaluate(c, str(tmp_path / 'budget'))
    strength = json.loads((tmp_path / 'budget' / 'config.json').read_text())['watermark']
    assert strength['strength'] == result['strength'] and 0 < result['strength'] < 64
    # Measured by the job's own evaluation (the model as served): within the budget, and using it.
    cost = result['cost'][images.name]['psnr_cost_db']
    assert 0.04 < cost <= 0.05 + 1e-4


def test_strength_for_cost_bisects_to_the_budget_on_the_worst_set():
    rng = np.random.default_rng(0)

    def image_set(noise, count=2):
        rows = []
        for _ in range(count):
            hr = rng.integers(40, 216, (40, 40, 3)).astype(np.uint8)
            sr = hr / 255.0 + rng.normal(0, noise / 255.0, hr.shape)
            rows.append((sr, np.sign(rng.normal(size=(40, 40, 1))) * np.ones(3) / 255.0, hr))
        return rows

    sets = [image_set(2.0), image_set(6.0)]  # The cleaner set pays more dB for the same mark.

    def cost(rows, s):
        return np.mean(
            [
                image_ops.psnr(sr, hr, SCALE)
                - image_ops.psnr(np.clip(sr + s * unit, 0, 1), hr, SCALE)
                for sr, unit, hr in rows
            ]
        )

    s = wm.strength_for_cost(sets, SCALE, 0.1)
    assert s > 0 and cost(sets[0], s) <= 0.1 < cost(sets[0], 1.01 * s)
    assert cost(sets[1], s) < 0.05  # Not the binding one.
    with pytest.raises(ValueError, match='watermark.max_cost_db must be > 0'):
        wm.strength_for_cost(sets, SCALE, 0.0)


def test_verification_flags_the_marked_model_and_what_it_served_not_the_clean_one(
    marked, source, probes, tmp_path
):
    owner = marked['workdir']
    derived = verify(owner, owner, tmp_path / 'v_marked')
    assert derived['p_value'] == 1 / (1 + NULL_KEYS) and derived['derived']
    assert derived['null_keys'] == NULL_KEYS and derived['alpha'] == ALPHA  # The owner's.
    assert derived['statistic'] == pytest.approx(
        marked['result']['detect']['watermarked']['statistic'], rel=1e-6
    )
    clean = verify(owner, source, tmp_path / 'v_clean')
    assert clean['statistic'] == 0.0 and clean['p_value'] == 1.0 and not clean['derived']
    saved = json.loads((tmp_path / 'v_clean' / 'results.json').read_text())['verify']
    assert saved['suspect'] == str(source) and saved['derived'] is False

    # The marked model's outputs on the probes, as the upscale job would name them.
    outputs = tmp_path / 'outputs'
    outputs.mkdir()
    served_outputs = served(restore.load(str(owner), 'sr'), probes)
    for name, out in zip(watermark_job.probe_names(len(probes)), served_outputs):
        inference.write_png(str(outputs / f'{name}_x{SCALE}.png'), out)
    from_files = verify(owner, outputs, tmp_path / 'v_files')
    assert from_files['derived'] and from_files['p_value'] == derived['p_value']
    assert from_files['statistic'] == pytest.approx(derived['statistic'], rel=1e-6)
    # An alpha in the verify config overrides the owner's (null_keys likewise; not run here: each
    # new count of keys costs a 15 s compile of the scores).
    strict = verify(owner, outputs, tmp_path / 'v_strict', alpha=1e-3)
    assert strict['alpha'] == 1e-3 and strict['p_value'] == 1 / (1 + NULL_KEYS)
    assert not strict['derived']


# ---------------------------------------------------------------------------------------------
# 2. The false-positive bound, on a null simulated over random owner keys.


def _smooth_noise(rng, shape, sigma_px: float = 1.5, amplitude: float = 3 / 255):
    """Spatially correlated noise, independent of every key."""
    noise = rng.standard_normal(shape).astype(np.float32)
    k = np.exp(-0.5 * (np.arange(-4, 5) / sigma_px) ** 2)
    k /= k.sum()
    for axis in (1, 2):
        noise = np.apply_along_axis(lambda v: np.convolve(v, k, 'same'), axis, noise)
    return amplitude * noise / noise.std()


def _quantise(x):
    return np.round(np.clip(x, 0, 1) * 255) / 255


def test_false_positives_are_at_most_alpha_over_random_owner_keys(
    probes, source_outputs, monkeypatch
):
    k, trials = 19, 200
    # The generic basis depends on the probes alone; its numpy QR takes up to 0.8 s a call on a
    # busy 2-core machine, so it is computed once instead of once a trial.
    basis = wm.generic_basis(probes)
    monkeypatch.setattr(wm, 'generic_basis', lambda p, border=wm.BORDER: basis)
    common = wm.common_directions(probes, basis)  # Also the probes' alone: once, not per trial.
    monkeypatch.setattr(wm, 'common_directions', lambda p, b: common)
    n, h, w, _ = probes.shape
    reference = _quantise(np.asarray(jax.image.resize(probes, (n, h * 2, w * 2, 3), 'cubic')))
    rng = np.random.default_rng(0)
    other_owner = np.asarray(wm.mark(wm.mark_weights(777), jnp.asarray(probes), 2, STRENGTH))
    null_suspects = [
        _quantise(reference + _smooth_noise(rng, reference.shape)),  # structured noise
        _quantise(reference + other_owner),  # another owner's watermarked bicubic
        source_outputs,  # another model altogether
    ]
    seeds = rng.choice(2**31 - 2, size=trials, replace=False) + 1
    seeds = seeds[seeds != 777]
    p = []
    for seed in seeds:
        own = np.asarray(wm.mark(wm.mark_weights(int(seed)), jnp.asarray(probes), 2, STRENGTH))
        ds = wm.detect_many(
            null_suspects + [_quantise(reference + own)],
            reference,
            probes,
            int(seed),
            STRENGTH,
            null_keys=k,
        )
        p.append([d.p_value for d in ds])
    p = np.array(p)  # (trials, suspects)
    # On the grid k/(1 + null_keys), k = 1..1 + null_keys.
    ranks = p * (1 + k)
    np.testing.assert_allclose(ranks, np.round(ranks), atol=1e-9)
    assert ranks.min() >= 1 and ranks.max() <= 1 + k
    # The suspect carrying each trial's own mark always ranks first: the test has power here.
    np.testing.assert_array_equal(p[:, -1], 1 / (1 + k))
    t = len(p)
    for alpha in (0.05, 0.1, 0.2):
        tolerance = 3 * np.sqrt(alpha * (1 - alpha) / t)
        rates = np.mean(p[:, :-1] <= alpha, axis=0)
        assert np.all(rates <= alpha + tolerance), (alpha, rates)
    # Exchangeable continuous statistics make p uniform on the grid, not merely conservative.
    mean, sd = (k + 2) / (2 * (k + 1)), np.sqrt((k * (k + 2)) / (12 * (k + 1) ** 2) / t)
    assert np.all(np.abs(p[:, :-1].mean(0) - mean) < 4 * sd), p[:, :-1].mean(0)


def test_common_directions_are_orthonormal_and_span_what_every_keys_mark_shares(probes):
    basis = wm.generic_basis(probes)
    common = np.asarray(wm.common_directions(probes, basis, keys=40, dims=6))
    assert common.shape == (6, probes.size // 3)
    np.testing.assert_allclose(common @ common.T, np.eye(6), atol=1e-4)
    # Deterministic (a fixed public stream), so every verification of these probes uses the same.
    np.testing.assert_array_equal(common, wm.common_directions(probes, basis, keys=40, dims=6))
    # A key outside the stream has far more of its mark in these 6 directions than 6 random
    # directions of the pixels it lives on (inside the border) would hold: 6 / that count.
    field = np.asarray(wm._fields(jnp.asarray([SEED], jnp.uint32), probes, basis, common[:0]))
    field = field.reshape(-1)
    share = np.sum((common @ field) ** 2) / np.sum(field**2)
    assert share > 10 * 6 / np.count_nonzero(field), share


def test_inherited_is_the_fraction_of_the_mark_the_suspect_carries(probes):
    # A mid-grey reference (no clipping) plus exactly `fraction` of the owner's mark, unquantised.
    n, h, w, _ = probes.shape
    reference = np.full((n, h * SCALE, w * SCALE, 3), 0.5, np.float32)
    m = np.asarray(wm.mark(wm.mark_weights(SEED), jnp.asarray(probes), SCALE, STRENGTH))
    fractions = (1.0, 0.75, 0.5, 0.25)  # 4 suspects and 19 keys: the null test's compiled shapes.
    ds = wm.detect_many(
        [reference + f * m for f in fractions], reference, probes, SEED, STRENGTH, null_keys=19
    )
    assert [d.inherited for d in ds] == pytest.approx(fractions, rel=0.05)


# ---------------------------------------------------------------------------------------------
# 3. The wrapper and the mark.


def test_watermarked_keeps_the_parameter_tree_and_adds_exactly_the_mark(probes):
    net = models.build(tiny_sr_config().model)
    wrapped = wm.Watermarked(net, SEED, STRENGTH, SCALE)
    x = jnp.asarray(probes[:4])
    # Traced, not run: an eager init of even this net costs 6-8 s of threefry on 2 cores.
    shapes = jax.eval_shape(lambda: net.init(jax.random.key(1), x))
    shapes_w = jax.eval_shape(lambda: wrapped.init(jax.random.key(1), x))
    assert jax.tree.structure(shapes_w) == jax.tree.structure(shapes)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), shapes_w) == jax.tree.map(
        lambda a: (a.shape, a.dtype), shapes
    )
    assert set(shapes_w['params']) == set(shapes['params']) and 'head' in shapes['params']
    rng = np.random.default_rng(1)
    params = jax.tree.map(
        lambda a: jnp.asarray(0.05 * rng.standard_normal(a.shape), a.dtype), shapes
    )

    sr = np.asarray(net.apply(params, x))
    out = np.asarray(wrapped.apply(params, x))
    m = np.asarray(wm.mark(wm.mark_weights(SEED), x, SCALE, STRENGTH))
    assert m.shape == sr.shape == out.shape == (4, PROBE * SCALE, PROBE * SCALE, 3)
    np.testing.assert_allclose(out, np.clip(sr + m, 0, 1), atol=1e-6)
    inside = (sr + m > 0) & (sr + m < 1)
    assert inside.mean() > 0.9
    np.testing.assert_allclose((out - sr)[inside], m[inside], atol=1e-6)
    # Features pass through untouched; only the image is marked.
    out_f, feats = wrapped.apply(params, x, return_features=True)
    np.testing.assert_allclose(np.asarray(out_f), out, atol=1e-6)
    assert set(feats) == set(net.apply(params, x, return_features=True)[1])

    # The mark: a luminance change, under 2 strength/255 (a field in [-1, 1] minus its local
    # mean), proportional to strength, keyed.
    peak = np.abs(m).max()
    assert 0.5 * STRENGTH / 255 < peak < 2 * STRENGTH / 255
    np.testing.assert_array_equal(m[..., 0], m[..., 1])
    np.testing.assert_array_equal(m[..., 0], m[..., 2])
    np.testing.assert_allclose(
        np.asarray(wm.mark(wm.mark_weights(SEED), x, SCALE, 2 * STRENGTH)), 2 * m, atol=1e-7
    )
    other = np.asarray(wm.mark(wm.mark_weights(SEED + 1), x, SCALE, STRENGTH))
    assert np.abs(other - m).max() > 0.5 * STRENGTH / 255
    assert abs(np.corrcoef(other.ravel(), m.ravel())[0, 1]) < 0.5
    flat = jnp.full_like(x, 0.4)
    assert np.abs(np.asarray(wm.mark(wm.mark_weights(SEED), flat, SCALE, STRENGTH))).max() < 1e-6


def test_the_mark_commutes_with_flips_and_quarter_turns(probes):
    # A thief trains on flipped and rotated pairs and learns the mark averaged over them: only an
    # equivariant mark survives that average whole. Non-square, so a turn changes the shape.
    x = jnp.asarray(probes[:2, :, 3:])
    weights = wm.mark_weights(SEED)
    m = wm.mark(weights, x, SCALE, STRENGTH)
    assert float(jnp.abs(m).max()) > 0.2 * STRENGTH / 255
    for flip, turns in wm.DIHEDRAL:
        moved = wm.mark(weights, wm.transform(x, flip, turns), SCALE, STRENGTH)
        np.testing.assert_allclose(moved, wm.transform(m, flip, turns), atol=1e-7)

    # The one-pass field is the D4 average of the plain random network, branch by branch.
    def plain(lr):
        h = jnp.tanh(wm._conv(wm.HP_GAIN * wm.high_pass(lr), weights['conv1']))
        h = jnp.tanh(wm._conv(h, weights['conv2']))
        half = wm.HIDDEN // 2
        return jnp.tanh(wm.Z_GAIN * jnp.sum(h[..., :half] * h[..., half:] * weights['mix'], -1))

    average = (
        sum(wm.untransform(plain(wm.transform(x, f, t))[..., None], f, t) for f, t in wm.DIHEDRAL)
        / 8
    )
    np.testing.assert_allclose(wm.mark_field(weights, x), wm._minus_local_mean(average), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# 4. Serving.


def test_restore_serves_the_marked_model_and_the_clean_one_on_request(marked, source, probes):
    x = jnp.asarray(probes)
    src = restore.load(str(source), 'sr')
    mk = restore.load(str(marked['workdir']), 'sr')
    clean = restore.load(str(marked['workdir']), 'sr', marked=False)
    assert isinstance(mk.module, wm.Watermarked) and not isinstance(clean.module, wm.Watermarked)
    assert mk.job == clean.job == 'watermark' and mk.scale == SCALE
    for model in (mk, clean):
        leaves, want = jax.tree.leaves(model.variables), jax.tree.leaves(src.variables)
        assert jax.tree.structure(model.variables) == jax.tree.structure(src.variables)
        assert all(np.array_equal(a, b) for a, b in zip(leaves, want))
    reference = np.asarray(src.apply(x))
    np.testing.assert_array_equal(np.asarray(clean.apply(x)), reference)
    m = np.asarray(wm.mark(wm.mark_weights(SEED), x, SCALE, STRENGTH))
    np.testing.assert_allclose(np.asarray(mk.apply(x)), np.clip(reference + m, 0, 1), atol=1e-6)
    assert np.abs(np.asarray(mk.apply(x)) - reference).max() > 0.5 * STRENGTH / 255


# ---------------------------------------------------------------------------------------------
# 5. Errors.


def test_one_line_errors(marked, source, images, probes, tmp_path):
    owner = marked['workdir']
    for bad_owner in (source, ''):
        with pytest.raises(
            ValueError, match=r"is not a watermark job's workdir.*--config.owner="
        ) as e:
            verify(bad_owner, owner, tmp_path / 'v')
        assert _one_line(e)
    with pytest.raises(FileNotFoundError, match=r'no suspect .*--config.suspect=') as e:
        verify(owner, tmp_path / 'nowhere', tmp_path / 'v')
    assert _one_line(e)

    names = watermark_job.probe_names(len(probes))
    partial = tmp_path / 'partial'
    partial.mkdir()
    for name in names[:5]:
        inference.write_png(str(partial / f'{name}_x2.png'), np.zeros((48, 48, 3), np.uint8))
    with pytest.raises(
        ValueError, match=r'lacks 3 of the 8 probe outputs \(first: probe_005_x2'
    ) as e:
        verify(owner, partial, tmp_path / 'v')
    assert _one_line(e)
    wrong = tmp_path / 'wrong_size'
    wrong.mkdir()
    for name in names:
        inference.write_png(str(wrong / f'{name}_x2.png'), np.zeros((72, 72, 3), np.uint8))
    with pytest.raises(ValueError, match=r'probe_000_x2.png in .* is not 48x48') as e:
        verify(owner, wrong, tmp_path / 'v')
    assert _one_line(e)
    x3 = tiny_sr_workdir(tmp_path / 'x3', scale=3)
    with pytest.raises(ValueError, match=r"upscales x3; the owner's model is x2") as e:
        verify(owner, x3, tmp_path / 'v')
    assert _one_line(e)

    c = mark_config(owner, images)
    with pytest.raises(ValueError, match=r'is already watermarked; pass the clean model') as e:
        watermark_job.train_and_evaluate(c, str(tmp_path / 'twice'))
    assert _one_line(e)
    classifier = tmp_path / 'classifier'
    classifier.mkdir()
    (classifier / 'config.json').write_text(json.dumps({'trainer': 'classifier'}))
    c = mark_config(classifier, images)
    with pytest.raises(ValueError, match=r"is a classifier job's workdir, not an SR model") as e:
        watermark_job.train_and_evaluate(c, str(tmp_path / 'cls'))
    assert _one_line(e)
    c = mark_config(source, images)
    c.watermark.strength = -1.0
    with pytest.raises(ValueError, match=r'watermark.strength must be > 0 .*, or 0 to set it') as e:
        watermark_job.train_and_evaluate(c, str(tmp_path / 'negative'))
    assert _one_line(e)
    c = mark_config(source, images)
    c.watermark.strength, c.watermark.max_cost_db = 0.0, 0.0
    with pytest.raises(
        ValueError, match=r'watermark.max_cost_db must be > 0 .*watermark.strength is 0'
    ) as e:
        watermark_job.train_and_evaluate(c, str(tmp_path / 'no_budget'))
    assert _one_line(e)
    c = mark_config(source, images)
    c.checkpoint = ''
    with pytest.raises(FileNotFoundError, match=r'no model to mark; pass --config.checkpoint='):
        watermark_job.train_and_evaluate(c, str(tmp_path / 'none'))
    c = mark_config(source, images)
    c.probes.size = 64
    with pytest.raises(ValueError, match=r'no 64x64 LR tile fits .*lower probes.size') as e:
        watermark_job.train_and_evaluate(c, str(tmp_path / 'big'))
    assert _one_line(e)
    assert not (tmp_path / 'zero').exists() and not (tmp_path / 'none').exists()
