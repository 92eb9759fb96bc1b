"""What a job leaves in its workdir: clu metrics, image grids, config.json, results.json, tables.

Only process 0 writes; the other processes get no-op writers. The workdir may be a local folder or
an object store URI (gs://bucket/run): every file goes through `paths.path` (etils.epath).
"""

import io
import json
import math
import os
import tempfile
from typing import Any, List, Mapping, Optional, Sequence

import jax
import ml_collections
import numpy as np
from clu import metric_writers

from sr_purify import paths


def is_writer() -> bool:
    return jax.process_index() == 0


def check_workdir(workdir: str) -> None:
    """Fails before any training if the workdir cannot be created or written."""
    # An object store raises its client's own errors (not OSError) for a missing bucket or
    # credentials; each is still the user's workdir that cannot be written.
    errors = Exception if paths.is_remote(workdir) else OSError
    try:
        root = paths.path(workdir)
        root.mkdir(parents=True, exist_ok=True)
        probe = root / f'.write_probe_{jax.process_index()}'
        probe.write_text('ok')
        probe.unlink()
    except errors as e:
        reason = getattr(e, 'strerror', None) or str(e).splitlines()[0][:200] or type(e).__name__
        raise PermissionError(
            f'workdir {workdir!r} is not writable ({reason}); pass a writable --workdir'
        ) from None


class _MirroredSummaryWriter(metric_writers.MetricWriter):
    """TensorBoard events written to a local folder and copied to `workdir` on every flush.

    For object-store workdirs: TensorFlow's own GCS client (which the plain summary writer
    uses) has a compiled-in endpoint and credentials of its own, so routing the event files
    through epath keeps one path layer for every file (and lets an emulator test them)."""

    def __init__(self, workdir: str):
        self._local = tempfile.mkdtemp(prefix='sr_purify_events_')
        self._inner = metric_writers.SummaryWriter(self._local)
        self._remote = paths.path(workdir)

    def _mirror(self) -> None:
        for name in os.listdir(self._local):
            paths.copy_tree(paths.path(os.path.join(self._local, name)), self._remote / name)

    def write_summaries(self, step, values, metadata=None):
        self._inner.write_summaries(step, values, metadata)

    def write_scalars(self, step, scalars):
        self._inner.write_scalars(step, scalars)

    def write_images(self, step, images):
        self._inner.write_images(step, images)

    def write_videos(self, step, videos):
        self._inner.write_videos(step, videos)

    def write_audios(self, step, audios, *, sample_rate):
        self._inner.write_audios(step, audios, sample_rate=sample_rate)

    def write_texts(self, step, texts):
        self._inner.write_texts(step, texts)

    def write_histograms(self, step, arrays, num_buckets=None):
        self._inner.write_histograms(step, arrays, num_buckets)

    def write_hparams(self, hparams):
        self._inner.write_hparams(hparams)

    def flush(self):
        self._inner.flush()
        self._mirror()

    def close(self):
        self._inner.close()
        self._mirror()


def create_writer(workdir: str) -> metric_writers.MetricWriter:
    """TensorBoard events + log lines on process 0, log lines only (no files) elsewhere."""
    if not is_writer() or not paths.is_remote(workdir):
        return metric_writers.create_default_writer(
            workdir, just_logging=not is_writer(), asynchronous=True
        )
    return metric_writers.AsyncMultiWriter(
        [metric_writers.LoggingWriter(), _MirroredSummaryWriter(workdir)]
    )


def write_json(workdir: str, name: str, obj: Any) -> Optional[str]:
    if not is_writer():
        return None
    path = paths.path(workdir) / name
    text = json.dumps(obj, indent=2, sort_keys=True, default=_json_default)
    if paths.is_remote(workdir):
        path.write_text(text)  # An object store's upload is atomic already.
    else:
        tmp = path.with_name(path.name + '.tmp')
        tmp.write_text(text)
        os.replace(tmp, path)  # Atomic: a reader never sees half a file.
    return os.fspath(path)


def read_json(path) -> Any:
    """The JSON file at `path` (local or object store)."""
    return json.loads(paths.path(path).read_text())


def _json_default(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, 'to_dict'):
        return x.to_dict()
    return str(x)


def write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
    write_json(workdir, 'config.json', config.to_dict())


def _deep_merge(base: dict, new: Mapping) -> dict:
    for k, v in new.items():
        if isinstance(v, Mapping) and isinstance(base.get(k), dict):
            _deep_merge(base[k], v)
        else:
            base[k] = v
    return base


def update_results(workdir: str, section: str, value: Any) -> None:
    """Deep-merges `{section: value}` into <workdir>/results.json (chained jobs add to one file)."""
    if not is_writer():
        return
    path = paths.path(workdir) / 'results.json'
    results = read_json(path) if path.exists() else {}
    _deep_merge(results, {section: value})
    write_json(workdir, 'results.json', results)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return f'{v:.3f}' if abs(v) < 1e4 else f'{v:.3g}'
        return str(v)

    lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
    lines += ['| ' + ' | '.join(fmt(v) for v in row) + ' |' for row in rows]
    return '\n'.join(lines)


def write_text(workdir: str, name: str, text: str) -> None:
    if is_writer():
        (paths.path(workdir) / name).write_text(text + '\n')


def image_grid(
    rows: Sequence[Sequence[np.ndarray]],
    pad: int = 2,
    labels: Sequence[str] = (),
    row_labels: Sequence[str] = (),
) -> np.ndarray:
    """Tiles HxWx3 float [0,1] (or uint8) images, each row padded to the widest/tallest tile.

    `labels` (one per column, from the left) adds a header strip above the first row and
    `row_labels` (one per row) a strip left of the tiles; text that does not fit is wrapped at
    spaces, then clipped. The tiles keep their place relative to each other: without labels the
    grid is exactly the unlabelled one, with them it sits below/right of the strips.
    """

    def u8(im):
        im = np.asarray(im)
        if im.ndim == 2:
            im = np.repeat(im[..., None], 3, -1)
        if im.dtype != np.uint8:
            im = np.round(np.clip(im, 0, 1) * 255).astype(np.uint8)
        return im

    rows = [[u8(im) for im in row] for row in rows]
    th = max(im.shape[0] for row in rows for im in row)
    tw = max(im.shape[1] for row in rows for im in row)
    ncols = max(len(row) for row in rows)
    grid = np.full((len(rows) * (th + pad) + pad, ncols * (tw + pad) + pad, 3), 255, np.uint8)
    for r, row in enumerate(rows):
        for c, im in enumerate(row):
            y, x = pad + r * (th + pad), pad + c * (tw + pad)
            grid[y : y + im.shape[0], x : x + im.shape[1]] = im
    if not labels and not row_labels:
        return grid
    if len(labels) > ncols or len(row_labels) > len(rows):
        raise ValueError(
            f'{len(labels)} labels for {ncols} columns / {len(row_labels)} row labels for '
            f'{len(rows)} rows'
        )
    return _add_labels(grid, labels, row_labels, th, tw, pad)


_LABEL_MARGIN = 3  # Pixels between a label and the edge of its strip.
_ROW_LABEL_MAX_W = 120  # A long purifier name wraps rather than pushing the tiles far right.
_WORD_GAP = '  '  # The default font's space is 2 px: at size 10 single-spaced words run together.


def _fit_lines(text: str, width: int, measure, max_lines: int) -> List[str]:
    """Greedy word wrap to `width` pixels; a word (or the last line) too long is clipped, with
    '..' where that fits, so a label does not spill into its neighbour. At least one character
    stays: on a tile narrower than a glyph an initial still tells the columns apart."""

    def clip(s):
        if measure(s) <= width:
            return s
        for end in ('..', ''):
            for n in range(len(s) - 1, 0, -1):
                if measure(s[:n] + end) <= width:
                    return s[:n] + end
        return s[:1]

    lines: List[str] = []
    for word in text.split():
        if lines and measure(lines[-1] + _WORD_GAP + word) <= width:
            lines[-1] += _WORD_GAP + word
        else:
            lines.append(word)
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [_WORD_GAP.join(lines[max_lines - 1 :])]
    return [clip(line) for line in lines]


def _add_labels(grid, labels, row_labels, th, tw, pad):
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    measure = lambda s: font.getlength(s)
    asc, desc = font.getmetrics()
    line_h = asc + desc
    m = _LABEL_MARGIN
    # Tiles can be tall (SR crops) but header text stays short: at most 3 lines per label.
    col_lines = [_fit_lines(t, tw, measure, 3) for t in labels]
    header_h = (max(map(len, col_lines), default=0) * line_h + 2 * m) if labels else 0
    strip_w = 0
    if row_labels:
        widest = max((measure(_WORD_GAP.join(t.split())) for t in row_labels), default=0)
        strip_w = math.ceil(min(widest, _ROW_LABEL_MAX_W)) + 2 * m  # Up: no 1 px clip.
    row_lines = [_fit_lines(t, strip_w - 2 * m, measure, max(th // line_h, 1)) for t in row_labels]

    h, w = grid.shape[:2]
    img = Image.new('RGB', (w + strip_w, h + header_h), 'white')
    img.paste(Image.fromarray(grid), (strip_w, header_h))
    draw = ImageDraw.Draw(img)
    for c, lines in enumerate(col_lines):
        cx = strip_w + pad + c * (tw + pad) + tw / 2
        for i, line in enumerate(lines):
            draw.text((cx, m + i * line_h), line, fill='black', font=font, anchor='ma')
    for r, lines in enumerate(row_lines):
        cy = header_h + pad + r * (th + pad) + th / 2 - len(lines) * line_h / 2
        for i, line in enumerate(lines):
            draw.text((m, cy + i * line_h), line, fill='black', font=font, anchor='la')
    return np.array(img)  # A writable copy, like the unlabelled grid.


def write_grid(
    workdir: str,
    name: str,
    grid: np.ndarray,
    writer: Optional[metric_writers.MetricWriter] = None,
    step: int = 0,
) -> None:
    """PNG in the workdir and, given a writer, a TensorBoard image."""
    if not is_writer():
        return
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(grid).save(buffer, format='PNG')
    (paths.path(workdir) / name).write_bytes(buffer.getvalue())
    if writer is not None:
        writer.write_images(step, {os.path.splitext(name)[0]: grid[None]})


def nearest_upscale(img: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Pixel-replicating resize so small LR tiles line up with HR tiles in a grid."""
    h, w = img.shape[:2]
    ys = (np.arange(size[0]) * h // size[0]).clip(0, h - 1)
    xs = (np.arange(size[1]) * w // size[1]).clip(0, w - 1)
    return img[ys][:, xs]


def log_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    table = markdown_table(header, rows)
    if is_writer():
        print(f'\n{title}\n{table}\n', flush=True)
    return table
