"""scripts/bench_inference.py builds the model its ``--weights`` file was trained as.

A model file of another ``model.width`` than the default (every model made before width 1.5 became
the default is width 1) must be benchmarked at its own width, read from its card, not refused
for shape mismatches. With replicas it also scans with the model in the scan's process and
measures the replicas' own ceiling.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hem_bootstrap.config import ExperimentConfig
from hem_bootstrap.model.card import model_card
from hem_bootstrap.model.checkpoints import save_checkpoint
from hem_bootstrap.model.detectors import build_detector

ROOT = Path(__file__).resolve().parents[1]


def _width_one_model(path: Path) -> None:
    cfg = ExperimentConfig()
    cfg.model.width = 1.0
    torch.manual_seed(0)
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    save_checkpoint(path, model, card=model_card(cfg, 0.15))


def test_bench_inference_reads_the_width_of_its_weights(tmp_path: Path) -> None:
    weights = tmp_path / "w1.pt"
    _width_one_model(weights)
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--sizes", "512", "--weights", str(weights),
         "--model-seconds", "0.5", "--fast-path", "none", "--replicas", "2", "--data-dir", str(tmp_path / "rasters"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    bench = json.loads(out.read_text())
    assert bench["width"] == 1.0
    row = bench["sizes"]["512"]
    assert "error" not in row["end_to_end"] and "error" not in row["model_only"], row
    assert row["end_to_end"]["tiles"] > 0 and row["ratio"] > 0
    here, there = row["end_to_end_in_process"], row["end_to_end"]
    assert there["replicas"] == 2 and here["replicas"] == 0 and there["detections"] == here["detections"]
    ceiling = row["model_only_replicas"]
    assert ceiling["threads_each"] >= 1 and len(ceiling["runs_tiles_per_s"]) == 2, ceiling
    assert row["ratio_vs_replica_ceiling"] > 0 and row["replicas_speedup"] > 0


@pytest.mark.slow  # about a minute (torch.compile among the paths): pytest -m slow
def test_fast_path_table_has_agreement_and_a_roofline(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "bench_inference.py"), "--sizes", "512", "--fast-paths", "--fast-path",
         "none", "--replicas", "0", "--model-seconds", "0.3", "--data-dir", str(tmp_path / "rasters"), "--out", str(out)],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fast = json.loads(out.read_text())["fast_paths"]
    roof = fast["roofline"]
    # small_fcos at width 1.5 on 256 px tiles: about 5.4 GFLOP a tile, whatever the CPU
    assert 4 < roof["gflop_per_tile"] < 7, roof
    assert roof["peak_gflops_sgemm"] > 0 and roof["peak_gflops_conv"] > 0
    eager = fast["none"]
    assert eager["gflops"] == pytest.approx(eager["tiles_per_s"] * roof["gflop_per_tile"])
    assert roof["float32_ceiling_vs_eager"] == pytest.approx(1 / eager["share_of_float32_peak"])
    for mode in ("channels_last", "onnxruntime"):
        row = fast[mode]
        assert "error" not in row, row
        assert row["agreement"]["detections_ref"] >= 0 and row["speedup_vs_eager"] > 0


def test_sahi_agreement_counts_the_boxes_each_side_finds(tmp_path: Path) -> None:
    """scripts/sahi_compare.agreement: confident boxes matched at IoU >= 0.5 both ways (SAHI itself is optional)."""
    import importlib.util

    import geopandas as gpd
    import numpy as np
    import shapely

    spec = importlib.util.spec_from_file_location("sahi_compare", ROOT / "scripts" / "sahi_compare.py")
    assert spec is not None and spec.loader is not None
    sahi_compare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sahi_compare)
    boxes = {"px_xmin": [0, 50, 0], "px_ymin": [0, 50, 0], "px_xmax": [10, 60, 5], "px_ymax": [10, 60, 5]}
    gpd.GeoDataFrame({"score": [0.9, 0.8, 0.1], **boxes}, geometry=[shapely.box(0, 0, 1, 1)] * 3,
                     crs="EPSG:32633").to_file(tmp_path / "ours.gpkg")
    np.save(tmp_path / "sahi.npy", np.array([[0, 0, 10, 11, 0.9], [100, 100, 110, 110, 0.95], [50, 50, 60, 60, 0.2]]))
    got = sahi_compare.agreement(tmp_path / "ours.gpkg", tmp_path / "sahi.npy")
    assert (got["ours"], got["sahi"]) == (2, 2)  # below min_score 0.3 left out on both sides
    assert got["ours_found_by_sahi"] == 0.5 and got["sahi_found_by_ours"] == 0.5
