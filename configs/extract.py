"""The model-extraction attack: a thief copies a deployed SR model from its outputs alone.

The thief queries the victim (served as PNGs: uint8 in, uint8 out; no parameters, no gradients)
with its own unlabelled photos, downscaled as the service's users send them, and trains a
surrogate on the (query, answer) pairs, once per query budget. Reported per budget: fidelity (PSNR
and SSIM of the surrogate against the victim's outputs on Set5/Set14 LR images), quality (against
HR), the victim's and bicubic's own numbers, queries and training time.

CPU default (about 6 minutes on 2 cores: BSD100 as the thief's photos, 1 / 10 / 100 queries,
the slim EDSR of configs/student.py as the surrogate, at the victim's scale):
  python launch.py --config=configs/extract.py --config.victim=workdirs/student \\
    --workdir=workdirs/extract
Another surrogate (`:edsr`, `:imdn`, `:fsrcnn`; fields in config.surrogate.<name>), other budgets
(0 = every query image), an export folder as the victim (run with LiteRT as deployed):
  python launch.py --config=configs/extract.py:edsr --config.victim=workdirs/export \\
    --config.budgets="(1, 5, 0)" --config.total_steps=1000
Each surrogate is an SR model folder, <workdir>/surrogates/<name>_q<queries>, that every job
restores:
  python launch.py --config=configs/evaluate.py \\
    --config.checkpoint=workdirs/extract/surrogates/fsrcnn_q100
"""

import ml_collections

from configs import common
from configs import student as student_config

VARIANTS = ('cpu',) + student_config.STUDENTS


def get_config(arg=None) -> ml_collections.ConfigDict:
    parts, _ = common.parse_variant(arg, VARIANTS)
    names = [p for p in parts if p in student_config.STUDENTS]
    c = common.base()
    c.trainer = 'extract'
    c.victim = ''  # required: an SR teacher/student workdir, or an export folder
    c.runtime = 'auto'  # how the victim is served: auto | jax | litert (see api.load_sr)
    # The thief's own unlabelled photos; with `downscale` each is sent at 1/scale, as the service
    # expects its inputs; False sends them as they are.
    c.query_data = '../shared/data/sr_benchmarks/BSD100'
    c.downscale = True
    # Query images per surrogate, the first n in sorted file order; 0 = all of them. Each image is
    # queried once and its answer reused by the larger budgets.
    c.budgets = (1, 10, 100)
    # The thief's architecture, its choice: one field group per student architecture as in
    # configs/student.py. The scale is the victim's (it shows in the outputs), set by the job.
    # The slim EDSR (bicubic skip) by default: 300 steps on 100 queries copy a 300-step teacher
    # to 50.4 dB fidelity on Set5, where FSRCNN, without a skip, stays below bicubic (27.3 dB
    # after 300 steps, 34.4 after 1000, 38.0 after 2000; bicubic itself is 39.9-40.0 dB from the
    # victim) and needs about 20,000 steps to copy it (46.6 dB, Set5 34.93 against bicubic's
    # 33.67: README "Ownership").
    c.surrogate = student_config.student_model(names[-1] if names else 'edsr', scale=0)
    c.loss = 'l1'
    c.patch = 32  # LR patch side; the answer's crop is patch * scale.
    c.batch_size = 16
    c.total_steps = 300  # per surrogate
    c.log_every = 50
    c.checkpoint_every = 300
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    # A thief trains its copy to convergence, with the decaying rate every SR recipe uses.
    c.optim.schedule = 'cosine'
    c.eval = ml_collections.ConfigDict(
        dict(datasets=['../shared/data/sr_benchmarks/Set5', '../shared/data/sr_benchmarks/Set14'])
    )
    return c
