"""Benchmark: is distillation worth it? The same student from scratch and with each loss set.

Run by hand, never in CI (about 40 minutes on 2 CPU cores with the CPU defaults):
  python bench/distill.py --workdir=workdirs/bench_distill [--teacher=workdirs/student/teacher]
      [--teacher_steps=8000] [--steps=3000] [--runs=scratch,output,upcycled_x3,...]
      [--scale=2] [--seed=0]
      [--datasets=../shared/data/sr_benchmarks/Set5,../shared/data/sr_benchmarks/Set14]
      [--out=bench/distill.md]

Every run trains the default student of configs/student.py (same seed, same batches, same steps,
same initial weights) against one teacher: `--teacher` (a teacher workdir), or the teacher that the
student config embeds, trained once into <workdir>/teacher. Each run resumes if it is already in
<workdir>/<run>. Then the teacher and every student are scored in one process (PSNR/SSIM on Y,
parameters, FLOPs, CPU latency), and a markdown table is printed and written to
<workdir>/distill_bench.md (and to --out).

Measured on 2 CPU cores (2026-11-25), README table: at 900 student steps no loss beats scratch
(output within 0.01 dB, the feature losses at these weights lose 0.1-0.2 dB). With the
8,000-step teacher and `--steps=3000`, the upcycled loss (teacher-labelled zoom-ins and zoom-outs,
weight 3) gains +0.15 dB over scratch; zoom-outs labelled by their own LR patch (no teacher)
+0.05.
"""

import argparse
import json
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    p.add_argument('--workdir', default='workdirs/bench_distill', help='Where the runs go.')
    p.add_argument(
        '--teacher',
        default='',
        help='Teacher workdir; empty: train one into <workdir>/teacher with the student '
        "config's teacher.",
    )
    p.add_argument(
        '--teacher_steps', type=int, default=0, help="Teacher steps here (0: its config's)."
    )
    p.add_argument('--steps', type=int, default=0, help="Student steps (0: the config's).")
    p.add_argument('--runs', default='', help='Comma-separated runs (default: DEFAULT_RUNS).')
    p.add_argument('--scale', type=int, default=2, help='SR scale.')
    p.add_argument('--seed', type=int, default=0, help='Seed of every run (weights, batches).')
    p.add_argument(
        '--datasets',
        default='../shared/data/sr_benchmarks/Set5,../shared/data/sr_benchmarks/Set14',
        help='Comma-separated benchmark folders (<set>/HR/*.png).',
    )
    p.add_argument('--out', default='', help='Also write the markdown table here.')
    args = p.parse_args(argv)
    args.runs = [r for r in args.runs.split(',') if r]
    args.datasets = [d for d in args.datasets.split(',') if d]
    return args


# Run name -> loss weights. 'scratch' is the same student with the pixel loss alone.
# The feature-loss weights bring each term to about the size of the pixel loss (pixels in [0, 1];
# early in training: pixel ~0.012, feature ~0.25, affinity ~0.08, attention ~0.2).
RUNS = {
    'scratch': dict(pixel=1.0),
    'output': dict(pixel=1.0, output=1.0),
    'feature': dict(pixel=1.0, output=1.0, feature=0.05),
    'affinity': dict(pixel=1.0, output=1.0, affinity=0.1),
    'attention': dict(pixel=1.0, output=1.0, attention=0.05),
    # Not run by default (--runs=...): more weight on the teacher's outputs.
    'output_only': dict(output=1.0),
    'output_x3': dict(pixel=1.0, output=3.0),
    'upcycled': dict(pixel=1.0, output=1.0, upcycled=1.0),
    'upcycled_x3': dict(pixel=1.0, output=1.0, upcycled=3.0),
    # Controls for the upcycled runs: zoom-outs alone, labelled by the teacher or by the LR patch
    # they came from (no teacher at all).
    'zoom_out_x3': dict(pixel=1.0, output=1.0, upcycled=3.0),
    'zoom_out_self_x3': dict(pixel=1.0, upcycled=3.0),
}
# Settings other than the loss weights.
RUN_SETTINGS = {
    'zoom_out_x3': dict(upcycle=('zoom_out',)),
    'zoom_out_self_x3': dict(upcycle=('zoom_out',), upcycle_labels='ground_truth'),
}
DEFAULT_RUNS = (
    'scratch',
    'output',
    'feature',
    'affinity',
    'attention',
    'upcycled_x3',
    'zoom_out_self_x3',
)


def run_config(name, teacher_dir, steps, scale):
    from configs import student

    config = student.get_config(f'scale={scale}')
    for loss in config.distill.losses:
        config.distill.losses[loss] = 0.0
    for loss, weight in RUNS[name].items():  # A name the config lacks fails its check.
        config.distill.losses[loss] = float(weight)
    config.distill.update(RUN_SETTINGS.get(name, {}))
    config.teacher.checkpoint = teacher_dir
    config.seed = ARGS.seed
    if steps:
        config.total_steps = steps
    return config


def main():
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    import jax

    from sr_purify import reporting, sr_data
    from sr_purify.evaluators import sr as sr_eval
    from sr_purify.jobs import student as student_job
    from sr_purify.jobs import teacher as teacher_job

    t_start = time.time()
    workdir = ARGS.workdir
    os.makedirs(workdir, exist_ok=True)
    for spec in ARGS.datasets:
        sr_data.list_image_files(spec)  # A wrong path fails now, not after the training.
    names = ARGS.runs or list(DEFAULT_RUNS)
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        raise SystemExit(f'unknown run(s) {unknown}; valid: {", ".join(RUNS)}')

    bench_json = os.path.join(workdir, 'bench.json')
    record = json.load(open(bench_json)) if os.path.exists(bench_json) else {}
    teacher_dir = ARGS.teacher
    if not teacher_dir:
        teacher_dir = os.path.join(workdir, 'teacher')
        teacher = run_config('scratch', '', ARGS.steps, ARGS.scale).teacher
        if ARGS.teacher_steps:
            teacher.total_steps = ARGS.teacher_steps
        if teacher_job.train_and_evaluate(teacher, teacher_dir).preempted:
            print('stopped by signal while training the teacher; run the same command to resume')
            return

    runs = {}
    for name in names:
        config = run_config(name, teacher_dir, ARGS.steps, ARGS.scale)
        logging.info('run %s: losses %s, %d steps', name, RUNS[name], config.total_steps)
        run = student_job.distill(config, os.path.join(workdir, name))
        if run.result.preempted:
            print(f'stopped by signal during run {name}; run the same command to resume')
            return
        runs[name] = run
        if run.result.steps_per_sec == run.result.steps_per_sec:  # Not a resumed, finished run.
            record[name] = {
                'steps': run.result.step,
                'steps_per_sec': run.result.steps_per_sec,
                'wall_s': run.result.wall_s,
            }
        reporting.write_json(workdir, 'bench.json', record)

    first = runs[names[0]]
    models = [('teacher', lambda p, x: first.teacher.apply({'params': p}, x), first.teacher_params)]
    models += [
        (name, lambda p, x, m=run.student: m.apply({'params': p}, x), run.student_params)
        for name, run in runs.items()
    ]
    steps = first.result.step
    summary = sr_eval.compare(
        models,
        ARGS.datasets,
        ARGS.scale,
        workdir,
        title=f'distillation benchmark, {steps} student steps',
        table_name='compare_table.md',
    )
    # Latency also at the size of the FLOPs column (a 1280x720 output): at 128^2 the small
    # student is bound by per-op overhead, so the two sizes give different speedups.
    lr_720p = (720 // ARGS.scale, 1280 // ARGS.scale)
    ms_720p = {
        name: sr_eval.latency_ms(jax.jit(lambda x, f=f, p=p: f(p, x)), lr_720p)
        for name, f, p in models
    }
    table = bench_table(summary, names, ARGS.scale, record, ms_720p)
    elapsed = time.time() - t_start
    text = (
        f'# Distillation benchmark (x{ARGS.scale}, {steps} student steps per run, '
        f'teacher {os.path.abspath(teacher_dir)} step {first.teacher_step}; '
        f'{jax.devices()[0].platform}, {elapsed / 60:.1f} min)\n\n{table}\n'
    )
    print('\n' + text, flush=True)
    reporting.write_text(workdir, 'distill_bench.md', text)
    if ARGS.out:
        with open(ARGS.out, 'w') as f:
            f.write(text)


def bench_table(summary, names, scale, record, ms_720p):
    """Rows bicubic, teacher, each student; PSNR/SSIM per set, gain over scratch, cost, speed."""
    from sr_purify import reporting

    sets = list(summary['sr'])
    cost = summary['models']
    header = ['model', 'losses']
    for s in sets:
        header += [f'{s} PSNR', f'{s} SSIM']
    header += [
        'dB vs scratch (mean)',
        'params',
        'GFLOPs (720p)',
        'ms / 128px LR',
        'speedup vs teacher',
        'ms / 720p out',
        'speedup (720p)',
        'train steps/s',
    ]
    psnr = lambda name: [summary['sr'][s][f'x{scale}'][name]['psnr'] for s in sets]
    base = psnr('scratch') if 'scratch' in names else None
    rows = [
        ['bicubic', '-']
        + sum(
            (
                [
                    summary['sr'][s][f'x{scale}']['bicubic']['psnr'],
                    summary['sr'][s][f'x{scale}']['bicubic']['ssim'],
                ]
                for s in sets
            ),
            [],
        )
        + ['', 0, 0.0, '-', '-', '-', '-', '-']
    ]
    teacher_ms = cost['teacher']['ms_per_128px_lr']
    for name in ['teacher'] + names:
        losses = (
            '(teacher, pixel)'
            if name == 'teacher'
            else '+'.join(f'{k}' + (f' x{w:g}' if w != 1 else '') for k, w in RUNS[name].items())
        )
        row = [name, losses]
        for s in sets:
            m = summary['sr'][s][f'x{scale}'][name]
            row += [m['psnr'], m['ssim']]
        gain = (
            ''
            if base is None or name == 'teacher'
            else f'{sum(psnr(name)) / len(sets) - sum(base) / len(sets):+.3f}'
        )
        sps = record.get(name, {}).get('steps_per_sec', float('nan'))
        row += [
            gain,
            cost[name]['params'],
            cost[name]['gflops_720p'],
            cost[name]['ms_per_128px_lr'],
            f'{teacher_ms / cost[name]["ms_per_128px_lr"]:.1f}x',
            f'{ms_720p[name]:.1f}',
            f'{ms_720p["teacher"] / ms_720p[name]:.1f}x',
            '-' if name == 'teacher' else f'{sps:.2f}',
        ]
        rows.append(row)
    return reporting.markdown_table(header, rows)


if __name__ == '__main__':
    from sr_purify import perf

    perf.apply_cpu_defaults()  # As launch.py does: the jobs here run the same way.
    logging.basicConfig(level=logging.INFO)
    ARGS = parse_args()
    main()
