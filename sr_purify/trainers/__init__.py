"""One module per job, each with `train_and_evaluate(config, workdir)`; launch.py picks by name."""

import importlib

from sr_purify import registry

TRAINERS = {
    'teacher': 'sr_purify.trainers.sr',
    'student': 'sr_purify.trainers.distill',
    'classifier': 'sr_purify.trainers.classifier',
    'purifier': 'sr_purify.trainers.purifier',
    'evaluate': 'sr_purify.evaluators.run',
}


def get(name: str):
    """The `train_and_evaluate` of trainer `name` (imported on demand)."""
    module = importlib.import_module(registry.lookup(TRAINERS, name, 'trainer'))
    return module.train_and_evaluate
