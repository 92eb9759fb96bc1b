"""The model-extraction job (configs/extract.py): surrogates trained on a victim's outputs alone.

The victim is reached only through `extraction.BlackBox` (uint8 queries in, uint8 answers out),
so nothing here can read its parameters. Each query image is sent once; the answers are cached
and the larger budgets reuse them, while each budget reports the queries its own surrogate used.
Every process queries the victim itself (the pairs are small) and trains on its slice of each
batch. A surrogate is an SR model folder, <workdir>/surrogates/<name>_q<n> (config.json and
checkpoints/), that `restore.load` and every job take; a rerun resumes its training (and asks
the victim again: the answers are not stored).

The victim's answers on the eval sets' LR images are asked once too, and counted apart from the
thief's queries: they are the experimenter's measurement, not the attack.
"""

import logging
from typing import List, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sr_purify import (
    extraction,
    image_ops,
    losses,
    models,
    paths,
    reporting,
    sharding,
    sr_data,
    training,
)
from sr_purify.evaluators import sr as sr_eval

TABLE = 'extract_table.md'


class _Prefixed:
    """A metric writer that files one surrogate's training scalars under `<prefix>/`."""

    def __init__(self, writer, prefix: str):
        self._writer, self._prefix = writer, prefix

    def write_scalars(self, step, scalars):
        self._writer.write_scalars(step, {f'{self._prefix}/{k}': v for k, v in scalars.items()})

    def __getattr__(self, name):
        return getattr(self._writer, name)


def _key(lr: np.ndarray) -> bytes:
    return lr.tobytes() + str(lr.shape).encode()


class _Recorded:
    """The victim's answers on the eval sets' LR images, asked once each, as an `apply` for
    `sr_eval` (NHWC float in [0, 1], one image): a recorded answer, never a new query."""

    def __init__(self, box: extraction.BlackBox, eval_sets: Sequence[dict], scale: int):
        self.answers = {}
        for eval_set in eval_sets:
            for im in eval_set['images']:
                lr = sr_eval.make_lr(im.pixels, scale)
                lr = np.repeat(lr[..., None], 3, -1) if lr.ndim == 2 else lr  # as upscale() sends
                if _key(lr) not in self.answers:  # A repeated image is asked once.
                    self.answers[_key(lr)] = box.query(lr)

    def __call__(self, x) -> np.ndarray:
        lr = np.round(np.asarray(x)[0] * 255.0).astype(np.uint8)  # Exact: x is uint8 / 255.
        return self.answers[_key(lr)][None].astype(np.float32) / 255.0


def _fidelity(apply: Optional[sr_eval.SRFn], victim: _Recorded, images, scale: int) -> dict:
    """Mean PSNR/SSIM (Y, shaved, as `image_ops.psnr`) of `apply`'s outputs (bicubic for None)
    against the victim's on the same LR images."""
    psnr, ssim = [], []
    for im in images:
        lr = sr_eval.make_lr(im.pixels, scale)
        out = image_ops.imresize(lr, scale) if apply is None else sr_eval.upscale(apply, lr)
        ref = sr_eval.upscale(victim, lr)
        psnr.append(image_ops.psnr(out, ref, scale))
        ssim.append(image_ops.ssim(out, ref, scale))
    return {'fidelity_psnr': float(np.mean(psnr)), 'fidelity_ssim': float(np.mean(ssim))}


def _score(apply: Optional[sr_eval.SRFn], victim: _Recorded, images, scale: int) -> dict:
    """Quality (vs HR) and fidelity (vs the victim) of `apply`, or of bicubic for None."""
    quality = sr_eval.evaluate_images(apply, images, scale)
    prefix = 'bicubic_' if apply is None else ''
    return {
        'psnr': quality[f'{prefix}psnr'],
        'ssim': quality[f'{prefix}ssim'],
        **_fidelity(apply, victim, images, scale),
    }


def _surrogate_config(config, surrogate, scale: int, n: int, pixels: int):
    """The job config as the surrogate's own folder records it: `restore.load` reads `model`."""
    c = ml_collections.ConfigDict(config.to_dict())
    c.model = surrogate
    c.scale = scale
    c.queries = n
    c.pixels_queried = pixels
    return c


def _table_rows(summary: dict) -> List[list]:
    rows = []
    for set_name, ref in summary['datasets'].items():
        victim, bicubic = ref['victim'], ref['bicubic']
        rows.append([set_name, 'victim', '-', '-', '-', victim['psnr'], victim['ssim'], '-', '-'])
        rows.append(
            [set_name, 'bicubic', 0, bicubic['fidelity_psnr'], bicubic['fidelity_ssim']]
            + [bicubic['psnr'], bicubic['ssim'], 0, '-']
        )
        for name, s in summary['surrogates'].items():
            m = s['datasets'][set_name]
            rows.append(
                [set_name, name, s['queries'], m['fidelity_psnr'], m['fidelity_ssim']]
                + [m['psnr'], m['ssim'], s['params'], s['train_s']]
            )
    return rows


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, writer=None):
    """Queries the victim, trains one surrogate per budget and reports fidelity and quality.

    Returns the summary (also results.json's `extract` section), or the FitResult of a surrogate
    whose training a signal stopped. `writer` replaces the clu writer (tests record with it).
    """
    if not config.victim:
        raise FileNotFoundError(
            f'no victim given; pass {extraction.VICTIM_FLAG}=<a teacher or student workdir, or '
            f'an export folder>'
        )
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    box = extraction.BlackBox.from_path(config.victim, runtime=config.get('runtime', 'auto'))
    scale = box.scale
    requested = extraction.check_budgets(config.budgets)
    limit = 0 if 0 in requested else max(requested, default=0)
    thief_images = extraction.query_images(config.query_data, scale, config.downscale, limit)
    budgets = extraction.resolve_budgets(requested, len(thief_images))
    logging.info(
        'extract x%d from %s: budgets %s of %d query image(s) from %s',
        scale,
        box.source,
        budgets,
        len(thief_images),
        config.query_data,
    )

    eval_sets = [
        dict(zip(('name', 'images'), sr_data.eval_images(s))) for s in config.eval.datasets
    ]
    before = (box.queries, box.pixels_queried)
    victim = _Recorded(box, eval_sets, scale)
    eval_queries, eval_pixels = box.queries - before[0], box.pixels_queried - before[1]

    surrogate = ml_collections.ConfigDict(config.surrogate.to_dict())
    surrogate.scale = scale  # The victim's: the thief sees it in every answer.
    module = models.build(surrogate)
    loss = losses.pixel_loss(config.get('loss', 'l1'))
    apply_fn = jax.jit(lambda p, x: module.apply({'params': p}, x))  # Compiled once per shape.

    def init_variables(rng):
        return module.init(rng, jnp.zeros((1, config.patch, config.patch, 3)))['params'], {}

    def loss_fn(params, model_state, batch, rng):
        del rng
        return loss(module.apply({'params': params}, batch['lr']), batch['hr']), (model_state, {})

    def fidelity_evaluator(state, step):
        del step
        params = sharding.to_host(state.params)
        first = eval_sets[0]
        m = _fidelity(lambda x: apply_fn(params, x), victim, first['images'], scale)
        return {f'eval/{first["name"]}/fidelity_psnr': m['fidelity_psnr']}

    writer = writer or reporting.create_writer(workdir)
    summary = {
        'victim': config.victim,
        'served_by': box.source,
        'scale': scale,
        'query_data': config.query_data,
        'downscale': bool(config.downscale),
        'budgets': budgets,
        'query_images': len(thief_images),
        'datasets': {
            s['name']: {
                'victim': {
                    k: v
                    for k, v in sr_eval.evaluate_images(victim, s['images'], scale).items()
                    if k in ('psnr', 'ssim')
                },
                'bicubic': _score(None, victim, s['images'], scale),
            }
            for s in eval_sets
        },
        'surrogates': {},
        'evaluation_queries': eval_queries,
        'evaluation_pixels_queried': eval_pixels,
    }
    pairs = []
    for n in budgets:
        # Only the images this budget adds are asked; the smaller budgets' answers are reused.
        pairs += extraction.collect_pairs(box, thief_images[len(pairs) : n])
        name = f'{surrogate.name}_q{n}'
        folder = paths.join(workdir, 'surrogates', name)
        pixels = int(sum(lr.shape[0] * lr.shape[1] for lr, _ in pairs[:n]))
        reporting.check_workdir(folder)
        reporting.write_config(folder, _surrogate_config(config, surrogate, scale, n, pixels))
        budget_pairs = pairs[:n]
        result = training.fit(
            config,
            folder,
            init_variables=init_variables,
            loss_fn=loss_fn,
            batches=lambda start, p=budget_pairs: extraction.pair_batches(
                p,
                scale=scale,
                patch=config.patch,
                global_batch=config.batch_size,
                seed=config.seed,
                start_step=start,
                process_index=jax.process_index(),
                process_count=jax.process_count(),
            ),
            evaluate=fidelity_evaluator,
            writer=_Prefixed(writer, name),
        )
        if result.preempted:
            return result
        params = sharding.to_host(result.state.params)
        apply = lambda x, p=params: apply_fn(p, x)
        summary['surrogates'][name] = {
            'folder': folder,
            'queries': n,
            'pixels_queried': pixels,
            'params': models.parameter_count(params),
            'steps': result.step,
            'train_s': result.wall_s,
            'steps_per_sec': result.steps_per_sec,
            'datasets': {s['name']: _score(apply, victim, s['images'], scale) for s in eval_sets},
        }
        for set_name, ref in summary['datasets'].items():
            m = summary['surrogates'][name]['datasets'][set_name]
            logging.info(
                '%s (%d queries) on %s: fidelity %.2f dB, %.2f dB vs HR (victim %.2f)',
                name,
                n,
                set_name,
                m['fidelity_psnr'],
                m['psnr'],
                ref['victim']['psnr'],
            )
            writer.write_scalars(
                n,
                {
                    **{f'extract/{set_name}/{k}': v for k, v in m.items()},
                    f'extract/{set_name}/victim_psnr': ref['victim']['psnr'],
                    f'extract/{set_name}/bicubic_psnr': ref['bicubic']['psnr'],
                },
            )
    summary['training_queries'] = box.queries - eval_queries
    summary['pixels_queried'] = box.pixels_queried - eval_pixels

    title = f'extraction of {config.victim} (x{scale}) by {surrogate.name} surrogates'
    header = [
        'dataset',
        'model',
        'queries',
        'fidelity PSNR',
        'fidelity SSIM',
        'PSNR vs HR',
        'SSIM vs HR',
        'params',
        'train s',
    ]
    table = reporting.log_table(title, header, _table_rows(summary))
    note = (
        "Fidelity: Y-channel PSNR/SSIM against the victim's served outputs on the LR images "
        f"(border {scale} shaved); quality: against HR. Queries: the thief's images (of "
        f'{config.query_data}), each asked once.'
    )
    reporting.write_text(workdir, TABLE, f'# {title}\n\n{table}\n\n{note}')
    reporting.update_results(workdir, 'extract', summary)
    writer.flush()
    return summary
