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

from hem_bootstrap.geo.boxes import area as box_area
from hem_bootstrap.geo.boxes import as_boxes, best_match, paired_intersection
from hem_bootstrap.scoring.match import PreparedImage, center_dist, scaled
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
overlaps an object (IoU > 0.1) too little to match it. Each recall's counts also give
``localisation_enclosing``: the localisation errors (IoU matching) whose box covers at least
:data:`ENCLOSING` of the object's area, a box drawn too large around a real object (a box-size
regression miss, not a confusion)."""
ENCLOSING = 0.8
TP_SCORE_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9)
NEAR_IOU = 0.1
"""Above this IoU with an object a false positive is a localisation error (as ``evaluate.NEAR_OBJECT_IOU``)."""

OnDistractor = Callable[[str, np.ndarray], list[Any]]
"""``(image key, FP boxes) -> per box: the distractor class it lies on, or None``."""


def per_image(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], near: dict[str, np.ndarray],
    areas: dict[str, float], recalls: Sequence[float],
) -> dict[str, dict[str, Any]]:
    """Each image's own FP/km² at the fixed recalls, log-average FP/km² over recall 0.5-0.9, and its near-object floor.

    ``near`` flags the false positives that touch a labelled object (see :func:`near_object_log_average`).
    """
    out: dict[str, dict[str, Any]] = {}
    for k, im in prepared.items():
        sweep = build_sweep(im.det_scores, flags[k], len(im.gt_labels))
        area = float(areas.get(k, 0.0))
        out[k] = {
            "area_km2": area,
            "n_gt": int(len(im.gt_labels)),
            "fp_per_km2_at_recall": {str(float(r)): fp_per_km2_at_recall(sweep, r, area) for r in recalls},
            "log_avg_fp_per_km2": log_average_fp_per_km2(sweep, area),
            "log_avg_fp_near_per_km2": near_object_log_average(im.det_scores, flags[k], near[k],
                                                               len(im.gt_labels), area),
            "log_avg_fp_away_per_km2": away_log_average(im.det_scores, flags[k], near[k], len(im.gt_labels), area),
        }
    return out


def near_object_log_average(scores: np.ndarray, tp: np.ndarray, near: np.ndarray, n_gt: int, area_km2: float) -> float | None:
    """Log-average FP/km² counting only the false positives that touch a labelled object (``near``).

    Duplicates and localisation errors on real objects are what no negative can remove: this is
    the log-average a detector would reach if every false positive *away* from objects (on
    look-alikes and background, what mining is for) were gone and the true positives kept their
    scores. Its ratio to the full log-average bounds what negative mining can gain on the imagery.
    """
    keep = tp | near
    return log_average_fp_per_km2(build_sweep(scores[keep], tp[keep], n_gt), area_km2)


def away_log_average(scores: np.ndarray, tp: np.ndarray, near: np.ndarray, n_gt: int, area_km2: float) -> float | None:
    """Log-average FP/km² counting only the false positives away from labelled objects (look-alikes, background).

    The complement of :func:`near_object_log_average`: the part of the log-average that negatives can
    change directly, at the thresholds where the true positives reach each recall. A mining gain that
    is real shows here first; on imagery dense with objects it can be swamped in the full log-average
    by localisation errors, which differ from one training run to the next.
    """
    return near_object_log_average(scores, tp, ~near & ~tp, n_gt, area_km2)


def fp_kinds(
    prepared: dict[str, PreparedImage], flags: dict[str, np.ndarray], sweep: Sweep, thr: float,
    recalls: Sequence[float], on_distractor: OnDistractor | None, matching: str = "iou",
) -> dict[str, Any]:
    """False positives by kind (:data:`FP_KINDS`) at the threshold where the pooled ``sweep`` reaches each recall.

    ``thr`` is the match IoU, or with ``matching="center"`` the centre distance in metres: a
    duplicate is then within ``thr`` of an object's centre, a localisation error within ``2 * thr``.
    Kinds ignore the class: a box on an object of another class is not a background error.
    """
    out: dict[str, Any] = {}
    for r in recalls:
        score = threshold_at_recall(sweep, r)
        if score is None:
            out[str(float(r))] = None
            continue
        counts = dict.fromkeys(FP_KINDS, 0)
        enclosing = 0
        for k, im in prepared.items():
            boxes = im.det_boxes[(im.det_scores >= score) & ~flags[k]]
            closeness, nearest = _closeness(boxes, im, matching)
            kinds = _kinds(k, boxes, closeness, thr, matching, on_distractor)
            for kind in kinds:
                counts[kind] += 1
            if matching != "center":
                loc = np.array([kind == "localisation" for kind in kinds], dtype=bool)
                enclosing += int(_enclosing(boxes[loc], as_boxes(im.gt_boxes)[nearest[loc]]).sum())
        out[str(float(r))] = {"threshold": score, **counts, "localisation_enclosing": enclosing}
    return out


def _closeness(boxes: np.ndarray, im: PreparedImage, matching: str) -> tuple[np.ndarray, np.ndarray]:
    """Per box: best IoU with any object, or (centre matching) the nearest object centre in metres; and that
    object's index (-1 without objects)."""
    if len(im.gt_boxes) == 0:
        return np.full(len(boxes), np.inf if matching == "center" else 0.0), np.full(len(boxes), -1)
    if matching == "center":
        scale = im.metres_per_unit
        dist = np.asarray(center_dist(scaled(boxes, scale), scaled(im.gt_boxes, scale)))
        return dist.min(axis=1), dist.argmin(axis=1)
    return best_match(boxes, im.gt_boxes)


def _enclosing(boxes: np.ndarray, objects: np.ndarray) -> np.ndarray:
    """Per box: does it cover at least :data:`ENCLOSING` of the area of its object (``objects[i]``)?"""
    return paired_intersection(boxes, objects) >= ENCLOSING * box_area(objects)


def _kinds(
    key: str, boxes: np.ndarray, closeness: np.ndarray, thr: float, matching: str, on_distractor: OnDistractor | None
) -> list[str]:
    if len(boxes) == 0:
        return []
    lookalike = on_distractor(key, boxes) if on_distractor is not None else [None] * len(boxes)
    if matching == "center":
        dup, loc = closeness <= thr, closeness <= 2 * thr
    else:
        dup, loc = closeness >= thr, closeness > NEAR_IOU
    kinds = []
    for is_dup, is_loc, d in zip(dup, loc, lookalike, strict=True):
        if is_dup:
            kinds.append("duplicate")
        elif is_loc:
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
