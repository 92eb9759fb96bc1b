"""Trains the self-supervised purifier P on unlabelled images (the pipeline never reads a label).

For each batch of clean x: x' = SSP(x) against a frozen feature extractor F (optionally mixed with
PGD on F's own predictions and Gaussian noise); loss = pixel * L1(P(x'), x)
+ feature * d(F(P(x')), F(x)) + identity * L1(P(x), x).

CPU default (a few minutes on 2 cores): `sr_resample` (antialiased bicubic x2 down, then the slim
student SR network back up) on CIFAR-10 train images from ../shared/data/cifar10-jpeg, SSP of 10
steps against a random CNN's features. Start from the distilled student (recommended):
  python launch.py --config=configs/purifier.py --workdir=workdirs/purifier \\
    --config.purifier.student_checkpoint=workdirs/student
(`student_checkpoint=''`, the default, starts the SR network from a random initialisation, which
with the student's bicubic skip is exactly bicubic resampling, and warns.)
The NRP generator instead: `configs/purifier.py:nrp`. F from the victim's early layers:
  --config.purifier.feature.kind=classifier \\
    --config.purifier.feature.checkpoint=workdirs/classifier --config.purifier.feature.layer=stage_1
`:victim` is the recipe measured in bench/robustness.py (README): F = the victim classifier's
last features before pooling, x' half SSP on them and half PGD on its own predictions, a strong
feature term and a doubled identity term, 2,000 steps (about 27 min on 2 cores), a larger NRP
generator:
  python launch.py --config=configs/purifier.py:nrp,victim \\
    --config.purifier.feature.checkpoint=workdirs/classifier
Full size (GPU/TPU): `:full` (combine: `:full,nrp`). Then evaluate:
  python launch.py --config=configs/evaluate.py:robustness --workdir=workdirs/eval_robustness
`:sr_service` is the input purifier of the SR service instead (sr_purify/jobs/purifier.py,
`train_sr_service`): a small NRP generator P (LR in, LR out, starting as the identity) in front of
a frozen SR model S, on unlabelled LR images only (the embedded photos' LR, never their HR, or a
folder of LR images); loss L1(S(P(x + d)), S(x)) + identity * L1(P(x), x), d = the SR attack on S:
  python launch.py --config=configs/purifier.py:sr_service --workdir=workdirs/sr_purifier \
    --config.sr_model.checkpoint=workdirs/student
then `--config.defences="('input_purifier',)" --config.defence.input_purifier.checkpoint=
workdirs/sr_purifier` in configs/evaluate.py:sr_robustness.
`:denoiser` trains P as the Gaussian denoiser D of denoised smoothing (Salman et al. 2020) instead
(`train_denoiser`): the NRP generator (`:denoiser,sr_resample` for the SR purifier) on the same
unlabelled CIFAR-10 images, loss mean((D(x + n) - x)^2), n ~ N(0, sigma^2) unclipped, with x and
sigma in the [0, 1] pixel range, sigma 0.25 (`:denoiser,sigma=0.5` for 0.5; several values,
`--config.denoise.sigma="(0.25,0.5)"`, draw one per example):
  python launch.py --config=configs/purifier.py:denoiser --workdir=workdirs/denoiser
`:denoiser,stability` adds the stability loss, CE(C(D(x + n)), C's own prediction on the clean x)
(still no data labels), on a frozen classifier C:
  python launch.py --config=configs/purifier.py:denoiser,stability \
    --workdir=workdirs/denoiser_stability --config.classifier.checkpoint=workdirs/classifier
The workdir restores like any purifier's (`purifiers.restore`), to go in front of C.
"""

import ml_collections

from configs import classifier, common
from configs import student as student_config

VARIANTS = ('cpu', 'denoiser', 'full', 'nrp', 'sr_resample', 'sr_service', 'stability', 'victim')


def feature_config(kind: str = 'random_cnn') -> ml_collections.ConfigDict:
    """F: 'random_cnn' (fixed seed, never trained), 'classifier' or 'teacher' (checkpoints)."""
    return ml_collections.ConfigDict(
        dict(
            kind=kind,
            seed=0,  # random_cnn's initialisation
            random_cnn=dict(features=32, num_layers=3, num_downsample=1),
            checkpoint='',  # classifier or teacher job workdir
            classifier=classifier.resnet(20),
            teacher=common.edsr(scale=2, bicubic_skip=True),  # configs/teacher.py's CPU default
            # Tap of the classifier ('stem', 'stage_1' .. 'stage_3'; small_cnn: 'conv_1'..3)
            # or of the teacher ('head', 'block_<i>', 'body').
            layer='stage_1',
            distance='l1',  # d(F(P(x')), F(x)): 'l1' or 'l2' (mean squared)
        )
    )


def purifier_config(kind: str = 'sr_resample') -> ml_collections.ConfigDict:
    """What a purifier is (sr_purify/purifiers.py); shared with configs/evaluate.py:robustness."""
    return ml_collections.ConfigDict(
        dict(
            kind=kind,
            scale=2,  # sr_resample / bicubic_resample: down by this factor, back up
            jpeg_quality=75,
            input_noise=0.0,  # > 0: Gaussian noise before purifying (random, so EOT applies)
            student=student_config.student_model('edsr', 2),  # the SR network of sr_resample
            student_checkpoint='',  # a student job's workdir (its `student/` export); '' = random
            # A purifier job's workdir to start training from (same kind and architecture; e.g.
            # the MSE denoiser before its stability fine-tune); '' = as above.
            init_checkpoint='',
            # The NRP generator (models 'nrp'): CPU-small; the paper's is larger (see `:full`).
            nrp=dict(
                num_blocks=1, features=16, growth=8, num_dense=2, dense_layers=4, res_scale=0.2
            ),
            feature=feature_config(),
        )
    )


def sr_service_config(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`:sr_service`: the SR service's input purifier (LR in, LR out) in front of a frozen SR model.

    No HR and no labels: the batches are `{'image'}` LR crops, and the target is S's own output.
    """
    c.purifier = purifier_config('nrp')  # Same-size residual generator, starts as the identity.
    c.purifier.nrp.update(num_blocks=1, features=16, growth=8, num_dense=1, dense_layers=3)
    # S, frozen: a teacher or student workdir (restore.load(..., 'sr')); its scale makes the LR.
    c.sr_model = ml_collections.ConfigDict(dict(checkpoint=''))
    # d = attacks.sr_attack on S (L-inf, random start), made per step inside the jitted step.
    # against: 'defended' attacks S(P(.)) with P's current parameters (adversarial training: the
    # adaptive attacker's perturbation); 'model' attacks S alone (the oblivious one).
    c.perturb = ml_collections.ConfigDict(
        dict(eps=4 / 255, steps=3, step_size=2 / 255, against='defended')
    )
    c.loss = ml_collections.ConfigDict(dict(sr=1.0, identity=1.0))
    c.data = ml_collections.ConfigDict(
        dict(
            source='embedded',  # embedded: the photos' LR (MATLAB bicubic); folder: LR images
            path='',
            patch=32,  # LR crop side
            flip=True,
            eval_images=16,
        )
    )
    c.batch_size = 16
    # Measured on the main job's student (2-core Xeon, about 8 min): 200 steps at lr 5e-4 left P
    # the identity (P(x) vs x 81 dB); 1,000 at 1e-3 moves it, at 0.18 dB of clean Set5 PSNR.
    c.total_steps = 1000
    c.log_every = 100
    c.checkpoint_every = 500
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 20
    return c


def denoiser_config(
    c: ml_collections.ConfigDict, parts, sigma: float = 0.25
) -> ml_collections.ConfigDict:
    """`:denoiser`: P as the denoiser D of denoised smoothing; `:denoiser,stability` adds C.

    No labels: the batches are `{'image'}`, the MSE target is x itself and the stability target
    C's own prediction on x. No SSP and no feature extractor, so `perturb` and
    `purifier.feature` are gone.
    """
    for other in ('sr_service', 'victim'):
        if other in parts:
            raise ValueError(f'config variants denoiser and {other} do not combine; pick one')
    del c.perturb
    del c.purifier.feature
    c.denoise = ml_collections.ConfigDict(
        dict(
            # The noise std, in the images' [0, 1] range (0.25 = 63.75/255); several values:
            # each example draws one of them uniformly.
            sigma=(float(sigma),),
            targets='hard',  # stability's targets: C(x)'s argmax ('hard') or softmax ('soft')
        )
    )
    # C, frozen: a classifier job's workdir (architecture from its config.json). Needed by the
    # stability loss; with gaussian_mse alone it only adds C's agreement to the report.
    c.classifier = ml_collections.ConfigDict(dict(checkpoint=''))
    c.loss = ml_collections.ConfigDict(
        dict(gaussian_mse=1.0, stability=1.0 if 'stability' in parts else 0.0)
    )
    if 'full' not in parts:
        c.total_steps = 1_000
        c.log_every = 100
        c.checkpoint_every = 500
    return c


def get_config(arg=None) -> ml_collections.ConfigDict:
    parts, options = common.parse_variant(arg, VARIANTS, options=('sigma',))
    if 'denoiser' not in parts and ('stability' in parts or 'sigma' in options):
        raise ValueError(f'config variants stability and sigma= need denoiser: :denoiser,{arg}')
    sigma = options.get('sigma', 0.25)
    try:
        sigma = float(sigma)
    except ValueError:
        raise ValueError(f'config setting sigma={sigma} is not a number (e.g. sigma=0.5)') from None
    c = common.base()
    c.trainer = 'purifier'
    c.role = 'purifier'
    if 'denoiser' in parts:  # The same-size generator denoises; the SR purifier on request.
        kind = 'sr_resample' if 'sr_resample' in parts else 'nrp'
    else:
        kind = 'nrp' if 'nrp' in parts else 'sr_resample'
    c.purifier = purifier_config(kind)
    # How x' is made from each clean batch, inside the jitted step. Fractions of the batch
    # (normalised): SSP on F, PGD on F's own predictions (classifier F only), Gaussian noise.
    c.perturb = ml_collections.ConfigDict(
        dict(
            ssp=1.0,
            pgd=0.0,
            noise=0.0,
            eps=16 / 255,
            steps=10,
            step_size=0.01,  # SSP (NRP: 16/255, 100 steps of 0.01)
            pgd_eps=8 / 255,
            pgd_steps=10,
            pgd_step_size=2 / 255,
            noise_std=16 / 255,
        )
    )
    c.loss = ml_collections.ConfigDict(dict(pixel=1.0, feature=0.1, identity=1.0))
    c.data = ml_collections.ConfigDict(
        dict(
            source='cifar',  # cifar (classification data, labels dropped) | folder | embedded
            cifar=classifier.data_config(eval_examples=64),
            path='',  # folder source: any images, random `patch` crops
            patch=32,
            flip=True,
            eval_images=64,
        )
    )  # held-out images for the end-of-training report
    c.data.cifar.train_examples = 0
    c.batch_size = 32
    c.total_steps = 200
    c.log_every = 25
    c.checkpoint_every = 100
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 20
    c.grid_samples = 6
    if 'sr_service' in parts:
        sr_service_config(c)
    if 'victim' in parts:
        f = c.purifier.feature
        f.kind, f.layer = 'classifier', 'stage_3'  # f.checkpoint: the victim's workdir.
        c.perturb.ssp, c.perturb.pgd = 0.5, 0.5  # PGD on F's own predictions: no data labels.
        c.loss.feature, c.loss.identity = 1.0, 2.0
        c.total_steps = 2_000
        c.log_every = 100
        c.checkpoint_every = 500
        # 1.3 steps/s on 2 cores, mostly the attacks on F: a bigger generator costs little.
        c.purifier.nrp.update(num_blocks=2, features=32, growth=16)
    if 'full' in parts:
        c.batch_size = 128
        c.total_steps = 20_000
        c.perturb.steps = 50
        c.log_every = 100
        c.eval_every = 2_000
        c.checkpoint_every = 1_000
        c.optim.warmup_steps = 500
        c.purifier.nrp = dict(
            num_blocks=3, features=64, growth=32, num_dense=3, dense_layers=4, res_scale=0.2
        )
    if 'denoiser' in parts:
        denoiser_config(c, parts, sigma)
    return c
