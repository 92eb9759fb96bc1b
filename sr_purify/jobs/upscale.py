"""The upscale job (configs/upscale.py): super-resolves image files with a trained SR model.

Loads the model once (`api.load_sr`: JAX for a workdir, LiteRT for an export folder), then
writes <workdir>/<stem>_x<scale>.png for every input through tiled inference, with one progress
bar over all tiles. Unreadable files are named, skipped and counted; the `upscale` section of
results.json lists what was written.
"""

import logging
import os

import ml_collections

from sr_purify import api, inference, reporting


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    if not config.checkpoint:
        raise FileNotFoundError(
            'no model given; pass --config.checkpoint=<a student or teacher workdir, or an '
            'export folder>'
        )
    files = inference.list_inputs(config.input)  # Fails at once, before the model loads.
    reporting.check_workdir(workdir)
    sr = api.load_sr(config.checkpoint, config.runtime, config.int8, config.threads)
    logging.info(
        'upscale x%d with %s (%s): %d input file(s)', sr.scale, sr.source, sr.runtime, len(files)
    )
    result = inference.upscale_files(
        sr.apply,
        files,
        workdir,
        sr.scale,
        tile=config.tile,
        overlap=config.overlap,
        self_ensemble=config.self_ensemble,
        show_progress=reporting.is_writer(),
        batch=sr.batch,
    )
    summary = {
        'checkpoint': config.checkpoint,
        'runtime': sr.runtime,
        'scale': sr.scale,
        'written': [os.path.basename(p) for p in result['written']],
        'skipped': [{'file': p, 'reason': r} for p, r in result['skipped']],
        'seconds': result['seconds'],
    }
    reporting.write_config(workdir, config)
    reporting.update_results(workdir, 'upscale', summary)
    if not result['written']:
        raise ValueError(f'none of the {len(files)} input file(s) could be read; see the log')
    if reporting.is_writer():
        print(
            f'upscaled {len(result["written"])} image(s) x{sr.scale} into {workdir} '
            f'({result["seconds"]:.1f} s, {sr.runtime}); skipped {len(result["skipped"])} '
            f'unreadable file(s)' + ''.join(f'\n  skipped {p}: {r}' for p, r in result['skipped']),
            flush=True,
        )
    return summary
