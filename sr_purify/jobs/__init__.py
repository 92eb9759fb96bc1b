"""One module per job config: `configs/<job>.py` sets `trainer='<job>'`, which runs
`sr_purify/jobs/<job>.py:train_and_evaluate(config, workdir)`. launch.py picks by name."""

import importlib

from sr_purify import registry

JOBS = (
    'teacher',
    'student',
    'classifier',
    'purifier',
    'evaluate',
    'upscale',
    'export',
    'extract',
    'watermark',
    'verify',
)


def get(name: str):
    """The `train_and_evaluate` of job `name` (imported on demand)."""
    registry.lookup({j: j for j in JOBS}, name, 'job')
    return importlib.import_module(f'sr_purify.jobs.{name}').train_and_evaluate
