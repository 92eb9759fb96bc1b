"""The model-extraction attack: the job reaches the victim only through its answers, trains a
surrogate per query budget on the 8 fake devices, and its batches and errors are as documented."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from conftest import REPO, RecordingWriter, tiny_sr_workdir
from PIL import Image

from configs import extract as extract_config
from sr_purify import extraction, jobs, restore

TIMING = ('train_s', 'steps_per_sec')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """The thief's 3 photos (one gray) and an eval set with an RGB and a gray image."""
    root = tmp_path_factory.mktemp('extract_data')
    rng = np.random.default_rng(0)
    (root / 'query').mkdir()
    (root / 'eval').mkdir()
    (root / 'empty').mkdir()
    for name, shape in (('a', (36, 40, 3)), ('b', (33, 34, 3)), ('c', (32, 38))):
        Image.fromarray(rng.integers(0, 256, shape, np.uint8)).save(root / 'query' / f'{name}.png')
    Image.fromarray(rng.integers(0, 256, (24, 28, 3), np.uint8)).save(root / 'eval' / 'rgb.png')
    Image.fromarray(rng.integers(0, 256, (22, 20), np.uint8)).save(root / 'eval' / 'gray.png')
    return root


@pytest.fixture(scope='module')
def victim(tmp_path_factory):
    """A teacher workdir as the teacher job leaves it (config.json, checkpoints/): a 2-block,
    8-channel EDSR x2 with random weights. Made by hand: training it would cost 20 s of compiling
    and the attack needs only some SR model behind the service."""
    return tiny_sr_workdir(tmp_path_factory.mktemp('victim'))


def tiny_config(victim, data):
    c = extract_config.get_config()
    c.victim, c.query_data = str(victim), str(data / 'query')
    c.budgets = (1, 0, 50)  # 0 and 50 both mean all 3 images: budgets 1 and 3.
    c.surrogate.name = 'fsrcnn'
    c.surrogate.fsrcnn.update(features=8, shrink=4, num_maps=1)
    c.patch, c.batch_size, c.total_steps, c.log_every, c.checkpoint_every = 8, 8, 2, 1, 2
    c.optim.warmup_steps = 0
    c.eval.datasets = [str(data / 'eval')]
    return c


def _key(lr):
    return lr.tobytes() + str(lr.shape).encode()


@pytest.fixture(scope='module')
def first_run(victim, data, tmp_path_factory):
    """The job on the real victim (BlackBox.from_path), every answer recorded by query bytes."""
    table, boxes = {}, []
    real_from_path = extraction.BlackBox.from_path

    def recording(path, **kwargs):
        real = real_from_path(path, **kwargs)
        boxes.append(real)
        return extraction.BlackBox(lambda lr: table.setdefault(_key(lr), real.query(lr)), 2)

    workdir = tmp_path_factory.mktemp('extract_real')
    writer = RecordingWriter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(extraction.BlackBox, 'from_path', recording)
        summary = jobs.get('extract')(tiny_config(victim, data), str(workdir), writer=writer)
    return dict(workdir=workdir, writer=writer, summary=summary, table=table, box=boxes[0])


def _numbers(summary):
    """The summary without timings or paths: what must not depend on how the victim is run."""
    out = json.loads(json.dumps(summary))
    for s in out['surrogates'].values():
        for k in TIMING + ('folder',):
            s.pop(k)
    out.pop('served_by')
    return out


def _has_array(tree):
    return any(isinstance(x, (np.ndarray, jax.Array)) for x in jax.tree.leaves(tree))


def test_the_job_reads_no_victim_parameter(first_run, victim, data, tmp_path, monkeypatch):
    # The same job on a lookup table of the recorded answers, no model at all, gives bitwise the
    # same surrogates and numbers: the answers are all it ever used.
    table = dict(first_run['table'])
    lookup = extraction.BlackBox(lambda lr: table[_key(lr)], 2)
    monkeypatch.setattr(extraction.BlackBox, 'from_path', lambda path, **kwargs: lookup)
    summary = jobs.get('extract')(
        tiny_config(victim, data), str(tmp_path), writer=RecordingWriter()
    )
    assert _numbers(summary) == _numbers(first_run['summary'])
    assert lookup.queries == first_run['box'].queries == 3 + 2  # 3 thief images, 2 eval images
    for name in ('fsrcnn_q1', 'fsrcnn_q3'):
        a = restore.load(str(first_run['workdir'] / 'surrogates' / name), 'sr')
        b = restore.load(str(tmp_path / 'surrogates' / name), 'sr')
        assert a.job == 'extract' and a.scale == 2 and a.model_config.name == 'fsrcnn'
        leaves_a, leaves_b = jax.tree.leaves(a.params), jax.tree.leaves(b.params)
        assert leaves_a and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))
    # The boxes hold counters and a closure: no array, no params tree, no model.
    for box in (first_run['box'], lookup):
        assert not _has_array(vars(box))
        assert not any(k in vars(box) for k in ('params', 'variables', 'model', 'apply'))


def test_surrogates_train_on_8_devices_and_report_honest_queries(first_run):
    assert jax.device_count() == 8
    summary, writer = first_run['summary'], first_run['writer']
    assert summary['budgets'] == [1, 3] and summary['scale'] == 2
    assert summary['training_queries'] == 3 and summary['evaluation_queries'] == 2
    assert [s['queries'] for s in summary['surrogates'].values()] == [1, 3]
    # LR of the query photos (mod-cropped, /2): 18x20, 16x17, 16x19 pixels.
    assert [s['pixels_queried'] for s in summary['surrogates'].values()] == [360, 360 + 272 + 304]
    assert (
        summary['pixels_queried'] == 936
        and summary['evaluation_pixels_queried'] == 12 * 14 + 11 * 10
    )
    for name, s in summary['surrogates'].items():
        assert s['steps'] == 2
        losses = {k: v[f'{name}/loss'] for k, v in writer.scalars.items() if f'{name}/loss' in v}
        assert sorted(losses) == [1, 2] and all(np.isfinite(list(losses.values())))
        m = s['datasets']['eval']
        assert all(np.isfinite([m['psnr'], m['ssim'], m['fidelity_psnr'], m['fidelity_ssim']]))
    ref = summary['datasets']['eval']
    assert set(ref) == {'victim', 'bicubic'} and np.isfinite(ref['bicubic']['fidelity_psnr'])
    results = json.loads((first_run['workdir'] / 'results.json').read_text())
    assert results['extract']['budgets'] == [1, 3]
    text = (first_run['workdir'] / 'extract_table.md').read_text()
    assert '| eval | fsrcnn_q3 | 3 |' in text and '| eval | victim |' in text
    assert writer.scalars[3]['extract/eval/fidelity_psnr'] == pytest.approx(
        summary['surrogates']['fsrcnn_q3']['datasets']['eval']['fidelity_psnr']
    )


def nearest(lr, s):
    return np.repeat(np.repeat(lr, s, -3), s, -2)


def test_pair_batches_are_aligned_repeatable_and_split_over_processes():
    rng = np.random.default_rng(1)
    box = extraction.BlackBox(lambda lr: nearest(lr, 3), 3)
    lrs = [rng.integers(0, 256, shape, np.uint8) for shape in ((12, 15, 3), (10, 10, 3))]
    pairs = extraction.collect_pairs(box, lrs)
    assert box.queries == 2 and box.pixels_queried == 12 * 15 + 10 * 10
    kw = dict(scale=3, patch=6, global_batch=8, seed=5)
    it = extraction.pair_batches(pairs, **kw)
    batches = [next(it) for _ in range(3)]
    for b in batches:
        assert b['lr'].shape == (8, 6, 6, 3) and b['hr'].shape == (8, 18, 18, 3)
        assert b['lr'].dtype == np.float32 and 0 <= b['lr'].min() and b['hr'].max() <= 1
        np.testing.assert_array_equal(b['hr'], nearest(b['lr'], 3))  # The answer under the crop.
    assert not np.array_equal(batches[0]['lr'], batches[1]['lr'])
    resumed = next(extraction.pair_batches(pairs, **kw, start_step=2))
    for k in ('lr', 'hr'):
        np.testing.assert_array_equal(resumed[k], batches[2][k])
        halves = [
            next(
                extraction.pair_batches(pairs, **kw, start_step=1, process_index=i, process_count=2)
            )
            for i in (0, 1)
        ]
        np.testing.assert_array_equal(np.concatenate([h[k] for h in halves]), batches[1][k])
    with pytest.raises(ValueError, match=r'smaller than the LR patch of 11 pixels.*--config.patch'):
        next(extraction.pair_batches(pairs, **dict(kw, patch=11)))


def test_query_images_downscale_as_the_service_expects(data):
    small = extraction.query_images(str(data / 'query'), 2)
    as_is = extraction.query_images(str(data / 'query'), 2, downscale=False, limit=2)
    assert [im.name for im in small] == ['a', 'b', 'c'] and [im.name for im in as_is] == ['a', 'b']
    assert [im.pixels.shape for im in small] == [(18, 20, 3), (16, 17, 3), (16, 19, 3)]
    assert as_is[1].pixels.shape == (33, 34, 3) and small[0].pixels.dtype == np.uint8
    assert extraction.resolve_budgets((100, 1, 0, 2), 3) == [1, 2, 3]
    assert extract_config.get_config().surrogate.name == 'edsr'
    assert extract_config.get_config('fsrcnn').surrogate.name == 'fsrcnn'


def _one_line(excinfo):
    return len(str(excinfo.value).splitlines()) == 1


def test_one_line_errors_name_the_flag(victim, data, tmp_path):
    classifier = tmp_path / 'classifier'
    classifier.mkdir()
    (classifier / 'config.json').write_text(json.dumps({'trainer': 'classifier'}))
    evaluation = tmp_path / 'evaluation'
    evaluation.mkdir()
    (evaluation / 'config.json').write_text(json.dumps({'trainer': 'evaluate'}))
    for path, pattern in (
        (classifier, r"--config.victim: .* is a classifier job's workdir, not an SR model"),
        (evaluation, r"'evaluate' job, which trains no model; pass --config.victim="),
        (tmp_path / 'nowhere', r'no SR model checkpoint in .*; pass --config.victim='),
        (data / 'query', r'has no config.json .*; pass --config.victim='),
    ):
        with pytest.raises((ValueError, FileNotFoundError), match=pattern) as e:
            extraction.BlackBox.from_path(str(path))
        assert _one_line(e)
    for path in (data / 'empty', tmp_path / 'nowhere'):
        with pytest.raises(ValueError, match=r'pass --config.query_data=') as e:
            extraction.query_images(str(path), 2)
        assert _one_line(e)
    c = tiny_config(victim, data)
    c.victim = ''
    with pytest.raises(FileNotFoundError, match=r'^no victim given; pass --config.victim='):
        jobs.get('extract')(c, str(tmp_path / 'job'))
    c = tiny_config(victim, data)
    c.budgets = (1, -2)
    with pytest.raises(ValueError, match=r'config.budgets=\(1, -2\)'):
        jobs.get('extract')(c, str(tmp_path / 'job'))


def test_launch_refuses_a_missing_victim_in_one_line(tmp_path):
    cmd = [sys.executable, 'launch.py', '--config=configs/extract.py', f'--workdir={tmp_path}']
    env = dict(os.environ, XLA_FLAGS='')
    for extra, pattern in (
        ([], r'error: no victim given; pass --config\.victim='),
        ([f'--config.victim={tmp_path / "x"}'], r"error: --config.victim='.*x' does not exist"),
    ):
        proc = subprocess.run(
            cmd + extra, cwd=REPO, capture_output=True, text=True, timeout=120, env=env
        )
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and re.match(pattern, lines[0]), lines
