"""Image sets of mosaic tiles: a scene cut into 2 x 2 files detects as the whole scene; mixed sets are not merged."""

from __future__ import annotations

import logging
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from scenes import at_gsd, cut_into_files, loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.geo.area import evaluated_area
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.geo.vrt import virtual_paths, why_not_one_mosaic

pytestmark = pytest.mark.usefixtures("one_thread")

CUT = 384  # the 768 px test scene in four 384 px files: a file edge at pixel 384, off every tile seam


def _detect(capsys: pytest.CaptureFixture[str], cfg: Path, model: Path, images: list[str], out: Path,
            *extra: str) -> str:
    capsys.readouterr()
    main(["detect", str(cfg), "--model", str(model), *images, "--out", str(out), "--set", "model.fast_path=none",
          "--set", "runtime.batch_size=4", "--set", "tiling.overlap=64", *extra])
    return capsys.readouterr().err


def _boxes(path: Path) -> gpd.GeoDataFrame:
    cols = ["label", "score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    return gpd.read_file(path).sort_values(cols).reset_index(drop=True)


def test_a_scene_cut_into_2x2_files_detects_as_the_whole_scene(synth_scenes: Path, trained_small_model: Path,
                                                               tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEM_CACHE_DIR", str(tmp_path / "cache"))
    tiles = [str(p) for p in cut_into_files(synth_scenes / "test.tif", tmp_path / "tiles", CUT)]
    cfg = loop_config(tmp_path, "mosaic", scene_data(synth_scenes), width=None)
    _detect(capsys, cfg, trained_small_model, [str(synth_scenes / "test.tif")], tmp_path / "whole.gpkg")
    err = _detect(capsys, cfg, trained_small_model, tiles, tmp_path / "mosaic.gpkg")
    assert "4 rasters are tiles of one mosaic (768 x 768 px" in err
    whole, mosaic = _boxes(tmp_path / "whole.gpkg"), _boxes(tmp_path / "mosaic.gpkg")
    cols = ["label", "score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    assert len(whole) > 0 and whole[cols].equals(mosaic[cols])  # the same windows of the same pixels
    assert whole.geometry.geom_equals_exact(mosaic.geometry, tolerance=1e-6).all()
    edge = open_raster(synth_scenes / "test.tif").transform @ (CUT, 0)
    line = shapely.LineString([(edge[0], -1e9), (edge[0], 1e9)])
    # boxes on the file edge, whole (at any score: how sure a briefly trained model is of them differs by CPU,
    # best 0.30 on one Xeon); file by file (mosaic: off) the edge cuts them: no box crosses it at any score
    assert int(mosaic.geometry.crosses(line).sum()) > 0
    tree = yaml.safe_load(cfg.read_text())
    tree["data"]["pool"] = [{"images": tiles, "mosaic": "off"}]
    cfg.write_text(yaml.safe_dump(tree))
    err = _detect(capsys, cfg, trained_small_model, [], tmp_path / "files.gpkg")
    per_file = gpd.read_file(tmp_path / "files.gpkg")
    assert "mosaic" not in err and set(per_file["image"]) == set(tiles)
    assert len(per_file) > 0 and int(per_file.geometry.crosses(line).sum()) == 0


def test_file_by_file_when_asked_and_the_mosaic_area(synth_scenes: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEM_CACHE_DIR", str(tmp_path / "cache"))
    tiles = cut_into_files(synth_scenes / "test.tif", tmp_path / "tiles", CUT)
    [vrt] = virtual_paths(tiles, "data.test[0]")
    info, whole = open_raster(vrt), open_raster(synth_scenes / "test.tif")
    assert (info.width, info.height, info.transform) == (whole.width, whole.height, whole.transform)
    assert evaluated_area(info, [1, 2, 3]).valid_km2 == pytest.approx(whole.area_km2())
    three = virtual_paths(tiles[:3], "data.test[0]")  # an L-shaped mosaic: the missing corner is no ground
    assert evaluated_area(open_raster(three[0]), [1, 2, 3]).valid_km2 == pytest.approx(whole.area_km2() * 0.75)
    with rasterio.open(vrt) as src, rasterio.open(synth_scenes / "test.tif") as ref:
        assert np.array_equal(src.read(), ref.read())


def test_sets_that_differ_or_overlap_are_read_file_by_file_with_one_line(synth_scenes: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    tiles = cut_into_files(synth_scenes / "test.tif", tmp_path / "tiles", CUT)
    coarse = at_gsd(tiles[1], tmp_path / "coarse.tif", 0.5)
    overlapping = cut_into_files(synth_scenes / "test.tif", tmp_path / "big", 512)[:1] + tiles[:1]
    with caplog.at_level(logging.INFO, logger="hem_bootstrap.geo.vrt"):
        assert virtual_paths([tiles[0], coarse], "data.pool[0]") == [tiles[0], coarse]
        assert virtual_paths(overlapping, "data.pool[1]") == overlapping
        assert virtual_paths(tiles, "data.pool[2]", labels="boxes.csv") == tiles
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("read one by one, not as one mosaic" in m for m in lines)
    assert lines[2].endswith("pixel-CSV labels name their files")
    assert "resolutions differ (coarse.tif 0.3 m, tile_0_0.tif 0.15 m)" in lines[0]
    assert "overlap" in lines[1]
    assert why_not_one_mosaic([open_raster(t) for t in tiles]) is None
