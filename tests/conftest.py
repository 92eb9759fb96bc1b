"""Test setup: 8 fake CPU devices and one compilation cache (set before jax is imported), tiny
configs, shared paths."""

import atexit
import os
import pathlib
import shutil
import tempfile

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

# One persistent compilation cache for the whole run: the tests and the launch.py processes they
# start compile the same tiny programs again and again (a tiny teacher launch: 25 s cold, 17 s
# with the cache, on a 2-core AVX2 EPYC). Created by the first process that loads this file (the
# xdist controller, or a plain pytest); workers and subprocesses inherit it through the
# environment, and the creator removes it at exit. Cached executables are the compiled ones, so
# results are unchanged; a user's own JAX_COMPILATION_CACHE_DIR is kept.
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
    _cache = tempfile.mkdtemp(prefix='sr_purify_tests_jax_cache_')
    os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')  # the tiny ones too

import ml_collections  # noqa: E402
import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


def tiny_sr_config(trainer: str = 'teacher') -> ml_collections.ConfigDict:
    """A teacher config small enough for a few steps in a test."""
    from configs import teacher

    c = teacher.get_config()
    c.model.num_blocks = 2
    c.model.features = 8
    c.data.patch = 8
    c.batch_size = 8
    c.total_steps = 2
    c.log_every = 1
    c.checkpoint_every = 1
    c.optim.schedule = 'constant'
    c.optim.warmup_steps = 0
    c.optim.lr = 1e-3
    c.trainer = trainer
    return c


@pytest.fixture
def sr_config():
    return tiny_sr_config()


class RecordingWriter:
    """A clu-like metric writer that keeps the scalars it is given."""

    def __init__(self):
        self.scalars = {}

    def write_scalars(self, step, scalars):
        self.scalars.setdefault(int(step), {}).update({k: float(v) for k, v in scalars.items()})

    def write_images(self, step, images):
        pass

    def write_summaries(self, *args, **kwargs):
        pass

    def write_texts(self, *args, **kwargs):
        pass

    def write_hparams(self, *args, **kwargs):
        pass

    def flush(self):
        pass

    def close(self):
        pass

    def losses(self):
        return {s: v['loss'] for s, v in sorted(self.scalars.items()) if 'loss' in v}
