"""Image grids (with and without column/row labels) and the robustness plot, on tiny inputs."""

import numpy as np

from sr_purify import reporting
from sr_purify.evaluators import robustness_report

# image_grid of 2 rows x 3 columns of 8x8 tiles, pad 2, before labels existed: 2 * (8 + 2) + 2
# by 3 * (8 + 2) + 2. Saved PNGs and tests rely on this geometry.
OLD_SHAPE = (22, 32, 3)


def tiles(seed=0):
    rng = np.random.default_rng(seed)
    return [[rng.random((8, 8, 3)) for _ in range(3)] for _ in range(2)]


def test_image_grid_without_labels_keeps_its_geometry():
    grid = reporting.image_grid(tiles(), pad=2)
    assert grid.shape == OLD_SHAPE and grid.dtype == np.uint8
    # The first tile sits at (pad, pad), rounded to uint8 as before.
    np.testing.assert_array_equal(grid[2:10, 2:10], np.round(tiles()[0][0] * 255).astype(np.uint8))


def test_image_grid_labels_add_a_header_above_identical_tiles():
    plain = reporting.image_grid(tiles(), pad=2)
    labelled = reporting.image_grid(tiles(), pad=2, labels=['clean', 'adversarial', 'P(x)'])
    extra = labelled.shape[0] - plain.shape[0]
    assert extra > 0 and labelled.shape[1:] == plain.shape[1:]
    header = labelled[:extra]
    assert len(np.unique(header.reshape(-1, 3), axis=0)) > 1  # Text was drawn.
    np.testing.assert_array_equal(labelled[extra:], plain)


def test_image_grid_row_labels_add_a_strip_left_of_identical_tiles():
    plain = reporting.image_grid(tiles(), pad=2)
    labelled = reporting.image_grid(tiles(), pad=2, labels=['a', 'b'], row_labels=['none', 'sr'])
    top, left = labelled.shape[0] - plain.shape[0], labelled.shape[1] - plain.shape[1]
    assert top > 0 and left > 0
    assert len(np.unique(labelled[top:, :left].reshape(-1, 3), axis=0)) > 1
    np.testing.assert_array_equal(labelled[top:, left:], plain)


def test_image_grid_clips_labels_too_wide_for_a_tile():
    long = 'a_label_far_too_long_for_an_eight_pixel_tile'
    grid = reporting.image_grid(tiles(), pad=2, labels=[long, 'x', 'y'])
    assert grid.shape[1] == OLD_SHAPE[1]  # Clipped, not widened.
    lines = reporting._fit_lines(long + ' and more words', 40, lambda s: 6 * len(s), 3)
    assert 1 <= len(lines) <= 3 and all(6 * len(line) <= 40 for line in lines)


def small_results():
    """Two L-inf eps and one L2 eps (two panels), two purifiers, one without transfer."""
    attacks = [
        dict(label=f'pgd linf {k}/255 x10', name='pgd', norm='linf', eps=k / 255, steps=10)
        for k in (4, 8)
    ] + [dict(label='pgd l2 0.5 x10', name='pgd', norm='l2', eps=0.5, steps=10)]
    labels = [a['label'] for a in attacks]
    row = lambda clean, obl, ad, tr: {
        'clean': clean,
        'oblivious': dict(zip(labels, obl)),
        'adaptive': dict(zip(labels, ad)),
        'transfer': None if tr is None else dict(zip(labels, tr)),
    }
    return {
        'examples': 100,
        'clean': 0.9,
        'attacks': attacks,
        'purifiers': {
            'none': row(0.9, (0.2, 0.0, 0.3), (0.2, 0.0, 0.3), None),
            'sr': row(0.85, (0.7, 0.6, 0.7), (0.3, 0.1, 0.4), (0.8, 0.7, 0.75)),
        },
    }


def test_plot_is_an_rgb_image_with_content():
    img = robustness_report.plot(small_results())
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
    assert img.shape[0] > 200 and img.shape[1] > 200
    assert len(np.unique(img.reshape(-1, 3), axis=0)) > 1


def test_plot_without_attacks_still_draws():
    results = small_results()
    results['attacks'] = []
    img = robustness_report.plot(results)
    assert img.dtype == np.uint8 and img.shape[2] == 3 and img.min() < img.max()
