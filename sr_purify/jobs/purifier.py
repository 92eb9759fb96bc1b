"""Trains the self-supervised purifier P (the `purifier` job, configs/purifier.py). No labels.

The input pipeline yields `{'image'}` batches only. For each clean batch x the jitted step makes
x' from x with the step's rng (SSP against the frozen feature extractor F, optionally PGD on F's
own predictions and Gaussian noise, in fixed fractions of the batch) and minimises

    pixel * L1(P(x'), x) + feature * d(F(P(x')), F(x)) + identity * L1(P(x), x).

F's parameters are frozen: they go to the step as `fit`'s separate replicated argument, never into
the training state or its checkpoints. At the end the purifier's parameters alone are exported to
<workdir>/purifier (configs/evaluate.py:robustness restores them with the workdir's config.json),
and a label-free report (PSNR of x', P(x'), P(x) against x on held-out images, before and after
training) goes to purifier_table.md, results.json and purifier_grid.png (clean | x' | P(x') | P(x)).

A config with `sr_model` (configs/purifier.py:sr_service) trains the SR service's input purifier
instead (`train_sr_service`): P in front of a frozen SR model S, on unlabelled LR images only (no
HR), minimising sr * L1(S(P(x + d)), S(x)) + identity * L1(P(x), x) with d the SR attack on S;
evaluators/sr_defences.py's `input_purifier` runs S(P(x)) with the export.

A config with `denoise` (configs/purifier.py:denoiser) trains P as the denoiser D of denoised
smoothing (Salman et al. 2020) instead (`train_denoiser`): on the same unlabelled `{'image'}`
batches, x + n with n ~ N(0, sigma^2) unclipped (x and sigma in [0, 1]), minimising
gaussian_mse * mean((D(x + n) - x)^2) + stability * CE(C(D(x + n)), C(x)'s own prediction), C a
frozen classifier (losses.py). The export is the same <workdir>/purifier, so `purifiers.restore`
puts D in front of the classifier.
"""

import itertools
import logging
from typing import Any, Dict, Iterator, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from sr_purify import (
    attacks,
    checkpointing,
    losses,
    paths,
    purifiers,
    registry,
    reporting,
    restore,
    sharding,
    training,
)
from sr_purify.evaluators import sr_defences

PyTree = Any
DATA_SOURCES = ('cifar', 'folder', 'embedded')
LOSS_TERMS = ('pixel', 'feature', 'identity')
DENOISER_LOSS_TERMS = ('gaussian_mse', 'stability')  # configs/purifier.py:denoiser


# ---------------------------------------------------------------------------------------------
# Unlabelled images.


def load_images(config: ml_collections.ConfigDict) -> Tuple[Any, np.ndarray, str]:
    """(training bank, held-out uint8 images, source). No labels leave this function.

    The bank is a uint8 (N, H, W, 3) array (CIFAR) or a list of HxWx3 images (photos); the
    held-out images are `sr_data.eval_images` crops of `data.patch` pixels.
    """
    d = config.data
    if d.source not in DATA_SOURCES:
        raise ValueError(
            f'unknown purifier data source {d.source!r}; valid: {", ".join(DATA_SOURCES)}'
        )
    if d.source == 'cifar':
        from sr_purify import classification_data as cdata

        c = d.cifar
        train = cdata.subset(cdata.load_split(c, c.train_split), c.train_examples, c.subset_seed)
        held = cdata.subset(cdata.load_split(c, c.eval_split), d.eval_images, c.subset_seed)
        if train.images.shape[1:3] != (d.patch, d.patch):
            return list(train.images), _fixed_crops(list(held.images), d.patch), train.source
        return train.images, held.images, train.source
    from sr_purify import sr_data

    if d.source == 'folder':
        if not d.path:
            raise FileNotFoundError(
                'purifier data source folder needs --config.data.path=<a folder of images>'
            )
        spec = ml_collections.ConfigDict(dict(source='folder', path=d.path, skip_bad=False))
        bank = [im.pixels for im in sr_data.load_images(spec, 'train')]
        held = bank  # An unlabelled folder has no held-out split; crops at fixed places.
        source = d.path
    else:
        spec = ml_collections.ConfigDict(dict(source='embedded'))
        bank = [im.pixels for im in sr_data.load_images(spec, 'train')]
        held = [im.pixels for im in sr_data.load_images(spec, 'eval')]
        source = 'embedded scikit-image photos'
    small = [im.shape for im in bank if min(im.shape[:2]) < d.patch]
    if small:
        raise ValueError(
            f'{len(small)} image(s) of {source} are smaller than the {d.patch}-pixel '
            f'crop (e.g. {small[0]}); use a smaller --config.data.patch'
        )
    return bank, _fixed_crops(held, d.patch, d.eval_images), source


def _fixed_crops(images, patch: int, count: int = 0) -> np.ndarray:
    rng = np.random.default_rng(1234)
    count = count or len(images)
    out = np.empty((count, patch, patch, 3), np.uint8)
    for j in range(count):
        im = images[j % len(images)]
        y = rng.integers(0, im.shape[0] - patch + 1)
        x = rng.integers(0, im.shape[1] - patch + 1)
        out[j] = im[y : y + patch, x : x + patch, :3]
    return out


def _run_summary(result, losses) -> Dict[str, Any]:
    """The training-run fields every purifier's results.json section reports."""
    return {
        'steps': result.step,
        'steps_per_sec': result.steps_per_sec,
        'wall_s': result.wall_s,
        'first_loss': losses[0][1] if losses else None,
        'last_loss': losses[-1][1] if losses else None,
    }


def _train_batches(bank, config: ml_collections.ConfigDict):
    """`start_step -> iterator` of this process's share of the training batches from `bank`."""
    return lambda start_step: image_batches(
        bank,
        patch=config.data.patch,
        global_batch=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        flip=config.data.flip,
    )


def image_batches(
    bank,
    *,
    patch: int,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    flip: bool = True,
) -> Iterator[Dict[str, np.ndarray]]:
    """This process's share of `{'image': float32 (B, patch, patch, 3)}` batches, forever.

    Global batch t is a pure function of (seed, t): random images (with replacement), random
    crops, random horizontal flips; so a resumed run and any process count see the same batches.
    """
    if global_batch % process_count:
        raise ValueError(
            f'global batch {global_batch} is not divisible by the process count {process_count}'
        )
    local = global_batch // process_count
    n = len(bank)
    if n == 0:
        raise ValueError('no training images')
    stacked = isinstance(bank, np.ndarray) and bank.shape[1:3] == (patch, patch)
    for step in itertools.count(start_step):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, n, global_batch)
        flips = rng.random(global_batch) < 0.5 if flip else np.zeros(global_batch, bool)
        offsets = rng.random((global_batch, 2))
        mine = slice(process_index * local, (process_index + 1) * local)
        if stacked:
            images = bank[idx[mine]]
        else:
            images = np.empty((local, patch, patch, 3), np.uint8)
            for j, (i, (fy, fx)) in enumerate(zip(idx[mine], offsets[mine])):
                im = bank[i]
                y = int(fy * (im.shape[0] - patch + 1))
                x = int(fx * (im.shape[1] - patch + 1))
                images[j] = im[y : y + patch, x : x + patch, :3]
        images = np.where(flips[mine, None, None, None], images[:, :, ::-1], images)
        yield {'image': images.astype(np.float32) / 255.0}


# ---------------------------------------------------------------------------------------------
# The loss.


def _check_trainable(kind: str, hint: str = '') -> str:
    """`kind` if it is a purifier kind with parameters; else one line naming the valid ones."""
    purifiers._check_kind(kind)
    if kind not in purifiers.TRAINABLE:
        raise ValueError(
            f'purifier kind {kind!r} has no parameters to train; valid: '
            f'{", ".join(sorted(purifiers.TRAINABLE))}{hint}'
        )
    return kind


def check_config(config: ml_collections.ConfigDict) -> Dict[str, float]:
    """Active loss weights; fails on a kind with nothing to train or a bad mix, before any work."""
    _check_trainable(
        config.purifier.kind,
        f' (evaluate {config.purifier.kind!r} directly with configs/evaluate.py:robustness)',
    )
    weights = dict(config.loss)
    unknown = sorted(set(weights) - set(LOSS_TERMS))
    if unknown:
        hint = (
            ' (gaussian_mse and stability train a denoiser: configs/purifier.py:denoiser)'
            if unknown[0] in DENOISER_LOSS_TERMS
            else ''
        )
        raise ValueError(
            f'unknown purifier loss {unknown[0]!r}; valid: {", ".join(LOSS_TERMS)}{hint}'
        )
    if any(w < 0 for w in weights.values()) or not weights.get('pixel', 0) + weights.get(
        'feature', 0
    ):
        raise ValueError(
            f'purifier loss weights must be >= 0 with pixel or feature > 0; got {weights}'
        )
    p = config.perturb
    fractions = (p.ssp, p.pgd, p.noise)
    if min(fractions) < 0 or sum(fractions) <= 0:
        raise ValueError(
            f'perturb fractions (ssp, pgd, noise) must be >= 0 and not all 0; got {fractions}'
        )
    if p.pgd > 0 and config.purifier.feature.kind != 'classifier':
        raise ValueError(
            f"perturb.pgd > 0 attacks F's own predictions and needs "
            f'purifier.feature.kind=classifier; got '
            f'{config.purifier.feature.kind!r} (set perturb.pgd=0)'
        )
    if config.purifier.feature.distance not in ('l1', 'l2'):
        raise ValueError(
            f'unknown feature distance {config.purifier.feature.distance!r}; valid: l1, l2'
        )
    return {k: float(w) for k, w in weights.items() if w}


def mix_counts(perturb: ml_collections.ConfigDict, batch: int) -> Tuple[int, int, int]:
    """Samples of each batch perturbed by (SSP, PGD on F, noise): fractions of `batch`, rounded.

    Batches are shuffled, so a fixed split of the batch is a random assignment of images.
    """
    fractions = np.asarray([perturb.ssp, perturb.pgd, perturb.noise], np.float64)
    fractions = fractions / fractions.sum()
    n_ssp = int(round(fractions[0] * batch))
    n_pgd = min(int(round(fractions[1] * batch)), batch - n_ssp)
    return n_ssp, n_pgd, batch - n_ssp - n_pgd


def psnr(a: jax.Array, b: jax.Array) -> jax.Array:
    """Mean over the batch of the per-image PSNR (dB) of [0, 1] images."""
    mse = jnp.mean(jnp.square(a - b), axis=(1, 2, 3))
    return jnp.mean(10.0 * jnp.log10(1.0 / jnp.maximum(mse, 1e-10)))


def make_perturb(
    feature: purifiers.FeatureExtractor, perturb: ml_collections.ConfigDict, batch: int
):
    """`(feature_params, x, rng) -> x'`, label-free, per the configured mix."""
    n_ssp, n_pgd, n_noise = mix_counts(perturb, batch)
    ssp = attacks.make_attack(
        attacks.attack_config(
            name='ssp', eps=perturb.eps, steps=perturb.steps, step_size=perturb.step_size
        )
    )
    pgd = (
        attacks.make_attack(
            attacks.attack_config(
                name='pgd',
                eps=perturb.pgd_eps,
                steps=perturb.pgd_steps,
                step_size=perturb.pgd_step_size,
            )
        )
        if n_pgd
        else None
    )

    def make(fparams, x, rng):
        k_ssp, k_pgd, k_noise = jax.random.split(rng, 3)
        parts = []
        if n_ssp:
            parts.append(ssp(feature.fn, fparams, x[:n_ssp], k_ssp))
        if n_pgd:
            xp = x[n_ssp : n_ssp + n_pgd]
            # F's own predictions, not data labels: the purifier never sees a label.
            pseudo = jnp.argmax(feature.logits(fparams, xp), axis=-1)
            parts.append(pgd(feature.logits, fparams, xp, k_pgd, pseudo))
        if n_noise:
            xn = x[n_ssp + n_pgd :]
            noise = perturb.noise_std * jax.random.normal(k_noise, xn.shape, xn.dtype)
            parts.append(jnp.clip(xn + noise, min=0.0, max=1.0))
        return jax.lax.stop_gradient(jnp.concatenate(parts) if len(parts) > 1 else parts[0])

    return make


def make_loss_fn(
    purifier: purifiers.Purifier,
    feature: purifiers.FeatureExtractor,
    config: ml_collections.ConfigDict,
):
    """`loss_fn(params, model_state, batch, rng, feature_params)` for `training.fit`."""
    weights = check_config(config)
    perturb = make_perturb(feature, config.perturb, config.batch_size)
    distance = (
        (lambda a, b: jnp.mean(jnp.abs(a - b)))
        if (config.purifier.feature.distance == 'l1')
        else (lambda a, b: jnp.mean(jnp.square(a - b)))
    )

    def forward(params, x, rng):
        # Train on what deployment sees: the input noise (if any), then the unclipped network.
        return purifier.raw(params, purifier.add_noise(x, rng))

    def loss_fn(params, model_state, batch, rng, fparams):
        x = batch['image']
        fparams = jax.lax.stop_gradient(fparams)
        k_perturb, k_noise, k_noise_id = jax.random.split(rng, 3)
        x_adv = perturb(fparams, x, k_perturb)
        out = forward(params, x_adv, k_noise)
        terms = {'pixel': jnp.mean(jnp.abs(out - x))}
        if 'feature' in weights:
            target = jax.lax.stop_gradient(feature.fn(fparams, x))
            terms['feature'] = distance(feature.fn(fparams, out), target)
        if 'identity' in weights:
            terms['identity'] = jnp.mean(jnp.abs(forward(params, x, k_noise_id) - x))
        total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
        metrics = {f'loss/{k}': v for k, v in terms.items()}
        metrics['psnr/perturbed'] = psnr(x_adv, x)
        metrics['psnr/purified'] = psnr(jnp.clip(out, min=0.0, max=1.0), x)
        return total, (model_state, metrics)

    return loss_fn


# ---------------------------------------------------------------------------------------------
# Label-free report.


def make_report(
    purifier: purifiers.Purifier,
    feature: purifiers.FeatureExtractor,
    config: ml_collections.ConfigDict,
    images: np.ndarray,
):
    """`params -> (metrics, samples)` on held-out images with a fixed SSP key."""
    x = jnp.asarray(images, jnp.float32) / 255.0
    perturb = make_perturb(feature, config.perturb, len(images))
    distance = lambda a, b: jnp.mean(jnp.abs(a - b))
    key = jax.random.key(config.seed + 1)

    @jax.jit
    def measure(params, fparams, x):
        x_adv = perturb(fparams, x, key)
        k = jax.random.fold_in(key, 1)
        p_adv = purifier.purify(params, x_adv, k)
        p_clean = purifier.purify(params, x, k)
        f_clean = feature.fn(fparams, x)
        metrics = {
            'psnr_perturbed': psnr(x_adv, x),
            'psnr_purified': psnr(p_adv, x),
            'psnr_clean_through_p': psnr(p_clean, x),
            'feature_l1_perturbed': distance(feature.fn(fparams, x_adv), f_clean),
            'feature_l1_purified': distance(feature.fn(fparams, p_adv), f_clean),
        }
        return metrics, (x_adv, p_adv, p_clean)

    def report(params):
        metrics, samples = measure(params, feature.params, x)
        return {k: float(v) for k, v in metrics.items()}, jax.device_get(samples)

    return report


class _LossLog:
    """Passes scalars to a clu-like writer and keeps (step, loss) pairs for the results."""

    def __init__(self, writer):
        self._writer = writer
        self.losses = []

    def write_scalars(self, step, scalars):
        if 'loss' in scalars:
            self.losses.append((int(step), float(np.asarray(scalars['loss']))))
        self._writer.write_scalars(step, scalars)

    def __getattr__(self, name):
        return getattr(self._writer, name)


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Trains P with no labels, exports it, reports; `writer` replaces the clu writer."""
    if config.get('sr_model', None) is not None:
        return train_sr_service(config, workdir, writer)
    if config.get('denoise', None) is not None:
        return train_denoiser(config, workdir, writer)
    check_config(config)
    reporting.check_workdir(workdir)
    purifier = purifiers.build(config.purifier)
    bank, held, source = load_images(config)
    image_shape = (config.data.patch, config.data.patch, 3)
    feature = purifiers.build_feature(config.purifier.feature, image_shape)
    # Resolve the starting point now (it may read a student checkpoint) so `init` is pure.
    start = purifiers.initial_params(purifier, config.purifier, jax.random.key(config.seed))
    reporting.write_config(workdir, config)
    logging.info(
        'purifier %s: %d unlabelled training images from %s; F = %s',
        purifier.kind,
        len(bank),
        source,
        feature.source,
    )

    def init_variables(rng):
        del rng  # The starting point is fixed (a student checkpoint or a seeded init).
        return jax.tree.map(jnp.asarray, start), {}

    batches = _train_batches(bank, config)

    report = make_report(purifier, feature, config, held)

    def evaluate(state, step):
        del step
        metrics, _ = report(sharding.to_host(state.params))
        return {f'eval/{k}': v for k, v in metrics.items()}

    log = _LossLog(writer or reporting.create_writer(workdir))
    result = training.fit(
        config,
        workdir,
        init_variables=init_variables,
        loss_fn=make_loss_fn(purifier, feature, config),
        batches=batches,
        evaluate=evaluate,
        frozen=feature.params,
        writer=log,
    )
    if result.preempted:
        return result
    params = sharding.to_host(result.state.params)
    export_dir = checkpointing.export_params(paths.join(workdir, 'purifier'), result.step, params)
    before, _ = report(start)
    after, (x_adv, p_adv, p_clean) = report(params)
    log.write_scalars(result.step, {f'eval/{k}': v for k, v in after.items()})

    title = (
        f'purifier {purifier.kind} after {result.step} steps (no labels; F = '
        f"{feature.kind}), {len(held)} held-out images, x' = training perturbation mix"
    )
    header = ['', "PSNR x' vs x", "PSNR P(x') vs x", 'PSNR P(x) vs x', "F L1 x'", "F L1 P(x')"]
    rows = [
        [
            name,
            m['psnr_perturbed'],
            m['psnr_purified'],
            m['psnr_clean_through_p'],
            m['feature_l1_perturbed'],
            m['feature_l1_purified'],
        ]
        for name, m in (('start', before), ('trained', after))
    ]
    table = reporting.log_table(title, header, rows)
    losses = log.losses
    summary = {
        'kind': purifier.kind,
        'feature': feature.source,
        'data': source,
        'train_images': len(bank),
        'labels_used': False,
        'export': export_dir,
        **_run_summary(result, losses),
        'start': before,
        'trained': after,
        'student_checkpoint': config.purifier.get('student_checkpoint', ''),
    }
    reporting.update_results(workdir, 'purifier', summary)
    reporting.write_text(
        workdir,
        'purifier_table.md',
        f'# {title}\n\n{table}\n\nGrid purifier_grid.png, one row per image: '
        f"clean | x' | P(x') | P(x).\nPurifier parameters: {export_dir}",
    )
    _write_grid(
        workdir,
        config,
        held,
        (x_adv, p_adv, p_clean),
        ('clean', "x'", "P(x')", 'P(x)'),
        log,
        result.step,
    )
    logging.info(
        "purifier %s: PSNR of P(x') %.2f dB (x' %.2f dB), %.2f steps/s, %.0f s",
        purifier.kind,
        after['psnr_purified'],
        after['psnr_perturbed'],
        result.steps_per_sec,
        result.wall_s,
    )
    log.flush()
    return result


# ---------------------------------------------------------------------------------------------
# The SR service's input purifier (configs/purifier.py:sr_service): LR in, LR out, no HR.

SR_LOSS_TERMS = ('sr', 'identity')


def check_sr_service_config(config: ml_collections.ConfigDict) -> Dict[str, float]:
    """Active loss weights of the SR-service purifier; fails on a bad config before any work."""
    if not config.sr_model.get('checkpoint', ''):
        raise ValueError(
            'the SR-service purifier needs --config.sr_model.checkpoint=<a teacher or student '
            'workdir> (the frozen SR model S it protects)'
        )
    _check_trainable(config.purifier.kind)
    weights = dict(config.loss)
    unknown = sorted(set(weights) - set(SR_LOSS_TERMS))
    if unknown:
        raise ValueError(
            f'unknown SR-service purifier loss {unknown[0]!r}; valid: {", ".join(SR_LOSS_TERMS)}'
        )
    if any(w < 0 for w in weights.values()) or not weights.get('sr', 0):
        raise ValueError(
            f'SR-service purifier loss weights must be >= 0 with sr > 0; got {weights}'
        )
    if config.perturb.eps < 0 or config.perturb.steps < 1:
        raise ValueError(
            f'perturb.eps must be >= 0 and perturb.steps >= 1; got {config.perturb.eps}, '
            f'{config.perturb.steps}'
        )
    _check_against(config.perturb.get('against', 'defended'))
    return {k: float(w) for k, w in weights.items() if w}


def load_lr_images(config: ml_collections.ConfigDict, scale: int) -> Tuple[list, np.ndarray, str]:
    """(training LR images, held-out uint8 LR crops, source). No HR image leaves this function.

    embedded: each photo's LR by the SR convention (`make_lr`, MATLAB bicubic down by `scale`);
    the HR photo is dropped at once. folder: the images are the service's LR inputs as they are.
    """
    from sr_purify import sr_data
    from sr_purify.evaluators.sr import make_lr

    d = config.data
    if d.source == 'folder':
        if not d.path:
            raise FileNotFoundError(
                'purifier data source folder needs --config.data.path=<a folder of LR images>'
            )
        spec = ml_collections.ConfigDict(dict(source='folder', path=d.path, skip_bad=False))
        bank = [im.pixels[..., :3] for im in sr_data.load_images(spec, 'train')]
        held, source = bank, d.path
    elif d.source == 'embedded':
        spec = ml_collections.ConfigDict(dict(source='embedded'))
        bank, held = (
            [make_lr(im.pixels, scale)[..., :3] for im in sr_data.load_images(spec, split)]
            for split in ('train', 'eval')
        )
        source = f'embedded scikit-image photos, LR x{scale} (no HR)'
    else:
        raise ValueError(
            f'unknown SR-service purifier data source {d.source!r}; valid: embedded, folder'
        )
    small = [im.shape for im in bank + held if min(im.shape[:2]) < d.patch]
    if small:
        raise ValueError(
            f'{len(small)} LR image(s) of {source} are smaller than the {d.patch}-pixel crop '
            f'(e.g. {small[0]}); use a smaller --config.data.patch'
        )
    return bank, _fixed_crops(held, d.patch, d.eval_images), source


SR_ATTACK_TARGETS = ('defended', 'model')


def _check_against(against: str) -> None:
    if against not in SR_ATTACK_TARGETS:
        raise ValueError(
            f'unknown perturb.against {against!r}; valid: {", ".join(SR_ATTACK_TARGETS)}'
        )


def _sr_attack_target(purifier: purifiers.Purifier, sr_fn, against: str):
    """`(sr_vars, params, key) -> (fn, variables)`: what the training perturbation d attacks.

    'defended': S(P(.)) with P's current parameters, the adaptive attacker's view (adversarial
    training of P, Madry et al. 2018), computed by the evaluation's own `input_purifier` defence
    so that training and evaluation attack the same function; 'model': S alone, the oblivious
    attacker's perturbation.
    """
    _check_against(against)
    if against == 'model':
        return lambda sr_vars, params, key: (sr_fn, sr_vars)

    def defended(variables, x):
        return sr_defences.input_purifier(
            sr_fn,
            variables['sr'],
            x,
            variables['key'],
            purifier=purifier,
            purifier_params=variables['p'],
        )

    return lambda sr_vars, params, key: (defended, {'sr': sr_vars, 'p': params, 'key': key})


def make_sr_service_loss_fn(purifier: purifiers.Purifier, sr_fn, config: ml_collections.ConfigDict):
    """`loss_fn(params, model_state, batch, rng, sr_variables)` for `training.fit`.

    sr * L1(S(P(x + d)), S(x)) + identity * L1(P(x), x), d = stop_gradient(SR attack on S).
    """
    weights = check_sr_service_config(config)
    p = config.perturb
    attack_target = _sr_attack_target(purifier, sr_fn, p.get('against', 'defended'))

    def loss_fn(params, model_state, batch, rng, sr_vars):
        x = batch['image']
        sr_vars = jax.lax.stop_gradient(sr_vars)
        k_attack, k_noise, k_noise_id = jax.random.split(rng, 3)
        fn, variables = attack_target(sr_vars, jax.lax.stop_gradient(params), k_noise)
        x_adv = jax.lax.stop_gradient(
            attacks.sr_attack(
                fn, variables, x, k_attack, eps=p.eps, steps=p.steps, step_size=p.step_size
            )
        )
        target = jax.lax.stop_gradient(sr_fn(sr_vars, x))
        # What the service runs: S on the (clipped) purified input.
        terms = {
            'sr': jnp.mean(
                jnp.abs(sr_fn(sr_vars, purifier.purify(params, x_adv, k_noise)) - target)
            )
        }
        if 'identity' in weights:
            clean = purifier.raw(params, purifier.add_noise(x, k_noise_id))
            terms['identity'] = jnp.mean(jnp.abs(clean - x))
        total = sum(weights[k] * v for k, v in terms.items() if k in weights)
        metrics = {f'loss/{k}': v for k, v in terms.items()}
        metrics['psnr/sr_attacked_vs_clean'] = psnr(sr_fn(sr_vars, x_adv), target)
        return total, (model_state, metrics)

    return loss_fn


def train_sr_service(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Trains the SR service's input purifier on LR images only; exports P to <workdir>/purifier."""
    check_sr_service_config(config)
    reporting.check_workdir(workdir)
    sr = restore.load(
        config.sr_model.checkpoint, 'sr', flag='--config.sr_model.checkpoint', what='SR model'
    )
    module = sr.module

    def sr_fn(variables, x):
        return module.apply(variables, x)

    purifier = purifiers.build(config.purifier)
    bank, held, source = load_lr_images(config, sr.scale)
    start = purifier.init(jax.random.key(config.seed))
    reporting.write_config(workdir, config)
    logging.info(
        'SR-service purifier %s: %d unlabelled LR images from %s; S = %s step %d (x%d)',
        purifier.kind,
        len(bank),
        source,
        config.sr_model.checkpoint,
        sr.step,
        sr.scale,
    )

    batches = _train_batches(bank, config)

    x_held = jnp.asarray(held, jnp.float32) / 255.0
    key = jax.random.key(config.seed + 1)
    p = config.perturb

    defended = _sr_attack_target(purifier, sr_fn, 'defended')

    @jax.jit
    def measure(params, sr_vars):
        k = jax.random.fold_in(key, 1)
        x_adv = attacks.sr_attack(
            sr_fn, sr_vars, x_held, key, eps=p.eps, steps=p.steps, step_size=p.step_size
        )
        # The adaptive attacker: the same attack through P, on what the service runs.
        x_adaptive = attacks.sr_attack(
            *defended(sr_vars, params, k),
            x_held,
            key,
            eps=p.eps,
            steps=p.steps,
            step_size=p.step_size,
        )
        target = sr_fn(sr_vars, x_held)
        return {
            'psnr_sr_attacked': psnr(sr_fn(sr_vars, x_adv), target),
            'psnr_sr_purified_attacked': psnr(
                sr_fn(sr_vars, purifier.purify(params, x_adv, k)), target
            ),
            'psnr_sr_purified_adaptive': psnr(
                sr_fn(sr_vars, purifier.purify(params, x_adaptive, k)), target
            ),
            'psnr_sr_purified_clean': psnr(
                sr_fn(sr_vars, purifier.purify(params, x_held, k)), target
            ),
            'psnr_p_clean': psnr(purifier.purify(params, x_held, k), x_held),
        }

    def report(params):
        return {k: float(v) for k, v in measure(params, sr.variables).items()}

    log = _LossLog(writer or reporting.create_writer(workdir))
    result = training.fit(
        config,
        workdir,
        init_variables=lambda rng: (jax.tree.map(jnp.asarray, start), {}),
        loss_fn=make_sr_service_loss_fn(purifier, sr_fn, config),
        batches=batches,
        evaluate=lambda state, step: {
            f'eval/{k}': v for k, v in report(sharding.to_host(state.params)).items()
        },
        frozen=sr.variables,
        writer=log,
    )
    if result.preempted:
        return result
    params = sharding.to_host(result.state.params)
    export_dir = checkpointing.export_params(paths.join(workdir, 'purifier'), result.step, params)
    before, after = report(start), report(params)
    log.write_scalars(result.step, {f'eval/{k}': v for k, v in after.items()})
    title = (
        f'SR-service purifier {purifier.kind} after {result.step} steps (LR only, no HR, no '
        f'labels), {len(held)} held-out LR crops, d = SR attack on S at eps {p.eps * 255:g}/255, '
        f'{p.steps} steps; trained against {p.get("against", "defended")}'
    )
    header = [
        '',
        'PSNR S(x+d) vs S(x)',
        'PSNR S(P(x+d)) vs S(x)',
        "PSNR S(P(x+d')) vs S(x), d' through P",
        'PSNR S(P(x)) vs S(x)',
        'PSNR P(x) vs x',
    ]
    keys = (
        'psnr_sr_attacked',
        'psnr_sr_purified_attacked',
        'psnr_sr_purified_adaptive',
        'psnr_sr_purified_clean',
        'psnr_p_clean',
    )
    rows = [[name] + [m[k] for k in keys] for name, m in (('start', before), ('trained', after))]
    table = reporting.log_table(title, header, rows)
    losses = log.losses
    reporting.update_results(
        workdir,
        'purifier',
        {
            'kind': purifier.kind,
            'target': 'sr_service',
            'sr_model': config.sr_model.checkpoint,
            'data': source,
            'train_images': len(bank),
            'labels_used': False,
            'hr_used': False,
            'export': export_dir,
            **_run_summary(result, losses),
            'start': before,
            'trained': after,
        },
    )
    reporting.write_text(
        workdir, 'purifier_table.md', f'# {title}\n\n{table}\n\nPurifier parameters: {export_dir}'
    )
    log.flush()
    return result


# ---------------------------------------------------------------------------------------------
# The denoiser of denoised smoothing (configs/purifier.py:denoiser): Gaussian noise, no labels.


def check_denoiser_config(config: ml_collections.ConfigDict) -> Dict[str, float]:
    """Active loss weights of the denoiser; fails on a bad config before any work."""
    _check_trainable(config.purifier.kind)
    weights = dict(config.loss)
    for name in weights:
        registry.lookup({k: k for k in DENOISER_LOSS_TERMS}, name, 'denoiser loss')
    if any(w < 0 for w in weights.values()) or not sum(weights.values()):
        raise ValueError(f'denoiser loss weights must be >= 0, not all 0; got {weights}')
    sigma = losses.sigma_values(config.denoise.sigma)
    if min(sigma) <= 0:
        raise ValueError(f'denoise.sigma must be > 0 (in the [0, 1] pixel range); got {sigma}')
    registry.lookup(losses.STABILITY_TARGETS, config.denoise.targets, 'stability target')
    if weights.get('stability', 0) and not config.classifier.get('checkpoint', ''):
        raise ValueError(
            'the stability loss needs --config.classifier.checkpoint=<a classifier job workdir> '
            '(the frozen classifier C whose own predictions are its targets)'
        )
    return {k: float(w) for k, w in weights.items() if w}


def make_denoiser_loss_fn(
    purifier: purifiers.Purifier, classify, config: ml_collections.ConfigDict
):
    """`loss_fn(params, model_state, batch, rng[, classifier_variables])` for `training.fit`.

    gaussian_mse * mean((D(x + n) - x)^2) + stability * CE(C(D(x + n)), C(x)), from one pass of D
    (`losses.denoiser_terms`). The MSE sees the unclipped network output, the classifier what it
    is given at certification (`purifier.purify`, clipped to [0, 1]). `classify(variables, x)` is
    C (None when only gaussian_mse is on); its variables come as `fit`'s frozen argument.
    """
    weights = check_denoiser_config(config)
    if 'stability' in weights and classify is None:
        raise ValueError('the stability loss needs the classifier C (config.classifier)')
    sigma = losses.sigma_values(config.denoise.sigma)

    def loss_fn(params, model_state, batch, rng, *frozen):
        x = batch['image']
        k_noise, k_input = jax.random.split(rng)
        terms = losses.denoiser_terms(
            lambda z: purifier.raw(params, purifier.add_noise(z, k_input)),
            x,
            k_noise,
            sigma,
            classifier=(classify, frozen[0]) if 'stability' in weights else None,
            targets=config.denoise.targets,
            clip=purifier.clip,
        )
        total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
        return total, (model_state, {f'loss/{k}': v for k, v in terms.items()})

    return loss_fn


def make_denoiser_report(
    purifier: purifiers.Purifier, classify, config: ml_collections.ConfigDict, images: np.ndarray
):
    """`(params, classifier_variables) -> (metrics, samples)` on held-out images, fixed noise.

    Per sigma: PSNR of x + n and of D(x + n) against x; with a classifier C, how often C(x + n)
    and C(D(x + n)) agree with C(x) (label-free). Samples: (x + n, D(x + n), D(x)) at the first
    sigma.
    """
    x = jnp.asarray(images, jnp.float32) / 255.0
    sigmas = losses.sigma_values(config.denoise.sigma)
    key = jax.random.key(config.seed + 1)

    @jax.jit
    def measure(params, cvars):
        k_input = jax.random.fold_in(key, 0)
        clean = purifier.purify(params, x, k_input)
        metrics = {'psnr_clean_through_d': psnr(clean, x)}
        if classify is not None:
            pred = jnp.argmax(classify(cvars, x), axis=-1)
            agree = lambda z: jnp.mean(jnp.argmax(classify(cvars, z), axis=-1) == pred)
            metrics['agree_clean_through_d'] = agree(clean)
        for i, s in enumerate(sigmas):
            noisy = losses.add_gaussian_noise(x, jax.random.fold_in(key, i + 1), s)
            denoised = purifier.purify(params, noisy, k_input)
            m = {'psnr_noisy': psnr(noisy, x), 'psnr_denoised': psnr(denoised, x)}
            if classify is not None:
                m.update(agree_noisy=agree(noisy), agree_denoised=agree(denoised))
            metrics.update({f'sigma_{s:g}/{k}': v for k, v in m.items()})
            if i == 0:
                samples = (noisy, denoised, clean)
        return metrics, samples

    def report(params, cvars):
        metrics, samples = measure(params, cvars)
        return {k: float(v) for k, v in metrics.items()}, jax.device_get(samples)

    return report


def train_denoiser(
    config: ml_collections.ConfigDict, workdir: str, writer=None
) -> training.FitResult:
    """Trains P as the denoiser D with no labels; exports it to <workdir>/purifier; reports."""
    weights = check_denoiser_config(config)
    reporting.check_workdir(workdir)
    classify, cvars, c_source = None, {}, ''
    if config.classifier.get('checkpoint', ''):
        restored = restore.load(
            config.classifier.checkpoint, 'classifier', flag='--config.classifier.checkpoint'
        )
        module, cvars = restored.module, restored.variables
        classify = lambda v, images: module.apply(v, images, train=False)
        c_source = (
            f'{restored.model_config.name} {config.classifier.checkpoint} step {restored.step}'
        )
    purifier = purifiers.build(config.purifier)
    bank, held, source = load_images(config)
    start = purifiers.initial_params(purifier, config.purifier, jax.random.key(config.seed))
    reporting.write_config(workdir, config)
    sigmas = losses.sigma_values(config.denoise.sigma)
    logging.info(
        'denoiser %s: %d unlabelled training images from %s; sigma %s; loss %s; C = %s',
        purifier.kind,
        len(bank),
        source,
        sigmas,
        weights,
        c_source or 'none',
    )
    report = make_denoiser_report(purifier, classify, config, held)
    log = _LossLog(writer or reporting.create_writer(workdir))
    result = training.fit(
        config,
        workdir,
        init_variables=lambda rng: (jax.tree.map(jnp.asarray, start), {}),
        loss_fn=make_denoiser_loss_fn(purifier, classify, config),
        batches=_train_batches(bank, config),
        evaluate=lambda state, step: {
            f'eval/{k}': v for k, v in report(sharding.to_host(state.params), cvars)[0].items()
        },
        # C's variables are frozen: a separate argument, in neither the state nor the checkpoints.
        frozen=cvars if 'stability' in weights else None,
        writer=log,
    )
    if result.preempted:
        return result
    params = sharding.to_host(result.state.params)
    export_dir = checkpointing.export_params(paths.join(workdir, 'purifier'), result.step, params)
    before, _ = report(start, cvars)
    after, (noisy, denoised, clean) = report(params, cvars)
    log.write_scalars(result.step, {f'eval/{k}': v for k, v in after.items()})

    title = (
        f'denoiser {purifier.kind} after {result.step} steps (no labels; loss '
        f'{", ".join(f"{w:g} {k}" for k, w in weights.items())}), {len(held)} held-out images, '
        f'n ~ N(0, sigma^2) in the [0, 1] range'
    )
    header = ['', 'sigma', 'PSNR x+n vs x', 'PSNR D(x+n) vs x', 'PSNR D(x) vs x']
    if classify is not None:
        header += ['C(x+n) = C(x)', 'C(D(x+n)) = C(x)']
    rows = []
    for name, m in (('start', before), ('trained', after)):
        for s in sigmas:
            row = [name, s, m[f'sigma_{s:g}/psnr_noisy'], m[f'sigma_{s:g}/psnr_denoised']]
            row.append(m['psnr_clean_through_d'])
            if classify is not None:
                row += [m[f'sigma_{s:g}/agree_noisy'], m[f'sigma_{s:g}/agree_denoised']]
            rows.append(row)
    table = reporting.log_table(title, header, rows)
    losses_seen = log.losses
    reporting.update_results(
        workdir,
        'purifier',
        {
            'kind': purifier.kind,
            'objective': 'denoiser',
            'loss': weights,
            'sigma': list(sigmas),
            'stability_targets': config.denoise.targets,
            'classifier': c_source,
            'data': source,
            'train_images': len(bank),
            'labels_used': False,
            'export': export_dir,
            **_run_summary(result, losses_seen),
            'start': before,
            'trained': after,
            'student_checkpoint': config.purifier.get('student_checkpoint', ''),
        },
    )
    reporting.write_text(
        workdir,
        'purifier_table.md',
        f'# {title}\n\n{table}\n\nGrid purifier_grid.png, one row per image (sigma '
        f'{sigmas[0]:g}): clean | x+n | D(x+n) | D(x).\nDenoiser parameters: {export_dir}',
    )
    _write_grid(
        workdir,
        config,
        held,
        (noisy, denoised, clean),
        ('clean', 'x+n', 'D(x+n)', 'D(x)'),
        log,
        result.step,
    )
    s = f'sigma_{sigmas[0]:g}'
    logging.info(
        'denoiser %s: PSNR of D(x+n) %.2f dB (x+n %.2f dB) at sigma %g, %.2f steps/s, %.0f s',
        purifier.kind,
        after[f'{s}/psnr_denoised'],
        after[f'{s}/psnr_noisy'],
        sigmas[0],
        result.steps_per_sec,
        result.wall_s,
    )
    log.flush()
    return result


def _write_grid(workdir, config, held, columns, labels, log, step) -> None:
    """purifier_grid.png: per held-out image, the clean uint8 image then each of `columns`
    (float batches in [0, 1], clipped for display), enlarged 3x."""
    n = min(config.get('grid_samples', 6), len(held))
    up = (held.shape[1] * 3, held.shape[2] * 3)
    rows = [
        [
            reporting.nearest_upscale(np.clip(t, 0.0, 1.0), up)
            for t in (held[i].astype(np.float32) / 255.0, *(c[i] for c in columns))
        ]
        for i in range(n)
    ]
    reporting.write_grid(
        workdir, 'purifier_grid.png', reporting.image_grid(rows, labels=labels), log, step
    )
