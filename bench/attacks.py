"""L-inf PGD of this library against foolbox 3 `LinfPGD` and torchattacks `PGD`, on one classifier.

Run by hand, never in CI, in a separate venv so the main one stays clean:
  python3 -m venv /work/venv-bench
  /work/venv-bench/bin/pip install -r requirements.txt -r requirements-bench.txt
  /work/venv-bench/bin/python bench/attacks.py --checkpoint=workdirs/classifier

Every attack sees the same trained Flax ResNet-20 (restored from `--checkpoint`, or trained for a
few hundred steps first when none is given), the same batch of CIFAR-10 test images and the same
settings: eps 8/255, 10 steps of 2/255, random start. foolbox runs on this JAX through its JAX
backend (the jitted Flax apply); torchattacks runs on a PyTorch ResNet-20 holding the same weights
(conv kernels HWIO -> OIHW, BatchNorm statistics), whose logits are checked against Flax first.
Repeats are interleaved (one call of each implementation per round) so that load from other
processes hits all of them alike; times are medians after a warm-up call, accuracies the mean over
the repeats (each repeat draws a new random start).
"""

import argparse
import os
import platform
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

EPS, STEPS, STEP_SIZE = 8 / 255, 10, 2 / 255


def cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------
# The classifier and the data.


def trained_classifier(checkpoint: str, depth: int):
    """(model config, variables): restored, or trained briefly into a temporary workdir."""
    from configs import classifier as classifier_config
    from sr_purify import restore
    from sr_purify.jobs import classifier as classifier_job

    config = classifier_config.get_config()
    config.model.depth = depth
    if not checkpoint:
        checkpoint = os.path.join(tempfile.mkdtemp(prefix='bench_classifier_'), 'wd')
        config.total_steps, config.eval_every, config.checkpoint_every = 300, 0, 300
        print(
            f'no --checkpoint: training ResNet-{depth} for {config.total_steps} steps in '
            f'{checkpoint}',
            flush=True,
        )
        classifier_job.train_and_evaluate(config, checkpoint)
    restored = restore.load(checkpoint, 'classifier', model_config=config.model)
    variables, step = restored.variables, restored.step
    print(f'classifier: ResNet-{depth} from {checkpoint} (step {step})', flush=True)
    return config, variables


def test_batch(config, count: int):
    from sr_purify import classification_data as cdata

    data = config.data
    split = cdata.subset(cdata.load_split(data, data.eval_split), count, data.subset_seed)
    return split.images.astype(np.float32) / 255.0, split.labels


# ---------------------------------------------------------------------------------------------
# The PyTorch twin of the Flax ResNet (shortcut A), for torchattacks.


def torch_resnet(variables, depth: int):
    import torch
    import torch.nn.functional as F

    from sr_purify.models.classifiers import CIFAR10_MEAN, CIFAR10_STD

    nn = torch.nn

    def conv(kernel, stride):
        k = np.asarray(kernel)
        layer = nn.Conv2d(k.shape[2], k.shape[3], 3, stride=stride, padding=1, bias=False)
        layer.weight.data = torch.from_numpy(np.ascontiguousarray(k.transpose(3, 2, 0, 1)))
        return layer

    def bn(params, stats):
        layer = nn.BatchNorm2d(len(params['scale']), eps=1e-5, momentum=0.1)
        layer.weight.data = torch.from_numpy(np.asarray(params['scale']).copy())
        layer.bias.data = torch.from_numpy(np.asarray(params['bias']).copy())
        layer.running_mean.data = torch.from_numpy(np.asarray(stats['mean']).copy())
        layer.running_var.data = torch.from_numpy(np.asarray(stats['var']).copy())
        return layer

    class Block(nn.Module):
        def __init__(self, p, s, stride):
            super().__init__()
            self.conv_0, self.bn_0 = conv(p['conv_0']['kernel'], stride), bn(p['bn_0'], s['bn_0'])
            self.conv_1, self.bn_1 = conv(p['conv_1']['kernel'], 1), bn(p['bn_1'], s['bn_1'])
            self.stride = stride
            self.pad = self.conv_1.out_channels - self.conv_0.in_channels

        def forward(self, x):
            y = F.relu(self.bn_0(self.conv_0(x)))
            y = self.bn_1(self.conv_1(y))
            if self.stride != 1 or self.pad:
                x = x[:, :, :: self.stride, :: self.stride]
                x = F.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
            return F.relu(x + y)

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            p, s = variables['params'], variables['batch_stats']
            self.register_buffer('mean', torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1))
            self.register_buffer('std', torch.tensor(CIFAR10_STD).view(1, 3, 1, 1))
            self.stem_conv, self.stem_bn = (
                conv(p['stem_conv']['kernel'], 1),
                bn(p['stem_bn'], s['stem_bn']),
            )
            n = (depth - 2) // 6
            names = [f'stage_{st}_block_{b}' for st in (1, 2, 3) for b in range(1, n + 1)]
            self.blocks = nn.Sequential(
                *[
                    Block(
                        p[name],
                        s[name],
                        2 if name.endswith('_block_1') and not name.startswith('stage_1') else 1,
                    )
                    for name in names
                ]
            )
            self.head = nn.Linear(64, 10)
            self.head.weight.data = torch.from_numpy(np.asarray(p['head']['kernel']).T.copy())
            self.head.bias.data = torch.from_numpy(np.asarray(p['head']['bias']).copy())

        def forward(self, x):  # NCHW in [0, 1]
            y = F.relu(self.stem_bn(self.stem_conv((x - self.mean) / self.std)))
            y = self.blocks(y)
            return self.head(y.mean(dim=(2, 3)))

    return ResNet().eval()


# ---------------------------------------------------------------------------------------------
# The contestants: each is `run(seed) -> x_adv` (NHWC numpy) plus a clean-accuracy check.


def ours(fn, variables, x, y):
    import jax

    from sr_purify import attacks

    cfg = attacks.attack_config(
        name='pgd', norm='linf', eps=EPS, steps=STEPS, step_size=STEP_SIZE, random_start=True
    )
    attack = jax.jit(attacks.make_attack(cfg), static_argnums=0)
    xj, yj = jax.numpy.asarray(x), jax.numpy.asarray(y)
    return lambda seed: np.asarray(
        jax.block_until_ready(attack(fn, variables, xj, jax.random.key(seed), yj))
    )


def ours_sharded(fn, variables, x, y):
    """The same attack with the batch split over every JAX device (the library's data parallelism).

    With `--tuned` this process has 2 host devices (sr_purify.perf): XLA:CPU runs each of these
    small convolutions on one thread, so two devices attacking half the batch each use both cores.
    """
    import jax

    from sr_purify import attacks, sharding

    cfg = attacks.attack_config(
        name='pgd', norm='linf', eps=EPS, steps=STEPS, step_size=STEP_SIZE, random_start=True
    )
    attack = jax.jit(attacks.make_attack(cfg), static_argnums=0)
    mesh = sharding.make_mesh()
    sharding.check_batch(len(x), mesh)
    xj, yj = sharding.to_global((x, y), mesh)
    variables = jax.device_put(variables, sharding.replicated(mesh))
    return lambda seed: np.asarray(
        jax.block_until_ready(attack(fn, variables, xj, jax.random.key(seed), yj))
    )


def foolbox_pgd(fn, variables, x, y):
    import foolbox as fb
    import jax

    model = fb.JAXModel(jax.jit(lambda x: fn(variables, x)), bounds=(0.0, 1.0))
    attack = fb.attacks.LinfPGD(abs_stepsize=STEP_SIZE, steps=STEPS, random_start=True)
    xj, yj = jax.numpy.asarray(x), jax.numpy.asarray(y)

    def run(seed):
        del seed  # eagerpy draws the random start from its own global JAX key.
        _, clipped, _ = attack(model, xj, yj, epsilons=EPS)
        return np.asarray(jax.block_until_ready(clipped))

    return run


def torchattacks_pgd(torch_model, x, y):
    import torch
    import torchattacks

    attack = torchattacks.PGD(torch_model, eps=EPS, alpha=STEP_SIZE, steps=STEPS, random_start=True)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(y.astype(np.int64))

    def run(seed):
        torch.manual_seed(seed)
        return attack(xt, yt).detach().numpy().transpose(0, 2, 3, 1)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument(
        '--checkpoint',
        default='',
        help='workdir of a classifier job (ResNet); empty: train one briefly',
    )
    parser.add_argument('--depth', type=int, default=20)
    parser.add_argument('--examples', type=int, default=256)
    parser.add_argument('--repeats', type=int, default=3)
    parser.add_argument(
        '--threads',
        type=int,
        default=len(os.sched_getaffinity(0)),
        help='cores for every contestant: the process is pinned to that many '
        'cores (XLA sizes its thread pool from them) and torch uses as many '
        'threads',
    )
    parser.add_argument('--skip', default='', help='comma-separated contestants to leave out')
    parser.add_argument(
        '--tuned',
        action='store_true',
        help="sr_purify.perf's CPU settings for the whole process (every "
        'contestant): glibc allocator environment and 2 host devices, '
        'which add a row with the batch split over them',
    )
    args = parser.parse_args(argv)
    if args.tuned:
        from sr_purify import perf  # Imports no jax; may restart this process once.

        perf.apply_cpu_defaults(force=True)
    # Before jax and torch start their thread pools: both see the same cores.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])

    import tensorflow as tf

    tf.config.set_visible_devices([], 'GPU')
    import jax
    import torch

    torch.set_num_threads(args.threads)
    import foolbox
    import torchattacks

    config, variables = trained_classifier(args.checkpoint, args.depth)
    from sr_purify import models

    model = models.build(config.model)
    fn = lambda v, x: model.apply(v, x, train=False)
    x, y = test_batch(config, args.examples)

    # The PyTorch twin must compute the same function before its attack means anything.
    twin = torch_resnet(variables, args.depth)
    flax_logits = np.asarray(jax.jit(fn)(variables, x))
    with torch.no_grad():
        torch_logits = twin(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
    logit_gap = float(np.max(np.abs(torch_logits.numpy() - flax_logits)))
    print(f'max |logits torch - flax| = {logit_gap:.2e} on {len(x)} images', flush=True)
    if logit_gap > 1e-3:
        raise SystemExit(f'the PyTorch port disagrees with Flax (max logit gap {logit_gap:.2e})')

    predict = jax.jit(lambda xs: jax.numpy.argmax(fn(variables, xs), -1))
    accuracy = lambda xs: float(np.mean(np.asarray(predict(xs)) == y))
    clean = accuracy(x)

    contestants = {'sr_purify pgd': ours(fn, variables, x, y)}
    if jax.device_count() > 1:
        contestants[f'sr_purify pgd, batch over {jax.device_count()} devices'] = ours_sharded(
            fn, variables, x, y
        )
    contestants |= {
        f'foolbox {foolbox.__version__} LinfPGD (JAX)': foolbox_pgd(fn, variables, x, y),
        f'torchattacks {torchattacks.__version__} PGD (torch {torch.__version__})': (
            torchattacks_pgd(twin, x, y)
        ),
    }
    skip = [s for s in args.skip.split(',') if s]
    contestants = {k: v for k, v in contestants.items() if not any(s in k for s in skip)}
    times = {k: [] for k in contestants}
    accs = {k: [] for k in contestants}
    for name, run in contestants.items():  # Warm-up: compilation, caches.
        t = time.perf_counter()
        x_adv = run(0)
        print(f'warm-up {name}: {time.perf_counter() - t:.1f} s', flush=True)
        assert np.max(np.abs(x_adv - x)) <= EPS + 1e-6, name
    for r in range(args.repeats):
        for name, run in contestants.items():
            t = time.perf_counter()
            x_adv = run(r + 1)
            times[name].append(time.perf_counter() - t)
            accs[name].append(accuracy(x_adv))
        print(f'round {r + 1}/{args.repeats} done', flush=True)

    fb_name = next((k for k in contestants if k.startswith('foolbox')), None)
    fb_rate = args.examples / np.median(times[fb_name]) if fb_name else float('nan')
    rows = []
    for name in contestants:
        median = float(np.median(times[name]))
        rate = args.examples / median
        rows.append([name, 100 * np.mean(accs[name]), median, rate, rate / fb_rate])
    from sr_purify import reporting

    header = [
        'implementation',
        'accuracy under attack %',
        'median s / batch',
        'images / s',
        'x foolbox',
    ]
    title = (
        f'L-inf PGD (eps 8/255, {STEPS} steps of 2/255, random start) on ResNet-'
        f'{args.depth}, {args.examples} CIFAR-10 test images (clean accuracy '
        f'{100 * clean:.1f} %), median of {args.repeats} after a warm-up; CPU: {cpu_name()}'
        f' ({os.cpu_count()} cores), {args.threads} thread(s)/core(s) for each; jax '
        f'{jax.__version__}; '
        + (
            f'sr_purify.perf CPU settings (allocator env, {jax.device_count()} host devices)'
            if args.tuned
            else 'default settings'
        )
    )
    print(f'\n{title}\n\n{reporting.markdown_table(header, rows)}\n', flush=True)
    if fb_name:
        fb_acc = 100 * np.mean(accs[fb_name])
        for name in [k for k in contestants if k.startswith('sr_purify')]:
            acc = 100 * np.mean(accs[name])
            ratio = args.examples / np.median(times[name]) / fb_rate
            print(
                f'{name}: accuracy {acc:.2f} % vs foolbox {fb_acc:.2f} % -> '
                f'{"OK" if acc <= fb_acc + 0.5 else "FAIL"} (<= foolbox + 0.5); throughput '
                f'{ratio:.2f}x foolbox -> {"OK" if ratio >= 1.3 else "FAIL"} (target >= 1.3x)',
                flush=True,
            )


if __name__ == '__main__':
    main()
