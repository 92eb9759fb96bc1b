"""Distillation losses on hand-made features, the student job end to end, the private teacher."""

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

from configs import evaluate as evaluate_config
from configs import student as student_config
from sr_purify import checkpointing, distillation, models, restore
from sr_purify.jobs import student as student_job

PAIRS = (('block_1', 'block_2'), ('body', 'body'))


def _distill(**losses) -> ml_collections.ConfigDict:
    c = student_config.get_config().distill
    for name in distillation.LOSSES:
        c.losses[name] = float(losses.get(name, 0.0))
    c.feature_pairs = PAIRS
    return c


def _f(values) -> jax.Array:
    return jnp.asarray(values, jnp.float32)


# --- each loss on hand-made features ----------------------------------------------------------


def test_pixel_and_output_losses_by_hand():
    sr = _f([[[[1.0], [2.0]], [[3.0], [4.0]]]])  # 1x2x2x1
    assert float(distillation.pixel_loss(sr, jnp.zeros_like(sr))) == pytest.approx(2.5)
    teacher = _f([[[[1.0], [1.0]], [[1.0], [1.0]]]])
    assert float(distillation.output_loss(sr, teacher)) == pytest.approx((0 + 1 + 2 + 3) / 4)
    assert float(distillation.output_loss(sr, sr)) == 0.0


def test_feature_loss_by_hand_and_zero_with_identity_adapter():
    fs = _f([[[[1.0], [0.0]], [[0.0], [1.0]]]])  # student: 1 channel
    ft = jnp.zeros((1, 2, 2, 2))  # teacher: 2 channels
    adapter = {'kernel': _f([[[[2.0, -1.0]]]]), 'bias': _f([0.5, 0.0])}
    # adapt(fs) = (2 fs + 0.5, -fs): |.| = 2.5, 0.5, 0.5, 2.5 and 1, 0, 0, 1 -> 8 / 8 entries.
    assert float(distillation.feature_loss(fs, ft, adapter, 'l1')) == pytest.approx(1.0)
    # Squares: 6.25 + 0.25 + 0.25 + 6.25 + 1 + 0 + 0 + 1 = 15 over 8 entries.
    assert float(distillation.feature_loss(fs, ft, adapter, 'l2')) == pytest.approx(15 / 8)
    f = jnp.asarray(np.random.default_rng(0).normal(size=(2, 3, 3, 4)), jnp.float32)
    identity = {'kernel': jnp.eye(4)[None, None], 'bias': jnp.zeros(4)}
    assert float(distillation.feature_loss(f, f, identity)) == 0.0
    # Adapters from init_adapters have the flax Conv 1x1 layout, C_s -> C_t.
    adapters = distillation.init_adapters(
        jax.random.key(0, impl='rbg'), PAIRS, {'block_1': 4, 'body': 4}, {'block_2': 8, 'body': 8}
    )
    assert set(adapters) == {'block_1_to_block_2', 'body_to_body'}
    assert adapters['body_to_body']['kernel'].shape == (1, 1, 4, 8)


def test_affinity_loss_by_hand():
    # Two positions. Teacher: (3, 4) and (1, 0) -> unit vectors (0.6, 0.8), (1, 0): A_t off-diagonal
    # 0.6. Student (3 channels, no adapter needed): (0, 2, 0), (5, 0, 0) are orthogonal: A_s = I.
    ft = _f([[[[3.0, 4.0], [1.0, 0.0]]]])  # 1x1x2x2
    fs = _f([[[[0.0, 2.0, 0.0], [5.0, 0.0, 0.0]]]])  # 1x1x2x3
    np.testing.assert_allclose(
        distillation.spatial_affinity(ft)[0], [[1.0, 0.6], [0.6, 1.0]], atol=1e-6
    )
    np.testing.assert_allclose(distillation.spatial_affinity(fs)[0], np.eye(2), atol=1e-6)
    # Mean |A_s - A_t| over the 2 x 2 entries: (0 + 0.6 + 0.6 + 0) / 4.
    assert float(distillation.affinity_loss(fs, ft)) == pytest.approx(0.3, abs=1e-6)
    assert float(distillation.affinity_loss(ft, ft)) == 0.0


def test_attention_loss_by_hand_and_finite_gradient_at_zero():
    # Teacher positions (2, 2) and (0, 0): mean of squares 4 and 0 -> a_t = (1, 0). Student
    # (1 channel) 0 and 3 -> a_s = (0, 1): ||a_s - a_t||_2 = sqrt(2). A second, agreeing example
    # contributes 0, so the batch mean is sqrt(2) / 2.
    ft = _f([[[[2.0, 2.0], [0.0, 0.0]]], [[[1.0, 1.0], [1.0, 1.0]]]])  # 2x1x2x2
    fs = _f([[[[0.0], [3.0]]], [[[1.0], [1.0]]]])  # 2x1x2x1
    np.testing.assert_allclose(distillation.attention_map(ft)[0], [1.0, 0.0], atol=1e-7)
    assert float(distillation.attention_loss(fs, ft)) == pytest.approx(np.sqrt(2) / 2, abs=1e-6)
    assert float(distillation.attention_loss(ft, ft)) == 0.0
    # At agreement the gradient is exactly 0, not NaN (the norm of a zero difference).
    grads = jax.grad(lambda f: distillation.attention_loss(f, ft))(ft)
    assert float(jnp.abs(grads).max()) == 0.0
    # An all-zero feature vector (ft's second position) has no direction: still no NaN.
    grads = jax.grad(lambda f: distillation.affinity_loss(f, ft + 1.0))(ft)
    assert np.all(np.isfinite(grads))


def test_weighted_total_and_unknown_loss_name():
    rng = np.random.default_rng(1)
    normal = lambda c: jnp.asarray(rng.normal(size=(2, 3, 3, c)), jnp.float32)
    feats = {'block_1': normal(4), 'body': normal(4)}
    tfeats = {'block_2': normal(8), 'body': normal(8)}
    sr, tsr, hr = (jnp.asarray(rng.uniform(size=(2, 6, 6, 3)), jnp.float32) for _ in range(3))
    adapters = distillation.init_adapters(
        jax.random.key(0, impl='rbg'), PAIRS, {'block_1': 4, 'body': 4}, {'block_2': 8, 'body': 8}
    )
    weights = dict(pixel=1.0, output=0.5, feature=2.0, affinity=10.0, attention=3.0)
    total, terms = distillation.make_loss(_distill(**weights))(sr, feats, tsr, tfeats, hr, adapters)
    assert set(terms) == set(weights)
    assert float(total) == pytest.approx(
        sum(weights[k] * float(terms[k]) for k in weights), rel=1e-6
    )
    # Feature losses average over the pairs.
    expected = np.mean([float(distillation.affinity_loss(feats[s], tfeats[t])) for s, t in PAIRS])
    assert float(terms['affinity']) == pytest.approx(expected, rel=1e-6)
    # Weight 0 switches a loss off.
    _, terms = distillation.make_loss(_distill(pixel=1.0))(sr, feats, tsr, tfeats, hr, {})
    assert set(terms) == {'pixel'}

    bad = _distill(pixel=1.0)
    with bad.unlocked():
        bad.losses.kd = 1.0
    with pytest.raises(
        ValueError,
        match=r"unknown distillation loss 'kd'; valid: pixel, output, "
        r'feature, affinity, attention',
    ):
        distillation.check_config(bad)
    with pytest.raises(ValueError, match='every loss weight 0'):
        distillation.check_config(_distill())


def test_upcycled_inputs_are_hr_crops_and_8_bit_downscales():
    rng = np.random.default_rng(2)
    hr = jnp.asarray(rng.integers(0, 256, (4, 12, 12, 3)) / 255.0, jnp.float32)
    zoom_in = np.asarray(distillation.zoom_in_inputs(hr, 6, jax.random.key(3)))
    assert zoom_in.shape == (4, 6, 6, 3)
    for image, crop in zip(np.asarray(hr), zoom_in):  # Each one is a crop of its own HR patch.
        assert any(
            np.array_equal(image[y : y + 6, x : x + 6], crop) for y in range(7) for x in range(7)
        )
    lr = jnp.full((2, 8, 8, 3), 100 / 255.0)
    zoom_out = np.asarray(distillation.zoom_out_inputs(lr, 2))
    assert zoom_out.shape == (2, 4, 4, 3)
    np.testing.assert_allclose(zoom_out, 100 / 255.0, atol=1e-7)  # A flat image stays flat.
    zoom_out = np.asarray(distillation.zoom_out_inputs(hr, 3))
    assert zoom_out.shape == (4, 4, 4, 3)
    np.testing.assert_allclose(zoom_out * 255, np.round(zoom_out * 255), atol=1e-4)
    both = distillation.upcycled_inputs(
        distillation.UPCYCLE, hr[:, :6, :6], hr, 2, jax.random.key(0)
    )
    assert {k: v.shape for k, v in both.items()} == {
        'zoom_in': (4, 6, 6, 3),
        'zoom_out': (4, 3, 3, 3),
    }


def test_upcycled_loss_averages_the_kinds_and_needs_only_outputs():
    c = _distill(upcycled=2.0)
    c.teacher_access = 'outputs'  # Teacher outputs are all it needs.
    assert distillation.check_config(c) == {'upcycled': 2.0}
    a, b = _f([[[[1.0], [3.0]]]]), _f([[[[0.0], [0.0]]]])
    total, terms = distillation.make_loss(c)(a, {}, a, {}, a, {}, [(a, b), (b, b)])
    assert float(terms['upcycled']) == pytest.approx((2.0 + 0.0) / 2)  # (|1|+|3|)/2, then 0
    assert float(total) == pytest.approx(2.0)
    _, terms = distillation.make_loss(c)(a, {}, a, {}, a, {}, [(a, a)])
    assert float(terms['upcycled']) == 0.0
    with pytest.raises(ValueError, match='upcycled loss needs'):
        distillation.make_loss(c)(a, {}, a, {}, a, {})
    c.upcycle = ('zoom_in', 'zoom')
    with pytest.raises(ValueError, match=r"subset of zoom_in, zoom_out; got \['zoom_in', 'zoom'\]"):
        distillation.check_config(c)
    c.upcycle = ('zoom_in', 'zoom_out')
    c.upcycle_labels = 'hr'
    with pytest.raises(ValueError, match=r"upcycle_labels 'hr'; valid: teacher, ground_truth"):
        distillation.check_config(c)
    c.upcycle_labels = 'ground_truth'  # The no-teacher control: zoom-ins have no label.
    with pytest.raises(ValueError, match=r"no label for zoom_in .*upcycle=\('zoom_out',\)"):
        distillation.check_config(c)
    c.upcycle = ('zoom_out',)
    assert distillation.check_config(c) == {'upcycled': 2.0}


def test_outputs_mode_refuses_feature_losses_in_one_line(tmp_path):
    for name in distillation.FEATURE_LOSSES:
        c = _distill(pixel=1.0, output=1.0, **{name: 1.0})
        c.teacher_access = 'outputs'
        with pytest.raises(
            ValueError,
            match=rf"teacher_access=outputs .* losses \['{name}'\] "
            r'need its features',
        ) as e:
            distillation.check_config(c)
        assert '\n' not in str(e.value)
    ok = _distill(pixel=1.0, output=1.0)
    ok.teacher_access = 'outputs'
    assert distillation.check_config(ok) == {'pixel': 1.0, 'output': 1.0}
    # The job refuses before it trains anything (here: before training a teacher).
    config = _tiny_job()
    config.distill.teacher_access = 'outputs'
    with pytest.raises(ValueError, match='teacher_access=outputs'):
        student_job.train_and_evaluate(config, str(tmp_path), writer=RecordingWriter())
    assert not os.path.exists(tmp_path / 'teacher')


def test_unknown_tap_lists_the_valid_ones():
    c = _distill(feature=1.0)
    c.feature_pairs = (('block_9', 'body'),)
    with pytest.raises(ValueError, match=r"the student has no tap 'block_9'; valid: head, block_1"):
        distillation.check_config(c, {'head': 4, 'block_1': 4, 'body': 4}, {'body': 8})


# --- configs ----------------------------------------------------------------------------------


def _param_count(model_config) -> int:
    model = models.build(model_config)
    params, _ = student_job.abstract_params_and_taps(model)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))


def test_default_student_is_slim_edsr_11x_smaller_and_matches_the_evaluate_config():
    c = student_config.get_config()
    flat = models.flatten_config(c.model)
    assert _param_count(flat) == 121_987
    assert _param_count(c.teacher.model) == 1_369_859
    assert c.teacher.checkpoint == '' and c.teacher.trainer == 'teacher'
    # `configs/evaluate.py:sr,student` restores exactly this architecture.
    assert evaluate_config.get_config('sr,student').model.to_dict() == flat.to_dict()


@pytest.mark.parametrize(
    'variant,name',
    [('imdn', 'imdn'), ('fsrcnn', 'fsrcnn'), ('full', 'edsr'), ('full,imdn,scale=4', 'imdn')],
)
def test_variants_build_and_their_feature_pairs_exist(variant, name):
    c = student_config.get_config(variant)
    assert c.model.name == name and c.teacher.model.scale == c.model.scale
    _, student_taps = student_job.abstract_params_and_taps(models.build(c.model))
    _, teacher_taps = student_job.abstract_params_and_taps(models.build(c.teacher.model))
    for loss in distillation.FEATURE_LOSSES:
        c.distill.losses[loss] = 1.0
    distillation.check_config(c.distill, student_taps, teacher_taps)
    # --config.model.name alone switches the student too.
    d = student_config.get_config()
    d.model.name = name
    assert isinstance(models.build(d.model), type(models.build(c.model)))
    with pytest.raises(ValueError, match='unknown config variant'):
        student_config.get_config('tiny')


# --- the job end to end -----------------------------------------------------------------------


def _tiny_job(eval_dir=None) -> ml_collections.ConfigDict:
    c = student_config.get_config()
    c.teacher = tiny_sr_config()  # EDSR 2 blocks x 8 features
    c.teacher.checkpoint = ''
    c.teacher.checkpoint_every = 2  # One save per run: orbax saves cost seconds here.
    c.model.edsr.num_blocks = 1
    c.model.edsr.features = 4
    c.data.patch = 8
    c.batch_size = 8
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 2
    if eval_dir:
        c.eval.datasets = c.teacher.eval.datasets = [str(eval_dir)]
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    for name in distillation.LOSSES:
        c.distill.losses[name] = 1.0
    c.distill.feature_pairs = PAIRS
    return c


@pytest.fixture(scope='module')
def job(tmp_path_factory):
    """The whole chain on tiny models: teacher trained first (no checkpoint given), then 2 steps
    of distillation with every loss, on the 8 fake devices."""
    # Two small held-out images (a colour and a gray one) keep the evaluation quick.
    eval_dir = tmp_path_factory.mktemp('eval')
    rng = np.random.default_rng(0)
    from PIL import Image

    Image.fromarray(rng.integers(0, 256, (36, 44, 3), np.uint8)).save(eval_dir / 'colour.png')
    Image.fromarray(rng.integers(0, 256, (36, 44), np.uint8)).save(eval_dir / 'gray.png')
    workdir = tmp_path_factory.mktemp('student')
    config = _tiny_job(eval_dir)
    writer = RecordingWriter()
    result = student_job.train_and_evaluate(config, str(workdir), writer=writer)
    return config, workdir, result, writer


def test_distillation_run_has_finite_losses_and_writes_results(job):
    config, workdir, result, writer = job
    assert jax.device_count() == 8 and result.step == 2
    for step in (1, 2):
        metrics = writer.scalars[step]
        for name in ['loss'] + [f'loss/{k}' for k in distillation.LOSSES]:
            assert np.isfinite(metrics[name]), (step, name)
    assert len(jax.tree.leaves(result.state.params)[0].sharding.device_set) == 8
    results = json.load(open(workdir / 'results.json'))
    (by_scale,) = results['sr'].values()
    assert set(by_scale['x2']) == {'bicubic', 'teacher', 'student'}
    assert set(results['models']) == {'teacher', 'student'}
    assert results['models']['teacher']['params'] > results['models']['student']['params'] > 0
    assert results['train']['student']['steps'] == 2
    assert results['train']['teacher']['steps'] == 2
    assert results['distill']['params_ratio'] > 1
    for name in ('config.json', 'sr_table.md', 'sr_grid.png'):
        assert (workdir / name).exists(), name
    assert 'student' in (workdir / 'sr_table.md').read_text()
    # The teacher was trained first, into <workdir>/teacher.
    assert (workdir / 'teacher' / 'checkpoints').is_dir()


def _saved(directory):
    """{path: array} of everything in the newest checkpoint under `directory`, as saved."""
    ckpt = checkpointing.Checkpointer(str(directory), asynchronous=False)
    try:
        state, _ = ckpt.restore(None)
    finally:
        ckpt.close()
    return {
        checkpointing._path_str(p): np.asarray(x)
        for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
    }


def _size(arrays) -> int:
    return sum(int(np.prod(x.shape)) for x in arrays)


def test_no_teacher_array_in_the_student_or_training_checkpoints(job):
    config, workdir, result, _ = job
    teacher_model = models.build(config.teacher.model)
    teacher_abstract, _ = student_job.abstract_params_and_taps(teacher_model)
    teacher, _ = checkpointing.restore_params(str(workdir / 'teacher'), teacher_abstract)
    teacher_arrays = [np.asarray(x) for x in jax.tree.leaves(teacher)]
    student_abstract, _ = student_job.abstract_params_and_taps(models.build(config.model))
    student_paths = {
        'params/' + checkpointing._path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(student_abstract)[0]
    }
    n_student = _size(jax.tree.leaves(student_abstract))
    n_adapters = _size(jax.tree.leaves(result.state.params['adapters']))
    n_teacher = _size(teacher_arrays)
    assert n_teacher > n_student + n_adapters

    def no_teacher_values(saved):
        for path, x in saved.items():
            for t in teacher_arrays:
                if x.size >= 8 and x.shape == t.shape:
                    assert not np.array_equal(x, t), path

    # The export: the student's parameters, exactly, and nothing else.
    export = _saved(workdir / 'student')
    assert set(export) == student_paths
    assert _size(export.values()) == n_student
    no_teacher_values(export)

    # The training checkpoint: student + adapters, and Adam's two moments of each.
    training = _saved(workdir / 'checkpoints')
    params = {k: v for k, v in training.items() if k.startswith('params/')}
    assert {k.split('/')[1] for k in params} == {'student', 'adapters'}
    assert _size(params.values()) == n_student + n_adapters
    scalars = [v for v in training.values() if v.ndim == 0]
    assert _size(training.values()) == 3 * (n_student + n_adapters) + len(scalars)
    no_teacher_values(training)


def test_student_restores_from_the_student_config_alone(job):
    config, workdir, result, _ = job
    restored = restore.load(str(workdir / 'student'), 'sr')
    model, params = restored.module, restored.params
    x = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 12, 12, 3)), jnp.float32)
    expected = model.apply({'params': jax.device_get(result.state.params['student'])}, x)
    np.testing.assert_allclose(model.apply({'params': params}, x), expected, rtol=1e-6)
    # restore_params on the export directory, as configs/evaluate.py does, works the same.
    abstract, _ = student_job.abstract_params_and_taps(model)
    again, _ = checkpointing.restore_params(str(workdir / 'student'), abstract, 'student')
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_missing_or_mismatched_teacher_checkpoint_names_the_path_or_parameter(job, tmp_path):
    _, workdir, _, _ = job
    missing = _tiny_job()
    missing.teacher.checkpoint = str(tmp_path / 'no_teacher')
    with pytest.raises(FileNotFoundError, match=r"no teacher checkpoint in '.*no_teacher'"):
        student_job.train_and_evaluate(missing, str(tmp_path / 'a'), writer=RecordingWriter())
    wider = _tiny_job()
    wider.teacher.checkpoint = str(workdir / 'teacher')
    wider.teacher.model.features = 16  # The checkpoint's teacher has 8.
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r'teacher.*parameter \S+ has shape \(.*8.*\), the config builds '
        r'\(.*16.*\)',
    ):
        student_job.train_and_evaluate(wider, str(tmp_path / 'b'), writer=RecordingWriter())
    assert not (tmp_path / 'b' / 'checkpoints').exists()


def test_checkpoints_from_8_devices_restore_on_1(job):
    # A teacher trained on a bigger host (here the 8 fake devices) restores where there is one.
    config, workdir, _, _ = job
    code = f"""
import jax
from ml_collections import ConfigDict
from sr_purify import checkpointing, models, restore
from sr_purify.jobs import student as student_job
assert jax.device_count() == 1
teacher = models.build(ConfigDict({config.teacher.model.to_dict()!r}))
abstract, _ = student_job.abstract_params_and_taps(teacher)
_, step = checkpointing.restore_params({str(workdir / 'teacher')!r}, abstract, 'teacher')
restore.load({str(workdir / 'student')!r}, 'sr')
print('restored', step)
"""
    env = dict(
        os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1', JAX_PLATFORMS='cpu'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'restored 2' in proc.stdout


def test_upcycled_control_trains_on_ground_truth_labels_and_checks_the_patch(job, tmp_path):
    config, workdir, _, _ = job
    c = _tiny_job()
    c.eval.datasets = config.eval.datasets
    c.teacher.checkpoint = str(workdir / 'teacher')
    for name in distillation.LOSSES:
        c.distill.losses[name] = 0.0
    c.distill.losses.pixel = c.distill.losses.upcycled = 1.0
    c.distill.upcycle, c.distill.upcycle_labels = ('zoom_out',), 'ground_truth'
    c.total_steps = 1
    writer = RecordingWriter()
    run = student_job.distill(c, str(tmp_path / 'control'), writer=writer)
    assert run.result.step == 1
    # By hand on the first batch: L1 between the untrained student's output on the zoom-outs and
    # the LR patches they came from (the untrained student is bicubic whatever its seed: its last
    # conv is zero). Teacher labels would give another value.
    from sr_purify.jobs import teacher as teacher_job

    lr = jnp.asarray(next(teacher_job.sr_batches(c, 2)(0))['lr'])
    zoom_out = distillation.zoom_out_inputs(lr, 2)
    student = run.student.bind(run.student.init(jax.random.key(0), zoom_out))
    expected = float(jnp.mean(jnp.abs(student(zoom_out) - lr)))
    assert expected > 0.0  # Bicubic does not invert a bicubic downscale exactly.
    assert writer.scalars[1]['loss/upcycled'] == pytest.approx(expected, rel=1e-5)
    c.data.patch = 9  # 9 x 9 LR patches do not shrink to a whole number of x2 pixels.
    with pytest.raises(ValueError, match='divisible by the scale 2'):
        student_job.distill(c, str(tmp_path / 'odd'), writer=RecordingWriter())


def test_zoom_out_inputs_are_8_bit_values_and_white_stays_white():
    rng = np.random.default_rng(0)
    lr = jnp.asarray(rng.uniform(0, 1, (2, 8, 8, 3)), jnp.float32)
    out = np.asarray(distillation.zoom_out_inputs(lr, 2), np.float64)
    np.testing.assert_allclose(out * 255, np.round(out * 255), atol=1e-4)  # on the 8-bit grid
    assert out.min() >= 0.0 and out.max() <= 1.0
    white = distillation.zoom_out_inputs(jnp.ones((1, 8, 8, 3)), 2)
    np.testing.assert_array_equal(white, 1.0)


def test_zoom_in_patch_larger_than_the_hr_crop_is_a_clear_error():
    with pytest.raises(ValueError, match=r'^HR crops of 4x6 are smaller than the zoom-in patch 5$'):
        distillation.zoom_in_inputs(jnp.zeros((1, 4, 6, 3)), 5, jax.random.key(0))


def test_spatial_affinity_is_a_cosine_similarity_even_for_near_zero_features():
    # Positions with a norm near eps (1e-7) still give entries in [-1, 1].
    f = jnp.array([[[[3e-7, 4e-7], [3.0, 4.0]], [[0.0, 0.0], [-4.0, 3.0]]]], jnp.float32)
    a = np.asarray(distillation.spatial_affinity(f))[0]
    assert a.shape == (4, 4)
    assert np.all(np.abs(a) <= 1.0 + 1e-6)
    np.testing.assert_allclose(a[1, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(a[1, 3], 0.0, atol=1e-6)
    np.testing.assert_array_equal(a[2], 0.0)  # an all-zero position is similar to nothing
