"""SR input pipeline (tf.data) and evaluation images.

Training batches are dicts of float32 NHWC arrays in [0, 1]: `hr` random crops of
`patch * scale` pixels with flips and 90-degree rotations, and `lr` made from them on the fly by
antialiased bicubic downscaling, rounded to 8 bits as a saved LR image would be.

Two kinds of source:
* in memory (`embedded` photos from scikit-image, or a `folder` of images): example i of the whole
    run is a pure function of (seed, i), so the global batch of step t is the same whatever the
    number of processes, and a resumed run sees exactly the batches it would have seen;
* streaming (`tfds`, e.g. DIV2K): each process reads its own share (`tfds.split_for_jax_process`),
    shuffled with a seed that folds in the start step.
"""

import glob
import logging
import os
from typing import Dict, Iterator, List, Sequence, Tuple

import ml_collections
import numpy as np
import tensorflow as tf

from sr_purify import registry
from sr_purify.image_ops import Image, check_scale  # noqa: F401  (part of this module's API)

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp')

# Held-out photos never used for training on the embedded default.
EMBEDDED_TRAIN = (
    'astronaut',
    'rocket',
    'hubble_deep_field',
    'immunohistochemistry',
    'retina',
    'stereo_motorcycle',
)
EMBEDDED_EVAL = ('chelsea', 'coffee')


# ---------------------------------------------------------------------------------------------
# Loading whole images (host side).


def _embedded(split: str) -> List[Image]:
    import skimage.data  # Imported lazily: only the embedded source needs it.

    names = registry.lookup(
        {'train': EMBEDDED_TRAIN, 'eval': EMBEDDED_EVAL}, split, 'embedded split'
    )
    images = []
    for name in names:
        pixels = getattr(skimage.data, name)()
        if isinstance(pixels, tuple):  # stereo_motorcycle returns (left, right, disparity).
            pixels = pixels[0]
        images.append(Image(name, np.asarray(pixels, np.uint8)))
    return images


def list_image_files(path: str) -> List[str]:
    """Image files under `path`: `<path>/HR/*` if it exists (benchmark layout), else `<path>/*`."""
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f'image folder {path!r} does not exist; pass an existing folder of images, e.g. '
            f'--config.data.path=../shared/data/sr_benchmarks/Set5'
        )
    root = os.path.join(path, 'HR') if os.path.isdir(os.path.join(path, 'HR')) else path
    files = sorted(
        f for f in glob.glob(os.path.join(root, '*')) if f.lower().endswith(IMAGE_SUFFIXES)
    )
    if not files:
        raise FileNotFoundError(f'no images ({", ".join(IMAGE_SUFFIXES)}) in {root!r}')
    return files


def read_image(path: str, keep_gray: bool = False) -> np.ndarray:
    """An image file as uint8 HxWx3 (HxW if gray and keep_gray); names the file on failure."""
    from PIL import Image as PILImage  # Lazy: PIL is only needed for folders.

    try:
        with PILImage.open(path) as im:
            im.load()
            if im.mode in ('L', 'I;16', 'I') and keep_gray:
                return np.asarray(im.convert('L'))
            return np.asarray(im.convert('RGB'))
    except Exception as e:  # PIL raises many types for damaged files.
        raise ValueError(
            f'cannot read image {path!r}: {type(e).__name__}: {e} '
            f'(set config.data.skip_bad=True to skip unreadable files)'
        ) from None


def _folder(path: str, skip_bad: bool = False, keep_gray: bool = False) -> List[Image]:
    images, bad = [], []
    for f in list_image_files(path):
        try:
            images.append(Image(os.path.splitext(os.path.basename(f))[0], read_image(f, keep_gray)))
        except ValueError:
            if not skip_bad:
                raise
            bad.append(f)
    if bad:
        logging.warning('skipped %d unreadable image(s) in %s: %s', len(bad), path, bad)
    if not images:
        raise FileNotFoundError(f'no readable images in {path!r}')
    return images


def load_images(data: ml_collections.ConfigDict, split: str) -> List[Image]:
    """Whole images of an in-memory source (`embedded` or `folder`)."""
    if data.source == 'embedded':
        return _embedded(split)
    if data.source == 'folder':
        path = data.path if split == 'train' else data.get('eval_path', None) or data.path
        return _folder(path, data.get('skip_bad', False), keep_gray=(split != 'train'))
    raise ValueError(f'source {data.source!r} has no in-memory images; valid: embedded, folder')


def eval_images(spec: str, skip_bad: bool = False) -> Tuple[str, List[Image]]:
    """Evaluation images from a spec: 'embedded' (held-out photos) or a folder path.

    Grayscale files stay 2-D so they are scored on their gray value, as the MATLAB scripts do.
    """
    if spec == 'embedded':
        return 'embedded', _embedded('eval')
    name = os.path.basename(os.path.normpath(spec))
    return name, _folder(spec, skip_bad, keep_gray=True)


# ---------------------------------------------------------------------------------------------
# Training examples (in the tf.data graph).

# What each random number of an example is for; every purpose has a stream of its own.
CHOOSE, CROP, AUGMENT = 0, 1, 2
PURPOSES = (CHOOSE, CROP, AUGMENT)


def stream_seed(seed: int, purpose: int, index) -> tf.Tensor:
    """The stateless seed pair of (run seed, purpose, example index): [seed * 3 + purpose, index].

    The first word takes one value per (seed, purpose) and never another pair's (integer division
    by 3 gives both back), so two streams share a pair only when seed, purpose and index all
    match; TF mixes the pair through Philox, so distinct pairs give unrelated numbers. (Adding 1
    or 2 to both words of [seed, i] made example i's crop at seed 0 example i + 1's image
    choice at seed 1.)
    """
    first = tf.constant(seed * len(PURPOSES) + purpose, tf.int64)
    return tf.stack([first, tf.cast(index, tf.int64)])


def _augment(hr: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    """Random horizontal flip and 0-3 quarter turns (the 8 dihedral transforms)."""
    bits = tf.random.stateless_uniform([2], seed, 0, 8, dtype=tf.int32)
    hr = tf.cond(bits[0] % 2 == 1, lambda: tf.image.flip_left_right(hr), lambda: hr)
    return tf.image.rot90(hr, k=bits[1] % 4)


def _make_pair(hr: tf.Tensor, scale: int, patch: int) -> Dict[str, tf.Tensor]:
    """HR uint8 patch -> float pair; LR by antialiased bicubic, rounded to 8 bits."""
    hr = tf.cast(hr, tf.float32)
    lr = tf.image.resize(hr, [patch, patch], method='bicubic', antialias=True)
    lr = tf.round(tf.clip_by_value(lr, 0.0, 255.0))
    return {'lr': lr / 255.0, 'hr': hr / 255.0}


class _ImageBank:
    """All training images flattened into one constant buffer so the graph can crop any of them."""

    def __init__(self, images: Sequence[Image], hr_patch: int):
        small = [im.name for im in images if min(im.pixels.shape[:2]) < hr_patch]
        if small:
            raise ValueError(
                f'image(s) {small} are smaller than the HR crop of {hr_patch} pixels; '
                f'use a smaller config.data.patch or drop them'
            )
        flats = [np.ascontiguousarray(im.pixels).reshape(-1) for im in images]
        self.offsets = tf.constant(np.cumsum([0] + [f.size for f in flats[:-1]]), tf.int64)
        self.shapes = tf.constant([im.pixels.shape[:2] for im in images], tf.int64)
        self.buffer = tf.constant(np.concatenate(flats))
        self.count = len(images)

    def crop(self, index: tf.Tensor, seed: int, size: int) -> tf.Tensor:
        """A random `size` crop of a random image: example `index` of the run seeded `seed`."""
        choose = stream_seed(seed, CHOOSE, index)
        k = tf.random.stateless_uniform([], choose, 0, self.count, dtype=tf.int64)
        h, w = self.shapes[k][0], self.shapes[k][1]
        image = tf.reshape(self.buffer[self.offsets[k] : self.offsets[k] + h * w * 3], [h, w, 3])
        corner = stream_seed(seed, CROP, index)
        top_left = tf.random.stateless_uniform([2], corner, 0, 2**31 - 1, dtype=tf.int64)
        y, x = top_left[0] % (h - size + 1), top_left[1] % (w - size + 1)
        return image[y : y + size, x : x + size]


def sr_train_batches(
    data: ml_collections.ConfigDict,
    *,
    scale: int,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
) -> Iterator[Dict[str, np.ndarray]]:
    """Yields this process's share of each global training batch, from `start_step` on."""
    check_scale(scale)
    if global_batch % process_count:
        raise ValueError(
            f'global batch {global_batch} is not divisible by the process count {process_count}'
        )
    local = global_batch // process_count
    hr_patch = data.patch * scale
    if data.source == 'tfds':
        ds = _tfds_hr_patches(data, hr_patch, seed, start_step, process_index, process_count)
    else:
        bank = _ImageBank(load_images(data, 'train'), hr_patch)

        def example(i):
            hr = bank.crop(i, seed, hr_patch)
            return _augment(hr, stream_seed(seed, AUGMENT, i))

        # Global example index i = step * global_batch + j; this process takes its slice of j.
        ds = tf.data.Dataset.range(start_step, 2**62).flat_map(
            lambda step: tf.data.Dataset.range(
                step * global_batch + process_index * local,
                step * global_batch + (process_index + 1) * local,
            )
        )
        ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.map(
        lambda hr: _make_pair(hr, scale, data.patch),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    ds = ds.batch(local, drop_remainder=True).prefetch(data.get('prefetch', 2))
    options = tf.data.Options()
    options.deterministic = True
    ds = ds.with_options(options)
    return ds.as_numpy_iterator()


def _tfds_hr_patches(data, hr_patch, seed, start_step, process_index, process_count):
    """Random HR crops from a tfds SR dataset (feature 'hr'), this process's share."""
    import tensorflow_datasets as tfds

    builder = tfds_builder(data)
    split = tfds.split_for_jax_process(
        data.get('split', 'train'), process_index=process_index, process_count=process_count
    )
    ds = builder.as_dataset(
        split=split, shuffle_files=True, read_config=tfds.ReadConfig(shuffle_seed=seed + start_step)
    )
    ds = ds.map(lambda ex: ex['hr'], num_parallel_calls=tf.data.AUTOTUNE)
    if data.get('cache', False):
        ds = ds.cache()
    ds = ds.repeat().shuffle(data.get('shuffle_buffer', 64), seed=seed + start_step)

    def crop(i, hr):  # Streamed examples have no global index: number them from start_step.
        index = start_step + i
        hr = tf.image.stateless_random_crop(
            hr, [hr_patch, hr_patch, 3], stream_seed(seed, CROP, index)
        )
        return _augment(hr, stream_seed(seed, AUGMENT, index))

    return ds.enumerate().map(crop, num_parallel_calls=tf.data.AUTOTUNE)


def tfds_builder(data: ml_collections.ConfigDict):
    """A prepared tfds builder, or a clear error at once (no minutes of offline retries)."""
    import tensorflow_datasets as tfds

    builder = tfds.builder(data.name, data_dir=data.get('data_dir', '') or None)
    if not builder.is_prepared():
        if not data.get('download', False):
            raise FileNotFoundError(
                f'tfds dataset {data.name!r} is not prepared in {builder.data_dir!r}; pass '
                f'--config.data.data_dir=<dir with it> or --config.data.download=True, or use an '
                f'image folder: --config.data.source=folder --config.data.path=<folder>'
            )
        builder.download_and_prepare()
    return builder


def describe(data: ml_collections.ConfigDict) -> str:
    return {
        'embedded': 'scikit-image photos',
        'folder': f'folder {data.get("path")}',
        'tfds': f'tfds {data.get("name")}',
    }.get(data.source, data.source)
