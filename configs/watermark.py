"""Marks a trained SR model so that every output it serves, and every copy distilled from those
outputs, carries the owner's key (sr_purify/watermark.py). No retraining: the mark is a fixed
key-derived network of the input added to the output.

  python launch.py --config=configs/watermark.py --config.checkpoint=workdirs/student \\
    --workdir=workdirs/student_marked

<workdir> is then an SR model folder like any other (evaluate, upscale, export and
`sr_purify.load_sr` serve the marked outputs); keep it private: its config.json holds the key.
It also holds the probe images (probes/*.png) that verification runs a suspect on, and a table of
the mark's cost (PSNR/SSIM against the same model unmarked) and of detection on the model itself.
Verify a suspect with configs/verify.py.
"""

import ml_collections

from configs import common

PROBE_SETS = ('../shared/data/sr_benchmarks/Set5', '../shared/data/sr_benchmarks/Set14')


def get_config(arg=None) -> ml_collections.ConfigDict:
    common.parse_variant(arg, ('cpu',))
    c = ml_collections.ConfigDict()
    c.trainer = 'watermark'
    c.checkpoint = ''  # required: an SR model's workdir (a student job's, usually)
    c.watermark = ml_collections.ConfigDict()
    c.watermark.seed = 0  # the key; 0 = draw a fresh secret one (saved in config.json)
    # Peak of the unit mark in 1/255 before the average over flips and turns, which lowers it
    # (textured regions only carry it). 0: the largest strength whose mark costs at most
    # `max_cost_db` of mean PSNR on each of the `calibrate_on` sets (the job writes the strength it
    # chose into config.json). A budget rather than a fixed strength, because the cost of one
    # strength depends on the key: 9 cost 0.070 dB on Set5 with one key and 0.126 with another.
    c.watermark.strength = 0.0
    c.watermark.max_cost_db = 0.08
    c.watermark.calibrate_on = list(PROBE_SETS)
    # Probes: non-overlapping LR tiles of these sets' images (LR made as the SR metrics make it).
    c.probes = ml_collections.ConfigDict(dict(datasets=list(PROBE_SETS), size=96))
    c.null_keys = 999  # keys of the rank test: the smallest p-value is 1 / (1 + null_keys)
    c.alpha = 1e-3  # decide 'derived' at p <= alpha (the false-positive rate under H0)
    c.eval = ml_collections.ConfigDict(dict(datasets=list(PROBE_SETS)))
    return c
