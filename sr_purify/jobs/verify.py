"""The verify job (configs/verify.py): is a suspect derived from the owner's marked model?

Runs the suspect on the owner's probes (or reads its outputs on them from a folder), the owner's
clean model on the same probes, and the rank test of sr_purify/watermark.py. Prints and writes the
decision with its statistic, z and p-value (`verify` section of results.json).
"""

import logging
import os

import jax
import ml_collections
import numpy as np

from sr_purify import api, inference, paths, reporting, restore
from sr_purify import watermark as wm
from sr_purify.jobs import watermark as watermark_job


def _owner(path: str):
    config, _ = restore.find_job_config(path) if path else (None, path)
    if config is None or config.get('trainer') != 'watermark':
        raise ValueError(
            f"{path!r} is not a watermark job's workdir; pass --config.owner=<the workdir of "
            f'configs/watermark.py>'
        )
    return config


def read_probes(owner: str) -> np.ndarray:
    folder = paths.join(owner, watermark_job.PROBE_FOLDER)
    count = sum(f.startswith('probe_') and f.endswith('.png') for f in os.listdir(folder))
    names = watermark_job.probe_names(count)  # In index order (a name sort breaks at 1000).
    return np.stack([inference.read_image(os.path.join(folder, f'{n}.png')) for n in names]) / 255.0


def suspect_outputs(suspect: str, probes: np.ndarray, scale: int) -> np.ndarray:
    """The suspect's outputs on the probes: from its files if `suspect` is a folder of images
    (no model in it), else by running the model (JAX or LiteRT, as api.load_sr serves it)."""
    if not suspect or not os.path.exists(suspect):
        raise FileNotFoundError(
            f'no suspect {suspect!r}; pass --config.suspect=<a model folder, or a folder of its '
            f"outputs on the owner's probes>"
        )
    config, _ = restore.find_job_config(suspect)
    if config is None and not api.is_export(suspect):
        names = watermark_job.probe_names(len(probes))
        missing = [
            n for n in names if not os.path.isfile(os.path.join(suspect, f'{n}_x{scale}.png'))
        ]
        if missing:
            raise ValueError(
                f'{suspect!r} lacks {len(missing)} of the {len(names)} probe outputs (first: '
                f'{missing[0]}_x{scale}.png); run the suspect on every <owner>/probes image'
            )
        outs = [inference.read_image(os.path.join(suspect, f'{n}_x{scale}.png')) for n in names]
        want = (probes.shape[1] * scale, probes.shape[2] * scale)
        bad = [n for n, o in zip(names, outs) if o.shape[:2] != want]
        if bad:
            raise ValueError(
                f'{bad[0]}_x{scale}.png in {suspect!r} is not {want[0]}x{want[1]} (the probe '
                f"x{scale}); the outputs must be of the owner's probes at the owner's scale"
            )
        return np.stack([o[..., :3] for o in outs]) / 255.0
    sr = api.load_sr(suspect)
    if sr.scale != scale:
        raise ValueError(f"{suspect!r} upscales x{sr.scale}; the owner's model is x{scale}")
    return watermark_job.run_batched(sr.apply, probes)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
    owner_config = _owner(config.owner)
    scale = int(owner_config.model.scale)
    probes = read_probes(config.owner)
    outputs = suspect_outputs(config.suspect, probes, scale)
    reporting.check_workdir(workdir)
    clean = restore.load(config.owner, expect='sr', marked=False, flag='--config.owner')
    reference = watermark_job.run_batched(
        jax.jit(lambda x: clean.module.apply(clean.variables, x)), probes
    )
    null_keys = config.null_keys if config.null_keys > 0 else owner_config.null_keys
    alpha = config.alpha if config.alpha > 0 else owner_config.alpha
    decision = wm.detect(
        outputs,
        reference,
        probes,
        owner_config.watermark.seed,
        owner_config.watermark.strength,
        null_keys=null_keys,
        alpha=alpha,
    )
    verdict = "DERIVED from the owner's model" if decision.derived else 'not shown to be derived'
    logging.info(
        '%s: %s (p = %.4g, alpha %.4g; statistic %.4f = %.1f%% of the mark, z = %.1f over %d null '
        'keys)',
        config.suspect,
        verdict,
        decision.p_value,
        alpha,
        decision.statistic,
        100 * decision.inherited,
        decision.z,
        null_keys,
    )
    result = dict(decision.as_dict(), suspect=config.suspect, owner=config.owner)
    reporting.update_results(workdir, 'verify', result)
    return result
