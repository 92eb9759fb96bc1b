"""Rate of the tf.data SR input pipeline against the teacher train step it feeds.

Run by hand (never in CI):

  python bench/input_pipeline.py [--config=configs/teacher.py] [--tuned] [--repeats=5]

Rows: batches/s of `sr_data.sr_train_batches` alone (the config's source, batch and patch); steps/s
of the config's train step alone on one fixed batch (the real path: `create_state`,
`make_train_step`, `compile_step`); and the training loop as `training.fit` runs it (a fresh batch
from the pipeline every step), whose slowdown against the fixed batch is what the input costs
when both share the CPU. Target: the pipeline at least 3x the step's rate. The three are timed in
turns and medians reported.
"""

import argparse
import importlib.util
import os
import sys
import time

p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
p.add_argument('--config', default='configs/teacher.py', help='job config file[:variant]')
p.add_argument('--repeats', type=int, default=5, help='timed turns')
p.add_argument('--batches', type=int, default=40, help='pipeline batches per turn')
p.add_argument('--steps', type=int, default=5, help='train steps per turn')
p.add_argument('--tuned', action='store_true', help='apply sr_purify.perf CPU settings')
ARGS = p.parse_args()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from sr_purify import perf  # noqa: E402  (imports no jax)

if ARGS.tuned:
    perf.apply_cpu_defaults(force=True)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import tensorflow as tf  # noqa: E402

tf.config.set_visible_devices([], 'GPU')
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from sr_purify import losses, models, sharding, sr_data, training  # noqa: E402


def load_config(spec):
    path, _, arg = spec.partition(':')
    module_spec = importlib.util.spec_from_file_location('job_config', os.path.join(ROOT, path))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def main():
    config = load_config(ARGS.config)
    scale = config.model.scale
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.batch_size, mesh)
    model = models.build(config.model)
    loss = losses.pixel_loss(config.get('loss', 'l1'))
    patch = config.data.patch

    def init_variables(rng):
        return model.init(rng, jnp.zeros((1, patch, patch, 3), jnp.float32))['params'], {}

    def loss_fn(params, model_state, batch, rng):
        del rng
        return loss(model.apply({'params': params}, batch['lr']), batch['hr']), (model_state, {})

    tx, schedule = training.make_optimizer(config.optim, config.total_steps)
    state, state_sharding = training.create_state(init_variables, tx, mesh, jax.random.key(0))
    step = training.compile_step(
        training.make_train_step(loss_fn, tx, schedule), mesh, state_sharding
    )
    rng = jax.random.key(1)
    t = time.perf_counter()
    it = sr_data.sr_train_batches(
        config.data, scale=scale, global_batch=config.batch_size, seed=config.seed
    )
    fixed = sharding.to_global(next(it), mesh)
    first_batch = time.perf_counter() - t
    holder = [state]

    def run_step(batch):
        holder[0], metrics = step(holder[0], batch, rng)
        return metrics

    t = time.perf_counter()
    jax.block_until_ready(run_step(fixed))
    first_step = time.perf_counter() - t

    def pipeline_turn():
        t = time.perf_counter()
        for _ in range(ARGS.batches):
            next(it)
        return (time.perf_counter() - t) / ARGS.batches

    def step_turn():
        t = time.perf_counter()
        for _ in range(ARGS.steps):
            metrics = run_step(fixed)
        jax.block_until_ready((holder[0], metrics))
        return (time.perf_counter() - t) / ARGS.steps

    def loop_turn():  # As training.fit: global batch from the iterator, then the step.
        t = time.perf_counter()
        for _ in range(ARGS.steps):
            metrics = run_step(sharding.to_global(next(it), mesh))
        jax.block_until_ready((holder[0], metrics))
        return (time.perf_counter() - t) / ARGS.steps

    turns = {'pipeline': pipeline_turn, 'step': step_turn, 'loop': loop_turn}
    for fn in turns.values():
        fn()
    times = {k: [] for k in turns}
    for _ in range(ARGS.repeats):
        for k, fn in turns.items():
            times[k].append(fn())
    med = {k: float(np.median(v)) for k, v in times.items()}
    batch = f'batch {config.batch_size} of {patch}x{patch} LR (x{scale})'
    print(
        f'# {ARGS.config}: {sr_data.describe(config.data)}, {batch}, {config.model.name}; '
        f'{jax.device_count()} device(s), {os.cpu_count()} cores, XLA_FLAGS='
        f'{os.environ.get("XLA_FLAGS", "")!r}; first batch {first_batch:.1f} s, first step '
        f'(compile) {first_step:.1f} s; load average {os.getloadavg()[0]:.1f}'
    )
    print()
    print('| what | per second | ms each | against the step |')
    print('| --- | --- | --- | --- |')
    print(
        f'| input pipeline alone (batches) | {1 / med["pipeline"]:.1f} | '
        f'{med["pipeline"] * 1e3:.1f} | {med["step"] / med["pipeline"]:.1f}x faster |'
    )
    print(
        f'| train step alone, fixed batch (steps) | {1 / med["step"]:.2f} | '
        f'{med["step"] * 1e3:.0f} | 1.0x |'
    )
    print(
        f'| training loop, batches from the pipeline (steps) | {1 / med["loop"]:.2f} | '
        f'{med["loop"] * 1e3:.0f} | {100 * (med["loop"] / med["step"] - 1):+.1f} % time |'
    )
    ok = med['step'] / med['pipeline'] >= 3
    print(f'\nTarget (pipeline >= 3x the step): {"met" if ok else "NOT met"}.')


if __name__ == '__main__':
    main()
