"""Hard positives: best score per labelled object, consecutive-round history, the review guard, and the loop."""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine
from test_loop import small_config

from hem_bootstrap.config import load_config
from hem_bootstrap.loop import run_experiment
from hem_bootstrap.mining.positives import carry_history, hard_positives, oversample_boxes, review_rows

CRS = "EPSG:32633"
T = Affine(0.5, 0, 1000.0, 0, -0.5, 2000.0)  # 0.5 m pixels


def _gt() -> gpd.GeoDataFrame:
    geoms = [shapely.box(1000 + a, 1990, 1004 + a, 1992) for a in (0, 10, 20)]
    return gpd.GeoDataFrame({"label": [1, 1, 1], "class": ["vehicle"] * 3}, geometry=geoms, crs=CRS)


def _dets(rows: list[tuple[float, float, int]]) -> gpd.GeoDataFrame:
    """(x offset of the box, score, label) rows, 4 x 2 m boxes at the objects' height."""
    geoms = [shapely.box(1000 + a, 1990, 1004 + a, 1992) for a, _, _ in rows]
    return gpd.GeoDataFrame({"image": "a.tif", "score": [s for _, s, _ in rows], "label": [lab for *_, lab in rows]},
                            geometry=geoms, crs=CRS)


def test_best_score_per_object_and_hard_flag() -> None:
    # object 0 found at 0.9 (and a weaker duplicate); object 1 only at 0.2; object 2 by the
    # wrong class, and by a box too far off (IoU 1/3)
    dets = _dets([(0, 0.9, 1), (0.2, 0.4, 1), (10, 0.2, 1), (20, 0.95, 2), (22, 0.8, 1)])
    hp = hard_positives("a.tif", _gt(), dets, T, iou=0.5, below=0.3)
    assert hp["best_score"].tolist() == pytest.approx([0.9, 0.2, 0.0])
    assert hp["hard"].tolist() == [False, True, True]
    # pixel boxes: x 1000..1004 m -> 0..8 px; y 1992..1990 m -> rows 16..20
    assert hp.loc[0, ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]].tolist() == pytest.approx([0, 16, 8, 20])


def test_history_sends_chronic_misses_to_review_not_to_training() -> None:
    first = carry_history(hard_positives("a.tif", _gt(), _dets([(0, 0.9, 1)]), T, 0.5, 0.3), None, max_rounds=2)
    assert first["rounds_hard"].tolist() == [0, 1, 1]
    assert first["oversample"].tolist() == [False, True, True] and not first["review"].any()
    # next round object 1 is found, object 2 is still missed: its second hard round in a row
    second = carry_history(
        hard_positives("a.tif", _gt(), _dets([(0, 0.9, 1), (10, 0.7, 1)]), T, 0.5, 0.3), pd.DataFrame(first), 2
    )
    assert second["rounds_hard"].tolist() == [0, 0, 2]
    assert second["oversample"].tolist() == [False, False, False]
    assert second["review"].tolist() == [False, False, True]
    rows = review_rows(second)
    assert len(rows) == 1 and rows["reason"].iloc[0] == "labelled object missed every round"
    assert oversample_boxes(second) == {}
    boxes = oversample_boxes(first)
    assert list(boxes) == ["a.tif"] and boxes["a.tif"].shape == (2, 4)


@pytest.mark.slow  # a whole loop, 20-30 s on a slow CPU: run by .ci/run's second stage
def test_loop_records_and_oversamples_hard_positives(synth_scenes: Path, tmp_path: Path) -> None:
    cfg_path = small_config(
        synth_scenes, tmp_path, name="hp", train__hard_positive_factor=3, train__hard_positive_below=0.5,
        train__hard_positive_max_rounds=2,
    )
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    import json

    manifest = json.loads((run / "manifest.json").read_text())
    labels = gpd.read_file(synth_scenes / "train_labels.gpkg")
    for r in (1, 2):
        rd = run / f"round_{r:03d}"
        hp = gpd.read_file(rd / "hard_positives.gpkg", layer="hard_positives")
        assert len(hp) == len(labels)  # one row per labelled training object
        entry = manifest["rounds"][r]["steps"]
        assert entry["mine"]["hard_positives"] == int(hp["hard"].sum()) > 0  # a 12-step model misses many
        assert entry["detect"]["train_scan"]["tiles"] > 0
        if hp["oversample"].astype(bool).any():
            assert entry["train"]["hard_positive_chips"] > 0
    # objects hard in rounds 1 and 2 are listed for review, and not oversampled in round 2
    hp2 = gpd.read_file(run / "round_002" / "hard_positives.gpkg", layer="hard_positives")
    chronic = hp2["review"].astype(bool)
    assert chronic.any() and not (chronic & hp2["oversample"].astype(bool)).any()
    review = gpd.read_file(run / "bank.gpkg", layer="review")
    assert (review["reason"] == "labelled object missed every round").sum() >= 1
    assert np.all(hp2.loc[chronic, "rounds_hard"] >= 2)


def test_review_decisions_on_chronic_misses() -> None:
    from hem_bootstrap.mining.bank import NegativeBank
    from hem_bootstrap.mining.review import apply_review

    first = carry_history(hard_positives("a.tif", _gt(), _dets([]), T, 0.5, 0.3), None, 1)
    assert first["review"].all()  # max_rounds 1: every miss goes straight to review
    bank = NegativeBank()
    assert bank.add_review(review_rows(first), 1, "unused") == 3
    rid = bank.review()["review_id"].tolist()
    decisions = pd.DataFrame({"review_id": rid, "decision": ["positive", "negative", ""]})
    out = apply_review(bank, decisions)
    assert len(out["new_positives"]) == 0  # the label exists already: confirmed, not added twice
    assert out["negatives_added"] == 1 and len(bank.active()) == 1  # a wrong label becomes a negative
    assert bank.review()["review_id"].tolist() == [rid[2]]  # undecided stays pending
