"""SR robustness benchmark: the student and the teacher under the SR attack, bare and behind each
defence (run by hand, never in CI).

  python bench/sr_robustness.py --student=workdirs/student --teacher=workdirs/teacher \\
    [--input_purifier=workdirs/sr_purifier] [--workdir=workdirs/bench_sr_robustness] \\
    [--steps=50] [--eot_draws=20]

Runs configs/evaluate.py:sr_robustness on Set5 and Set14 at x2, eps 2/255 and 4/255: the basic
attack of Choi et al. 2019 (L-inf, --steps steps of eps / steps, random start; the universal
attack only with --universal_steps > 0) on the student and the teacher, bare and behind each
defence (self_ensemble, resize, median_smoothing; input_purifier with --input_purifier, the
workdir of configs/purifier.py:sr_service), each defence under the oblivious attacker (the
attack on the bare model, fed to the defence) and the adaptive one (the attack through the
defence; EOT over --eot_draws draws for median smoothing). Prints a markdown table: per set,
model and eps, the PSNR drop (dB, Y, against HR) under each attacker for no defence and each
defence, and each defence's clean PSNR cost; the issue-19 target (adaptive drop of the student at
4/255 under 1 dB at a clean cost of at most 0.2 dB) per defence; and the CPU (lscpu model name,
avx512f). The full evaluation lands in <workdir>/eval (table, results.json, plot, grid), the
summary in <workdir>/bench_summary.json.
"""

import argparse
import json
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
BENCHMARKS = os.path.join(REPO, '..', 'shared', 'data', 'sr_benchmarks')


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--student', default='', help="a student job's workdir")
    p.add_argument(
        '--teacher', default='', help="a teacher job's workdir (transfer needs both models)"
    )
    p.add_argument('--workdir', default=os.path.join(REPO, 'workdirs', 'bench_sr_robustness'))
    p.add_argument(
        '--datasets',
        default=','.join(os.path.join(BENCHMARKS, s) for s in ('Set5', 'Set14')),
        help='comma-separated benchmark folders (<Set>/HR/*.png)',
    )
    p.add_argument('--eps_255', default='2,4', help='comma-separated L-inf budgets in 1/255')
    p.add_argument('--steps', type=int, default=50, help='basic attack steps (the paper: 50)')
    p.add_argument('--adaptive_steps', type=int, default=0, help='0: --steps')
    p.add_argument('--eot_draws', type=int, default=20)
    p.add_argument('--universal_steps', type=int, default=0, help='0: no universal attack')
    p.add_argument('--defences', default='self_ensemble,resize,median_smoothing')
    p.add_argument(
        '--input_purifier',
        default='',
        help='a configs/purifier.py:sr_service workdir: adds the input_purifier defence',
    )
    p.add_argument('--resize_factor', type=float, default=0.75)
    p.add_argument('--median_sigma', type=float, default=0.02)
    p.add_argument('--median_samples', type=int, default=9)
    return p.parse_args()


def cpu_line() -> str:
    """The `lscpu` model name and whether the CPU has AVX-512 (avx512f)."""
    model, flags = 'unknown CPU', ''
    try:
        out = subprocess.run(['lscpu'], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            key, _, value = line.partition(':')
            if key.strip() == 'Model name':
                model = value.strip()
            elif key.strip() == 'Flags':
                flags = value
    except (OSError, subprocess.CalledProcessError):
        pass
    avx512 = 'yes' if 'avx512f' in flags.split() else 'no'
    return f'CPU: {model}, {os.cpu_count()} cores, avx512f: {avx512}'


def main():
    args = parse_args()
    if not (args.student or args.teacher):
        sys.exit('error: pass --student=<workdir>, --teacher=<workdir> or both')
    from sr_purify import perf

    perf.apply_cpu_defaults()  # As launch.py does: the job here runs the same way.
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    import jax

    from configs import evaluate as evaluate_config
    from sr_purify import jobs, reporting
    from sr_purify.evaluators import sr_robustness_report

    c = evaluate_config.get_config('sr_robustness')
    c.teacher.checkpoint, c.student.checkpoint = args.teacher, args.student
    c.datasets = tuple(d for d in args.datasets.split(',') if d)
    c.eps_255 = tuple(float(e) for e in args.eps_255.split(',') if e)
    c.attack.steps = args.steps
    c.adaptive.steps, c.adaptive.eot_draws = args.adaptive_steps, args.eot_draws
    c.universal.steps = args.universal_steps
    c.defences = tuple(d for d in args.defences.split(',') if d)
    if args.input_purifier:
        c.defences = tuple(d for d in c.defences if d != 'input_purifier') + ('input_purifier',)
        c.defence.input_purifier.checkpoint = args.input_purifier
    c.defence.resize.factor = args.resize_factor
    c.defence.median_smoothing.sigma = args.median_sigma
    c.defence.median_smoothing.samples = args.median_samples
    workdir = os.path.abspath(args.workdir)
    eval_dir = os.path.join(workdir, 'eval')
    print(f'[bench] {jax.device_count()} {jax.devices()[0].platform} device(s); {eval_dir}')
    t = time.time()
    results = jobs.get('evaluate')(c, eval_dir)
    wall = time.time() - t

    header = ['set', 'model', 'eps', 'defence', 'clean cost', 'oblivious drop', 'adaptive drop']
    models = [m for m in ('student', 'teacher') if getattr(args, m)]
    rows = sr_robustness_report.summary_rows(results, models)
    table = reporting.markdown_table(header, rows)
    lines = [
        '',
        f'PSNR drop (dB, Y, against HR; each defence against its own clean PSNR) on '
        f'{", ".join(results["datasets"])} x{results["scale"]}, basic attack {args.steps} '
        f'steps (adaptive {args.adaptive_steps or args.steps}), EOT {args.eot_draws} draws:',
        '',
        table,
        '',
        'Target (issue 19): student, eps 4/255, adaptive drop < 1 dB at a clean cost <= 0.2 dB:',
    ]
    target = '4/255'
    for set_name, entry in results['datasets'].items() if args.student else ():
        student = entry['models']['student']
        for name, d in student['defences'].items():
            if target not in d['adaptive']:
                continue
            drop, cost = d['adaptive'][target]['drop'], d['cost']
            met = drop < 1.0 and cost <= 0.2
            lines.append(
                f'- {set_name} {name}: adaptive drop {drop:.3f} dB (no defence: '
                f'{student["basic"][target]["drop"]:.3f} dB), cost {cost:.3f} dB: '
                f'{"met" if met else "NOT met"}'
            )
    lines += ['', cpu_line(), f'Evaluation wall time: {wall:.0f} s']
    print('\n'.join(lines), flush=True)
    with open(os.path.join(workdir, 'bench_summary.json'), 'w') as f:
        json.dump({'args': vars(args), 'wall_s': wall, 'summary': lines}, f, indent=2)


if __name__ == '__main__':
    main()
