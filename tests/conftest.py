"""Test setup: 8 fake CPU devices (set before jax is imported), tiny configs, shared paths."""

import os
import pathlib

os.environ.setdefault('XLA_FLAGS', '--xla_force_host_platform_device_count=8')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

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


def module_compilation_cache(tmp_path_factory):
    """A persistent compilation cache for one test module (use as an autouse module fixture):
    programs the module jits again through fresh lambdas compile once; settings restored after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cache

    settings = {
        'jax_compilation_cache_dir': str(tmp_path_factory.mktemp('jax_cache')),
        'jax_persistent_cache_min_compile_time_secs': 0.0,
        'jax_persistent_cache_min_entry_size_bytes': 0,
    }
    before = {k: getattr(jax.config, k) for k in settings}
    for k, v in settings.items():
        jax.config.update(k, v)
    cache.reset_cache()
    yield
    for k, v in before.items():
        jax.config.update(k, v)
    cache.reset_cache()
