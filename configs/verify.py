"""Is a suspect SR model derived from the owner's watermarked one? Prints the decision, the
test statistic and its p-value under H0 "not derived from the owner's model" (an exact rank
test against `null_keys` random keys, sr_purify/watermark.py).

  python launch.py --config=configs/verify.py --config.owner=workdirs/student_marked \\
    --config.suspect=workdirs/extract/surrogates/edsr_q100 --workdir=workdirs/verify

`owner`: the watermark job's workdir (it holds the key, the clean model and the probes).
`suspect`: an SR model folder (any job's workdir, an export folder), or a folder of the
suspect's outputs on <owner>/probes/*.png named as the upscale job names them
(probe_000_x2.png, ...), e.g. from
  python launch.py --config=configs/upscale.py --config.checkpoint=<suspect> \\
    --config.input=workdirs/student_marked/probes --config.tile=0 --workdir=<outputs>
"""

import ml_collections

from configs import common


def get_config(arg=None) -> ml_collections.ConfigDict:
    common.parse_variant(arg, ('cpu',))
    c = ml_collections.ConfigDict()
    c.trainer = 'verify'
    c.owner = ''  # required: the watermark job's workdir
    c.suspect = ''  # required: a model folder, or a folder of its outputs on the probes
    c.null_keys = -1  # -1: the owner's setting
    c.alpha = -1.0  # -1: the owner's setting
    return c
