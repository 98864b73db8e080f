"""Where the false positives come from, per held-out image and by kind, and how confident the true positives are.

The diagnostics that tell a mining gain from noise: a benchmark over several held-out scenes
needs each scene's own FP/km² (seeds *and* scenes are the units of its confidence intervals),
and a change in FP/km² means different things when it comes from look-alikes (what mining is
for), from background, or from duplicates and localisation errors on real objects (which no
negative mining removes). All kinds are counted at the score threshold where the pooled sweep
reaches each fixed recall.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from hem_bootstrap.geo.boxes import box_iou
from hem_bootstrap.scoring.match import PreparedImage
from hem_bootstrap.scoring.sweep import (
    Sweep,
    build_sweep,
    fp_per_km2_at_recall,
    log_average_fp_per_km2,
    threshold_at_recall,
)

FP_KINDS = ("look-alike", "background", "duplicate", "localisation")
"""``look-alike``: on a labelled distractor; ``background``: away from every labelled thing;
``duplicate``: a second box on an object (IoU >= the match IoU); ``localisation``: a box that
overlaps an object (IoU > 0.1) too little to match it."""
TP_SCORE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)

OnDistractor = Callable[[str, np.ndarray], list[Any]]
"""``(image key, FP boxes) -> per box: the distractor class it lies on, or None``."""


def per_image(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], areas: dict[str, float],
    recalls: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """Each image's own FP/km² at the fixed recalls and log-average FP/km² over recall 0.5-0.9."""
    out: dict[str, dict[str, Any]] = {}
    for k, im in prepared.items():
        sweep = build_sweep(im.det_scores, flags[k], len(im.gt_labels))
        area = float(areas.get(k, 0.0))
        out[k] = {
            "area_km2": area,
            "n_gt": int(len(im.gt_labels)),
            "fp_per_km2_at_recall": {str(float(r)): fp_per_km2_at_recall(sweep, r, area) for r in recalls},
            "log_avg_fp_per_km2": log_average_fp_per_km2(sweep, area),
        }
    return out


def fp_kinds(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], sweep: Sweep, iou: float,
    recalls: Sequence[float], on_distractor: OnDistractor | None,
) -> dict[str, Any]:
    """False positives by kind (:data:`FP_KINDS`) at the threshold where the pooled ``sweep`` reaches each recall."""
    out: dict[str, Any] = {}
    for r in recalls:
        thr = threshold_at_recall(sweep, r)
        if thr is None:
            out[str(float(r))] = None
            continue
        counts = dict.fromkeys(FP_KINDS, 0)
        for k, im in prepared.items():
            fp = (im.det_scores >= thr) & ~flags[k]
            for kind in _kinds(k, im.det_boxes[fp], im.gt_boxes, iou, on_distractor):
                counts[kind] += 1
        out[str(float(r))] = {"threshold": thr, **counts}
    return out


def _kinds(key: str, boxes: np.ndarray, gt: np.ndarray, iou: float, on_distractor: OnDistractor | None) -> list[str]:
    if len(boxes) == 0:
        return []
    best = box_iou(boxes, gt).max(axis=1) if len(gt) else np.zeros(len(boxes))
    lookalike = on_distractor(key, boxes) if on_distractor is not None else [None] * len(boxes)
    kinds = []
    for b, d in zip(best, lookalike, strict=True):
        if b >= iou:
            kinds.append("duplicate")
        elif b > 0.1:
            kinds.append("localisation")
        else:
            kinds.append("background" if d is None else "look-alike")
    return kinds


def tp_score_quantiles(scores: np.ndarray, tp: np.ndarray) -> dict[str, float] | None:
    """Quantiles of the true positives' scores: harder negatives often pull them down."""
    s = scores[tp]
    if len(s) == 0:
        return None
    return {str(q): round(float(v), 4) for q, v in zip(TP_SCORE_QUANTILES, np.quantile(s, TP_SCORE_QUANTILES), strict=True)}
