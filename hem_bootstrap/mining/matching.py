"""Detections of one image against its ground truth: true positive, false positive or ignore.

Only clear false positives are worth mining, so matching has three outcomes:

* ``tp``: the detection overlaps an object well (IoU >= ``tp_iou``, or centre within
  ``center_dist_m`` metres with ``matching="center"``);
* ``fp``: it overlaps no object at all, or barely (best IoU < ``fp_max_iou``, or centre
  farther than ``2 * center_dist_m`` metres) — a hard-negative candidate;
* ``ignore``: everything in between (a loose box on a real object, a neighbour's part) and
  anything inside an ignore geometry. Ignored detections are never mined.

The decision is **class-agnostic**: a detection on a labelled object of another class is a
classification error, not background, and mining its box as a negative would teach the
model that the object is background. Matching is also many-to-one: two detections on the
same object are both ``tp`` (a duplicate on a real object is no hard negative either;
one-to-one matching belongs to evaluation).

Centre distances are in metres: map offsets are scaled per axis by the raster's metres per
CRS unit (:meth:`hem_bootstrap.geo.raster.RasterInfo.metres_per_unit`), so ``center_dist_m``
means the same on a UTM raster and on a lon/lat (EPSG:4326) one.
"""

from __future__ import annotations

import math

import geopandas as gpd
import numpy as np
import shapely

from hem_bootstrap.config import MiningConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.boxes import CHUNK, best_match, paired_iou

STATUS_TP, STATUS_FP, STATUS_IGNORE = "tp", "fp", "ignore"
IGNORE_AREA_FRACTION = 0.5
"""A detection with more than this share of its area inside ignore geometry is ignored."""


def match_detections(
    dets: gpd.GeoDataFrame,
    gt: gpd.GeoDataFrame,
    cfg: MiningConfig,
    ignore: gpd.GeoDataFrame | None = None,
    metres_per_unit: tuple[float, float] = (1.0, 1.0),
) -> gpd.GeoDataFrame:
    """Label each detection of one image ``tp``, ``fp`` or ``ignore``.

    Args:
        dets: Detection frame of a single image (see :mod:`hem_bootstrap.detections`).
        gt: Ground-truth boxes of that image (``label``, ``class``, ``geometry``).
        cfg: Matching mode and thresholds (``matching``, ``tp_iou``, ``fp_max_iou``,
            ``center_dist_m``).
        ignore: Optional geometries (ignore zones, objects clipped at the raster edge) whose
            detections must not be mined: a detection with more than half of its area, or
            its centre, inside them is ``ignore`` unless it already matched an object.
        metres_per_unit: Ground metres per unit of the detections' CRS along x and y
            (``RasterInfo.metres_per_unit()`` of the image), so that centre distances are
            compared with ``center_dist_m`` in metres. The default suits metre CRSs and
            plain images.

    Returns:
        A copy of ``dets`` with ``status`` (str), ``best_iou`` (float, 0 with no overlap) and
        ``gt_index`` (int position in ``gt`` of the best-matching object, -1 when none).
        With ``matching="center"`` the best match is the nearest object centre (``gt_index``
        -1 for a false positive); ``best_iou`` is still the IoU with that object.

    Raises:
        DataError: ``dets`` holds several images, or ``metres_per_unit`` is not two finite
            positive numbers.
    """
    scale = check_metres_per_unit(metres_per_unit, "match_detections")
    out = dets.copy()
    _check_single_image(out)
    gt_ = _to_crs_of(gt, out, "ground truth")
    n = len(out)
    status = np.full(n, STATUS_FP, dtype=object)
    best_iou = np.zeros(n, dtype=np.float64)
    gt_index = np.full(n, -1, dtype=np.int64)
    if n and len(gt_):
        det_boxes = _bounds(out)
        gt_boxes = _bounds(gt_)
        if cfg.matching == "center":
            status, gt_index, best_iou = _classify_center(det_boxes, gt_boxes, cfg.center_dist_m, scale)
        else:
            status, gt_index, best_iou = _classify_iou(
                *best_match(det_boxes, gt_boxes), cfg.tp_iou, cfg.fp_max_iou
            )
    if n and ignore is not None and len(ignore):
        inside = ignored_mask(out, _to_crs_of(ignore, out, "ignore geometry"))
        status = np.where(inside & (status != STATUS_TP), STATUS_IGNORE, status)
    out["status"] = np.asarray(status, dtype=object).astype(str)
    out["best_iou"] = best_iou
    out["gt_index"] = gt_index
    return out


def check_metres_per_unit(value: tuple[float, float], what: str) -> tuple[float, float]:
    """``value`` as two floats, checked to be finite and positive.

    Raises:
        DataError: anything else (naming ``what`` and the value).
    """
    try:
        mx, my = (float(v) for v in value)
    except (TypeError, ValueError):
        raise DataError(f"{what}: metres_per_unit = {value!r}; expected two numbers (x, y)") from None
    if not (math.isfinite(mx) and math.isfinite(my) and mx > 0 and my > 0):
        raise DataError(f"{what}: metres_per_unit = {value!r}; expected two finite numbers > 0")
    return mx, my


def _check_single_image(dets: gpd.GeoDataFrame) -> None:
    if len(dets) and "image" in dets.columns:
        images = sorted(set(map(str, dets["image"])))
        if len(images) > 1:
            shown = ", ".join(images[:3]) + (", ..." if len(images) > 3 else "")
            raise DataError(f"match_detections: expected detections of one image, got {len(images)}: {shown}")


def _to_crs_of(frame: gpd.GeoDataFrame, ref: gpd.GeoDataFrame, what: str) -> gpd.GeoDataFrame:
    """``frame`` in ``ref``'s CRS (reprojected when both are set and differ)."""
    if frame.crs is not None and ref.crs is not None and frame.crs != ref.crs:
        try:
            return frame.to_crs(ref.crs)
        except Exception as err:  # pyproj raises several types
            raise DataError(f"{what}: cannot reproject from {frame.crs} to {ref.crs}: {err}") from None
    return frame


def _bounds(frame: gpd.GeoDataFrame) -> np.ndarray:
    """(N, 4) float64 ``minx, miny, maxx, maxy`` of each geometry."""
    return np.array(shapely.bounds(np.asarray(frame.geometry.values)), dtype=np.float64).reshape(-1, 4)


def _classify_iou(
    best: np.ndarray, idx: np.ndarray, tp_iou: float, fp_max_iou: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Status from each detection's best IoU: >= tp_iou tp, < fp_max_iou (or no overlap) fp."""
    best_np = np.asarray(best, dtype=np.float64)
    status = np.where(
        best_np >= tp_iou,
        STATUS_TP,
        np.where((best_np < fp_max_iou) | (best_np <= 0), STATUS_FP, STATUS_IGNORE),
    )
    gt_index = np.where(best_np > 0, idx, -1).astype(np.int64)
    return status.astype(object), gt_index, best_np


def _classify_center(
    det_boxes: np.ndarray, gt_boxes: np.ndarray, dist: float, scale: tuple[float, float] = (1.0, 1.0)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Status from the distance to the nearest object centre: <= d tp, > 2d fp, else ignore.

    Centres are scaled by ``scale`` (metres per CRS unit, x and y) first, so ``dist`` is in metres.
    """
    s = np.asarray(scale, dtype=np.float64)
    dc = (det_boxes[:, :2] + det_boxes[:, 2:]) / 2 * s
    gc = (gt_boxes[:, :2] + gt_boxes[:, 2:]) / 2 * s
    d_np, idx = np.zeros(len(dc)), np.zeros(len(dc), dtype=np.int64)
    for i in range(0, len(dc), CHUNK):
        d = np.sqrt(((dc[i : i + CHUNK, None, :] - gc[None, :, :]) ** 2).sum(axis=2))
        idx[i : i + CHUNK] = d.argmin(axis=1)
        d_np[i : i + CHUNK] = d[np.arange(len(d)), idx[i : i + CHUNK]]
    status = np.where(d_np <= dist, STATUS_TP, np.where(d_np > 2 * dist, STATUS_FP, STATUS_IGNORE))
    best_iou = paired_iou(det_boxes, gt_boxes[idx])
    gt_index = np.where(status == STATUS_FP, -1, idx).astype(np.int64)
    return status.astype(object), gt_index, best_iou


def ignored_mask(dets: gpd.GeoDataFrame, ignore: gpd.GeoDataFrame) -> np.ndarray:
    """True for detections whose centre, or more than half of whose area, lies in ``ignore``.

    A spatial index (shapely STRtree) keeps this linear in practice for large frames.
    """
    geoms = np.asarray(dets.geometry.values)
    zones = np.asarray(ignore.geometry.values)
    zones = zones[~shapely.is_missing(zones) & ~shapely.is_empty(zones)]
    out = np.zeros(len(geoms), dtype=bool)
    if len(zones) == 0 or len(geoms) == 0:
        return out
    tree = shapely.STRtree(zones)
    centres = shapely.centroid(geoms)
    hit_det, _ = tree.query(centres, predicate="within")
    out[hit_det] = True
    det_idx, zone_idx = tree.query(geoms, predicate="intersects")
    areas = shapely.area(geoms)
    for i in np.unique(det_idx[~out[det_idx]]):
        covered = shapely.union_all(zones[zone_idx[det_idx == i]])
        inter = shapely.area(shapely.intersection(geoms[i], covered))
        if areas[i] > 0 and inter > IGNORE_AREA_FRACTION * areas[i]:
            out[i] = True
    return out
