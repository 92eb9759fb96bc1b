"""Image classification data (CIFAR-10 by default): sources, training batches, evaluation batches.

Every source becomes one in-memory split of uint8 NHWC images and int32 labels (CIFAR-10 is 150 MB):
* `folder`: `<path>/<split>/<class>/*.jpg` (the ImageFolder layout; label = index of the class
    folder among the sorted folder names), or the tar files `<path>/<split>.tar` holding that layout
    (read member by member, no extraction). `path` may also name one such tar file.
* `tfds`: a prepared tfds dataset (`cifar10`); downloads only with `download=True`.
* `auto` (default): the folder at `path` when it exists, else a prepared tfds `name`, else a clear
    error naming --config.data.path.
Decoded folders and tars are cached as a .npz (under `cache_dir`, default ~/.cache/sr_purify), so a
second run loads in a fraction of a second.

Training batches (tf.data): example i of the run is a pure function of (seed, i): epoch i // N
visits a seeded permutation of the N images, then a random crop after 4-pixel zero padding and a
horizontal flip seeded by (seed, i). So the global batch of step t does not depend on the number of
processes (each takes its slice), and a run resumed at step t sees exactly the batches it would have
seen. Evaluation batches pad the last batch and carry a `mask`, so every example counts once.
"""

import dataclasses
import glob
import hashlib
import io
import logging
import os
import tarfile
from typing import Dict, Iterator, Optional, Sequence, Tuple

import ml_collections
import numpy as np

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png', '.bmp', '.webp')
SOURCES = ('auto', 'folder', 'tfds')
# Relative paths are tried from the working directory, then from the repository root, so the
# default '../shared/data/cifar10-jpeg' works from anywhere.
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class Split:
    images: np.ndarray  # uint8, (N, H, W, 3)
    labels: np.ndarray  # int32, (N,)
    class_names: Tuple[str, ...]
    source: str  # Where it came from, for logs and results.

    def __len__(self) -> int:
        return len(self.labels)

    def take(self, indices: np.ndarray) -> 'Split':
        return Split(self.images[indices], self.labels[indices], self.class_names, self.source)


# ---------------------------------------------------------------------------------------------
# Sources.


def _missing_message(path: str, extra: str = '') -> str:
    return (
        f'classification data {path!r} not found{extra}; pass --config.data.path=<folder with '
        f'<split>/<class>/*.jpg or <split>.tar> (e.g. ../shared/data/cifar10-jpeg), or '
        f'--config.data.source=tfds (with --config.data.data_dir=<dir> or '
        f'--config.data.download=True)'
    )


def resolve_path(path: str) -> Optional[str]:
    """`path` if it exists (relative to the working directory or the repository root), else None."""
    if not path:
        return None
    if os.path.exists(path):
        return os.path.abspath(path)
    if not os.path.isabs(path) and os.path.exists(os.path.join(_REPO_ROOT, path)):
        return os.path.join(_REPO_ROOT, path)
    return None


def _split_location(path: str, split: str) -> Tuple[str, str]:
    """('dir', <path>/<split>) or ('tar', <tar file>) for a split under `path`."""
    if os.path.isdir(path):
        if os.path.isdir(os.path.join(path, split)):
            return 'dir', os.path.join(path, split)
        if os.path.isfile(os.path.join(path, f'{split}.tar')):
            return 'tar', os.path.join(path, f'{split}.tar')
        raise FileNotFoundError(
            _missing_message(
                path, f' as a dataset: it has neither a {split}/ folder nor {split}.tar'
            )
        )
    if path.endswith('.tar') and os.path.isfile(path):
        # A tar named after another split stands for its folder: use the sibling <split>.tar.
        sibling = os.path.join(os.path.dirname(path), f'{split}.tar')
        return 'tar', sibling if os.path.isfile(sibling) else path
    raise FileNotFoundError(_missing_message(path, ' (neither a folder nor a .tar file)'))


def _decode(raw: bytes, name: str) -> np.ndarray:
    from PIL import Image  # Lazy: only folder sources need PIL.

    try:
        with Image.open(io.BytesIO(raw)) as im:
            return np.asarray(im.convert('RGB'))
    except Exception as e:  # PIL raises many types for damaged files.
        raise ValueError(f'cannot read image {name!r}: {type(e).__name__}: {e}') from None


def _stack(items: Sequence[Tuple[str, str, bytes]], where: str) -> Split:
    """(class, name, raw bytes) items -> Split; labels index the sorted class names."""
    if not items:
        raise FileNotFoundError(_missing_message(where, ': it holds no images'))
    class_names = tuple(sorted({c for c, _, _ in items}))
    index = {c: i for i, c in enumerate(class_names)}
    items = sorted(items, key=lambda t: (t[0], t[1]))
    images = [_decode(raw, name) for _, name, raw in items]
    shape = images[0].shape
    for im, (_, name, _) in zip(images, items):
        if im.shape != shape:
            raise ValueError(
                f'image {name!r} has shape {im.shape}, the first image of {where!r} '
                f'has {shape}; all images of a split must have one size'
            )
    labels = np.asarray([index[c] for c, _, _ in items], np.int32)
    return Split(np.stack(images), labels, class_names, where)


def _read_dir(directory: str) -> Split:
    """`<directory>/<class>/*` -> Split; class folders without images still take a label index."""
    classes = sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)))
    items = []
    for c in classes:
        for f in sorted(glob.glob(os.path.join(directory, c, '*'))):
            if f.lower().endswith(IMAGE_SUFFIXES):
                with open(f, 'rb') as fh:
                    items.append((c, f, fh.read()))
    split = _stack(items, directory)
    if split.class_names != tuple(classes):  # Empty class folders keep their index.
        split = _relabel(split, tuple(classes))
    return split


def _read_tar(tar_path: str, split: str) -> Split:
    """Members `[...]/<split>/<class>/<file>` (or `<class>/<file>`) of a tar file, in memory."""
    items = []
    with tarfile.open(tar_path) as tar:
        for m in tar:
            if not m.isfile() or not m.name.lower().endswith(IMAGE_SUFFIXES):
                continue
            parts = [p for p in m.name.split('/') if p not in ('', '.')]
            if len(parts) < 2 or (len(parts) >= 3 and parts[-3] != split):
                continue
            items.append((parts[-2], f'{tar_path}:{m.name}', tar.extractfile(m).read()))
    if not items:
        raise FileNotFoundError(
            _missing_message(tar_path, f': it has no images under {split}/<class>/')
        )
    return _stack(items, tar_path)


def _relabel(split: Split, class_names: Tuple[str, ...]) -> Split:
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([index[split.class_names[k]] for k in split.labels], np.int32)
    return Split(split.images, labels, class_names, split.source)


def _cache_dir(data: ml_collections.ConfigDict) -> str:
    if data.get('cache_dir', ''):
        return data.cache_dir
    base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
    return os.path.join(base, 'sr_purify')


def _fingerprint(kind: str, location: str) -> str:
    """Changes when the tar file or any file of the folder changes (path, size, mtime)."""
    h = hashlib.sha256(f'v1 {kind} {os.path.abspath(location)}'.encode())
    files = [location] if kind == 'tar' else sorted(glob.glob(os.path.join(location, '*', '*')))
    for f in files:
        st = os.stat(f)
        h.update(f'{f} {st.st_size} {st.st_mtime_ns}'.encode())
    return h.hexdigest()[:16]


def _load_folder(data: ml_collections.ConfigDict, path: str, split: str) -> Split:
    kind, location = _split_location(path, split)
    name = os.path.basename(os.path.normpath(location)).replace('.tar', '')
    cache = os.path.join(_cache_dir(data), f'{name}-{split}-{_fingerprint(kind, location)}.npz')
    if os.path.exists(cache):
        try:
            with np.load(cache) as z:
                return Split(
                    z['images'], z['labels'], tuple(str(c) for c in z['class_names']), location
                )
        except Exception as e:  # A damaged cache is rebuilt, never trusted.
            logging.warning('ignoring unreadable cache %s (%s)', cache, e)
    logging.info('decoding %s (cached afterwards in %s)', location, cache)
    result = _read_tar(location, split) if kind == 'tar' else _read_dir(location)
    result.source = location
    try:
        os.makedirs(os.path.dirname(cache), exist_ok=True)
        tmp = f'{cache}.tmp{os.getpid()}'
        with open(tmp, 'wb') as f:
            np.savez(
                f,
                images=result.images,
                labels=result.labels,
                class_names=np.asarray(result.class_names),
            )
        os.replace(tmp, cache)  # Atomic: a concurrent reader never sees half a file.
    except OSError as e:
        logging.warning(
            'could not write the data cache %s (%s); the next run decodes again', cache, e
        )
    return result


def _load_tfds(data: ml_collections.ConfigDict, split: str) -> Split:
    import tensorflow_datasets as tfds

    from sr_purify.sr_data import tfds_builder  # One tfds entry point for every dataset.

    builder = tfds_builder(data)
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    names = tuple(builder.info.features['label'].names)
    return Split(
        np.asarray(arrays['image'], np.uint8),
        np.asarray(arrays['label'], np.int32),
        names,
        f'tfds {data.name}/{split}',
    )


def _tfds_prepared(data: ml_collections.ConfigDict) -> bool:
    try:
        import tensorflow_datasets as tfds

        return tfds.builder(data.name, data_dir=data.get('data_dir', '') or None).is_prepared()
    except Exception:  # An unknown name or a broken install: treat as absent.
        return False


def source_of(data: ml_collections.ConfigDict) -> Tuple[str, Optional[str]]:
    """('folder', resolved path) or ('tfds', None); fails at once when neither is there."""
    if data.source not in SOURCES:
        raise ValueError(f'unknown data source {data.source!r}; valid: {", ".join(SOURCES)}')
    path = resolve_path(data.get('path', ''))
    if data.source == 'folder' or (data.source == 'auto' and path):
        if path is None:
            raise FileNotFoundError(_missing_message(data.get('path', '')))
        return 'folder', path
    if data.source == 'tfds' or _tfds_prepared(data):
        return 'tfds', None
    raise FileNotFoundError(
        _missing_message(data.get('path', ''), f' and tfds {data.name!r} is not prepared')
    )


def load_split(data: ml_collections.ConfigDict, split: str) -> Split:
    """The whole `split` ('train', 'test', ...) as uint8 images and int32 labels."""
    kind, path = source_of(data)
    return _load_folder(data, path, split) if kind == 'folder' else _load_tfds(data, split)


def subset(split: Split, count: int, seed: int) -> Split:
    """The first `count` examples of a seeded permutation (all of them, permuted, if count <= 0).

    Roughly class-balanced for a balanced split, and the same examples for every run with `seed`.
    """
    order = np.random.default_rng(seed).permutation(len(split))
    if count > 0:
        if count > len(split):
            raise ValueError(
                f'asked for {count} examples of {split.source!r}, which has {len(split)}'
            )
        order = order[:count]
    return split.take(order)


# ---------------------------------------------------------------------------------------------
# Batches.


# What each random number of an example is for; every purpose has a stream of its own.
PERMUTE, CROP, FLIP = 0, 1, 2
PURPOSES = (PERMUTE, CROP, FLIP)


def stream_seed(seed: int, purpose: int, index):
    """The stateless seed pair of (run seed, purpose, index): [seed * 3 + purpose, index].

    The index is the epoch for PERMUTE and the example for CROP and FLIP. The first word takes one
    value per (seed, purpose) and never another pair's (integer division by 3 gives both back),
    so two streams share a pair only when seed, purpose and index all match; TF mixes the pair
    through Philox, so distinct pairs give unrelated numbers. (The former [seed, e] and
    [seed, i] made epoch e's permutation share the crop seed of example e, and [seed + 1, i + 1]
    made example i's flip at seed 0 example i + 1's crop at seed 1.)
    """
    import tensorflow as tf

    first = tf.constant(seed * len(PURPOSES) + purpose, tf.int64)
    return tf.stack([first, tf.cast(index, tf.int64)])


def _check_split_of_batch(global_batch: int, process_count: int) -> int:
    if global_batch % process_count:
        raise ValueError(
            f'global batch {global_batch} is not divisible by the process count {process_count}'
        )
    return global_batch // process_count


def train_batches(
    split: Split,
    *,
    global_batch: int,
    seed: int,
    start_step: int = 0,
    process_index: int = 0,
    process_count: int = 1,
    pad: int = 4,
    flip: bool = True,
    prefetch: int = 2,
) -> Iterator[Dict[str, np.ndarray]]:
    """Yields this process's share of each global batch from `start_step` on, forever.

    Batches are {'image': float32 (B, H, W, 3) in [0, 1], 'label': int32 (B,)}.
    """
    import tensorflow as tf

    local = _check_split_of_batch(global_batch, process_count)
    n = len(split)
    if n < global_batch:
        raise ValueError(
            f'{n} training examples are fewer than one global batch of '
            f'{global_batch}; use a smaller batch or more data'
        )
    h, w = split.images.shape[1:3]
    bank = tf.constant(split.images)
    labels = tf.constant(split.labels)

    def epoch(e):
        # Epoch e visits the images in a permutation seeded by (seed, e).
        perm = tf.random.experimental.stateless_shuffle(
            tf.range(n, dtype=tf.int64), seed=stream_seed(seed, PERMUTE, e)
        )
        return tf.data.Dataset.from_tensor_slices((e * n + tf.range(n, dtype=tf.int64), perm))

    def example(i, index):
        image = bank[index]
        if pad:
            image = tf.pad(image, [[pad, pad], [pad, pad], [0, 0]])
            image = tf.image.stateless_random_crop(image, [h, w, 3], stream_seed(seed, CROP, i))
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, stream_seed(seed, FLIP, i))
        return {'image': tf.cast(image, tf.float32) / 255.0, 'label': labels[index]}

    first = start_step * global_batch
    ds = tf.data.Dataset.range(first // n, 2**62).flat_map(epoch).skip(first % n)
    # Example i sits at position i % global_batch of its global batch; keep this process's slice.
    ds = ds.filter(lambda i, _: (i % global_batch) // local == process_index)
    ds = ds.map(example, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(local, drop_remainder=True).prefetch(prefetch)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).as_numpy_iterator()


def eval_batches(
    split: Split, *, global_batch: int, process_index: int = 0, process_count: int = 1
) -> Iterator[Dict[str, np.ndarray]]:
    """This process's share of fixed-shape batches covering `split` once, in order.

    The last global batch is padded with zeros; `mask` is 1 for real examples, 0 for padding, so
    sum(mask * correct) / sum(mask) counts every example exactly once.
    """
    local = _check_split_of_batch(global_batch, process_count)
    n = len(split)
    total = -(-n // global_batch) * global_batch
    for start in range(0, total, global_batch):
        lo = start + process_index * local
        idx = np.arange(lo, lo + local)
        valid = idx < n
        safe = np.where(valid, idx, 0)
        images = np.where(valid[:, None, None, None], split.images[safe], 0)
        yield {
            'image': images.astype(np.float32) / 255.0,
            'label': np.where(valid, split.labels[safe], 0).astype(np.int32),
            'mask': valid.astype(np.float32),
        }
