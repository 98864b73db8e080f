"""Pure window math: coverage, bounds, minimal counts, pixel <-> map boxes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from affine import Affine
from hypothesis import given, settings
from hypothesis import strategies as st

from hem_bootstrap.geo.windows import (
    Window,
    axis_offsets,
    clip_to_window,
    map_to_pixel_boxes,
    pixel_to_map_boxes,
    tile_windows,
    window_around_box,
)


@st.composite
def tiling_case(draw: st.DrawFn) -> tuple[int, int, int, int]:
    tile = draw(st.integers(8, 96))
    overlap = draw(st.integers(0, tile - 1))
    w = draw(st.integers(1, 400))
    h = draw(st.integers(1, 400))
    return w, h, tile, overlap


@settings(max_examples=150, deadline=None)
@given(tiling_case())
def test_every_pixel_covered_and_valid_part_inside(case: tuple[int, int, int, int]) -> None:
    w, h, tile, overlap = case
    wins = tile_windows(w, h, tile, overlap)
    cover = np.zeros((h, w), dtype=np.int32)
    for win in wins:
        assert win.width == tile and win.height == tile
        assert win.col_off >= 0 and win.row_off >= 0
        assert win.col_off + win.valid_width <= w and win.row_off + win.valid_height <= h
        assert win.valid_width == min(w, tile) and win.valid_height == min(h, tile)
        cover[win.row_off : win.row_off + win.valid_height, win.col_off : win.col_off + win.valid_width] += 1
    assert cover.min() >= 1
    assert len(set(wins)) == len(wins)


@settings(max_examples=150, deadline=None)
@given(tiling_case())
def test_count_is_minimal_and_neighbours_overlap(case: tuple[int, int, int, int]) -> None:
    w, h, tile, overlap = case
    stride = tile - overlap

    def expected(n: int) -> int:
        return 1 if n <= tile else math.ceil((n - overlap) / stride)

    assert len(tile_windows(w, h, tile, overlap)) == expected(w) * expected(h)
    offs = axis_offsets(w, tile, overlap)
    assert offs == sorted(set(offs))
    for a, b in zip(offs, offs[1:], strict=False):
        assert a + tile - b >= overlap  # at least the requested overlap between neighbours


def test_small_image_gets_one_padded_window() -> None:
    assert tile_windows(100, 300, 256, 32) == [
        Window(0, 0, 256, 256, 100, 256),
        Window(0, 44, 256, 256, 100, 256),
    ]


def test_bad_overlap_rejected() -> None:
    with pytest.raises(ValueError, match="overlap"):
        tile_windows(500, 500, 64, 64)


NORTH_UP = Affine(0.5, 0, 500_000.0, 0, -0.5, 5_000_000.0)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0, 1000), st.floats(0, 1000), st.floats(0.5, 50), st.floats(0.5, 50)),
        min_size=1,
        max_size=5,
    )
)
def test_pixel_map_roundtrip_north_up(raw: list[tuple[float, float, float, float]]) -> None:
    px = np.array([[x, y, x + bw, y + bh] for x, y, bw, bh in raw])
    mp = pixel_to_map_boxes(px, NORTH_UP)
    assert (mp[:, 0] < mp[:, 2]).all() and (mp[:, 1] < mp[:, 3]).all()
    np.testing.assert_allclose(map_to_pixel_boxes(mp, NORTH_UP), px, atol=1e-6)


def test_north_up_flips_rows() -> None:
    mp = pixel_to_map_boxes(np.array([[10, 20, 30, 60]]), NORTH_UP)
    np.testing.assert_allclose(mp, [[500_005.0, 4_999_970.0, 500_015.0, 4_999_990.0]])
    assert pixel_to_map_boxes(np.zeros((0, 4)), NORTH_UP).shape == (0, 4)


def test_clip_to_window_visible_fraction() -> None:
    win = Window(100, 100, 64, 64, 64, 64)
    boxes = np.array([[110, 110, 120, 120], [90, 110, 110, 120], [95, 110, 105, 120]], dtype=float)
    clipped, vis = clip_to_window(boxes, win)
    np.testing.assert_allclose(clipped[0], [10, 10, 20, 20])
    np.testing.assert_allclose(clipped[1], [0, 10, 10, 20])
    np.testing.assert_allclose(vis, [1.0, 0.5, 0.5])


@settings(max_examples=100, deadline=None)
@given(st.integers(0, 900), st.integers(0, 900), st.integers(1, 40), st.floats(0, 0.999), st.floats(0, 0.999))
def test_window_around_box_contains_box(x: int, y: int, size: int, u: float, v: float) -> None:
    w = h = 1000
    box = (float(x), float(y), float(min(x + size, w)), float(min(y + size, h)))
    win = window_around_box(box, 64, w, h, (u, v))
    assert 0 <= win.col_off <= w - 64 and 0 <= win.row_off <= h - 64
    assert win.col_off <= box[0] and box[2] <= win.col_off + 64
    assert win.row_off <= box[1] and box[3] <= win.row_off + 64


def test_window_around_box_is_not_always_centred() -> None:
    box = (500.0, 500.0, 510.0, 510.0)
    offs = {window_around_box(box, 64, 2000, 2000, (u, u)).col_off for u in np.linspace(0, 0.99, 10)}
    assert min(offs) == 510 - 64 and max(offs) == 500
