"""Axis-aligned box maths on numpy arrays: IoU, which boxes meet (an STRtree), best match, greedy NMS.

The one implementation that mining, the bank and evaluation share (the model's own
post-processing stays in torchvision). Boxes are ``(N, 4)`` float ``xmin, ymin, xmax, ymax``
in any one unit (pixels or map units). NMS follows ``torchvision.ops.nms``: boxes are taken in
descending score order (ties by input order) and a box is dropped when its IoU with a kept
one is above the threshold.
"""

from __future__ import annotations

import numpy as np
import shapely

CHUNK = 4096
"""Rows of a dense matrix (centre distances in mining) computed at once: memory stays ``CHUNK * M``."""


def as_boxes(boxes: np.ndarray) -> np.ndarray:
    """``boxes`` as a float64 ``(N, 4)`` array."""
    return np.asarray(boxes, dtype=np.float64).reshape(-1, 4)


def area(boxes: np.ndarray) -> np.ndarray:
    """Area of each box (0 for degenerate ones)."""
    b = as_boxes(boxes)
    return np.clip(b[:, 2] - b[:, 0], 0, None) * np.clip(b[:, 3] - b[:, 1], 0, None)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix ``(N, M)`` of two box sets (0 where the union is empty)."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=2)
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def paired_intersection(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection area of ``a[i]`` with ``b[i]`` for each row."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    return np.clip(rb - lt, 0, None).prod(axis=1)


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for each row."""
    a, b = as_boxes(a), as_boxes(b)
    inter = paired_intersection(a, b)
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def overlapping(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)`` where box ``a[i]`` meets box ``b[j]`` (touching included).

    An STRtree over ``b`` queried with ``a``'s boxes: axis-aligned boxes are their own
    envelopes, so the tree's envelope test is exact and no ``N x M`` matrix is built.
    """
    same = a is b
    a, b = as_boxes(a), as_boxes(b)
    if len(a) == 0 or len(b) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    tree = shapely.box(*b.T)
    i, j = shapely.STRtree(tree).query(tree if same else shapely.box(*a.T))  # the boxes against themselves: built once
    return i.astype(np.int64), j.astype(np.int64)


def best_match(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each box of ``a``, its best IoU with ``b`` and that box's index (0.0 and -1 when ``b`` is empty).

    As ``box_iou(a, b)`` with ``max`` / ``argmax`` per row (ties: the lowest index; no overlap:
    0.0 and index 0), computed over the pairs that meet only.
    """
    a, b = as_boxes(a), as_boxes(b)
    if len(b) == 0 or len(a) == 0:
        return np.zeros(len(a)), np.full(len(a), -1, dtype=np.int64)
    best, idx = np.zeros(len(a)), np.zeros(len(a), dtype=np.int64)
    i, j = overlapping(a, b)
    iou = paired_iou(a[i], b[j])
    pos = iou > 0
    i, j, iou = i[pos], j[pos], iou[pos]
    order = np.lexsort((j, -iou, i))
    i, j, iou = i[order], j[order], iou[order]
    first = np.r_[True, i[1:] != i[:-1]] if len(i) else np.zeros(0, bool)
    best[i[first]], idx[i[first]] = iou[first], j[first]
    return best, idx


def any_overlap(a: np.ndarray, b: np.ndarray, thr: float) -> np.ndarray:
    """For each box of ``a``: does some box of ``b`` overlap it with IoU above ``thr``."""
    best, _ = best_match(a, b)
    return best > thr


def nms(boxes: np.ndarray, scores: np.ndarray, thr: float) -> np.ndarray:
    """Indices of the boxes greedy NMS keeps, highest score first."""
    b = as_boxes(boxes)
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    alive = np.ones(len(b), dtype=bool)
    keep: list[int] = []
    for pos, i in enumerate(order):
        if not alive[i]:
            continue
        keep.append(int(i))
        rest = order[pos + 1 :]
        rest = rest[alive[rest]]
        if len(rest):
            alive[rest[box_iou(b[i : i + 1], b[rest])[0] > thr]] = False
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, groups: np.ndarray, thr: float) -> np.ndarray:
    """NMS within each group (image, class) independently; indices kept, highest score first."""
    groups = np.asarray(groups)
    kept = [np.flatnonzero(groups == g)[nms(as_boxes(boxes)[groups == g], np.asarray(scores)[groups == g], thr)]
            for g in np.unique(groups)]
    out = np.concatenate(kept) if kept else np.zeros(0, dtype=np.int64)
    return out[np.argsort(-np.asarray(scores, dtype=np.float64)[out], kind="stable")]
