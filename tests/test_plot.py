"""The loss plot is readable: axis titles, and tick labels large enough to read at half size."""

from __future__ import annotations

import numpy as np

from lib_training.training.plot import HEIGHT, MARGIN_BOTTOM, MARGIN_LEFT, MARGIN_TOP, plot_loss


def _dark_rows(region: np.ndarray) -> np.ndarray:
    return np.nonzero((region < 128).any(axis=(1, 2)))[0]


def test_the_step_axis_has_labels_and_a_title_under_the_plot() -> None:
    image = np.asarray(plot_loss(list(range(1, 101)), [1.0 / i for i in range(1, 101)]))
    below = image[HEIGHT - MARGIN_BOTTOM + 6 :, MARGIN_LEFT:]  # under the frame and its tick marks
    rows = _dark_rows(below)
    assert rows.size and rows.max() - rows.min() >= 30  # tick labels, then the "step" title under them


def test_the_loss_axis_has_a_title_and_tick_labels_of_readable_size() -> None:
    image = np.asarray(plot_loss(list(range(1, 101)), [1.0 / i for i in range(1, 101)]))
    title_column = image[MARGIN_TOP:-MARGIN_BOTTOM, :24]  # the rotated "loss" title
    assert (title_column < 128).any()
    label = image[MARGIN_TOP - 12 : MARGIN_TOP + 12, 24 : MARGIN_LEFT - 6]  # the top tick label
    rows = _dark_rows(label)
    assert rows.size and rows.max() - rows.min() >= 9  # digits 10 px tall or more (the bitmap font: 8)
