"""Paired differences between two recipes with a hierarchical bootstrap interval over seeds and scenes.

A recipe comparison on held-out imagery has two sources of noise: the seed (in the benchmark a
seed draws new training, pool and test scenes, so the same recipe differs from seed to seed)
and the scene (some scenes hold more look-alikes). Pairing
removes what the two recipes share (same seed, same scene); the interval resamples seeds,
then scenes within each drawn seed, so it is honest about both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PairedDiff:
    """Mean of ``a - b`` over seeds and scenes, its 95 % bootstrap interval, and how often ``a < b``.

    With few seeds a percentile interval covers less than its nominal level; ``seeds_lower``
    (seeds whose mean difference is below zero) is the plain count to read beside it.
    """

    mean: float
    lo: float
    hi: float
    n_seeds: int
    n_pairs: int
    a_lower: int
    seeds_lower: int

    def text(self, fmt: str = ".3g") -> str:
        """``-12.3 [-20.1, -4.0]`` (the interval lies below zero when ``a`` wins)."""
        return f"{self.mean:{fmt}} [{self.lo:{fmt}}, {self.hi:{fmt}}]"


def paired_bootstrap(
    a: Mapping[int, Sequence[float | None]], b: Mapping[int, Sequence[float | None]],
    n_boot: int = 10000, seed: int = 0, level: float = 0.95,
) -> PairedDiff | None:
    """Hierarchical bootstrap of the mean paired difference ``a - b``.

    Args:
        a, b: Per seed, one value per scene (the same scenes in the same order for both); a
            pair with a missing value on either side is left out.
        n_boot: Bootstrap replicates.
        seed: Seed of the resampling (the interval is reproducible).
        level: Coverage of the percentile interval.

    Returns:
        The mean difference with its interval, or None when no seed has a complete pair.
    """
    diffs: list[np.ndarray] = []
    for s in sorted(set(a) & set(b)):
        pairs = [x - y for x, y in zip(a[s], b[s], strict=True) if x is not None and y is not None]
        if pairs:
            diffs.append(np.asarray(pairs, dtype=np.float64))
    if not diffs:
        return None
    rng = np.random.default_rng(seed)
    n, m = len(diffs), max(len(d) for d in diffs)
    table = np.full((n, m), np.nan)  # seeds x scenes; a seed with fewer pairs resamples among its own
    for i, row in enumerate(diffs):
        table[i, : len(row)] = row
    counts = np.array([len(d) for d in diffs])
    picks = rng.integers(0, n, size=(n_boot, n))
    scenes = (rng.random((n_boot, n, m)) * counts[picks][..., None]).astype(np.int64)
    drawn = table[picks[..., None], scenes]
    within = np.where(np.arange(m) < counts[picks][..., None], drawn, np.nan)
    means = np.nanmean(within, axis=2).mean(axis=1)
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(means, [tail, 100 - tail])
    flat = np.concatenate(diffs)
    seed_means = np.array([d.mean() for d in diffs])
    return PairedDiff(float(seed_means.mean()), float(lo), float(hi), n, len(flat), int((flat < 0).sum()),
                      int((seed_means < 0).sum()))
