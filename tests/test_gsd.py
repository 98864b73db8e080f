"""One ground resolution: with data.gsd, a raster of another GSD is read at it, and detects like the original."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from scenes import at_gsd, cut_into_files, loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.config import config_from_tree
from hem_bootstrap.inputs import check_inputs

pytestmark = pytest.mark.usefixtures("one_thread")


def _detect(capsys: pytest.CaptureFixture[str], cfg: Path, model: Path, image: Path, out: Path, *extra: str) -> str:
    capsys.readouterr()
    main(["detect", str(cfg), "--model", str(model), str(image), "--out", str(out), "--set", "model.fast_path=none",
          "--set", "runtime.batch_size=4", *extra])
    return capsys.readouterr().err


def _agreement(a: gpd.GeoDataFrame, b: gpd.GeoDataFrame, min_score: float = 0.5) -> float:
    """Share of ``a``'s confident boxes that ``b`` has too (map IoU >= 0.5, any score >= min_score / 2)."""
    a, b = a[a["score"] >= min_score], b[b["score"] >= min_score / 2]
    ga, gb = np.asarray(a.geometry.values), np.asarray(b.geometry.values)
    inter = shapely.area(shapely.intersection(ga[:, None], gb[None, :]))
    iou = inter / (shapely.area(ga)[:, None] + shapely.area(gb)[None, :] - inter)
    return float((iou.max(axis=1) >= 0.5).mean())


def test_a_raster_at_twice_the_resolution_read_at_data_gsd_detects_alike(
        synth_scenes: Path, trained_small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEM_CACHE_DIR", str(tmp_path / "cache"))
    fine = at_gsd(synth_scenes / "test.tif", tmp_path / "fine.tif", 2.0)  # 0.075 m, 1536 px
    cfg = loop_config(tmp_path, "gsd", scene_data(synth_scenes), width=None)
    _detect(capsys, cfg, trained_small_model, synth_scenes / "test.tif", tmp_path / "coarse.gpkg")
    err = _detect(capsys, cfg, trained_small_model, fine, tmp_path / "fine.gpkg", "--set", "data.gsd=0.15")
    assert "1 raster(s) read at data.gsd = 0.15 m: fine.tif 0.075 m" in err
    err_raw = _detect(capsys, cfg, trained_small_model, fine, tmp_path / "raw.gpkg")
    coarse, resampled, raw = (gpd.read_file(tmp_path / f"{n}.gpkg") for n in ("coarse", "fine", "raw"))
    assert resampled.crs == coarse.crs and "data.gsd" not in err_raw
    both = (_agreement(coarse, resampled), _agreement(resampled, coarse))
    print(f"two-GSD agreement: {both[0]:.3f} of the 0.15 m scan's boxes, {both[1]:.3f} of the resampled one's")
    assert min(both) >= 0.85  # the same objects, in map coordinates
    assert _agreement(coarse, raw) < min(both)  # read at its own 0.075 m, objects look twice as big


def test_mixed_resolutions_without_data_gsd_are_named_in_one_warning(synth_scenes: Path, tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEM_CACHE_DIR", str(tmp_path / "cache"))
    fine = at_gsd(synth_scenes / "test.tif", tmp_path / "fine.tif", 2.0)
    tree = {"data": {"train": [{"images": [str(synth_scenes / "train.tif")],
                                "labels": str(synth_scenes / "train_labels.gpkg")}],
                     "test": [{"images": [str(fine)], "labels": str(synth_scenes / "test_labels.gpkg")}]}}
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        check_inputs(config_from_tree(tree, tmp_path))
    warned = [r.getMessage() for r in caplog.records if "mixed ground resolutions" in r.getMessage()]
    assert warned == ["rasters at mixed ground resolutions: fine.tif 0.075 m, train.tif 0.15 m; the model sees "
                      "objects at different sizes; set data.gsd to read them all at one"]
    caplog.clear()
    tree["data"]["gsd"] = 0.15
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        inputs = check_inputs(config_from_tree(tree, tmp_path))
    assert not caplog.records
    test = inputs.readable("test")[0]
    assert test.path.suffix == ".vrt" and test.header().res == pytest.approx((0.15, -0.15))
    assert (test.header().width, test.header().height) == (768, 768)
    assert len(test.truth(config_from_tree(tree, tmp_path))) == len(gpd.read_file(synth_scenes / "test_labels.gpkg"))


def test_a_2x2_mosaic_at_mixed_gsd_is_one_raster_at_data_gsd(synth_scenes: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEM_CACHE_DIR", str(tmp_path / "cache"))
    tiles = cut_into_files(synth_scenes / "test.tif", tmp_path / "tiles", 384)
    tiles[3] = at_gsd(tiles[3], tmp_path / "tiles" / "tile_1_1_fine.tif", 2.0)  # one file from a finer campaign
    tiles[3].with_name("tile_1_1.tif").unlink()
    tree = {"data": {"train": [{"images": [str(synth_scenes / "train.tif")],
                                "labels": str(synth_scenes / "train_labels.gpkg")}],
                     "test": [{"images": [str(tmp_path / "tiles" / "*.tif")]}], "gsd": 0.15}}
    [test] = check_inputs(config_from_tree(tree, tmp_path)).readable("test")
    info = test.header()
    assert (info.width, info.height) == (768, 768) and info.res == pytest.approx((0.15, -0.15))
    with rasterio.open(test.path) as src, rasterio.open(synth_scenes / "test.tif") as ref:
        got, want = src.read().astype(np.int16), ref.read().astype(np.int16)
    assert np.array_equal(got[:, :, :384], want[:, :, :384]) and np.array_equal(got[:, :384], want[:, :384])
    assert np.abs(got[:, 384:, 384:] - want[:, 384:, 384:]).mean() < 4  # the resampled quarter, nearly the same
