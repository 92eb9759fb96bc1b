"""Preemption, kill -9, a real 2-process run, determinism and bad input (issue 6).

The subprocess tests run launch.py exactly as a user would, with a tiny teacher config.
"""

import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from conftest import REPO, RecordingWriter, tiny_sr_config

from sr_purify import sr_data
from sr_purify.jobs import teacher as teacher_job

TINY = [
    '--config=configs/teacher.py',
    '--config.model.num_blocks=2',
    '--config.model.features=8',
    '--config.data.patch=8',
    '--config.log_every=1',
    '--config.optim.warmup_steps=0',
]
LOSS_LINE = re.compile(r'\[(\d+)\] .*loss=([-+0-9.eE]+|nan|inf)')


def _env(devices: int):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS=f'--xla_force_host_platform_device_count={devices}',
        JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='2',
        PYTHONUNBUFFERED='1',
    )
    return env


def _launch(args, devices=1, **kwargs):
    return subprocess.Popen(
        [sys.executable, 'launch.py', *TINY, *args],
        cwd=REPO,
        env=_env(devices),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kwargs,
    )


def _losses(output: str):
    return {int(s): float(v) for s, v in LOSS_LINE.findall(output)}


def _wait_for_step(proc, step, timeout=240):
    """Reads the process output until it logs `step`; returns what it read."""
    out, t0 = [], time.time()
    while time.time() - t0 < timeout:
        line = proc.stdout.readline()
        if not line:
            break
        out.append(line)
        m = LOSS_LINE.search(line)
        if m and int(m.group(1)) >= step:
            return ''.join(out)
    raise AssertionError(f'step {step} never logged:\n{"".join(out)[-3000:]}')


def _saved_steps(workdir):
    ckpt = os.path.join(workdir, 'checkpoints')
    return sorted(int(n) for n in os.listdir(ckpt) if n.isdigit()) if os.path.isdir(ckpt) else []


def test_sigterm_saves_and_exits_cleanly_then_kill9_loses_only_unsaved_steps(tmp_path):
    workdir = str(tmp_path / 'run')
    args = [f'--workdir={workdir}', '--config.total_steps=100000', '--config.checkpoint_every=1000']
    proc = _launch(args)
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, rest[-2000:]
    m = re.search(r'stopped by signal at step (\d+); checkpoint saved', rest)
    assert m, rest[-2000:]
    stopped = int(m.group(1))
    assert _saved_steps(workdir) == [stopped]

    # Resume, let it save every step, then kill -9: at most the unsaved step is lost.
    proc = _launch(args[:-1] + ['--config.checkpoint_every=1'])
    out = _wait_for_step(proc, stopped + 3)
    assert min(_losses(out)) == stopped + 1  # It resumed where the signal stopped it.
    proc.kill()
    proc.communicate(timeout=60)
    saved = _saved_steps(workdir)  # A save in flight at the kill leaves only a tmp folder.
    assert saved and saved[-1] >= stopped + 1

    proc = _launch([f'--workdir={workdir}', f'--config.total_steps={saved[-1] + 1}'])
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-2000:]
    assert sorted(_losses(out)) == [saved[-1] + 1]


def test_without_workdir_the_job_writes_to_workdirs_named_after_the_config(tmp_path):
    # The README's quick start passes no --workdir: the job must pick workdirs/<config name>
    # under the current directory (a shadowed `flags` once broke exactly this path).
    args = [f'--config={REPO}/configs/teacher.py', *TINY[1:], '--config.total_steps=2']
    proc = subprocess.run(
        [sys.executable, str(REPO / 'launch.py'), *args],
        cwd=tmp_path,
        env=_env(1),
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-2000:]
    results = os.path.join('workdirs', 'teacher', 'results.json')
    assert f'done: results in {results}' in out
    assert (tmp_path / results).is_file()


def _free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_and_only_process_0_writes(tmp_path):
    steps = ['--config.total_steps=3', '--config.checkpoint_every=3']
    port = _free_port()
    multi = str(tmp_path / 'multi')
    procs = [
        _launch(
            [
                *steps,
                f'--workdir={multi}',
                f'--coordinator_address=localhost:{port}',
                '--num_processes=2',
                f'--process_id={i}',
            ],
            devices=2,
        )
        for i in (0, 1)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
    assert 'process 0 of 2; 2 local / 4 global devices' in outs[0]
    assert 'process 1 of 2; 2 local / 4 global devices' in outs[1]
    single = _launch([*steps, f'--workdir={tmp_path / "single"}'], devices=4)
    out_single = single.communicate(timeout=300)[0]
    assert single.returncode == 0, out_single[-3000:]
    expected = _losses(out_single)
    assert sorted(expected) == [1, 2, 3]
    for out in outs:  # Every process logs the same global losses.
        np.testing.assert_allclose(
            [_losses(out)[s] for s in (1, 2, 3)], [expected[s] for s in (1, 2, 3)], rtol=1e-6
        )
    events = [f for f in os.listdir(multi) if f.startswith('events.out.tfevents')]
    assert len(events) == 1 and os.path.exists(os.path.join(multi, 'results.json'))
    assert _saved_steps(multi) == [3]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step_then_resumes(tmp_path):
    port, workdir = _free_port(), str(tmp_path / 'multi')

    def pair(total, port):
        return [
            _launch(
                [
                    f'--workdir={workdir}',
                    f'--config.total_steps={total}',
                    '--config.checkpoint_every=1000',
                    '--config.optim.schedule=constant',  # The rate must not depend on the total.
                    f'--coordinator_address=localhost:{port}',
                    '--num_processes=2',
                    f'--process_id={i}',
                ],
                devices=2,
            )
            for i in (0, 1)
        ]

    procs = pair(100000, port)
    _wait_for_step(procs[1], 3)
    procs[1].send_signal(signal.SIGTERM)  # Only process 1 hears it.
    outs = [p.communicate(timeout=180)[0] for p in procs]
    stopped = []
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        m = re.search(r'stopped by signal at step (\d+); checkpoint saved', out)
        assert m, out[-3000:]
        stopped.append(int(m.group(1)))
    assert stopped[0] == stopped[1] and _saved_steps(workdir) == [stopped[0]]
    # The rerun resumes from that step and logs what an uninterrupted run logs.
    step = stopped[0] + 1
    procs = pair(step, _free_port())
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-3000:]
        assert sorted(_losses(out)) == [step]
    single = _launch(
        [
            f'--config.total_steps={step}',
            '--config.optim.schedule=constant',
            f'--workdir={tmp_path / "one"}',
        ],
        devices=4,
    )
    out_single = single.communicate(timeout=300)[0]
    assert single.returncode == 0, out_single[-3000:]
    np.testing.assert_allclose(_losses(outs[0])[step], _losses(out_single)[step], rtol=1e-6)


def _train(cfg, workdir):
    result = teacher_job.train_and_evaluate(cfg, str(workdir), writer=RecordingWriter())
    return jax.tree.leaves(jax.tree.map(np.asarray, result.state.params))


def test_same_seed_gives_bit_identical_parameters_also_across_a_resume(tmp_path):
    cfg = tiny_sr_config()
    cfg.total_steps = 4
    a = _train(cfg, tmp_path / 'a')
    b = _train(cfg, tmp_path / 'b')
    half = tiny_sr_config()
    half.total_steps = 2
    _train(half, tmp_path / 'c')
    c = _train(cfg, tmp_path / 'c')  # Resumes from step 2.
    for x, y, z in zip(a, b, c):
        np.testing.assert_array_equal(x, y)
        np.testing.assert_array_equal(x, z)


def test_corrupt_image_is_named_or_skipped_and_counted(tmp_path, caplog):
    from PIL import Image

    folder = tmp_path / 'imgs'
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(folder / 'good.png')
    (folder / 'broken.png').write_bytes(b'\x89PNG\r\n\x1a\n' + b'garbage' * 10)
    with pytest.raises(ValueError, match=r"cannot read image '.*broken.png'.*skip_bad=True"):
        sr_data.eval_images(str(folder))
    _, images = sr_data.eval_images(str(folder), skip_bad=True)
    assert [im.name for im in images] == ['good']
    assert 'skipped 1 unreadable image(s)' in caplog.text


def test_bad_batch_and_unwritable_workdir_fail_before_training(tmp_path):
    cfg = tiny_sr_config()
    cfg.batch_size = 6
    with pytest.raises(ValueError, match=r'global batch 6 is not divisible by the 8 devices'):
        _train(cfg, tmp_path / 'batch')
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    with pytest.raises(PermissionError, match=r'workdir .* is not writable.*pass a writable'):
        _train(tiny_sr_config(), blocker / 'workdir')
    assert not (tmp_path / 'batch' / 'checkpoints').exists()
