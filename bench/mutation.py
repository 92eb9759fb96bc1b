"""Mutation testing (mutmut) of the core modules against their own tests; run by hand, not in CI.

    pip install mutmut==3.8.1
    python bench/mutation.py [--modules=image_ops,wrappers] [--workdir=/tmp/sr_purify_mutation]
    python bench/mutation.py --report   # the table again, from the finished runs
    python bench/mutation.py --recheck --modules=image_ops   # survivors against sharpened tests

mutmut keeps one configuration and one state folder (`mutants/`) per checkout, and a run that
selected all five modules' test files together recorded no test-to-function map (every mutant
then ran every test), so each module runs in its own copy of the committed tree (`git archive
HEAD`, plus the working tree's tests/) with `[tool.mutmut]` of pyproject.toml narrowed to that
module and its test files. The table counts killed + timed out against every mutant that is not
in EQUIVALENT (mutants that cannot change behaviour, each with the reason).
"""

import argparse
import collections
import json
import os
import pathlib
import random
import re
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]

# name: (module, its own test files)
MODULES = {
    'image_ops': ('sr_purify/image_ops.py', ['tests/test_image_ops.py']),
    'gradient': ('sr_purify/attacks/gradient.py', ['tests/test_attacks.py']),
    'wrappers': ('sr_purify/attacks/wrappers.py', ['tests/test_attacks.py']),
    'distillation': ('sr_purify/distillation.py', ['tests/test_distillation.py']),
    'checkpointing': (
        'sr_purify/checkpointing.py',
        ['tests/test_faults.py', 'tests/test_training.py'],
    ),
}

# Mutants that cannot change what the function computes, with why. Kept here (not in a note) so
# the kill rate below is recomputed the same way after every run.
EQUIVALENT = {
    # image_ops
    'image_ops.x__prepare__mutmut_5': 'astype(None) is astype(float64)',
    'image_ops.x_psnr__mutmut_25': "float('INF') == float('inf')",
    'image_ops.x_modcrop__mutmut_9': 'slice(None, n) == slice(0, n)',
    'image_ops.x_modcrop__mutmut_11': 'slice(n) == slice(0, n)',
    'image_ops.x_modcrop__mutmut_17': 'slice(None, n) == slice(0, n)',
    'image_ops.x_modcrop__mutmut_19': 'slice(n) == slice(0, n)',
    'image_ops.x__filter_valid__mutmut_12': "padding mode: the 'valid' crop drops every padded "
    'output pixel',
    'image_ops.x__filter_valid__mutmut_23': 'axis=-1 is axis 1 for the 2-D images filtered',
    'image_ops.x__filter_valid__mutmut_24': "padding mode: the 'valid' crop drops every padded "
    'output pixel',
    'image_ops.x_resize_bicubic__mutmut_9': "antialias=True is jax.image.resize's default",
    'image_ops.x__cubic__mutmut_16': 'both cubic pieces are 0 at |x| = 1',
    'image_ops.x__cubic__mutmut_31': 'both cubic pieces are 0 at |x| = 1',
    'image_ops.x__cubic__mutmut_33': 'the outer cubic piece is 0 at |x| = 2',
    'image_ops.x__resize_matrix__mutmut_2': 'a wider window only adds taps of weight 0',
    'image_ops.x__resize_matrix__mutmut_3': 'at scale 1 the stretched kernel is the kernel',
    'image_ops.x__resize_matrix__mutmut_16': 'int64 positions: the same values after / scale',
    'image_ops.x__resize_matrix__mutmut_19': 'int64 positions: the same values after / scale',
    'image_ops.x__resize_matrix__mutmut_41': 'one more tap, of weight 0',
    'image_ops.x_imresize__mutmut_8': 'only in_shape[0] and [1] are read',
    'image_ops.x_imresize__mutmut_23': 'only scales[0] and [1] are read',
    'image_ops.x_imresize__mutmut_35': 'astype(None) is astype(float64)',
    # attacks/gradient
    'gradient.x_apgd__mutmut_30': 'seg_len off the checkpoints is never read (the lax.cond '
    'branch that reads it runs only at checkpoints, whose entries are set from the schedule)',
    'gradient.x_apgd__mutmut_41': 'int32 seg_len: rho * seg_len is the same float32 threshold',
    # distillation
    'distillation.x_check_config__mutmut_31': 'configs/student.py always sets distill.upcycle '
    '(a locked ConfigDict), so the default of get() is never read',
    'distillation.x_make_loss__mutmut_7': 'configs/student.py always sets feature_distance',
    'distillation.x_make_loss__mutmut_19': 'configs/student.py always sets attention_p',
    # checkpointing
    'checkpointing.xǁCheckpointerǁquarantine__mutmut_26': 'a barrier on one process is a no-op',
    'checkpointing.xǁCheckpointerǁquarantine__mutmut_28': "the barrier's name: every process "
    'uses the same string',
    'checkpointing.xǁCheckpointerǁquarantine__mutmut_30': "the barrier's name: every process "
    'uses the same string',
    'checkpointing.xǁCheckpointerǁ__init____mutmut_13': 'async saves: every synchronous caller '
    'closes the manager (which waits for the write) before anything reads the step',
    'checkpointing.x_export_params__mutmut_7': 'as __init___13: export_params closes before it '
    'returns',
    'checkpointing.x_export_params__mutmut_9': 'as __init___13: export_params closes before it '
    'returns',
    'checkpointing.xǁCheckpointerǁ_saved_tree__mutmut_8': 'getattr(None, "tree", None) is None',
    'checkpointing.xǁCheckpointerǁ_saved_tree__mutmut_16': "orbax's tree metadata always has .tree",
    'checkpointing.xǁCheckpointerǁ_saved_tree__mutmut_17': "orbax 0.12's metadata object "
    'flattens to the same leaves and paths as its .tree',
    # attacks/wrappers
    'wrappers.x__zero_cotangent__mutmut_2': 'custom_vjp hands the backward its residuals as '
    'jax arrays: the asarray branch never runs',
    'wrappers.x__zero_cotangent__mutmut_3': 'asarray of a jax array is that array',
    'wrappers.x__zero_cotangent__mutmut_4': 'the asarray branch never runs (see _2)',
    'wrappers.x__zero_cotangent__mutmut_5': 'asarray of a jax array is that array',
    'wrappers.x__zero_cotangent__mutmut_6': "jax's custom_vjp turns the cotangent of an int or "
    'key argument into float0 itself (tests/test_attacks.py checks the gradients it gives)',
    'wrappers.x__zero_cotangent__mutmut_12': 'as _6: jax makes the int/key cotangent float0',
    'wrappers.x__zero_cotangent__mutmut_14': 'as _6: jax makes the int/key cotangent float0',
    'wrappers.x_random_fn__mutmut_6': "RandomFn's default samples is 1",
    'image_ops.x__to_uint8__mutmut_3': 'imresize already clipped every pass to [0, 255]',
    'image_ops.x__to_uint8__mutmut_4': 'imresize already clipped every pass to [0, 255]',
    'image_ops.x__to_uint8__mutmut_12': 'imresize already clipped every pass to [0, 255]',
}

STATUS = {1: 'killed', 3: 'killed', 0: 'survived', 5: 'no tests', 33: 'no tests'}
TIMEOUTS = {36, -24, 24, 152, 255}


def status(code):
    if code in TIMEOUTS:
        return 'timeout'
    return STATUS.get(code, 'not checked' if code is None else 'suspicious')


def prepare(name: str, root: pathlib.Path) -> pathlib.Path:
    """A copy of HEAD (and the working tree's tests) whose [tool.mutmut] selects one module."""
    module, tests = MODULES[name]
    copy = root / name
    subprocess.run(['rm', '-rf', str(copy)], check=True)
    copy.mkdir(parents=True)
    archive = subprocess.run(['git', 'archive', 'HEAD'], cwd=REPO, check=True, capture_output=True)
    subprocess.run(['tar', 'xf', '-'], cwd=copy, input=archive.stdout, check=True)
    for test in (REPO / 'tests').glob('*.py'):
        (copy / 'tests' / test.name).write_text(test.read_text())
    # The tests find ../shared (the benchmark images) beside the checkout, i.e. beside mutants/.
    shared = REPO.parent / 'shared'
    if shared.exists():
        (copy / 'shared').symlink_to(shared)
    toml = (REPO / 'pyproject.toml').read_text()
    toml = re.sub(r'only_mutate = \[.*?\]', f'only_mutate = ["{module}"]', toml, flags=re.S)
    selection = ', '.join(f'"{t}"' for t in tests)
    toml = re.sub(
        r'pytest_add_cli_args_test_selection = \[.*?\]',
        f'pytest_add_cli_args_test_selection = [{selection}]',
        toml,
        flags=re.S,
    )
    (copy / 'pyproject.toml').write_text(toml)
    return copy


def mutant_names(name: str, root: pathlib.Path) -> list:
    module, _ = MODULES[name]
    meta = root / name / 'mutants' / (module + '.meta')
    return sorted(json.loads(meta.read_text())['exit_code_by_key'])


def run(name: str, root: pathlib.Path, children: int, sample: int = 0) -> float:
    copy = prepare(name, root)
    env = dict(os.environ)
    # Programs that a mutant does not change compile once for all the forked workers.
    cache = root / 'jax_cache'
    env.update(
        JAX_COMPILATION_CACHE_DIR=str(cache),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0',
    )
    mutmut = pathlib.Path(sys.executable).with_name('mutmut')
    t0 = time.time()
    cmd = [str(mutmut), 'run', f'--max-children={children}']
    with open(copy / 'run.log', 'w') as log:
        if sample:
            # A name that matches nothing: mutmut generates the mutants and collects the
            # test map, then the seeded uniform sample of the mutants runs.
            subprocess.run(cmd + ['no-such-mutant'], cwd=copy, env=env, stdout=log, stderr=log)
            names = mutant_names(name, root)
            chosen = random.Random(0).sample(names, min(sample, len(names)))
            (copy / 'sample.txt').write_text('\n'.join(sorted(chosen)) + '\n')
            cmd += sorted(chosen)
        subprocess.run(cmd, cwd=copy, env=env, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.time() - t0
    (copy / 'seconds.txt').write_text(f'{seconds:.0f}\n')
    return seconds


def results(name: str, root: pathlib.Path) -> dict:
    module, _ = MODULES[name]
    meta = root / name / 'mutants' / (module + '.meta')
    codes = json.loads(meta.read_text())['exit_code_by_key']
    prefix = module[: -len('.py')].replace('/', '.') + '.'
    sample = root / name / 'sample.txt'
    if sample.exists():  # a sampled run: the table counts the sample only
        chosen = set(sample.read_text().split())
        codes = {k: v for k, v in codes.items() if k in chosen}
    out = collections.defaultdict(list)
    for key, code in codes.items():
        short = name + '.' + key[len(prefix) :] if key.startswith(prefix) else key
        out['equivalent' if short in EQUIVALENT else status(code)].append(short)
    return out


def recheck(name: str, root: pathlib.Path, skip: str = '') -> None:
    """Reruns the survivors (and untested mutants) against the working tree's current tests,
    the way mutmut runs a mutant (MUTANT_UNDER_TEST in the environment, pytest -x in mutants/),
    and records the new exit codes in mutmut's state: after sharpening tests, only these rerun."""
    module, tests = MODULES[name]
    mutants = root / name / 'mutants'
    for test in (REPO / 'tests').glob('*.py'):
        (mutants / 'tests' / test.name).write_text(test.read_text())
    meta_path = mutants / (module + '.meta')
    meta = json.loads(meta_path.read_text())
    codes = meta['exit_code_by_key']
    # Survivors already passed every test mutmut ran: only tests added since can kill them.
    ran = set(json.loads((mutants / 'mutmut-stats.json').read_text())['duration_by_test'])
    listed = subprocess.run(
        [sys.executable, '-m', 'pytest', '--collect-only', '-q', '-p', 'no:cacheprovider', *tests],
        cwd=mutants,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    new = [t for t in listed if '::' in t and t not in ran and not (skip and skip in t)] or tests
    prefix = module[: -len('.py')].replace('/', '.') + '.'
    for key, code in codes.items():
        if status(code) not in ('survived', 'no tests'):
            continue
        if name + '.' + key[len(prefix) :] in EQUIVALENT:
            continue
        env = dict(os.environ, MUTANT_UNDER_TEST=key)
        cmd = [sys.executable, '-m', 'pytest', '-x', '-q', '-p', 'no:cacheprovider', *new]
        rc = subprocess.run(cmd, cwd=mutants, env=env, capture_output=True).returncode
        codes[key] = 1 if rc == 1 else code
        print(f'{"killed" if rc == 1 else status(code)}: {key}', flush=True)
    meta_path.write_text(json.dumps(meta, indent=4))


def report(names, root: pathlib.Path) -> str:
    lines = [
        '| module | its tests | mutants | killed | timeout | equivalent | survived | no tests |'
        ' not checked | killed of non-equivalent |',
        '|---|---|---:|---:|---:|---:|---:|---:|---:|---:|',
    ]
    for name in names:
        module, tests = MODULES[name]
        try:
            r = results(name, root)
        except FileNotFoundError:
            continue
        count = lambda k, r=r: len(r.get(k, []))
        total = sum(len(v) for v in r.values())
        everything = len(mutant_names(name, root))
        shown = f'{total} of {everything} (seeded sample)' if total < everything else f'{total}'
        caught = count('killed') + count('timeout')
        scored = total - count('equivalent') - count('not checked')
        rate = f'{100 * caught / scored:.1f} %' if scored else '-'
        lines.append(
            f'| `{module}` | {", ".join(t.split("/")[-1] for t in tests)} | {shown} | '
            f'{count("killed")} | {count("timeout")} | {count("equivalent")} | '
            f'{count("survived")} | {count("no tests")} | {count("not checked")} | {rate} |'
        )
    return '\n'.join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--modules', default=','.join(MODULES))
    parser.add_argument('--workdir', default='/tmp/sr_purify_mutation')
    parser.add_argument('--children', type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        '--sample', type=int, default=0, help='run a seeded uniform sample of N mutants per module'
    )
    parser.add_argument(
        '--skip', default='', help='--recheck leaves out new tests whose id contains this'
    )
    parser.add_argument('--report', action='store_true', help='only print the table')
    parser.add_argument(
        '--recheck', action='store_true', help='rerun only the survivors against the current tests'
    )
    args = parser.parse_args()
    names = [n for n in args.modules.split(',') if n]
    unknown = sorted(set(names) - set(MODULES))
    if unknown:
        sys.exit(f'unknown module(s) {", ".join(unknown)}; valid: {", ".join(MODULES)}')
    root = pathlib.Path(args.workdir).resolve()
    root.mkdir(parents=True, exist_ok=True)
    if args.recheck:
        for name in names:
            recheck(name, root, args.skip)
    elif not args.report:
        for name in names:
            print(f'{name}: {run(name, root, args.children, args.sample):.0f} s', flush=True)
    print(report(names, root))
    for name in names:
        try:
            r = results(name, root)
        except FileNotFoundError:
            continue
        for kind in ('survived', 'no tests', 'suspicious'):
            for m in r.get(kind, []):
                print(
                    f'{kind}: {m}   (mutmut show {MODULES[name][0][:-3].replace("/", ".")}'
                    f'.{m.split(".", 1)[1]})'
                )


if __name__ == '__main__':
    main()
