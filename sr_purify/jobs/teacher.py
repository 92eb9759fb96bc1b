"""Trains an SR network (the teacher) on HR/LR pairs with a pixel loss.

`train_and_evaluate(config, workdir)` resumes from <workdir>/checkpoints, evaluates PSNR/SSIM on
the held-out images every `eval_every` steps and at the end, and writes the results table,
results.json and an image grid LR | bicubic | SR | HR.
"""

import logging

import jax
import jax.numpy as jnp
import ml_collections

from sr_purify import losses, models, reporting, sharding, sr_data, training
from sr_purify.evaluators import sr as sr_eval


def sr_batches(config: ml_collections.ConfigDict, scale: int):
    """`start_step -> iterator` of this process's share of the training batches."""
    return lambda start_step: sr_data.sr_train_batches(
        config.data,
        scale=scale,
        global_batch=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def psnr_evaluator(apply_with_params, images, scale: int, prefix: str = 'eval'):
    """`(state, step) -> {'eval/psnr': ...}` on held-out images, for periodic evaluation."""
    apply = jax.jit(apply_with_params)

    def evaluate(state, step):
        del step
        params = sharding.to_host(state.params)  # Local copy: evaluation runs per process.
        m = sr_eval.evaluate_images(lambda x: apply(params, x), images, scale)
        return {
            f'{prefix}/psnr': m['psnr'],
            f'{prefix}/ssim': m['ssim'],
            f'{prefix}/bicubic_psnr': m['bicubic_psnr'],
        }

    return evaluate


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Trains, evaluates and reports; `writer` replaces the clu writer (tests record with it)."""
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    model = models.build(config.model)
    scale = sr_data.check_scale(config.model.scale)
    loss = losses.pixel_loss(config.get('loss', 'l1'))
    _, periodic_images = sr_data.eval_images(config.eval.datasets[0])

    def init_variables(rng):
        x = jnp.zeros((1, config.data.patch, config.data.patch, 3), jnp.float32)
        return model.init(rng, x)['params'], {}

    def loss_fn(params, model_state, batch, rng):
        del rng
        sr = model.apply({'params': params}, batch['lr'])
        return loss(sr, batch['hr']), (model_state, {})

    def apply_with_params(params, x):
        return model.apply({'params': params}, x)

    writer = writer or reporting.create_writer(workdir)
    result = training.fit(
        config,
        workdir,
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=sr_batches(config, scale),
        evaluate=psnr_evaluator(apply_with_params, periodic_images, scale),
        writer=writer,
    )
    if result.preempted:
        return result
    name = config.get('role', 'model')
    summary = sr_eval.compare(
        [(name, apply_with_params, sharding.to_host(result.state.params))],
        config.eval.datasets,
        scale,
        workdir,
        title=f'{name} ({config.model.name}) after {result.step} steps',
        writer=writer,
        step=result.step,
    )
    reporting.update_results(
        workdir,
        'train',
        {
            name: {
                'steps': result.step,
                'steps_per_sec': result.steps_per_sec,
                'wall_s': result.wall_s,
            }
        },
    )
    first = next(iter(summary['sr'].values()))[f'x{scale}']
    logging.info(
        '%s PSNR %.3f dB vs bicubic %.3f dB; %.2f steps/s',
        name,
        first[name]['psnr'],
        first['bicubic']['psnr'],
        result.steps_per_sec,
    )
    writer.flush()
    return result
