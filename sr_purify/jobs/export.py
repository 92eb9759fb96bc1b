"""The export job (configs/export.py): a trained SR model as SavedModel and LiteRT files.

Restores the model (`restore.load`), writes the files with `export.export_all` (each verified on a
real photo as it is written), records `sr_model.json` so the upscale job and `sr_purify.load_sr`
can run the folder with the LiteRT interpreter alone, and prints the PSNR of JAX, LiteRT f32 and
LiteRT int8 on `eval_dataset` side by side.
"""

import json
import os

import jax
import ml_collections
import numpy as np

from sr_purify import api, export, reporting, restore, sr_data
from sr_purify.evaluators import sr as sr_eval


def verification_image(scale: int, crop: int) -> np.ndarray:
    """A real photo the model never trained on (held-out `chelsea`), cut to a `crop`^2 LR patch."""
    (image,) = [
        im
        for im in sr_data.load_images(ml_collections.ConfigDict(dict(source='embedded')), 'eval')
        if im.name == 'chelsea'
    ]
    lr = sr_eval.make_lr(image.pixels, scale)
    h, w = lr.shape[:2]
    crop = min(crop, h, w)
    y, x = (h - crop) // 2, (w - crop) // 2
    return (lr[y : y + crop, x : x + crop].astype(np.float32) / 255.0)[None]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not config.checkpoint:
        raise FileNotFoundError('no model given; pass --config.checkpoint=<a student workdir>')
    model = restore.load(config.checkpoint, 'sr')
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    module = model.module

    def apply_fn(params, x):
        return module.apply({'params': params}, x)

    fixed_sizes = [tuple(int(d) for d in size) for size in config.get('fixed_sizes', ())]
    report = export.export_all(
        apply_fn,
        model.params,
        workdir,
        verification_image(model.scale, config.verify_crop),
        fixed_sizes=fixed_sizes,
    )
    files = {'f32': 'model_f32.tflite', 'int8': 'model_int8.tflite', 'fixed': {}}
    for h, w in fixed_sizes:
        f32, int8 = export.fixed_files(h, w)
        files['fixed'][f'{h}x{w}'] = {'f32': f32, 'int8': int8}
    info = {
        'scale': model.scale,
        'model': model.model_config.to_dict(),
        'checkpoint': os.path.abspath(config.checkpoint),
        'step': model.step,
        'files': files,
    }
    if reporting.is_writer():
        with open(os.path.join(workdir, api.EXPORT_INFO), 'w') as f:
            json.dump(info, f, indent=2)

    rows = [
        [name, r.get('max_abs_diff', float('nan')), r.get('psnr_vs_jax'), r['bytes']]
        for name, r in report.items()
    ]
    quality = {}
    if config.eval_dataset:
        set_name, images = sr_data.eval_images(config.eval_dataset)
        jitted = jax.jit(lambda x: apply_fn(model.params, x))
        runners = {'jax': jitted}
        for kind in ('f32', 'int8'):
            runners[kind] = export.LiteRTModel(os.path.join(workdir, files[kind]))
        quality = {k: export.psnr_on_images(run, images, model.scale) for k, run in runners.items()}
        for row in rows:
            kind = 'f32' if row[0] == files['f32'] else 'int8' if row[0] == files['int8'] else ''
            row.append(quality.get(kind, float('nan')))
        rows.append(['(JAX)', 0.0, float('inf'), 0, quality['jax']])
    header = ['file', 'max |diff| vs JAX', 'PSNR vs JAX (dB)', 'bytes']
    if quality:
        header.append(f'{set_name} x{model.scale} PSNR (Y)')
    table = reporting.log_table(f'Export of {config.checkpoint} (step {model.step})', header, rows)
    reporting.write_text(workdir, 'export_table.md', f'# Export of {config.checkpoint}\n\n{table}')
    summary = {**info, 'report': report, 'psnr': quality}
    reporting.update_results(workdir, 'export', summary)
    return summary
