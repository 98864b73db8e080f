"""Chips turned by any angle: labels keep their oriented outlines, and turned boxes stay tight on their objects."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import shapely
import torch

from hem_bootstrap.config import DataConfig, ImageSet
from hem_bootstrap.data.augment import turn_chip, turn_outlines, turned_side
from hem_bootstrap.data.training import ChipDataset, prepare_train_images
from hem_bootstrap.geo.labels import OUTLINE, load_labels, with_pixel_labels
from hem_bootstrap.geo.raster import open_raster
from tests.conftest import default_transform

TILE = 128
# (centre x, centre y, length, width, angle in degrees) of rectangles painted bright on a dark scene
OBJECTS = [(70.0, 80.0, 30.0, 12.0, 0.0), (300.0, 140.0, 34.0, 14.0, 25.0), (180.0, 380.0, 28.0, 12.0, 60.0)]


def _corners(cx: float, cy: float, length: float, width: float, angle: float) -> np.ndarray:
    a = np.radians(angle)
    u, v = np.array([np.cos(a), np.sin(a)]), np.array([-np.sin(a), np.cos(a)])
    return np.array([[cx, cy] + su * length / 2 * u + sv * width / 2 * v for su, sv in
                     ((-1, -1), (1, -1), (1, 1), (-1, 1))])


def _paint(size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    data = np.full((3, size, size), 10, dtype="uint8")
    for obj in OBJECTS:
        inside = shapely.contains_xy(shapely.Polygon(_corners(*obj)), xx, yy)
        data[:, inside] = 250
    return data


@pytest.fixture
def scene(make_raster: Callable[..., Path], make_labels: Callable[..., Path]) -> tuple[Path, Path]:
    raster = make_raster(name="turned.tif", width=512, height=512, data=_paint(512))
    t = default_transform()
    polys = [shapely.Polygon([t @ tuple(c) for c in _corners(*obj)]) for obj in OBJECTS]
    return raster, make_labels(geoms=polys)


def test_polygon_labels_keep_their_rotated_rectangle_in_pixels(scene: tuple[Path, Path]) -> None:
    raster, labels = scene
    info = open_raster(raster)
    frame = load_labels(labels, info, DataConfig())
    for got, obj in zip(frame[OUTLINE], OBJECTS, strict=True):
        want = _corners(*obj)
        # the same four corners, in whatever order and starting point
        assert np.abs(np.sort(got, axis=0) - np.sort(want, axis=0)).max() < 0.01  # GEOS: ~1e-3 px
    # labels added as pixel boxes (accepted in review) are their own outlines; the polygons keep theirs
    both = with_pixel_labels(frame, info, np.array([[10.0, 20.0, 30.0, 25.0]]), np.array([1]), DataConfig())
    assert np.allclose(both[OUTLINE].iloc[-1], [[10, 20], [30, 20], [30, 25], [10, 25]])
    assert np.allclose(both[OUTLINE].iloc[1], frame[OUTLINE].iloc[1])


def test_turned_outline_matches_the_turned_pixels() -> None:
    size = 200
    image = torch.from_numpy(_paint(512)[:, 40:40 + size, 200:200 + size].astype(np.float32) / 255)
    outline = _corners(*OBJECTS[1]) - [200, 40]  # the 25-degree object, in this crop's pixels
    centre = (size / 2, size / 2)
    for angle in (10.0, 25.0, 47.5, 80.0):
        chip = turn_chip(image, centre, angle, TILE)
        assert chip.shape == (3, TILE, TILE)
        ys, xs = np.nonzero(chip[0].numpy() > 0.5)
        drawn = np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=float)
        box = turn_outlines(outline[None], centre, angle, TILE)[0]
        assert np.abs(box - drawn).max() <= 1.5, (angle, box, drawn)
    # turned back by its 25 degrees (counter-clockwise on screen) the object lies along the x axis: its box is the object itself, not a turned envelope
    box = turn_outlines(outline[None], centre, 25.0, TILE)[0]
    assert np.allclose(box[2:] - box[:2], [34, 14], atol=1e-6)
    assert turned_side(TILE, 0.0) == TILE + 2 and turned_side(TILE, 45.0) == int(np.ceil(TILE * np.sqrt(2))) + 2


def _dataset(scene: tuple[Path, Path], rotate_any: float, augment: bool = True) -> ChipDataset:
    raster, labels = scene
    cfg = DataConfig()
    images = prepare_train_images([ImageSet(images=[str(raster)], labels=str(labels))], cfg)
    return ChipDataset(images, None, 0, TILE, cfg, augment, seed=5, rotate_any=rotate_any)


def _drawn(bright: np.ndarray, box: np.ndarray, pad: int = 3) -> np.ndarray:
    """The box around the bright pixels near ``box`` (grown by ``pad``), in chip pixels."""
    x0, y0 = (np.floor(box[:2]).astype(int) - pad).clip(0)
    x1, y1 = np.ceil(box[2:]).astype(int) + pad
    ys, xs = np.nonzero(bright[y0:y1, x0:x1])
    return np.array([xs.min() + x0, ys.min() + y0, xs.max() + 1 + x0, ys.max() + 1 + y0], dtype=float)


def test_turned_chips_carry_tight_boxes_on_their_objects(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene, rotate_any=1.0)
    checked = whole = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            assert 0 < ds.free_angle(i) < 90
            image, target = ds[i]
            assert image.shape == (3, TILE, TILE)
            bright = image[0].numpy() > 0.5
            boxes = target["boxes"].numpy()
            inside = (boxes[:, :2].min(axis=1) >= 1) & (boxes[:, 2:].max(axis=1) <= TILE - 1)
            for box in boxes[inside]:  # objects cut by the chip's edge are left out
                assert np.abs(box - _drawn(bright, box)).max() <= 2.0, (epoch, i, box)
                checked += 1
            edge = bright[0].any() or bright[-1].any() or bright[:, 0].any() or bright[:, -1].any()
            if not edge:  # every object lies wholly inside: each bright pixel is in a box
                covered = np.zeros_like(bright)
                for x0, y0, x1, y1 in boxes.round().astype(int):
                    covered[max(y0 - 1, 0):y1 + 1, max(x0 - 1, 0):x1 + 1] = True
                assert not (bright & ~covered).any(), (epoch, i)
                whole += 1
    assert checked >= len(ds) and whole > 0


def test_a_share_is_turned_and_the_other_chips_do_not_change(scene: tuple[Path, Path]) -> None:
    plain, half = _dataset(scene, rotate_any=0.0), _dataset(scene, rotate_any=0.5)
    angles = [half.free_angle(i) for i in range(len(half))]
    assert 0 < sum(a > 0 for a in angles) < len(angles) and all(0 <= a < 90 for a in angles)
    assert all(plain.free_angle(i) == 0 for i in range(len(plain)))
    for i, a in enumerate(angles):
        if a == 0:
            (x, tx), (y, ty) = plain[i], half[i]
            assert torch.equal(x, y) and torch.equal(tx["boxes"], ty["boxes"])
    # without augmentation nothing is turned, whatever the share
    assert all(_dataset(scene, rotate_any=1.0, augment=False).free_angle(i) == 0 for i in range(len(plain)))


def test_box_labels_are_never_turned_by_any_angle(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path], scene: tuple[Path, Path]
) -> None:
    boxes = np.array([[40, 50, 70, 62], [300, 310, 316, 340]], dtype=float)
    raster = make_raster(name="boxes.tif", width=512, height=512, data=_paint(512))
    boxed = _dataset((raster, make_labels(name="boxes.gpkg", boxes_px=boxes)), rotate_any=1.0)
    assert not boxed.images[0].index.oriented and boxed.rotate_any == 0
    assert all(boxed.free_angle(i) == 0 for i in range(len(boxed)))
    turned = _dataset(scene, rotate_any=1.0)
    assert turned.images[0].index.oriented and turned.rotate_any == 1.0
