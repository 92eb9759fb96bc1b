"""The SR pipeline, the sharded training loop, checkpoints and the teacher job end to end."""

import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from conftest import REPO, RecordingWriter, tiny_sr_config

from sr_purify import checkpointing, models, sr_data, training
from sr_purify.jobs import teacher as teacher_job


def _batches(cfg, scale=2, start=0, n=2, process_index=0, process_count=1, seed=0):
    it = sr_data.sr_train_batches(
        cfg,
        scale=scale,
        global_batch=8,
        seed=seed,
        start_step=start,
        process_index=process_index,
        process_count=process_count,
    )
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize('scale', [2, 3, 4])
def test_pipeline_shapes_and_range(scale):
    cfg = tiny_sr_config().data
    (b,) = _batches(cfg, scale=scale, n=1)
    assert b['lr'].shape == (8, 8, 8, 3) and b['lr'].dtype == np.float32
    assert b['hr'].shape == (8, 8 * scale, 8 * scale, 3)
    for x in b.values():
        assert 0.0 <= x.min() and x.max() <= 1.0
    # LR is 8-bit quantised, as a saved LR image would be.
    np.testing.assert_allclose(b['lr'] * 255, np.round(b['lr'] * 255), atol=1e-4)


def test_pipeline_is_deterministic_resumable_and_split_across_processes():
    cfg = tiny_sr_config().data
    a, b = _batches(cfg, n=3), _batches(cfg, n=3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x['hr'], y['hr'])
    assert not np.array_equal(a[0]['hr'], _batches(cfg, n=1, seed=1)[0]['hr'])
    # Starting at step 2 gives exactly the third batch of an uninterrupted run.
    np.testing.assert_array_equal(_batches(cfg, start=2, n=1)[0]['hr'], a[2]['hr'])
    # Two processes each make half of every global batch; together they make the same batch.
    halves = [_batches(cfg, n=2, process_index=p, process_count=2) for p in (0, 1)]
    for step in range(2):
        joined = np.concatenate([halves[0][step]['hr'], halves[1][step]['hr']])
        np.testing.assert_array_equal(joined, a[step]['hr'])


def test_pipeline_rejects_bad_scale_and_small_images(tmp_path):
    cfg = tiny_sr_config().data
    with pytest.raises(ValueError, match=r'scale 5 not supported; valid: 2, 3, 4'):
        _batches(cfg, scale=5, n=1)
    from PIL import Image

    os.makedirs(tmp_path / 'imgs')
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / 'imgs' / 'tiny.png')
    cfg.source, cfg.path = 'folder', str(tmp_path / 'imgs')
    with pytest.raises(ValueError, match=r"\['tiny'\] are smaller than the HR crop of 16"):
        _batches(cfg, n=1)


def test_missing_folder_and_tfds_fail_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match='does not exist; pass an existing folder'):
        sr_data.eval_images(str(tmp_path / 'nope'))
    cfg = tiny_sr_config().data
    cfg.source, cfg.data_dir = 'tfds', str(tmp_path)
    with pytest.raises(FileNotFoundError, match='not prepared.*--config.data.download=True'):
        _batches(cfg, n=1)


def _train(cfg, workdir):
    writer = RecordingWriter()
    result = teacher_job.train_and_evaluate(cfg, str(workdir), writer=writer)
    return result, writer.losses()


def test_eight_devices_give_the_same_losses_as_one(tmp_path):
    assert jax.device_count() == 8
    one = tiny_sr_config()
    one.mesh = [('data', 1)]
    eight = tiny_sr_config()  # Default mesh: all 8 fake devices.
    _, losses_1 = _train(one, tmp_path / 'one')
    result, losses_8 = _train(eight, tmp_path / 'eight')
    assert sorted(losses_1) == [1, 2]
    np.testing.assert_allclose(
        [losses_8[s] for s in (1, 2)], [losses_1[s] for s in (1, 2)], rtol=2e-5
    )
    # The batch really was split: parameters live on all 8 devices, replicated.
    leaf = jax.tree.leaves(result.state.params)[0]
    assert len(leaf.sharding.device_set) == 8


def test_teacher_job_writes_results_and_resumes_with_the_same_next_loss(tmp_path):
    straight = tiny_sr_config()
    straight.total_steps = 4
    _, losses = _train(straight, tmp_path / 'straight')

    first = tiny_sr_config()
    first.total_steps = 2
    _train(first, tmp_path / 'resumed')
    results = json.load(open(tmp_path / 'resumed' / 'results.json'))
    embedded = results['sr']['embedded']['x2']
    assert set(embedded) == {'bicubic', 'teacher'}
    assert embedded['bicubic']['psnr'] == pytest.approx(32.92, abs=0.05)
    assert results['models']['teacher']['params'] > 0
    for name in ('config.json', 'sr_table.md', 'sr_grid.png'):
        assert (tmp_path / 'resumed' / name).exists(), name

    second = tiny_sr_config()
    second.total_steps = 4
    result, resumed = _train(second, tmp_path / 'resumed')
    assert result.step == 4 and sorted(resumed) == [3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [losses[3], losses[4]], rtol=1e-6)


def _corrupt_newest(ckpt_dir):
    """Flips bytes in every array-data file of the newest step."""
    newest = max(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
    files = [
        f
        for f in glob.glob(
            os.path.join(ckpt_dir, str(newest), 'state', '**', 'd', '*'), recursive=True
        )
        if os.path.isfile(f)
    ]
    assert files
    for f in files:
        raw = bytearray(open(f, 'rb').read())
        for i in range(len(raw) // 2, min(len(raw), len(raw) // 2 + 64)):
            raw[i] ^= 0xFF
        open(f, 'wb').write(bytes(raw))
    return newest


def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = tiny_sr_config()
    cfg.total_steps = 3
    _train(cfg, tmp_path)
    ckpt_dir = str(tmp_path / 'checkpoints')
    assert _corrupt_newest(ckpt_dir) == 3
    model = models.build(cfg.model)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
    )
    params, step = checkpointing.restore_params(str(tmp_path), abstract)
    assert step == 2
    # And a training run resumes from step 2, not from the damaged step 3.
    result, resumed = _train(cfg, tmp_path)
    assert sorted(resumed) == [3] and result.step == 3


def test_checkpoint_of_another_architecture_names_the_parameter(tmp_path):
    cfg = tiny_sr_config()
    _train(cfg, tmp_path)
    wider = tiny_sr_config()
    wider.model.features = 16
    model = models.build(wider.model)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 8, 8, 3), np.float32))['params']
    )
    with pytest.raises(checkpointing.CheckpointMismatchError) as info:
        checkpointing.restore_params(str(tmp_path), abstract)
    # The whole message: where, the first differing parameter, the saved and the built shape.
    checkpoint = os.path.join(str(tmp_path), 'checkpoints')
    assert str(info.value) == (
        f'checkpoint {checkpoint} step 2: parameter block_1/conv_0/bias has shape (8,), '
        'the config builds (16,)'
    )
    with pytest.raises(FileNotFoundError, match='no SR model checkpoint in .*pass the workdir'):
        checkpointing.restore_params(str(tmp_path / 'nothing'), abstract, 'SR model')


def test_non_finite_loss_stops_names_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    cfg = tiny_sr_config()
    cfg.total_steps = 5
    cfg.checkpoint_every = 1

    def batches(start_step):  # Finite for steps 1 and 2, NaN from step 3 on.
        for step in range(start_step + 1, cfg.total_steps + 1):
            yield {'x': np.full((8, 1), np.nan if step >= 3 else 1.0, np.float32)}

    def loss_fn(params, model_state, batch, rng):
        return jnp.mean(params['w'] * batch['x']) ** 2, (model_state, {})

    with pytest.raises(
        training.NonFiniteLossError,
        match=r'non-finite loss nan at step 3; stopping. The last good checkpoint '
        r'is step 2',
    ):
        training.fit(
            cfg,
            str(tmp_path),
            init_variables=lambda rng: ({'w': jnp.ones(())}, {}),
            loss_fn=loss_fn,
            batches=batches,
            writer=RecordingWriter(),
        )
    assert sorted(int(n) for n in os.listdir(tmp_path / 'checkpoints') if n.isdigit()) == [1, 2]


def test_unknown_names_give_one_line_errors_with_the_valid_choices():
    with pytest.raises(ValueError, match=r"unknown model 'edsrr'; valid: .*edsr"):
        models.build(ml_collections.ConfigDict({'name': 'edsrr'}))
    with pytest.raises(ValueError, match=r"has no field\(s\) \['blocks'\]; valid: .*num_blocks"):
        models.build(ml_collections.ConfigDict({'name': 'edsr', 'blocks': 3}))


def test_launch_rejects_an_unknown_config_key_in_one_line():
    proc = subprocess.run(
        [sys.executable, 'launch.py', '--config=configs/teacher.py', '--config.optim.lrr=1'],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: unknown config key 'optim.lrr'") and 'valid: b1, b2' in last


def test_launch_names_a_missing_checkpoint_path_before_loading_tensorflow():
    # A checkpoint path inside a list entry (the robustness job's purifiers) is found too.
    proc = subprocess.run(
        [
            sys.executable,
            '-X',
            'importtime',
            'launch.py',
            '--config=configs/evaluate.py:robustness',
            f'--config.classifier.checkpoint={REPO}',
            '--config.purifiers[3].checkpoint=no/such/dir',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    last = proc.stderr.strip().splitlines()[-1]
    assert last == (
        "error: config.purifiers[3].checkpoint='no/such/dir' does not exist; pass the "
        'workdir of a finished job (or its checkpoints/ folder): '
        '--config.purifiers[3].checkpoint=<path>'
    )
    imported = {
        line.split('|')[-1].strip()
        for line in proc.stderr.splitlines()
        if line.startswith('import time:')
    }
    assert 'tensorflow' not in imported  # The slow import (seconds): the check comes first.
