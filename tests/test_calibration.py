"""Each round's operating threshold is chosen on validation imagery (data.val), never on the test scenes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.config import DataConfig, EvaluateConfig
from hem_bootstrap.data.synth import SceneSpec, write_scene
from hem_bootstrap.detections import read_detections
from hem_bootstrap.evaluate import EvalImage, evaluate
from hem_bootstrap.geo.labels import load_labels
from hem_bootstrap.geo.raster import open_raster


def _val_scene(folder: Path) -> dict[str, str]:
    paths = write_scene(folder, SceneSpec(size=768, gsd=0.15, seed=91), name="val")
    return {"images": [str(paths["image"])], "labels": str(paths["labels"]), "distractors": str(paths["distractors"])}


def _recall_at(path: Path, labels: str, dets_path: Path, thr: float) -> float:
    info = open_raster(path)
    gt = load_labels(labels, info, DataConfig(), image_name=path.name)
    m = evaluate(read_detections(dets_path), [EvalImage(image=str(path), gt=gt, area_km2=0.01, transform=info.transform)],
                 EvaluateConfig(score_threshold=thr))
    return float(m["recall"])


def test_operating_threshold_comes_from_the_validation_scene(synth_scenes: Path, tmp_path: Path) -> None:
    val = _val_scene(tmp_path / "val")
    data = {**scene_data(synth_scenes), "val": [val]}
    cfg_path = loop_config(tmp_path, "cal", data, steps=40)
    tree = yaml.safe_load(cfg_path.read_text())
    tree["rounds"]["n_rounds"] = 0
    tree["evaluate"] = {"calibrate_recall": 0.6, "fixed_recalls": [0.6, 0.8]}
    cfg_path.write_text(yaml.safe_dump(tree))
    try:
        main(["-q", "run", str(cfg_path)])
    except SystemExit as ex:
        assert not ex.code
    rd = tmp_path / "runs" / "cal" / "round_000"
    m = json.loads((rd / "metrics.json").read_text())
    cal = m["calibration"]
    assert cal["reached"] and cal["recall_target"] == 0.6
    assert m["score_threshold"] == cal["threshold"]  # the test operating point uses the val threshold
    image = Path(val["images"][0])
    # the highest threshold reaching the target on val: at it recall >= 0.6, just above it less
    assert _recall_at(image, val["labels"], rd / "val_detections.gpkg", cal["threshold"]) >= 0.6
    assert _recall_at(image, val["labels"], rd / "val_detections.gpkg", cal["threshold"] + 1e-6) < 0.6
    assert "log_avg_fp_per_km2" in m and set(m["per_image"]) == {str(synth_scenes / "test.tif")}


def test_validation_imagery_must_not_be_a_test_scene(synth_scenes: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    data = scene_data(synth_scenes)
    data["val"] = data["test"]
    cfg_path = loop_config(tmp_path, "bad", data)
    with pytest.raises(SystemExit) as ex:
        main(["-q", "run", str(cfg_path)])
    assert ex.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.test" in err[0] and "test.tif" in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "runs" / "bad").exists()


def test_validation_imagery_needs_labels(synth_scenes: Path, tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    data = scene_data(synth_scenes)
    data["val"] = [{"images": [str(synth_scenes / "pool.tif")]}]
    cfg_path = loop_config(tmp_path, "nolabels", data)
    with pytest.raises(SystemExit) as ex:
        main(["-q", "run", str(cfg_path)])
    assert ex.value.code != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "data.val[0]" in err[0] and "labels" in err[0]
    assert not (tmp_path / "runs" / "nolabels").exists()
