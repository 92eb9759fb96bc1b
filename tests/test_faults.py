"""Faults: damaged checkpoints against other restore errors, errors that keep their traceback,
independent random streams and invalid intervals."""

import glob
import json
import logging
import os
import re
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from conftest import REPO, RecordingWriter, tiny_sr_config

from sr_purify import checkpointing, classification_data, sr_data, training


def _config(total_steps=3, **fields):
    cfg = tiny_sr_config()
    cfg.total_steps = total_steps
    cfg.checkpoint_every = 1
    cfg.update(fields)
    return cfg


def _fit(cfg, workdir):
    """A few steps of a 256-parameter model: real checkpoints in seconds, no SR model."""

    def batches(start_step):
        for _ in range(start_step, cfg.total_steps):
            yield {'x': np.ones((8, 1), np.float32)}

    def loss_fn(params, model_state, batch, rng):
        return jnp.mean(params['w'] * batch['x']) ** 2, (model_state, {})

    writer = RecordingWriter()
    result = training.fit(
        cfg,
        str(workdir),
        init_variables=lambda rng: ({'w': jnp.linspace(0.0, 1.0, 256)}, {}),
        loss_fn=loss_fn,
        batches=batches,
        writer=writer,
    )
    return result, sorted(writer.losses())


def _entries(workdir):
    return sorted(os.listdir(os.path.join(workdir, 'checkpoints')))


def _wrong_digest(step_dir):
    with open(os.path.join(step_dir, 'digest', 'metadata'), 'w') as f:
        json.dump({'sha256': '0' * 64}, f)


def _array_files(step_dir):
    files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
    assert files
    return files


def _delete_arrays(step_dir):
    for f in _array_files(step_dir):
        os.remove(f)


def _truncate_arrays(step_dir):
    for f in _array_files(step_dir):
        raw = open(f, 'rb').read()
        open(f, 'wb').write(raw[: len(raw) // 2])


def _garble_arrays(step_dir):
    for f in _array_files(step_dir):
        raw = bytearray(open(f, 'rb').read())
        for i in range(len(raw) // 2, min(len(raw), len(raw) // 2 + 64)):
            raw[i] ^= 0xFF
        open(f, 'wb').write(bytes(raw))


def _garble_metadata(step_dir):
    with open(os.path.join(step_dir, 'state', '_METADATA'), 'w') as f:
        f.write('{not json')


@pytest.mark.parametrize(
    'damage', [_wrong_digest, _delete_arrays, _truncate_arrays, _garble_arrays, _garble_metadata]
)
def test_a_damaged_newest_step_falls_back_and_is_moved_aside(tmp_path, damage):
    _fit(_config(3), tmp_path)
    damage(str(tmp_path / 'checkpoints' / '3'))
    result, trained = _fit(_config(4), tmp_path)
    assert trained == [3, 4] and result.step == 4  # Resumed from step 2.
    assert (tmp_path / 'checkpoints' / '3.damaged').is_dir()
    assert '3.damaged' in _entries(tmp_path) and '4' in _entries(tmp_path)


@pytest.mark.parametrize(
    'error',
    [
        PermissionError(13, 'Permission denied'),
        MemoryError('out of memory'),
        TypeError('unexpected keyword argument (another orbax version)'),
        ValueError('PERMISSION_DENIED: Error reading local file "x"'),
    ],
)
def test_any_other_restore_error_is_raised_and_renames_nothing(tmp_path, monkeypatch, error):
    _fit(_config(3), tmp_path)
    before = _entries(tmp_path)

    def fail(self, *args, **kwargs):
        raise error

    monkeypatch.setattr(ocp.CheckpointManager, 'restore', fail)
    with pytest.raises(type(error)) as info:
        _fit(_config(4), tmp_path)
    assert info.value is error  # The original exception, traceback and all.
    assert any('while restoring checkpoint step 3' in n for n in error.__notes__)
    assert _entries(tmp_path) == before == ['1', '2', '3']


def test_all_steps_damaged_stops_naming_them_and_moves_nothing(tmp_path):
    _fit(_config(3), tmp_path)
    for step in (1, 2, 3):
        _wrong_digest(str(tmp_path / 'checkpoints' / str(step)))
    with pytest.raises(checkpointing.NoValidCheckpointError) as info:
        _fit(_config(4), tmp_path)
    message = str(info.value)
    assert 'step(s) 3, 2, 1 are damaged' in message
    assert str(tmp_path / 'checkpoints') in message
    assert '--config.restart_from_scratch=True' in message
    assert _entries(tmp_path) == ['1', '2', '3']  # A rerun stops again; nothing was lost.
    # The restore path of other jobs (a teacher, a classifier) names them too.
    with pytest.raises(checkpointing.NoValidCheckpointError, match=r'step\(s\) 3, 2, 1'):
        checkpointing.restore_newest(str(tmp_path / 'checkpoints'))


def test_restart_from_scratch_trains_from_step_0_with_a_warning(tmp_path, caplog):
    _fit(_config(3), tmp_path)
    for step in (1, 2, 3):
        _wrong_digest(str(tmp_path / 'checkpoints' / str(step)))
    with caplog.at_level(logging.WARNING):
        result, trained = _fit(_config(3, restart_from_scratch=True), tmp_path)
    assert trained == [1, 2, 3] and result.step == 3
    assert 'restart_from_scratch=True: training from step 0' in caplog.text
    assert {'1.damaged', '2.damaged', '3.damaged'} <= set(_entries(tmp_path))


@pytest.mark.parametrize(
    'message, damage',
    [
        ('NOT_FOUND: Error opening "zarr" driver: ...', True),
        ('DATA_LOSS: Error decoding manifest', True),
        ('OUT_OF_RANGE: Requested byte range [0, 286) is not valid', True),
        ('Error reading "p/.zarray": Error decoding b-tree node: ZSTD_decompressStream()', True),
        ('PERMISSION_DENIED: Error reading local file', False),
        ('RESOURCE_EXHAUSTED: out of memory', False),
        ('some other problem', False),
    ],
)
def test_tensorstore_errors_count_as_damage_only_for_missing_or_bad_bytes(message, damage):
    assert checkpointing.is_damage(ValueError(message)) is damage
    # Orbax wraps the tensorstore error of an array read in a plain Exception.
    try:
        try:
            raise ValueError(message)
        except ValueError as e:
            raise Exception('Encountered error while reading array index') from e
    except Exception as wrapped:
        assert checkpointing.is_damage(wrapped) is damage
    assert checkpointing.is_damage(FileNotFoundError('gone'))
    assert checkpointing.is_damage(KeyError('Item "state" was not found in the checkpoint.'))
    assert not checkpointing.is_damage(KeyError('params'))


# ---------------------------------------------------------------------------------------------
# Errors at the command line.


def test_launch_prints_one_line_for_a_user_mistake(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            'launch.py',
            '--config=configs/teacher.py',
            '--config.model.scale=5',
            f'--workdir={tmp_path / "run"}',
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith('error:')]
    assert errors == ['error: scale 5 not supported; valid: 2, 3, 4']
    assert proc.stderr.strip().splitlines()[-1] == errors[0]
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'run' / 'error.log').exists()


@pytest.fixture
def launcher(monkeypatch):
    import launch

    # handle_error clears the root logger's handlers; keep pytest's own ones.
    monkeypatch.setattr(logging.getLogger(), 'handlers', list(logging.getLogger().handlers))
    return launch


def _raised(code: str, filename: str) -> BaseException:
    try:
        exec(compile(code, filename, 'exec'))
    except Exception as e:
        return e
    raise AssertionError('nothing raised')


def test_a_library_error_keeps_its_traceback_and_is_logged(launcher, tmp_path, capsys):
    error = _raised('raise ValueError("deep inside a library")', '/usr/lib/fake_lib.py')
    assert launcher.handle_error(error, str(tmp_path)) == 1
    err = capsys.readouterr().err
    assert 'Traceback (most recent call last)' in err
    assert 'fake_lib.py' in err and 'ValueError: deep inside a library' in err
    logged = (tmp_path / 'error.log').read_text()
    assert 'fake_lib.py' in logged and 'ValueError: deep inside a library' in logged


def test_a_library_error_without_a_workdir_is_still_printed(launcher, tmp_path, capsys):
    error = _raised('raise KeyError("x")', '/usr/lib/fake_lib.py')
    assert launcher.handle_error(error, str(tmp_path / 'missing')) == 1
    assert 'Traceback' in capsys.readouterr().err
    assert not (tmp_path / 'missing').exists()


def test_errors_raised_by_the_repository_are_one_line(launcher, tmp_path, capsys):
    with pytest.raises(ValueError) as info:
        sr_data.check_scale(5)
    assert launcher.handle_error(info.value, str(tmp_path)) == 2
    assert capsys.readouterr().err == 'error: scale 5 not supported; valid: 2, 3, 4\n'
    assert not (tmp_path / 'error.log').exists()
    # Not a user-facing type, even from the repository: a bug, with its traceback.
    error = _raised('raise ZeroDivisionError("bug")', os.path.join(REPO, 'sr_purify', 'x.py'))
    assert launcher.handle_error(error, str(tmp_path)) == 1
    assert 'Traceback' in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Random streams and intervals.


@pytest.mark.parametrize('module', [sr_data, classification_data])
@pytest.mark.parametrize('seed', [0, 7])
def test_random_streams_of_neighbouring_seeds_and_purposes_never_coincide(module, seed):
    def pairs(s):
        return {
            tuple(int(v) for v in module.stream_seed(s, purpose, i).numpy())
            for purpose in module.PURPOSES
            for i in range(1000)
        }

    this, next_seed = pairs(seed), pairs(seed + 1)
    assert len(this) == len(next_seed) == 3000  # Purposes of one seed never share a pair.
    assert not this & next_seed


@pytest.mark.parametrize(
    'field, value, valid',
    [
        ('log_every', 0, 'an integer >= 1'),
        ('log_every', -5, 'an integer >= 1'),
        ('checkpoint_every', 0, 'an integer >= 1'),
        ('checkpoint_every', -1, 'an integer >= 1'),
        ('eval_every', -1, 'an integer >= 1, or 0 to evaluate only at the end'),
    ],
)
def test_invalid_intervals_fail_before_training(tmp_path, field, value, valid):
    cfg = _config(2, **{field: value})
    with pytest.raises(ValueError) as info:
        _fit(cfg, tmp_path)
    assert str(info.value) == f'config.{field}={value} is not valid; it must be {valid}'
    assert not (tmp_path / 'checkpoints').exists()
    training.check_intervals(_config(2, eval_every=0))  # 0: evaluate only at the end.


def test_one_line_errors_keep_their_quotes_and_a_key_error_loses_its_own(
    launcher, tmp_path, capsys
):
    own = os.path.join(REPO, 'sr_purify', 'x.py')
    error = _raised("raise ValueError(\"'/data/run' is a classifier job's workdir\")", own)
    assert launcher.handle_error(error, str(tmp_path)) == 2
    assert capsys.readouterr().err == "error: '/data/run' is a classifier job's workdir\n"
    error = _raised('raise KeyError("unknown loss \'l3\'; valid: l1, l2")', own)
    assert launcher.handle_error(error, str(tmp_path)) == 2
    assert capsys.readouterr().err == "error: unknown loss 'l3'; valid: l1, l2\n"


# ---------------------------------------------------------------------------
# Deliverables: exported parameters and where a restore looks.


def test_export_params_keeps_one_step_of_params_alone_and_restores_in_the_given_dtypes(tmp_path):
    import jax

    folder = str(tmp_path / 'deliverable')
    params = {
        'conv': {'kernel': np.arange(6, dtype=np.float32).reshape(2, 3)},
        'b': np.ones(3, np.float32),
    }
    assert checkpointing.export_params(folder, 7, params) == folder
    # Written by the time it returns; a second export of the same step changes nothing.
    checkpointing.export_params(folder, 7, jax.tree.map(np.zeros_like, params))
    abstract = {
        'conv': {'kernel': jax.ShapeDtypeStruct((2, 3), jnp.float16)},
        'b': jax.ShapeDtypeStruct((3,), jnp.float32),
    }
    restored, step = checkpointing.restore_params(folder, abstract)
    assert step == 7
    assert isinstance(restored['conv']['kernel'], np.ndarray)
    assert restored['conv']['kernel'].dtype == np.float16 and restored['b'].dtype == np.float32
    np.testing.assert_array_equal(restored['conv']['kernel'], params['conv']['kernel'])
    np.testing.assert_array_equal(restored['b'], 1.0)
    state, _ = checkpointing.restore_newest(folder)
    assert set(state) == {'params'}  # a deliverable: no optimiser state, nothing else
    # One step is kept: a later export replaces the earlier one.
    checkpointing.export_params(folder, 9, params)
    assert sorted(p.name for p in (tmp_path / 'deliverable').iterdir() if p.name.isdigit()) == ['9']


def test_checkpoint_directory_and_what_a_missing_checkpoint_says(tmp_path):
    workdir = tmp_path / 'job'
    (workdir / 'checkpoints').mkdir(parents=True)
    assert checkpointing.checkpoint_directory(str(workdir)) == str(workdir / 'checkpoints')
    bare = tmp_path / 'bare'
    bare.mkdir()
    assert checkpointing.checkpoint_directory(str(bare)) == str(bare)
    # A digit-named file is not a step orbax can restore: the error says what was looked for.
    (bare / '5').write_text('not a checkpoint')
    with pytest.raises(FileNotFoundError, match=r"^no SR model checkpoint in '"):
        checkpointing.restore_params(str(bare), {}, 'SR model')


def test_quarantine_never_overwrites_an_earlier_damaged_copy_and_says_where(tmp_path, caplog):
    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    try:
        for round_ in range(3):
            ckpt.save(3, {'w': np.full(2, round_, np.float32)})
            with caplog.at_level(logging.WARNING):
                ckpt.quarantine([3])
        moved = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith('3.'))
        assert moved == ['3.damaged', '3.damaged1', '3.damaged2']
        expected = f'moved damaged checkpoint {tmp_path / "3"} to {tmp_path / "3.damaged2"}'
        assert expected in [r.getMessage() for r in caplog.records]
        assert ckpt.steps() == []
    finally:
        ckpt.close()


def test_restore_without_a_target_reads_onto_one_device_whatever_the_saving_mesh(tmp_path):
    # A teacher trained on 8 devices restores on a machine with fewer: the state comes back on
    # this process's first device, not in the saving run's sharding.
    import jax
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((8,), ('data',))
    w = jax.device_put(np.arange(16, dtype=np.float32), NamedSharding(mesh, P('data')))
    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    try:
        ckpt.save(1, {'w': w})
    finally:
        ckpt.close()
    state, step = checkpointing.restore_newest(str(tmp_path))
    assert step == 1
    assert state['w'].sharding == jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    np.testing.assert_array_equal(state['w'], np.arange(16))


def test_restore_newest_of_an_empty_folder_names_what_and_where(tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"^no model checkpoint in '{tmp_path}'$"):
        checkpointing.restore_newest(str(tmp_path))


def test_check_compatible_names_the_first_missing_or_extra_parameter_by_its_path():
    kernel = lambda n: {'kernel': np.zeros(n, np.float32)}
    saved = {'blocks': [kernel(2), kernel(2)], 'step': 3}  # a python int leaf has no shape
    checkpointing.check_compatible(saved, {'blocks': [kernel(2), kernel(2)], 'step': 0}, 'w')
    more = {'blocks': [kernel(2), kernel(2), kernel(2), kernel(2)], 'step': 0}
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r'^checkpoint w lacks parameter blocks/2/kernel that the config expects '
        r'\(2 missing\); was it written with another model config\?$',
    ):
        checkpointing.check_compatible(saved, more, 'w')
    with pytest.raises(
        checkpointing.CheckpointMismatchError,
        match=r'^checkpoint w has parameter blocks/1/kernel that the config does not '
        r'\(1 extra\); was it written with another model config\?$',
    ):
        checkpointing.check_compatible(saved, {'blocks': [kernel(2)], 'step': 0}, 'w')


def test_resume_into_another_shape_is_a_mismatch_naming_the_parameter(tmp_path):
    import jax

    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    try:
        for step in range(1, 6):
            ckpt.save(step, {'w': np.full(4, step, np.float32)})
        assert ckpt.steps() == [5, 4, 3]  # three kept by default
        abstract = {'w': jax.ShapeDtypeStruct((5,), jnp.float32)}
        with pytest.raises(
            checkpointing.CheckpointMismatchError,
            match=rf'^checkpoint {tmp_path} step 5: parameter w has shape \(4,\), the config '
            r'builds \(5,\)',
        ):
            ckpt.restore(abstract)
    finally:
        ckpt.close()


def test_a_read_only_restore_falls_back_without_moving_and_logs_why(tmp_path, caplog):
    # Another job's checkpoints (a teacher read by the student job) are only read: a damaged
    # step is skipped and logged, never moved. A digest that is not a JSON object is damage too.
    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    try:
        for step in (1, 2, 3):
            ckpt.save(step, {'w': np.full(2, step, np.float32)})
    finally:
        ckpt.close()
    (tmp_path / '3' / 'digest' / 'metadata').write_text('[]')
    for f in (tmp_path / '2' / 'state').rglob('*'):
        if f.is_file() and f.parent.name == 'd':
            f.unlink()  # the array data of step 2
    with caplog.at_level(logging.WARNING):
        state, step = checkpointing.restore_newest(str(tmp_path))
    assert step == 1 and float(state['w'][0]) == 1.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ['1', '2', '3']
    assert re.search(
        rf'checkpoint step 2 in {re.escape(str(tmp_path))} is unreadable '
        r'\(ValueError: NOT_FOUND: .+\); trying an older one',
        caplog.text,
    )
    messages = [r.getMessage() for r in caplog.records]
    assert f'checkpoint step 3 in {tmp_path} fails its digest check; trying an older one' in (
        messages
    )
    (tmp_path / '1' / 'digest' / 'metadata').write_text('{}')
    with pytest.raises(
        checkpointing.NoValidCheckpointError,
        match=rf'^no checkpoint in {re.escape(str(tmp_path))} restores: step\(s\) 3, 2, 1 are '
        r'damaged \(see the warnings above\)$',
    ):
        checkpointing.restore_newest(str(tmp_path))


def test_a_save_below_the_newest_step_is_written_not_skipped(tmp_path):
    # orbax skips a save at or below its newest step unless forced; after a fallback a job
    # writes such steps again, and must not lose them silently.
    ckpt = checkpointing.Checkpointer(str(tmp_path), asynchronous=False)
    try:
        ckpt.save(5, {'w': np.zeros(2, np.float32)})
        ckpt.save(3, {'w': np.ones(2, np.float32)})
        assert ckpt.steps() == [5, 3]
    finally:
        ckpt.close()


def test_float64_leaves_restored_as_float32_are_not_mistaken_for_damage(tmp_path):
    checkpointing.export_params(str(tmp_path), 1, {'b': np.full(3, 0.1)})
    state, step = checkpointing.restore_newest(str(tmp_path))
    assert step == 1
    np.testing.assert_array_equal(state['params']['b'], np.full(3, 0.1, np.float32))
