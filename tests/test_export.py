"""Tests for sr_purify.export: LiteRT files reproduce JAX, int8 is close and smaller (CPU).

One export of a tiny EDSR (with the bicubic skip, the op most likely to convert wrongly) is shared
by the module: TF conversion takes seconds. Parity is checked on a photo crop, not noise.
"""

import json
import os
import subprocess
import sys
import textwrap
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import skimage.data

from configs import common
from sr_purify import export, models

TINY = common.edsr(scale=2, num_blocks=2, features=8, bicubic_skip=True).to_dict()


def _photo(y=100, x=100, h=64, w=96):
    return (skimage.data.astronaut()[y : y + h, x : x + w] / 255.0).astype(np.float32)[None]


def _noisy_params(model, seed):
    params = model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
    # Off the init: the bicubic skip's zero tail would make the network plain bicubic.
    key = jax.random.key(seed)
    return jax.tree.map(lambda p: p + 0.05 * jax.random.normal(key, p.shape), params)


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    model = models.build(ml_collections.ConfigDict(TINY))
    params = _noisy_params(model, 1)
    apply = lambda p, x: model.apply({'params': p}, x)
    directory = str(tmp_path_factory.mktemp('export'))
    report = export.export_all(apply, params, directory, _photo())
    return types.SimpleNamespace(
        dir=directory, report=report, model=model, params=params, apply=jax.jit(apply)
    )


def test_export_all_writes_and_reports_every_file(exported):
    for name in ('saved_model', 'model_f32.tflite', 'model_int8.tflite'):
        assert os.path.exists(os.path.join(exported.dir, name))
        assert exported.report[name]['bytes'] > 0
    assert exported.report['saved_model']['max_abs_diff'] <= 1 / 255
    assert exported.report['model_f32.tflite']['max_abs_diff'] <= 1 / 255
    json.dumps(exported.report)  # Plain floats and ints: it goes into results files as is.


# Runs in a fresh interpreter with numpy and LiteRT only: what a deployment has.
_BARE_RUNNER = textwrap.dedent(
    """
    import sys
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    model_path, arrays_path = sys.argv[1:]
    arrays = np.load(arrays_path)
    it = Interpreter(model_path=model_path, num_threads=1)
    index = it.get_input_details()[0]['index']
    out = it.get_output_details()[0]['index']
    for i in (0, 1, 0):  # Back to the first size: resizing must not keep stale buffers.
        x, expected = arrays[f'x{i}'], arrays[f'y{i}']
        it.resize_tensor_input(index, x.shape, strict=False)
        it.allocate_tensors()
        it.set_tensor(index, x)
        it.invoke()
        y = it.get_tensor(out)
        assert y.shape == expected.shape, (y.shape, expected.shape)
        diff = float(np.abs(y - expected).max())
        assert diff <= 1 / 255, f'size {x.shape}: max abs diff {diff}'
        print(x.shape, diff)
    heavy = [m for m in ('jax', 'flax', 'sr_purify', 'tensorflow') if m in sys.modules]
    assert not heavy, heavy
    """
)


def test_f32_tflite_matches_jax_without_jax_at_two_sizes(exported, tmp_path):
    # Two sizes, neither the verification one's aspect: the file's shapes really are dynamic.
    xs = [_photo(150, 180, 40, 56), _photo(200, 60, 24, 72)]
    arrays = {f'x{i}': x for i, x in enumerate(xs)}
    arrays.update(
        {f'y{i}': np.asarray(exported.apply(exported.params, x)) for i, x in enumerate(xs)}
    )
    np.savez(tmp_path / 'arrays.npz', **arrays)
    model = os.path.join(exported.dir, 'model_f32.tflite')
    proc = subprocess.run(
        [sys.executable, '-c', _BARE_RUNNER, model, str(tmp_path / 'arrays.npz')],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_litert_model_resizes_only_when_the_shape_changes(exported):
    run = export.LiteRTModel(os.path.join(exported.dir, 'model_f32.tflite'), num_threads=1)
    calls = []
    allocate = run._interpreter.allocate_tensors
    run._interpreter.allocate_tensors = lambda: calls.append(1) or allocate()
    a, b = _photo(), _photo(10, 20, 32, 48)
    for x in (a, a, b, b, a):
        y = run(x)
        assert y.shape == (1, 2 * x.shape[1], 2 * x.shape[2], 3)
        np.testing.assert_allclose(y, exported.apply(exported.params, x), atol=1 / 255)
    assert len(calls) == 3  # a, b, a: repeated shapes reuse the buffers.
    with pytest.raises(ValueError, match='h, w, 3'):
        run(np.zeros((1, 8, 8, 4), np.float32))


def test_int8_runs_close_to_f32_and_is_smaller(exported):
    f32 = export.LiteRTModel(os.path.join(exported.dir, 'model_f32.tflite'))
    int8 = export.LiteRTModel(os.path.join(exported.dir, 'model_int8.tflite'))
    x = _photo(300, 250, 48, 40)
    y8, y32 = int8(x), f32(x)
    assert y8.shape == (1, 96, 80, 3)
    assert export.psnr_db(y8, y32) > 30.0
    assert not np.array_equal(y8, y32)  # Really quantised, not a copy of the f32 graph.
    assert (
        exported.report['model_int8.tflite']['bytes'] < exported.report['model_f32.tflite']['bytes']
    )


def test_psnr_on_images_scores_the_file_as_jax(exported):
    from sr_purify import image_ops

    photo = skimage.data.astronaut()
    images = [image_ops.Image('a', photo[100:164, 100:196]), image_ops.Image('b', photo[300:348])]
    run = export.LiteRTModel(os.path.join(exported.dir, 'model_f32.tflite'))
    jax_run = lambda x: exported.apply(exported.params, x)
    got, want = export.psnr_on_images(run, images, 2), export.psnr_on_images(jax_run, images, 2)
    assert 5.0 < want < 60.0
    assert abs(got - want) < 1e-3


def test_check_parity_rejects_the_wrong_model(exported):
    run = export.LiteRTModel(os.path.join(exported.dir, 'model_f32.tflite'))
    x = _photo()
    wrong = exported.apply(_noisy_params(exported.model, 2), x)
    with pytest.raises(export.ExportMismatchError, match='model_f32.tflite: max abs difference'):
        export.check_parity(run, x, wrong, 'model_f32.tflite')
    with pytest.raises(export.ExportMismatchError, match='shape'):
        export.check_parity(run, x, wrong[:, 1:], 'model_f32.tflite')
    nan = np.full_like(np.asarray(wrong), np.nan)
    with pytest.raises(export.ExportMismatchError):
        export.check_parity(run, x, nan, 'model_f32.tflite')


def test_export_all_raises_when_the_export_does_not_match(exported, tmp_path):
    x = _photo()
    wrong = exported.apply(_noisy_params(exported.model, 2), x)
    with pytest.raises(export.ExportMismatchError, match='saved_model: max abs difference'):
        export.export_all(
            lambda p, x: exported.model.apply({'params': p}, x),
            exported.params,
            str(tmp_path),
            x,
            expected=wrong,
        )


def test_fixed_shape_export_takes_that_shape_only(exported, tmp_path):
    x = _photo(0, 0, 24, 32)
    saved = export.export_saved_model(
        lambda p, x: exported.model.apply({'params': p}, x),
        exported.params,
        str(tmp_path / 'saved_model'),
        input_shape=x.shape,
    )
    run = export.LiteRTModel(export.to_tflite(saved, str(tmp_path / 'fixed.tflite')))
    assert run.fixed_shape == x.shape
    np.testing.assert_allclose(run(x), exported.apply(exported.params, x), atol=1 / 255)
    with pytest.raises(ValueError, match='exported for input shape'):
        run(_photo(0, 0, 24, 40))


def test_to_tflite_rejects_an_unknown_quantization(exported, tmp_path):
    with pytest.raises(ValueError, match='dynamic_int8'):
        export.to_tflite(os.path.join(exported.dir, 'saved_model'), str(tmp_path / 'm'), 'int4')


def test_module_import_is_light():
    # The upscale job imports export for LiteRTModel: no JAX or TensorFlow start-up for that.
    code = (
        'import sys, sr_purify.export; '
        "heavy = [m for m in ('jax', 'flax', 'tensorflow', 'ai_edge_litert') if m in sys.modules]; "
        'assert not heavy, heavy'
    )
    proc = subprocess.run(
        [sys.executable, '-c', code],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert proc.returncode == 0, proc.stderr
