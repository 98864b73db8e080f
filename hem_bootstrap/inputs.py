"""The experiment's inputs, checked once: one object per raster with its header, labels and overlays.

:func:`check_inputs` (the preflight of ``hem run``) expands every image set, opens each
raster's header once, validates bands, labels and overlay files, and returns :class:`Inputs`.
The steps of every round then take headers and labels from there instead of opening and
parsing the files again. A pool or test raster that does not open is kept as unreadable
(``data.on_bad_raster: skip``) so the scan can log and count it; a missing file is an error.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
from shapely.geometry.base import BaseGeometry

from hem_bootstrap.config import DataConfig, ExperimentConfig, ImageSet
from hem_bootstrap.errors import DataError, ModelError
from hem_bootstrap.geo.aoi import zones_in_pixels
from hem_bootstrap.geo.area import EvaluatedArea, evaluated_area
from hem_bootstrap.geo.boxes import overlapping, paired_iou
from hem_bootstrap.geo.labels import (
    PixelLabels,
    load_labels,
    load_zones,
    pixel_labels_of,
    read_vector,
    with_pixel_labels,
)
from hem_bootstrap.geo.raster import RasterInfo, RasterReader, open_raster
from hem_bootstrap.geo.vrt import virtual_paths
from hem_bootstrap.geo.windows import map_to_pixel_boxes
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.hard_mining import apply_loss_options
from hem_bootstrap.remote import apply_gdal_options, exists

log = logging.getLogger(__name__)

ROLES = ("train", "pool", "val", "test")
HELD_OUT = ("val", "test")
"""Roles never trained on or mined."""


@dataclass
class RasterInput:
    """One raster of an image set: its header (None when it does not open) and its overlays, loaded once."""

    path: Path
    image_set: ImageSet
    role: str
    info: RasterInfo | None
    error: str = ""
    labels: gpd.GeoDataFrame | None = None
    _overlays: dict[str, gpd.GeoDataFrame | None] = field(default_factory=dict, repr=False)
    _area: EvaluatedArea | None = field(default=None, repr=False)

    @property
    def readable(self) -> bool:
        """Whether the header opened."""
        return self.info is not None

    def header(self) -> RasterInfo:
        """The raster's header (a readable raster only)."""
        assert self.info is not None, f"{self.path} is not readable"
        return self.info

    def truth(self, cfg: ExperimentConfig, accepted: PixelLabels | None = None) -> gpd.GeoDataFrame:
        """Labels in the raster's CRS (an empty frame without a label file), plus objects accepted in review.

        Outside training, only objects that touch the image set's area of interest count: nothing
        outside it is scanned. Training keeps every labelled object as a positive.
        """
        info = self.header()
        gt = self.labels if self.labels is not None else _no_labels(info)
        if accepted:
            gt = with_pixel_labels(gt, info, *pixel_labels_of(accepted, self.path), cfg.data)
        aoi = self.aoi()
        if aoi is not None and len(gt) and self.role != "train":  # objects outside the area are never searched for
            gt = gt[gt.intersects(aoi.union_all()).to_numpy()].reset_index(drop=True)
        return gt

    def zones(self) -> gpd.GeoDataFrame | None:
        """Ignore zones, validated polygons in the raster's CRS (None without a file); training uses the same."""
        if "ignore_zones" not in self._overlays:
            path = self.image_set.ignore_zones
            self._overlays["ignore_zones"] = None if path is None else load_zones(path, self.header())
        return self._overlays["ignore_zones"]

    def aoi(self) -> gpd.GeoDataFrame | None:
        """The image set's area of interest, validated polygons in the raster's CRS (None without one)."""
        if "aoi" not in self._overlays:
            path = self.image_set.aoi
            self._overlays["aoi"] = None if path is None else load_zones(path, self.header(), f"data.{self.role} aoi")
        return self._overlays["aoi"]

    def aoi_pixels(self) -> BaseGeometry | None:
        """The area of interest in the raster's pixels, prepared for many tests (None without one)."""
        zones = self.aoi()
        return None if zones is None else zones_in_pixels(zones, self.header())

    def distractors(self) -> gpd.GeoDataFrame | None:
        """Labelled look-alikes reprojected to the raster's CRS, attributes kept (None without a file)."""
        return self._overlay("distractors")

    def _overlay(self, key: str) -> gpd.GeoDataFrame | None:
        if key not in self._overlays:
            path = getattr(self.image_set, key)
            self._overlays[key] = None if path is None else read_overlay(path, self.header())
        return self._overlays[key]

    def searched_area(self, cfg: ExperimentConfig) -> EvaluatedArea:
        """Valid ground minus ignore zones, read once per process (a full mask read, so not once a round).

        Under ``data.on_bad_raster: skip`` a raster whose masks do not read counts whole (logged),
        as the scan skips its unreadable tiles and goes on.
        """
        if self._area is None:
            try:
                self._area = evaluated_area(self.header(), cfg.data.bands, self.zones(), self.aoi())
            except DataError as err:
                if cfg.data.on_bad_raster == "fail":
                    raise
                log.warning("evaluated area of %s taken as the whole raster: %s", self.path, err)
                whole = self.header().area_km2()
                self._area = EvaluatedArea(whole, whole, 0.0)
        return self._area

    def as_set(self) -> ImageSet:
        """Its image set narrowed to this one raster."""
        return self.image_set.model_copy(update={"images": [str(self.path)]})


@dataclass
class Inputs:
    """Every raster of ``data.train``, ``data.pool`` and ``data.test``, in config order."""

    rasters: dict[str, list[RasterInput]]

    def of(self, role: str) -> list[RasterInput]:
        """All rasters of a role, readable or not."""
        return self.rasters[role]

    def readable(self, role: str) -> list[RasterInput]:
        """The rasters of a role whose header opened (mining, evaluation and training skip the others)."""
        return [r for r in self.rasters[role] if r.readable]

    def paths(self, role: str) -> list[Path]:
        """Paths of all rasters of a role."""
        return [r.path for r in self.rasters[role]]


def expand(sets: list[ImageSet], what: str, data: DataConfig) -> list[tuple[Path, ImageSet]]:
    """The rasters of image sets, globs expanded, each with its set, read as :mod:`~hem_bootstrap.geo.vrt`
    says (a set of mosaic tiles as its one VRT, a raster at another GSD than ``data.gsd`` through a VRT).

    Raises:
        DataError: a set matches nothing, or a raster is listed twice.
    """
    out: list[tuple[Path, ImageSet]] = []
    seen: set[Path] = set()
    for i, s in enumerate(sets):
        paths = s.resolved_images()
        if not paths:
            raise DataError(f"data.{what}: no raster matches {s.images}")
        for p in paths:
            if p.resolve() in seen:
                raise DataError(f"data.{what}: image {p} is listed twice")
            seen.add(p.resolve())
        paths = virtual_paths(paths, f"data.{what}[{i}]", s.labels, s.mosaic == "auto", data.gsd, data.resampling)
        for p in paths:
            out.append((p, s))
    return out


def check_inputs(cfg: ExperimentConfig, roles: tuple[str, ...] = ROLES) -> Inputs:
    """Check every input before a run starts, so a bad path, band or label file fails in seconds, not after training.

    Opens each raster's header and loads its labels once. A pool or test raster that exists
    but does not open is kept as unreadable under ``data.on_bad_raster: skip``. ``roles``: the
    image sets to check (a command that only detects or evaluates needs no training imagery).

    Raises:
        DataError: no training imagery, no image matched, an image listed twice or in both
            the held-out set and the pool/train sets, a missing or unreadable file, a set with
            no readable raster, a band that does not exist, bad labels.
        ModelError: a weights file that does not exist; with ``train`` in ``roles``, what
            :func:`check_training` finds.
    """
    apply_gdal_options(cfg.runtime.gdal)  # before the first raster opens
    if "train" in roles and not cfg.data.train:
        raise DataError("data.train: no training imagery configured; expected at least one image set")
    where: dict[Path, str] = {}
    rasters: dict[str, list[RasterInput]] = {}
    for what in roles:
        sets: list[ImageSet] = getattr(cfg.data, what)
        rasters[what] = []
        for i, s in enumerate(sets):
            if what == "val" and s.labels is None:
                raise DataError(f"data.val[{i}]: no labels; validation imagery needs labels to choose a threshold")
        for path in (p for s in sets for p in s.resolved_images()):  # the files, also where a VRT reads them
            _check_held_out(path, what, where)
        for path, s in expand(sets, what, cfg.data):
            rasters[what].append(_check_raster(path, s, what, cfg))
        _check_sets_readable(sets, rasters[what], what)
    if cfg.data.gsd is None:
        _warn_mixed_gsd([r for role in rasters.values() for r in role if r.readable])
    for key in ("weights", "backbone_weights"):
        value = getattr(cfg.model, key)
        if value is not None and not Path(value).is_file():
            found = "is a directory" if Path(value).is_dir() else "not found"
            raise ModelError(f"model.{key}: {value} {found}; give a local .pth/.pt file")
    inputs = Inputs(rasters)
    if "train" in roles:
        check_training(cfg, inputs)
    return inputs


def check_training(cfg: ExperimentConfig, inputs: Inputs) -> None:
    """What training needs, checked before anything is written: labelled objects, and a model the config builds.

    The detector is built once as round 0 will build it (weights read and fitted, stages frozen,
    loss options applied), so weights of another arch, a corrupt file or an option the arch
    cannot take fail here, in seconds, not after the run directory exists. A class of
    ``data.classes`` without a single training label is a warning: its AP can only be 0.

    Raises:
        DataError: the training label files hold no object of ``data.classes``.
        ModelError: weights that do not read or fit, options the arch cannot take.
    """
    counts = np.zeros(cfg.num_classes, np.int64)
    for r in inputs.readable("train"):
        if r.labels is not None and len(r.labels):
            counts += np.bincount(r.labels["label"].to_numpy(np.int64), minlength=cfg.num_classes)[: cfg.num_classes]
    if not counts[1:].any():
        files = sorted({str(s.labels) for s in cfg.data.train if s.labels is not None}) or ["none given"]
        raise DataError(f"data.train labels ({', '.join(files)}): no object of data.classes {list(cfg.data.classes)} "
                        "on the training images; a detector needs labelled objects to learn from")
    for name, n in zip(cfg.data.classes, counts[1:], strict=True):
        if n == 0:
            log.warning("data.classes: no training label of class %r; it cannot be learnt and its AP will be 0", name)
    apply_loss_options(build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size), cfg.model, cfg.train)


def _warn_mixed_gsd(rasters: list[RasterInput]) -> None:
    """One warning when georeferenced rasters differ in ground resolution by more than 1 % (no ``data.gsd``)."""
    by_gsd: dict[float, list[str]] = {}
    for r in rasters:
        if r.header().georeferenced:
            by_gsd.setdefault(round(r.header().pixel_size_m()[0], 4), []).append(r.path.name)
    if len(by_gsd) > 1 and max(by_gsd) > 1.01 * min(by_gsd):
        named = ", ".join(f"{names[0]}{f' (+{len(names) - 1})' if len(names) > 1 else ''} {g:.3g} m"
                          for g, names in sorted(by_gsd.items()))
        log.warning("rasters at mixed ground resolutions: %s; the model sees objects at different sizes; "
                    "set data.gsd to read them all at one", named)


def _check_held_out(path: Path, what: str, where: dict[Path, str]) -> None:
    other = where.get(path.resolve())
    if other is not None and (what in HELD_OUT or other in HELD_OUT):
        raise DataError(f"data.{what}: image {path} is also in data.{other}; held-out imagery (data.val, "
                        "data.test) must not be trained on, mined or used twice")
    where[path.resolve()] = what


def _check_raster(path: Path, s: ImageSet, what: str, cfg: ExperimentConfig) -> RasterInput:
    if not exists(path):  # a typo, not a bad raster: data.on_bad_raster does not apply
        raise DataError(f"{path}: raster not found (data.{what})")
    try:
        info = open_raster(path)
    except DataError as err:
        if what == "train" or cfg.data.on_bad_raster == "fail":
            raise
        return RasterInput(path, s, what, None, error=str(err))
    bad = [b for b in cfg.data.bands if b > info.count]
    if bad:
        raise DataError(f"{path}: data.bands asks for band {bad[0]} but the raster has {info.count} band(s)")
    labels = load_labels(s.labels, info, cfg.data, image_name=path.name) if s.labels is not None else None
    for extra in (s.distractors, s.ignore_zones, s.aoi):
        if extra is not None and not Path(extra).is_file():
            raise DataError(f"{extra}: file not found (data.{what})")
    if labels is not None:
        _warn_labels_above_nms(path, labels, cfg.model.nms_iou)
        if what != "pool":
            _warn_labels_on_nodata(path, info, labels, what, cfg.data)
    raster = RasterInput(path, s, what, info, labels=labels)
    raster.zones()  # validated now (polygons, a usable CRS), not after training
    raster.aoi()
    raster.distractors()
    return raster


LABELS_SAMPLED_FOR_NODATA = 32
"""Labelled objects whose centre pixel :func:`_warn_labels_on_nodata` reads (spread over the label file)."""


def _warn_labels_on_nodata(path: Path, info: RasterInfo, labels: gpd.GeoDataFrame, what: str, data: DataConfig) -> None:
    """One warning when most labelled objects sit on no-data pixels (a wrong nodata value, labels of other imagery).

    Training would cut blank chips around them and evaluation would count them all as missed.
    The masks of at most :data:`LABELS_SAMPLED_FOR_NODATA` centres on the raster are read, one
    pixel each (nothing for a raster that declares no nodata or mask).
    """
    boxes = map_to_pixel_boxes(labels.geometry.bounds.to_numpy(), info.transform)
    cols = np.floor((boxes[:, 0] + boxes[:, 2]) / 2).astype(np.int64)
    rows = np.floor((boxes[:, 1] + boxes[:, 3]) / 2).astype(np.int64)
    on = np.flatnonzero((cols >= 0) & (cols < info.width) & (rows >= 0) & (rows < info.height))  # not edge-cut
    if not len(on):
        return
    picks = on[np.unique(np.linspace(0, len(on) - 1, min(len(on), LABELS_SAMPLED_FOR_NODATA)).astype(np.int64))]
    try:
        with RasterReader(path, data) as reader:
            valid = reader.valid_at(cols[picks], rows[picks])
    except DataError:  # a raster whose data does not read is reported where it is read
        return
    share = 1 - float(valid.mean())
    if share > 0.5:
        log.warning("%s: %.0f %% of the labelled objects (data.%s; %d sampled) lie on no-data pixels: training "
                    "cuts blank chips there and evaluation counts them missed; check the raster's nodata value and "
                    "that the labels belong to this image", path, 100 * share, what, len(picks))


def _warn_labels_above_nms(path: Path, labels: gpd.GeoDataFrame, nms_iou: float) -> None:
    """One warning when labelled objects of one class overlap each other by more than the detector's NMS IoU.

    The detector's NMS keeps one box of any such pair, so those objects can never all be found:
    ``model.nms_iou`` is too low for this imagery (seen top-down, objects rarely overlap).
    """
    boxes = labels.geometry.bounds.to_numpy()
    i, j = overlapping(boxes, boxes)
    ids = labels["label"].to_numpy()
    pair = (i < j) & (ids[i] == ids[j])
    i, j = i[pair], j[pair]
    above = paired_iou(boxes[i], boxes[j]) > nms_iou
    if above.any():
        n = len(np.union1d(i[above], j[above]))
        log.warning("%s: %d of %d labelled objects overlap another of their class by IoU > model.nms_iou (%g); "
                    "the detector's NMS keeps one of each such pair; raise model.nms_iou", path, n, len(labels),
                    nms_iou)


def _check_sets_readable(sets: list[ImageSet], rasters: list[RasterInput], what: str) -> None:
    for i, s in enumerate(sets):
        mine = [r for r in rasters if r.image_set is s]
        if mine and not any(r.readable for r in mine):
            raise DataError(f"data.{what}[{i}]: no readable raster in {s.images} (data.on_bad_raster: skip "
                            f"skips bad rasters, but a set needs one that reads); first: {mine[0].error}")


def read_overlay(path: str | Path, info: RasterInfo) -> gpd.GeoDataFrame:
    """Distractors or ignore zones, reprojected to the raster's CRS, any attribute kept.

    Raises:
        DataError: the file does not exist.
    """
    frame = read_vector(Path(path), "file")
    if info.georeferenced and frame.crs is not None and frame.crs != info.crs:
        frame = frame.to_crs(info.crs)
    return frame


def _no_labels(info: RasterInfo) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame({"label": np.zeros(0, np.int64), "class": np.array([], dtype=object)}, geometry=[],
                            crs=info.crs if info.georeferenced else None)
