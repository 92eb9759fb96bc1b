"""The model-extraction attack on a deployed SR model: what a thief with query access can copy.

The thief sees a service that takes a uint8 LR image and returns the uint8 SR image (a served PNG):
no parameters, no gradients, no architecture. It owns unlabelled photos, queries the service with
them, and trains a surrogate of its own choosing on (query, answer) pairs (Szyller et al. 2021;
Spingarn-Eliezer & Michaeli 2024 steal SR models from a single image this way).

* `BlackBox`: the service; `query(lr)` and counters of what was asked, nothing else.
* `query_images`: the thief's photos, downscaled as the service's users would send them.
* `collect_pairs` / `pair_batches`: the training set and its batches, example i of the run a pure
  function of (seed, i) as in sr_data.sr_train_batches.
"""

import logging
import os
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from sr_purify import api, image_ops, sr_data
from sr_purify.evaluators import sr as sr_eval

VICTIM_FLAG = '--config.victim'
QUERY_FLAG = '--config.query_data'


class BlackBox:
    """A deployed SR model as its users see it: `query(lr uint8 HxWx3) -> uint8 (H*s)x(W*s)x3`.

    Only `scale`, `query`, the counters `queries` (images asked) and `pixels_queried` (their LR
    pixels) and `source` (words for the reports) are public. The served function lives in a
    closure, so no attribute of the object holds the victim's parameters: a job given a BlackBox
    can only ask it questions.
    """

    def __init__(self, serve: Callable[[np.ndarray], np.ndarray], scale: int, source: str = ''):
        self.scale = image_ops.check_scale(int(scale))
        self.source = source
        self.queries = 0
        self.pixels_queried = 0

        def answer(lr: np.ndarray) -> np.ndarray:
            out = np.asarray(serve(lr))
            want = (lr.shape[0] * self.scale, lr.shape[1] * self.scale, 3)
            if out.dtype != np.uint8 or out.shape != want:
                raise ValueError(
                    f'the served model answered {out.dtype} {out.shape} for {lr.shape}; '
                    f'expected uint8 {want}'
                )
            return out

        self._answer = answer

    def query(self, lr: np.ndarray) -> np.ndarray:
        """One served image: `lr` uint8 HxWx3 -> uint8 (H*scale)x(W*scale)x3."""
        lr = np.asarray(lr)
        if lr.dtype != np.uint8 or lr.ndim != 3 or lr.shape[-1] != 3:
            raise ValueError(f'a query is a uint8 HxWx3 image, got {lr.dtype} {lr.shape}')
        self.queries += 1
        self.pixels_queried += lr.shape[0] * lr.shape[1]
        return self._answer(lr)

    @classmethod
    def from_path(cls, path: str, runtime: str = 'auto', flag: str = VICTIM_FLAG) -> 'BlackBox':
        """The SR model in `path` (a teacher/student workdir or an export folder) served as a PNG
        would be: `api.load_sr(...).upscale` on the whole image (tiled), uint8 out."""
        if not path:
            raise FileNotFoundError(
                f'no victim given; pass {flag}=<a teacher or student workdir, or an export folder>'
            )
        try:
            sr = api.load_sr(path, runtime=runtime)
        except (ValueError, FileNotFoundError) as e:
            # restore.load names the flag of the jobs that call it `checkpoint`; here it is ours.
            message = str(e).replace('--config.checkpoint', flag)
            if flag not in message:
                message = f'{flag}: {message}'
            raise (FileNotFoundError if isinstance(e, FileNotFoundError) else ValueError)(
                message
            ) from None
        return cls(lambda lr: sr.upscale(lr), sr.scale, source=f'{sr.source} ({sr.runtime})')


def query_images(
    spec: str, scale: int, downscale: bool = True, limit: Optional[int] = None
) -> List[image_ops.Image]:
    """The thief's query images from the folder `spec`, in sorted file order (the first `limit`).

    With `downscale` each is mod-cropped and downscaled by `scale` (MATLAB bicubic, uint8): the
    service upscales downscaled photos, and the thief sends it what it expects (Szyller et al.
    assume the same). Without, the images go as they are. Gray files become RGB.
    """
    where = f'pass {QUERY_FLAG}=<a folder of images>'
    if not os.path.isdir(spec):
        raise ValueError(f'query image folder {spec!r} does not exist; {where}')
    try:
        files = sr_data.list_image_files(spec)
    except FileNotFoundError:  # Its message names the data pipeline's flag; this job has another.
        suffixes = ', '.join(sr_data.IMAGE_SUFFIXES)
        raise ValueError(f'no query images ({suffixes}) in {spec!r}; {where}') from None
    images = []
    for f in files[:limit] if limit else files:
        try:
            pixels = sr_data.read_image(f)
        except ValueError:
            message = f'cannot read query image {f!r}; remove it from {QUERY_FLAG}'
            raise ValueError(message) from None
        images.append(image_ops.Image(os.path.splitext(os.path.basename(f))[0], pixels))
    if not downscale:
        return images
    return [image_ops.Image(im.name, sr_eval.make_lr(im.pixels, scale)) for im in images]


def collect_pairs(
    blackbox: BlackBox, lr_images: Sequence[np.ndarray]
) -> List[Tuple[np.ndarray, np.ndarray]]:
    """(lr, served output) for each image (an `Image` or an array), one query each."""
    pairs = []
    for lr in lr_images:
        lr = np.asarray(getattr(lr, 'pixels', lr))
        pairs.append((lr, blackbox.query(lr)))
    return pairs


def _example(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]], scale: int, patch: int, seed: int, index: int
) -> Tuple[np.ndarray, np.ndarray]:
    """Example `index` of the run: a random pair, corner and dihedral transform from (seed, i)."""
    rng = np.random.default_rng([seed, index])
    lr, hr = pairs[int(rng.integers(len(pairs)))]
    y = int(rng.integers(lr.shape[0] - patch + 1))
    x = int(rng.integers(lr.shape[1] - patch + 1))
    t = int(rng.integers(8))
    lr = lr[y : y + patch, x : x + patch]
    hr = hr[y * scale : (y + patch) * scale, x * scale : (x + patch) * scale]
    if t % 2:  # The same flip and quarter turns on both keep them aligned.
        lr, hr = lr[:, ::-1], hr[:, ::-1]
    return np.rot90(lr, t // 2), np.rot90(hr, t // 2)


def pair_batches(
    pairs: Sequence[Tuple[np.ndarray, np.ndarray]],
    *,
    scale: int,
    patch: int,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Dict[str, np.ndarray]]:
    """This process's share of each global batch from `start_step` on: {'lr', 'hr'} float32 in
    [0, 1], `hr` the served output's crop under the `patch` x `patch` LR crop."""
    if not pairs:
        raise ValueError(f'no (query, answer) pairs to train on; pass {QUERY_FLAG}=<images>')
    if global_batch % process_count:
        raise ValueError(
            f'global batch {global_batch} is not divisible by the process count {process_count}'
        )
    small = [lr.shape[:2] for lr, _ in pairs if min(lr.shape[:2]) < patch]
    if small:
        raise ValueError(
            f'{len(small)} query image(s) are smaller than the LR patch of {patch} pixels '
            f'(e.g. {small[0][0]}x{small[0][1]}); pass a smaller --config.patch or larger images'
        )
    for lr, hr in pairs:
        if hr.shape[:2] != (lr.shape[0] * scale, lr.shape[1] * scale):
            raise ValueError(f'an answer of shape {hr.shape} is not x{scale} its query {lr.shape}')
    local = global_batch // process_count
    step = start_step
    while True:
        # Global example index i = step * global_batch + j; this process takes its slice of j.
        first = step * global_batch + process_index * local
        crops = [_example(pairs, scale, patch, seed, i) for i in range(first, first + local)]
        yield {
            'lr': np.stack([c[0] for c in crops]).astype(np.float32) / 255.0,
            'hr': np.stack([c[1] for c in crops]).astype(np.float32) / 255.0,
        }
        step += 1


def check_budgets(budgets: Sequence[int]) -> Tuple[int, ...]:
    """`budgets` as a tuple, or a one-line error: each is a count >= 1, or 0 for all images."""
    budgets = tuple(budgets) if isinstance(budgets, (list, tuple)) else (budgets,)
    bad = [b for b in budgets if isinstance(b, bool) or not isinstance(b, (int, np.integer))]
    if bad or not budgets or min(budgets) < 0:
        raise ValueError(
            f'config.budgets={budgets!r}: each budget is a number of query images >= 1, or 0 for '
            f'all of them; e.g. --config.budgets="(1, 10, 100)"'
        )
    return budgets


def resolve_budgets(budgets: Sequence[int], available: int) -> List[int]:
    """Query budgets as image counts, ascending: 0 and any budget above `available` mean all of
    them (several such collapse into one)."""
    budgets = check_budgets(budgets)
    resolved = sorted({available if b == 0 or b > available else int(b) for b in budgets})
    if len(resolved) < len(budgets):
        logging.info('budgets %s with %d query images: %s', budgets, available, resolved)
    return resolved
