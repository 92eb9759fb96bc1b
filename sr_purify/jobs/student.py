"""Distils the private teacher into a lightweight student (the `student` job, configs/student.py).

`train_and_evaluate(config, workdir)`:
1. checks the distillation config (loss names, teacher access, feature taps) before any work;
2. restores the teacher from `config.teacher.checkpoint`, or, when that is '', first trains one with
   the embedded teacher config into <workdir>/teacher (resuming it if it is there);
3. trains the student (and, for the `feature` loss, its 1x1 adapters) with the weighted losses of
   `config.distill.losses`. The teacher's parameters are frozen (stop_gradient) and go to the
   compiled step as a separate replicated argument: they are in neither the training state, the
   optimiser state nor any checkpoint the job writes. Training checkpoints (student + adapters +
   optimiser, for resuming) are in <workdir>/checkpoints;
4. exports the student's parameters alone (no adapters, no teacher) to <workdir>/student, which
   `restore.load` restores (the architecture from <workdir>/config.json);
5. scores bicubic, the student and the teacher on the held-out images (PSNR/SSIM, parameters,
   FLOPs, latency) into sr_table.md, results.json and sr_grid.png (LR | bicubic | student |
   teacher | HR).
"""

import dataclasses
import logging
import time
from typing import Any, Dict, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from sr_purify import (
    checkpointing,
    distillation,
    models,
    paths,
    reporting,
    restore,
    sharding,
    sr_data,
    training,
)
from sr_purify.evaluators import sr as sr_eval
from sr_purify.jobs import teacher as teacher_job

PyTree = Any


def abstract_params_and_taps(model: nn.Module, patch: int = 16) -> Tuple[PyTree, Dict[str, int]]:
    """Parameter shapes and `{tap: channels}` of an SR model, from tracing only (no compute)."""
    x = jax.ShapeDtypeStruct((1, patch, patch, 3), jnp.float32)
    (_, feats), variables = jax.eval_shape(
        lambda x: model.init_with_output(jax.random.key(0), x, return_features=True), x
    )
    return variables['params'], {k: int(v.shape[-1]) for k, v in feats.items()}


def teacher_checkpoint(config: ml_collections.ConfigDict, workdir: str):
    """The teacher's directory; trains one into <workdir>/teacher when none is given.

    Returns (directory, FitResult of the teacher run or None).
    """
    if config.teacher.get('checkpoint', ''):
        return config.teacher.checkpoint, None
    directory = paths.join(workdir, 'teacher')
    logging.info(
        'no teacher.checkpoint given: training the teacher (%s) into %s first',
        config.teacher.model.name,
        directory,
    )
    return directory, teacher_job.train_and_evaluate(config.teacher, directory)


@dataclasses.dataclass
class Distilled:
    """What `distill` leaves for evaluation: the run, both networks and their parameters."""

    result: training.FitResult
    student: nn.Module
    teacher: nn.Module
    student_params: PyTree  # host numpy copies; None when the run was preempted
    teacher_params: PyTree
    teacher_dir: str
    teacher_step: int
    teacher_run: Optional[training.FitResult]  # the teacher job run first, if any
    losses: Dict[str, float]
    export_dir: Optional[str]


def distill(config: ml_collections.ConfigDict, workdir: str, writer=None) -> Distilled:
    """Steps 1-4 of the module docstring: checks, teacher, distillation, export."""
    reporting.check_workdir(workdir)
    student = models.build(config.model)
    teacher = models.build(config.teacher.model)
    scale = sr_data.check_scale(config.model.scale)
    if config.teacher.model.scale != scale:
        raise ValueError(
            f'the student is x{scale} but the teacher x{config.teacher.model.scale}; '
            f'set config.teacher.model.scale={scale}'
        )
    _, student_taps = abstract_params_and_taps(student)
    _, teacher_taps = abstract_params_and_taps(teacher)
    # Fail on a bad loss name or tap before minutes of teacher training.
    active = distillation.check_config(config.distill, student_taps, teacher_taps)
    loss = distillation.make_loss(config.distill)
    with_features = distillation.uses_teacher_features(config.distill)
    pairs = distillation.feature_pairs(config.distill) if 'feature' in active else ()
    ground_truth_labels = (
        'upcycled' in active and config.distill.get('upcycle_labels', 'teacher') == 'ground_truth'
    )
    if ground_truth_labels and config.data.patch % scale:
        raise ValueError(
            f'upcycle_labels=ground_truth needs config.data.patch divisible by the '
            f'scale {scale} (zoom-outs of the LR patch, labelled by it); got '
            f'{config.data.patch}'
        )
    reporting.write_config(workdir, config)

    teacher_dir, teacher_run = teacher_checkpoint(config, workdir)
    if teacher_run is not None and teacher_run.preempted:
        return Distilled(
            teacher_run, student, teacher, None, None, teacher_dir, 0, teacher_run, active, None
        )
    teacher_restored = restore.load(
        teacher_dir,
        'sr',
        model_config=config.teacher.model,
        flag='--config.teacher.checkpoint',
        what='teacher',
    )
    teacher_params, teacher_step = teacher_restored.params, teacher_restored.step
    logging.info(
        'teacher %s (%d parameters) from %s step %d; losses %s',
        config.teacher.model.name,
        models.parameter_count(teacher_params),
        teacher_dir,
        teacher_step,
        active,
    )
    _, periodic_images = sr_data.eval_images(config.eval.datasets[0])

    def init_variables(rng):
        # The same seed as an RngBitGenerator key: XLA on CPU takes seconds to compile threefry's
        # hash for every initialiser, 'rbg' a fraction of that. Still a pure function of the seed.
        rng = jax.random.wrap_key_data(jnp.tile(jax.random.key_data(rng), 2), impl='rbg')
        student_rng, adapter_rng = jax.random.split(rng)
        x = jnp.zeros((1, config.data.patch, config.data.patch, 3), jnp.float32)
        # The student's init does not depend on the losses, so runs with different losses start
        # from the same student.
        params = {'student': student.init(student_rng, x)['params']}
        if pairs:
            params['adapters'] = distillation.init_adapters(
                adapter_rng, pairs, student_taps, teacher_taps
            )
        return params, {}

    def loss_fn(params, model_state, batch, rng, teacher_params):
        teacher_params = jax.lax.stop_gradient(teacher_params)
        if with_features:
            teacher_sr, teacher_feats = teacher.apply(
                {'params': teacher_params}, batch['lr'], return_features=True
            )
        else:  # Outputs alone: what a teacher behind an API would give.
            teacher_sr, teacher_feats = teacher.apply({'params': teacher_params}, batch['lr']), {}
        sr, feats = student.apply({'params': params['student']}, batch['lr'], return_features=True)
        upcycled = None
        if 'upcycled' in active:  # Inputs without HR: the teacher labels them.
            inputs = distillation.upcycled_inputs(
                config.distill.upcycle, batch['lr'], batch['hr'], scale, rng
            )
            label = (
                (lambda x: batch['lr'])
                if ground_truth_labels
                # the control
                else (lambda x: teacher.apply({'params': teacher_params}, x))
            )
            upcycled = [
                (student.apply({'params': params['student']}, x), label(x)) for x in inputs.values()
            ]
        total, terms = loss(
            sr, feats, teacher_sr, teacher_feats, batch['hr'], params.get('adapters', {}), upcycled
        )
        return total, (model_state, {f'loss/{k}': v for k, v in terms.items()})

    result = training.fit(
        config,
        workdir,
        init_variables=init_variables,
        loss_fn=loss_fn,
        batches=teacher_job.sr_batches(config, scale),
        frozen=teacher_params,
        evaluate=teacher_job.psnr_evaluator(
            lambda p, x: student.apply({'params': p['student']}, x), periodic_images, scale
        ),
        writer=writer,
    )
    if result.preempted:
        return Distilled(
            result,
            student,
            teacher,
            None,
            teacher_params,
            teacher_dir,
            teacher_step,
            teacher_run,
            active,
            None,
        )
    student_params = sharding.to_host(result.state.params['student'])
    export_dir = checkpointing.export_params(
        paths.join(workdir, 'student'), result.step, student_params
    )
    return Distilled(
        result,
        student,
        teacher,
        student_params,
        teacher_params,
        teacher_dir,
        teacher_step,
        teacher_run,
        active,
        export_dir,
    )


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Distils, exports the student, evaluates and reports; `writer` replaces the clu writer."""
    t_start = time.time()
    reporting.check_workdir(workdir)
    writer = writer or reporting.create_writer(workdir)
    run = distill(config, workdir, writer)
    result = run.result
    if result.preempted:
        return result
    scale = config.model.scale
    active, teacher_dir, teacher_run = run.losses, run.teacher_dir, run.teacher_run
    teacher_step, export_dir = run.teacher_step, run.export_dir
    student_params, teacher_params = run.student_params, run.teacher_params

    def student_apply(params, x):
        return run.student.apply({'params': params}, x)

    def teacher_apply(params, x):
        return run.teacher.apply({'params': params}, x)

    name = config.model.name
    title = (
        f'student ({name}) distilled from teacher ({config.teacher.model.name}) with '
        f'{", ".join(f"{k} x{w:g}" for k, w in active.items())}, {result.step} steps'
    )
    summary = sr_eval.compare(
        [('student', student_apply, student_params), ('teacher', teacher_apply, teacher_params)],
        config.eval.datasets,
        scale,
        workdir,
        title=title,
        writer=writer,
        step=result.step,
    )

    cost = summary['models']
    teacher_train = _teacher_train_info(teacher_dir, teacher_run)
    wall_total = time.time() - t_start
    gaps = {}
    for set_name, by_scale in summary['sr'].items():
        row = by_scale[f'x{scale}']
        gaps[set_name] = {
            'student_minus_bicubic_db': row['student']['psnr'] - row['bicubic']['psnr'],
            'student_minus_teacher_db': row['student']['psnr'] - row['teacher']['psnr'],
        }
    worth = {
        'losses': active,
        'teacher_access': config.distill.teacher_access,
        'teacher_checkpoint': str(paths.path(teacher_dir)),
        'teacher_step': teacher_step,
        'student_export': export_dir,
        'params_ratio': cost['teacher']['params'] / cost['student']['params'],
        'gflops_ratio': cost['teacher']['gflops_720p'] / max(cost['student']['gflops_720p'], 1e-12),
        'speedup': cost['teacher']['ms_per_128px_lr'] / cost['student']['ms_per_128px_lr'],
        'psnr_gaps': gaps,
    }
    reporting.update_results(workdir, 'distill', worth)
    train = {
        'student': {
            'steps': result.step,
            'steps_per_sec': result.steps_per_sec,
            'wall_s': result.wall_s,
        },
        'total_wall_s': wall_total,
    }
    if teacher_train:
        train['teacher'] = teacher_train
    reporting.update_results(workdir, 'train', train)

    lines = [
        f'- student: {worth["params_ratio"]:.1f}x fewer parameters, '
        f'{worth["gflops_ratio"]:.1f}x fewer FLOPs, {worth["speedup"]:.1f}x faster than '
        f'the teacher (this machine, {jax.devices()[0].platform})'
    ]
    for set_name, g in gaps.items():
        lines.append(
            f'- {set_name} x{scale}: student {g["student_minus_bicubic_db"]:+.3f} dB vs '
            f'bicubic, {g["student_minus_teacher_db"]:+.3f} dB vs teacher'
        )
    timing = f'distillation {result.wall_s:.0f} s ({result.steps_per_sec:.2f} steps/s)'
    if teacher_train.get('steps_per_sec', 0) > 0:
        timing = (
            f'teacher {teacher_train["wall_s"]:.0f} s '
            f'({teacher_train["steps_per_sec"]:.2f} steps/s), ' + timing
        )
    lines.append(f'- wall time: {timing}, whole job {wall_total:.0f} s')
    lines.append(f'- student parameters alone (no teacher, no adapters): {export_dir}')
    text = '\n'.join(lines)
    if reporting.is_writer():
        print(text + '\n', flush=True)
    reporting.write_text(workdir, 'sr_table.md', f'# {title}\n\n{summary["table"]}\n\n{text}')
    writer.flush()
    return result


def _teacher_train_info(teacher_dir: str, teacher_run) -> Dict[str, float]:
    """Steps, steps/s and wall time of the teacher run (this job's, or its results.json)."""
    if teacher_run is not None and teacher_run.steps_per_sec == teacher_run.steps_per_sec:
        return {
            'steps': teacher_run.step,
            'steps_per_sec': teacher_run.steps_per_sec,
            'wall_s': teacher_run.wall_s,
        }
    folder = paths.parent(teacher_dir) if paths.name(teacher_dir) == 'checkpoints' else teacher_dir
    try:
        results = reporting.read_json(paths.join(folder, 'results.json'))
    except (OSError, ValueError):
        return {}
    return results.get('train', {}).get('teacher', {})
