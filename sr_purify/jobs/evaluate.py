"""The evaluate job (configs/evaluate.py): `config.mode` picks what is evaluated.

* 'sr': bicubic and, given `config.checkpoint`, a restored SR model on benchmark folders;
* 'attack': a trained classifier under every attack of `config.attacks`;
* 'robustness': purifiers in front of a classifier under oblivious, adaptive and transfer attackers;
* 'sr_robustness': bicubic and restored SR models under the attacks of Choi et al. 2019 (basic,
  universal, teacher <-> student transfer), bare and behind each SR defence;
* 'certify': randomized-smoothing certification of a classifier behind each denoiser (resumable
  per-image CSVs), with an adaptive attack on the smoothed classifier as a sanity check.

Each mode restores what it needs through `restore.load` (fail fast on settings and paths before
any data loads), runs the library evaluator and writes its report into the workdir.
"""

import os
import time
from typing import Any, Dict, List, Sequence

import jax
import ml_collections

from sr_purify import attacks, purifiers, registry, reporting, restore, sharding, sr_data
from sr_purify import classification_data as cdata
from sr_purify.evaluators import attacks as attack_eval
from sr_purify.evaluators import (
    certify,
    certify_report,
    robustness,
    robustness_report,
    sr_defences,
    sr_robustness,
    sr_robustness_report,
)
from sr_purify.evaluators import sr as sr_eval

MODES = ('sr', 'attack', 'robustness', 'sr_robustness', 'certify')


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
    mode = registry.lookup({m: m for m in MODES}, config.mode, 'evaluation mode')
    reporting.check_workdir(workdir)
    reporting.write_config(workdir, config)
    run = {
        'sr': evaluate_sr,
        'attack': evaluate_attacks,
        'robustness': evaluate_robustness,
        'sr_robustness': evaluate_sr_robustness,
        'certify': evaluate_certify,
    }[mode]
    return run(config, workdir)


def evaluate_sr(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Mode 'sr': bicubic and (given `config.checkpoint`) a restored SR model."""
    entries, scale = [], sr_data.check_scale(config.model.scale)
    if config.checkpoint:
        # The architecture comes from the job's config.json unless told otherwise.
        given = None if config.get('model_from_checkpoint', True) else config.model
        model = restore.load(config.checkpoint, 'sr', model_config=given)
        scale = sr_data.check_scale(model.scale)
        label = config.get('label', model.model_config.name)
        module = model.module
        entries.append((label, lambda p, x: module.apply({'params': p}, x), model.params))
    for spec in config.datasets:
        if spec != 'embedded':
            sr_data.list_image_files(spec)  # Fail at once on a wrong path, before any work.
    title = f'SR evaluation x{scale}' + (
        f' of {config.checkpoint}' if config.checkpoint else ' (bicubic)'
    )
    return sr_eval.compare(
        entries,
        config.datasets,
        scale,
        workdir,
        title=title,
        grid_name='sr_grid.png' if entries else None,
    )


def _classifier(entry: ml_collections.ConfigDict, flag: str) -> restore.Restored:
    return restore.load(entry.checkpoint, 'classifier', model_config=entry.model, flag=flag)


def _eval_split(config: ml_collections.ConfigDict) -> cdata.Split:
    data = config.data
    return cdata.subset(
        cdata.load_split(data, data.eval_split), data.eval_examples, data.subset_seed
    )


def evaluate_attacks(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Mode 'attack'. Returns the `attacks` results section."""
    # Fail fast on the cheap checks: attack settings, then the checkpoint, then the data.
    attacks.classifier_attacks(config.attacks)
    classifier = _classifier(config.classifier, '--config.classifier.checkpoint')
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.batch_size, mesh)
    split = _eval_split(config)
    result, samples = attack_eval.evaluate(config, classifier.variables, split, mesh)
    result.update(
        checkpoint=config.classifier.checkpoint,
        checkpoint_step=classifier.step,
        model=config.classifier.model.to_dict(),
        data=split.source,
    )
    attack_eval.report(workdir, config, result, samples, classifier.step)
    return result


def purifier_rows(
    entries: Sequence[ml_collections.ConfigDict], mesh, seed: int = 0, field: str = 'purifiers'
) -> List[robustness.Row]:
    """Purifier rows from `config.<field>`: a trained job's export when `checkpoint` is set,
    else the kind itself (trainable kinds at their starting point, e.g. the distilled student)."""
    rows, seen = [], set()
    for i, entry in enumerate(entries):
        label = entry.get('label', '') or entry.kind
        if label in seen:
            raise ValueError(f'two purifier rows are labelled {label!r}; set distinct labels')
        seen.add(label)
        if entry.get('checkpoint', ''):
            purifier, params, saved, step = purifiers.restore(
                entry.checkpoint, mesh, flag=f'--config.{field}[{i}].checkpoint'
            )
            if saved.kind != entry.kind:
                raise ValueError(
                    f'purifier row {label!r} is {entry.kind!r} but {entry.checkpoint} '
                    f'holds a {saved.kind!r} purifier'
                )
            source = f'{entry.checkpoint} step {step}'
        else:
            purifier = purifiers.build(entry, mesh)
            params = purifiers.initial_params(purifier, entry, jax.random.key(seed))
            source = 'untrained' if purifier.kind in purifiers.TRAINABLE else 'no parameters'
            if purifier.kind == 'sr_resample' and entry.get('student_checkpoint', ''):
                source = f'student {entry.student_checkpoint}, not fine-tuned'
        rows.append(robustness.Row(label, purifier, params, source))
    return rows


def evaluate_robustness(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Mode 'robustness'. Returns the `robustness` results section."""
    # Fail fast on attack settings, then checkpoints, then data.
    robustness.attack_list(config)
    robustness.adaptive_settings(config)
    classifier = _classifier(config.classifier, '--config.classifier.checkpoint')
    transfer, transfer_note = None, ''
    if config.transfer.get('checkpoint', ''):
        source = _classifier(config.transfer, '--config.transfer.checkpoint')
        transfer = (lambda v, x, m=source.module: m.apply(v, x, train=False), source.variables)
        transfer_note = (
            f'adversarial examples made on {config.transfer.model.name} '
            f'({config.transfer.checkpoint}, step {source.step}), same attack settings'
        )
    else:
        transfer_note = (
            'skipped: no --config.transfer.checkpoint given (e.g. the workdir of '
            'configs/classifier.py:small_cnn)'
        )
        print(f'note: transfer attacker {transfer_note}', flush=True)
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    sharding.check_batch(config.batch_size, mesh)
    rows = purifier_rows(config.purifiers, mesh, config.seed)
    split = _eval_split(config)
    t0 = time.time()
    module = classifier.module
    results, samples = robustness.evaluate(
        config,
        lambda v, x: module.apply(v, x, train=False),
        classifier.variables,
        rows,
        split,
        mesh,
        transfer,
    )
    results.update(
        classifier={
            'checkpoint': config.classifier.checkpoint,
            'step': classifier.step,
            'model': config.classifier.model.to_dict(),
        },
        transfer_note=transfer_note,
        data=split.source,
        wall_s=time.time() - t0,
    )
    robustness_report.report(
        workdir,
        results,
        samples,
        rows,
        config,
        title=(
            f'Robustness of {config.classifier.model.name} ({config.classifier.checkpoint}, '
            f'step {classifier.step}) behind each purifier, {results["examples"]} '
            f'{config.data.eval_split} images, accuracy %'
        ),
    )
    return results


def _strings(value) -> List[str]:
    """A tuple field that may also hold one string (`--config.others=path`)."""
    return [value] if isinstance(value, str) else list(value)


def sr_models(config: ml_collections.ConfigDict, scale: int) -> List[sr_robustness.SRModel]:
    """Bicubic, then the teacher, the student and `config.others` that are given, each restored
    through `restore.load` (a non-SR checkpoint or another scale than `scale` raises)."""
    entries = [
        ('teacher', config.teacher.checkpoint, '--config.teacher.checkpoint'),
        ('student', config.student.checkpoint, '--config.student.checkpoint'),
    ]
    for path in _strings(config.others):
        label = os.path.basename(os.path.normpath(path)) if path else ''
        entries.append((label, path, '--config.others'))
    models = [sr_robustness.bicubic(scale)]
    for label, path, flag in entries:
        if not path:
            continue
        restored = restore.load(path, 'sr', flag=flag)
        models.append(sr_robustness.restored_model(label, restored, scale, flag))
    return models


def evaluate_sr_robustness(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Mode 'sr_robustness'. Returns the `sr_robustness` results section."""
    # Fail fast: settings and defence names, then the checkpoints, then the image folders.
    settings = sr_robustness.settings_from(config)
    scale = sr_data.check_scale(config.scale)
    defences = [sr_defences.build(name, config.defence) for name in _strings(config.defences)]
    models = sr_models(config, scale)
    for spec in config.datasets:
        if spec != 'embedded':
            sr_data.list_image_files(spec)
    names = [m.name for m in models]
    transfer = [('teacher', 'student'), ('student', 'teacher')]
    transfer = [(a, b) for a, b in transfer if a in names and b in names]
    if not transfer:
        print(
            'note: transfer skipped: give both --config.teacher.checkpoint and '
            '--config.student.checkpoint',
            flush=True,
        )
    sets = [sr_data.eval_images(spec) for spec in config.datasets]
    t0 = time.time()
    results, samples = sr_robustness.evaluate(models, sets, settings, defences, transfer)
    results['wall_s'] = time.time() - t0
    results['checkpoints'] = {
        'teacher': config.teacher.checkpoint,
        'student': config.student.checkpoint,
        'others': _strings(config.others),
    }
    sr_robustness_report.report(
        workdir,
        results,
        samples,
        title=f'SR robustness x{scale}: {", ".join(names)} (PSNR in dB, Y)',
        grid_crop=int(config.get('grid_crop', 48)),
    )
    return results


def evaluate_certify(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
    """Mode 'certify'. Returns the `certify` results section."""
    certify.settings_from(config)  # Fail fast on settings, then checkpoints, then data.
    classifier = _classifier(config.classifier, '--config.classifier.checkpoint')
    mesh = sharding.make_mesh(config.get('mesh', [('data', -1)]))
    certify.settings_from(config, mesh)
    rows = purifier_rows(config.denoisers, mesh, config.seed, field='denoisers')
    split = _eval_split(config)
    provenance = {
        'classifier': {'checkpoint': config.classifier.checkpoint, 'step': classifier.step},
        'data': split.source,
    }
    t0 = time.time()
    module = classifier.module
    results, per_image = certify.evaluate(
        config,
        lambda v, x: module.apply(v, x, train=False),
        classifier.variables,
        rows,
        split.images,
        split.labels,
        mesh,
        workdir,
        provenance,
    )
    results.update(
        classifier={
            'checkpoint': config.classifier.checkpoint,
            'step': classifier.step,
            'model': config.classifier.model.to_dict(),
        },
        data=split.source,
        wall_s=time.time() - t0,
    )
    certify_report.report(
        workdir,
        results,
        per_image,
        title=(
            f'Certified accuracy (%) of the smoothed {config.classifier.model.name} '
            f'({config.classifier.checkpoint}, step {classifier.step}) at L2 radii, '
            f'{results["images"]} {config.data.eval_split} images, n = {config.n}'
        ),
    )
    return results
