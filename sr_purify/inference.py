"""Upscaling whole images with a trained SR network: tiled, any size, any common layout.

`upscale_array` runs an SR `apply` (float32 (1, h, w, 3) in [0, 1] -> (1, h*s, w*s, 3)) over an
image of any size in fixed-shape overlapping tiles, so memory stays bounded and a jitted apply
compiles once. It takes gray, RGB or RGBA images, uint8 or float, and returns the same layout.
`upscale_files` does that for image files (a file, a folder or a glob) and writes PNGs.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from typing import Callable

import numpy as np
from PIL import Image, ImageOps
from tqdm import tqdm

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = ('.png', '.jpg', '.jpeg', '.bmp', '.webp', '.tif', '.tiff')

# A model's apply: float32 (1, h, w, 3) in [0, 1] -> (1, h*scale, w*scale, 3), jax or numpy.
Apply = Callable[[np.ndarray], np.ndarray]


# ---------------------------------------------------------------------------
# Tiling
# ---------------------------------------------------------------------------


def _axis_windows(n: int, tile: int, overlap: int) -> tuple[int, list[tuple[int, int, int]]]:
    """Splits one axis of length `n` into cores of `tile` pixels, each inside a fixed-size window.

    Returns (window size, [(core_start, core_end, window_start)]). The window is the core plus
    `overlap` pixels of context on each side, clamped to `n`; at the borders it is shifted to stay
    inside the image rather than padded, so every window has the same size (one compilation) and
    the network only sees zero padding where the whole-image run sees it too.
    """
    size = n if tile <= 0 else min(tile + 2 * overlap, n)
    if size == n:  # one window covers the axis: more cores would only recompute it
        return n, [(0, n, 0)]
    windows = []
    for start in range(0, n, tile):
        end = min(start + tile, n)
        windows.append((start, end, min(max(start - overlap, 0), n - size)))
    return size, windows


def count_tiles(h: int, w: int, tile: int = 128, overlap: int = 16) -> int:
    """How many tiles `upscale_array` runs on an h x w image (to size a progress bar)."""
    return len(_axis_windows(h, tile, overlap)[1]) * len(_axis_windows(w, tile, overlap)[1])


def _call(apply: Apply, xs: np.ndarray, scale: int) -> np.ndarray:
    """apply on NHWC float32 tiles -> their NHWC float32 outputs, with the shape checked."""
    ys = np.asarray(apply(xs), dtype=np.float32)
    n, h, w, _ = xs.shape
    if ys.shape != (n, h * scale, w * scale, 3):
        raise ValueError(
            f'apply returned shape {ys.shape} for input {xs.shape}, expected '
            f"{(n, h * scale, w * scale, 3)}; is scale={scale} the model's scale?"
        )
    return ys


def _run_tiles(apply: Apply, xs: np.ndarray, scale: int, self_ensemble: bool) -> np.ndarray:
    """NHWC float32 tiles through apply in one call, optionally with EDSR+ self-ensemble."""
    if not self_ensemble:
        return _call(apply, xs, scale)
    # The 8 dihedral transforms (4 rotations, each with and without a flip) of every tile, one
    # call each; each output is mapped back by the inverse transform. On non-square tiles the
    # odd rotations transpose them, so a jitted apply compiles for two shapes. Summing in
    # float64 is exact for 8 float32 terms, so an equivariant apply gives exactly the plain
    # result.
    n, h, w, _ = xs.shape
    total = np.zeros((n, h * scale, w * scale, 3), np.float64)
    for k in range(4):
        for flip in (False, True):
            t = np.rot90(xs, k, axes=(1, 2))
            t = t[:, :, ::-1] if flip else t
            ys = _call(apply, np.ascontiguousarray(t), scale)
            ys = ys[:, :, ::-1] if flip else ys
            total += np.rot90(ys, -k, axes=(1, 2))
    return (total / 8).astype(np.float32)


def _upscale_alpha(alpha: np.ndarray, scale: int) -> np.ndarray:
    # PIL's bicubic (a = -0.5, as MATLAB's) works in place on one plane, unlike image_ops.imresize
    # whose dense weight matrices grow with the square of the image side. It renormalises at the
    # borders where MATLAB mirrors, so the two differ by up to 2 levels in the outer 2 pixels.
    h, w = alpha.shape
    if alpha.dtype == np.uint8:
        return np.asarray(Image.fromarray(alpha, 'L').resize((w * scale, h * scale), Image.BICUBIC))
    plane = Image.fromarray(alpha.astype(np.float32), 'F')
    return np.clip(np.asarray(plane.resize((w * scale, h * scale), Image.BICUBIC)), 0.0, 1.0)


def upscale_array(
    apply: Apply,
    image: np.ndarray,
    scale: int,
    tile: int = 128,
    overlap: int = 16,
    self_ensemble: bool = False,
    progress=None,
    batch: int = 1,
) -> np.ndarray:
    """Upscales one image by `scale` with `apply`, in overlapping tiles.

    `image`: HxW (gray), HxWx1, HxWx3 (RGB) or HxWx4 (RGBA); uint8 (0..255) or float in [0, 1].
    Returns the same layout at (H*scale, W*scale), uint8 (rounded) for uint8 input and float32
    clipped to [0, 1] for float input. Gray goes through the network as three equal channels and
    comes back as their mean; the alpha of RGBA is upscaled by bicubic, not by the network.

    Tiles are `tile` x `tile` LR pixels (tile <= 0: the whole image at once) run with `overlap`
    LR pixels of context on each side, of which only the centre is kept. Once the overlap covers
    the network's receptive field the result equals the whole-image one up to float rounding:
    the default 16 covers small students (a 2-block EDSR sees 7 LR convs + 1 HR conv: ~8 LR
    pixels); a 16-block EDSR teacher sees ~36, so give it overlap >= 36 for an exact match.
    `self_ensemble`: EDSR+ (average over the 8 flips / rotations of each tile; 8x the compute).
    `progress`: None, a tqdm bar (`.update(1)` per tile) or a callable given the tiles done.
    `batch`: tiles per call of apply, at most the image's tile count (every window has the same
    size; the last call is padded by repeating a tile, so apply sees one shape). More than one
    lets an apply that splits its batch over devices run tiles side by side (`api.load_sr`'s
    does, over the local devices).
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        to_float = lambda a: a.astype(np.float32) / 255.0
        out_dtype = np.uint8
    elif np.issubdtype(image.dtype, np.floating):
        to_float = lambda a: a.astype(np.float32)
        out_dtype = np.float32
    else:
        raise ValueError(f'expected a uint8 or float image, got dtype {image.dtype}')
    if image.ndim == 3 and image.shape[-1] == 1:  # HxWx1: gray, with its channel axis kept
        out = upscale_array(
            apply, image[..., 0], scale, tile, overlap, self_ensemble, progress, batch
        )
        return out[..., None]
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[-1] in (3, 4))):
        raise ValueError(f'expected an HxW, HxWx3 or HxWx4 image, got shape {image.shape}')
    if overlap < 0:
        raise ValueError(f'overlap must be >= 0, got {overlap}')
    if batch < 1:
        raise ValueError(f'batch must be >= 1, got {batch}')
    gray = image.ndim == 2
    rgb = image[..., None] if gray else image[..., :3]  # gray: broadcast to 3 channels per tile
    h, w = image.shape[:2]
    win_h, rows = _axis_windows(h, tile, overlap)
    win_w, cols = _axis_windows(w, tile, overlap)

    # Only the output is held at full size (uint8 when the input is, 4x smaller than float32);
    # each tile's result is written into it and dropped. RGBA's alpha plane is filled at the end.
    out = np.empty((h * scale, w * scale) + (() if gray else (image.shape[-1],)), out_dtype)
    colour = out if gray else out[..., :3]  # a view: writing into it fills out
    windows = [(r, c) for r in rows for c in cols]
    batch = min(batch, len(windows))  # a small image is not padded up to the batch
    done = 0
    for i in range(0, len(windows), batch):
        group = windows[i : i + batch]
        xs = np.stack([rgb[wr : wr + win_h, wc : wc + win_w] for (_, _, wr), (_, _, wc) in group])
        xs = to_float(np.repeat(xs, 3, axis=-1) if gray else xs)
        if len(group) < batch:  # pad the last call to the same shape (one compilation)
            xs = np.concatenate([xs, np.repeat(xs[-1:], batch - len(group), axis=0)])
        ys = _run_tiles(apply, xs, scale, self_ensemble)
        for ((r0, r1, wr), (c0, c1, wc)), y in zip(group, ys):
            # Keep the core: drop the context margins (none at the image borders).
            y = y[(r0 - wr) * scale : (r1 - wr) * scale, (c0 - wc) * scale : (c1 - wc) * scale]
            y = np.clip(y, 0.0, 1.0)
            if gray:
                y = y.mean(axis=-1)
            if out_dtype == np.uint8:
                y = np.round(y * 255.0)
            colour[r0 * scale : r1 * scale, c0 * scale : c1 * scale] = y
            done += 1
            if hasattr(progress, 'update'):  # a tqdm bar
                progress.update(1)
            elif progress is not None:
                progress(done)

    if image.ndim == 3 and image.shape[-1] == 4:
        out[..., 3] = _upscale_alpha(image[..., 3], scale)
    return out


# ---------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------


def _is_image(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(IMAGE_SUFFIXES)


def list_inputs(spec) -> list[str]:
    """Image paths for `spec`: an image file, a folder (its images, sorted, not recursive), a glob.

    A list or tuple of specs (as a shell expands `photos/*.jpg`) is their concatenation, without
    duplicates. Raises FileNotFoundError when a spec yields no image.
    """
    if isinstance(spec, (list, tuple)):
        return list(dict.fromkeys(p for s in spec for p in list_inputs(s)))
    spec = os.fspath(spec)
    suffixes = ', '.join(IMAGE_SUFFIXES)
    hint = "pass an image file, a folder of images or a glob such as 'photos/*.jpg'"
    if os.path.isdir(spec):
        names = sorted(os.listdir(spec))
        paths = [p for p in (os.path.join(spec, n) for n in names) if _is_image(p)]
        if not paths:
            raise FileNotFoundError(f'no images ({suffixes}) in folder {spec!r}; {hint}')
        return paths
    if os.path.isfile(spec):  # named explicitly: taken whatever its suffix, read_image judges
        return [spec]
    if glob.has_magic(spec):
        paths = [p for p in sorted(glob.glob(spec)) if _is_image(p)]
        if not paths:
            raise FileNotFoundError(f'no images ({suffixes}) match the pattern {spec!r}; {hint}')
        return paths
    raise FileNotFoundError(f'no such file or folder: {spec!r}; {hint}')


def read_image(path) -> np.ndarray:
    """An image file as uint8: HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA when it has transparency).

    EXIF orientation is applied (phone photos). 16-bit gray is scaled to 8 bits; palette, CMYK and
    other modes become RGB. Raises ValueError naming the file when PIL cannot read it.
    """
    try:
        with Image.open(path) as img:
            img = ImageOps.exif_transpose(img)
            img.load()
    except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
        # SyntaxError: some PIL plugins raise it on malformed headers.
        raise ValueError(f'cannot read image {os.fspath(path)!r}: {e}') from e
    if img.mode in ('I;16', 'I;16L', 'I;16B', 'I'):
        # 16-bit gray: PIL's convert('L') would clip at 255 rather than rescale.
        return np.round(np.clip(np.asarray(img, np.float64), 0, 65535) / 257.0).astype(np.uint8)
    if img.mode in ('L', '1') and 'transparency' not in img.info:
        return np.asarray(img.convert('L'))
    if img.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in img.info:
        return np.asarray(img.convert('RGBA'))
    return np.asarray(img.convert('RGB'))


def write_png(path, array: np.ndarray) -> None:
    """Writes a uint8 HxW (gray), HxWx3 (RGB) or HxWx4 (RGBA) array as PNG.

    Float arrays in [0, 1] are rounded to uint8 first.
    """
    array = np.asarray(array)
    if array.dtype != np.uint8:
        array = np.round(np.clip(array, 0.0, 1.0) * 255.0).astype(np.uint8)
    modes = {2: 'L', 3: 'RGB', 4: 'RGBA'}
    mode = modes.get(array.ndim if array.ndim == 2 else array.shape[-1])
    if mode is None or array.ndim not in (2, 3):
        raise ValueError(f'expected an HxW, HxWx3 or HxWx4 image, got shape {array.shape}')
    Image.fromarray(array, mode).save(path, format='PNG')


def output_name(path, scale: int) -> str:
    """'photos/cat.jpg', 2 -> 'cat_x2.png'."""
    stem = os.path.splitext(os.path.basename(os.fspath(path)))[0]
    return f'{stem}_x{scale}.png'


def _tiles_in_file(path: str, tile: int, overlap: int) -> int:
    # Image.open reads only the header, so sizing the progress bar costs no decoding.
    try:
        with Image.open(path) as img:
            w, h = img.size
    except Exception:  # unreadable: read_image reports it properly later
        return 0
    return count_tiles(h, w, tile, overlap)


def upscale_files(
    apply: Apply,
    inputs,
    out_dir,
    scale: int,
    tile: int = 128,
    overlap: int = 16,
    self_ensemble: bool = False,
    show_progress: bool = True,
    batch: int = 1,
) -> dict:
    """Upscales every image of `inputs` (see list_inputs) into `out_dir`/<stem>_x<scale>.png.

    A file that cannot be read is logged, skipped and reported; so is one whose output name was
    already written in this run (cat.jpg after cat.png). One progress bar (with ETA) counts the
    tiles of all images. Returns {'written': [paths], 'skipped': [(path, reason)], 'seconds'}.
    """
    start = time.perf_counter()
    paths = list_inputs(inputs)
    os.makedirs(out_dir, exist_ok=True)
    counts = [_tiles_in_file(p, tile, overlap) for p in paths]
    written, skipped = [], []
    with tqdm(total=sum(counts), unit='tile', disable=not show_progress) as bar:
        for path, count in zip(paths, counts):
            out_path = os.path.join(os.fspath(out_dir), output_name(path, scale))
            reason = None
            if out_path in written:
                reason = f'its output {out_path!r} was already written from another input'
            else:
                try:
                    image = read_image(path)
                except ValueError as e:
                    reason = str(e)
            if reason is not None:
                logger.warning('skipping %s: %s', path, reason)
                skipped.append((path, reason))
                bar.update(count)  # keep the ETA honest
                continue
            bar.set_postfix_str(os.path.basename(path))
            write_png(
                out_path,
                upscale_array(apply, image, scale, tile, overlap, self_ensemble, bar, batch),
            )
            written.append(out_path)
    return {'written': written, 'skipped': skipped, 'seconds': time.perf_counter() - start}
