"""Held-out evaluation: AP (pycocotools), precision / recall, FP per km², recall at fixed FP per km².

Two views of the same detections:

* **AP** comes from pycocotools' ``COCOeval`` (the reference implementation), built in memory
  from map-coordinate boxes. IoU does not depend on the unit (nor on scaling each axis), so map
  or pixel coordinates give the same AP.
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

import contextlib
import io
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
from hem_bootstrap.geo.boxes import box_iou
from hem_bootstrap.mining.matching import check_metres_per_unit, ignored_mask

PR_CURVE_POINTS = 200
"""Most points kept in ``pr_curve`` (enough to plot, small enough for metrics.json)."""
DISTRACTOR_IOU = 0.1
"""A false positive counts as "on a distractor" above this IoU with it (or centre inside)."""
NEAR_OBJECT_IOU = 0.1
"""A false positive above this IoU with a labelled object is a localisation error or duplicate."""
COCO_IOUS = np.round(np.linspace(0.5, 0.95, 10), 2)
"""The IoU thresholds of COCO's AP@[.5:.95]."""


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


@dataclass
class _Image:
    """Arrays of one image after ignore filtering (boxes are ``minx, miny, maxx, maxy``, map units)."""

    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    n_ignored: int = 0
    metres_per_unit: tuple[float, float] = (1.0, 1.0)


# ------------------------------------------------------------------------------ inputs


def _key(image: Any) -> str:
    return str(Path(str(image)))


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
    return np.asarray((_iou(det_boxes, gt_boxes) > NEAR_OBJECT_IOU).any(axis=1), dtype=bool)


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
        close = _center_dist(_scaled(det_boxes, metres_per_unit), _scaled(gt_boxes, metres_per_unit)) <= thr
    else:
        close = _iou(det_boxes, gt_boxes) >= thr
    same = det_labels[:, None] == gt_labels[None, :]
    return (close & same).any(axis=1)


def _ignored(boxes: np.ndarray, zones: gpd.GeoDataFrame) -> np.ndarray:
    """Detections with their centre, or more than half their area, in ``zones``."""
    frame = gpd.GeoDataFrame(geometry=shapely.box(*boxes.T) if len(boxes) else [], crs=zones.crs)
    return ignored_mask(frame, zones)


def _prepare(
    dets: pd.DataFrame, by_key: dict[str, EvalImage], matching: str, thr: float
) -> dict[str, _Image]:
    """Per-image arrays, with detections in ignore geometry dropped."""
    names = {i: _key(i) for i in pd.unique(dets["image"])} if len(dets) else {}
    keys = dets["image"].map(names).to_numpy() if len(dets) else np.zeros(0, dtype=object)
    boxes = _frame_boxes(dets, "detections")
    scores = dets["score"].to_numpy(dtype=np.float64) if len(dets) else np.zeros(0)
    labels = dets["label"].to_numpy(dtype=np.int64) if len(dets) else np.zeros(0, dtype=np.int64)
    if not np.isfinite(scores).all():
        raise DataError("detections: non-finite score values")
    out: dict[str, _Image] = {}
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
        out[k] = _Image(db, ds, dl, gb, gl, n_ign, scale)
    return out


# ---------------------------------------------------------------------------- matching


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return box_iou(a, b)


def _scaled(boxes: np.ndarray, metres_per_unit: tuple[float, float]) -> np.ndarray:
    """``boxes`` (N, 4) with x scaled by ``metres_per_unit[0]`` and y by ``metres_per_unit[1]``."""
    mx, my = metres_per_unit
    return boxes * np.array([mx, my, mx, my], dtype=np.float64)


def _center_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ca = (a[:, :2] + a[:, 2:]) / 2
    cb = (b[:, :2] + b[:, 2:]) / 2
    return np.sqrt(((ca[:, None, :] - cb[None, :, :]) ** 2).sum(axis=2))


def greedy_match(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    det_labels: np.ndarray,
    gt_boxes: np.ndarray,
    gt_labels: np.ndarray,
    thr: float,
    matching: str = "iou",
    metres_per_unit: tuple[float, float] = (1.0, 1.0),
) -> np.ndarray:
    """One-to-one matching of one image's detections, as ``COCOeval`` does it.

    Per class, detections in descending score order (stable) each take the unmatched ground
    truth with the best IoU >= ``thr`` (or, with ``matching="center"``, the nearest unmatched
    centre within ``thr`` metres, map offsets scaled per axis by ``metres_per_unit``). Only
    boxes that can reach each other are compared (groups of :func:`overlap_groups`), so a whole
    raster never builds a dense IoU matrix.

    Returns:
        Bool array, True where the detection (input order) is a true positive.
    """
    tp = np.zeros(len(det_boxes), dtype=bool)
    if len(det_boxes) == 0 or len(gt_boxes) == 0:
        return tp
    if matching == "center":
        # all centre maths in metres; squares of side thr around centres meet when they are <= thr apart per axis
        det_boxes, gt_boxes = _scaled(det_boxes, metres_per_unit), _scaled(gt_boxes, metres_per_unit)
        centres = np.r_[gt_boxes, det_boxes].reshape(-1, 2, 2).mean(axis=1)
        reach = np.c_[centres - thr / 2, centres + thr / 2]
    else:
        reach = np.r_[gt_boxes, det_boxes]
    groups = overlap_groups(reach)
    g_gt, g_det = groups[: len(gt_boxes)], groups[len(gt_boxes) :]
    gt_by, det_by = _members(g_gt), _members(g_det)
    for g in np.intersect1d(g_gt, g_det):
        d_idx, g_idx = det_by[g], gt_by[g]
        for lab in np.unique(det_labels[d_idx]):
            d_lab, g_lab = d_idx[det_labels[d_idx] == lab], g_idx[gt_labels[g_idx] == lab]
            if len(g_lab):
                tp[_match_block(det_boxes, det_scores, d_lab, gt_boxes, g_lab, thr, matching)] = True
    return tp


def _members(groups: np.ndarray) -> dict[int, np.ndarray]:
    """Indexes of each group's members, ascending."""
    order = np.argsort(groups, kind="mergesort")
    ids, starts = np.unique(groups[order], return_index=True)
    return {int(i): part for i, part in zip(ids, np.split(order, starts[1:]), strict=True)}


def _match_block(
    det_boxes: np.ndarray,
    det_scores: np.ndarray,
    d_idx: np.ndarray,
    gt_boxes: np.ndarray,
    g_idx: np.ndarray,
    thr: float,
    matching: str,
) -> np.ndarray:
    """Greedy one-to-one matching of detections ``d_idx`` to truth ``g_idx``; returns matched ``d_idx``."""
    d_idx = d_idx[np.argsort(-det_scores[d_idx], kind="mergesort")]
    if matching == "center":
        quality = -_center_dist(det_boxes[d_idx], gt_boxes[g_idx])
        bar = -thr
    else:
        quality = _iou(det_boxes[d_idx], gt_boxes[g_idx])
        bar = min(thr, 1 - 1e-10)  # COCOeval's cap, so IoU 1.0 boxes match at thr=1
    taken = np.zeros(len(g_idx), dtype=bool)
    hits = []
    for row, di in enumerate(d_idx):
        q = np.where(taken, -np.inf, quality[row])
        j = int(np.argmax(q))
        if q[j] >= bar:
            taken[j] = True
            hits.append(di)
    return np.asarray(hits, dtype=np.int64)


# ------------------------------------------------------------------------------- sweep


@dataclass
class Sweep:
    """Cumulative counts at every distinct score threshold, highest first.

    Point ``i`` keeps detections with ``score >= scores[i]``; point 0 is "nothing kept".
    """

    scores: np.ndarray
    tp: np.ndarray
    fp: np.ndarray
    n_gt: int

    @property
    def recall(self) -> np.ndarray:
        """TP / number of ground truth objects (zeros when there are none)."""
        return self.tp / self.n_gt if self.n_gt else np.zeros(len(self.tp))

    @property
    def precision(self) -> np.ndarray:
        """TP / kept detections (1 where nothing is kept)."""
        kept = self.tp + self.fp
        return np.where(kept > 0, self.tp / np.maximum(kept, 1), 1.0)


def build_sweep(scores: np.ndarray, is_tp: np.ndarray, n_gt: int) -> Sweep:
    """Counts at each distinct score, tied scores entering together."""
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], is_tp[order]
    tp_c, fp_c = np.cumsum(t), np.cumsum(~t)
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True]) if len(s) else np.zeros(0, dtype=int)
    return Sweep(
        scores=np.r_[np.inf, s[ends]],
        tp=np.r_[0, tp_c[ends]].astype(np.int64),
        fp=np.r_[0, fp_c[ends]].astype(np.int64),
        n_gt=int(n_gt),
    )


def allpoint_ap(sweep: Sweep) -> float | None:
    """Area under the PR curve with the precision envelope (all-point interpolation)."""
    if sweep.n_gt == 0:
        return None
    rec = np.r_[0.0, sweep.recall[1:], 1.0]
    prec = np.r_[1.0, sweep.precision[1:], 0.0]
    if len(rec) == 2:
        return 0.0
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    return float(np.sum((rec[1:] - rec[:-1]) * prec[1:]))


def coco_interpolated_ap(sweep: Sweep, n_points: int = 101) -> float | None:
    """AP with COCO's 101-point recall sampling of the sweep (for cross-checks)."""
    if sweep.n_gt == 0:
        return None
    rec, prec = sweep.recall[1:], sweep.precision[1:]
    if len(rec) == 0:
        return 0.0
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    thrs = np.linspace(0, 1, n_points)
    idx = np.searchsorted(rec, thrs, side="left")
    q = np.where(idx < len(prec), prec[np.minimum(idx, len(prec) - 1)], 0.0)
    return float(q.mean())


def fp_per_km2_at_recall(sweep: Sweep, recall: float, area_km2: float) -> float | None:
    """FP/km² at the highest threshold reaching ``recall`` (None if it is never reached)."""
    if sweep.n_gt == 0 or area_km2 <= 0:
        return None
    hit = np.flatnonzero(sweep.recall >= recall - 1e-12)
    return float(sweep.fp[hit[0]] / area_km2) if len(hit) else None


def recall_at_fp_per_km2(sweep: Sweep, fp_per_km2: float, area_km2: float) -> float | None:
    """Best recall with no more than ``fp_per_km2`` false positives per km²."""
    if sweep.n_gt == 0 or area_km2 <= 0:
        return None
    ok = np.flatnonzero(sweep.fp / area_km2 <= fp_per_km2 + 1e-12)
    return float(sweep.recall[ok[-1]]) if len(ok) else 0.0


def _pr_curve(sweep: Sweep) -> dict[str, list[float]]:
    n = len(sweep.scores) - 1
    if n <= 0:
        return {"precision": [], "recall": [], "scores": []}
    idx = np.arange(1, n + 1)
    if n > PR_CURVE_POINTS:
        idx = np.unique(np.round(np.linspace(1, n, PR_CURVE_POINTS)).astype(int))
    return {
        "precision": [round(float(v), 6) for v in sweep.precision[idx]],
        "recall": [round(float(v), 6) for v in sweep.recall[idx]],
        "scores": [round(float(v), 6) for v in sweep.scores[idx]],
    }


# ---------------------------------------------------------------------------------- COCO


def overlap_groups(boxes: np.ndarray) -> np.ndarray:
    """Group id of each box: connected components of the "boxes intersect" graph.

    Boxes in different groups cannot match (IoU 0), so COCOeval gives the same result with
    each group as its own image; this keeps its per-image O(detections x truth) Python loop
    small when a whole raster is one image.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    tree = shapely.STRtree(shapely.box(*boxes.T))
    a, b = tree.query(shapely.box(*boxes.T), predicate="intersects")
    parent = np.arange(n)
    while True:  # min-label propagation with pointer jumping: a few passes in practice
        low = np.minimum(parent[a], parent[b])
        before = parent.copy()
        np.minimum.at(parent, a, low)
        np.minimum.at(parent, b, low)
        parent = parent[parent]
        if np.array_equal(parent, before):
            break
    return np.unique(parent, return_inverse=True)[1].astype(np.int64)


def _coco_precision(prepared: dict[str, _Image], categories: list[int], iou_thrs: np.ndarray) -> np.ndarray:
    """``COCOeval.eval['precision']`` (T, R, K, 1, 1) for the prepared images, built in memory.

    Each group of mutually overlapping boxes is one COCO image (see :func:`overlap_groups`).
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images: list[dict[str, Any]] = []
    anns: list[dict[str, Any]] = []
    dets: list[dict[str, Any]] = []
    per_group: list[int] = [0]
    for im in prepared.values():
        n_gt = len(im.gt_boxes)
        groups = overlap_groups(np.r_[im.gt_boxes, im.det_boxes].reshape(-1, 4))
        base = len(images) + 1
        images.extend({"id": base + g} for g in range(int(groups.max()) + 1 if len(groups) else 0))
        for b, lab, g in zip(im.gt_boxes, im.gt_labels, groups[:n_gt], strict=True):
            w, h = float(b[2] - b[0]), float(b[3] - b[1])
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": base + int(g),
                    "category_id": int(lab),
                    "bbox": [float(b[0]), float(b[1]), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                }
            )
        for b, s, lab, g in zip(im.det_boxes, im.det_scores, im.det_labels, groups[n_gt:], strict=True):
            dets.append(
                {
                    "image_id": base + int(g),
                    "category_id": int(lab),
                    "score": float(s),
                    "bbox": [float(b[0]), float(b[1]), float(b[2] - b[0]), float(b[3] - b[1])],
                }
            )
        if len(groups) > n_gt:
            per_group.append(int(np.bincount(groups[n_gt:]).max()))
    max_dets = max(per_group + [1])
    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress
        gt = COCO()
        gt.dataset = {"images": images, "annotations": anns, "categories": [{"id": c} for c in categories]}
        gt.createIndex()
        dt = gt.loadRes(dets)
        ev = COCOeval(gt, dt, iouType="bbox")
        ev.params.iouThrs = iou_thrs
        ev.params.maxDets = [max_dets]  # the default [1, 10, 100] would truncate
        ev.params.areaRng = [[0.0, float("inf")]]
        ev.params.areaRngLbl = ["all"]
        ev.evaluate()
        ev.accumulate()
    return np.asarray(ev.eval["precision"])


def _mean_valid(a: np.ndarray) -> float | None:
    v = a[a > -1]
    return float(v.mean()) if v.size else None


def _coco_ap(
    prepared: dict[str, _Image], categories: list[int], iou: float, has_dets: bool
) -> tuple[float | None, float | None, dict[int, tuple[float | None, float | None]]]:
    """(AP at ``iou``, AP@[.5:.95], {class: (AP at iou, AP@[.5:.95])}) from COCOeval."""
    n_gt = {c: sum(int((im.gt_labels == c).sum()) for im in prepared.values()) for c in categories}
    per: dict[int, tuple[float | None, float | None]]
    if not has_dets:  # pycocotools cannot load an empty result list; AP is 0 wherever there is truth
        per = {c: ((0.0, 0.0) if n_gt[c] else (None, None)) for c in categories}
        any_gt = any(n_gt.values())
        return (0.0 if any_gt else None), (0.0 if any_gt else None), per
    thrs = np.unique(np.r_[COCO_IOUS, round(float(iou), 6)])
    prec = _coco_precision(prepared, categories, thrs)
    at = int(np.flatnonzero(np.isclose(thrs, iou))[0])
    coco = np.flatnonzero(np.isin(np.round(thrs, 6), COCO_IOUS))
    per = {
        c: (_mean_valid(prec[at, :, k, 0, 0]), _mean_valid(prec[coco][:, :, k, 0, 0]))
        for k, c in enumerate(categories)
    }
    return _mean_valid(prec[at, :, :, 0, 0]), _mean_valid(prec[coco][:, :, :, 0, 0]), per


# ---------------------------------------------------------------------------- distractors


def _distractor_class(frame: gpd.GeoDataFrame) -> np.ndarray:
    for col in ("class", "label", "kind", "type"):
        if col in frame.columns:
            return frame[col].astype(str).to_numpy()
    return np.full(len(frame), "distractor", dtype=object)


def _fp_on_distractors(boxes: np.ndarray, distractors: gpd.GeoDataFrame) -> list[str | None]:
    """For each FP box: the class of the distractor it lies on (IoU > 0.1 or centre inside), else None."""
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
    prepared: dict[str, _Image], flags: dict[str, np.ndarray], by_key: dict[str, EvalImage], thr: float
) -> dict[str, Any]:
    """Share of FPs at the operating threshold that sit on labelled distractors, and by class."""
    hits: list[str | None] = []
    for k, im in prepared.items():
        fp = (im.det_scores >= thr) & ~flags[k]
        dis = by_key[k].distractors
        if dis is None or len(dis) == 0:
            hits.extend([None] * int(fp.sum()))
        else:
            hits.extend(_fp_on_distractors(im.det_boxes[fp], dis))
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
        ``recall_at_fp_per_km2``, ``pr_curve``,
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
        k: greedy_match(
            im.det_boxes,
            im.det_scores,
            im.det_labels,
            im.gt_boxes,
            im.gt_labels,
            thr,
            matching,
            im.metres_per_unit,
        )
        for k, im in prepared.items()
    }
    all_scores = np.concatenate([im.det_scores for im in prepared.values()] + [np.zeros(0)])
    all_labels = np.concatenate([im.det_labels for im in prepared.values()] + [np.zeros(0, dtype=np.int64)])
    all_gt_labels = np.concatenate([im.gt_labels for im in prepared.values()] + [np.zeros(0, dtype=np.int64)])
    all_tp = np.concatenate([flags[k] for k in prepared] + [np.zeros(0, dtype=bool)])
    n_gt = len(all_gt_labels)
    area = float(sum(max(img.area_km2, 0.0) for img in images))
    sweep = build_sweep(all_scores, all_tp, n_gt)
    # FPs touching a labelled object are localisation errors or duplicates; the rest are
    # look-alikes or plain background, the FPs that hard-negative mining is meant to remove.
    near = np.concatenate(
        [_near_objects(im.det_boxes, im.gt_boxes) for im in prepared.values()] + [np.zeros(0, dtype=bool)]
    ) & ~all_tp
    away = ~near
    sweep_away = build_sweep(all_scores[away], all_tp[away], n_gt)
    categories = sorted(set(all_gt_labels.tolist()) | set(all_labels.tolist()))
    names = _class_names(images)

    per_class_ap: dict[int, tuple[float | None, float | None]]
    if matching == "iou":
        ap50, ap, per_class_ap = _coco_ap(prepared, categories, cfg.iou, len(all_scores) > 0)
        ap_method = "cocoeval"
    else:
        per_class_ap = {}
        for c in categories:
            sel = all_labels == c
            s = build_sweep(all_scores[sel], all_tp[sel], int((all_gt_labels == c).sum()))
            per_class_ap[c] = (allpoint_ap(s), None)
        valid = [v[0] for v in per_class_ap.values() if v[0] is not None]
        ap50, ap = (float(np.mean(valid)) if valid else None), None
        ap_method = "allpoint-center"

    op = all_scores >= cfg.score_threshold
    tp, fp = int((all_tp & op).sum()), int((~all_tp & op).sum())
    fn = n_gt - tp
    precision = _ratio(tp, tp + fp)
    recall = _ratio(tp, n_gt)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    metrics: dict[str, Any] = {
        "matching": matching,
        "iou": cfg.iou if matching == "iou" else None,
        "center_dist": center_dist if matching == "center" else None,
        "ap_method": ap_method,
        "ap50": ap50,
        "ap": ap,
        "score_threshold": cfg.score_threshold,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "fp_per_km2": _ratio(fp, area),
        "fp_per_km2_at_recall": {
            str(float(r)): fp_per_km2_at_recall(sweep, r, area) for r in cfg.fixed_recalls
        },
        "fp_near_objects": int((near & op).sum()),
        "fp_away_per_km2": _ratio(int((~all_tp & away & op).sum()), area),
        "fp_away_per_km2_at_recall": {
            str(float(r)): fp_per_km2_at_recall(sweep_away, r, area) for r in cfg.fixed_recalls
        },
        "recall_at_fp_per_km2": {
            str(float(f)): recall_at_fp_per_km2(sweep, f, area) for f in cfg.fixed_fp_per_km2
        },
        "area_km2": area,
        "n_images": len(images),
        "n_gt": n_gt,
        "n_det": int(len(all_scores)),
        "n_ignored": int(sum(im.n_ignored for im in prepared.values())),
        "pr_curve": _pr_curve(sweep),
    }
    if len(categories) > 1:
        metrics["per_class"] = {
            names.get(c, str(c)): {
                "label": int(c),
                "n_gt": int((all_gt_labels == c).sum()),
                "n_det": int((all_labels == c).sum()),
                "ap50": per_class_ap[c][0],
                "ap": per_class_ap[c][1],
            }
            for c in categories
        }
    if any(img.distractors is not None for img in images):
        metrics.update(_distractor_stats(prepared, flags, by_key, cfg.score_threshold))
    return metrics


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
