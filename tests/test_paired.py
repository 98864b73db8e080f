"""The hierarchical paired bootstrap: a clear difference is found, no difference straddles zero."""

from __future__ import annotations

import numpy as np
import pytest

from hem_bootstrap.scoring.paired import paired_bootstrap


def _seeds(rng: np.random.Generator, shift: float, n_seeds: int = 6, n_scenes: int = 3) -> tuple[dict, dict]:
    b = {s: list(rng.uniform(50, 150, n_scenes)) for s in range(n_seeds)}
    a = {s: [v + shift + rng.normal(0, 5) for v in b[s]] for s in b}
    return a, b


def test_a_clear_gain_lies_below_zero_and_no_gain_straddles_it() -> None:
    rng = np.random.default_rng(1)
    a, b = _seeds(rng, -20.0)
    d = paired_bootstrap(a, b, n_boot=2000)
    assert d is not None and d.hi < 0 and d.lo < d.mean < d.hi
    assert d.mean == pytest.approx(-20.0, abs=4)
    assert (d.n_seeds, d.n_pairs) == (6, 18) and d.a_lower >= 16
    a0, b0 = _seeds(rng, 0.0)
    d0 = paired_bootstrap(a0, b0, n_boot=2000)
    assert d0 is not None and d0.lo < 0 < d0.hi


def test_missing_values_are_left_out_and_nothing_paired_is_none() -> None:
    a = {1: [10.0, None, 5.0], 2: [None]}
    b = {1: [12.0, 3.0, 9.0], 2: [1.0], 3: [4.0]}
    d = paired_bootstrap(a, b, n_boot=500)
    assert d is not None and (d.n_seeds, d.n_pairs) == (1, 2) and d.mean == pytest.approx(-3.0)
    assert paired_bootstrap({1: [None]}, {1: [2.0]}) is None
    assert paired_bootstrap(a, b, n_boot=500).text() == d.text()  # reproducible


def test_spread_between_seeds_widens_the_interval() -> None:
    """Scenes within a seed agree, seeds disagree: resampling seeds (not only scenes) must show it."""
    b = {s: [100.0, 100.0, 100.0] for s in range(5)}
    a = {s: [100.0 + shift] * 3 for s, shift in enumerate([-30.0, 10.0, -25.0, 15.0, -20.0])}
    d = paired_bootstrap(a, b, n_boot=4000)
    assert d is not None and d.lo < 0 < d.hi  # a flat bootstrap over the 15 pairs would not be this wide
    assert d.hi - d.lo > 20 and (d.seeds_lower, d.a_lower) == (3, 9)


def test_seed_level_readings_beside_the_bootstrap() -> None:
    """The replication's per-seed means (README): 5 of 5 below zero is p = 0.0625, and the t interval reaches zero."""
    b = {s: [10.0] for s in range(5)}
    a = {s: [10.0 + d] for s, d in enumerate([-1.08, -9.1, -3.43, -6.0, -0.6])}
    d = paired_bootstrap(a, b, n_boot=2000)
    assert d is not None and d.seeds_lower == 5 and d.sign_p == pytest.approx(0.0625)
    assert d.t_lo == pytest.approx(-8.45, abs=0.01) and d.t_hi == pytest.approx(0.36, abs=0.01)
    assert d.hi < 0 < d.t_hi  # the percentile bootstrap over 5 seeds is the narrower reading
    one = paired_bootstrap({1: [3.0]}, {1: [1.0]}, n_boot=100)
    assert one is not None and (one.t_lo, one.t_hi, one.sign_p) == (None, None, 1.0)


def test_no_seed_that_differs_has_no_sign_test() -> None:
    """Two arms that gave the same models (nothing mined, deterministic training): a zero interval, no p."""
    d = paired_bootstrap({1: [2.0], 2: [3.0]}, {1: [2.0], 2: [3.0]}, n_boot=100)
    assert d is not None and (d.t_lo, d.t_hi, d.sign_p) == (0.0, 0.0, None)
