"""Score sweeps: precision and recall at every threshold, AP, and FP per km² at a fixed recall.

Pure functions of ``(scores, is_tp, n_gt)``, checked in the tests against reference
implementations; evaluation and the benchmarks share them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

PR_CURVE_POINTS = 200
"""Most points kept in ``pr_curve`` (enough to plot, small enough for metrics.json)."""


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


def threshold_at_recall(sweep: Sweep, recall: float) -> float | None:
    """The highest score threshold whose kept detections reach ``recall`` (None if never reached)."""
    if sweep.n_gt == 0:
        return None
    hit = np.flatnonzero(sweep.recall >= recall - 1e-12)
    return float(sweep.scores[hit[0]]) if len(hit) and hit[0] > 0 else None


LOG_AVG_RECALLS = tuple(round(0.5 + 0.05 * i, 2) for i in range(9))
"""Recall points of :func:`log_average_fp_per_km2`: 0.5, 0.55, ..., 0.9."""


def log_average_fp_per_km2(sweep: Sweep, area_km2: float, recalls: tuple[float, ...] = LOG_AVG_RECALLS) -> float | None:
    """Geometric mean of FP/km² at ``recalls`` (0.5-0.9), the way pedestrian benchmarks log-average miss rate.

    One number for the low-FP end of the curve that still separates two detectors when both
    have no false positive at one recall. A point with no false positive counts as half a false
    positive over the area (``0.5 / area_km2``), so the mean stays finite. None without ground
    truth or area, and None when a recall point is never reached: a detector that stops early
    cannot be ranked on a curve it does not have (scoring the missing points at its last FP/km²
    would favour it over one that reaches the recall at a cost).
    """
    if sweep.n_gt == 0 or area_km2 <= 0:
        return None
    floor = 0.5 / area_km2
    vals = [fp_per_km2_at_recall(sweep, r, area_km2) for r in recalls]
    if any(v is None for v in vals):
        return None
    logs = [math.log(max(float(v), floor)) for v in vals if v is not None]
    return float(math.exp(sum(logs) / len(logs)))


def recall_at_fp_per_km2(sweep: Sweep, fp_per_km2: float, area_km2: float) -> float | None:
    """Best recall with no more than ``fp_per_km2`` false positives per km²."""
    if sweep.n_gt == 0 or area_km2 <= 0:
        return None
    ok = np.flatnonzero(sweep.fp / area_km2 <= fp_per_km2 + 1e-12)
    return float(sweep.recall[ok[-1]]) if len(ok) else 0.0


def pr_curve(sweep: Sweep) -> dict[str, list[float]]:
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
