"""Two vehicle classes end to end: synthetic cars and vans, one round of the loop, classes kept everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pytest
import yaml
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.data.synth import SceneSpec, make_scene, write_scene
from hem_bootstrap.mining.bank import NegativeBank


def test_synth_labels_cars_and_vans_on_the_same_pixels() -> None:
    spec = SceneSpec(size=768, gsd=0.15, seed=110)
    rgb, labels, _, _ = make_scene(spec)
    rgb2, labels2, _, _ = make_scene(SceneSpec(size=768, gsd=0.15, seed=110, vehicle_classes=True))
    assert (rgb == rgb2).all() and labels.geometry.equals(labels2.geometry)
    assert set(labels["class"]) == {"vehicle"}
    counts = labels2["class"].value_counts()
    assert set(counts.index) == {"car", "van"} and counts["car"] > counts["van"] > 0


def test_two_classes_run_the_loop_and_keep_their_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scenes = tmp_path / "scenes"
    for name, seed in (("train", 110), ("pool", 106), ("test", 115)):
        write_scene(scenes, SceneSpec(size=768, gsd=0.15, seed=seed, vehicle_classes=True), name=name)
    cfg = loop_config(tmp_path, "two", scene_data(scenes), steps=12, k=10)
    tree = yaml.safe_load(cfg.read_text())
    tree["data"]["classes"] = ["car", "van"]
    tree["model"]["score_floor"] = 0.0  # a briefly trained model: keep every box, so both classes are predicted
    cfg.write_text(yaml.safe_dump(tree))
    main(["-q", "run", str(cfg)])
    run = tmp_path / "runs" / "two"
    metrics = json.loads((run / "round_001" / "metrics.json").read_text())
    per_class = metrics["per_class"]
    assert set(per_class) == {"car", "van"}
    for c in per_class.values():
        assert {"ap50", "fp_per_km2", "fp_per_km2_at_recall", "n_gt"} <= set(c) and c["n_gt"] > 0
    table = (run / "table.txt").read_text()
    assert "AP@0.5 car" in table and "FP/km² van" in table
    dets = gpd.read_file(run / "round_001" / "detections.gpkg")
    assert set(dets["class"]) == {"car", "van"} and set(dets["label"]) == {1, 2}
    assert (dets["class"] == dets["label"].map({1: "car", 2: "van"})).all()
    bank = NegativeBank.load(run / "round_001" / "bank.gpkg").active()
    assert len(bank) > 0 and set(bank["label"]) <= {1, 2}  # each negative keeps the class it was taken for
    on_disk = gpd.read_file(run / "round_001" / "bank.gpkg", layer="negatives")  # as QGIS shows the layer
    assert (on_disk["class"] == on_disk["label"].map({1: "car", 2: "van"})).all()
    review = gpd.read_file(run / "round_001" / "bank.gpkg", layer="review")
    assert (review["class"] == review["label"].map({1: "car", 2: "van"})).all()
    capsys.readouterr()
    main(["-q", "bank", "export", str(run), "--format", "coco", "--out", str(tmp_path / "bank.json")])
    anns = json.loads((tmp_path / "bank.json").read_text())["annotations"]
    assert {a["predicted_class"] for a in anns} <= {"car", "van"} and len(anns) == len(bank)
