"""One-to-one matching of detections to ground truth, and COCO AP through faster-coco-eval.

Boxes are ``minx, miny, maxx, maxy`` in one unit per image (map units); with centre
matching the centres are scaled to metres first. Only boxes that can reach each other are
compared (:func:`overlap_groups`), so a large scene costs what its overlaps cost.
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from typing import Any

import numpy as np
from faster_coco_eval import COCO, COCOeval_faster

from hem_bootstrap.geo.boxes import box_iou, overlapping

COCO_IOUS = np.round(np.linspace(0.5, 0.95, 10), 2)
"""The IoU thresholds of COCO's AP@[.5:.95]."""


@dataclass
class PreparedImage:
    """Arrays of one image after ignore filtering (boxes are ``minx, miny, maxx, maxy``, map units)."""

    det_boxes: np.ndarray
    det_scores: np.ndarray
    det_labels: np.ndarray
    gt_boxes: np.ndarray
    gt_labels: np.ndarray
    n_ignored: int = 0
    metres_per_unit: tuple[float, float] = (1.0, 1.0)


def scaled(boxes: np.ndarray, metres_per_unit: tuple[float, float]) -> np.ndarray:
    """``boxes`` (N, 4) with x scaled by ``metres_per_unit[0]`` and y by ``metres_per_unit[1]``."""
    mx, my = metres_per_unit
    return boxes * np.array([mx, my, mx, my], dtype=np.float64)


def center_dist(a: np.ndarray, b: np.ndarray) -> np.ndarray:
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
        det_boxes, gt_boxes = scaled(det_boxes, metres_per_unit), scaled(gt_boxes, metres_per_unit)
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
        quality = -center_dist(det_boxes[d_idx], gt_boxes[g_idx])
        bar = -thr
    else:
        quality = box_iou(det_boxes[d_idx], gt_boxes[g_idx])
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


def overlap_groups(boxes: np.ndarray) -> np.ndarray:
    """Group id of each box: connected components of the "boxes intersect" graph.

    Boxes in different groups cannot match (IoU 0), so COCOeval gives the same result with
    each group as its own image; this keeps its per-image O(detections x truth) Python loop
    small when a whole raster is one image.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    a, b = overlapping(boxes, boxes)
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


def _coco_precision(prepared: dict[str, PreparedImage], categories: list[int], iou_thrs: np.ndarray) -> np.ndarray:
    """``COCOeval.eval['precision']`` (T, R, K, 1, 1) for the prepared images, built in memory.

    faster-coco-eval runs COCOeval's matching and accumulation in C++ with pycocotools' results
    (a test checks the two agree); pycocotools' Python loop took 99 s on one 25,000-detection
    held-out scene where this takes 5. Each group of mutually overlapping boxes is one COCO
    image (see :func:`overlap_groups`).
    """
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
    with contextlib.redirect_stdout(io.StringIO()):  # COCO tools print progress
        gt = COCO({"images": images, "annotations": anns, "categories": [{"id": c} for c in categories]})
        dt = gt.loadRes(dets)
        ev = COCOeval_faster(gt, dt, iouType="bbox")
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


def coco_ap(
    prepared: dict[str, PreparedImage], categories: list[int], iou: float, has_dets: bool
) -> tuple[float | None, float | None, dict[int, tuple[float | None, float | None]]]:
    """(AP at ``iou``, AP@[.5:.95], {class: (AP at iou, AP@[.5:.95])}) from COCOeval."""
    n_gt = {c: sum(int((im.gt_labels == c).sum()) for im in prepared.values()) for c in categories}
    per: dict[int, tuple[float | None, float | None]]
    if not has_dets:  # COCO tools cannot load an empty result list; AP is 0 wherever there is truth
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
