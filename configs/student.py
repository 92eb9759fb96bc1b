"""Distils the private teacher into a lightweight student: the project's main job.

CPU default (embedded scikit-image photos, x2; README "Main job" has the times measured on a
2-core AVX-512 Xeon and a 2-core AVX2-only AMD EPYC). With no teacher checkpoint it first trains
the teacher (configs/teacher.py's default for 300 steps instead of 600, embedded as
`config.teacher`) into <workdir>/teacher, then distils a slim EDSR (4 blocks, 32 channels,
121,987 parameters: 11.2x fewer than the teacher's 1,369,859) for 300 steps and prints bicubic,
teacher and student:
  python launch.py --config=configs/student.py --workdir=workdirs/student
From a teacher trained before (its workdir or its checkpoints/ folder):
  python launch.py --config=configs/student.py --config.teacher.checkpoint=workdirs/teacher
Other students: `:imdn`, `:fsrcnn` (or --config.model.name=imdn; each architecture's fields are in
config.model.<name>). Full size (EDSR-baseline teacher and the student on DIV2K, GPU/TPU): `:full`;
variants combine with a scale, e.g. `configs/student.py:full,imdn,scale=4`.
Losses are a name -> weight map, 0 = off (CPU default: pixel 1, output 1; `:full` adds upcycled 3,
the distillation benchmark's best, which triples a step's cost; see sr_purify/distillation.py):
  --config.distill.losses.affinity=10 --config.distill.losses.upcycled=3
A teacher served behind an API (its SR outputs only, no features):
  --config.distill.teacher_access=outputs
The deliverable is <workdir>/student, the student's parameters alone (no teacher, no adapters);
every job restores it from the workdir (the architecture comes from its config.json):
  python launch.py --config=configs/evaluate.py --config.checkpoint=workdirs/student
  python launch.py --config=configs/upscale.py --config.checkpoint=workdirs/student \\
    --config.input=photo.png
  python launch.py --config=configs/export.py --config.checkpoint=workdirs/student
"""

import ml_collections

from configs import common
from configs import teacher as teacher_config

STUDENTS = ('edsr', 'imdn', 'fsrcnn')
VARIANTS = ('cpu', 'full') + STUDENTS

# Constructor fields of each student architecture (sr_purify/models); `model.name` picks one.
STUDENT_FIELDS = {
    # Slim EDSR; the bicubic global skip as in the CPU teacher (no parameters). upsampler='espcn'
    # (one conv to RGB x s^2) is 1.4x faster but gained less from distillation (README).
    'edsr': dict(num_blocks=4, features=32, res_scale=1.0, bicubic_skip=True, upsampler='edsr'),
    'imdn': dict(
        num_blocks=3, features=32, distill_rate=0.25, negative_slope=0.05, cca_reduction=16
    ),
    'fsrcnn': dict(features=56, shrink=12, num_maps=4, activation='prelu'),
}

# (student tap, teacher tap) pairs for the feature losses, against the 16-block EDSR teacher: a
# middle block to the middle of the teacher's body, and the body outputs.
FEATURE_PAIRS = {
    'edsr': (('block_2', 'block_8'), ('body', 'body')),
    'imdn': (('block_2', 'block_11'), ('body', 'body')),
    'fsrcnn': (('head', 'head'), ('body', 'body')),
}


def student_model(name: str = 'edsr', scale: int = 2) -> ml_collections.ConfigDict:
    """`name` and `scale`, plus one sub-dict of fields per architecture (only `name`'s is used)."""
    return ml_collections.ConfigDict(dict(name=name, scale=scale, **STUDENT_FIELDS))


def parse_arg(arg):
    """'full,imdn,scale=4' -> (full?, student name, scale); an unknown part lists the valid ones."""
    parts, options = common.parse_variant(arg, VARIANTS, options=('scale',))
    names = [p for p in parts if p in STUDENTS]
    return 'full' in parts, names[-1] if names else 'edsr', int(options.get('scale', 2))


def get_config(arg=None) -> ml_collections.ConfigDict:
    full, name, scale = parse_arg(arg)
    c = common.base()
    c.trainer = 'student'
    c.role = 'student'
    c.model = student_model(name, scale)
    c.data = common.sr_data('embedded', patch=32)
    c.batch_size = 8
    # 300 steps of pixel + output: the first run fits a coffee break on a 2-core CPU and still
    # clears bicubic by 1.1 dB and matches the teacher (500 steps gained 0.018 dB for 2/3 more
    # distillation time; README "Main job"); the upcycled loss would triple each step for a
    # gain the short run cannot show.
    c.total_steps = 300
    c.log_every = 50
    c.checkpoint_every = 300
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    c.eval = ml_collections.ConfigDict(dict(datasets=['embedded']))

    c.distill = ml_collections.ConfigDict()
    # Every loss is listed so any can be switched on from the command line; 0 = off.
    c.distill.losses = ml_collections.ConfigDict(
        dict(pixel=1.0, output=1.0, feature=0.0, affinity=0.0, attention=0.0, upcycled=0.0)
    )
    # 'features': the teacher's intermediate features may be used; 'outputs': only its SR output.
    c.distill.teacher_access = 'features'
    # A tuple, so the command line can set it: --config.distill.feature_pairs="(('body', 'body'),)"
    c.distill.feature_pairs = FEATURE_PAIRS[name]
    c.distill.feature_distance = 'l1'  # feature loss: 'l1' or 'l2'
    c.distill.attention_p = 2.0  # attention map = mean_c |F|^p
    # Inputs of the `upcycled` loss: HR crops as LR (zoom_in), LR downscaled again (zoom_out).
    c.distill.upcycle = ('zoom_in', 'zoom_out')
    # Who labels them: 'teacher', or 'ground_truth' (zoom_out only: the LR patch; no teacher),
    # the control that separates what the teacher adds from what the extra inputs add.
    c.distill.upcycle_labels = 'teacher'

    # The teacher: a finished teacher job's workdir (or its checkpoints/), or '' to train one
    # first with this config (the teacher job's own) into <workdir>/teacher.
    c.teacher = teacher_config.get_config(f'full,scale={scale}' if full else f'scale={scale}')
    c.teacher.checkpoint = ''
    if not full:
        # Half the teacher job's CPU default: 34.02 dB on the held-out photos against 34.23 for
        # 600 steps, enough for the student to clear bicubic by 1 dB, in half the time.
        c.teacher.total_steps = 300
        c.teacher.checkpoint_every = 150

    if full:
        # As the teacher's full variant: DIV2K, 48x48 LR patches, batch 16, evaluated on Set5/14.
        c.data = common.sr_data('tfds', patch=48)
        c.data.name = f'div2k/bicubic_x{scale}'
        c.batch_size = 16
        c.total_steps = 300_000
        # The distillation benchmark's best (README): +0.15 dB over the same student from scratch.
        c.distill.losses.upcycled = 3.0
        c.optim.lr = 2e-4
        c.optim.warmup_steps = 1000
        c.log_every = 100
        c.eval_every = 10_000
        c.checkpoint_every = 5_000
        c.eval.datasets = [
            '../shared/data/sr_benchmarks/Set5',
            '../shared/data/sr_benchmarks/Set14',
        ]
    return c
