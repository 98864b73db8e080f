"""Training chips: positives, bank negatives and random background, with box-aware augmentation (batches: :mod:`hem_bootstrap.data.sampling`).

Every chip carries all the ground truth inside it, whatever its kind: a bank negative that
happens to contain a real (labelled) vehicle still teaches "vehicle" there. Random placement
is a pure function of ``(seed, index, epoch)`` so runs and resumes are reproducible.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import torch
from shapely.geometry.base import BaseGeometry
from torch.utils.data import Dataset

from hem_bootstrap.config import DataConfig, ImageSet
from hem_bootstrap.data.augment import ChipAugment, turn_chip, turn_outlines, turned_side
from hem_bootstrap.data.tiles import ReaderPool
from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import DataError, TrainingError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.geo.aoi import aoi_in_pixels, windows_touching
from hem_bootstrap.geo.labels import (
    LabelIndex,
    PixelLabels,
    load_labels,
    load_zones,
    pixel_labels_of,
    with_pixel_labels,
)
from hem_bootstrap.geo.raster import RasterInfo, open_raster, valid_fraction
from hem_bootstrap.geo.vrt import virtual_paths
from hem_bootstrap.geo.windows import Window, clip_to_window, tile_windows, window_around_box, window_inside

log = logging.getLogger(__name__)

NEG_COLUMNS = ("image", *PX_COLUMNS)
KIND_POS, KIND_NEG, KIND_BG = "pos", "neg", "bg"
LOSS_WEIGHT = "loss_weight"
"""Target key of a chip's classification loss weight (bank chips with ``train.bank_loss_weight``; see
:func:`hem_bootstrap.model.hard_mining.set_chip_weights`)."""
BG_TRIES = 3
"""Random background windows tried before accepting one with little valid data (or outside the area of interest)."""


@dataclass
class TrainImage:
    """A raster ready for chip sampling: its header, its labels in pixel space, its area of interest in pixels."""

    path: Path
    info: RasterInfo
    index: LabelIndex
    aoi: BaseGeometry | None = None

    def touches_aoi(self, win: Window) -> bool:
        """Whether ``win`` touches the area of interest (always, without one)."""
        if self.aoi is None:
            return True
        return bool(windows_touching(self.aoi, np.array([[win.col_off, win.row_off, win.width, win.height]]))[0])


def prepare_train_images(
    image_sets: list[ImageSet], data_cfg: DataConfig, extra: PixelLabels | None = None
) -> list[TrainImage]:
    """Open every raster of the sets and load its labels (and ignore zones) into an index.

    ``extra`` adds objects given as pixel boxes per resolved raster path (positives accepted
    in review) to those rasters' labels.

    Raises:
        DataError: no image at all, or a raster / label file problem.
    """
    out: list[TrainImage] = []
    for i, s in enumerate(image_sets):
        paths = s.resolved_images()
        if not paths:
            raise DataError(f"image set {s.images}: no image matched")
        paths = virtual_paths(paths, f"data.train[{i}]", s.labels, s.mosaic == "auto", data_cfg.gsd,
                              data_cfg.resampling)
        for path in paths:
            info = open_raster(path)
            if s.labels is not None:
                labels = load_labels(s.labels, info, data_cfg, image_name=path.name)
            else:
                labels = load_labels_empty(info)
            if extra and str(path.resolve()) in extra:
                labels = with_pixel_labels(labels, info, *extra[str(path.resolve())], data_cfg)
            zones = load_zones(s.ignore_zones, info) if s.ignore_zones else None
            aoi = aoi_in_pixels(s.aoi, info, "data.train aoi") if s.aoi else None
            out.append(TrainImage(path, info, LabelIndex(labels, info, data_cfg.min_visible_fraction, zones), aoi))
    if not out:
        raise DataError("no training images: the image set list is empty")
    return out


def load_labels_empty(info: RasterInfo) -> Any:
    """An empty label frame for a raster without a label file."""
    return gpd.GeoDataFrame(
        {"label": np.zeros(0, np.int64), "class": np.array([], dtype=object)},
        geometry=[],
        crs=info.crs if info.georeferenced else None,
    )


# --------------------------------------------------------------------------- augmentation


# --------------------------------------------------------------------------- dataset


class ChipDataset(Dataset):
    """Positive, bank-negative and random-background chips of ``tile_size`` pixels.

    Item ``i`` gives ``(image float32 (C, T, T), {"boxes": float32 (N, 4), "labels": int64 (N,)})``.
    ``kinds[i]`` is ``'pos'``, ``'neg'`` or ``'bg'``. Bank negatives refer to their raster by
    path; it must be among ``images`` or ``negative_images`` (unknown ones are skipped with a
    warning). An optional ``weight`` column in ``negatives`` is kept in :attr:`weights` for
    score-weighted sampling. ``accepted`` (pixel boxes per resolved path of a
    ``negative_images`` raster: objects accepted in review) adds one positive chip centred on
    each; their targets come from that raster's labels, which should hold them too (see
    :func:`prepare_train_images`). With ``bank_loss_weight`` other than 1 every target carries
    :data:`LOSS_WEIGHT`: that weight for bank chips, 1 for the others. ``pool_background`` random
    background chips are drawn from each ``negative_images`` raster that is not a training image,
    beside ``n_background`` per training image. With ``augment``, a ``rotate_any`` share of the
    chips is turned by a random angle (0-90 degrees, before the flips and quarter turns) about its
    window's centre, read from a window large enough to fill it, its boxes the envelopes of the
    labels' turned outlines; only where some training label has a turned outline (a polygon drawn
    around a turned object): box labels would turn into loose boxes, so then no chip turns.

    Raises:
        TrainingError: no window of any image contains an object.
    """

    def __init__(
        self,
        images: list[TrainImage],
        negatives: pd.DataFrame | None,
        n_background: int,
        tile_size: int,
        data_cfg: DataConfig,
        augment: bool,
        seed: int,
        negative_images: list[TrainImage] | None = None,
        overlap: int | None = None,
        accepted: PixelLabels | None = None,
        bank_loss_weight: float = 1.0,
        pool_background: int = 0,
        rotate_any: float = 0.0,
    ) -> None:
        self.tile_size = int(tile_size)
        self.rotate_any = float(rotate_any) if augment and _oriented(images, rotate_any) else 0.0
        self.bank_loss_weight = float(bank_loss_weight)
        self.data_cfg = data_cfg
        self.augment = ChipAugment() if augment else None
        self.seed = int(seed)
        self.epoch = 0
        self.images: list[TrainImage] = list(images)
        by_path = {str(Path(im.path).resolve()): i for i, im in enumerate(self.images)}
        for im in negative_images or []:
            key = str(Path(im.path).resolve())
            if key not in by_path:
                by_path[key] = len(self.images)
                self.images.append(im)
        self._overlap = self.tile_size // 4 if overlap is None else int(overlap)
        # one row per item: kind, image index, fixed window (pos) or pixel box (neg) or nothing (bg)
        self._img: list[int] = []
        self._win: list[Window | None] = []
        self._box: list[tuple[float, float, float, float] | None] = []
        kinds: list[str] = []
        weights: list[float] = []
        self._add_positives(len(images), kinds, weights)
        self._add_accepted(accepted or {}, len(images), kinds, weights)
        # background before bank negatives: a chip's random window follows its index, and the background
        # chips' indices then do not depend on the bank, so runs that differ only in their bank see the same ones
        self._add_background(range(len(images)), n_background, kinds, weights)
        self._add_background(range(len(images), len(self.images)), pool_background, kinds, weights)
        self._add_negatives(negatives, by_path, kinds, weights)
        self.kinds = np.array(kinds, dtype=object)
        self.weights = np.array(weights, dtype=np.float64)
        self.repeats = np.ones(len(kinds), dtype=np.int64)
        self._pool = ReaderPool(data_cfg)
        if self.n_positive == 0:
            n_labels = sum(im.index.count() for im in images)
            raise TrainingError(
                f"no positive training chips: {len(images)} training image(s) with {n_labels} label(s) gave no "
                f"{self.tile_size}px window containing an object (negatives={self.n_negative}, "
                f"background={self.n_background}); check data.train labels and data.classes"
            )

    # -- construction
    def _add(
        self,
        kinds: list[str],
        weights: list[float],
        kind: str,
        img: int,
        win: Window | None,
        box: tuple[float, float, float, float] | None,
        weight: float = 1.0,
    ) -> None:
        kinds.append(kind)
        weights.append(weight)
        self._img.append(img)
        self._win.append(win)
        self._box.append(box)

    def _add_positives(self, n_train: int, kinds: list[str], weights: list[float]) -> None:
        for i in range(n_train):
            im = self.images[i]
            if im.index.count() == 0:
                continue
            for win in tile_windows(im.info.width, im.info.height, self.tile_size, self._overlap):
                if len(im.index.targets(win)["boxes"]):
                    self._add(kinds, weights, KIND_POS, i, win, None)

    def _add_accepted(self, accepted: PixelLabels, first: int, kinds: list[str], weights: list[float]) -> None:
        """One positive chip centred on each object accepted in review on a pool raster (index >= ``first``)."""
        t = self.tile_size
        for i in range(first, len(self.images)):
            im = self.images[i]
            boxes, _ = pixel_labels_of(accepted, im.path)
            for box in np.asarray(boxes, dtype=np.float64).reshape(-1, 4):
                win = window_around_box(tuple(box), t, im.info.width, im.info.height, (0.5, 0.5))
                self._add(kinds, weights, KIND_POS, i, win, None)

    def _add_negatives(
        self, negatives: pd.DataFrame | None, by_path: dict[str, int], kinds: list[str], weights: list[float]
    ) -> None:
        if negatives is None or len(negatives) == 0:
            return
        missing = [c for c in NEG_COLUMNS if c not in negatives.columns]
        if missing:
            raise DataError(f"bank negatives lack column(s) {missing}; expected {list(NEG_COLUMNS)}")
        unknown: set[str] = set()
        has_w = "weight" in negatives.columns
        for row in negatives.itertuples(index=False):
            key = str(Path(str(row.image)).resolve())
            idx = by_path.get(key)
            if idx is None:
                unknown.add(str(row.image))
                continue
            box = (float(row.px_xmin), float(row.px_ymin), float(row.px_xmax), float(row.px_ymax))
            self._add(kinds, weights, KIND_NEG, idx, None, box, float(row.weight) if has_w else 1.0)
        if unknown:
            log.warning(
                "%d bank negative image(s) are not among the training/pool rasters, skipped: %s",
                len(unknown),
                sorted(unknown)[:3],
            )

    def _add_background(
        self, image_indices: range, n_background: int, kinds: list[str], weights: list[float]
    ) -> None:
        for i in image_indices:
            for _ in range(max(0, int(n_background))):
                self._add(kinds, weights, KIND_BG, i, None, None)

    def mark_hard_positives(self, boxes_by_image: dict[str, np.ndarray], factor: int) -> int:
        """Draw positive chips that hold a hard positive's centre ``factor`` times per pass.

        ``boxes_by_image`` maps a raster path to (N, 4) xyxy pixel boxes of its hard
        positives. Returns how many chips were marked.
        """
        if factor < 1:
            raise ValueError(f"hard positive factor must be >= 1, got {factor}")
        by_path = {str(Path(im.path).resolve()): i for i, im in enumerate(self.images)}
        self.repeats[:] = 1
        marked = 0
        centres: dict[int, np.ndarray] = {}
        for path, boxes in boxes_by_image.items():
            idx = by_path.get(str(Path(path).resolve()))
            b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
            if idx is not None and len(b):
                centres[idx] = (b[:, :2] + b[:, 2:]) / 2
        for i in np.flatnonzero(self.kinds == KIND_POS):
            c = centres.get(self._img[i])
            win = self._win[i]
            if c is None or win is None:
                continue
            inside = (
                (c[:, 0] >= win.col_off) & (c[:, 0] < win.col_off + win.width)
                & (c[:, 1] >= win.row_off) & (c[:, 1] < win.row_off + win.height)
            )
            if inside.any():
                self.repeats[i] = int(factor)
                marked += 1
        return marked

    # -- counts
    @property
    def n_positive(self) -> int:
        """Positive chips (windows containing at least one object)."""
        return int((self.kinds == KIND_POS).sum())

    @property
    def n_negative(self) -> int:
        """Bank-negative chips."""
        return int((self.kinds == KIND_NEG).sum())

    @property
    def n_background(self) -> int:
        """Random background chips."""
        return int((self.kinds == KIND_BG).sum())

    def set_epoch(self, epoch: int) -> None:
        """Change the random placement of negative/background chips (and augmentation)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.kinds)

    # -- items
    def _rng(self, i: int, salt: int = 0) -> np.random.Generator:
        return np.random.default_rng([self.seed, i, self.epoch, salt])

    def window(self, i: int, rng: np.random.Generator | None = None) -> Window:
        """The window of item ``i`` at the current epoch."""
        rng = rng if rng is not None else self._rng(i)
        im = self.images[self._img[i]]
        w, h, t = im.info.width, im.info.height, self.tile_size
        kind = self.kinds[i]
        if kind == KIND_POS:
            win = self._win[i]
            assert win is not None
            return win
        if kind == KIND_NEG:
            box = self._box[i]
            assert box is not None
            u = rng.random(2)
            return window_around_box(box, t, w, h, (float(u[0]), float(u[1])))
        x0, y0, x1, y1 = _origin_range(im, t)
        return window_inside(int(rng.integers(x0, x1)), int(rng.integers(y0, y1)), t, w, h)

    def _read(self, i: int, rng: np.random.Generator) -> tuple[Window, np.ndarray]:
        """Item ``i``'s window and pixels; a background chip retries a window outside the area or with little data."""
        im = self.images[self._img[i]]
        reader = self._pool.get(im.path)
        win = self.window(i, rng)
        if self.kinds[i] == KIND_BG:
            for _ in range(BG_TRIES - 1):
                if im.touches_aoi(win):
                    image, mask = reader.read(win)
                    if valid_fraction(mask, win) >= self.data_cfg.min_valid_fraction:
                        return win, image
                win = self.window(i, rng)
        return win, reader.read(win)[0]

    def free_angle(self, i: int) -> float:
        """The angle (degrees) item ``i`` is turned by at the current epoch; 0 for most chips, or all without ``rotate_any``."""
        if self.rotate_any <= 0:
            return 0.0
        rng = self._rng(i, salt=1)  # its own stream: the windows and other draws do not change with the option
        return float(rng.uniform(0.0, 90.0)) if rng.random() < self.rotate_any else 0.0

    def _turned(self, i: int, win: Window, angle: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Item ``i``'s chip turned by ``angle`` about its window's centre, and its labels' turned outlines as boxes.

        None when the larger window it is cut from cannot be read (a damaged part of the raster
        next to a readable chip): the chip is then used unturned.
        """
        im = self.images[self._img[i]]
        t = self.tile_size
        side = turned_side(t, angle)
        cx, cy = win.col_off + t / 2, win.row_off + t / 2
        big = window_inside(math.floor(cx - side / 2), math.floor(cy - side / 2), side, im.info.width, im.info.height)
        try:
            image = torch.from_numpy(self._pool.get(im.path).read(big)[0])
        except DataError as err:
            log.debug("chip %d not turned: %s", i, err)
            return None
        chip = turn_chip(image, (cx - big.col_off, cy - big.row_off), angle, t)
        outlines, labels = im.index.outlines_in(big)
        clipped, vis = clip_to_window(turn_outlines(outlines, (cx, cy), angle, t), Window(0, 0, t, t, t, t))
        keep = (vis >= self.data_cfg.min_visible_fraction) & (vis > 0)
        return chip, torch.from_numpy(clipped[keep].astype(np.float32)), torch.from_numpy(labels[keep])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        rng = self._rng(i)
        win, image = self._read(i, rng)
        turned = self._turned(i, win, angle) if (angle := self.free_angle(i)) else None
        if turned is not None:
            img_t, boxes, labels = turned
        else:
            tg = self.images[self._img[i]].index.targets(win)
            img_t, boxes, labels = torch.from_numpy(image), torch.from_numpy(tg["boxes"]), torch.from_numpy(tg["labels"])
        if self.augment is not None:
            img_t, boxes = self.augment(img_t, boxes.reshape(-1, 4), rng)
        boxes = boxes.to(torch.float32).reshape(-1, 4)
        # a sliver thinner than float32 resolution collapses to zero size, which torchvision refuses
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        if not bool(keep.all()):
            boxes, labels = boxes[keep], labels[keep]
        target = {"boxes": boxes, "labels": labels}
        if self.bank_loss_weight != 1.0:
            target[LOSS_WEIGHT] = torch.tensor(self.bank_loss_weight if self.kinds[i] == KIND_NEG else 1.0)
        return img_t.contiguous(), target


def _oriented(images: list[TrainImage], rotate_any: float) -> bool:
    """Whether chips may turn by any angle: some training label has a turned outline (else all are boxes)."""
    if rotate_any <= 0:
        return False
    if any(im.index.oriented for im in images):
        return True
    log.info("train.rotate_any: the training labels are boxes (no turned outline), so chips turn by quarter turns only")
    return False


def _origin_range(im: TrainImage, t: int) -> tuple[int, int, int, int]:
    """Half-open ranges ``[x0, x1) x [y0, y1)`` of a background window's top-left corner: anywhere on the
    raster, or where the window can touch the area of interest's bounding box."""
    w, h = im.info.width, im.info.height
    x0, y0, x1, y1 = 0, 0, max(1, w - t + 1), max(1, h - t + 1)
    if im.aoi is not None and not im.aoi.is_empty:
        bx0, by0, bx1, by1 = im.aoi.bounds
        x0, y0 = min(max(0, int(bx0) - t + 1), x1 - 1), min(max(0, int(by0) - t + 1), y1 - 1)
        x1, y1 = max(x0 + 1, min(x1, int(np.ceil(bx1)))), max(y0 + 1, min(y1, int(np.ceil(by1))))
    return x0, y0, x1, y1


def collate_chips(
    batch: list[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Lists of images and targets, as torchvision detection models take them."""
    fault_point("train.batch")
    images = [b[0] for b in batch]
    targets = [b[1] for b in batch]
    return images, targets
