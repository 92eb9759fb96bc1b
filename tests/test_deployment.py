"""Deployment: the upscale job, the export job, the Python API from outside the repository, and
the one restore path's errors, on a 2-step student."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from conftest import REPO, RecordingWriter, tiny_sr_config
from PIL import Image

from configs import export as export_config
from configs import student as student_config
from configs import upscale as upscale_config
from sr_purify import api, export, jobs, restore


@pytest.fixture(scope='module')
def student(tmp_path_factory):
    """A student job's workdir: tiny teacher trained first, then 2 steps of distillation."""
    eval_dir = tmp_path_factory.mktemp('eval')
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (24, 28, 3), np.uint8)).save(eval_dir / 'a.png')
    c = student_config.get_config()
    c.teacher = tiny_sr_config()
    c.teacher.checkpoint, c.teacher.checkpoint_every = '', 2
    c.model.edsr.num_blocks, c.model.edsr.features = 1, 8
    c.data.patch, c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 8, 2, 1, 2
    c.eval.datasets = c.teacher.eval.datasets = [str(eval_dir)]
    c.distill.losses.upcycled = 0.0  # The cheapest recipe: pixel + output.
    workdir = tmp_path_factory.mktemp('student')
    jobs.get('student')(c, str(workdir), writer=RecordingWriter())
    return workdir


@pytest.fixture(scope='module')
def photos(tmp_path_factory):
    """Inputs of odd sizes and every layout, plus one file that is no image."""
    import skimage.data

    folder = tmp_path_factory.mktemp('photos')
    coffee = skimage.data.coffee()
    Image.fromarray(coffee[100:137, 200:223]).save(folder / 'rgb.png')  # 37 x 23
    Image.fromarray(skimage.data.camera()[:20, :31]).save(folder / 'gray.png')
    rgba = np.dstack([coffee[:16, :18], np.linspace(0, 255, 16 * 18).reshape(16, 18)])
    Image.fromarray(rgba.astype(np.uint8), 'RGBA').save(folder / 'alpha.png')
    Image.fromarray(coffee[:30, :40]).save(folder / 'photo.jpg', quality=90)
    (folder / 'bad.png').write_bytes(b'not an image at all')
    return folder


def _upscale(checkpoint, inputs, out, **fields):
    c = upscale_config.get_config()
    c.checkpoint, c.input = str(checkpoint), str(inputs)
    c.tile, c.overlap = 16, 8  # Several tiles even on these small images.
    c.update(fields)
    return jobs.get('upscale')(c, str(out))


def test_upscale_job_writes_scale_times_every_input_and_skips_the_unreadable(
    student, photos, tmp_path
):
    summary = _upscale(student, photos, tmp_path / 'out')
    assert summary['scale'] == 2 and summary['runtime'] == 'jax'
    assert sorted(summary['written']) == [
        'alpha_x2.png',
        'gray_x2.png',
        'photo_x2.png',
        'rgb_x2.png',
    ]
    assert [os.path.basename(s['file']) for s in summary['skipped']] == ['bad.png']
    for name, mode in (('rgb', 'RGB'), ('gray', 'L'), ('alpha', 'RGBA'), ('photo', 'RGB')):
        source = next(p for p in photos.iterdir() if p.stem == name)
        with Image.open(source) as a, Image.open(tmp_path / 'out' / f'{name}_x2.png') as b:
            assert b.size == (2 * a.size[0], 2 * a.size[1]) and b.mode == mode
    results = json.loads((tmp_path / 'out' / 'results.json').read_text())
    assert results['upscale']['skipped'][0]['file'].endswith('bad.png')


def test_upscale_job_equals_the_model_on_the_whole_image(student, photos, tmp_path):
    # Tiling is invisible: the written PNG equals the network run on the whole LR image.
    _upscale(student, photos / 'rgb.png', tmp_path / 'out')
    model = restore.load(str(student), 'sr')
    lr = np.asarray(Image.open(photos / 'rgb.png'), np.float32)[None] / 255.0
    whole = np.clip(np.asarray(model.apply(lr))[0], 0, 1) * 255.0
    written = np.asarray(Image.open(tmp_path / 'out' / 'rgb_x2.png'), np.float32)
    assert np.abs(written - whole).max() <= 1.0


def test_restore_names_what_it_found_when_it_is_not_an_sr_model(student, tmp_path):
    classifier = tmp_path / 'classifier'
    classifier.mkdir()
    (classifier / 'config.json').write_text(json.dumps({'trainer': 'classifier'}))
    with pytest.raises(ValueError, match=r"is a classifier job's workdir, not an SR model"):
        restore.load(str(classifier), 'sr')
    evaluation = tmp_path / 'eval'
    evaluation.mkdir()
    (evaluation / 'config.json').write_text(json.dumps({'trainer': 'evaluate'}))
    with pytest.raises(ValueError, match=r"workdir of a 'evaluate' job, which trains no model"):
        restore.load(str(evaluation), 'sr')
    # Every folder of a student job restores the same student: workdir, export, checkpoints/.
    a = restore.load(str(student), 'sr')
    b = restore.load(str(student / 'student'), 'sr')
    c = restore.load(str(student / 'checkpoints'), 'sr')
    assert a.job == b.job == c.job == 'student' and a.scale == 2
    for x, y in ((a, b), (a, c)):
        assert all(np.array_equal(p, q) for p, q in zip(leaves(x.params), leaves(y.params)))
    assert restore.load(str(student / 'teacher'), 'sr').job == 'teacher'


def leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_launch_refuses_missing_inputs_in_one_line_before_loading_anything(student, tmp_path):
    empty = tmp_path / 'empty'
    empty.mkdir()
    cmd = [
        sys.executable,
        'launch.py',
        '--config=configs/upscale.py',
        f'--config.checkpoint={student}',
        f'--config.input={empty}',
        f'--workdir={tmp_path / "out"}',
    ]
    env = dict(os.environ, XLA_FLAGS='')
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and re.match(r"error: no images .* in folder '.*empty'", lines[0])


def _readme_python_example() -> str:
    text = (REPO / 'README.md').read_text()
    section = text[text.index('### Use it from Python') :]
    return section.split('```python\n', 1)[1].split('```', 1)[0]


def test_readme_python_example_runs_outside_the_repository(student, photos, tmp_path):
    """The README's example, as written, from a folder outside the repository: it needs the
    package installed (`pip install .`, as .ci/run does), not the repository on the path."""
    probe = subprocess.run(
        [sys.executable, '-c', 'import sr_purify, os; print(os.path.dirname(sr_purify.__file__))'],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != 'PYTHONPATH'},
    )
    if probe.returncode and not os.environ.get('CI'):
        pytest.skip('sr_purify is not installed in this venv (pip install .); CI installs it')
    assert probe.returncode == 0, probe.stderr[-2000:]
    code = _readme_python_example()
    assert 'sr_purify.load_sr(' in code and '.upscale(' in code
    code = code.replace("'workdirs/student'", repr(str(student)))
    Image.open(photos / 'photo.jpg').save(tmp_path / 'photo.png')
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run(
        [sys.executable, '-c', code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with Image.open(tmp_path / 'photo_x2.png') as out:
        assert out.size == (80, 60)


@pytest.fixture(scope='module')
def exported(student, tmp_path_factory):
    c = export_config.get_config()
    c.checkpoint = str(student)
    c.eval_dataset = ''  # Parity is checked on the photo; Set5 PSNR is the benchmark's job.
    out = tmp_path_factory.mktemp('export')
    return out, jobs.get('export')(c, str(out))


def test_export_job_writes_verified_litert_files(exported):
    folder, summary = exported
    for name in ('model_f32.tflite', 'model_int8.tflite', 'sr_model.json', 'saved_model'):
        assert (folder / name).exists(), name
    assert summary['report']['model_f32.tflite']['max_abs_diff'] <= 1 / 255
    # The upscale job's tile window gets fixed-shape files of its own, checked the same way.
    assert summary['report']['model_f32_240x240.tflite']['max_abs_diff'] <= 1 / 255
    assert summary['files']['fixed'] == {
        '240x240': {'f32': 'model_f32_240x240.tflite', 'int8': 'model_int8_240x240.tflite'}
    }
    assert summary['scale'] == 2 and summary['model']['num_blocks'] == 1


def test_upscale_job_and_api_run_the_export_with_litert(student, exported, photos, tmp_path):
    folder, _ = exported
    summary = _upscale(folder, photos / 'rgb.png', tmp_path / 'litert')
    assert summary['runtime'] == 'litert'
    _upscale(student, photos / 'rgb.png', tmp_path / 'jax')
    a = np.asarray(Image.open(tmp_path / 'litert' / 'rgb_x2.png'), np.int16)
    b = np.asarray(Image.open(tmp_path / 'jax' / 'rgb_x2.png'), np.int16)
    assert a.shape == b.shape and np.abs(a - b).max() <= 1
    sr = api.load_sr(str(folder), int8=True)
    assert sr.runtime == 'litert' and sr.source.endswith('model_int8.tflite')
    gray = np.asarray(Image.open(photos / 'gray.png'))
    assert sr.upscale(gray).shape == (40, 62)
    # A tile of the fixed size runs through its own file, and agrees with the dynamic one.
    sr32 = api.load_sr(str(folder))
    x = np.random.default_rng(0).random((1, 240, 240, 3), np.float32)
    fixed = sr32.apply(x)
    assert set(sr32.apply._models) == {(240, 240)}
    dynamic = export.LiteRTModel(str(folder / 'model_f32.tflite'))(x)
    assert np.abs(fixed - dynamic).max() <= 1 / 255
