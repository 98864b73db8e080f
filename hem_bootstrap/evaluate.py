"""Held-out evaluation: AP (COCOeval), precision / recall, FP per km², recall at fixed FP per km².

Two views of the same detections:

* **AP** comes from ``COCOeval`` (faster-coco-eval's C++ port of the pycocotools reference, same
  numbers), built in memory from map-coordinate boxes. IoU does not depend on the unit (nor on
  scaling each axis), so map or pixel coordinates give the same AP.
* **Threshold sweep**: the detections are matched greedily, the way ``COCOeval`` does it
  (per image and class, by descending score, each detection takes the unmatched ground truth
  with the best IoU >= ``cfg.iou``, one-to-one). Matching in score order means the matches of
  every score prefix are fixed, so one pass gives TP/FP counts at every threshold: the
  operating point, FP/km² at a fixed recall, recall at a fixed FP/km² and the PR curve.

With ``matching="center"`` (point labels) a detection is a TP when its centre is within
``center_dist`` metres of an unmatched ground-truth centre: map offsets are scaled per axis by
each image's ``metres_per_unit`` (degrees on a lon/lat raster become metres). COCO has no such
mode, so AP is
then the all-point interpolated area under the sweep's PR curve (VOC style, per class, mean
over classes) and ``ap`` (AP@[.5:.95]) is ``None``; ``ap_method`` says which was used.

Ignore geometry (zones where labels are incomplete) removes detections from counting: one with
its centre, or more than half its area, inside ignore geometry that cannot be a TP (no
same-class ground truth at IoU >= ``cfg.iou`` / within ``center_dist``) is neither TP nor FP,
for AP and for the sweep alike.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely
from affine import Affine

from hem_bootstrap.config import EvaluateConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.files import atomic_write_text
from hem_bootstrap.geo.boxes import any_overlap, box_iou
from hem_bootstrap.mining.matching import check_metres_per_unit, ignored_mask
from hem_bootstrap.remote import location
from hem_bootstrap.scoring.breakdown import (
    away_log_average,
    fp_kinds,
    near_object_log_average,
    per_image,
    tp_score_quantiles,
)
from hem_bootstrap.scoring.match import (
    PreparedImage,
    center_dist,
    coco_ap,
    greedy_match,
    scaled,
)
from hem_bootstrap.scoring.sweep import (
    Sweep,
    allpoint_ap,
    build_sweep,
    fp_per_km2_at_recall,
    log_average_fp_per_km2,
    pr_curve,
    recall_at_fp_per_km2,
    threshold_at_recall,
)

DISTRACTOR_IOU = 0.1
"""A false positive counts as "on a distractor" above this IoU with it (or centre inside)."""
NEAR_OBJECT_IOU = 0.1
"""A false positive above this IoU with a labelled object is a localisation error or duplicate."""


@dataclass
class EvalImage:
    """One held-out raster: its ground truth and the area that was evaluated.

    Attributes:
        image: Raster path as written in the detections' ``image`` column.
        gt: Ground truth boxes (``label`` int, ``class`` str, ``geometry``) in the raster CRS.
        area_km2: Valid evaluated area, the denominator of FP per km².
        transform: The raster's affine transform (kept for callers; boxes stay in map units).
        distractors: Labelled look-alikes (synthetic scenes), for the FP analysis.
        ignore: Zones where labels are incomplete; detections there are not counted.
        metres_per_unit: Ground metres per CRS unit along x and y
            (``RasterInfo.metres_per_unit()``), so that ``center_dist`` is in metres; the
            default suits metre CRSs and plain images.
    """

    image: str
    gt: gpd.GeoDataFrame
    area_km2: float
    transform: Affine | None = None
    distractors: gpd.GeoDataFrame | None = None
    ignore: gpd.GeoDataFrame | None = None
    metres_per_unit: tuple[float, float] = (1.0, 1.0)


# ------------------------------------------------------------------------------ inputs


def _key(image: Any) -> str:
    return location(str(image))


def _frame_boxes(frame: pd.DataFrame, what: str) -> np.ndarray:
    """(N, 4) float64 bounds from ``geometry``, or from ``minx..maxy`` columns."""
    if len(frame) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    if "geometry" in frame.columns:
        geoms = np.asarray(frame["geometry"].values, dtype=object)
        if shapely.is_missing(geoms).any() or shapely.is_empty(geoms).any():
            raise DataError(
                f"{what}: {int((shapely.is_missing(geoms) | shapely.is_empty(geoms)).sum())} empty geometries"
            )
        return np.asarray(shapely.bounds(geoms), dtype=np.float64).reshape(-1, 4)
    cols = ["minx", "miny", "maxx", "maxy"]
    if all(c in frame.columns for c in cols):
        return frame[cols].to_numpy(dtype=np.float64)
    raise DataError(f"{what}: no 'geometry' column (or minx, miny, maxx, maxy); cannot read boxes")


def _check_detections(dets: pd.DataFrame, images: list[EvalImage]) -> dict[str, EvalImage]:
    """Columns present and every detection's image known; returns images by key."""
    by_key: dict[str, EvalImage] = {}
    for img in images:
        k = _key(img.image)
        if k in by_key:
            raise DataError(f"evaluate: image {img.image} is listed twice")
        by_key[k] = img
    if len(dets) == 0:
        return by_key
    missing = [c for c in ("image", "label", "score") if c not in dets.columns]
    if missing:
        raise DataError(
            f"detections: missing column(s) {', '.join(missing)}; expected image, label, score, geometry"
        )
    unknown = sorted({_key(i) for i in pd.unique(dets["image"])} - set(by_key))
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise DataError(
            f"detections: image {unknown[0]}{more} is not among the {len(by_key)} evaluated images"
        )
    return by_key


def _gt_arrays(img: EvalImage) -> tuple[np.ndarray, np.ndarray]:
    gt = img.gt
    if gt is None or len(gt) == 0:
        return np.zeros((0, 4), dtype=np.float64), np.zeros(0, dtype=np.int64)
    if "label" not in gt.columns:
        raise DataError(f"{img.image}: ground truth has no 'label' column")
    return _frame_boxes(gt, f"{img.image} ground truth"), gt["label"].to_numpy(dtype=np.int64)


def _near_objects(det_boxes: np.ndarray, gt_boxes: np.ndarray) -> np.ndarray:
    """True for detections overlapping any ground-truth box (IoU > NEAR_OBJECT_IOU, any class)."""
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return np.zeros(len(det_boxes), dtype=bool)
    return any_overlap(det_boxes, gt_boxes, NEAR_OBJECT_IOU)


def _could_match(
    det_boxes: np.ndarray,
    det_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    matching: str,
    thr: float,
    metres_per_unit: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """True for detections with a same-class ground truth close enough to be a TP (centres in metres)."""
    out = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return out
    if matching == "center":
        close = center_dist(scaled(det_boxes, metres_per_unit), scaled(gt_boxes, metres_per_unit)) <= thr
    else:
        close = box_iou(det_boxes, gt_boxes) >= thr
    same = det_labels[:, None] == gt_labels[None, :]
    return (close & same).any(axis=1)


def _ignored(boxes: np.ndarray, zones: gpd.GeoDataFrame) -> np.ndarray:
    """Detections with their centre, or more than half their area, in ``zones``."""
    frame = gpd.GeoDataFrame(geometry=shapely.box(*boxes.T) if len(boxes) else [], crs=zones.crs)
    return ignored_mask(frame, zones)


def _prepare(
    dets: pd.DataFrame, by_key: dict[str, EvalImage], matching: str, thr: float
) -> dict[str, PreparedImage]:
    """Per-image arrays, with detections in ignore geometry dropped."""
    names = {i: _key(i) for i in pd.unique(dets["image"])} if len(dets) else {}
    keys = dets["image"].map(names).to_numpy() if len(dets) else np.zeros(0, dtype=object)
    boxes = _frame_boxes(dets, "detections")
    scores = dets["score"].to_numpy(dtype=np.float64) if len(dets) else np.zeros(0)
    labels = dets["label"].to_numpy(dtype=np.int64) if len(dets) else np.zeros(0, dtype=np.int64)
    if not np.isfinite(scores).all():
        raise DataError("detections: non-finite score values")
    out: dict[str, PreparedImage] = {}
    for k, img in by_key.items():
        scale = check_metres_per_unit(img.metres_per_unit, f"evaluate: image {img.image}")
        sel = keys == k
        db, ds, dl = boxes[sel], scores[sel], labels[sel]
        gb, gl = _gt_arrays(img)
        n_ign = 0
        if img.ignore is not None and len(img.ignore) and len(db):
            drop = _ignored(db, img.ignore) & ~_could_match(db, dl, gb, gl, matching, thr, scale)
            n_ign = int(drop.sum())
            db, ds, dl = db[~drop], ds[~drop], dl[~drop]
        out[k] = PreparedImage(db, ds, dl, gb, gl, n_ign, scale)
    return out


# ---------------------------------------------------------------------------- matching


# ------------------------------------------------------------------------------- sweep


# ---------------------------------------------------------------------------------- COCO


# ---------------------------------------------------------------------------- distractors


def _distractor_class(frame: gpd.GeoDataFrame) -> np.ndarray:
    for col in ("class", "label", "kind", "type"):
        if col in frame.columns:
            return frame[col].astype(str).to_numpy()
    return np.full(len(frame), "distractor", dtype=object)


def distractor_hits(boxes: np.ndarray, distractors: gpd.GeoDataFrame) -> list[str | None]:
    """For each box (map coordinates, e.g. a false positive): the class of the distractor it lies on (IoU > 0.1 or centre inside), else None."""
    out: list[str | None] = [None] * len(boxes)
    geoms = np.asarray(distractors.geometry.values, dtype=object)
    valid = ~(shapely.is_missing(geoms) | shapely.is_empty(geoms))
    geoms, classes = geoms[valid], _distractor_class(distractors)[valid]
    if len(boxes) == 0 or len(geoms) == 0:
        return out
    tree = shapely.STRtree(geoms)
    fp_geoms = shapely.box(*boxes.T)
    best = np.full(len(boxes), -1.0)
    d_idx, z_idx = tree.query(fp_geoms, predicate="intersects")
    if len(d_idx):
        inter = shapely.area(shapely.intersection(fp_geoms[d_idx], geoms[z_idx]))
        union = shapely.area(shapely.union(fp_geoms[d_idx], geoms[z_idx]))
        iou = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
        for d, z, v in zip(d_idx, z_idx, iou, strict=True):
            if v > DISTRACTOR_IOU and v > best[d]:
                best[d], out[d] = v, str(classes[z])
    c_idx, cz_idx = tree.query(shapely.centroid(fp_geoms), predicate="within")
    for d, z in zip(c_idx, cz_idx, strict=True):
        if out[d] is None:
            out[d] = str(classes[z])
    return out


def _distractor_stats(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], by_key: dict[str, EvalImage], thr: float
) -> dict[str, Any]:
    """Share of FPs at the operating threshold that sit on labelled distractors, and by class."""
    hits: list[str | None] = []
    for k, im in prepared.items():
        fp = (im.det_scores >= thr) & ~flags[k]
        dis = by_key[k].distractors
        if dis is None or len(dis) == 0:
            hits.extend([None] * int(fp.sum()))
        else:
            hits.extend(distractor_hits(im.det_boxes[fp], dis))
    on = [h for h in hits if h is not None]
    return {
        "fp_on_distractors": len(on),
        "fp_on_distractors_share": (len(on) / len(hits)) if hits else None,
        "fp_by_distractor_class": dict(sorted(Counter(on).items())),
    }


# ------------------------------------------------------------------------------ evaluate


def _class_names(images: list[EvalImage]) -> dict[int, str]:
    names: dict[int, str] = {}
    for img in images:
        if img.gt is not None and len(img.gt) and "class" in img.gt.columns:
            for lab, name in zip(img.gt["label"].astype(int), img.gt["class"].astype(str), strict=True):
                names.setdefault(int(lab), name)
    return names


def _ratio(a: float, b: float) -> float | None:
    return float(a / b) if b > 0 else None


def evaluate(
    dets: gpd.GeoDataFrame | pd.DataFrame,
    images: list[EvalImage],
    cfg: EvaluateConfig,
    matching: str = "iou",
    center_dist: float = 2.0,
) -> dict[str, Any]:
    """Metrics of a detection frame on held-out images, as a JSON-able dict.

    Args:
        dets: Detection frame (``image``, ``label``, ``score``, box ``geometry``) in map units.
        images: The evaluated images; every detection's ``image`` must be one of them.
        cfg: IoU, operating threshold, fixed recalls and fixed FP/km² to report.
        matching: ``"iou"`` (COCO AP) or ``"center"`` (point labels, all-point AP of the sweep).
        center_dist: Centre distance in metres for a TP with ``matching="center"`` (map
            offsets scaled by each image's ``metres_per_unit``).

    Returns:
        ``ap50`` (AP at ``cfg.iou``), ``ap`` (AP@[.5:.95]), ``per_class`` (K > 1), the
        operating point (``tp``, ``fp``, ``fn``, ``precision``, ``recall``, ``f1``,
        ``fp_per_km2``), ``fp_per_km2_at_recall``, the same two for FPs away from every labelled
        object (``fp_away_per_km2``, ``fp_away_per_km2_at_recall``: look-alikes and background,
        without localisation errors and duplicates; ``fp_near_objects`` counts those),
        ``recall_at_fp_per_km2``, ``log_avg_fp_per_km2`` (geometric mean of FP/km² over recall
        0.5-0.9) and ``log_avg_fp_near_per_km2`` (the same counting only FPs that touch an object:
        the floor that removing every FP away from objects would reach), ``log_avg_fp_away_per_km2``
        (counting only the FPs away from objects: what negatives can change), ``per_image`` (each image's FP/km² at the fixed recalls and log-average),
        ``fp_kinds_at_recall`` (look-alike / background / duplicate / localisation counts at
        each fixed recall), ``tp_score_quantiles``, ``pr_curve``,
        counts and area, and distractor statistics when any image has distractors.

    Raises:
        DataError: a detection names an unknown image, columns / geometries are missing, or an
            image's ``metres_per_unit`` is not two finite positive numbers.
    """
    if matching not in ("iou", "center"):
        raise DataError(f"evaluate: matching = {matching!r}; expected 'iou' or 'center'")
    dets = pd.DataFrame(dets) if not isinstance(dets, pd.DataFrame) else dets
    by_key = _check_detections(dets, images)
    thr = center_dist if matching == "center" else cfg.iou
    prepared = _prepare(dets, by_key, matching, thr)
    flags = {
        k: greedy_match(im.det_boxes, im.det_scores, im.det_labels, im.gt_boxes, im.gt_labels, thr, matching,
                        im.metres_per_unit)
        for k, im in prepared.items()
    }
    # FPs touching an object, per image: computed once (an IoU of every detection with every object)
    near = {k: _near_objects(im.det_boxes, im.gt_boxes) & ~flags[k] for k, im in prepared.items()}
    pooled = _Pooled.of(prepared, flags, near)
    sweep = build_sweep(pooled.scores, pooled.tp, pooled.n_gt)
    area = float(sum(max(img.area_km2, 0.0) for img in images))
    categories = sorted(set(pooled.gt_labels.tolist()) | set(pooled.labels.tolist()))
    ap50, ap, per_class_ap, ap_method = _average_precision(prepared, pooled, categories, cfg.iou, matching)
    metrics: dict[str, Any] = {
        "matching": matching,
        "iou": cfg.iou if matching == "iou" else None,
        "center_dist": center_dist if matching == "center" else None,
        "ap_method": ap_method,
        "ap50": ap50,
        "ap": ap,
        "score_threshold": cfg.score_threshold,
        **_operating_point(pooled, cfg.score_threshold),
        **_fp_rates(pooled, sweep, area, cfg),
        "area_km2": area,
        "n_images": len(images),
        "n_gt": pooled.n_gt,
        "n_det": int(len(pooled.scores)),
        "n_ignored": int(sum(im.n_ignored for im in prepared.values())),
        "pr_curve": pr_curve(sweep),
        **_diagnostics(prepared, flags, near, pooled, sweep, by_key, cfg, matching, thr),
    }
    if len(categories) > 1:
        metrics["per_class"] = _per_class(pooled, categories, per_class_ap, _class_names(images), area, cfg)
    if any(img.distractors is not None for img in images):
        metrics.update(_distractor_stats(prepared, flags, by_key, cfg.score_threshold))
    return metrics


def _diagnostics(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], near: dict[str, np.ndarray], pooled: _Pooled,
    sweep: Sweep,
    by_key: dict[str, EvalImage], cfg: EvaluateConfig, matching: str, thr: float,
) -> dict[str, Any]:
    """Per-image FP/km², FPs by kind at the fixed recalls, and the spread of true-positive scores."""

    def on_distractor(key: str, boxes: np.ndarray) -> list[str | None]:
        dis = by_key[key].distractors
        return [None] * len(boxes) if dis is None or len(dis) == 0 else distractor_hits(boxes, dis)

    return {
        "per_image": per_image(prepared, flags, near, {k: im.area_km2 for k, im in by_key.items()}, cfg.fixed_recalls),
        "fp_kinds_at_recall": fp_kinds(prepared, flags, sweep, thr, cfg.fixed_recalls, on_distractor, matching),
        "tp_score_quantiles": tp_score_quantiles(pooled.scores, pooled.tp),
    }


@dataclass
class _Pooled:
    """Every image's detections in one set of arrays, with their TP flags and whether they touch an object."""

    scores: np.ndarray
    labels: np.ndarray
    gt_labels: np.ndarray
    tp: np.ndarray
    near: np.ndarray
    """FPs touching a labelled object: localisation errors or duplicates, which mining cannot remove."""

    @property
    def n_gt(self) -> int:
        return len(self.gt_labels)

    @classmethod
    def of(cls, prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray],
           near: dict[str, np.ndarray]) -> _Pooled:
        def cat(arrays: list[np.ndarray], dtype: Any) -> np.ndarray:
            return np.concatenate([*arrays, np.zeros(0, dtype=dtype)])

        ims = list(prepared.values())
        tp = cat([flags[k] for k in prepared], bool)
        near_all = cat([near[k] for k in prepared], bool)
        return cls(cat([im.det_scores for im in ims], np.float64), cat([im.det_labels for im in ims], np.int64),
                   cat([im.gt_labels for im in ims], np.int64), tp, near_all)


def _average_precision(
    prepared: dict[str, PreparedImage], pooled: _Pooled, categories: list[int], iou: float, matching: str
) -> tuple[float | None, float | None, dict[int, tuple[float | None, float | None]], str]:
    """``(AP at the IoU, AP@[.5:.95], per class, method)``: COCOeval for IoU matching, the sweep's all-point AP for centres."""
    if matching == "iou":
        return (*coco_ap(prepared, categories, iou, len(pooled.scores) > 0), "cocoeval")
    per: dict[int, tuple[float | None, float | None]] = {}
    for c in categories:
        sel = pooled.labels == c
        per[c] = (allpoint_ap(build_sweep(pooled.scores[sel], pooled.tp[sel], int((pooled.gt_labels == c).sum()))),
                  None)
    valid = [v[0] for v in per.values() if v[0] is not None]
    return (float(np.mean(valid)) if valid else None), None, per, "allpoint-center"


def _operating_point(pooled: _Pooled, threshold: float) -> dict[str, Any]:
    """TP, FP, FN, precision, recall and F1 of the detections scoring at least ``threshold``."""
    op = pooled.scores >= threshold
    tp, fp = int((pooled.tp & op).sum()), int((~pooled.tp & op).sum())
    fn = pooled.n_gt - tp
    return {"tp": tp, "fp": fp, "fn": fn, "precision": _ratio(tp, tp + fp), "recall": _ratio(tp, pooled.n_gt),
            "f1": _ratio(2 * tp, 2 * tp + fp + fn)}


def _fp_rates(pooled: _Pooled, sweep: Sweep, area: float, cfg: EvaluateConfig) -> dict[str, Any]:
    """FP per km² at the operating threshold and at fixed recalls (all FPs from the pooled ``sweep``, and those away from objects)."""
    away = ~pooled.near
    sweep_away = build_sweep(pooled.scores[away], pooled.tp[away], pooled.n_gt)
    op = pooled.scores >= cfg.score_threshold
    return {
        "fp_per_km2": _ratio(int((~pooled.tp & op).sum()), area),
        "fp_per_km2_at_recall": {str(float(r)): fp_per_km2_at_recall(sweep, r, area) for r in cfg.fixed_recalls},
        "threshold_at_recall": {str(float(r)): threshold_at_recall(sweep, r) for r in cfg.fixed_recalls},
        "log_avg_fp_per_km2": log_average_fp_per_km2(sweep, area),
        "log_avg_fp_near_per_km2": near_object_log_average(pooled.scores, pooled.tp, pooled.near, pooled.n_gt, area),
        "log_avg_fp_away_per_km2": away_log_average(pooled.scores, pooled.tp, pooled.near, pooled.n_gt, area),
        "fp_near_objects": int((pooled.near & op).sum()),
        "fp_away_per_km2": _ratio(int((~pooled.tp & away & op).sum()), area),
        "fp_away_per_km2_at_recall": {
            str(float(r)): fp_per_km2_at_recall(sweep_away, r, area) for r in cfg.fixed_recalls
        },
        "recall_at_fp_per_km2": {
            str(float(f)): recall_at_fp_per_km2(sweep, f, area) for f in cfg.fixed_fp_per_km2
        },
    }


def _per_class(
    pooled: _Pooled, categories: list[int], per_class_ap: dict[int, tuple[float | None, float | None]],
    names: dict[int, str], area: float, cfg: EvaluateConfig,
) -> dict[str, Any]:
    """Per class: counts, AP, and FP/km² (at the operating threshold and at the fixed recalls of that class)."""
    out = {}
    for c in categories:
        mine = pooled.labels == c
        n_gt = int((pooled.gt_labels == c).sum())
        sweep = build_sweep(pooled.scores[mine], pooled.tp[mine], n_gt)
        fp = int((mine & ~pooled.tp & (pooled.scores >= cfg.score_threshold)).sum())
        out[names.get(c, str(c))] = {
            "label": int(c),
            "n_gt": n_gt,
            "n_det": int(mine.sum()),
            "ap50": per_class_ap[c][0],
            "ap": per_class_ap[c][1],
            "fp_per_km2": _ratio(fp, area),
            "fp_per_km2_at_recall": {str(float(r)): fp_per_km2_at_recall(sweep, r, area) for r in cfg.fixed_recalls},
        }
    return out


# -------------------------------------------------------------------------------- output


def _jsonable(value: Any) -> Any:
    """Plain Python types for JSON: numpy scalars unwrapped, NaN / inf as None."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return [_jsonable(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics(path: str | Path, metrics: dict[str, Any]) -> None:
    """Write metrics as JSON under a temporary name and rename it, so a reader never sees half a file."""
    text = json.dumps(_jsonable(metrics), indent=2, allow_nan=False, default=str)
    atomic_write_text(Path(path), text + "\n")
