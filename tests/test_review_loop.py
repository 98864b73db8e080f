"""Review decisions reach the loop: the next round trains with accepted positives and keeps rejected negatives."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import torch
from scenes import loop_config, scene_data
from torchvision.ops import box_iou

from hem_bootstrap.cli import main
from hem_bootstrap.mining.review import POSITIVES_FILE

PX = ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]


def _px(frame: gpd.GeoDataFrame) -> torch.Tensor:
    return torch.tensor(frame[PX].to_numpy(dtype=np.float64)).reshape(-1, 4)


def _hem(*args: str) -> None:
    try:
        main(["-q", *args])
    except SystemExit as ex:
        assert not ex.code, f"hem {' '.join(args)} exited {ex.code}"


@pytest.mark.slow  # a whole loop, 20-30 s on a slow CPU: run by .ci/run's second stage
def test_review_decisions_stick_in_the_next_round(synth_scenes: Path, tmp_path: Path) -> None:
    # a low review score, so that round 1 holds suspects back for a person to decide
    cfg = loop_config(tmp_path, "rev", scene_data(synth_scenes), k=30, review_above=0.15)
    _hem("run", str(cfg))
    run = tmp_path / "runs" / "rev"
    review = gpd.read_file(run / "round_001" / "bank.gpkg", layer="review")
    assert len(review) >= 2, "the run should hold suspects for review"
    review = review.sort_values("score", ascending=False).reset_index(drop=True)
    pos, neg = review.iloc[[0]], review.iloc[[1]]
    decisions = review[["review_id", "geometry"]].assign(decision="")
    decisions.loc[0, "decision"], decisions.loc[1, "decision"] = "positive", "negative"
    decisions.to_file(tmp_path / "decisions.gpkg")
    _hem("review", "apply", str(run), str(tmp_path / "decisions.gpkg"))

    # the snapshot the next round starts from holds the decisions; nothing else has to be merged
    snap = gpd.read_file(run / "round_001" / "bank.gpkg", layer="review")
    assert not set(snap["review_id"]) & {int(pos.review_id.iloc[0]), int(neg.review_id.iloc[0])}
    accepted = gpd.read_file(run / POSITIVES_FILE, layer="labels")
    assert len(accepted) == 1 and accepted["class"].tolist() == ["vehicle"]

    _hem("round", str(cfg), "--run", str(run))  # no --force: review decisions are no config change
    manifest = json.loads((run / "manifest.json").read_text())
    steps = {e["round"]: e["steps"] for e in manifest["rounds"]}
    assert steps[2]["train"]["accepted_positives"] == 1
    # one more positive chip than round 1 trained on: the accepted object, centred
    assert steps[2]["train"]["chips"]["pos"] == steps[1]["train"]["chips"]["pos"] + 1
    assert manifest["reviews"][0]["positives_accepted"] == 1 and manifest["reviews"][0]["negatives_added"] == 1

    bank = gpd.read_file(run / "round_002" / "bank.gpkg", layer="negatives")
    same_image = bank[bank["image"] == neg["image"].iloc[0]]
    kept = box_iou(_px(neg), _px(same_image))[0] > 0.5
    assert bool(kept.any()) and bool(same_image[kept.numpy()]["reviewed"].all())  # the rejected one stays a negative
    assert not bool(same_image[kept.numpy()]["retired"].all())
    pending = gpd.read_file(run / "round_002" / "bank.gpkg", layer="review")
    for decided in (pos, neg):  # neither comes back for review
        rows = pending[pending["image"] == decided["image"].iloc[0]]
        assert not bool((box_iou(_px(decided), _px(rows))[0] > 0.5).any())
    # the accepted object is never mined again: no bank row or round-2 mined box on it
    active = bank[(bank["image"] == pos["image"].iloc[0]) & ~bank["retired"].astype(bool)]
    assert not bool((box_iou(_px(pos), _px(active))[0] > 0.5).any())
    mined = gpd.read_file(run / "round_002" / "mined.gpkg")
    mined = mined[mined["image"] == pos["image"].iloc[0]]
    assert not bool((box_iou(_px(pos), _px(mined))[0] > 0.5).any())


def test_review_apply_without_a_snapshot_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "runs" / "empty"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"rounds": []}))
    gpd.GeoDataFrame({"review_id": [1], "decision": ["negative"]}, geometry=[None]).to_file(tmp_path / "d.gpkg")
    with pytest.raises(SystemExit) as ex:
        main(["-q", "review", "apply", str(run), str(tmp_path / "d.gpkg")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no bank snapshot" in err[0]
