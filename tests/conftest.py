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


def tiny_sr_workdir(workdir, scale: int = 2, seed: int = 0):
    """A teacher workdir as the teacher job leaves it (config.json, checkpoints/ at step 2): the
    tiny config's 2-block, 8-channel EDSR with the bicubic skip and small random weights, made by
    hand (training it would cost seconds of compiling; these tests need only some SR model)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sr_purify import checkpointing, models, reporting

    c = tiny_sr_config()
    c.model.scale = scale
    workdir = pathlib.Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    module = models.build(c.model)
    shapes = jax.eval_shape(lambda: module.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3))))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(
        lambda a: (0.05 * rng.standard_normal(a.shape)).astype(a.dtype), shapes['params']
    )
    reporting.write_config(str(workdir), c)
    checkpointing.export_params(str(workdir / 'checkpoints'), 2, params)
    return workdir


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
