"""The SR service's input purifier (configs/purifier.py:sr_service) and the `input_purifier` SR
defence: it trains on fake devices from LR images only (no HR, no labels), an identity P leaves
the bare model exactly, and a missing checkpoint is a one-line error."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import RecordingWriter, tiny_sr_config

from configs import purifier as purifier_config
from sr_purify import checkpointing, models, purifiers, reporting, restore, sr_data, training
from sr_purify.evaluators import sr_defences, sr_robustness_attacks
from sr_purify.evaluators.sr import make_lr
from sr_purify.image_ops import Image
from sr_purify.jobs import purifier as purifier_job


def tiny_config(sr_workdir, **data):
    c = purifier_config.get_config('sr_service')
    c.purifier.nrp.update(num_blocks=1, features=8, growth=4, num_dense=1, dense_layers=2)
    c.sr_model.checkpoint = str(sr_workdir)
    c.perturb.steps = 2
    c.data.patch = 8
    c.data.eval_images = 4
    c.data.update(data)
    c.batch_size = 8
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 100
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    return c


@pytest.fixture(scope='module')
def sr_workdir(tmp_path_factory):
    """A tiny x2 SR model's workdir (config.json and one checkpoint; random weights suffice)."""
    workdir = tmp_path_factory.mktemp('sr')
    c = tiny_sr_config()
    module = models.build(models.flatten_config(c.model))
    params = module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))['params']
    reporting.write_config(str(workdir), c)
    checkpointing.export_params(str(workdir / 'checkpoints'), 1, params)
    return workdir


def lr_folder(path, n=4, size=12):
    from PIL import Image as PILImage

    path.mkdir()
    for i, im in enumerate(np.random.default_rng(0).integers(0, 256, (n, size, size, 3))):
        PILImage.fromarray(im.astype(np.uint8)).save(path / f'{i}.png')
    return path


def test_trains_two_steps_on_lr_images_only_and_exports(sr_workdir, tmp_path, monkeypatch):
    c = tiny_config(sr_workdir, source='folder', path=str(lr_folder(tmp_path / 'lr')))

    def no_hr(*args, **kwargs):
        raise AssertionError('the SR-service purifier asked the SR pipeline for HR images')

    for name in ('sr_train_batches', '_make_pair', 'eval_images', '_tfds_hr_patches'):
        monkeypatch.setattr(sr_data, name, no_hr)
    seen = {'batches': 0, 'traced': 0}
    real_fit = training.fit

    def checking_fit(config, workdir, *, batches, loss_fn, **kwargs):
        def lr_batches(start):
            for batch in batches(start):
                assert set(batch) == {'image'}, f'the purifier pipeline gave {sorted(batch)}'
                assert batch['image'].shape[1:] == (8, 8, 3)  # LR crops, not HR ones.
                seen['batches'] += 1
                yield batch

        def lr_loss(params, model_state, batch, rng, *frozen):
            assert 'hr' not in batch and set(batch) == {'image'}
            seen['traced'] += 1
            return loss_fn(params, model_state, batch, rng, *frozen)

        return real_fit(config, workdir, batches=lr_batches, loss_fn=lr_loss, **kwargs)

    monkeypatch.setattr(training, 'fit', checking_fit)
    writer = RecordingWriter()
    workdir = tmp_path / 'work'
    result = purifier_job.train_and_evaluate(c, str(workdir), writer=writer)
    assert result.step == 2 and seen['batches'] >= 2 and seen['traced'] >= 1
    losses = list(writer.losses().values())
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] > 0
    assert np.isfinite(writer.scalars[2]['loss/sr']) and writer.scalars[2]['loss/sr'] > 0
    # The SR attack on S moved S's output (no attack: PSNR 100 dB, the clamp).
    assert writer.scalars[1]['psnr/sr_attacked_vs_clean'] < 90
    summary = json.loads((workdir / 'results.json').read_text())['purifier']
    assert summary['hr_used'] is False and summary['labels_used'] is False
    assert summary['target'] == 'sr_service' and summary['steps'] == 2
    assert os.path.isdir(workdir / 'purifier') and (workdir / 'purifier_table.md').exists()
    # The export restores as a purifier from the workdir alone, and the defence takes it.
    p, params, _, step = purifiers.restore(str(workdir))
    assert p.kind == 'nrp' and step == 2
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))
    cfg = sr_defences.default_settings()
    cfg.input_purifier.checkpoint = str(workdir)
    assert sr_defences.build('input_purifier', cfg).settings['step'] == 2


def test_the_embedded_source_gives_the_photos_lr_and_never_their_hr(sr_workdir, monkeypatch):
    rng = np.random.default_rng(1)
    photos = {
        'train': [
            Image(f't{i}', rng.integers(0, 256, (40, 36, 3)).astype(np.uint8)) for i in (0, 1)
        ],
        'eval': [Image('e0', rng.integers(0, 256, (34, 40, 3)).astype(np.uint8))],
    }
    monkeypatch.setattr(sr_data, '_embedded', lambda split: photos[split])
    bank, held, _ = purifier_job.load_lr_images(tiny_config(sr_workdir), 2)
    assert len(bank) == 2
    for lr, hr in zip(bank, photos['train']):
        assert lr.shape == (hr.pixels.shape[0] // 2, hr.pixels.shape[1] // 2, 3)
        np.testing.assert_array_equal(lr, make_lr(hr.pixels, 2))
    assert held.shape == (4, 8, 8, 3)


def identity_purifier_workdir(path, sr_workdir):
    """A purifier workdir whose P is the NRP generator at its identity initialisation."""
    c = tiny_config(sr_workdir)
    path.mkdir()
    reporting.write_config(str(path), c)
    p = purifiers.build(c.purifier)
    params = p.init(jax.random.key(0))
    checkpointing.export_params(str(path / 'purifier'), 0, params)
    return path, p, params


def test_input_purifier_with_an_identity_p_equals_the_bare_model(sr_workdir, tmp_path):
    workdir, p, p_params = identity_purifier_workdir(tmp_path / 'p', sr_workdir)
    sr = restore.load(str(sr_workdir), 'sr')

    def fn(variables, x):
        return sr.module.apply(variables, x)

    cfg = sr_defences.default_settings()
    cfg.input_purifier.checkpoint = str(workdir)
    defence = sr_defences.build('input_purifier', cfg)
    assert not defence.random and defence.settings['kind'] == 'nrp'
    x = jax.random.uniform(jax.random.key(2), (2, 10, 12, 3))
    np.testing.assert_array_equal(defence(fn, sr.variables, x), fn(sr.variables, x))
    # The adaptive attacker's gradient runs through P (finite and non-zero).
    attacked = sr_defences.attack_fn(defence, fn, eot_draws=1)
    grad = jax.grad(lambda v: jnp.sum(attacked(sr.variables, v) ** 2))(x)
    assert np.all(np.isfinite(grad)) and float(jnp.abs(grad).max()) > 0
    # A P that is not the identity changes the output: the defence does run P.
    moved = jax.tree.map(lambda a: a + 0.05, p_params)
    changed = sr_defences.input_purifier(
        fn, sr.variables, x, purifier=p, purifier_params=moved
    ) - fn(sr.variables, x)
    assert float(jnp.abs(changed).max()) > 1e-3
    # A gray image (Set14 has two): replicated into the RGB P, channel mean out, then f.
    gray = x[..., :1]
    out = sr_defences.input_purifier(fn, sr.variables, gray, purifier=p, purifier_params=moved)
    purified = jnp.mean(p.purify(moved, jnp.repeat(gray, 3, axis=-1)), axis=-1, keepdims=True)
    np.testing.assert_array_equal(out, fn(sr.variables, purified))
    gray_fn = sr_robustness_attacks.image_fn(fn, 1)  # How the evaluation runs a gray image.
    assert defence(gray_fn, sr.variables, gray).shape == (2, 20, 24, 1)


def test_a_missing_checkpoint_is_a_one_line_error(sr_workdir, tmp_path):
    with pytest.raises(ValueError) as err:
        sr_defences.build('input_purifier')
    assert '\n' not in str(err.value)
    assert 'needs --config.defence.input_purifier.checkpoint=<' in str(err.value)
    cfg = sr_defences.default_settings()
    cfg.input_purifier.checkpoint = str(tmp_path / 'nowhere')
    with pytest.raises(FileNotFoundError, match='--config.defence.input_purifier.checkpoint'):
        sr_defences.build('input_purifier', cfg)
    with pytest.raises(ValueError, match=r"unknown SR defence 'nope'; valid: input_purifier, "):
        sr_defences.build('nope')
    c = tiny_config(sr_workdir)
    c.sr_model.checkpoint = ''
    with pytest.raises(ValueError, match=r'needs --config.sr_model.checkpoint=<'):
        purifier_job.train_and_evaluate(c, str(tmp_path / 'w'))


def test_the_training_perturbation_attacks_what_perturb_against_names(sr_workdir, tmp_path):
    """'defended' crafts d on S(P(.)) with P's current parameters (adversarial training of P);
    'model' on S alone. The two give different losses once P is not the identity."""
    _, p, p_params = identity_purifier_workdir(tmp_path / 'p', sr_workdir)
    leaves, tree = jax.tree.flatten(p_params)
    noise = jax.random.split(jax.random.key(5), len(leaves))
    moved = jax.tree.unflatten(
        tree, [a + 0.02 * jax.random.normal(k, a.shape) for a, k in zip(leaves, noise)]
    )
    sr = restore.load(str(sr_workdir), 'sr')

    def fn(variables, x):
        return sr.module.apply(variables, x)

    x = jax.random.uniform(jax.random.key(3), (2, 8, 8, 3))
    assert float(jnp.abs(p.purify(moved, x) - x).max()) > 1e-3  # P is not the identity.
    key = jax.random.key(4)
    target, variables = purifier_job._sr_attack_target(p, fn, 'defended')(sr.variables, moved, key)
    np.testing.assert_array_equal(target(variables, x), fn(sr.variables, p.purify(moved, x)))
    target, variables = purifier_job._sr_attack_target(p, fn, 'model')(sr.variables, moved, key)
    assert target is fn and variables is sr.variables

    losses = {}
    for against in purifier_job.SR_ATTACK_TARGETS:
        c = tiny_config(sr_workdir)
        c.perturb.against = against
        loss_fn = purifier_job.make_sr_service_loss_fn(p, fn, c)
        losses[against], _ = loss_fn(moved, {}, {'image': x}, key, sr.variables)
    assert np.isfinite(losses['model']) and losses['defended'] != losses['model']
    # The adaptive perturbation moves S(P(.)) further than one made on S alone.
    assert losses['defended'] > losses['model']

    c = tiny_config(sr_workdir)
    c.perturb.against = 'purifier'
    valid = r"unknown perturb.against 'purifier'; valid: defended, model"
    with pytest.raises(ValueError, match=valid):
        purifier_job.train_and_evaluate(c, str(tmp_path / 'w'))
