"""SR quality and cost by the field's convention.

For each HR image: mod-crop to the scale, LR = MATLAB-style antialiased bicubic downscale (uint8),
SR = model(LR), quantised to 8 bits; PSNR and SSIM on the Y channel (BT.601) with `scale` pixels
shaved at each border. Bicubic upscaling of the same LR is scored alongside. A grayscale HR image
is scored on its gray value: the model sees it replicated to RGB and its output's channel mean is
the gray prediction.
"""

import time
from typing import Callable, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sr_purify import image_ops
from sr_purify.image_ops import Image
from sr_purify.models import parameter_count

# apply(lr) -> sr, both NHWC float in [0, 1]; jitted by the caller (compiled once per shape).
SRFn = Callable[[jax.Array], jax.Array]

# Cost is reported for a 1280x720 output, as the efficient-SR literature (NTIRE) does.
COST_OUTPUT_HW = (720, 1280)


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    return image_ops.imresize(image_ops.modcrop(hr, scale), 1.0 / scale)


def upscale(apply: SRFn, lr: np.ndarray) -> np.ndarray:
    """uint8 LR (HxW or HxWx3) -> float SR in [0, 1] of the same layout."""
    gray = lr.ndim == 2
    x = np.repeat(lr[..., None], 3, -1) if gray else lr
    sr = np.asarray(apply(jnp.asarray(x[None], jnp.float32) / 255.0))[0]
    return sr.mean(-1) if gray else sr


def evaluate_images(
    apply: Optional[SRFn], images: Sequence[Image], scale: int
) -> Dict[str, object]:
    """Mean PSNR/SSIM of bicubic and (if given) of the model, plus per-image numbers."""
    rows = []
    for im in images:
        hr = image_ops.modcrop(im.pixels, scale)
        lr = make_lr(hr, scale)
        bic = image_ops.imresize(lr, scale)
        row = {
            'name': im.name,
            'bicubic_psnr': image_ops.psnr(bic, hr, scale),
            'bicubic_ssim': image_ops.ssim(bic, hr, scale),
        }
        if apply is not None:
            sr = upscale(apply, lr)
            row['psnr'] = image_ops.psnr(sr, hr, scale)
            row['ssim'] = image_ops.ssim(sr, hr, scale)
        rows.append(row)
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0] if k != 'name'}
    out['images'] = rows
    return out


def sample_grid_rows(
    apply: SRFn,
    images: Sequence[Image],
    scale: int,
    others: Sequence[SRFn] = (),
    crop: int = 96,
    count: int = 2,
) -> List[List[np.ndarray]]:
    """Rows of LR (pixel-replicated) | bicubic | model | *others | HR, centre crops."""
    from sr_purify.reporting import nearest_upscale

    rows = []
    for im in images[:count]:
        if im.pixels.ndim == 2:
            continue
        hr = image_ops.modcrop(im.pixels, scale)
        h, w = hr.shape[:2]
        c = min(crop * scale, h, w) // scale * scale
        y0, x0 = (h - c) // 2 // scale * scale, (w - c) // 2 // scale * scale
        hr = hr[y0 : y0 + c, x0 : x0 + c]
        lr = make_lr(hr, scale)
        row = [nearest_upscale(lr, hr.shape[:2]), image_ops.imresize(lr, scale), upscale(apply, lr)]
        row += [upscale(f, lr) for f in others]
        row.append(hr)
        rows.append(row)
    return rows


def flops(
    apply_with_params: Callable, params, scale: int, output_hw: Sequence[int] = COST_OUTPUT_HW
) -> float:
    """XLA's FLOP count (2 per multiply-add) for one image of `output_hw` at `scale`."""
    lr = jax.ShapeDtypeStruct((1, output_hw[0] // scale, output_hw[1] // scale, 3), jnp.float32)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    cost = jax.jit(apply_with_params).lower(abstract, lr).cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get('flops', float('nan')))


def latency_ms(apply: SRFn, lr_hw: Sequence[int] = (128, 128), repeats: int = 5) -> float:
    """Median wall time of one LR image after warm-up (compilation excluded)."""
    x = jnp.zeros((1, *lr_hw, 3), jnp.float32)
    jax.block_until_ready(apply(x))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(apply(x))
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def compare(
    models: Sequence[tuple],
    datasets: Sequence[str],
    scale: int,
    workdir: str,
    title: str,
    table_name: str = 'sr_table.md',
    writer=None,
    step: int = 0,
    grid_name: Optional[str] = 'sr_grid.png',
) -> Dict[str, object]:
    """Scores bicubic and each `(name, apply_with_params, params)` on every dataset.

    Prints and writes a markdown table, merges `sr` and `models` sections into results.json, and
    writes an image grid LR | bicubic | models... | HR from the first dataset.
    """
    from sr_purify import reporting, sr_data  # Lazy: loading datasets needs TensorFlow.

    applies = [(name, jax.jit(lambda x, f=f, p=p: f(p, x)), f, p) for name, f, p in models]
    results, rows, cost = {}, [], {}
    for name, f_apply, f, p in applies:
        cost[name] = {
            'params': parameter_count(p),
            'gflops_720p': flops(f, p, scale) / 1e9,
            'ms_per_128px_lr': latency_ms(f_apply),
        }
    first_images = None
    for spec in datasets:
        set_name, images = sr_data.eval_images(spec)
        first_images = first_images or images
        per_model = {}
        bic = None
        for name, f_apply, _, _ in applies:
            m = evaluate_images(f_apply, images, scale)
            bic = bic or {'psnr': m['bicubic_psnr'], 'ssim': m['bicubic_ssim']}
            per_model[name] = {'psnr': m['psnr'], 'ssim': m['ssim']}
        if bic is None:
            m = evaluate_images(None, images, scale)
            bic = {'psnr': m['bicubic_psnr'], 'ssim': m['bicubic_ssim']}
        results[set_name] = {f'x{scale}': {'bicubic': bic, **per_model}}
        rows.append([set_name, f'x{scale}', 'bicubic', bic['psnr'], bic['ssim'], 0, 0.0, '-'])
        for name in per_model:
            rows.append(
                [
                    set_name,
                    f'x{scale}',
                    name,
                    per_model[name]['psnr'],
                    per_model[name]['ssim'],
                    cost[name]['params'],
                    cost[name]['gflops_720p'],
                    cost[name]['ms_per_128px_lr'],
                ]
            )
    header = [
        'dataset',
        'scale',
        'model',
        'PSNR (Y)',
        'SSIM (Y)',
        'params',
        'GFLOPs (720p out)',
        'ms / 128px LR',
    ]
    table = reporting.log_table(title, header, rows)
    reporting.write_text(workdir, table_name, f'# {title}\n\n{table}')
    reporting.update_results(workdir, 'sr', results)
    reporting.update_results(workdir, 'models', cost)
    if grid_name and applies and first_images:
        grid_rows = sample_grid_rows(
            applies[0][1], first_images, scale, others=[a[1] for a in applies[1:]]
        )
        if grid_rows:
            columns = ['LR', 'bicubic', *(a[0] for a in applies), 'HR']
            grid = reporting.image_grid(grid_rows, labels=columns)
            reporting.write_grid(workdir, grid_name, grid, writer, step)
    return {'sr': results, 'models': cost, 'table': table}
