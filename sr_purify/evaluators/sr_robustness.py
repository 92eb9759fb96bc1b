"""Robustness of SR networks to small perturbations of their LR input (Choi et al. ICCV 2019).

For every model (bicubic, the linear baseline, then each restored SR checkpoint), every set and
every L-inf budget eps:

* basic attack: `attacks.sr_attack` on each image at its own size (batch 1): I-FGSM maximising
  ||f(x + delta) - f(x)||^2 from a random start within one step, `steps` steps of `step_size`
  (None: eps / steps, the paper's schedule);
* universal attack: one perturbation for the whole set (below).

Reported per model, attack and eps, as means over the set of per-image PSNRs by the SR convention
of evaluators/sr.py (Y channel, `scale` pixels shaved, outputs quantised to 8 bits):
`psnr_change` = PSNR(f(x + delta), f(x)), `psnr_hr` = PSNR(f(x + delta), HR) and `drop` = clean -
psnr_hr, beside `clean` = PSNR(f(x), HR). Transfer (`transfer` pairs, e.g. teacher -> student):
the perturbations made on the source model fed to the target, scored against the target's clean
output and HR.

Defences (`sr_defences`), for each model: the clean PSNR of D∘f and its `cost` (clean of f minus
clean of D∘f); the oblivious attacker (the basic attack on f, fed to D∘f) and the adaptive one
(the basic attack on D∘f, EOT over `eot_draws` draws when D is random), each with psnr_hr,
psnr_change (against D(x)) and drop (clean of D∘f minus psnr_hr). A random defence scores every
input of an image with the same draw, so eps = 0 reproduces its clean number exactly.

Images: HR mod-cropped to the scale, LR by MATLAB-style bicubic downscaling (uint8), as in
evaluators/sr.py. A gray image (Set14 bridge) is attacked in its own gray channel: the model sees
it replicated to RGB, and the channel mean of its output is the gray SR image that is scored.
Bicubic is jax's bicubic upscaling (differentiable; within 0.02 dB of MATLAB's imresize).
The models, images, attacks and scores are in sr_robustness_attacks.py, the tables, plot and grid
in sr_robustness_report.py; jobs/evaluate.py restores the models and runs both.

The universal perturbation: the images of a set differ in size, so the one delta is a
`universal_patch` x `universal_patch` x 3 LR patch, tiled periodically from each image's top-left
corner and cropped to its size (a gray image takes its channel mean). Tiling, unlike resizing,
keeps every pixel's perturbation within eps and the number of unknowns fixed. It ascends the sum
over images of each image's mean squared output change (every image weighs the same, as in the
mean PSNR) with sign steps of `universal_step_size` (None: eps / steps) from a random start
within one step, clipped to [-eps, eps]; each image receives `attacks.project(x + tile(delta))`,
which differs from x + tile(delta) only where [0, 1] clips it.

eps and the step size are traced arguments, so every function attacked compiles once per image
shape (batch 1, each image at its own size).
"""

import dataclasses
import time
from typing import Any, Dict, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sr_purify.evaluators import sr_defences
from sr_purify.evaluators.sr_robustness_attacks import (  # noqa: F401  (this module's API too)
    Sample,
    SRModel,
    apply_universal,
    basic_attack,
    bicubic,
    defended,
    image_fn,
    prepare,
    psnr,
    restored_model,
    run_defence,
    run_model,
    run_universal,
    tile,
    universal_perturbation,
)
from sr_purify.image_ops import Image


@dataclasses.dataclass(frozen=True)
class Settings:
    """What `evaluate` runs (see `settings_from` for the config fields)."""

    eps_255: Tuple[float, ...]
    steps: int = 10
    step_size: Optional[float] = None
    universal_steps: int = 10
    universal_step_size: Optional[float] = None
    universal_patch: int = 32
    adaptive_steps: int = 0  # 0: `steps`.
    eot_draws: int = 20
    seed: int = 0
    grid_eps: int = -1  # Index into eps_255; -1: the largest.

    @property
    def eps(self) -> Tuple[float, ...]:
        return tuple(e / 255.0 for e in self.eps_255)

    @property
    def labels(self) -> Tuple[str, ...]:
        return tuple(f'{e:g}/255' for e in self.eps_255)

    @property
    def grid_eps_index(self) -> int:
        """The eps shown in the image grid: `grid_eps`, or the largest when it is -1."""
        return int(np.argmax(self.eps_255)) if self.grid_eps < 0 else self.grid_eps


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def settings_from(config) -> Settings:
    """Settings from the `sr_robustness` config; a bad value is a one-line ValueError."""
    eps = config.eps_255
    if isinstance(eps, (int, float)):
        eps = (eps,)
    eps = tuple(eps)
    if not eps or not all(_is_number(e) and e >= 0 for e in eps):
        raise ValueError(
            f'invalid eps_255 {eps!r}; valid: a non-empty tuple of L-inf budgets >= 0, in 1/255 '
            "(e.g. --config.eps_255='(2, 4)')"
        )
    s = Settings(
        eps_255=tuple(float(e) for e in eps),
        steps=config.attack.steps,
        step_size=config.attack.step_size,
        universal_steps=config.universal.steps,
        universal_step_size=config.universal.step_size,
        universal_patch=config.universal.patch,
        adaptive_steps=config.adaptive.steps,
        eot_draws=config.adaptive.eot_draws,
        seed=config.seed,
        grid_eps=config.get('grid_eps', -1),
    )
    n = len(eps)
    checks = (
        ('attack.steps', s.steps, _is_int(s.steps) and s.steps >= 1, 'an int >= 1'),
        (
            'universal.steps',
            s.universal_steps,
            _is_int(s.universal_steps) and s.universal_steps >= 0,
            'an int >= 0 (0: no universal attack)',
        ),
        (
            'universal.patch',
            s.universal_patch,
            _is_int(s.universal_patch) and s.universal_patch >= 1,
            'an int >= 1 (LR pixels)',
        ),
        (
            'adaptive.steps',
            s.adaptive_steps,
            _is_int(s.adaptive_steps) and s.adaptive_steps >= 0,
            'an int >= 0 (0: attack.steps)',
        ),
        (
            'adaptive.eot_draws',
            s.eot_draws,
            _is_int(s.eot_draws) and s.eot_draws >= 1,
            'an int >= 1',
        ),
        (
            'grid_eps',
            s.grid_eps,
            _is_int(s.grid_eps) and -1 <= s.grid_eps < n,
            f'an index below {n} into eps_255, or -1 for the largest',
        ),
    )
    for field, value, ok, valid in checks:
        if not ok:
            raise ValueError(f'invalid {field} {value!r}; valid: {valid}')
    for field, value in (
        ('attack.step_size', s.step_size),
        ('universal.step_size', s.universal_step_size),
    ):
        if value is not None and not (_is_number(value) and value > 0):
            raise ValueError(
                f'invalid {field} {value!r}; valid: a number > 0, or None (eps / steps)'
            )
    return s


# ---------------------------------------------------------------------------------------------
# The evaluation.


def _scores(out, clean, hr, scale) -> Dict[str, float]:
    return {'psnr_hr': psnr(out, hr, scale), 'psnr_change': psnr(out, clean, scale)}


def _model_on_set(model, samples, settings, defences, key, grid_index):
    """Per-image records, adversarial inputs per image and eps, and the grid arrays."""
    eps, labels, scale = settings.eps, settings.labels, model.scale
    adaptive_steps = settings.adaptive_steps or settings.steps
    rows, adversarial, grid = [], [], None
    for i, s in enumerate(samples):
        fn = image_fn(model.fn, s.x.shape[-1])
        k_image = jax.random.fold_in(key, i)
        clean = run_model(fn, model.params, s.x)
        row = {'name': s.name, 'clean': psnr(clean, s.hr, scale), 'basic': {}, 'defences': {}}
        advs = []
        for e, (eps_e, label) in enumerate(zip(eps, labels)):
            x_adv = basic_attack(
                fn,
                model.params,
                s.x,
                jax.random.fold_in(k_image, e),
                eps_e,
                settings.steps,
                settings.step_size,
            )
            out = run_model(fn, model.params, x_adv)
            row['basic'][label] = _scores(out, clean, s.hr, scale)
            advs.append(x_adv)
            if i == grid_index and e == settings.grid_eps_index:
                grid = {'x': s.x, 'x_adv': x_adv, 'clean': clean, 'attacked': out, 'hr': s.hr}
        for j, defence in enumerate(defences):
            k_defence = jax.random.fold_in(k_image, 1000 + j)
            k_draw = jax.random.fold_in(k_defence, 0)  # One draw for every input of this image.
            d_clean = run_defence(defence, fn, model.params, s.x, k_draw)
            entry = {'clean': psnr(d_clean, s.hr, scale), 'oblivious': {}, 'adaptive': {}}
            attacked = defended(defence, fn, settings.eot_draws)
            for e, (eps_e, label) in enumerate(zip(eps, labels)):
                out = run_defence(defence, fn, model.params, advs[e], k_draw)
                entry['oblivious'][label] = _scores(out, d_clean, s.hr, scale)
                x_ad = basic_attack(
                    attacked,
                    model.params,
                    s.x,
                    jax.random.fold_in(k_defence, 1 + e),
                    eps_e,
                    adaptive_steps,
                    settings.step_size,
                )
                out = run_defence(defence, fn, model.params, x_ad, k_draw)
                entry['adaptive'][label] = _scores(out, d_clean, s.hr, scale)
            row['defences'][defence.name] = entry
        rows.append(row)
        adversarial.append(advs)
    return rows, adversarial, grid


def _universal_on_set(model, samples, settings, key, target=None, deltas=None):
    """Per-image universal records of `target` (default `model`) under `model`'s deltas (made
    here unless given, one per eps); returns (records, deltas)."""
    target = target or model
    refs = [run_model(image_fn(target.fn, s.x.shape[-1]), target.params, s.x) for s in samples]
    if deltas is None:
        deltas = [
            universal_perturbation(
                model,
                samples,
                jax.random.fold_in(key, e),
                eps_e,
                settings.universal_steps,
                settings.universal_step_size,
                settings.universal_patch,
            )
            for e, eps_e in enumerate(settings.eps)
        ]
    rows = [{} for _ in samples]
    for i, (s, ref) in enumerate(zip(samples, refs)):
        fn = image_fn(target.fn, s.x.shape[-1])
        for eps_e, label, delta in zip(settings.eps, settings.labels, deltas):
            x_adv = run_universal(jnp.asarray(delta), s.x, np.float32(eps_e))
            rows[i][label] = _scores(run_model(fn, target.params, x_adv), ref, s.hr, target.scale)
    return rows, deltas


def _mean(rows: Sequence[Any]) -> Any:
    """Mean over rows of a nested dict of floats (same structure in every row)."""
    first = rows[0]
    if isinstance(first, dict):
        return {k: _mean([r[k] for r in rows]) for k in first if k != 'name'}
    return float(np.mean(rows))


def _minus(a: float, b: float) -> float:
    """a - b, and 0 when they are equal (inf - inf: a flat image SR'd exactly, attacked at 0)."""
    return 0.0 if a == b else a - b


def _with_drops(attacked: Dict[str, Dict[str, float]], clean: float) -> Dict[str, Any]:
    return {k: dict(v, drop=_minus(clean, v['psnr_hr'])) for k, v in attacked.items()}


def _summary(rows, universal_rows) -> Dict[str, Any]:
    mean = _mean(rows)
    out = {
        'clean': mean['clean'],
        'basic': _with_drops(mean['basic'], mean['clean']),
        'defences': {},
        'images': [],
    }
    if universal_rows is not None:
        out['universal'] = _with_drops(_mean(universal_rows), mean['clean'])
    for name, d in mean['defences'].items():
        out['defences'][name] = {
            'clean': d['clean'],
            'cost': _minus(mean['clean'], d['clean']),
            'oblivious': _with_drops(d['oblivious'], d['clean']),
            'adaptive': _with_drops(d['adaptive'], d['clean']),
        }
    for k, r in enumerate(rows):
        image = {'name': r['name'], 'clean': r['clean'], 'basic': r['basic']}
        if universal_rows is not None:
            image['universal'] = universal_rows[k]
        if r['defences']:
            image['defences'] = r['defences']
        out['images'].append(image)
    return out


def _grid_image(samples: Sequence[Sample]) -> int:
    """The first RGB image (a colour crop shows the perturbation best), else the first."""
    return next((i for i, s in enumerate(samples) if s.x.shape[-1] == 3), 0)


def evaluate(
    models: Sequence[SRModel],
    sets: Sequence[Tuple[str, Sequence[Image]]],
    settings: Settings,
    defences: Sequence[sr_defences.Defence] = (),
    transfer: Sequence[Tuple[str, str]] = (),
) -> Tuple[Dict[str, Any], Dict[str, Any]]:
    """Every model on every `(name, images)` set; returns (results, samples).

    results: the `sr_robustness` section of results.json (see the module docstring);
    samples: `universal[set][model][eps label]` the universal perturbations (one array each) and
    `grid` the arrays of the image grid (the first set's first RGB image, at `grid_eps`).
    """
    names = [m.name for m in models]
    if len(set(names)) != len(names):
        raise ValueError(f'two models share a label: {names}; give each a distinct label')
    scales = {m.scale for m in models}
    if len(scales) != 1:
        raise ValueError(f'models of different scales {sorted(scales)}; evaluate one scale')
    by_name = {m.name: m for m in models}
    for source, target in transfer:
        for n in (source, target):
            if n not in by_name:
                raise ValueError(f'transfer model {n!r} is not evaluated; valid: {names}')
    (scale,) = scales
    key = jax.random.key(settings.seed)
    results: Dict[str, Any] = {
        'scale': scale,
        'eps_255': list(settings.eps_255),
        'eps_labels': list(settings.labels),
        'settings': dataclasses.asdict(settings),
        'models': {m.name: {'source': m.source} for m in models},
        'defences': {d.name: {'random': d.random, 'settings': d.settings} for d in defences},
        'transfer': [f'{a}->{b}' for a, b in transfer],
        'datasets': {},
        'seconds': {},
    }
    samples_out: Dict[str, Any] = {'universal': {}, 'grid': None}
    universal = settings.universal_steps > 0
    for s_index, (set_name, images) in enumerate(sets):
        samples = prepare(images, scale)
        k_set = jax.random.fold_in(key, s_index)
        grid_index = _grid_image(samples) if s_index == 0 else -1
        entry = {'images': len(samples), 'models': {}, 'transfer': {}}
        adversarial, deltas, grid_rows = {}, {}, []
        for m in models:
            t = time.time()
            rows, advs, grid = _model_on_set(
                m, samples, settings, defences, jax.random.fold_in(k_set, 0), grid_index
            )
            u_rows = None
            if universal:
                u_rows, deltas[m.name] = _universal_on_set(
                    m, samples, settings, jax.random.fold_in(k_set, 1)
                )
            entry['models'][m.name] = _summary(rows, u_rows)
            adversarial[m.name] = advs
            if grid is not None:
                grid_rows.append((m.name, grid))
            seconds = results['seconds'][f'{set_name}/{m.name}'] = time.time() - t
            # The evaluation runs for hours on a CPU: say where it is.
            summary = entry['models'][m.name]
            logging.info(
                'SR robustness %s / %s: %d images in %.0f s; clean %.3f dB, basic drop %s',
                set_name,
                m.name,
                len(samples),
                seconds,
                summary['clean'],
                ', '.join(f'{k} {v["drop"]:.3f}' for k, v in summary['basic'].items()),
            )
        samples_out['universal'][set_name] = {
            name: dict(zip(settings.labels, d)) for name, d in deltas.items()
        }
        for source, target in transfer:
            entry['transfer'][f'{source}->{target}'] = _transfer(
                by_name[source],
                by_name[target],
                samples,
                adversarial[source],
                deltas.get(source),
                settings,
            )
        if grid_rows:
            samples_out['grid'] = {
                'set': set_name,
                'image': samples[grid_index].name,
                'eps_label': settings.labels[settings.grid_eps_index],
                'eps': settings.eps[settings.grid_eps_index],
                'scale': scale,
                'rows': grid_rows,
            }
        results['datasets'][set_name] = entry
    return results, samples_out


def _transfer(source, target, samples, adversarial, deltas, settings) -> Dict[str, Any]:
    """The target scored on the source's basic adversarial inputs (and universal deltas)."""
    rows, clean = [], []
    for s, advs in zip(samples, adversarial):
        fn = image_fn(target.fn, s.x.shape[-1])
        ref = run_model(fn, target.params, s.x)
        clean.append(psnr(ref, s.hr, target.scale))
        rows.append(
            {
                label: _scores(run_model(fn, target.params, x_adv), ref, s.hr, target.scale)
                for label, x_adv in zip(settings.labels, advs)
            }
        )
    clean_mean = float(np.mean(clean))
    out = {
        'source': source.name,
        'target': target.name,
        'clean': clean_mean,
        'basic': _with_drops(_mean(rows), clean_mean),
    }
    if deltas is not None:
        u_rows, _ = _universal_on_set(source, samples, settings, None, target, deltas)
        out['universal'] = _with_drops(_mean(u_rows), clean_mean)
    return out
