"""Axis-aligned box maths on numpy arrays: IoU, best match, greedy NMS.

The one implementation that mining, the bank and evaluation share (the model's own
post-processing stays in torchvision). Boxes are ``(N, 4)`` float ``xmin, ymin, xmax, ymax``
in any one unit (pixels or map units). NMS follows ``torchvision.ops.nms``: boxes are taken in
descending score order (ties by input order) and a box is dropped when its IoU with a kept
one is above the threshold.
"""

from __future__ import annotations

import numpy as np

CHUNK = 4096
"""Rows of an IoU matrix computed at once, so memory stays ``CHUNK * M`` for dense scenes."""


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


def paired_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU of ``a[i]`` with ``b[i]`` for each row."""
    a, b = as_boxes(a), as_boxes(b)
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    union = area(a) + area(b) - inter
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def best_match(a: np.ndarray, b: np.ndarray, chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """For each box of ``a``, its best IoU with ``b`` and that box's index (0.0 and -1 when ``b`` is empty).

    Computed in row chunks, so memory is ``chunk * M`` instead of ``N * M``.
    """
    a, b = as_boxes(a), as_boxes(b)
    if len(b) == 0 or len(a) == 0:
        return np.zeros(len(a)), np.full(len(a), -1, dtype=np.int64)
    best, idx = [], []
    for start in range(0, len(a), chunk):
        iou = box_iou(a[start : start + chunk], b)
        idx.append(iou.argmax(axis=1))
        best.append(iou[np.arange(len(iou)), idx[-1]])
    return np.concatenate(best), np.concatenate(idx).astype(np.int64)


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
