"""Reports from fake run directories: a tiny GeoTIFF, real metrics.json files and mined.gpkg."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import matplotlib.image as mpimg
import pytest
import shapely
import yaml

from hem_bootstrap.config import EvaluateConfig
from hem_bootstrap.errors import RunError
from hem_bootstrap.evaluate import EvalImage, evaluate, write_metrics
from hem_bootstrap.report import compare_runs, format_table, plot_mined_examples, round_table, write_report

X0, Y0 = 500_000.0, 5_000_000.0  # conftest's default transform: 0.5 m pixels, top-left here
CRS = "EPSG:32633"


def _box(col: float, row: float, size: float = 8) -> shapely.Polygon:
    """A box given by its top-left pixel in the conftest raster (0.5 m, north up)."""
    return shapely.box(X0 + col * 0.5, Y0 - (row + size) * 0.5, X0 + (col + size) * 0.5, Y0 - row * 0.5)


def _dets(raster: Path, boxes: list[shapely.Polygon], scores: list[float]) -> gpd.GeoDataFrame:
    n = len(boxes)
    return gpd.GeoDataFrame(
        {
            "image": [str(raster)] * n,
            "label": [1] * n,
            "score": scores,
            "win_col": [0] * n,
            "win_row": [0] * n,
            "win_w": [128] * n,
            "win_h": [128] * n,
        },
        geometry=boxes,
        crs=CRS,
    )


def _metrics(raster: Path, n_fp: int) -> dict:
    """Real evaluate() output: 4 objects all found, plus ``n_fp`` false positives."""
    gt_boxes = [_box(10 + 25 * i, 10) for i in range(4)]
    gt = gpd.GeoDataFrame({"label": [1] * 4, "class": ["vehicle"] * 4}, geometry=gt_boxes, crs=CRS)
    fps = [_box(10 + 25 * i, 80) for i in range(n_fp)]
    dets = _dets(raster, gt_boxes + fps, [0.9, 0.8, 0.7, 0.6] + [0.95 - 0.1 * i for i in range(n_fp)])
    img = EvalImage(image=str(raster), gt=gt, area_km2=128 * 128 * 0.25 / 1e6)
    return evaluate(dets, [img], EvaluateConfig(score_threshold=0.5))


@pytest.fixture
def make_run(tmp_path: Path, make_raster: Callable[..., Path]) -> Callable[..., Path]:
    """Factory: a run directory with rounds whose FP counts are given; round 1 has mined negatives."""

    def factory(name: str, fps_by_round: list[int], unfinished: bool = False, test: str = "/data/test.tif") -> Path:
        run = tmp_path / name
        run.mkdir(parents=True, exist_ok=True)
        (run / "config.resolved.yaml").write_text(yaml.safe_dump(
            {"data": {"test": [{"images": [test]}], "classes": ["vehicle"]}, "evaluate": {"iou": 0.5}}))
        raster = make_raster(name=f"{name}.tif", width=128, height=128)
        rounds = []
        for r, n_fp in enumerate(fps_by_round):
            write_metrics(run / f"round_{r:03d}" / "metrics.json", _metrics(raster, n_fp))
            entry = {
                "round": r,
                "metrics": f"round_{r:03d}/metrics.json",
                "bank_size": 5 * r,
                "new_negatives": 5 if r else 0,
                "pool_fp": 10 - r,
                "mined": None,
            }
            rounds.append(entry)
        mined = _dets(raster, [_box(40, 40), _box(100, 100), _box(0, 60)], [0.9, 0.7, 0.6])
        mined.loc[2, "image"] = str(tmp_path / "gone.tif")  # a raster that disappeared
        (run / "round_001").mkdir(parents=True, exist_ok=True)
        mined.to_file(run / "round_001" / "mined.gpkg", layer="mined", driver="GPKG")
        rounds[1]["mined"] = "round_001/mined.gpkg"
        # an older manifest shape: counts only under steps.mine
        rounds[-1] = {"round": len(rounds) - 1, "steps": {"mine": {"bank_size": 99, "new_negatives": 7}}}
        if unfinished:
            rounds.append({"round": len(rounds), "steps": {"detect": {}}})
        manifest = {"rounds": rounds, "config": "config.resolved.yaml"}
        (run / "manifest.json").write_text(json.dumps(manifest))
        return run

    return factory


def _valid_png(path: Path) -> None:
    assert path.is_file() and path.stat().st_size > 0
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[0] > 50 and img.shape[1] > 50
    assert img.std() > 0  # something was drawn


def test_round_table_reads_manifest_and_metrics(make_run: Callable[..., Path]) -> None:
    run = make_run("a", [3, 1, 0], unfinished=True)
    rows = round_table(run)
    assert [r["round"] for r in rows] == [0, 1, 2, 3]
    area = 128 * 128 * 0.25 / 1e6
    assert rows[0]["fp_per_km2"] == pytest.approx(3 / area)
    assert rows[0]["ap50"] < 1.0 and rows[2]["ap50"] == pytest.approx(1.0)  # FPs above TPs cost AP
    assert rows[1]["fp_per_km2_r80"] == pytest.approx(1 / area)  # recall 0.8 needs the FP at 0.95
    assert rows[2]["fp_per_km2_r90"] == 0.0
    assert (rows[1]["bank_size"], rows[1]["new_negatives"], rows[1]["pool_fp"]) == (5, 5, 9)
    assert (rows[2]["bank_size"], rows[2]["new_negatives"], rows[2]["pool_fp"]) == (99, 7, None)
    assert rows[3]["ap50"] is None  # not evaluated yet


def test_format_table_is_fixed_width(make_run: Callable[..., Path]) -> None:
    text = format_table(round_table(make_run("a", [3, 1, 0], unfinished=True)))
    lines = text.splitlines()
    assert len(lines) == 2 + 4
    assert len({len(line) for line in lines}) == 1
    for header in ("round", "bank", "new neg", "pool FP", "AP@0.5", "FP/km²", "FP/km²@R0.8", "look-alike@R0.8"):
        assert header in lines[0]
    assert lines[-1].split()[0] == "3" and lines[-1].split()[-1] == "-"


def test_write_report_files(make_run: Callable[..., Path]) -> None:
    run = make_run("a", [3, 1, 0], unfinished=True)
    path = write_report(run)
    assert path == run / "report" / "report.md"
    md = path.read_text()
    assert "| round | bank size | new negatives | pool FPs | hard positives | AP@0.5 | AP |" in md
    assert md.count("\n| ") == 1 + 4  # header + one line per round
    for name in ("pr_curves.png", "fp_ap_by_round.png", "bank_by_round.png", "mined_examples_round_001.png"):
        _valid_png(run / "report" / name)
        assert f"({name})" in md
    assert not (run / "report" / "mined_examples_round_002.png").exists()
    assert not [p for p in (run / "report").iterdir() if p.name.startswith(".")]


def test_mined_examples_empty_file(tmp_path: Path, make_raster: Callable[..., Path]) -> None:
    raster = make_raster(width=64, height=64)
    path = tmp_path / "mined.gpkg"
    _dets(raster, [], []).to_file(path, layer="mined", driver="GPKG")
    assert plot_mined_examples(tmp_path, path, tmp_path / "x.png") is None


def test_compare_runs(make_run: Callable[..., Path], tmp_path: Path) -> None:
    a = make_run("baseline", [3, 3, 2])
    b = make_run("hem", [3, 1, 0, 1])
    text = compare_runs([a, b], tmp_path / "cmp")
    assert "baseline AP@0.5" in text and "hem FP/km²" in text
    per_round = text.split("Last and best")[0]
    assert [ln.split()[0] for ln in per_round.splitlines()[4:8]] == ["0", "1", "2", "3"]
    summary = {
        (ln.split()[0], ln.split()[1]): ln.split()
        for ln in text.splitlines()
        if ln.startswith(("baseline ", "hem "))
    }
    assert summary[("hem", "last")][2] == "3"
    assert summary[("hem", "best")][2] == "2" and summary[("hem", "best")][3] == "1.000"
    _valid_png(tmp_path / "cmp" / "compare.png")
    assert "plot:" not in compare_runs([a, b], None)
    assert "NOT COMPARABLE" not in text


def test_compare_names_runs_measured_on_other_imagery(make_run: Callable[..., Path],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    a = make_run("a", [3, 1])
    b = make_run("b", [3, 2])
    c = make_run("c", [2, 0], test="/data/other_test.tif")
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.report"):
        text = compare_runs([a, b, c])
    head = text.split("Per round")[0]
    assert "NOT COMPARABLE" in head and "data.test differs (c against a)" in head
    assert "data.test differs" in caplog.text
    (b / "config.resolved.yaml").unlink()
    assert "b: no readable config.resolved.yaml" in compare_runs([a, b])
    with pytest.raises(RunError, match="1 run directory given, expected two or more"):
        compare_runs([a])
    # a run saved before evaluate.calibrate_recall existed compares with a new one at its default
    tree = yaml.safe_load((a / "config.resolved.yaml").read_text())
    tree["evaluate"]["calibrate_recall"] = 0.8
    (b / "config.resolved.yaml").write_text(yaml.safe_dump(tree))
    assert "NOT COMPARABLE" not in compare_runs([a, b])


def test_not_a_run_directory(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="no manifest.json"):
        round_table(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(RunError, match="manifest.json"):
        write_report(tmp_path)
