"""Cluster heat-maps: render 2-D assignment maps as PNG images (needs Pillow: ``pip install tocalib[viz]``).

Domain-agnostic: it takes maps, never models. A map set is (M, H, W), one non-negative map per
cluster (e.g. a soft assignment (M, N) reshaped to its token grid); every map is scaled to [0, 1] on
its own, colour-mapped and, when an image is given, blended over it.

>>> import numpy as np
>>> grid = render_grid([np.random.rand(4, 7, 7), np.random.rand(2, 4, 4)], cell_size=32, gap=2)
>>> grid.size  # 4 columns of 32 px and 3 gaps, 2 rows and 1 gap
(134, 66)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["colorize", "render_grid", "save_grid"]

# anchor colours of a perceptually ordered dark-blue → teal → yellow ramp (low → high)
_RAMP = np.array(
    [[48, 18, 59], [65, 69, 171], [57, 131, 226], [40, 187, 200], [72, 224, 134], [178, 241, 57], [250, 190, 35]],
    dtype=np.float64,
)


def _pil() -> Any:
    try:
        from PIL import Image
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError("tocalib.viz needs Pillow: `pip install tocalib[viz]`") from err
    return Image


def _as_maps(maps: Any, name: str) -> np.ndarray:
    """Any (M, H, W) array-like (numpy, torch on any device, lists) → float64 numpy."""
    if hasattr(maps, "detach"):
        maps = maps.detach().float().cpu().numpy()
    array = np.asarray(maps, dtype=np.float64)
    if array.ndim != 3 or 0 in array.shape:
        raise ValueError(
            f"{name} must be non-empty maps of shape (M, H, W), got shape {array.shape}; reshape an (M, N) "
            "assignment with .reshape(M, H, W) and select one batch element"
        )
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return array


def colorize(values: np.ndarray) -> np.ndarray:
    """(H, W) values → (H, W, 3) uint8 colours, each map scaled to [0, 1] by its own min and max."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    position = scaled * (len(_RAMP) - 1)
    index = np.minimum(position.astype(np.int64), len(_RAMP) - 2)
    frac = (position - index)[..., None]
    return np.round(_RAMP[index] * (1 - frac) + _RAMP[index + 1] * frac).astype(np.uint8)


def _cell(values: np.ndarray, background: Any, cell_size: tuple[int, int], alpha: float) -> Any:
    Image = _pil()
    heat = Image.fromarray(colorize(values)).resize(cell_size, Image.Resampling.BILINEAR)
    return heat if background is None else Image.blend(background, heat, alpha)


def render_grid(
    rows: Sequence[Any],
    image: Any | None = None,
    *,
    max_maps: int | None = 8,
    cell_size: int = 128,
    alpha: float = 0.6,
    gap: int = 2,
) -> Any:
    """A grid image: one row per map set, one cell per map, optionally over ``image``.

    Args:
        rows: map sets, each (M_r, H_r, W_r) (numpy or torch); rows may differ in M and size.
        image: optional (H, W, 3) uint8 array or PIL image, shown in the first column of each row and
            under every heat-map (resized to the cell).
        max_maps: at most this many maps per row (the first ones); None shows all.
        cell_size: cell height in pixels; the width follows the image's (or first map's) aspect ratio.
        alpha: heat-map opacity over the image, in [0, 1].
        gap: pixels between cells.

    Returns:
        A PIL RGB image of ``len(rows)`` rows.
    """
    Image = _pil()
    if not rows:
        raise ValueError("rows must hold at least one (M, H, W) map set")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if cell_size < 1 or gap < 0 or (max_maps is not None and max_maps < 1):
        raise ValueError(f"need cell_size >= 1, gap >= 0, max_maps >= 1 or None; got {cell_size}, {gap}, {max_maps}")
    sets = [_as_maps(maps, f"rows[{r}]")[:max_maps] for r, maps in enumerate(rows)]
    background = None
    if image is not None:
        background = image.convert("RGB") if hasattr(image, "convert") else Image.fromarray(_as_rgb(image))
        aspect = background.width / background.height
    else:
        aspect = sets[0].shape[2] / sets[0].shape[1]
    size = (max(1, round(cell_size * aspect)), cell_size)
    if background is not None:
        background = background.resize(size, Image.Resampling.BILINEAR)
    columns = max(len(s) for s in sets) + (background is not None)
    grid = Image.new("RGB", (columns * (size[0] + gap) - gap, len(sets) * (size[1] + gap) - gap), "white")
    for r, maps in enumerate(sets):
        top = r * (size[1] + gap)
        cells = ([background] if background is not None else []) + [
            _cell(values, background, size, alpha) for values in maps
        ]
        for c, cell in enumerate(cells):
            grid.paste(cell, (c * (size[0] + gap), top))
    return grid


def _as_rgb(image: Any) -> np.ndarray:
    array = np.asarray(image)
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array or a PIL image, got {array.dtype} {array.shape}")
    return array


def save_grid(rows: Sequence[Any], path: str | os.PathLike[str], image: Any | None = None, **kwargs: Any) -> Any:
    """:func:`render_grid` written to ``path`` as PNG; returns the PIL image."""
    grid = render_grid(rows, image, **kwargs)
    grid.save(path, format="PNG")
    return grid
