"""Speed of the SR models here (JAX) against the same architectures in PyTorch, and utilisation.

Run by hand (never in CI), in a venv with the project's requirements and requirements-bench.txt:

  python bench/sr_speed.py                 # this codebase as it runs by default
  python bench/sr_speed.py --tuned         # with sr_purify.perf's CPU settings
  python bench/sr_speed.py --models=student --work=train --repeats=9

Rows: one training step (forward + L1 + backward + Adam; 16 LR patches of 48x48, x2) and inference
(16 patches of 48x48; one 256x256 LR image) for the default teacher (EDSR-baseline 16x64 with the
bicubic skip), EDSR-baseline (no skip), the default student (EDSR 4x32 with the skip) and IMDN.
JAX goes through the real training path (`training.create_state`, `make_train_step`,
`compile_step`: jit over the data mesh with the state donated) and `jax.jit(model.apply)`; PyTorch
runs a copy of each architecture written below (same layer shapes) as eager NCHW, eager
channels_last and `torch.compile` (compile time excluded); the fastest variant counts. All is f32
on the same number of threads (`torch.set_num_threads` and PJRT_NPROC, XLA's CPU thread pool).
Candidates are timed in turns (JAX, each PyTorch variant, the peak dot) and medians reported, so
load from other processes hits them alike. Utilisation is XLA's cost-analysis FLOPs of the work
over its time, against the machine's measured peak (the faster of a jitted 2048^2 f32 `jnp.dot`
and `torch.mm`, timed in the same turns).
"""

import argparse
import os
import sys
import time

MODELS = ('teacher', 'edsr', 'student', 'imdn')
WORK = ('train', 'infer16', 'infer1')
TORCH_VARIANTS = ('eager', 'channels_last', 'compile')


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--models', default=','.join(MODELS), help=f'comma list of {MODELS}')
    p.add_argument('--work', default=','.join(WORK), help=f'comma list of {WORK}')
    p.add_argument(
        '--torch',
        default=','.join(TORCH_VARIANTS),
        help=f'PyTorch variants to try, comma list of {TORCH_VARIANTS}; "" for none',
    )
    p.add_argument('--threads', type=int, default=os.cpu_count(), help='threads for both')
    p.add_argument('--repeats', type=int, default=5, help='timed turns per candidate')
    p.add_argument(
        '--tuned',
        action='store_true',
        help='apply sr_purify.perf CPU settings (XLA flags, devices, allocator)',
    )
    p.add_argument(
        '--devices',
        type=int,
        default=0,
        help="host devices for JAX data parallelism (0: 1, or perf's with --tuned)",
    )
    p.add_argument(
        '--conv_impl',
        default='',
        help="'xla', 'matmul' or 'winograd' (bench/conv_as_matmul.py; default 'xla')",
    )
    p.add_argument('--xla_flags', default=None, help='XLA_FLAGS for JAX (default: from --tuned)')
    args = p.parse_args(argv)
    for name, valid in (('models', MODELS), ('work', WORK), ('torch', TORCH_VARIANTS)):
        items = [s for s in getattr(args, name).split(',') if s]
        bad = [s for s in items if s not in valid]
        if bad:
            p.error(f'--{name}: unknown {bad}; valid: {", ".join(valid)}')
        setattr(args, name, items)
    return args


ARGS = parse_args()

# Everything that configures XLA must be in the environment before jax is imported.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sr_purify import perf  # noqa: E402  (imports no jax)

if ARGS.tuned:
    perf.reexec_with_allocator_env()  # Restarts this process once if the allocator env is unset.
SETTINGS = perf.cpu_settings() if ARGS.tuned else perf.CpuSettings(xla_flags='', devices=1)
DEVICES = ARGS.devices or SETTINGS.devices
CONV_IMPL = ARGS.conv_impl or 'xla'
XLA_FLAGS = SETTINGS.xla_flags if ARGS.xla_flags is None else ARGS.xla_flags
if DEVICES > 1:
    XLA_FLAGS = f'{XLA_FLAGS} --xla_force_host_platform_device_count={DEVICES}'.strip()
os.environ['XLA_FLAGS'] = XLA_FLAGS
os.environ['PJRT_NPROC'] = str(ARGS.threads)
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import conv_as_matmul as layers  # noqa: E402  (bench/conv_as_matmul.py)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn as tnn  # noqa: E402

from configs import common  # noqa: E402
from sr_purify import losses, models, sharding, training  # noqa: E402
from sr_purify.models import edsr as jedsr  # noqa: E402

torch.set_num_threads(ARGS.threads)

BATCH, PATCH, SCALE, BIG = 16, 48, 2, 256


# ---------------------------------------------------------------------------------------------
# The same architectures in PyTorch (NCHW; layer shapes as sr_purify.models).


def conv3(cin, cout, k=3):
    return tnn.Conv2d(cin, cout, k, padding=k // 2)


class TorchResBlock(tnn.Module):
    def __init__(self, f, res_scale):
        super().__init__()
        self.conv_0, self.conv_1, self.res_scale = conv3(f, f), conv3(f, f), res_scale

    def forward(self, x):
        return x + self.res_scale * self.conv_1(F.relu(self.conv_0(x)))


class TorchEDSR(tnn.Module):
    def __init__(self, scale=2, num_blocks=16, features=64, res_scale=1.0, bicubic_skip=False):
        super().__init__()
        self.scale, self.bicubic_skip = scale, bicubic_skip
        self.register_buffer('mean', torch.tensor(jedsr.DIV2K_MEAN).view(1, 3, 1, 1))
        self.head = conv3(3, features)
        self.blocks = tnn.Sequential(
            *[TorchResBlock(features, res_scale) for _ in range(num_blocks)]
        )
        self.body_conv = conv3(features, features)
        stages = [2, 2] if scale == 4 else [scale]
        self.up = tnn.Sequential(
            *[m for s in stages for m in (conv3(features, features * s * s), tnn.PixelShuffle(s))]
        )
        self.tail = conv3(features, 3)

    def forward(self, x):
        h = self.head(x - self.mean)
        y = self.tail(self.up(self.body_conv(self.blocks(h)) + h))
        if self.bicubic_skip:
            return y + F.interpolate(
                x, scale_factor=self.scale, mode='bicubic', align_corners=False
            )
        return y + self.mean


class TorchCCA(tnn.Module):
    def __init__(self, f, reduction=16):
        super().__init__()
        self.squeeze = tnn.Conv2d(f, max(1, f // reduction), 1)
        self.excite = tnn.Conv2d(max(1, f // reduction), f, 1)

    def forward(self, x):
        mean = x.mean(dim=(2, 3), keepdim=True)
        var = (x - mean).square().mean(dim=(2, 3), keepdim=True)
        y = self.excite(F.relu(self.squeeze(torch.sqrt(var + 1e-12) + mean)))
        return x * torch.sigmoid(y)


class TorchIMDB(tnn.Module):
    def __init__(self, f, distill_rate=0.25, slope=0.05):
        super().__init__()
        self.d, self.slope = int(f * distill_rate), slope
        r = f - self.d
        self.convs = tnn.ModuleList([conv3(f, f), conv3(r, f), conv3(r, f), conv3(r, self.d)])
        self.fuse = tnn.Conv2d(4 * self.d, f, 1)
        self.cca = TorchCCA(f)

    def forward(self, x):
        d, act = self.d, lambda t: F.leaky_relu(t, self.slope)
        y = act(self.convs[0](x))
        kept = [y[:, :d]]
        for conv in self.convs[1:3]:
            y = act(conv(y[:, d:]))
            kept.append(y[:, :d])
        kept.append(self.convs[3](y[:, d:]))
        return x + self.cca(self.fuse(torch.cat(kept, 1)))


class TorchIMDN(tnn.Module):
    def __init__(self, scale=2, num_blocks=3, features=32, slope=0.05):
        super().__init__()
        self.scale, self.slope = scale, slope
        self.register_buffer('mean', torch.tensor(jedsr.DIV2K_MEAN).view(1, 3, 1, 1))
        self.head = conv3(3, features)
        self.blocks = tnn.ModuleList([TorchIMDB(features) for _ in range(num_blocks)])
        self.body_fuse = tnn.Conv2d(num_blocks * features, features, 1)
        self.body_conv = conv3(features, features)
        self.up = tnn.Sequential(conv3(features, 3 * scale * scale), tnn.PixelShuffle(scale))

    def forward(self, x):
        h = self.head(x - self.mean)
        y, outs = h, []
        for block in self.blocks:
            y = block(y)
            outs.append(y)
        y = F.leaky_relu(self.body_fuse(torch.cat(outs, 1)), self.slope)
        return self.up(self.body_conv(y) + h) + self.mean


# name -> (JAX model config, PyTorch constructor)
SPECS = {
    'teacher': (
        common.edsr(scale=SCALE, bicubic_skip=True),
        lambda: TorchEDSR(SCALE, bicubic_skip=True),
    ),
    'edsr': (common.edsr(scale=SCALE), lambda: TorchEDSR(SCALE)),
    'student': (
        common.edsr(scale=SCALE, num_blocks=4, features=32, bicubic_skip=True),
        lambda: TorchEDSR(SCALE, num_blocks=4, features=32, bicubic_skip=True),
    ),
    'imdn': (ml_collections.ConfigDict(dict(name='imdn', scale=SCALE)), lambda: TorchIMDN(SCALE)),
}
LABELS = {
    'teacher': 'teacher: EDSR 16x64 + bicubic skip',
    'edsr': 'EDSR-baseline 16x64',
    'student': 'student: EDSR 4x32 + bicubic skip',
    'imdn': 'IMDN 3x32',
}


def shape_of(work):
    return (BATCH, PATCH, PATCH, 3) if work in ('train', 'infer16') else (1, BIG, BIG, 3)


# ---------------------------------------------------------------------------------------------
# Candidates: a zero-argument callable that runs the work once and waits for it.


def jax_candidates(name, work, mesh):
    """(run, flops) for the JAX model on `work`, through the project's own code paths."""
    model = models.build(SPECS[name][0])
    rng = np.random.default_rng(0)
    x = rng.random(shape_of(work), np.float32)

    def make_apply(impl):
        def apply(params, x):
            with layers.use_conv_impl(impl):
                return model.apply({'params': params}, x)

        return apply

    apply = make_apply(CONV_IMPL)
    params = model.init(jax.random.key(0), jnp.zeros((1, PATCH, PATCH, 3)))['params']
    if work == 'train':
        y = rng.random((BATCH, PATCH * SCALE, PATCH * SCALE, 3), np.float32)
        optim = ml_collections.ConfigDict(dict(name='adam', lr=1e-4, schedule='constant'))
        tx, schedule = training.make_optimizer(optim, 1000)
        l1 = losses.pixel_loss('l1')

        def make_loss(apply):
            def loss_fn(params, model_state, batch, rng):
                del rng
                return l1(apply(params, batch['lr']), batch['hr']), (model_state, {})

            return loss_fn

        init = lambda r: (model.init(r, jnp.zeros((1, PATCH, PATCH, 3)))['params'], {})
        state, state_sharding = training.create_state(init, tx, mesh, jax.random.key(0))
        train_step = training.make_train_step(make_loss(apply), tx, schedule)
        step = training.compile_step(train_step, mesh, state_sharding)
        batch = sharding.to_global({'lr': x, 'hr': y}, mesh)
        rng_key = jax.random.key(1)
        # The model's FLOPs: the unsharded step with XLA's convolutions (the same math).
        flops = model_flops(
            training.make_train_step(make_loss(make_apply('xla')), tx, schedule),
            state,
            batch,
            rng_key,
        )
        holder = [state]

        def run():
            holder[0], metrics = step(holder[0], batch, rng_key)
            jax.block_until_ready((holder[0], metrics))

        return run, flops

    fn = jax.jit(apply)
    if work == 'infer16' and mesh.size > 1:
        params = jax.device_put(params, sharding.replicated(mesh))
        xs = jax.device_put(x, sharding.data_sharding(mesh))
    else:  # A batch of one runs on one device (all host devices share one thread pool).
        params, xs = jax.device_put((params, x), jax.devices()[0])
    flops = model_flops(make_apply('xla'), params, xs)
    return (lambda: jax.block_until_ready(fn(params, xs))), flops


def model_flops(fn, *args):
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), args)
    cost = jax.jit(fn).lower(*abstract).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost['flops'])


def torch_candidates(name, work, variants):
    """{variant: run} for the PyTorch copy of the model."""
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random(shape_of(work), np.float32)).permute(0, 3, 1, 2).contiguous()
    y = (
        torch.from_numpy(rng.random((BATCH, PATCH * SCALE, PATCH * SCALE, 3), np.float32))
        .permute(0, 3, 1, 2)
        .contiguous()
    )
    out = {}
    for variant in variants:
        torch.manual_seed(0)
        model = SPECS[name][1]()
        xv, yv = x, y
        if variant in ('channels_last', 'compile'):
            # compile runs on channels_last too (faster than NCHW for these models here).
            model = model.to(memory_format=torch.channels_last)
            xv = x.contiguous(memory_format=torch.channels_last)
            yv = y.contiguous(memory_format=torch.channels_last)
        net = torch.compile(model) if variant == 'compile' else model
        if work == 'train':
            opt = torch.optim.Adam(model.parameters(), lr=1e-4, fused=True)

            def run(net=net, opt=opt, xv=xv, yv=yv):
                opt.zero_grad(set_to_none=True)
                loss = (net(xv) - yv).abs().mean()
                loss.backward()
                opt.step()
                return loss.item()
        else:

            def run(net=net, xv=xv):
                with torch.inference_mode():
                    return net(xv)

        out[variant] = run
    return out


def torch_param_count(name):
    return sum(p.numel() for p in SPECS[name][1]().parameters())


def jax_param_count(name):
    model = models.build(SPECS[name][0])
    shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, PATCH, PATCH, 3)))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


# ---------------------------------------------------------------------------------------------
# Peak: a large f32 matrix multiply, in both.


def peak_candidates(n=2048):
    a = jnp.asarray(np.random.default_rng(0).random((n, n), np.float32))
    dot = jax.jit(lambda a: a @ a)
    ta = torch.from_numpy(np.array(a))
    return {
        'jnp.dot': lambda: jax.block_until_ready(dot(a)),
        'torch.mm': lambda: torch.mm(ta, ta),
    }, 2.0 * n**3


def timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def measure(cands, repeats):
    """Warms every candidate up, then times them in turns; returns {name: median seconds}."""
    compile_s = {}
    for name, fn in cands.items():
        compile_s[name] = timed(fn)
        fn()
    times = {name: [] for name in cands}
    for _ in range(repeats):
        for name, fn in cands.items():
            times[name].append(timed(fn))
    return {name: float(np.median(t)) for name, t in times.items()}, compile_s


def main():
    mesh = sharding.make_mesh([('data', DEVICES)])
    peak_fns, peak_flops = peak_candidates()
    rows, peaks = [], []
    print(
        f'# JAX {jax.__version__} ({DEVICES} device(s), conv_impl={CONV_IMPL}, '
        f'XLA_FLAGS={XLA_FLAGS!r}, allocator env '
        f'{"on" if all(k in os.environ for k in perf.ALLOCATOR_ENV) else "off"}), '
        f'PyTorch {torch.__version__}, {ARGS.threads} threads, {ARGS.repeats} turns; load '
        f'average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores',
        flush=True,
    )
    for name in ARGS.models:
        counts = jax_param_count(name), torch_param_count(name)
        if counts[0] != counts[1]:
            raise AssertionError(f'{name}: JAX has {counts[0]} parameters, PyTorch {counts[1]}')
        for work in ARGS.work:
            jrun, flops = jax_candidates(name, work, mesh)
            cands = {'jax': jrun}
            cands.update(
                {f'torch {v}': fn for v, fn in torch_candidates(name, work, ARGS.torch).items()}
            )
            cands.update(peak_fns)
            med, first = measure(cands, ARGS.repeats)
            peak = max(peak_flops / med['jnp.dot'], peak_flops / med['torch.mm'])
            peaks.append((peak_flops / med['jnp.dot'], peak_flops / med['torch.mm']))
            tvars = [k for k in med if k.startswith('torch ')]
            images = shape_of(work)[0]
            row = dict(
                model=name,
                work=work,
                flops=flops,
                jax=med['jax'],
                peak=peak,
                jax_first=first['jax'],
                load=os.getloadavg()[0],
            )
            if tvars:
                best = min(tvars, key=med.get)
                row.update(
                    torch=med[best],
                    variant=best[len('torch ') :],
                    all_torch={k[len('torch ') :]: med[k] for k in tvars},
                )
            rows.append(row)
            extra = ', '.join(f'{k} {v * 1e3:.0f} ms' for k, v in med.items())
            print(
                f'  {name} {work}: {extra} (GFLOP {flops / 1e9:.1f}; {images} image(s))', flush=True
            )
    print()
    print(
        '| model | work | JAX img/s | PyTorch img/s (best variant) | JAX / PyTorch | '
        'JAX % of peak | PyTorch % of peak | load |'
    )
    print('| --- | --- | --- | --- | --- | --- | --- | --- |')
    for r in rows:
        n = shape_of(r['work'])[0]
        jax_util = 100 * r['flops'] / r['jax'] / r['peak']
        if 'torch' in r:
            torch_cells = (
                f'{n / r["torch"]:.1f} ({r["variant"]}) | '
                f'{r["torch"] / r["jax"]:.2f}x | {jax_util:.0f} | '
                f'{100 * r["flops"] / r["torch"] / r["peak"]:.0f}'
            )
        else:
            torch_cells = f'- | - | {jax_util:.0f} | -'
        busy = ' (busy)' if r['load'] > ARGS.threads + 1 else ''  # The bench itself adds ~threads.
        print(
            f'| {LABELS[r["model"]]} | {r["work"]} | {n / r["jax"]:.1f} | {torch_cells} | '
            f'{r["load"]:.1f}{busy} |'
        )
    jdot = np.median([p[0] for p in peaks]) / 1e9
    tmm = np.median([p[1] for p in peaks]) / 1e9
    print(
        f'\nPeak (median over blocks): jnp.dot 2048^2 f32 {jdot:.0f} GFLOP/s, torch.mm '
        f'{tmm:.0f} GFLOP/s; % of peak uses the faster of the two in the same block (a conv '
        f'kernel can beat a 2048^2 dot: >100 %). load: 1-minute load average after the row '
        f'(the bench adds about {ARGS.threads}), {os.cpu_count()} cores; "busy" rows shared '
        f'the CPU with other processes, which slows PyTorch (OpenMP) far more than XLA: read '
        f'their ratios with care.'
    )


if __name__ == '__main__':
    main()
