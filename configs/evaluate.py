"""Evaluation jobs. `mode` picks what is evaluated.

SR quality (bicubic, or a restored SR checkpoint) on benchmark folders:
  python launch.py --config=configs/evaluate.py --workdir=workdirs/eval_sr \\
    --config.checkpoint=workdirs/teacher
  python launch.py --config=configs/evaluate.py:sr,student --config.checkpoint=workdirs/student
"""

import ml_collections

from configs import common

SR_BENCHMARKS = ['../shared/data/sr_benchmarks/Set5', '../shared/data/sr_benchmarks/Set14',
                 '../shared/data/sr_benchmarks/BSD100']


def get_config(arg=None) -> ml_collections.ConfigDict:
    parts = [p for p in (arg or 'sr').split(',') if p]
    modes = ('sr',)
    options = ('student', 'teacher')
    for p in parts:
        if p not in modes + options and not p.startswith('scale='):
            raise ValueError(f'unknown evaluate variant {p!r}; valid: '
                             f'{", ".join(modes + options)}, scale=N')
    scale = int(next((p.split('=')[1] for p in parts if p.startswith('scale=')), 2))
    c = ml_collections.ConfigDict()
    c.trainer = 'evaluate'
    c.mode = 'sr'
    c.seed = 0
    c.mesh = [('data', -1)]
    # SR model to restore ('' = bicubic only) and the architecture it was trained with.
    c.checkpoint = ''
    c.label = 'model'
    c.model = common.edsr(scale=scale)
    if 'student' in parts:
        c.model = common.edsr(scale=scale, num_blocks=4, features=32)
    c.datasets = list(SR_BENCHMARKS)
    return c
