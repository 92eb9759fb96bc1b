"""Robustness benchmark: purifiers in front of a CIFAR-10 ResNet-20 (run by hand, never in CI).

  python bench/robustness.py [--workdir=workdirs/bench_robustness] [--examples=1000] \\
    [--student=workdirs/student]

Stages; each reuses a finished job in its folder under --workdir, so a rerun only evaluates:
1. victim: configs/classifier.py (ResNet-20 on a 20k-image subset of the JPEG CIFAR-10 train.tar);
2. transfer source: configs/classifier.py:small_cnn (another architecture and seed);
3. purifier sr_resample: configs/purifier.py, the SR network starting from --student (a student
   job's workdir; '' starts it at random, which with the bicubic skip is exact bicubic);
4. purifier nrp: configs/purifier.py:nrp;
5. configs/evaluate.py:robustness with rows none, bicubic_resample, jpeg, sr_resample, nrp and one
   attack, PGD L-inf 8/255, 10 steps of 2/255, random start (plus the eps = 0 sanity attack), on
   the first --examples images of the seeded test permutation; transfer from stage 2; the
   adaptive attacker adds APGD-CE and APGD-DLR of --adaptive_steps iterations (default 100, as
   AutoAttack) through classifier and purifier.
Both purifiers (sr_resample 1,000 steps, nrp 2,000) train without labels: x' = SSP against F
and PGD on F's own predictions (pseudo-labels, no data labels), F = the victim's stage_3
features (the last before pooling), loss = L1(P(x'), x) + 1.0 * L1(F(P(x')), F(x))
+ 2.0 * L1(P(x), x) (`--feature=random_cnn` for a random CNN instead, with SSP only).
"""

import argparse
import json
import logging
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--workdir', default=os.path.join(REPO, 'workdirs', 'bench_robustness'))
    p.add_argument('--examples', type=int, default=1000)
    p.add_argument('--student', default='', help="student job workdir; '' = random init")
    p.add_argument(
        '--classifier',
        default='',
        help='finished victim classifier workdir to use '
        '(default: train one into <workdir>/classifier)',
    )
    p.add_argument(
        '--transfer',
        default='',
        help='finished small_cnn classifier workdir to use '
        '(default: train one into <workdir>/classifier_small_cnn)',
    )
    p.add_argument('--feature', default='classifier', choices=('classifier', 'random_cnn'))
    p.add_argument(
        '--feature_layer',
        default='stage_3',
        help="the classifier tap F uses ('stem', 'stage_1', 'stage_2', 'stage_3')",
    )
    p.add_argument('--feature_weight', type=float, default=1.0)
    p.add_argument('--identity_weight', type=float, default=2.0)
    p.add_argument('--purifier_steps', type=int, default=1000)
    p.add_argument(
        '--nrp_steps',
        type=int,
        default=2000,
        help='steps of the nrp purifier (0: --purifier_steps)',
    )
    p.add_argument('--batch_size', type=int, default=100, help='evaluation batch')
    p.add_argument(
        '--adaptive_steps',
        type=int,
        default=100,
        help="iterations of the adaptive attacker's APGD-CE and APGD-DLR (AutoAttack's 100; "
        'the CPU default of configs/evaluate.py:robustness is 20)',
    )
    return p.parse_args()


def finished(workdir: str, section: str) -> bool:
    try:
        with open(os.path.join(workdir, 'results.json')) as f:
            return section in json.load(f)
    except (OSError, ValueError):
        return False


def stage(name, workdir, section, run, timings):
    if finished(workdir, section):
        print(f'[bench] {name}: reusing {workdir}', flush=True)
        with open(os.path.join(workdir, 'results.json')) as f:
            saved = json.load(f)[section]
        timings[name] = {'reused': True, 'wall_s': saved.get('wall_s')}
        return
    print(f'[bench] {name}: training into {workdir}', flush=True)
    t = time.time()
    run()
    timings[name] = {'reused': False, 'wall_s': time.time() - t}
    print(f'[bench] {name}: {timings[name]["wall_s"]:.0f} s', flush=True)


def main():
    args = parse_args()
    from sr_purify import perf

    perf.apply_cpu_defaults()  # As launch.py does: the jobs here run the same way.
    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    logging.basicConfig(level=logging.WARNING)
    import jax

    perf.reserve_callback_thread()  # The evaluation runs the jpeg purifier (host callbacks).
    from configs import classifier as classifier_config
    from configs import evaluate as evaluate_config
    from configs import purifier as purifier_config
    from sr_purify import attacks, jobs

    wd = os.path.abspath(args.workdir)
    dirs = {
        k: os.path.join(wd, k)
        for k in ('classifier', 'classifier_small_cnn', 'purifier_sr', 'purifier_nrp', 'eval')
    }
    if args.classifier:
        dirs['classifier'] = os.path.abspath(args.classifier)
    if args.transfer:
        dirs['classifier_small_cnn'] = os.path.abspath(args.transfer)
    timings = {}
    t_all = time.time()
    print(
        f'[bench] {jax.device_count()} {jax.devices()[0].platform} device(s); workdir {wd}',
        flush=True,
    )

    stage(
        'victim ResNet-20',
        dirs['classifier'],
        'classifier',
        lambda: jobs.get('classifier')(classifier_config.get_config(), dirs['classifier']),
        timings,
    )
    stage(
        'transfer small_cnn',
        dirs['classifier_small_cnn'],
        'classifier',
        lambda: jobs.get('classifier')(
            classifier_config.get_config('small_cnn'), dirs['classifier_small_cnn']
        ),
        timings,
    )

    def purifier_job(variant):
        # The ':victim' recipe: F = the victim's features, SSP on them and PGD on its own
        # predictions (pseudo-labels, no data labels).
        c = purifier_config.get_config(
            f'{variant},victim' if args.feature == 'classifier' else variant
        )
        steps = args.nrp_steps if variant == 'nrp' and args.nrp_steps else args.purifier_steps
        c.total_steps = c.checkpoint_every = steps
        c.purifier.student_checkpoint = args.student
        f = c.purifier.feature
        f.kind = args.feature
        if args.feature == 'classifier':
            f.checkpoint = dirs['classifier']
            f.classifier = classifier_config.get_config().model
            f.layer = args.feature_layer
        c.loss.feature, c.loss.identity = args.feature_weight, args.identity_weight
        return c

    stage(
        'purifier sr_resample',
        dirs['purifier_sr'],
        'purifier',
        lambda: jobs.get('purifier')(purifier_job('sr_resample'), dirs['purifier_sr']),
        timings,
    )
    stage(
        'purifier nrp',
        dirs['purifier_nrp'],
        'purifier',
        lambda: jobs.get('purifier')(purifier_job('nrp'), dirs['purifier_nrp']),
        timings,
    )

    c = evaluate_config.get_config('robustness')
    c.classifier.checkpoint = dirs['classifier']
    c.transfer.checkpoint = dirs['classifier_small_cnn']
    c.eval_examples = args.examples
    c.batch_size = args.batch_size
    c.attacks = [attacks.attack_config(name='pgd', eps=8 / 255, steps=10, step_size=2 / 255)]
    for member in c.adaptive.attacks:  # The strong adaptive attacker, as AutoAttack runs it.
        member.steps = args.adaptive_steps
    c.purifiers = [
        evaluate_config.purifier_entry('none'),
        evaluate_config.purifier_entry('bicubic_resample'),
        evaluate_config.purifier_entry('jpeg'),
        evaluate_config.purifier_entry('sr_resample', checkpoint=dirs['purifier_sr']),
        evaluate_config.purifier_entry('nrp', checkpoint=dirs['purifier_nrp']),
    ]
    t = time.time()
    results = jobs.get('evaluate')(c, dirs['eval'])
    timings['evaluation'] = {'reused': False, 'wall_s': time.time() - t}
    timings['total_wall_s'] = time.time() - t_all

    clean = results['purifiers']['none']['clean']
    label = next(a['label'] for a in results['attacks'] if a['eps'] > 0)
    lines = [
        '',
        f'Targets (clean accuracy of C: {100 * clean:.1f} %): oblivious >= 80 % of '
        f'clean and clean+P >= clean - 5 points',
    ]
    for name in ('sr_resample', 'nrp'):
        r = results['purifiers'][name]
        ratio = r['oblivious'][label] / max(clean, 1e-9)
        ok = ratio >= 0.8 and r['clean'] >= clean - 0.05
        lines.append(
            f'- {name}: clean+P {100 * r["clean"]:.1f} % '
            f'({100 * (r["clean"] - clean):+.1f} points), oblivious '
            f'{100 * r["oblivious"][label]:.1f} % = {100 * ratio:.0f} % of clean, adaptive '
            f'{100 * r["adaptive"][label]:.1f} %: target {"met" if ok else "NOT met"}'
        )
    lines.append(
        'Stage wall times (s): '
        + ', '.join(
            f'{k} {v["wall_s"]:.0f}{" (reused)" if v.get("reused") else ""}'
            for k, v in timings.items()
            if isinstance(v, dict) and v.get('wall_s') is not None
        )
    )
    lines.append(f'Whole benchmark run: {timings["total_wall_s"]:.0f} s')
    print('\n'.join(lines), flush=True)
    with open(os.path.join(wd, 'bench_summary.json'), 'w') as f:
        json.dump({'timings': timings, 'args': vars(args), 'summary': lines}, f, indent=2)


if __name__ == '__main__':
    main()
