"""Hard positives: labelled objects on the training imagery that the model misses or scores low.

Each round the previous model scans the training rasters; every ground-truth object gets its
best score among the detections that overlap it at the matching IoU (0 when none does). An
object below ``train.hard_positive_below`` is *hard*: the chips that contain it are drawn
``train.hard_positive_factor`` times as often in the next training run.

The guard against bad labels: an object that stays hard for
``train.hard_positive_max_rounds`` consecutive rounds is probably not what its label says
(a mislabelled look-alike, a box in the wrong place). It is no longer oversampled and goes to
the bank's review layer for a person to check instead.

The ``hard_positives`` layer (one file per round, ``round_NNN/hard_positives.gpkg``) has one
row per labelled object: ``image``, ``gt_index`` (row in the label file), ``label``,
``best_score``, ``hard``, ``rounds_hard`` (consecutive rounds hard so far), ``oversample``
(hard and not yet sent to review), ``review``, pixel box ``px_*`` and the box geometry.
"""

from __future__ import annotations

from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.geo.boxes import box_iou
from hem_bootstrap.geo.windows import map_to_pixel_boxes

LAYER = "hard_positives"
REVIEW_REASON = "labelled object missed every round"
"""``reason`` of the review rows this module adds (a decision of ``positive`` keeps the label as it is)."""
COLUMNS = (
    "image", "gt_index", "label", "best_score", "hard", "rounds_hard", "oversample", "review",
    *PX_COLUMNS,
)


def best_scores(gt_boxes: np.ndarray, gt_labels: np.ndarray, det: pd.DataFrame, iou: float) -> np.ndarray:
    """Each object's best same-class detection score at IoU >= ``iou`` (0.0 when none)."""
    out = np.zeros(len(gt_boxes), dtype=np.float64)
    if len(gt_boxes) == 0 or len(det) == 0:
        return out
    db = np.asarray(det.geometry.bounds.to_numpy(), dtype=np.float64)
    ious = box_iou(gt_boxes, db)
    same = gt_labels[:, None] == det["label"].to_numpy(dtype=np.int64)[None, :]
    scores = np.where((ious >= iou) & same, det["score"].to_numpy(dtype=np.float64)[None, :], 0.0)
    return scores.max(axis=1)


def hard_positives(
    image: str, gt: gpd.GeoDataFrame, det: pd.DataFrame, transform: Any, iou: float, below: float
) -> gpd.GeoDataFrame:
    """One row per labelled object of ``image`` with its best score and whether it is hard."""
    n = len(gt)
    boxes = np.asarray(gt.geometry.bounds.to_numpy(), dtype=np.float64).reshape(-1, 4)
    labels = gt["label"].to_numpy(dtype=np.int64) if n else np.zeros(0, dtype=np.int64)
    best = best_scores(boxes, labels, det, iou)
    px = map_to_pixel_boxes(boxes, transform) if n else np.zeros((0, 4))
    frame = pd.DataFrame({
        "image": np.full(n, image, dtype=object),
        "gt_index": np.arange(n, dtype=np.int64),
        "label": labels,
        "best_score": best,
        "hard": best < below,
        "rounds_hard": np.zeros(n, dtype=np.int64),
        "oversample": np.zeros(n, dtype=bool),
        "review": np.zeros(n, dtype=bool),
        **{c: px[:, i] if n else np.zeros(0) for i, c in enumerate(PX_COLUMNS)},
    })
    return gpd.GeoDataFrame(frame, geometry=list(gt.geometry.envelope.values) if n else [], crs=gt.crs)


def carry_history(current: gpd.GeoDataFrame, previous: pd.DataFrame | None, max_rounds: int) -> gpd.GeoDataFrame:
    """Count consecutive hard rounds per object; past ``max_rounds`` it goes to review, not to training.

    Objects are the same across rounds when ``image`` and ``gt_index`` are (the label files do
    not change during a run).
    """
    out = current.copy()
    prev = {}
    if previous is not None and len(previous):
        prev = dict(zip(zip(previous["image"], previous["gt_index"], strict=True),
                        previous["rounds_hard"].astype(int), strict=True))
    before = np.array([prev.get((i, g), 0) for i, g in zip(out["image"], out["gt_index"], strict=True)],
                      dtype=np.int64)
    hard = out["hard"].to_numpy(dtype=bool)
    out["rounds_hard"] = np.where(hard, before + 1, 0)
    out["review"] = hard & (out["rounds_hard"].to_numpy() >= max_rounds)
    out["oversample"] = hard & ~out["review"].to_numpy(dtype=bool)
    return out


def oversample_boxes(frame: pd.DataFrame) -> dict[str, np.ndarray]:
    """Pixel boxes of the objects to oversample, by image path."""
    sel = frame[frame["oversample"].astype(bool)]
    return {
        str(img): rows[list(PX_COLUMNS)].to_numpy(dtype=np.float64)
        for img, rows in sel.groupby("image")
    }


def review_rows(frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
    """The objects to list for review, shaped like mined rows (for the bank's review layer)."""
    sel = frame[frame["review"].astype(bool)]
    n = len(sel)
    cols = {
        "image": sel["image"].astype(str).to_numpy(dtype=object),
        "label": sel["label"].to_numpy(dtype=np.int64),
        "score": sel["best_score"].to_numpy(dtype=np.float64),
        "win_col": np.zeros(n, dtype=np.int64),
        "win_row": np.zeros(n, dtype=np.int64),
        "win_w": np.zeros(n, dtype=np.int64),
        "win_h": np.zeros(n, dtype=np.int64),
        **{c: sel[c].to_numpy(dtype=np.float64) for c in PX_COLUMNS},
        "reason": np.full(n, REVIEW_REASON, dtype=object),
    }
    return gpd.GeoDataFrame(cols, geometry=list(sel.geometry.values), crs=frame.crs)
