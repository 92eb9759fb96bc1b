"""The watermark job (configs/watermark.py): the owner's marked copy of a trained SR model.

Writes <workdir>/config.json (the source's architecture and the key), checkpoints/ (the source's
parameters, unchanged: the mark has none), probes/*.png (the LR tiles verification runs a suspect
on), watermark_table.md and the `watermark` section of results.json: PSNR/SSIM of the model with
and without the mark, and the test on the marked model and on the clean one.
"""

import logging
import secrets
from typing import List, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sr_purify import checkpointing, image_ops, inference, paths, reporting, restore, sr_data
from sr_purify import watermark as wm
from sr_purify.evaluators import sr as sr_eval

PROBE_FOLDER = 'probes'


def probe_tiles(datasets: Sequence[str], scale: int, size: int) -> np.ndarray:
    """Non-overlapping `size` x `size` tiles of the sets' LR images, float32 (N, size, size, 3)."""
    tiles = []
    for spec in datasets:
        for image in sr_data.eval_images(spec)[1]:
            hr = (
                image.pixels
                if image.pixels.ndim == 3
                else np.repeat(image.pixels[..., None], 3, -1)
            )
            lr = np.asarray(sr_eval.make_lr(image_ops.modcrop(hr[..., :3], scale), scale))
            for y in range(0, lr.shape[0] - size + 1, size):
                for x in range(0, lr.shape[1] - size + 1, size):
                    tiles.append(lr[y : y + size, x : x + size])
    if not tiles:
        raise ValueError(f'no {size}x{size} LR tile fits in {list(datasets)}; lower probes.size')
    tiles = np.stack(tiles)
    return tiles.astype(np.float32) / 255.0 if tiles.dtype == np.uint8 else tiles


def probe_names(count: int) -> List[str]:
    return [f'probe_{i:03d}' for i in range(count)]


def run_batched(apply, probes: np.ndarray, batch: int = 16) -> np.ndarray:
    """`apply` over the probes in batches, quantised to 8 bits as a served PNG is."""
    outs = [
        np.asarray(apply(jnp.asarray(probes[i : i + batch]))) for i in range(0, len(probes), batch)
    ]
    return np.round(np.clip(np.concatenate(outs), 0, 1) * 255) / 255


def calibrated_strength(
    source, seed: int, datasets: Sequence[str], scale: int, max_cost_db: float
) -> float:
    """The strength whose mark costs `max_cost_db` of PSNR on the worst of
    `datasets` (wm.strength_for_cost), from one pass of the clean model and the unit mark."""
    weights = wm.mark_weights(seed)
    clean = jax.jit(lambda x: source.module.apply(source.variables, x))
    unit = jax.jit(lambda x: wm.mark(weights, x, scale, 1.0))
    sets = []
    for spec in datasets:
        rows = []
        for image in sr_data.eval_images(spec)[1]:
            hr = image_ops.modcrop(image.pixels, scale)
            lr = sr_eval.make_lr(hr, scale)
            rows.append((sr_eval.upscale(clean, lr), sr_eval.upscale(unit, lr), hr))
        sets.append(rows)
    strength = wm.strength_for_cost(sets, scale, max_cost_db)
    logging.info(
        'strength %.3f/255: the mark costs at most %.3f dB of PSNR on %s',
        strength,
        max_cost_db,
        ', '.join(datasets),
    )
    return strength


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not config.checkpoint:
        raise FileNotFoundError(
            'no model to mark; pass --config.checkpoint=<the workdir of a student or teacher job>'
        )
    if config.watermark.strength < 0:
        raise ValueError(
            f'watermark.strength must be > 0 (1/255 units), or 0 to set it from '
            f'watermark.max_cost_db; got {config.watermark.strength}'
        )
    if not config.watermark.strength and config.watermark.max_cost_db <= 0:
        raise ValueError(
            f'watermark.max_cost_db must be > 0 (dB of PSNR) when watermark.strength is 0, got '
            f'{config.watermark.max_cost_db}'
        )
    source = restore.load(config.checkpoint, expect='sr', marked=False)
    if source.config.get('watermark') is not None:
        raise ValueError(f'{config.checkpoint!r} is already watermarked; pass the clean model')
    reporting.check_workdir(workdir)
    config = ml_collections.ConfigDict(config.to_dict())
    if not config.watermark.seed:
        config.watermark.seed = secrets.randbelow(2**31 - 2) + 1  # The owner's secret key.
    config.model = source.model_config
    config.source = config.checkpoint
    scale = int(source.model_config.scale)
    if not config.watermark.strength:
        config.watermark.strength = calibrated_strength(
            source,
            config.watermark.seed,
            config.watermark.calibrate_on,
            scale,
            config.watermark.max_cost_db,
        )
    reporting.write_config(workdir, config)
    params = source.variables['params']
    checkpointing.export_params(paths.join(workdir, 'checkpoints'), source.step, params)

    marked = restore.load(workdir, expect='sr')
    clean_apply = jax.jit(lambda x: source.module.apply(source.variables, x))
    marked_apply = jax.jit(lambda x: marked.module.apply(marked.variables, x))

    probes = probe_tiles(config.probes.datasets, scale, config.probes.size)
    folder = paths.path(workdir) / PROBE_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    for name, tile in zip(probe_names(len(probes)), probes):
        inference.write_png(str(folder / f'{name}.png'), np.round(tile * 255).astype(np.uint8))

    reference = run_batched(clean_apply, probes)
    decisions = wm.detect_many(
        [run_batched(marked_apply, probes), reference],
        reference,
        probes,
        config.watermark.seed,
        config.watermark.strength,
        null_keys=config.null_keys,
        alpha=config.alpha,
    )
    summary = sr_eval.compare(
        [
            ('unmarked', lambda p, x: source.module.apply(p, x), source.variables),
            ('watermarked', lambda p, x: marked.module.apply(p, x), marked.variables),
        ],
        config.eval.datasets,
        scale,
        workdir,
        title=f'watermark cost (strength {config.watermark.strength}/255, x{scale})',
        table_name='watermark_table.md',
        grid_name=None,
    )
    cost = {
        name: {
            'psnr_cost_db': v['unmarked']['psnr'] - v['watermarked']['psnr'],
            'ssim_cost': v['unmarked']['ssim'] - v['watermarked']['ssim'],
        }
        for name, sets in summary['sr'].items()
        for v in [sets[f'x{scale}']]
    }
    rows = [
        [who, f'{d.statistic:.4f}', f'{d.z:.1f}', f'{d.p_value:.4f}', 'yes' if d.derived else 'no']
        for who, d in zip(('watermarked', 'unmarked'), decisions)
    ]
    table = reporting.log_table(
        f'detection on {len(probes)} probes ({config.null_keys} null keys)',
        ['model', 'statistic', 'z', 'p-value', f'derived (p <= {config.alpha})'],
        rows,
    )
    reporting.write_text(workdir, 'detection_table.md', table)
    result = {
        'strength': config.watermark.strength,
        'probes': len(probes),
        'cost': cost,
        'detect': {'watermarked': decisions[0].as_dict(), 'unmarked': decisions[1].as_dict()},
    }
    reporting.update_results(workdir, 'watermark', result)
    for name, c in cost.items():
        logging.info(
            '%s: mark costs %.4f dB PSNR, %.5f SSIM', name, c['psnr_cost_db'], c['ssim_cost']
        )
    return result
