"""Deployment bench: CPU latency and Set5 x2 PSNR of the SR models as exported for serving.

Run by hand (never in CI), from the repository root:

  python bench/deploy.py --student=workdirs/student --teacher=workdirs/student/teacher
  python bench/deploy.py --random_init --repeats=2        # default architectures, random weights
  python bench/deploy.py --random_init --models=student --sizes=256x256 --threads=1

For the PyTorch rows use the bench venv (requirements-bench.txt); without torch they are skipped
with a note. Each model is exported with `sr_purify.export.export_all` (SavedModel, LiteRT f32,
LiteRT int8, each checked against JAX) into <workdir>/<model>/. Rows: student and teacher x
{JAX jit, LiteRT f32, LiteRT int8, the fastest PyTorch variant}; no ONNX Runtime row, as the
export has no ONNX route (see sr_purify/export.py). Columns: median ms for one LR image of each
--sizes (W x H: 256x256, and 640x360 whose x2 output is 720p) at each --threads count, and Set5
PSNR (Y, shaved, sr_purify.evaluators.sr) beside it.

Threads: each thread count is timed in its own subprocess, because XLA sizes its CPU thread pool
when JAX starts: PJRT_NPROC (as bench/sr_speed.py) is set before that process imports jax; LiteRT
gets `num_threads`, PyTorch `torch.set_num_threads` and OMP_NUM_THREADS. Candidates are timed in
turns (every variant once per turn) and medians reported, so load from other processes hits them
alike. The PyTorch models are bench/sr_speed.py's twins (imported from there) with the JAX weights
copied in, tried as eager NCHW, eager channels_last and torch.compile (compile time excluded).
Their bicubic skip is F.interpolate's (a = -0.75, clamped edges), not jax.image.resize's
(a = -0.5), so their outputs and PSNR differ a little from the JAX rows; the table gives the max
abs difference.

Measured (2026-12-01, 2-core Xeon with avx512f, shared: load 3-10; --random_init --repeats=2):
LiteRT is slower than JAX jit here, f32 2-3x, int8 (dynamic range) 1-2x; at 2 threads, 256x256
LR: student JAX 187 ms, LiteRT f32 376, int8 403; teacher 843, 1440, 807. The cause is the
dynamic-shape graph (shape arithmetic, explicit pads and bias broadcasts split XNNPACK's graph):
the student exported for a fixed 256x256 (`export_saved_model(..., input_shape=...)`) runs in
205 ms against 435-595 ms dynamic on the same machine.

--random_init builds the default student (EDSR 4x32 + bicubic skip) and teacher (EDSR 16x64 +
bicubic skip) at their initialisation: good for timing, but their zero tail makes them exactly
bicubic, so their PSNR is bicubic's.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from configs import common  # noqa: E402  (plain Python: no jax)

# A CPU bench; set before jax is imported (the parent's exports and the workers alike).
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

SET5 = os.path.join(os.path.dirname(REPO), 'shared', 'data', 'sr_benchmarks', 'Set5')
MODELS = ('student', 'teacher')
TORCH_VARIANTS = ('eager', 'channels_last', 'compile')
# The default architectures (configs/student.py's student and teacher), for --random_init.
DEFAULT_CONFIGS = {
    'student': common.edsr(scale=2, num_blocks=4, features=32, bicubic_skip=True).to_dict(),
    'teacher': common.edsr(scale=2, bicubic_skip=True).to_dict(),
}
VARIANTS = (
    'JAX jit',
    'LiteRT f32',
    'LiteRT int8',
    'LiteRT f32 fixed',
    'LiteRT int8 fixed',
    'PyTorch',
)
FILES = {'LiteRT f32': 'model_f32.tflite', 'LiteRT int8': 'model_int8.tflite'}
# The same, exported for one LR size each (export_all(fixed_sizes=...)): {h}, {w} filled in.
FIXED = {
    'LiteRT f32 fixed': 'model_f32_{h}x{w}.tflite',
    'LiteRT int8 fixed': 'model_int8_{h}x{w}.tflite',
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--student', default='', help='student checkpoint folder (sr_purify.restore)')
    p.add_argument('--teacher', default='', help='teacher checkpoint folder (sr_purify.restore)')
    p.add_argument(
        '--random_init',
        action='store_true',
        help='default student/teacher with initial weights for a model given no folder',
    )
    p.add_argument('--models', default=','.join(MODELS), help=f'comma list of {MODELS}')
    p.add_argument('--sizes', default='256x256,640x360', help='LR sizes, comma list of WxH')
    p.add_argument('--threads', default='1,2', help='comma list of thread counts')
    p.add_argument('--repeats', type=int, default=5, help='timed turns per candidate')
    p.add_argument(
        '--torch',
        default=','.join(TORCH_VARIANTS),
        help=f'PyTorch variants, comma list of {TORCH_VARIANTS}; "" for none',
    )
    p.add_argument('--set5', default=SET5, help='Set5 folder for PSNR; "" to skip PSNR')
    p.add_argument('--workdir', default='workdirs/bench_deploy', help='where exports are written')
    p.add_argument('--out', default='', help='also write the markdown table here')
    p.add_argument('--_worker', default='', help=argparse.SUPPRESS)  # Internal: a spec path.
    args = p.parse_args(argv)
    if args._worker:
        return args
    args.models = [s for s in args.models.split(',') if s]
    args.torch = [s for s in args.torch.split(',') if s]
    for name, items, valid in (
        ('models', args.models, MODELS),
        ('torch', args.torch, TORCH_VARIANTS),
    ):
        bad = [s for s in items if s not in valid]
        if bad:
            p.error(f'--{name}: unknown {bad}; valid: {", ".join(valid)}')
    try:
        args.sizes = [tuple(int(v) for v in s.split('x')) for s in args.sizes.split(',') if s]
        args.threads = [int(s) for s in args.threads.split(',') if s]
    except ValueError as e:
        p.error(f'--sizes is WxH,... and --threads n,...: {e}')
    for name in args.models:
        if not getattr(args, name) and not args.random_init:
            p.error(f'--{name}=<checkpoint folder> is needed (or --random_init)')
    return args


# ---------------------------------------------------------------------------------------------
# Parent: restore, export and verify each model, then one worker per thread count.


def cpu_header():
    model, flags = 'unknown CPU', set()
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                key, _, value = line.partition(':')
                if key.strip() == 'model name':
                    model = value.strip()
                elif key.strip() == 'flags':
                    flags = set(value.split())
    except OSError:
        pass
    avx512 = 'yes' if 'avx512f' in flags else 'no'
    return f'{model}, {os.cpu_count()} cores, avx512f: {avx512}'


def load_model(name, args):
    """(model config dict, flax module, params) from the checkpoint folder or the defaults."""
    import jax
    import jax.numpy as jnp
    import ml_collections

    from sr_purify import models

    path = getattr(args, name)
    if path:
        from sr_purify import restore  # Imported here: only a checkpoint needs it.

        r = restore.load(path, expect='sr')
        return r.model_config.to_dict(), r.module, r.params
    config = DEFAULT_CONFIGS[name]
    module = models.build(ml_collections.ConfigDict(config))
    params = module.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))['params']
    return config, module, params


def verify_image(set5):
    """A real LR image (float32 (1, h, w, 3)): Set5's first, or a photo when Set5 is skipped."""
    import numpy as np

    if set5:
        from sr_purify import image_ops, sr_data

        _, images = sr_data.eval_images(set5)
        pixels = next(im.pixels for im in images if im.pixels.ndim == 3)
        lr = image_ops.imresize(image_ops.modcrop(pixels, 2), 0.5)
    else:
        import skimage.data

        lr = skimage.data.astronaut()[::4, ::4]
    return (np.asarray(lr, np.float32) / 255.0)[None]


def export_models(args):
    """Exports each model; returns the worker's model specs and the export reports."""
    import flax.serialization
    import jax

    from sr_purify import export

    image = verify_image(args.set5)
    specs, reports = [], {}
    for name in args.models:
        config, module, params = load_model(name, args)
        folder = os.path.join(args.workdir, name)
        t = time.perf_counter()
        apply = lambda p, x, module=module: module.apply({'params': p}, x)
        fixed = [(h, w) for w, h in args.sizes]
        reports[name] = export.export_all(apply, params, folder, image, fixed_sizes=fixed)
        print(f'  exported {name} to {folder} in {time.perf_counter() - t:.0f} s', flush=True)
        # The workers rebuild the module from its config, with these weights.
        params_path = os.path.join(folder, 'params.msgpack')
        with open(params_path, 'wb') as f:
            f.write(flax.serialization.msgpack_serialize(jax.device_get(params)))
        specs.append(dict(name=name, config=config, params=params_path, folder=folder))
    return specs, reports


def run_worker(spec, threads):
    with tempfile.TemporaryDirectory() as tmp:
        spec_path, out_path = os.path.join(tmp, 'spec.json'), os.path.join(tmp, 'out.json')
        with open(spec_path, 'w') as f:
            json.dump(dict(spec, threads=threads, out=out_path), f)
        env = dict(os.environ, PJRT_NPROC=str(threads), OMP_NUM_THREADS=str(threads))
        env.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
        env.setdefault('JAX_PLATFORMS', 'cpu')
        proc = subprocess.run(
            [sys.executable, os.path.abspath(__file__), f'--_worker={spec_path}'], env=env
        )
        result = {}
        if os.path.exists(out_path):  # Written as it goes: a late crash keeps the timings.
            with open(out_path) as f:
                result = json.load(f)
        if proc.returncode:
            result.setdefault('notes', []).append(
                f'worker for {threads} thread(s) exited with {proc.returncode}'
            )
        return result


def fmt(value, digits=1):
    """`digits` decimals, or scientific with None; '-' for a missing value."""
    if value is None:
        return '-'
    return f'{value:.1e}' if digits is None else f'{value:.{digits}f}'


def table(args, specs, reports, results):
    sizes = [f'{w}x{h}' for w, h in args.sizes]
    cols = [f'ms {s} ({t} thr)' for t in args.threads for s in sizes]
    lines = [
        '| model | variant | Set5 x2 PSNR | ' + ' | '.join(cols) + ' | bytes | max abs diff |',
        '| --- | --- | --- | ' + ' | '.join('---' for _ in cols) + ' | --- | --- |',
    ]
    psnr, torch_diff = {}, {}
    for r in results.values():
        psnr.update(r.get('psnr', {}))
        torch_diff.update(r.get('torch_diff', {}))
    for spec in specs:
        name = spec['name']
        for variant in VARIANTS:
            key = f'{name}/{variant}'
            cells = []
            for t in args.threads:
                timings = results.get(t, {}).get('ms', {})
                for s in sizes:
                    cell = timings.get(f'{key}/{s}')
                    if cell is None:
                        cells.append('-')
                    else:  # PyTorch: the fastest variant, named.
                        ms, which = cell
                        cells.append(fmt(ms) + (f' ({which})' if which else ''))
            if all(c == '-' for c in cells) and variant == 'PyTorch':
                continue
            file = FILES.get(variant)
            if variant in FIXED:  # One file per size: report the first size's.
                w, h = args.sizes[0]
                file = FIXED[variant].format(h=h, w=w)
            size = str(reports[name][file]['bytes']) if file else '-'
            if file:
                diff = f'{reports[name][file]["max_abs_diff"]:.1e}'
            elif variant == 'PyTorch':
                diff = fmt(torch_diff.get(name), None)
            else:
                diff = '0 (reference)'
            lines.append(
                f'| {name} | {variant} | {fmt(psnr.get(key), 3)} | {" | ".join(cells)} | '
                f'{size} | {diff} |'
            )
    return '\n'.join(lines)


def main(args):
    import jax

    print(f'# {cpu_header()}; load average {os.getloadavg()[0]:.1f}', flush=True)
    print(f'# JAX {jax.__version__}; {args.repeats} turns; sizes are LR W x H at x2', flush=True)
    specs, reports = export_models(args)
    base = dict(
        models=specs, sizes=args.sizes, repeats=args.repeats, torch=args.torch, set5=args.set5
    )
    results = {}
    for i, threads in enumerate(args.threads):
        # PSNR does not depend on the thread count: score once, in the first worker.
        results[threads] = run_worker(dict(base, psnr=i == 0), threads)
    notes = sorted({n for r in results.values() for n in r.get('notes', [])})
    versions = next((r['versions'] for r in results.values() if 'versions' in r), '')
    text = '\n'.join(
        [
            f'Deployment latency (median ms per LR image) and Set5 x2 PSNR: {cpu_header()}',
            f'{versions}; {args.repeats} turns; load average {os.getloadavg()[0]:.1f}.',
            '',
            table(args, specs, reports, results),
        ]
        + [f'\nNote: {n}' for n in notes]
    )
    if args.random_init:
        text += '\nNote: --random_init weights: the bicubic skip makes these exactly bicubic.'
    print('\n' + text)
    if args.out:
        with open(args.out, 'w') as f:
            f.write(text + '\n')


# ---------------------------------------------------------------------------------------------
# Worker: one thread count; JAX starts here with PJRT_NPROC already set by the parent.


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(cands, repeats):
    """Warms every candidate up, then times them in turns; returns {name: median ms}."""
    import numpy as np

    for fn in cands.values():
        fn()  # Compilation, buffer allocation, first-touch page faults.
    times = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            times[name].append(timed(fn))
    return {name: 1e3 * float(np.median(t)) for name, t in times.items()}


def torch_twins(threads):
    """bench/sr_speed.py as a module (for its PyTorch models), or (None, why not)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        return None, 'PyTorch is not installed here: no PyTorch rows (use requirements-bench.txt)'
    # sr_speed parses sys.argv and sets XLA_FLAGS when imported; JAX's backend is already up
    # (the caller ran jax.devices()), so its XLA_FLAGS no longer matter, and argv is restored.
    argv, xla_flags = sys.argv, os.environ.get('XLA_FLAGS')
    sys.argv = ['sr_speed.py', f'--threads={threads}', '--torch=', '--models=student']
    try:
        import sr_speed
    except Exception as e:  # Any failure there only costs the PyTorch rows.
        return None, f'bench/sr_speed.py did not import ({type(e).__name__}: {e}): no PyTorch rows'
    finally:
        sys.argv = argv
        if xla_flags is None:
            os.environ.pop('XLA_FLAGS', None)
        else:
            os.environ['XLA_FLAGS'] = xla_flags
    return sr_speed, ''


def torch_edsr(sr_speed, config, params):
    """sr_speed.TorchEDSR with the flax weights (HWIO kernels -> OIHW), or None if no twin."""
    import numpy as np
    import torch

    if config['name'] != 'edsr' or config.get('upsampler', 'edsr') != 'edsr':
        return None
    net = sr_speed.TorchEDSR(
        config['scale'],
        num_blocks=config['num_blocks'],
        features=config['features'],
        res_scale=config.get('res_scale', 1.0),
        bicubic_skip=config.get('bicubic_skip', False),
    )

    def copy(conv, p):
        conv.weight.data = torch.from_numpy(np.ascontiguousarray(p['kernel'].transpose(3, 2, 0, 1)))
        conv.bias.data = torch.from_numpy(np.asarray(p['bias']))

    copy(net.head, params['head'])
    for i, block in enumerate(net.blocks):
        copy(block.conv_0, params[f'block_{i + 1}']['conv_0'])
        copy(block.conv_1, params[f'block_{i + 1}']['conv_1'])
    copy(net.body_conv, params['body_conv'])
    convs = [m for m in net.up if isinstance(m, torch.nn.Conv2d)]
    for i, conv in enumerate(convs):
        copy(conv, params['upsampler'][f'conv_{i}'])
    copy(net.tail, params['tail'])
    return net.eval()


def torch_runners(net, variants):
    """{variant: f(x NHWC numpy) -> NHWC numpy} for the PyTorch twin."""
    import numpy as np
    import torch

    out = {}
    for variant in variants:
        # compile runs on channels_last too (faster than NCHW for these models: sr_speed.py).
        layout = torch.channels_last if variant != 'eager' else torch.contiguous_format
        model = net.to(memory_format=layout) if variant != 'eager' else net
        model = torch.compile(model) if variant == 'compile' else model

        def run(x, model=model, layout=layout):
            t = torch.from_numpy(np.asarray(x, np.float32)).permute(0, 3, 1, 2)
            with torch.inference_mode():
                return model(t.contiguous(memory_format=layout)).permute(0, 2, 3, 1).numpy()

        out[variant] = run
    return out


def worker(spec_path):
    with open(spec_path) as f:
        spec = json.load(f)
    threads = spec['threads']
    import flax.serialization
    import jax
    import jax.numpy as jnp
    import ml_collections
    import numpy as np

    from sr_purify import export, models

    jax.devices()  # Start the backend now, with this process's PJRT_NPROC.
    result = dict(ms={}, psnr={}, torch_diff={}, notes=[])

    def save():
        with open(spec['out'], 'w') as f:
            json.dump(result, f)

    sr_speed, why = torch_twins(threads) if spec['torch'] else (None, '')
    if why:
        result['notes'].append(why)
    if sr_speed is not None:
        import torch

        torch.set_num_threads(threads)
    from importlib import metadata

    versions = f'JAX {jax.__version__}, ai-edge-litert {metadata.version("ai-edge-litert")}'
    if sr_speed is not None:
        versions += f', PyTorch {sr_speed.torch.__version__}'
    result['versions'] = versions

    rng = np.random.default_rng(0)
    scorers = {}  # row key -> (runner of (1, h, w, 3) images, scale), for PSNR
    for m in spec['models']:
        name, config = m['name'], m['config']
        module = models.build(ml_collections.ConfigDict(config))
        with open(m['params'], 'rb') as f:
            params = flax.serialization.msgpack_restore(f.read())
        fn = jax.jit(lambda x, module=module, params=params: module.apply({'params': params}, x))
        jax_run = lambda x, fn=fn: np.asarray(jax.block_until_ready(fn(jnp.asarray(x))))
        twins = {}
        if sr_speed is not None:
            net = torch_edsr(sr_speed, config, params)
            if net is None:
                result['notes'].append(f'{name}: no PyTorch twin of {config["name"]}')
            else:
                twins = torch_runners(net, spec['torch'])
                probe = rng.random((1, 48, 40, 3), np.float32)
                diff = np.abs(twins[spec['torch'][0]](probe) - jax_run(probe)).max()
                result['torch_diff'][name] = float(diff)
        litert = lambda v, folder=m['folder']: export.LiteRTModel(
            os.path.join(folder, FILES[v]), threads
        )
        for w, h in spec['sizes']:
            x = rng.random((1, h, w, 3), np.float32)
            # One LiteRT interpreter per size: a shape change would reallocate inside the timing.
            cands = {'JAX jit': lambda x=x, f=jax_run: f(x)}
            cands.update({v: lambda x=x, r=litert(v): r(x) for v in FILES})
            fixed = {v: os.path.join(m['folder'], f.format(h=h, w=w)) for v, f in FIXED.items()}
            cands.update(
                {v: lambda x=x, r=export.LiteRTModel(p, threads): r(x) for v, p in fixed.items()}
            )
            cands.update({f'torch {v}': lambda x=x, f=f: f(x) for v, f in twins.items()})
            med = measure(cands, spec['repeats'])
            for variant in ('JAX jit', *FILES, *FIXED):
                result['ms'][f'{name}/{variant}/{w}x{h}'] = (med[variant], '')
            tvars = [k for k in med if k.startswith('torch ')]
            if tvars:
                best = min(tvars, key=med.get)
                result['ms'][f'{name}/PyTorch/{w}x{h}'] = (med[best], best[len('torch ') :])
            print(
                f'  [{threads} thr] {name} {w}x{h}: '
                + ', '.join(f'{k} {v:.1f} ms' for k, v in med.items()),
                flush=True,
            )
            save()
        scale = config['scale']
        scorers[f'{name}/JAX jit'] = (jax_run, scale)
        scorers.update({f'{name}/{v}': (litert(v), scale) for v in FILES})
        if twins:  # Every variant computes the same: score one.
            scorers[f'{name}/PyTorch'] = (next(iter(twins.values())), scale)
    if spec['psnr'] and spec['set5']:
        from sr_purify import sr_data  # Last: it imports TensorFlow, not needed for timing.

        _, images = sr_data.eval_images(spec['set5'])
        for key, (run, scale) in scorers.items():
            result['psnr'][key] = export.psnr_on_images(run, images, scale)
            print(f'  {key}: Set5 x{scale} PSNR {result["psnr"][key]:.3f} dB', flush=True)
            save()
    save()


if __name__ == '__main__':
    ARGS = parse_args()
    if ARGS._worker:
        worker(ARGS._worker)
    else:
        main(ARGS)
