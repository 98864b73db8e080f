"""Pure tiling math: windows with overlap and pixel <-> map transforms. No I/O.

Everything here is a small function of numbers and arrays so it can be checked without a
file (property tests in ``tests/test_windows.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from affine import Affine


@dataclass(frozen=True, order=True)
class Window:
    """A tile of a raster in pixel space.

    ``width``/``height`` are the tile size that goes to the model; ``valid_width`` /
    ``valid_height`` are the part of it that lies inside the raster (smaller only when the
    raster itself is smaller than one tile and the tile is padded).
    """

    col_off: int
    row_off: int
    width: int
    height: int
    valid_width: int
    valid_height: int


# --------------------------------------------------------------------------- tiling


def axis_offsets(length: int, tile_size: int, overlap: int) -> list[int]:
    """Offsets of tiles along one axis of ``length`` pixels.

    Tiles step by ``tile_size - overlap``; the last one is moved back so it ends on the last
    pixel instead of running past it, which gives the minimal count
    ``ceil((length - overlap) / (tile_size - overlap))`` with at least ``overlap`` shared
    pixels between neighbours. An axis shorter than a tile gets one (padded) tile at 0.
    """
    if tile_size <= 0:
        raise ValueError(f"tile_size must be > 0, got {tile_size}")
    if not 0 <= overlap < tile_size:
        raise ValueError(f"overlap must be in [0, tile_size={tile_size}), got {overlap}")
    if length <= 0:
        raise ValueError(f"image length must be > 0, got {length}")
    if length <= tile_size:
        return [0]
    stride = tile_size - overlap
    n = math.ceil((length - overlap) / stride)
    offsets = [i * stride for i in range(n - 1)]
    offsets.append(length - tile_size)
    return offsets


def tile_windows(width: int, height: int, tile_size: int, overlap: int) -> list[Window]:
    """Cover a ``width`` x ``height`` image with square tiles, row by row.

    Tiles never leave the image (the last row/column is moved back inside); only an image
    smaller than a tile in some dimension gets a padded tile whose ``valid_*`` is the image
    size along that dimension.
    """
    cols = axis_offsets(width, tile_size, overlap)
    rows = axis_offsets(height, tile_size, overlap)
    vw = min(width, tile_size)
    vh = min(height, tile_size)
    return [Window(c, r, tile_size, tile_size, vw, vh) for r in rows for c in cols]


def window_inside(col_off: int, row_off: int, tile_size: int, width: int, height: int) -> Window:
    """A ``tile_size`` window near ``(col_off, row_off)`` clamped inside the image.

    Along an axis shorter than the tile the window sits at 0 and is padded.
    """
    c = 0 if width <= tile_size else int(min(max(col_off, 0), width - tile_size))
    r = 0 if height <= tile_size else int(min(max(row_off, 0), height - tile_size))
    return Window(c, r, tile_size, tile_size, min(width, tile_size), min(height, tile_size))


def window_around_box(
    box: tuple[float, float, float, float] | np.ndarray,
    tile_size: int,
    width: int,
    height: int,
    u: tuple[float, float],
) -> Window:
    """A ``tile_size`` window that contains pixel ``box`` at a position chosen by ``u``.

    ``u`` holds two numbers in [0, 1): 0 puts the box at the window's right/bottom edge, 1 at
    its left/top edge, so the box is not always centred. A box larger than the tile gets a
    window over its centre. The window is clamped inside the image.
    """
    x0, y0, x1, y1 = (float(v) for v in box)

    def start(lo: float, hi: float, frac: float) -> int:
        span = hi - lo
        if span >= tile_size:
            return int(round((lo + hi) / 2 - tile_size / 2))
        first = math.ceil(hi) - tile_size  # box touches the far edge
        last = math.floor(lo)  # box touches the near edge
        return int(first + math.floor(frac * (last - first + 1)))

    return window_inside(start(x0, x1, u[0]), start(y0, y1, u[1]), tile_size, width, height)


# --------------------------------------------------------------------------- boxes


def _apply(transform: Affine, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b, c, d, e, f = transform.a, transform.b, transform.c, transform.d, transform.e, transform.f
    return a * xs + b * ys + c, d * xs + e * ys + f


def _transform_boxes(boxes: np.ndarray, transform: Affine) -> np.ndarray:
    """Transform the four corners of each box and take their bounding box (keeps min < max)."""
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    if len(arr) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    xs = arr[:, [0, 2, 2, 0]]
    ys = arr[:, [1, 1, 3, 3]]
    tx, ty = _apply(transform, xs, ys)
    return np.stack([tx.min(axis=1), ty.min(axis=1), tx.max(axis=1), ty.max(axis=1)], axis=1)


def pixel_to_map_boxes(boxes: np.ndarray, transform: Affine) -> np.ndarray:
    """(N, 4) xyxy pixel boxes -> (N, 4) ``(minx, miny, maxx, maxy)`` in map units.

    Works for north-up transforms (negative y scale flips rows) and for rotated ones (the
    result is the map-aligned bounding box of the transformed corners).
    """
    return _transform_boxes(boxes, transform)


def map_to_pixel_boxes(boxes: np.ndarray, transform: Affine) -> np.ndarray:
    """(N, 4) ``(minx, miny, maxx, maxy)`` map boxes -> (N, 4) xyxy pixel boxes."""
    return _transform_boxes(boxes, ~transform)


def clip_to_window(boxes: np.ndarray, window: Window) -> tuple[np.ndarray, np.ndarray]:
    """Image-pixel boxes -> tile-pixel boxes clipped to the window's valid area.

    Returns the clipped boxes (float64, (N, 4)) and the visible fraction of each box's area
    (0 where nothing is inside; 1 for a degenerate box lying inside).
    """
    arr = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    shifted = arr - np.array(
        [window.col_off, window.row_off, window.col_off, window.row_off], dtype=np.float64
    )
    clipped = shifted.copy()
    clipped[:, [0, 2]] = clipped[:, [0, 2]].clip(0, window.valid_width)
    clipped[:, [1, 3]] = clipped[:, [1, 3]].clip(0, window.valid_height)
    full = (shifted[:, 2] - shifted[:, 0]) * (shifted[:, 3] - shifted[:, 1])
    cw = clipped[:, 2] - clipped[:, 0]
    ch = clipped[:, 3] - clipped[:, 1]
    vis = np.where(full > 0, (cw * ch) / np.where(full > 0, full, 1.0), 0.0)
    degenerate_inside = (full <= 0) & (shifted == clipped).all(axis=1)
    vis = np.where(degenerate_inside, 1.0, vis)
    return clipped, vis
