"""The loop's early-stop rules (``rounds.stop_if_no_new``, ``rounds.patience``) on hand-built manifests.

Manifests take the shape the loop writes: entries made by ``RunDir.round_entry`` with the
round's bank counts and one record per finished step, the ``evaluate`` record holding ``ap50``.
Each case is built so that it fails if the rule it names were dropped or loosened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from hem_bootstrap.config import ExperimentConfig, RoundsConfig
from hem_bootstrap.loop import should_stop as _should_stop
from hem_bootstrap.rundir import RunDir
from hem_bootstrap.steps import STEPS_ROUND, STEPS_ROUND0


def config(stop_if_no_new: bool = False, patience: int | None = None) -> ExperimentConfig:
    return ExperimentConfig(rounds=RoundsConfig(stop_if_no_new=stop_if_no_new, patience=patience))


def manifest(
    aps: Sequence[float | None], new: Sequence[int] | None = None, unevaluated: int = 0
) -> dict[str, Any]:
    """A manifest with ``len(aps)`` evaluated rounds (round 0 first), then ``unevaluated`` rounds
    that finished every step but ``evaluate``. ``new`` gives each round's new negatives
    (default: 0 in round 0, 5 after)."""
    n = len(aps) + unevaluated
    new = list(new) if new is not None else [0] + [5] * (n - 1)
    m: dict[str, Any] = {"rounds": []}
    bank = 0
    for r in range(n):
        entry = RunDir.round_entry(m, r)
        bank += new[r]
        entry.update({"bank_size": bank, "new_negatives": new[r], "pool_fp": None if r == 0 else 40})
        for step in STEPS_ROUND0 if r == 0 else STEPS_ROUND:
            if step == "evaluate":
                if r < len(aps):
                    entry["steps"][step] = {"ap50": aps[r], "ap": None, "precision": 0.5, "recall": 0.5}
            else:
                entry["steps"][step] = {"seconds_total": 1.0}
    return m


# ------------------------------------------------------------------- stop_if_no_new


def test_stops_when_a_mining_round_adds_no_new_negative() -> None:
    m = manifest([0.3, 0.4], new=[0, 0])
    assert _should_stop(config(stop_if_no_new=True), m, 1) == "no new negatives"


def test_no_new_negatives_does_not_stop_round_zero() -> None:
    m = manifest([0.3], new=[0])  # round 0 always records 0 new negatives: nothing was mined yet
    assert _should_stop(config(stop_if_no_new=True), m, 0) is None


def test_new_negatives_keep_the_loop_going() -> None:
    m = manifest([0.3, 0.4], new=[0, 3])
    assert _should_stop(config(stop_if_no_new=True), m, 1) is None


def test_no_new_negatives_is_ignored_when_the_rule_is_off() -> None:
    m = manifest([0.3, 0.4], new=[0, 0])
    assert _should_stop(config(stop_if_no_new=False), m, 1) is None


# ------------------------------------------------------------------------- patience


@pytest.mark.parametrize(
    "aps",
    [
        [0.5, 0.4, 0.45],  # both later rounds below the best before
        [0.5, 0.5, 0.3],  # matching the best is no gain
        [0.5, None, None],  # no AP (nothing to score) counts as 0
        [0.2, 0.6, 0.55, 0.6],  # the best before is the maximum, not the first round
    ],
)
def test_patience_stops_after_rounds_without_gain(aps: list[float | None]) -> None:
    m = manifest(aps)
    assert _should_stop(config(patience=2), m, len(aps) - 1) == "no held-out AP gain for 2 rounds"


@pytest.mark.parametrize(
    "aps",
    [
        [0.5, 0.4, 0.51],  # the last round beats the best before
        [0.5, 0.6, 0.4],  # an earlier one of the last two does
    ],
)
def test_patience_does_not_stop_when_one_recent_round_gains(aps: list[float]) -> None:
    assert _should_stop(config(patience=2), manifest(aps), len(aps) - 1) is None


def test_patience_waits_for_more_evaluated_rounds_than_patience() -> None:
    cfg = config(patience=2)
    assert _should_stop(cfg, manifest([0.5, 0.4]), 1) is None  # 2 evaluated rounds: nothing before them
    # a third round that has not been evaluated yet is not counted
    assert _should_stop(cfg, manifest([0.5, 0.4], unevaluated=1), 2) is None
    assert _should_stop(cfg, manifest([0.5, 0.4, 0.3]), 2) is not None  # and with 3 it would stop


def test_patience_off_never_stops_on_ap() -> None:
    assert _should_stop(config(patience=None), manifest([0.5, 0.1, 0.1, 0.1]), 3) is None


def test_patience_one_compares_the_last_round_with_all_before() -> None:
    cfg = config(patience=1)
    assert _should_stop(cfg, manifest([0.5, 0.5]), 1) == "no held-out AP gain for 1 rounds"
    assert _should_stop(cfg, manifest([0.5, 0.2, 0.4]), 2) == "no held-out AP gain for 1 rounds"
    assert _should_stop(cfg, manifest([0.5, 0.2, 0.6]), 2) is None
