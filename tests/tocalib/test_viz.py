"""tocalib.viz: assignment maps → PNG heat-map grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from tocalib.viz import _RAMP, colorize, render_grid, save_grid


def test_colorize_maps_the_minimum_and_maximum_to_the_ends_of_the_ramp():
    values = np.array([[0.2, 0.5], [0.9, 0.2]])
    colors = colorize(values)
    assert colors.shape == (2, 2, 3) and colors.dtype == np.uint8
    assert (colors[0, 0] == _RAMP[0]).all() and (colors[1, 0] == _RAMP[-1]).all()


def test_colorize_of_a_constant_map_is_uniform_and_finite():
    colors = colorize(np.full((3, 4), 0.25))
    assert (colors == colors[0, 0]).all()


def test_a_grid_has_one_row_per_map_set_and_one_cell_per_map():
    rows = [torch.rand(3, 7, 7), np.random.rand(5, 4, 4)]
    grid = render_grid(rows, cell_size=20, gap=1)
    assert grid.size == (5 * 21 - 1, 2 * 21 - 1)
    assert grid.mode == "RGB"


def test_an_image_adds_a_first_column_and_sets_the_cell_aspect():
    image = np.zeros((50, 100, 3), dtype=np.uint8)
    grid = render_grid([np.random.rand(2, 5, 10)], image, cell_size=30, gap=0, max_maps=1)
    assert grid.size == (2 * 60, 30)
    assert np.asarray(grid)[:, :60].max() == 0, "the image column shows the (black) image"


def test_the_hot_spot_of_a_map_is_drawn_where_it_is(tmp_path):
    hot = np.zeros((1, 8, 8))
    hot[0, 1, 6] = 1.0  # top right
    path = tmp_path / "one.png"
    save_grid([hot], path, cell_size=80, gap=0)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.size == (80, 80)
        pixels = np.asarray(png.convert("RGB")).astype(int)
    brightness = pixels.sum(-1)
    y, x = np.unravel_index(brightness.argmax(), brightness.shape)
    assert y < 30 and x > 50
    assert brightness[70, 10] < brightness[y, x]


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        ([np.random.rand(4, 4)], {}, r"shape \(M, H, W\)"),
        ([], {}, "at least one"),
        ([np.full((1, 2, 2), np.nan)], {}, "NaN"),
        ([np.random.rand(1, 2, 2)], {"alpha": 2.0}, "alpha"),
        ([np.random.rand(1, 2, 2)], {"image": np.zeros((4, 4))}, r"\(H, W, 3\) uint8"),
    ],
)
def test_bad_inputs_get_clear_errors(rows, kwargs, message):
    image = kwargs.pop("image", None)
    with pytest.raises(ValueError, match=message):
        render_grid(rows, image, **kwargs)
