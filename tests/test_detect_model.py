"""``hem detect MODEL IMAGES...``: inference from a model file alone, its settings read from the model card."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio
import shapely
import torch
import yaml
from affine import Affine
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.model.card import read_card


def _hem(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        main([*args])
        code = 0
    except SystemExit as ex:
        code = int(ex.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def run0(synth_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A round-0 run trained through ``hem run`` with a non-default overlap and score floor (must travel in the card)."""
    folder = tmp_path_factory.mktemp("card_run")
    cfg = loop_config(folder, "card", scene_data(synth_scenes), steps=12)
    tree = yaml.safe_load(cfg.read_text())
    tree["rounds"]["n_rounds"] = 0
    tree["tiling"]["overlap"] = 48
    tree["model"]["score_floor"] = 0.02
    cfg.write_text(yaml.safe_dump(tree))
    main(["-q", "run", str(cfg)])
    return cfg, folder / "runs" / "card"


def _frame(path: Path) -> gpd.GeoDataFrame:
    return gpd.read_file(path).sort_values(["score", "px_xmin", "px_ymin"]).reset_index(drop=True)


def test_a_model_file_alone_detects_as_its_experiment_does(run0: tuple[Path, Path], synth_scenes: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = run0
    model = run / "round_000" / "model.pt"
    card = read_card(model)
    assert card["overlap"] == 48 and card["model"]["score_floor"] == 0.02 and card["gsd_m"] == pytest.approx(0.15)
    assert card["classes"] == ["vehicle"] and card["bands"] == [1, 2, 3] and card["scaling"]["scale"] == "auto"
    image = str(synth_scenes / "test.tif")
    # the same runtime as the experiment's (batch 4, eager float32), so the two scans compute the same sums
    same = ["--set", "model.fast_path=none", "--set", "runtime.batch_size=4"]
    code, out, err = _hem(capsys, "-q", "detect", str(model), image, "--out", str(tmp_path / "alone.gpkg"), *same)
    assert code == 0, err
    code, _, err = _hem(capsys, "-q", "detect", str(cfg), "--model", str(model), "--images", image,
                        "--out", str(tmp_path / "config.gpkg"), *same)
    assert code == 0, err
    alone, with_cfg = _frame(tmp_path / "alone.gpkg"), _frame(tmp_path / "config.gpkg")
    assert len(alone) > 0 and alone.crs == with_cfg.crs
    cols = ["score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    assert alone[cols].equals(with_cfg[cols])
    assert list(alone.columns[:3]) == ["image", "label", "class"] and set(alone["class"]) == {"vehicle"}
    # an exported model: weights alone plus the card beside them
    exported = tmp_path / "export" / "vehicles.pth"
    assert _hem(capsys, "-q", "export-model", str(run), "--out", str(exported))[0] == 0
    assert "card" not in torch.load(exported, weights_only=False)  # a plain state_dict
    assert json.loads(exported.with_suffix(".json").read_text())["overlap"] == 48
    assert _hem(capsys, "-q", "detect", str(exported), image, "--out", str(tmp_path / "exported.gpkg"), *same)[0] == 0
    assert _frame(tmp_path / "exported.gpkg")[cols].equals(alone[cols])
    # COCO results: named categories, and each image with its size
    assert _hem(capsys, "-q", "detect", str(model), image, "--out", str(tmp_path / "coco.json"), *same)[0] == 0
    coco = json.loads((tmp_path / "coco.json").read_text())
    assert coco["categories"] == [{"id": 1, "name": "vehicle"}]
    assert coco["images"] == [{"id": 1, "file_name": image, "width": 768, "height": 768}]
    assert len(coco["annotations"]) == len(alone)
    # plain options and --set override the card
    code, _, err = _hem(capsys, "-q", "detect", str(model), image, "--score-floor", "0.3", "--out",
                        str(tmp_path / "floor.gpkg"), *same)
    assert code == 0, err
    floor = gpd.read_file(tmp_path / "floor.gpkg")
    assert len(floor) < len(alone) and (floor["score"] >= 0.3).all()


def test_export_model_as_onnx_runs_in_onnxruntime_as_the_model_does(run0: tuple[Path, Path], tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """``--format onnx``: NAME.onnx is the backbone and heads; onnxruntime gives the model's head outputs."""
    import numpy as np
    import onnxruntime as ort

    from hem_bootstrap.config import load_config
    from hem_bootstrap.model.checkpoints import load_checkpoint
    from hem_bootstrap.model.detectors import build_detector

    cfg_path, run = run0
    out = tmp_path / "m.pth"
    code, text, err = _hem(capsys, "-q", "export-model", str(run), "--out", str(out), "--format", "onnx")
    assert code == 0, err
    card = json.loads(out.with_suffix(".json").read_text())["onnx"]
    assert card["file"] == "m.onnx" and card["outputs"] == ["cls_logits", "bbox_regression", "bbox_ctrness"]
    cfg = load_config(cfg_path)
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(run / "round_000" / "model.pt", model)
    model.eval()
    x = torch.rand(3, 3, 128, 160, generator=torch.Generator().manual_seed(0))  # another batch and size
    with torch.inference_mode():
        want = model.head(list(model.backbone((x - torch.tensor(card["mean"])[:, None, None])
                                               / torch.tensor(card["std"])[:, None, None]).values()))
    norm = ((x - torch.tensor(card["mean"])[:, None, None]) / torch.tensor(card["std"])[:, None, None]).numpy()
    got = ort.InferenceSession(str(out.with_suffix(".onnx")), providers=["CPUExecutionProvider"]).run(
        card["outputs"], {"images": norm})
    for name, arr in zip(card["outputs"], got, strict=True):
        np.testing.assert_allclose(arr, want[name].numpy(), atol=1e-3, rtol=1e-3)
    code, _, err = _hem(capsys, "-q", "export-model", str(run), "--out", str(tmp_path / "x.pth"), "--format", "tflite")
    assert code == 2 and "--format tflite: expected pth or onnx" in err


def test_a_raster_at_another_gsd_is_named_with_both_values(run0: tuple[Path, Path], synth_scenes: Path,
                                                           tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, run = run0
    coarse = tmp_path / "coarse.tif"
    with rasterio.open(synth_scenes / "test.tif") as src:
        profile = src.profile | {"transform": src.transform @ Affine.scale(2.0)}  # the same pixels at 0.30 m
        with rasterio.open(coarse, "w", **profile) as dst:
            dst.write(src.read())
    code, _, err = _hem(capsys, "detect", str(run / "round_000" / "model.pt"), str(coarse),
                        "--out", str(tmp_path / "d.gpkg"))
    assert code == 0, err
    warning = [ln for ln in err.splitlines() if "ground resolution" in ln]
    assert len(warning) == 1 and "coarse.tif" in warning[0] and "0.3 m" in warning[0] and "0.15 m" in warning[0]


def test_model_files_without_a_card_or_images_are_one_line_errors(run0: tuple[Path, Path], synth_scenes: Path,
                                                                  tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    cfg, run = run0
    model = run / "round_000" / "model.pt"
    raw = tmp_path / "raw.pth"
    torch.save(torch.load(model, weights_only=False)["model"], raw)
    cases = [
        (("detect", str(raw), str(synth_scenes / "test.tif"), "--out", str(tmp_path / "a.gpkg")),
         ["raw.pth", "no model card", "hem export-model"]),
        (("detect", str(model), "--out", str(tmp_path / "b.gpkg")), ["name the rasters to scan"]),
        (("detect", str(model), str(tmp_path / "x*.tif"), "--out", str(tmp_path / "c.gpkg")), ["no file matches"]),
        (("detect", str(tmp_path / "nope.pt"), str(synth_scenes / "test.tif"), "--out", str(tmp_path / "d.gpkg")),
         ["nope.pt", "not found"]),
        (("detect", str(cfg), str(synth_scenes / "test.tif"), "--out", str(tmp_path / "e.gpkg")), ["needs --model"]),
        (("export-model", str(run), "--out", str(tmp_path / "m.json")), ["m.json", "NAME.json", ".pth"]),
    ]
    for args, needles in cases:
        code, _, err = _hem(capsys, "-q", *args)
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert code == 2 and len(lines) == 1 and "Traceback" not in err, err
        assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "a.gpkg").exists()


def test_an_area_of_interest_limits_the_scan(run0: tuple[Path, Path], synth_scenes: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    _, run = run0
    model, image = str(run / "round_000" / "model.pt"), str(synth_scenes / "test.tif")
    with rasterio.open(image) as src:
        left, bottom, right, top = src.bounds
        crs = src.crs
    half = left + (right - left) / 2
    aoi = tmp_path / "aoi.gpkg"
    gpd.GeoDataFrame(geometry=[shapely.box(left, bottom, half, top)], crs=crs).to_file(aoi)
    same = ["--set", "model.fast_path=none", "--set", "runtime.batch_size=4"]
    code, full_out, err = _hem(capsys, "detect", model, image, "--out", str(tmp_path / "full.gpkg"), *same)
    assert code == 0, err
    code, aoi_out, err = _hem(capsys, "detect", model, image, "--aoi", str(aoi), "--out", str(tmp_path / "aoi.gpkg"),
                              *same)
    assert code == 0, err
    tiles = [int(re.search(r"from (\d+) tiles", o).group(1)) for o in (full_out, aoi_out)]  # type: ignore[union-attr]
    assert tiles[1] < tiles[0]
    full, part = _frame(tmp_path / "full.gpkg"), _frame(tmp_path / "aoi.gpkg")
    assert 0 < len(part) < len(full)
    assert part.geometry.intersects(shapely.box(left, bottom, half, top)).all()
    # away from the area's edge (more than a tile), the scan is the full one
    deep = half - 256 * 0.15
    cols = ["score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    inner = [f[f.geometry.bounds["maxx"] < deep].reset_index(drop=True)[cols] for f in (full, part)]
    assert len(inner[0]) > 0 and inner[0].equals(inner[1])
    code, _, err = _hem(capsys, "-q", "detect", model, image, "--aoi", str(tmp_path / "none.gpkg"),
                        "--out", str(tmp_path / "x.gpkg"))
    assert code == 2 and "--aoi" in err and "none.gpkg" in err and len(err.strip().splitlines()) == 1


def test_a_model_file_from_before_model_width_keeps_width_one(run0: tuple[Path, Path], synth_scenes: Path,
                                                              tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The default width grew to 1.5; a card without ``width`` describes a model of width 1 and still loads."""
    from hem_bootstrap.config import apply_overrides, config_from_tree
    from hem_bootstrap.model.card import model_card
    from hem_bootstrap.model.detectors import build_detector

    cfg_path, _ = run0
    tree = apply_overrides(yaml.safe_load(cfg_path.read_text()), ["model.width=1.0"])
    cfg = config_from_tree(tree, cfg_path.parent)
    card = model_card(cfg, 0.15)
    del card["model"]["width"]  # as written before the option existed
    old = tmp_path / "old.pth"
    torch.save(build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size).state_dict(), old)
    old.with_suffix(".json").write_text(json.dumps(card))
    assert read_card(old)["model"]["width"] == 1.0
    code, _, err = _hem(capsys, "-q", "detect", str(old), str(synth_scenes / "test.tif"),
                        "--out", str(tmp_path / "old.gpkg"))
    assert code == 0, err


def test_sigterm_stops_detect_without_leaving_its_scratch_file(run0: tuple[Path, Path], synth_scenes: Path,
                                                                tmp_path: Path) -> None:
    """Slurm's scancel sends SIGTERM: `hem detect` unwinds like Ctrl-C, so its `.OUT.PID.tmp.gpkg` goes too."""
    model = run0[1] / "round_000" / "model.pt"
    out = tmp_path / "out.gpkg"
    # 16 tiles a scene: the 20th is in the second scene, after the first scene's rows are in the scratch file
    env = {**os.environ, "HEM_KILL_AT": "detect.tile#20:TERM"}
    proc = subprocess.run([sys.executable, "-m", "hem_bootstrap.cli", "-q", "detect", str(model),
                           str(synth_scenes / "pool.tif"), str(synth_scenes / "test.tif"), "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 143, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1] == "terminated (SIGTERM)", proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []
