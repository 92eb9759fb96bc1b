"""The evaluate job: `config.mode` picks the evaluator; each writes tables and results.json."""

import importlib

import ml_collections

from sr_purify import registry, reporting

MODES = {
    'sr': 'sr_purify.evaluators.sr',
    'attack': 'sr_purify.evaluators.attacks',
    'robustness': 'sr_purify.evaluators.robustness',
}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    module = importlib.import_module(registry.lookup(MODES, config.mode, 'evaluation mode'))
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    return module.run(config, workdir)
