"""The self-supervised purifier, the purifier kinds and the robustness evaluation.

Generated images and tiny models only: the purifier job runs on a folder of generated PNGs, the
robustness numbers are checked against a hand-set linear classifier.
"""

import copy
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import RecordingWriter

from configs import classifier as classifier_config
from configs import evaluate as evaluate_config
from configs import purifier as purifier_config
from sr_purify import attacks, losses, purifiers, sharding, training
from sr_purify import classification_data as cdata
from sr_purify.evaluators import robustness, robustness_checks, robustness_report
from sr_purify.jobs import purifier as purifier_job


def tiny_purifier_cfg(kind: str) -> ml_collections.ConfigDict:
    cfg = purifier_config.purifier_config(kind)
    cfg.student.edsr.num_blocks = 1
    cfg.student.edsr.features = 8
    cfg.nrp = dict(num_blocks=1, features=8, growth=8, num_dense=1, dense_layers=2, res_scale=0.2)
    cfg.feature.random_cnn = dict(features=8, num_layers=2, num_downsample=1)
    return cfg


def smooth_images(rng, n, size):
    """Random smooth colour images: coarse noise resized up with bicubic (PIL), uint8."""
    from PIL import Image

    coarse = rng.integers(0, 256, (n, max(size // 6, 2), max(size // 6, 2), 3)).astype(np.uint8)
    return np.stack(
        [np.asarray(Image.fromarray(c).resize((size, size), Image.BICUBIC)) for c in coarse]
    )


# ---------------------------------------------------------------------------------------------
# The purifier job: no labels, loss falls, export restores.


def block_image_folder(folder):
    """Six 48x48 PNGs of piecewise-constant 4x4 blocks: sharp edges that bicubic resampling
    blurs and SR can restore, flat areas that a denoiser can smooth."""
    from PIL import Image

    folder.mkdir()
    blocks = np.random.default_rng(0).integers(0, 256, (6, 12, 12, 3)).astype(np.uint8)
    for i, im in enumerate(blocks.repeat(4, 1).repeat(4, 2)):
        Image.fromarray(im).save(folder / f'{i}.png')
    return folder


def _short_run(c, total_steps: int) -> None:
    """A few logged steps at a constant 3e-3, no checkpoint in between, a 2-row grid."""
    c.total_steps = total_steps
    c.log_every = 1
    c.checkpoint_every = 100
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.lr = 3e-3
    c.grid_samples = 2


def check_no_labels(monkeypatch):
    """Wraps training.fit so that every batch the job trains on, and every batch its loss is
    traced with, is asserted to hold images only; returns the counts seen."""
    seen = {'batches': 0, 'traced': 0}
    real_fit = training.fit

    def checking_fit(config, workdir, *, batches, loss_fn, **kwargs):
        def no_label_batches(start):
            for batch in batches(start):
                assert set(batch) == {'image'}, f'the purifier pipeline gave {sorted(batch)}'
                seen['batches'] += 1
                yield batch

        def no_label_loss(params, model_state, batch, rng, *frozen):
            assert 'label' not in batch and set(batch) == {'image'}
            seen['traced'] += 1
            return loss_fn(params, model_state, batch, rng, *frozen)

        return real_fit(config, workdir, batches=no_label_batches, loss_fn=no_label_loss, **kwargs)

    monkeypatch.setattr(training, 'fit', checking_fit)
    return seen


def test_purifier_trains_without_labels_and_loss_falls(tmp_path, monkeypatch):
    folder = block_image_folder(tmp_path / 'images')
    c = purifier_config.get_config()
    c.purifier = tiny_purifier_cfg('sr_resample')
    # Without the bicubic skip the random student starts far from the images, so 24 steps of a
    # tiny network show a clear fall (with it, it starts as exact bicubic resampling).
    c.purifier.student.edsr.bicubic_skip = False
    c.data.source = 'folder'
    c.data.path = str(folder)
    c.data.patch = 16
    c.data.eval_images = 8
    c.perturb.steps = 2
    c.batch_size = 8
    _short_run(c, total_steps=24)

    seen = check_no_labels(monkeypatch)
    writer = RecordingWriter()
    workdir = str(tmp_path / 'work')
    result = purifier_job.train_and_evaluate(c, workdir, writer=writer)
    assert result.step == 24 and seen['batches'] >= 24 and seen['traced'] >= 1

    losses = list(writer.losses().values())
    assert len(losses) == 24 and all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.9 * first, (first, last)

    with open(os.path.join(workdir, 'results.json')) as f:
        summary = json.load(f)['purifier']
    assert summary['labels_used'] is False and summary['kind'] == 'sr_resample'
    assert os.path.exists(os.path.join(workdir, 'purifier_grid.png'))
    # The export restores from the workdir alone (architecture from its config.json).
    p, params, cfg, step = purifiers.restore(workdir)
    assert p.kind == 'sr_resample' and step == 24
    for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(sharding.to_host(result.state.params))
    ):
        np.testing.assert_array_equal(a, b)


def test_purifier_job_refuses_untrainable_kind_and_bad_mix():
    c = purifier_config.get_config()
    c.purifier.kind = 'jpeg'
    with pytest.raises(
        ValueError,
        match=r"kind 'jpeg' has no parameters to train; valid: nrp, "
        r'sr_resample',
    ):
        purifier_job.check_config(c)
    c = purifier_config.get_config()
    c.perturb.pgd = 0.5
    with pytest.raises(ValueError, match='needs purifier.feature.kind=classifier'):
        purifier_job.check_config(c)
    assert purifier_job.mix_counts(
        ml_collections.ConfigDict(dict(ssp=0.5, pgd=0.25, noise=0.25)), 8
    ) == (4, 2, 2)


def test_victim_recipe_is_label_free_and_asks_for_the_victim():
    # configs/purifier.py:nrp,victim is the benchmark's recipe: half SSP on the victim's features,
    # half PGD on its own predictions; without the victim's workdir it names the flag to pass.
    c = purifier_config.get_config('nrp,victim')
    assert purifier_job.check_config(c) == {'pixel': 1.0, 'feature': 1.0, 'identity': 2.0}
    assert purifier_job.mix_counts(c.perturb, c.batch_size) == (16, 16, 0)
    assert (c.purifier.feature.kind, c.purifier.feature.layer) == ('classifier', 'stage_3')
    with pytest.raises(FileNotFoundError, match='--config.purifier.feature.checkpoint'):
        purifiers.build_feature(c.purifier.feature)


# ---------------------------------------------------------------------------------------------
# The denoiser of denoised smoothing (configs/purifier.py:denoiser): exact objectives, no labels.


def uniform_images(seed, shape=(4, 8, 8, 3)):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, shape), jnp.float32)


def gaussian_mse(denoise, x, key, sigma):
    return float(losses.denoiser_terms(denoise, x, key, sigma)['gaussian_mse'])


def stability(classify, params, denoise, x, key, sigma, targets):
    terms = losses.denoiser_terms(denoise, x, key, sigma, (classify, params), targets)
    return terms['stability']


def test_gaussian_mse_exact_values():
    x = uniform_images(0)
    key = jax.random.key(3)
    identity = lambda z: z
    assert gaussian_mse(identity, x, key, 0.0) == 0.0
    # By hand from the same key: n = sigma * normal(key, x.shape), not clipped.
    n = 0.25 * np.asarray(jax.random.normal(key, x.shape), np.float64)
    xs = np.asarray(x, np.float64)
    np.testing.assert_allclose(gaussian_mse(identity, x, key, 0.25), np.mean(n**2), rtol=1e-5)
    half = lambda z: 0.5 * z
    np.testing.assert_allclose(
        gaussian_mse(half, x, key, 0.25), np.mean((0.5 * (xs + n) - xs) ** 2), rtol=1e-5
    )
    assert float(jnp.max(losses.add_gaussian_noise(x, key, 0.25))) > 1.0  # Unclipped.
    # A 1-tuple is the single value; several values: one per example, uniformly.
    np.testing.assert_array_equal(
        losses.add_gaussian_noise(x, key, (0.25,)), losses.add_gaussian_noise(x, key, 0.25)
    )
    k_pick, k_noise = jax.random.split(key)
    pick = np.asarray(jax.random.randint(k_pick, (4,), 0, 2))
    std = np.asarray([0.0, 0.5])[pick][:, None, None, None]
    hand = xs + std * np.asarray(jax.random.normal(k_noise, x.shape))
    noisy = np.asarray(losses.add_gaussian_noise(x, key, (0.0, 0.5)))
    np.testing.assert_allclose(noisy, hand, atol=1e-6)
    clean = np.all(noisy == np.asarray(x), axis=(1, 2, 3))
    assert 0 < clean.sum() < 4 and np.array_equal(clean, pick == 0)
    for bad in (-0.1, (), (0.25, float('nan'))):
        with pytest.raises(ValueError, match='the noise sigma must be one or more finite'):
            losses.add_gaussian_noise(x, key, bad)


def test_stability_exact_values():
    x = uniform_images(2)
    key = jax.random.key(4)
    identity = lambda z: z
    # C with constant logits log(1), log(3): softmax (1/4, 3/4), argmax class 1.
    constant = lambda p, z: jnp.broadcast_to(p['b'], (z.shape[0], 2))
    cp = {'b': jnp.log(jnp.asarray([1.0, 3.0]))}
    ce = lambda targets: float(stability(constant, cp, identity, x, key, 0.25, targets))
    np.testing.assert_allclose(ce('hard'), -np.log(0.75), rtol=1e-6)
    np.testing.assert_allclose(ce('soft'), -(0.25 * np.log(0.25) + 0.75 * np.log(0.75)), rtol=1e-6)
    # A linear C on the noisy images against its own prediction on the clean ones, by hand.
    w = np.random.default_rng(5).normal(0, 0.1, (8 * 8 * 3, 3))
    linear = lambda p, z: z.reshape(z.shape[0], -1) @ p['w']
    lp = {'w': jnp.asarray(w, jnp.float32)}
    xs = np.asarray(x, np.float64).reshape(4, -1)
    n = 0.25 * np.asarray(jax.random.normal(key, x.shape), np.float64).reshape(4, -1)

    def hand_ce(logits, targets):
        log_p = logits - logits.max(-1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
        return np.mean(-np.sum(targets * log_p, -1))

    clean_logits = xs @ w
    hard = np.eye(3)[clean_logits.argmax(-1)]
    soft = np.exp(clean_logits) / np.exp(clean_logits).sum(-1, keepdims=True)
    for targets, t in (('hard', hard), ('soft', soft)):
        for sigma, noise in ((0.0, 0.0), (0.25, n)):
            np.testing.assert_allclose(
                float(stability(linear, lp, identity, x, key, sigma, targets)),
                hand_ce((xs + noise) @ w, t),
                rtol=1e-5,
                err_msg=f'{targets} sigma {sigma}',
            )
    # clip=True: C sees D's output clipped to [0, 1].
    clipped = losses.denoiser_terms(identity, x, key, 0.25, (linear, lp), 'hard', clip=True)
    np.testing.assert_allclose(
        float(clipped['stability']), hand_ce(np.clip(xs + n, 0, 1) @ w, hard), rtol=1e-5
    )
    with pytest.raises(ValueError, match=r"^unknown stability target 'argmax'; valid: hard, soft$"):
        stability(linear, lp, identity, x, key, 0.25, 'argmax')


def tiny_denoiser_config(arg='denoiser,stability', kind='nrp') -> ml_collections.ConfigDict:
    c = purifier_config.get_config(arg + (',sr_resample' if kind == 'sr_resample' else ''))
    tiny = tiny_purifier_cfg(kind)
    c.purifier.nrp, c.purifier.student = tiny.nrp, tiny.student
    c.classifier.checkpoint = 'unused'  # The tests hand the classifier to the loss directly.
    c.batch_size = 8
    return c


def linear_classifier_16(seed=6, classes=3):
    w = np.random.default_rng(seed).normal(0, 0.05, (16 * 16 * 3, classes)).astype(np.float32)
    return (lambda v, z: z.reshape(z.shape[0], -1) @ v['w']), {'w': jnp.asarray(w)}


def test_denoiser_loss_value_and_gradients_reach_d_not_c():
    classify, cv = linear_classifier_16()
    batch = {'image': uniform_images(7, (8, 16, 16, 3))}
    rng = jax.random.key(8)
    # Any trainable kind is a denoiser: the loss builds for each (traced only; each kind's
    # forward and backward are test_each_kind_runs_forward_and_backward's).
    for kind in sorted(purifiers.TRAINABLE - {'nrp'}):
        c = tiny_denoiser_config(kind=kind)
        p = purifiers.build(c.purifier)
        loss_fn = purifier_job.make_denoiser_loss_fn(p, classify, c)
        total, _ = jax.eval_shape(loss_fn, p.abstract_params(), {}, batch, rng, cv)
        assert total.shape == () and total.dtype == jnp.float32
    c = tiny_denoiser_config(kind='nrp')
    p = purifiers.build(c.purifier)
    params = p.init(jax.random.key(0))
    loss_fn = purifier_job.make_denoiser_loss_fn(p, classify, c)
    (total, (_, metrics)), (g_d, g_c) = jax.jit(
        jax.value_and_grad(lambda q, v: loss_fn(q, {}, batch, rng, v), argnums=(0, 1), has_aux=True)
    )(params, cv)
    mse, stab = float(metrics['loss/gaussian_mse']), float(metrics['loss/stability'])
    np.testing.assert_allclose(float(total), mse + stab, rtol=1e-6)
    # The NRP generator starts as the identity: the MSE is the noise's, and the stability CE is
    # the classifier's on the noisy images (clipped to [0, 1], as purify gives them), by hand.
    k_noise, _ = jax.random.split(rng)
    x = np.asarray(batch['image'], np.float64)
    n = 0.25 * np.asarray(jax.random.normal(k_noise, x.shape), np.float64)
    np.testing.assert_allclose(mse, np.mean(n**2), rtol=1e-4)
    w = np.asarray(cv['w'], np.float64)
    logits = np.clip(x + n, 0, 1).reshape(8, -1) @ w
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    pseudo = (x.reshape(8, -1) @ w).argmax(-1)
    np.testing.assert_allclose(stab, -np.mean(log_p[np.arange(8), pseudo]), rtol=1e-4)
    # Gradients reach D (through C) but not C.
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g_d))
    assert float(jnp.abs(g_d['tail_1']['kernel']).sum()) > 0
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree.leaves(g_c))


@pytest.mark.parametrize('targets', sorted(losses.STABILITY_TARGETS))
def test_stability_gradient_reaches_d_through_c_but_not_c(targets):
    x = uniform_images(9, (4, 16, 16, 3))
    classify, cv = linear_classifier_16()
    key = jax.random.key(1)

    def objective(a, v):  # D(z) = a * z: one denoiser parameter.
        return stability(classify, v, lambda z: a * z, x, key, 0.25, targets)

    g_d, g_c = jax.grad(objective, argnums=(0, 1))(jnp.float32(0.9), cv)
    assert np.isfinite(float(g_d)) and float(g_d) != 0.0  # Through C into D.
    assert float(jnp.abs(g_c['w']).max()) == 0.0  # C's parameters are frozen.
    # Without the freeze the same cross-entropy would move C: the zero above is the freeze's.
    noisy = 0.9 * losses.add_gaussian_noise(x, key, 0.25)
    target = losses.STABILITY_TARGETS[targets](classify(cv, x))
    g_free = jax.grad(lambda v: losses.cross_entropy(classify(v, noisy), target))(cv)
    assert float(jnp.abs(g_free['w']).max()) > 0


def test_denoiser_configs_and_their_errors():
    c = purifier_config.get_config('denoiser')
    assert purifier_job.check_denoiser_config(c) == {'gaussian_mse': 1.0}
    assert c.purifier.kind == 'nrp' and tuple(c.denoise.sigma) == (0.25,)
    assert 'perturb' not in c and 'feature' not in c.purifier
    assert tuple(purifier_config.get_config('denoiser,sigma=0.5').denoise.sigma) == (0.5,)
    assert purifier_config.get_config('denoiser,sr_resample').purifier.kind == 'sr_resample'
    c = purifier_config.get_config('denoiser,stability')
    with pytest.raises(ValueError, match='stability loss needs --config.classifier.checkpoint='):
        purifier_job.check_denoiser_config(c)
    c.classifier.checkpoint = 'workdirs/classifier'
    assert purifier_job.check_denoiser_config(c) == {'gaussian_mse': 1.0, 'stability': 1.0}
    c.loss = ml_collections.ConfigDict(dict(gaussian_mse=1.0, mse=1.0))
    with pytest.raises(
        ValueError, match=r"^unknown denoiser loss 'mse'; valid: gaussian_mse, stability$"
    ):
        purifier_job.check_denoiser_config(c)
    c = purifier_config.get_config('denoiser')
    c.denoise.sigma = (0.25, 0.0)
    with pytest.raises(ValueError, match='denoise.sigma must be > 0'):
        purifier_job.check_denoiser_config(c)
    c = purifier_config.get_config()  # SSP training: the denoiser's losses say where they are.
    c.loss.gaussian_mse = 1.0
    with pytest.raises(ValueError, match=r"'gaussian_mse'; valid: .*configs/purifier.py:denoiser"):
        purifier_job.check_config(c)
    with pytest.raises(ValueError, match='need denoiser: :denoiser,stability'):
        purifier_config.get_config('stability')
    with pytest.raises(ValueError, match='denoiser and victim do not combine'):
        purifier_config.get_config('denoiser,victim')


def test_denoiser_job_trains_without_labels_on_8_devices_and_restores(tmp_path, monkeypatch):
    from sr_purify import checkpointing, models, reporting, restore

    assert jax.device_count() == 8
    # C: a random tiny small_cnn classifier's workdir (config.json and one checkpoint).
    cdir = tmp_path / 'classifier'
    cdir.mkdir()
    cc = classifier_config.get_config('small_cnn')
    cc.model = classifier_config.small_cnn(num_classes=3)
    cc.model.features = 4
    shapes = jax.eval_shape(
        models.build(cc.model).init, jax.random.key(0), jnp.zeros((1, 16, 16, 3))
    )
    rng = np.random.default_rng(0)  # numpy draws: no eager JAX init to compile.
    cparams = jax.tree.map(
        lambda a: rng.normal(0, 0.3, a.shape).astype(np.float32), shapes['params']
    )
    reporting.write_config(str(cdir), cc)
    checkpointing.export_params(str(cdir / 'checkpoints'), 1, cparams)

    c = tiny_denoiser_config()
    c.classifier.checkpoint = str(cdir)
    c.loss.stability = 0.1
    c.data.source = 'folder'
    c.data.path = str(block_image_folder(tmp_path / 'images'))
    c.data.patch = 16
    c.data.eval_images = 8
    _short_run(c, total_steps=12)
    seen = check_no_labels(monkeypatch)
    writer = RecordingWriter()
    workdir = str(tmp_path / 'work')
    result = purifier_job.train_and_evaluate(c, workdir, writer=writer)
    assert result.step == 12 and seen['batches'] >= 12 and seen['traced'] >= 1

    steps = sorted(s for s, v in writer.scalars.items() if 'loss/gaussian_mse' in v)
    mse = [writer.scalars[s]['loss/gaussian_mse'] for s in steps]
    total = list(writer.losses().values())
    assert len(mse) == 12 and len(total) == 12 and all(np.isfinite(total))
    assert np.mean(mse[-3:]) < 0.85 * np.mean(mse[:3]), mse
    assert np.mean(total[-3:]) < np.mean(total[:3]), total
    # C is frozen outside the state: the state holds D's parameters only.
    d_shapes = purifiers.build(c.purifier).abstract_params()
    assert jax.tree.structure(result.state.params) == jax.tree.structure(d_shapes)

    with open(os.path.join(workdir, 'results.json')) as f:
        summary = json.load(f)['purifier']
    assert summary['labels_used'] is False and summary['objective'] == 'denoiser'
    assert summary['sigma'] == [0.25] and summary['loss'] == {'gaussian_mse': 1.0, 'stability': 0.1}
    start, trained = summary['start'], summary['trained']
    assert trained['sigma_0.25/psnr_denoised'] > start['sigma_0.25/psnr_denoised'] + 0.5
    assert {'sigma_0.25/agree_denoised', 'agree_clean_through_d'} <= set(trained)
    assert os.path.exists(os.path.join(workdir, 'purifier_grid.png'))
    # The workdir restores like any purifier's, ready to go in front of C.
    d, params, cfg, step = purifiers.restore(workdir)
    assert d.kind == 'nrp' and step == 12 and not d.random
    assert restore.load(workdir, 'purifier').kind == 'purifier'
    for a, b in zip(
        jax.tree.leaves(params), jax.tree.leaves(sharding.to_host(result.state.params))
    ):
        np.testing.assert_array_equal(a, b)


def test_init_checkpoint_starts_from_a_trained_denoiser_of_the_same_architecture(tmp_path):
    from sr_purify import checkpointing, reporting

    # A finished MSE denoiser's workdir (config.json and its exported parameters).
    mse = tiny_denoiser_config('denoiser')
    shapes = purifiers.build(mse.purifier).abstract_params()
    rng = np.random.default_rng(3)
    trained = jax.tree.map(lambda a: rng.normal(0, 0.1, a.shape).astype(np.float32), shapes)
    workdir = tmp_path / 'mse'
    workdir.mkdir()
    reporting.write_config(str(workdir), mse)
    checkpointing.export_params(str(workdir / 'checkpoints'), 7, trained)

    c = tiny_denoiser_config('denoiser,stability')
    c.purifier.init_checkpoint = str(workdir)
    start = purifiers.initial_params(purifiers.build(c.purifier), c.purifier, jax.random.key(1))
    for a, b in zip(jax.tree.leaves(start), jax.tree.leaves(trained)):
        np.testing.assert_array_equal(a, b)
    # Without it: a seeded random start, not the saved one.
    c.purifier.init_checkpoint = ''
    fresh = purifiers.initial_params(purifiers.build(c.purifier), c.purifier, jax.random.key(1))
    assert not all(
        np.array_equal(a, b) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(trained))
    )
    # Another architecture is refused in one line that names the flag.
    c.purifier.init_checkpoint = str(workdir)
    c.purifier.nrp.features = 12
    with pytest.raises(ValueError, match=r'^--config.purifier.init_checkpoint=.* do not fit') as e:
        purifiers.initial_params(purifiers.build(c.purifier), c.purifier, jax.random.key(1))
    assert '\n' not in str(e.value) and "'features': 8" in str(e.value)


# ---------------------------------------------------------------------------------------------
# Every kind: forward and backward.


@pytest.mark.parametrize('kind', purifiers.KINDS)
def test_each_kind_runs_forward_and_backward(kind):
    cfg = tiny_purifier_cfg(kind)
    p = purifiers.build(cfg)
    params = p.init(jax.random.key(0))
    x = jnp.asarray(smooth_images(np.random.default_rng(1), 2, 16), jnp.float32) / 255.0
    w = jnp.asarray(np.random.default_rng(2).normal(size=x.shape), jnp.float32)

    y = jax.jit(p.purify)(params, x)
    assert y.shape == x.shape and float(y.min()) >= 0.0 and float(y.max()) <= 1.0
    gx = jax.jit(jax.grad(lambda x_: jnp.sum(w * p.purify(params, x_))))(x)
    assert bool(jnp.all(jnp.isfinite(gx))) and float(jnp.abs(gx).sum()) > 0
    assert p.differentiable == (kind != 'jpeg')
    # Input noise makes any kind random: it needs a key, and the key alone decides the output.
    cfg.input_noise = 0.05
    noisy = purifiers.build(cfg)
    assert noisy.random is True
    with pytest.raises(ValueError, match=f"purifier '{kind}' with input_noise=0.05 is random"):
        noisy.purify(params, x)
    purify = jax.jit(noisy.purify)
    a, again, b = (purify(params, x, jax.random.key(k)) for k in (0, 0, 1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(again))
    assert float(jnp.abs(a - b).max()) > 1e-3
    if kind in ('none', 'jpeg'):
        # Identity, and BPDA's identity backward for JPEG: the gradient is w itself.
        np.testing.assert_allclose(np.asarray(gx), np.asarray(w), rtol=0, atol=0)
    if kind == 'jpeg':
        assert float(jnp.abs(y - x).max()) > 1 / 255  # It really compresses.
        np.testing.assert_allclose(
            np.asarray(y), purifiers._jpeg_host(np.asarray(x), 75), atol=1e-6
        )
    if p.trainable:
        gp = jax.grad(lambda q: jnp.sum(w * p.raw(q, x)))(params)
        assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(gp))
        assert sum(float(jnp.abs(g).sum()) for g in jax.tree.leaves(gp)) > 0


def test_jpeg_on_a_sharded_batch_and_random_purifier_needs_a_key():
    mesh = sharding.make_mesh()
    p = purifiers.build(tiny_purifier_cfg('jpeg'), mesh)
    x = np.asarray(smooth_images(np.random.default_rng(3), 8, 16), np.float32) / 255.0
    xs = jax.device_put(x, sharding.data_sharding(mesh))
    y = jax.jit(p.purify)({}, xs)
    np.testing.assert_allclose(np.asarray(y), purifiers._jpeg_host(x, 75), atol=1e-6)

    cfg = tiny_purifier_cfg('bicubic_resample')
    cfg.input_noise = 0.05
    noisy = purifiers.build(cfg)
    assert noisy.random
    with pytest.raises(ValueError, match='needs a PRNG key'):
        noisy.purify({}, x)
    a, b = (noisy.purify({}, x, jax.random.key(k)) for k in (0, 1))
    assert float(jnp.abs(a - b).max()) > 0
    with pytest.raises(
        ValueError,
        match=r"unknown purifier kind 'median'; valid: "
        r'bicubic_resample, jpeg, none, nrp, sr_resample',
    ):
        purifiers.build(tiny_purifier_cfg('median'))


# ---------------------------------------------------------------------------------------------
# Sanity checks catch planted violations.


def passing_results():
    n = 100
    attacks_meta = [
        dict(label=f'pgd linf {k}/255 x10', name='pgd', norm='linf', eps=k / 255, steps=10)
        for k in (4, 8)
    ]
    labels = [a['label'] for a in attacks_meta]
    row = lambda clean, obl, ad, tr: {
        'clean': clean,
        'reference': {'clean': clean, 'mismatches': 0, 'near_ties': 0},
        'gradient': {'norm': 1.5, 'finite': True, 'via': 'exact'},
        'eps0': {
            'examples': 50,
            'clean': 0.86,
            'near_ties': 0,
            'oblivious': 0.86,
            'adaptive': 0.86,
            'transfer': 0.86,
            'mismatches': {'oblivious': 0, 'adaptive': 0, 'transfer': 0},
        },
        'oblivious': dict(zip(labels, obl)),
        'adaptive': dict(zip(labels, ad)),
        'transfer': dict(zip(labels, tr)),
    }
    return {
        'examples': n,
        'clean': 0.9,
        'attacks': attacks_meta,
        'purifiers': {
            'none': row(0.9, (0.2, 0.0), (0.2, 0.0), (0.7, 0.5)),
            'sr': row(0.85, (0.7, 0.6), (0.3, 0.1), (0.8, 0.7)),
        },
    }


@pytest.mark.parametrize(
    'check,plant',
    [
        ('eps0', lambda r: r['purifiers']['sr']['eps0'].update({'adaptive': 0.5})),
        # Same accuracy, but two samples swapped: only the per-sample comparison sees it.
        ('eps0', lambda r: r['purifiers']['sr']['eps0']['mismatches'].update({'oblivious': 2})),
        ('eps0', lambda r: r['purifiers']['sr']['reference'].update({'mismatches': 1})),
        ('eps0', lambda r: r['purifiers']['sr']['reference'].update({'clean': 0.8})),
        (
            'monotone',
            lambda r: r['purifiers']['sr']['oblivious'].update({'pgd linf 8/255 x10': 0.75}),
        ),
        (
            'adaptive_vs_oblivious',
            lambda r: r['purifiers']['sr']['adaptive'].update({'pgd linf 4/255 x10': 0.72}),
        ),
        (
            'adaptive_vs_transfer',
            lambda r: r['purifiers']['sr']['transfer'].update({'pgd linf 8/255 x10': 0.05}),
        ),
        ('gradient', lambda r: r['purifiers']['sr']['gradient'].update({'norm': 0.0})),
        ('gradient', lambda r: r['purifiers']['sr']['gradient'].update({'finite': False})),
    ],
)
def test_sanity_checks_catch_planted_violations(check, plant):
    good = robustness.sanity_checks(passing_results())
    assert good['passed'] and not good['failures'], good['failures']
    kinds = {c['check'] for c in good['checks']}
    assert kinds == {
        'eps0',
        'monotone',
        'adaptive_vs_oblivious',
        'adaptive_vs_transfer',
        'gradient',
    }
    results = copy.deepcopy(passing_results())
    plant(results)
    bad = robustness.sanity_checks(results)
    assert not bad['passed']
    assert {c['check'] for c in bad['checks'] if not c['ok']} == {check}
    lines = robustness_checks.sanity_lines(bad)
    assert any(line.startswith('SANITY FAILED:') for line in lines)


def test_sanity_tolerates_one_sample():
    results = passing_results()
    # One sample (1 %) more at a larger eps is within tolerance; two are not.
    results['purifiers']['sr']['oblivious']['pgd linf 8/255 x10'] = 0.71
    assert robustness.sanity_checks(results)['passed']
    results['purifiers']['sr']['oblivious']['pgd linf 8/255 x10'] = 0.72
    assert not robustness.sanity_checks(results)['passed']


def test_eps0_tolerates_near_ties_only():
    """A near-tie of the reference may round either way in another compiled program: it may move
    the eps = 0 accuracy by one sample, but a counted mismatch always fails."""
    results = passing_results()
    zero = results['purifiers']['sr']['eps0']
    zero.update(adaptive=0.88)  # One sample of 50 more than the reference ...
    assert not robustness.sanity_checks(results)['passed']
    zero.update(near_ties=1)  # ... allowed where the reference had one near-tie.
    assert robustness.sanity_checks(results)['passed']
    zero['mismatches']['adaptive'] = 1
    assert not robustness.sanity_checks(results)['passed']


# ---------------------------------------------------------------------------------------------
# The table against a hand computation on a fixed linear classifier.

SIDE = 8
DIM = SIDE * SIDE * 3


def linear_classifier(seed, structure=0.05):
    """Two classes, hand-set weights: class 1 likes the top half bright (`structure`), plus a
    fixed +-0.02 pattern from `seed`."""
    rng = np.random.default_rng(seed)
    w = np.zeros((SIDE, SIDE, 3, 2), np.float32)
    w[: SIDE // 2, :, :, 1] = structure
    w[SIDE // 2 :, :, :, 0] = structure
    w += rng.choice([-0.02, 0.02], size=w.shape).astype(np.float32)
    params = {'w': jnp.asarray(w.reshape(DIM, 2)), 'b': jnp.zeros((2,), jnp.float32)}
    fn = lambda p, x: x.reshape(x.shape[0], -1) @ p['w'] + p['b']
    return fn, params


def test_table_matches_hand_computation(tmp_path, capsys):
    rng = np.random.default_rng(7)
    n = 12  # With batches of 8: a full batch and a padded one.
    images = rng.integers(60, 196, (n, SIDE, SIDE, 3)).astype(np.uint8)
    labels = rng.integers(0, 2, n).astype(np.int32)
    # Make most labels agree with the classifier so the accuracies are not trivial.
    fn, params = linear_classifier(0)
    t_fn, t_params = linear_classifier(1, structure=0.01)  # The transfer source differs.
    x = jnp.asarray(images, jnp.float32) / 255.0
    pred = np.asarray(jnp.argmax(fn(params, x), -1))
    labels[:9] = pred[:9]
    split = cdata.Split(images, labels, ('a', 'b'), 'generated')

    config = evaluate_config.robustness_config()
    eps = 2 / 255
    # Two attacks share the L-inf 2/255 threat model, one is L2 0.2: the worst case is per threat
    # model, never across the two.
    listed = [
        attacks.attack_config(name='pgd', eps=eps, steps=3, step_size=1 / 255, random_start=False),
        attacks.attack_config(name='fgsm', eps=eps),
        attacks.attack_config(name='fgsm', norm='l2', eps=0.2),
    ]
    config.attacks = listed
    # The adaptive attacker adds a one-step PGD of step eps at each threat model (the default
    # APGD ensemble is slow to compile and its DLR needs 3 classes; test_evaluation runs it).
    member = dict(name='pgd', steps=1, step_size=None, random_start=False)
    config.adaptive.attacks = [attacks.attack_config(**member)]
    config.sanity_batches = 0  # The eps = 0 sanity attack on every batch.
    config.batch_size = 8
    config.grid_samples = 2
    rows = [
        robustness.Row(kind, purifiers.build(tiny_purifier_cfg(kind)), {}, 'test')
        for kind in ('none', 'bicubic_resample')
    ]
    mesh = sharding.make_mesh()
    results, samples = robustness.evaluate(
        config, fn, params, rows, split, mesh, transfer=(t_fn, t_params)
    )

    # By hand: the same attack functions, called directly on all 12 images at once.
    y = jnp.asarray(labels)
    acc = lambda f, p, xs: float(jnp.mean(jnp.argmax(f(p, xs), -1) == y))
    key = jax.random.key(0)  # Unused: no random start.
    jitted = lambda c: jax.jit(attacks.make_attack(c), static_argnums=0)
    made = [jitted(c) for c in listed]
    at_threat = [jitted(attacks.attack_config(norm=c.norm, eps=c.eps, **member)) for c in listed]
    x_obl = [a(fn, params, x, key, y) for a in made]
    x_tr = [a(t_fn, t_params, x, key, y) for a in made]
    hand = {'clean': acc(fn, params, x)}
    worst_hand = {}
    for row in rows:
        purify = lambda xs, pp=row.purifier: pp.purify({}, xs)
        composed = lambda p, xs, pp=row.purifier: fn(p, pp.purify({}, xs))
        ok = lambda xs, purify=purify: np.asarray(jnp.argmax(fn(params, purify(xs)), -1) == y)
        clean_p = ok(x)
        obl = [ok(xa) for xa in x_obl]
        tr = [ok(xa) for xa in x_tr]
        # Adaptive: the listed attack and the member at its norm and eps; robust only to both.
        ad = [
            ok(a(composed, params, x, key, y)) & ok(b(composed, params, x, key, y))
            for a, b in zip(made, at_threat)
        ]
        hand[row.label] = [hand['clean'], clean_p.mean()]
        for k in range(3):
            hand[row.label] += [obl[k].mean(), ad[k].mean(), tr[k].mean()]
        worst_hand[row.label] = []
        for group in ((0, 1), (2,)):  # linf 2/255: pgd and fgsm; l2 0.2: fgm.
            for per in (obl, ad, tr):
                worst_hand[row.label].append(
                    np.logical_and.reduce([clean_p] + [per[k] for k in group]).mean()
                )

    header, table_rows = robustness_report.table(results, percent=False)
    assert header == [
        'purifier',
        'clean',
        'clean+P',
        'pgd linf 2/255 x3 obl',
        'adapt',
        'transfer',
        'fgsm linf 2/255 obl',
        'adapt',
        'transfer',
        'fgsm l2 0.2 obl',
        'adapt',
        'transfer',
    ]
    for row in table_rows:
        np.testing.assert_allclose(row[1:], hand[row[0]], atol=1e-9, err_msg=row[0])
    header, worst_rows = robustness_report.worst_table(results, percent=False)
    assert header == [
        'purifier',
        'worst linf 2/255 obl',
        'adapt',
        'transfer',
        'worst l2 0.2 obl',
        'adapt',
        'transfer',
    ]
    for row in worst_rows:
        np.testing.assert_allclose(row[1:], worst_hand[row[0]], atol=1e-9, err_msg=row[0])
    assert [t['attacks'] for t in results['threat_models']] == [
        ['pgd linf 2/255 x3', 'fgsm linf 2/255'],
        ['fgsm l2 0.2'],
    ]
    assert results['attacks'][2]['adaptive'] == ['fgsm l2 0.2', 'pgd l2 0.2 x1']
    assert results['examples'] == n
    # The attack is strong enough to matter, and 'none' is attacked identically both ways by
    # the listed attack (the adaptive attacker adds another, so it can only be stronger).
    none = results['purifiers']['none']
    assert hand['none'][2] < hand['none'][1]
    assert none['adaptive_members']['pgd linf 2/255 x3']['pgd linf 2/255 x3'] == hand['none'][2]
    assert hand['none'][3] <= hand['none'][2]
    for r in results['purifiers'].values():
        assert r['reference'] == {'clean': r['clean'], 'mismatches': 0, 'near_ties': 0}
    assert results['sanity']['passed'], results['sanity']['failures']

    writer = RecordingWriter()
    md = robustness_report.report(
        str(tmp_path),
        dict(results, transfer_note='test'),
        samples,
        rows,
        config,
        title='toy',
        writer=writer,
    )
    out = capsys.readouterr().out
    assert 'sanity ok: eps = 0 and clean+P match an independent forward pass' in out
    assert 'SANITY FAILED' not in out
    # The adaptive budget is printed right under the table, and it says it is reduced.
    budget = (
        "Adaptive attacker budget: at each attack's norm and eps, the listed attack + "
        'pgd x1 (1 restart), per-sample worst case'
    )
    assert budget in out and budget in md
    assert out.index(budget) < out.index('Worst case per threat model')
    assert 'No APGD: weaker than AutoAttack.' in out
    for name in (
        'robustness_table.md',
        'results.json',
        'robustness_plot.png',
        'robustness_grid.png',
    ):
        assert os.path.exists(tmp_path / name), name
    with open(tmp_path / 'results.json') as f:
        saved = json.load(f)['robustness']
    assert saved['purifiers']['none']['oblivious'] == results['purifiers']['none']['oblivious']
    assert saved['purifiers']['none']['worst_case'] == none['worst_case']
    assert set(none['worst_case']['adaptive']) == {'linf 2/255', 'l2 0.2'}
    scalars = writer.scalars[0]
    assert (
        scalars['robustness/none/worst_adaptive/linf_2_255']
        == none['worst_case']['adaptive']['linf 2/255']
    )
    assert '| none |' in md
