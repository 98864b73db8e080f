"""Vector labels reprojected to the raster CRS, as axis-aligned boxes; per-window targets.

Labels come from any OGR vector format (or GeoParquet), or from a pixel CSV for plain
images. Every label becomes a box polygon in the raster's CRS (pixel coordinates for a
raster without georeferencing, whose transform is the identity). :class:`LabelIndex` keeps
the same boxes in pixel space behind an STRtree and answers "what is inside this window".
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
from shapely import STRtree

from hem_bootstrap.config import DataConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.raster import RasterInfo
from hem_bootstrap.geo.windows import Window, clip_to_window, map_to_pixel_boxes, pixel_to_map_boxes

log = logging.getLogger(__name__)

CSV_COLUMNS = ("image", "xmin", "ymin", "xmax", "ymax", "label")
_POLYGONS = {"Polygon", "MultiPolygon"}
_POINTS = {"Point", "MultiPoint"}
OUTLINE = "outline_px"
"""Label frame column: the label's oriented outline, a (4, 2) array of raster-pixel corners."""
MIN_SIDE_PX = 0.01
"""Labels thinner than this (pixels) are slivers, e.g. a line drawn as a polygon; they are dropped."""


# --------------------------------------------------------------------------- reading


_LAYER_WARNED: set[tuple[Path, str | None]] = set()


def read_vector(path: Path, what: str = "label file", prefer: str | None = None) -> gpd.GeoDataFrame:
    """Read any OGR vector or a GeoParquet file into a GeoDataFrame.

    A file of several layers (a GeoPackage) gives ``prefer`` when it has that layer, else its
    first, named in a one-line warning.

    Raises:
        DataError: one line: ``path`` (``what`` it is) not found, or not a readable vector file.
    """
    path = Path(path)
    if not path.exists():  # a folder may be a dataset too (FileGDB, a folder of shapefiles)
        raise DataError(f"{path}: {what} not found")
    try:
        if path.suffix.lower() in (".parquet", ".geoparquet"):
            return gpd.read_parquet(path)
        layers = [str(name) for name, _ in pyogrio.list_layers(path)]
        layer = prefer if prefer in layers else layers[0] if layers else None
        if len(layers) > 1 and (path, layer) not in _LAYER_WARNED:  # once: a label file may serve many rasters
            _LAYER_WARNED.add((path, layer))
            log.warning("%s: %d layers (%s); %s read from layer %r", path, len(layers), ", ".join(layers), what, layer)
        return gpd.read_file(path, layer=layer)
    except Exception as err:  # noqa: BLE001 - pyogrio/arrow raise many types; report one line
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: not a readable vector file: {msg}") from None


def _empty(info: RasterInfo) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"label": np.zeros(0, np.int64), "class": np.array([], dtype=object)},
        geometry=[],
        crs=info.crs if info.georeferenced else None,
    )


def _fmt_bounds(b: tuple[float, float, float, float] | np.ndarray) -> str:
    return "(" + ", ".join(f"{v:.6g}" for v in b) + ")"


def _class_ids(values: pd.Series | None, n: int, data_cfg: DataConfig, path: Path) -> np.ndarray:
    """Class names -> ids 1..K in ``data_cfg.classes`` order."""
    classes = list(data_cfg.classes)
    if values is None:
        if len(classes) == 1:
            return np.ones(n, dtype=np.int64)
        raise DataError(
            f"{path}: no '{data_cfg.class_field}' column (data.class_field) and {len(classes)} classes "
            f"configured; expected one of {classes} per row"
        )
    lookup = {name: i + 1 for i, name in enumerate(classes)}
    missing = values.isna().to_numpy()
    if missing.any():
        raise DataError(
            f"{path}: {int(missing.sum())} label(s) have no value in '{data_cfg.class_field}' (data.class_field); "
            f"expected one of {classes} per row"
        )
    names = np.array([str(v) for v in values], dtype=object)
    unknown = sorted(set(names) - set(lookup))
    if unknown:
        raise DataError(
            f"{path}: unknown class {unknown[0]!r} in '{data_cfg.class_field}'; known classes: {classes}"
        )
    return np.array([lookup[v] for v in names], dtype=np.int64)


def _pixel_boxes_from_geoms(
    geoms: gpd.GeoSeries, info: RasterInfo, data_cfg: DataConfig, path: Path
) -> np.ndarray:
    """Pixel xyxy boxes of geometries already in the raster CRS (polygons: bbox; points: fixed box)."""
    types = set(geoms.geom_type.unique())
    mode = data_cfg.geometry
    if mode == "auto":
        if types <= _POLYGONS:
            mode = "polygon"
        elif types <= _POINTS:
            mode = "point"
        else:
            raise DataError(
                f"{path}: unsupported geometry type(s) {sorted(types)} with data.geometry=auto; "
                "expected all Polygon/MultiPolygon or all Point"
            )
    if mode == "polygon":
        if not types <= _POLYGONS:
            raise DataError(
                f"{path}: unsupported geometry type(s) {sorted(types - _POLYGONS)}; expected Polygon"
            )
        return map_to_pixel_boxes(geoms.bounds.to_numpy(), info.transform)
    if not types <= _POINTS | _POLYGONS:
        raise DataError(
            f"{path}: unsupported geometry type(s) {sorted(types - _POINTS - _POLYGONS)}; expected Point"
        )
    centres = geoms.centroid
    pts = np.stack([centres.x.to_numpy(), centres.y.to_numpy()], axis=1)
    px = map_to_pixel_boxes(np.concatenate([pts, pts], axis=1), info.transform)[:, :2]
    mx, my = info.pixel_size_m()
    half = np.array([data_cfg.point_box_m / 2 / mx, data_cfg.point_box_m / 2 / my])
    return np.concatenate([px - half, px + half], axis=1)


def _usable(boxes_px: np.ndarray, path: Path) -> np.ndarray:
    """Which boxes to keep: not without area (a zero-width polygon, a sliver under MIN_SIDE_PX) nor with non-finite corners.

    A detector cannot learn from the others (torchvision refuses zero-size target boxes), so they
    are dropped with one warning instead of failing training later.
    """
    ok = np.isfinite(boxes_px).all(axis=1)
    ok &= (boxes_px[:, 2] - boxes_px[:, 0] >= MIN_SIDE_PX) & (boxes_px[:, 3] - boxes_px[:, 1] >= MIN_SIDE_PX)
    if not ok.all():
        log.warning("%s: %d label(s) without area or with invalid coordinates ignored", path, int((~ok).sum()))
    return ok


def box_corners(boxes_px: np.ndarray) -> np.ndarray:
    """(N, 4) xyxy boxes -> (N, 4, 2) corners (the outline of a label known only by its box)."""
    b = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
    xs, ys = b[:, [0, 2, 2, 0]], b[:, [1, 1, 3, 3]]
    return np.stack([xs, ys], axis=2)


def _pixel_outlines(geoms: gpd.GeoSeries, info: RasterInfo, boxes_px: np.ndarray, polygons: bool) -> np.ndarray:
    """(N, 4, 2) raster-pixel corners of each label's minimum rotated rectangle (polygons), else of its box."""
    out = box_corners(boxes_px)
    if not polygons or len(geoms) == 0:
        return out
    rects = shapely.oriented_envelope(geoms.to_numpy())
    four = (shapely.get_type_id(rects) == 3) & (shapely.get_num_coordinates(rects) == 5)  # a real rectangle
    if four.any():
        xy = shapely.get_coordinates(shapely.get_exterior_ring(rects[four])).reshape(-1, 5, 2)[:, :4]
        inv = ~info.transform
        px = inv.a * xy[..., 0] + inv.b * xy[..., 1] + inv.c
        py = inv.d * xy[..., 0] + inv.e * xy[..., 1] + inv.f
        out[four] = np.stack([px, py], axis=2)
    return out


def _frame(
    boxes_px: np.ndarray, ids: np.ndarray, data_cfg: DataConfig, info: RasterInfo, outlines: np.ndarray | None = None
) -> gpd.GeoDataFrame:
    map_boxes = pixel_to_map_boxes(boxes_px, info.transform)
    outlines = box_corners(boxes_px) if outlines is None else outlines
    return gpd.GeoDataFrame(
        {"label": ids.astype(np.int64), "class": [data_cfg.classes[i - 1] for i in ids], OUTLINE: list(outlines)},
        geometry=shapely.box(map_boxes[:, 0], map_boxes[:, 1], map_boxes[:, 2], map_boxes[:, 3]),
        crs=info.crs if info.georeferenced else None,
    )


def _keep_overlapping(frame: gpd.GeoDataFrame, info: RasterInfo, path: Path) -> gpd.GeoDataFrame:
    """Keep the labels on the raster.

    Labels whose overall extent misses the raster mean a CRS or file mix-up and raise; a
    shared label file whose extent spans the raster but has no label on it (a raster with
    no objects in a mosaic) gives an empty frame.
    """
    if frame.empty:
        return frame
    rb = info.bounds
    raster_box = shapely.box(*rb)
    hit = frame.intersects(raster_box).to_numpy()
    if not hit.any() and not shapely.box(*frame.total_bounds).intersects(raster_box):
        raise DataError(
            f"{path}: labels do not overlap the raster {info.path.name}: labels bounds "
            f"{_fmt_bounds(frame.total_bounds)}, raster bounds {_fmt_bounds(rb)}"
        )
    return frame[hit].reset_index(drop=True)


def _load_csv(path: Path, info: RasterInfo, data_cfg: DataConfig, image_name: str | None) -> gpd.GeoDataFrame:
    try:
        table = pd.read_csv(path)
    except Exception as err:  # noqa: BLE001 - pandas raises several parser errors
        raise DataError(f"{path}: not a readable CSV: {str(err).splitlines()[0]}") from None
    missing = [c for c in CSV_COLUMNS if c not in table.columns]
    if missing:
        raise DataError(f"{path}: pixel CSV lacks column(s) {missing}; expected {list(CSV_COLUMNS)}")
    if image_name is not None:
        base = Path(image_name).name
        table = table[table["image"].astype(str).map(lambda s: Path(s).name) == base]
    if table.empty:
        return _empty(info)
    boxes = table[["xmin", "ymin", "xmax", "ymax"]].to_numpy(dtype=np.float64)
    boxes = np.stack(
        [
            np.minimum(boxes[:, 0], boxes[:, 2]),
            np.minimum(boxes[:, 1], boxes[:, 3]),
            np.maximum(boxes[:, 0], boxes[:, 2]),
            np.maximum(boxes[:, 1], boxes[:, 3]),
        ],
        axis=1,
    )
    ids = _class_ids(table["label"], len(table), data_cfg, path)
    ok = _usable(boxes, path)
    return _keep_overlapping(_frame(boxes[ok], ids[ok], data_cfg, info), info, path)


def _to_raster_crs(frame: gpd.GeoDataFrame, info: RasterInfo, path: Path, what: str = "label") -> gpd.GeoDataFrame:
    """Reproject to the raster CRS; refuse a CRS mismatch that cannot be resolved (``what`` names the file's role)."""
    if info.georeferenced:
        if frame.crs is None:
            raise DataError(
                f"{path}: {what} file has no CRS but raster {info.path.name} is in {info.crs}; set its CRS"
            )
        if frame.crs == info.crs:
            return frame
        out = frame.to_crs(info.crs)
        if not np.isfinite(out.geometry.bounds.to_numpy()).all():
            b = frame.total_bounds
            raise DataError(
                f"{path}: coordinates {_fmt_bounds(b)} are not valid in the file's CRS {frame.crs} "
                f"(reprojecting them to {info.crs} fails); is the CRS right? (GeoJSON is always lon/lat)"
            )
        return out
    if frame.crs is not None:
        raise DataError(
            f"{path}: {what} file is in {frame.crs} but raster {info.path.name} has no georeferencing; "
            "give pixel coordinates (a pixel CSV or a file without CRS)"
        )
    return frame


def load_labels(
    path: str | Path, info: RasterInfo, data_cfg: DataConfig, image_name: str | None = None
) -> gpd.GeoDataFrame:
    """Load labels for one raster as box polygons in its CRS.

    Returns a GeoDataFrame with ``label`` (int64 1..K), ``class`` (str), ``geometry``
    (axis-aligned box) and :data:`OUTLINE` (oriented outline in pixels). Labels off the raster
    are dropped; an empty file gives an empty frame.

    Raises:
        DataError: missing/unreadable file, CRS mismatch, no overlap, unknown class or an
            unsupported geometry type.
    """
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: label file not found")
    if p.suffix.lower() == ".csv":
        return _load_csv(p, info, data_cfg, image_name)
    frame = read_vector(p)
    if frame.empty:
        return _empty(info)
    dropped = frame.geometry.isna() | frame.geometry.is_empty
    if dropped.any():
        log.warning("%s: %d label(s) with empty geometry ignored", p, int(dropped.sum()))
        frame = frame[~dropped.to_numpy()]
        if frame.empty:
            return _empty(info)
    frame = _to_raster_crs(frame, info, p)
    values = frame[data_cfg.class_field] if data_cfg.class_field in frame.columns else None
    ids = _class_ids(values, len(frame), data_cfg, p)
    boxes = _pixel_boxes_from_geoms(frame.geometry, info, data_cfg, p)
    polygons = data_cfg.geometry != "point" and set(frame.geom_type.unique()) <= _POLYGONS
    outlines = _pixel_outlines(frame.geometry, info, boxes, polygons)
    ok = _usable(boxes, p)
    return _keep_overlapping(_frame(boxes[ok], ids[ok], data_cfg, info, outlines[ok]), info, p)


PixelLabels = dict[str, tuple[np.ndarray, np.ndarray]]
"""Resolved raster path -> ``(boxes (N, 4) float64 pixels, class ids (N,) int64)``: e.g. objects accepted in review."""


def pixel_labels_of(labels: PixelLabels, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One raster's entry of ``labels`` (empty arrays when it has none)."""
    return labels.get(str(Path(path).resolve()), (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)))


def with_pixel_labels(
    labels: gpd.GeoDataFrame, info: RasterInfo, boxes_px: np.ndarray, ids: np.ndarray, data_cfg: DataConfig
) -> gpd.GeoDataFrame:
    """``labels`` plus objects given as pixel boxes of this raster (e.g. positives accepted in review).

    The boxes become map polygons through the raster's own transform, so they land where the
    pixels are whatever CRS they were reviewed in.
    """
    boxes_px = np.asarray(boxes_px, dtype=np.float64).reshape(-1, 4)
    if len(boxes_px) == 0:
        return labels
    extra = _frame(boxes_px, np.asarray(ids, dtype=np.int64), data_cfg, info)
    if len(labels) == 0:
        return extra
    cols = ["label", "class", OUTLINE, "geometry"]
    if OUTLINE not in labels.columns:
        labels = labels.assign(**{OUTLINE: list(box_corners(map_to_pixel_boxes(labels.geometry.bounds.to_numpy(),
                                                                                 info.transform)))})
    return gpd.GeoDataFrame(pd.concat([labels[cols], extra[cols]], ignore_index=True), geometry="geometry",
                            crs=extra.crs)


def load_zones(path: str | Path, info: RasterInfo, what: str = "ignore zones") -> gpd.GeoDataFrame:
    """Polygons (ignore zones where labels are incomplete, or an area of interest), reprojected to the raster CRS."""
    p = Path(path)
    frame = read_vector(p, what)
    if frame.empty:
        return gpd.GeoDataFrame(geometry=[], crs=info.crs if info.georeferenced else None)
    frame = frame[~(frame.geometry.isna() | frame.geometry.is_empty).to_numpy()]
    types = set(frame.geom_type.unique())
    if not types <= _POLYGONS:
        raise DataError(f"{p}: {what} must be polygons, got {sorted(types - _POLYGONS)}")
    return _to_raster_crs(frame, info, p, what).reset_index(drop=True)


# --------------------------------------------------------------------------- index


def _empty_targets() -> dict[str, np.ndarray]:
    return {
        "boxes": np.zeros((0, 4), np.float32),
        "labels": np.zeros((0,), np.int64),
        "ignore": np.zeros((0, 4), np.float32),
    }


class LabelIndex:
    """Labels of one raster as pixel boxes behind an STRtree, queried per window.

    ``targets(window)`` gives the boxes a tile must learn (clipped to the tile, kept when at
    least ``min_visible_fraction`` of the box is inside) and the ones it must not be punished
    for (cut-off remainders and ignore zones).
    """

    def __init__(
        self,
        labels: gpd.GeoDataFrame,
        info: RasterInfo,
        min_visible_fraction: float,
        ignore_zones: gpd.GeoDataFrame | None = None,
    ) -> None:
        self.info = info
        self.min_visible_fraction = float(min_visible_fraction)
        if len(labels):
            self._boxes = map_to_pixel_boxes(labels.geometry.bounds.to_numpy(), info.transform)
            self._labels = labels["label"].to_numpy(dtype=np.int64)
        else:
            self._boxes = np.zeros((0, 4), np.float64)
            self._labels = np.zeros((0,), np.int64)
        self._outlines = (
            np.stack(list(labels[OUTLINE])).astype(np.float64).reshape(-1, 4, 2)
            if len(labels) and OUTLINE in labels.columns else box_corners(self._boxes)
        )
        self._tree = STRtree(shapely.box(*self._boxes.T)) if len(self._boxes) else None
        zones = ignore_zones if ignore_zones is not None and len(ignore_zones) else None
        self._zones = (
            map_to_pixel_boxes(zones.geometry.bounds.to_numpy(), info.transform)
            if zones is not None
            else np.zeros((0, 4), np.float64)
        )
        self._zone_tree = STRtree(shapely.box(*self._zones.T)) if len(self._zones) else None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tree"] = state["_zone_tree"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._tree = STRtree(shapely.box(*self._boxes.T)) if len(self._boxes) else None
        self._zone_tree = STRtree(shapely.box(*self._zones.T)) if len(self._zones) else None

    def count(self) -> int:
        """Number of labels on this raster."""
        return len(self._boxes)

    def pixel_boxes(self) -> np.ndarray:
        """All labels as (N, 4) float64 xyxy image-pixel boxes."""
        return self._boxes.copy()

    def pixel_labels(self) -> np.ndarray:
        """Class ids (N,) int64 matching :meth:`pixel_boxes`."""
        return self._labels.copy()

    def _query(self, tree: STRtree | None, window: Window) -> np.ndarray:
        if tree is None:
            return np.zeros(0, dtype=np.int64)
        x0, y0 = window.col_off, window.row_off
        area = shapely.box(x0, y0, x0 + window.valid_width, y0 + window.valid_height)
        return np.sort(tree.query(area, predicate="intersects"))

    @property
    def oriented(self) -> bool:
        """Whether some label's outline is turned against the pixel axes (polygons drawn around turned objects).

        Labels given as boxes (a CSV, points, box polygons) carry no orientation: every outline is
        its own box, and turning them by any angle would only make loose boxes.
        """
        o = self._outlines
        if len(o) == 0:
            return False
        area = shapely.area(shapely.polygons(o))
        box = np.ptp(o[:, :, 0], axis=1) * np.ptp(o[:, :, 1], axis=1)
        return bool((area < 0.98 * box).any())

    def outlines_in(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Oriented outlines (M, 4, 2) in image pixels and class ids (M,) of the labels touching ``window``."""
        hits = self._query(self._tree, window)
        return self._outlines[hits], self._labels[hits]

    def targets(self, window: Window) -> dict[str, np.ndarray]:
        """Targets of one window in tile pixels: ``boxes`` (N,4) f32, ``labels`` (N,) i64, ``ignore`` (M,4) f32."""
        out = _empty_targets()
        hits = self._query(self._tree, window)
        ignore: list[np.ndarray] = []
        if len(hits):
            clipped, vis = clip_to_window(self._boxes[hits], window)
            nonempty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
            keep = nonempty & (vis >= self.min_visible_fraction) & (vis > 0)
            out["boxes"] = clipped[keep].astype(np.float32)
            out["labels"] = self._labels[hits][keep]
            ignore.append(clipped[nonempty & ~keep])
        zhits = self._query(self._zone_tree, window)
        if len(zhits):
            zclipped, _ = clip_to_window(self._zones[zhits], window)
            ignore.append(zclipped[(zclipped[:, 2] > zclipped[:, 0]) & (zclipped[:, 3] > zclipped[:, 1])])
        if ignore:
            out["ignore"] = np.concatenate(ignore).astype(np.float32).reshape(-1, 4)
        return out
