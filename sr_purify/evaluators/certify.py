"""Randomized-smoothing certification (Cohen, Rosenfeld & Kolter, ICML 2019) of a classifier C
behind an optional denoiser D (denoised smoothing, Salman et al. 2020).

The smoothed classifier is g(x) = argmax_c P(f(x + delta) = c), delta ~ N(0, sigma^2 I), with
the base classifier f(z) = argmax C(D(z)) (D the identity when there is none). x + delta is not
clipped to [0, 1]: the guarantee holds for any base classifier, and this is Cohen's convention.

* `sample_counts`: class counts of f over `num` noise draws, one compiled program per (base,
  mesh, batch, num): draws in batches of `batch`, the noise-sample axis sharded over the mesh's
  'data' axis. Draw j of image i is normal(fold_in(key_i, j)), so the counts depend neither on
  the device count nor on `batch` nor on which images share a call (a random denoiser's own
  draws are the exception: they follow the call's first image and the batch index).
* `predict` and `certify`: Cohen's PREDICT (top two counts, two-sided binomial test at alpha,
  else abstain) and CERTIFY (n0 draws select c_A, n further draws estimate it: one-sided
  Clopper-Pearson lower bound p_A at level 1 - alpha, radius sigma * Phi^-1(p_A), abstain when
  p_A <= 0.5). Image i uses fold_in(key, i) (then a stream per purpose), so a result depends
  only on the image's index, never on resume points or ordering.
* `certified_accuracy`: the fraction of images predicted right with radius >= r (an abstention
  counts as wrong).
* `certify_csv`: CERTIFY over a split, one CSV row per image, appended and flushed image by
  image; a rerun skips the indices already written (a half-written last line is dropped), so a
  preempted job resumes to bitwise the CSV of an uninterrupted run.
* `smooth_attack`: an adaptive L2 attack on the smoothed classifier (PGD on the Monte-Carlo
  soft smoothed classifier log E_delta softmax C(D(x' + delta)), fresh draws every step, as
  SmoothAdv, Salman et al. 2019); `empirical_correct` scores its output by g's majority vote.
  The empirical accuracy under it must not fall below the certified accuracy at the same
  radius, or the certificate (or this code) is broken: `sanity_checks`.
* `evaluate`: the certify mode of configs/evaluate.py over sigmas x denoisers.

Every setting is checked (one-line ValueError) before any sampling.
"""

import dataclasses
import functools
import json
import logging
import os
import re
import time
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from scipy import stats

from sr_purify import attacks, paths, reporting, sharding
from sr_purify.attacks import wrappers

PyTree = Any
ABSTAIN = -1
# fold_in streams of an image's key: one per purpose, so no two draw the same noise.
SELECT, ESTIMATE, PREDICT, ATTACK, VOTE, DENOISE = range(6)
CSV_HEADER = 'index,label,prediction,radius,correct'


# ---------------------------------------------------------------------------------------------
# Settings.


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def check_settings(sigma: float, n0: int, n: int, alpha: float) -> None:
    """One-line ValueErrors for a noise level, sample counts or a confidence level that cannot
    certify anything."""
    if not isinstance(sigma, (int, float, np.number)) or not sigma > 0:
        raise ValueError(f'sigma must be > 0 (the noise standard deviation), got {sigma!r}')
    for name, value in (('n0', n0), ('n', n)):
        if not _is_int(value) or value < 1:
            raise ValueError(f'{name} must be an int >= 1 (noise samples), got {value!r}')
    if not isinstance(alpha, (int, float, np.number)) or not 0 < alpha < 1:
        raise ValueError(f'alpha must be in (0, 1) (the failure probability), got {alpha!r}')


def check_radii(radii: Sequence[float]) -> List[float]:
    radii = [float(r) for r in radii]
    if not radii or any(not r >= 0 for r in radii):
        raise ValueError(f'radii must be a non-empty list of L2 radii >= 0, got {tuple(radii)}')
    return radii


# ---------------------------------------------------------------------------------------------
# The base classifier f = C∘D.


@dataclasses.dataclass(frozen=True, eq=False)
class BaseClassifier:
    """f = C∘D as `base(params, z, key) -> logits`, params = (classifier params, denoiser
    params). `denoiser` is a purifiers.Purifier (anything with `purify(params, x[, key])` and
    `random`), None for C alone. Hashed by identity: a static argument of the programs."""

    classifier_fn: Callable
    denoiser: Any = None

    def denoise(self, params: PyTree, z: jax.Array, key: jax.Array) -> jax.Array:
        if self.denoiser is None:
            return z
        if self.denoiser.random:
            return self.denoiser.purify(params, z, key)
        return self.denoiser.purify(params, z)

    def __call__(self, params, z, key):
        return self.classifier_fn(params[0], self.denoise(params[1], z, key))


@functools.lru_cache(maxsize=None)
def base_classifier(classifier_fn: Callable, denoiser=None) -> BaseClassifier:
    """The base classifier of (C, D), cached so that one pair compiles its programs once."""
    return BaseClassifier(classifier_fn, denoiser)


def check_fit(base: Callable, params: PyTree, image_shape: Sequence[int], label: str) -> int:
    """The number of classes, after checking (by shapes only) that the denoiser keeps the image
    shape the classifier takes and that the classifier gives (batch, classes) logits on it.
    `base` is a BaseClassifier or any `base(params, z, key) -> logits` (then no denoiser)."""
    z = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    key = jax.random.key(0)
    shape = tuple(image_shape)
    if isinstance(base, BaseClassifier) and base.denoiser is not None:
        out = jax.eval_shape(lambda p, x: base.denoise(p, x, key), params[1], z)
        if tuple(out.shape) != z.shape:
            raise ValueError(
                f'denoiser {label!r} maps {shape} images to {tuple(out.shape[1:])}, but the '
                f'classifier takes {shape}; use a denoiser that keeps the image size'
            )
    try:
        logits = jax.eval_shape(base, params, z, key)
    except Exception as e:  # Any shape error of the classifier on D's output: say which.
        detail = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise ValueError(
            f'the classifier does not take the output of denoiser {label!r} ({shape}): {detail}'
        ) from None
    if logits.ndim != 2 or logits.shape[0] != 2:
        raise ValueError(
            f'the classifier behind denoiser {label!r} gives outputs of shape '
            f'{tuple(logits.shape[1:])} per image; it must give a vector of class logits'
        )
    return int(logits.shape[1])


# ---------------------------------------------------------------------------------------------
# Counting: one compiled program per (base, mesh, batch, num).


@functools.lru_cache(maxsize=None)
def _count_program(base: Callable, mesh, batch: int, num: int):
    spread = NamedSharding(mesh, P('data'))
    steps = -(-num // batch)

    def count(params, x, keys, sigma):
        images, shape = x.shape[0], x.shape[1:]
        classes = jax.eval_shape(base, params, x[:1], keys[0]).shape[-1]
        denoise_key = jax.random.fold_in(keys[0], DENOISE)

        def draw(j):  # Draw j of every image: (images, H, W, C).
            return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), shape, x.dtype))(
                keys
            )

        def body(b, acc):
            j = jax.lax.with_sharding_constraint(b * batch + jnp.arange(batch), spread)
            noise = jax.lax.with_sharding_constraint(jax.vmap(draw)(j), spread)
            # (batch, images) flattened sample-major, so each device keeps its own samples.
            z = (x[None] + sigma * noise).reshape((batch * images, *shape))
            z = jax.lax.with_sharding_constraint(z, spread)
            logits = base(params, z, jax.random.fold_in(denoise_key, b))
            pred = jnp.argmax(logits, axis=-1).reshape(batch, images)
            hit = (pred[..., None] == jnp.arange(classes)) & (j < num)[:, None, None]
            return acc + jnp.sum(hit, axis=0, dtype=jnp.int32)

        init = jnp.zeros((images, classes), jnp.int32)
        if jax.default_backend() == 'cpu':  # Convolutions run faster unrolled there.
            return wrappers.loop(0, steps, body, init)
        return jax.lax.fori_loop(0, steps, body, init)  # Elsewhere rolled: compiles once.

    return jax.jit(count, out_shardings=sharding.replicated(mesh))


def _stream_keys(key: jax.Array, indices: Sequence[int], stream: int) -> jax.Array:
    """fold_in(fold_in(key, index), stream) per image index: a (len(indices),) key array."""
    return _stream_keys_jit(key, np.asarray(indices, np.int32), np.int32(stream))


@jax.jit
def _stream_keys_jit(key, indices, stream):  # One program per number of images.
    return jax.vmap(lambda i: jax.random.fold_in(jax.random.fold_in(key, i), stream))(indices)


def sample_counts(
    base: Callable,
    params: PyTree,
    x: np.ndarray,
    keys: jax.Array,
    num: int,
    sigma: float,
    *,
    mesh,
    batch: int,
) -> np.ndarray:
    """Counts of argmax base(params, x + sigma * noise) over `num` draws per image.

    x: one image (H, W, C) with one key, or (B, H, W, C) with a (B,) key array. Returns (classes,)
    or (B, classes) int counts, each row summing to `num`. `batch` draws per image go through
    the network at once (it must divide by the 'data' axis); the draws are identical for any
    device count, batch and grouping of images (see the module docstring).
    """
    single = np.ndim(x) == 3
    if single:
        x, keys = np.asarray(x)[None], keys[None]
    sharding.check_batch(int(batch), mesh)
    replicated = sharding.replicated(mesh)
    program = _count_program(base, mesh, int(batch), int(num))
    x = jax.device_put(np.asarray(x, np.float32), replicated)
    keys = jax.device_put(keys, replicated)
    counts = sharding.to_host(program(params, x, keys, np.float32(sigma)))
    return counts[0] if single else counts


def _selection_batch(batch: int, n0: int, mesh) -> int:
    """The batch for the n0 selection draws: no wider than n0 rounded up to the device count."""
    devices = mesh.shape['data']
    return min(int(batch), -(-int(n0) // devices) * devices)


# ---------------------------------------------------------------------------------------------
# Cohen's PREDICT and CERTIFY.


def lower_confidence_bound(k: int, n: int, alpha: float) -> float:
    """One-sided Clopper-Pearson lower bound at level 1 - alpha on p from k successes in n."""
    return float(stats.beta.ppf(alpha, k, n - k + 1)) if k > 0 else 0.0


def predict_from_counts(counts: np.ndarray, alpha: float) -> int:
    """PREDICT: the top class if a two-sided binomial test of its count against the runner-up's
    rejects a tie at level alpha, else ABSTAIN."""
    order = np.argsort(-np.asarray(counts), kind='stable')
    n_a = int(counts[order[0]])
    n_b = int(counts[order[1]]) if len(order) > 1 else 0
    if n_a + n_b == 0:
        return ABSTAIN
    p_value = stats.binomtest(n_a, n_a + n_b, 0.5).pvalue
    return int(order[0]) if p_value <= alpha else ABSTAIN


def certify_from_counts(
    counts0: np.ndarray, counts: np.ndarray, sigma: float, alpha: float
) -> Tuple[int, float]:
    """CERTIFY from the selection and estimation counts: (c_A, radius) or (ABSTAIN, 0.0)."""
    c_a = int(np.argmax(counts0))
    n = int(np.sum(counts))
    p_a = lower_confidence_bound(int(counts[c_a]), n, alpha)
    if p_a <= 0.5:
        return ABSTAIN, 0.0
    return c_a, float(sigma * stats.norm.ppf(p_a))


def predict(base, params, x, indices, key, *, sigma, n, alpha, batch, mesh) -> np.ndarray:
    """PREDICT for images x (B, H, W, C) with dataset indices `indices`: classes or ABSTAIN."""
    check_settings(sigma, 1, n, alpha)
    counts = sample_counts(
        base, params, x, _stream_keys(key, indices, PREDICT), n, sigma, mesh=mesh, batch=batch
    )
    return np.asarray([predict_from_counts(c, alpha) for c in counts], np.int64)


def certify(
    base, params, x, indices, key, *, sigma, n0, n, alpha, batch, mesh
) -> Tuple[np.ndarray, np.ndarray]:
    """CERTIFY for images x (B, H, W, C) with dataset indices `indices`: (predictions with
    ABSTAIN, radii with 0 where abstained)."""
    check_settings(sigma, n0, n, alpha)
    sharding.check_batch(int(batch), mesh)
    counts0 = sample_counts(
        base,
        params,
        x,
        _stream_keys(key, indices, SELECT),
        n0,
        sigma,
        mesh=mesh,
        batch=_selection_batch(batch, n0, mesh),
    )
    counts = sample_counts(
        base, params, x, _stream_keys(key, indices, ESTIMATE), n, sigma, mesh=mesh, batch=batch
    )
    out = [certify_from_counts(c0, c, sigma, alpha) for c0, c in zip(counts0, counts)]
    return np.asarray([p for p, _ in out], np.int64), np.asarray([r for _, r in out], np.float64)


def certified_accuracy(
    predictions: Sequence[int], labels: Sequence[int], radii: Sequence[float], at: Sequence[float]
) -> List[float]:
    """Per radius r of `at`: the fraction of images with prediction == label and radius >= r."""
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    radii = np.asarray(radii, np.float64)
    right = (predictions == labels) & (predictions != ABSTAIN)
    if not len(right):
        return [0.0 for _ in at]
    return [float(np.mean(right & (radii >= r))) for r in at]


# ---------------------------------------------------------------------------------------------
# The per-image CSV, appended image by image (resumable).


class Certificate(NamedTuple):
    index: int
    label: int
    prediction: int
    radius: float
    correct: int

    def line(self) -> str:
        return f'{self.index},{self.label},{self.prediction},{self.radius!r},{self.correct}\n'


def _parse(line: str, where: str) -> Certificate:
    try:
        i, label, pred, radius, correct = line.rstrip('\n').split(',')
        return Certificate(int(i), int(label), int(pred), float(radius), int(correct))
    except ValueError:
        raise ValueError(f'{where}: unreadable row {line.strip()!r}; delete the file') from None


def read_csv(path: str) -> List[Certificate]:
    """The complete rows of a certify CSV ([] if there is none). A half-written last line (a
    preemption mid-write) is dropped from the file, so appending continues cleanly."""
    file = paths.path(path)
    if not file.exists():
        return []
    text = file.read_text()
    lines = text.splitlines(keepends=True)
    complete = [line for line in lines if line.endswith('\n')]
    if complete and complete[0].strip() != CSV_HEADER:
        raise ValueError(f'{path} is not a certify CSV (its header is {complete[0].strip()!r})')
    rows = [_parse(line, path) for line in complete[1:]]
    if len(complete) != len(lines) and reporting.is_writer():
        logging.warning('%s: dropping a half-written last row', path)
        file.write_text(''.join(complete))
    return rows


def _append(path: str, text: str) -> None:
    """Appends and flushes (an object store has no append: the file is rewritten)."""
    if not reporting.is_writer():
        return
    if paths.is_remote(path):
        file = paths.path(path)
        file.write_text((file.read_text() if file.exists() else '') + text)
        return
    with open(path, 'a') as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_settings_file(path: str, settings: Optional[Dict[str, Any]]) -> None:
    """Refuses to resume a CSV written with other settings; records them on a fresh start."""
    if settings is None:
        return
    file = paths.path(path + '.settings.json')
    settings = json.loads(json.dumps(settings, sort_keys=True))
    if file.exists():
        saved = json.loads(file.read_text())
        differ = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if differ:
            raise ValueError(
                f'{path} was written with other settings ({", ".join(differ)} differ); use a '
                f'fresh --workdir or delete it'
            )
    elif paths.path(path).exists():
        raise ValueError(f'{path} has no {file.name} beside it; use a fresh --workdir')
    elif reporting.is_writer():
        file.write_text(json.dumps(settings, indent=2, sort_keys=True) + '\n')


def certify_csv(
    path: str,
    base: Callable,
    params: PyTree,
    images: np.ndarray,
    labels: np.ndarray,
    key: jax.Array,
    *,
    sigma: float,
    n0: int,
    n: int,
    alpha: float,
    batch: int,
    mesh,
    images_per_call: int = 1,
    settings: Optional[Dict[str, Any]] = None,
    log_every: int = 10,
) -> Tuple[List[Certificate], Dict[str, Any]]:
    """CERTIFY on every image (float [0, 1], NHWC), one CSV row each, resuming from `path`.

    Images go `images_per_call` at a time in fixed groups (0..k-1, k..2k-1, ...; the last one
    padded), so a rerun recomputes the same groups; rows already in the CSV are skipped.
    `settings` (any JSON dict) is recorded beside the CSV and a rerun with others refuses.
    Returns (every row by index, {'computed', 'resumed', 'seconds', 'images_per_s'}).
    """
    check_settings(sigma, n0, n, alpha)
    sharding.check_batch(int(batch), mesh)
    if not _is_int(images_per_call) or images_per_call < 1:
        raise ValueError(f'images_per_call must be an int >= 1, got {images_per_call!r}')
    _check_settings_file(path, settings)
    total = len(labels)
    done = {}
    for row in read_csv(path):
        if not 0 <= row.index < total or int(labels[row.index]) != row.label:
            raise ValueError(f'{path} holds row {row.index} of another image set; use a fresh dir')
        done[row.index] = row
    resumed = len(done)
    if not paths.path(path).exists():
        _append(path, CSV_HEADER + '\n')
    t0, computed = time.time(), 0
    for start in range(0, total, images_per_call):
        group = list(range(start, min(start + images_per_call, total)))
        missing = [i for i in group if i not in done]
        if not missing:
            continue
        padded = group + [group[-1]] * (images_per_call - len(group))
        preds, radii = certify(
            base,
            params,
            images[padded],
            padded,
            key,
            sigma=sigma,
            n0=n0,
            n=n,
            alpha=alpha,
            batch=batch,
            mesh=mesh,
        )
        for k, i in enumerate(group):
            if i in done:
                continue
            label = int(labels[i])
            row = Certificate(i, label, int(preds[k]), float(radii[k]), int(preds[k] == label))
            _append(path, row.line())
            done[i] = row
            computed += 1
            if log_every and computed % log_every == 0:
                rate = computed / max(time.time() - t0, 1e-9)
                logging.info('%s: %d/%d images (%.2f images/s)', path, len(done), total, rate)
    seconds = time.time() - t0
    info = {
        'computed': computed,
        'resumed': resumed,
        'seconds': seconds,
        'images_per_s': computed / seconds if computed and seconds > 0 else None,
    }
    return [done[i] for i in range(total)], info


# ---------------------------------------------------------------------------------------------
# The adaptive attack on the smoothed classifier.


@functools.lru_cache(maxsize=None)
def _soft_smoothed(base: Callable, mesh, samples: int) -> attacks.RandomFn:
    """log of the Monte-Carlo soft smoothed classifier, log mean_m softmax(f(x + sigma delta_m)),
    as a `RandomFn` of ((base params, sigma), x, key): fresh draws at every attack step."""
    spread = NamedSharding(mesh, P('data'))

    def log_probs(params_sigma, x, key):
        params, sigma = params_sigma
        k_noise, k_denoise = jax.random.split(key)
        noise = jax.random.normal(k_noise, (samples, *x.shape), x.dtype)
        z = (x[None] + sigma * noise).reshape((samples * x.shape[0], *x.shape[1:]))
        z = jax.lax.with_sharding_constraint(z, spread)
        logits = base(params, z, k_denoise).astype(jnp.float32)
        log_p = jax.nn.log_softmax(logits).reshape(samples, x.shape[0], -1)
        return jax.nn.logsumexp(log_p, axis=0) - jnp.log(float(samples))

    return attacks.RandomFn(log_probs, 1)


@functools.lru_cache(maxsize=None)
def _attack_program(base: Callable, mesh, samples: int, steps: int):
    fn = _soft_smoothed(base, mesh, samples)

    def run(params, x, labels, key, sigma, radius):
        return attacks.pgd(
            fn,
            (params, sigma),
            x,
            key,
            labels,
            eps=radius,
            steps=steps,
            step_size=None,  # Madry's 2.5 radius / steps.
            norm='l2',
            random_start=False,
            restarts=1,
        )

    return jax.jit(run, out_shardings=sharding.replicated(mesh))


def check_attack(samples: int, steps: int, images_per_call: int, mesh) -> None:
    for name, value in (('attack.samples', samples), ('attack.steps', steps)):
        if not _is_int(value) or value < 1:
            raise ValueError(f'{name} must be an int >= 1, got {value!r}')
    devices = mesh.shape['data']
    if (samples * images_per_call) % devices:
        raise ValueError(
            f'attack.samples x images_per_call = {samples * images_per_call} noise draws per '
            f"step are not divisible by the {devices} devices of the 'data' mesh axis"
        )


def smooth_attack(
    base, params, x, labels, indices, key, *, sigma, radius, samples, steps, mesh
) -> np.ndarray:
    """L2 PGD at `radius` on the soft smoothed classifier of images x (B, H, W, C), `samples`
    noise draws per step (kept in [0, 1]); the adversarial images."""
    check_attack(samples, steps, len(x), mesh)
    replicated = sharding.replicated(mesh)
    k = _stream_keys(key, indices, ATTACK)[0]
    run = _attack_program(base, mesh, int(samples), int(steps))
    x_adv = run(
        params,
        jax.device_put(np.asarray(x, np.float32), replicated),
        jax.device_put(np.asarray(labels, np.int32), replicated),
        jax.random.fold_in(k, int(round(radius * 1e6))),
        np.float32(sigma),
        np.float32(radius),
    )
    return sharding.to_host(x_adv)


def empirical_correct(
    base, params, x_adv, labels, indices, key, *, sigma, n, batch, mesh
) -> np.ndarray:
    """Whether g's majority vote over `n` draws at each attacked image is its label."""
    counts = sample_counts(
        base, params, x_adv, _stream_keys(key, indices, VOTE), n, sigma, mesh=mesh, batch=batch
    )
    return np.argmax(counts, axis=-1) == np.asarray(labels)


# ---------------------------------------------------------------------------------------------
# Sanity: no attack beats the certificate.


def sanity_checks(results: Dict[str, Any]) -> Dict[str, Any]:
    """{'passed', 'checks': [{'check', 'ok', 'detail'}], 'failures'}: per entry and attacked
    radius, the empirical accuracy under the attack is not below the certified accuracy on the
    same images (either would mean a broken certificate or a bug)."""
    checks = []
    for e in results['entries']:
        for a in (e.get('attack') or {}).get('radii', []):
            ok = a['empirical'] >= a['certified']
            checks.append(
                {
                    'check': 'attack_vs_certificate',
                    'ok': ok,
                    'detail': (
                        f'sigma {e["sigma"]:g}, {e["denoiser"]}, r = {a["radius"]:g}: empirical '
                        f'{100 * a["empirical"]:.1f}% under the smoothed attack vs certified '
                        f'{100 * a["certified"]:.1f}% on the same {e["attack"]["images"]} images'
                        f' ({a["violations"]} certified images broken)'
                    ),
                }
            )
    failures = [c['detail'] for c in checks if not c['ok']]
    return {'passed': not failures, 'checks': checks, 'failures': failures}


def sanity_lines(sanity: Dict[str, Any]) -> List[str]:
    return [('sanity ok: ' if c['ok'] else 'BROKEN: ') + c['detail'] for c in sanity['checks']] or [
        'sanity: no attack run (attack.steps = 0)'
    ]


# ---------------------------------------------------------------------------------------------
# The certify mode.


@dataclasses.dataclass(frozen=True)
class Settings:
    sigmas: Tuple[float, ...]
    n0: int
    n: int
    alpha: float
    batch: int
    images_per_call: int
    radii: Tuple[float, ...]
    attack_images: int
    attack_radii: Tuple[float, ...]
    attack_steps: int
    attack_samples: int
    attack_n: int


def settings_from(config: ml_collections.ConfigDict, mesh=None) -> Settings:
    """The certify settings of `config`, each checked (one-line ValueErrors)."""
    sigmas = tuple(float(s) for s in _tuple(config.sigmas))
    if not sigmas:
        raise ValueError('sigmas is empty; give at least one noise level')
    for sigma in sigmas:
        check_settings(sigma, config.n0, config.n, config.alpha)
    a = config.attack
    s = Settings(
        sigmas=sigmas,
        n0=int(config.n0),
        n=int(config.n),
        alpha=float(config.alpha),
        batch=int(config.batch),
        images_per_call=int(config.get('images_per_call', 1)),
        radii=tuple(check_radii(_tuple(config.radii))),
        attack_images=int(a.num_images),
        attack_radii=tuple(check_radii(_tuple(a.radii))) if a.steps else (),
        attack_steps=int(a.steps),
        attack_samples=int(a.samples),
        attack_n=int(a.n),
    )
    if s.images_per_call < 1:
        raise ValueError(f'images_per_call must be >= 1, got {s.images_per_call}')
    if s.attack_steps < 0:
        raise ValueError(f'attack.steps must be >= 0 (0: no attack), got {s.attack_steps}')
    if mesh is not None:
        sharding.check_batch(s.batch, mesh)
        if s.attack_steps:
            check_attack(s.attack_samples, s.attack_steps, s.images_per_call, mesh)
            check_settings(sigmas[0], 1, s.attack_n, s.alpha)
    return s


def _tuple(value) -> Tuple:
    return (value,) if isinstance(value, (int, float)) else tuple(value)


def _denoiser_sigmas(config, sigmas: Sequence[float]) -> Dict[str, Tuple[float, ...]]:
    """label -> the noise levels `config.denoisers[i].sigmas` restricts it to (absent: all)."""
    only = {}
    for entry in config.get('denoisers', None) or []:
        label = entry.get('label', '') or entry.kind
        chosen = tuple(float(v) for v in _tuple(entry.get('sigmas', ()) or ()))
        unknown = [v for v in chosen if v not in sigmas]
        if unknown:
            raise ValueError(
                f'denoiser {label!r} is restricted to sigmas {chosen}, but {unknown[0]:g} is not '
                f'in sigmas {tuple(sigmas)}'
            )
        if chosen:
            only[label] = chosen
    return only


def csv_name(sigma: float, label: str) -> str:
    return f'certify_sigma{sigma:g}_{re.sub(r"[^A-Za-z0-9_.-]+", "_", label)}.csv'


def evaluate(
    config: ml_collections.ConfigDict,
    classifier_fn: Callable,
    classifier_params: PyTree,
    rows: Sequence[Any],
    images: np.ndarray,
    labels: np.ndarray,
    mesh,
    workdir: str,
    provenance: Optional[Dict[str, Any]] = None,
) -> Tuple[Dict[str, Any], Dict[Tuple[float, str], List[Certificate]]]:
    """CERTIFY for every sigma x denoiser row (robustness.Row-like: label, purifier, params,
    source) on images (uint8 or float [0, 1], NHWC); the attack on the first
    `attack.num_images`. Returns (results, per-image certificates by (sigma, label)).

    Each (sigma, row) writes <workdir>/certify_sigma<s>_<label>.csv and resumes from it.
    `provenance` (classifier checkpoint, data) joins the settings a resume must match.
    """
    s = settings_from(config, mesh)
    only = _denoiser_sigmas(config, s.sigmas)
    images = np.asarray(images)
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    labels = np.asarray(labels, np.int32)
    if not len(labels):
        raise ValueError('no images to certify; set num_images > 0')
    replicated = sharding.replicated(mesh)
    classifier_params = jax.device_put(classifier_params, replicated)
    bases = []
    seen = set()
    for row in rows:  # Every shape check before any sampling.
        if row.label in seen:
            raise ValueError(f'two denoisers are labelled {row.label!r}; set distinct labels')
        seen.add(row.label)
        base = base_classifier(classifier_fn, row.purifier)
        params = (classifier_params, jax.device_put(row.params, replicated))
        classes = check_fit(base, params, images.shape[1:], row.label)
        if labels.max() >= classes:
            raise ValueError(f'labels go up to {labels.max()} but the classifier has {classes}')
        bases.append((row, base, params))
    key = jax.random.key(int(config.seed))
    attack_count = min(s.attack_images, len(labels)) if s.attack_steps else 0
    results: Dict[str, Any] = {
        'images': int(len(labels)),
        'settings': {
            'sigmas': list(s.sigmas),
            'n0': s.n0,
            'n': s.n,
            'alpha': s.alpha,
            'batch': s.batch,
            'images_per_call': s.images_per_call,
            'seed': int(config.seed),
            'radii': list(s.radii),
            'attack': {
                'images': attack_count,
                'radii': list(s.attack_radii),
                'steps': s.attack_steps,
                'samples': s.attack_samples,
                'n': s.attack_n,
            },
        },
        'entries': [],
    }
    per_image = {}
    for sigma in s.sigmas:
        for row, base, params in bases:
            if only.get(row.label) and sigma not in only[row.label]:
                continue
            path = paths.join(workdir, csv_name(sigma, row.label))
            fingerprint = dict(
                sigma=sigma,
                n0=s.n0,
                n=s.n,
                alpha=s.alpha,
                batch=s.batch,
                images_per_call=s.images_per_call,
                seed=int(config.seed),
                images=int(len(labels)),
                denoiser={'label': row.label, 'kind': row.purifier.kind, 'source': row.source},
                **(provenance or {}),
            )
            certs, info = certify_csv(
                path,
                base,
                params,
                images,
                labels,
                key,
                sigma=sigma,
                n0=s.n0,
                n=s.n,
                alpha=s.alpha,
                batch=s.batch,
                mesh=mesh,
                images_per_call=s.images_per_call,
                settings=fingerprint,
            )
            per_image[(sigma, row.label)] = certs
            if reporting.is_writer():
                rate = info['images_per_s']
                print(
                    f'certify sigma {sigma:g} {row.label}: {info["computed"]} images certified'
                    + (f' ({rate:.3f} images/s)' if rate else '')
                    + (f', {info["resumed"]} resumed from {path}' if info['resumed'] else ''),
                    flush=True,
                )
            preds = [c.prediction for c in certs]
            radii = [c.radius for c in certs]
            entry = {
                'sigma': sigma,
                'denoiser': row.label,
                'kind': row.purifier.kind,
                'source': row.source,
                'csv': os.path.basename(path),
                'certified': dict(
                    zip(
                        [f'{r:g}' for r in s.radii],
                        certified_accuracy(preds, labels, radii, s.radii),
                    )
                ),
                'clean_smoothed': float(np.mean([c.correct for c in certs])),
                'abstain': float(np.mean([c.prediction == ABSTAIN for c in certs])),
                'mean_radius_correct': float(
                    np.mean([c.radius for c in certs if c.correct] or [0.0])
                ),
                'computed': info['computed'],
                'resumed': info['resumed'],
                'images_per_s': info['images_per_s'],
            }
            if attack_count:
                # Saved per entry once done, so a resumed job does not attack again.
                name = csv_name(sigma, row.label)[: -len('.csv')] + '.attack.json'
                attack_settings = json.loads(
                    json.dumps(dict(fingerprint, attack=results['settings']['attack']))
                )
                saved = paths.path(workdir) / name
                saved = json.loads(saved.read_text()) if saved.exists() else {}
                if saved.get('settings') == attack_settings:
                    entry['attack'] = saved['attack']
                else:
                    entry['attack'] = _attack_entry(
                        base, params, images, labels, key, certs[:attack_count], sigma, s, mesh
                    )
                    reporting.write_json(
                        workdir, name, {'settings': attack_settings, 'attack': entry['attack']}
                    )
            results['entries'].append(entry)
    results['sanity'] = sanity_checks(results)
    return results, per_image


def _attack_entry(base, params, images, labels, key, certs, sigma, s: Settings, mesh):
    """The smoothed attack at every attack radius on the first images, against their
    certificates."""
    count = len(certs)
    t0 = time.time()
    out = {'images': count, 'radii': []}
    for radius in s.attack_radii:
        correct = []
        for start in range(0, count, s.images_per_call):
            group = list(range(start, min(start + s.images_per_call, count)))
            padded = group + [group[-1]] * (s.images_per_call - len(group))
            x_adv = smooth_attack(
                base,
                params,
                images[padded],
                labels[padded],
                padded,
                key,
                sigma=sigma,
                radius=radius,
                samples=s.attack_samples,
                steps=s.attack_steps,
                mesh=mesh,
            )
            ok = empirical_correct(
                base,
                params,
                x_adv,
                labels[padded],
                padded,
                key,
                sigma=sigma,
                n=s.attack_n,
                batch=s.batch,
                mesh=mesh,
            )
            correct.extend(bool(v) for v in ok[: len(group)])
        correct = np.asarray(correct)
        certified = np.asarray([c.correct == 1 and c.radius >= radius for c in certs])
        out['radii'].append(
            {
                'radius': float(radius),
                'certified': float(certified.mean()),
                'empirical': float(correct.mean()),
                'violations': int(np.sum(certified & ~correct)),
            }
        )
    out['seconds'] = time.time() - t0
    return out
