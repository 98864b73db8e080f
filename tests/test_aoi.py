"""Areas of interest per image set: what is read, which objects count, the FP/km² area, training chips."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import shapely
import torch
from test_evaluated_area import COLLAR, _collared, eval_config

from hem_bootstrap.config import DataConfig, ImageSet, config_from_tree
from hem_bootstrap.data.training import ChipDataset, prepare_train_images
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.area import evaluated_area
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.inputs import check_inputs
from hem_bootstrap.rundir import RunDir
from hem_bootstrap.steps import Context, evaluate_model, train_images

pytestmark = pytest.mark.usefixtures("one_thread")


def _west_half(image: Path, out: Path) -> shapely.Polygon:
    """A polygon file holding the western half of the raster's rectangle; returns the polygon."""
    info = open_raster(image)
    minx, miny, maxx, maxy = info.bounds
    half = shapely.box(minx, miny, (minx + maxx) / 2, maxy)
    gpd.GeoDataFrame(geometry=[half], crs=info.crs).to_file(out)
    return half


def _config(scenes: Path, image: Path, aoi: Path | None) -> Any:
    return eval_config(scenes, image, aoi=aoi)


def _evaluate(cfg: Any, model: Path, tmp: Path, name: str) -> tuple[dict[str, Any], gpd.GeoDataFrame]:
    ctx = Context(cfg=cfg, run=RunDir(tmp / "run"), device=torch.device("cpu"), progress=False,
                  inputs=check_inputs(cfg, ("train", "test")))
    metrics = evaluate_model(ctx, model, tmp / f"{name}.gpkg")
    return metrics, gpd.read_file(tmp / f"{name}.gpkg")


def test_an_image_set_aoi_limits_scan_objects_and_area(synth_scenes: Path, trained_small_model: Path,
                                                       tmp_path: Path) -> None:
    image = synth_scenes / "test.tif"
    half = _west_half(image, tmp_path / "west.gpkg")
    full, full_dets = _evaluate(_config(synth_scenes, image, None), trained_small_model, tmp_path, "full")
    part, part_dets = _evaluate(_config(synth_scenes, image, tmp_path / "west.gpkg"), trained_small_model, tmp_path,
                                "part")
    assert part["scan"]["tiles"] < full["scan"]["tiles"]
    assert 0 < len(part_dets) < len(full_dets) and part_dets.geometry.intersects(half).all()
    labels = gpd.read_file(synth_scenes / "test_labels.gpkg")
    assert part["n_gt"] == int(labels.geometry.intersects(half).sum()) < full["n_gt"]  # objects outside don't count
    assert part["area_km2"] == pytest.approx(full["area_km2"] / 2, rel=1e-3)
    assert part["fp_per_km2"] == pytest.approx(part["fp"] / part["area_km2"])


def test_the_area_is_the_aoi_and_valid_data_together(synth_scenes: Path, tmp_path: Path) -> None:
    collared = _collared(synth_scenes / "test.tif", tmp_path / "collared.tif", COLLAR)
    info = open_raster(collared)
    _west_half(collared, tmp_path / "west.gpkg")  # 640 px of 1280: the collar and 384 of the 768 valid columns
    aoi = gpd.read_file(tmp_path / "west.gpkg")
    plain = evaluated_area(info, [1, 2, 3])
    inside = evaluated_area(info, [1, 2, 3], aoi=aoi)
    assert inside.valid_km2 == pytest.approx(plain.valid_km2 * 384 / 768, rel=1e-6)
    nowhere = evaluated_area(info, [1, 2, 3], aoi=aoi.iloc[:0])  # an empty polygon file searches nothing
    assert nowhere.valid_km2 == 0.0


def test_training_background_chips_are_drawn_inside_the_aoi(synth_scenes: Path, tmp_path: Path) -> None:
    image = synth_scenes / "train.tif"
    info = open_raster(image)
    minx, miny, _, maxy = info.bounds
    corner = shapely.box(minx, maxy - 100 * info.transform.a, minx + 100 * info.transform.a, maxy)  # 100 px, top left
    gpd.GeoDataFrame(geometry=[corner], crs=info.crs).to_file(tmp_path / "corner.gpkg")
    data = DataConfig()
    sets = [ImageSet(images=[str(image)], labels=str(synth_scenes / "train_labels.gpkg"),
                     aoi=str(tmp_path / "corner.gpkg"))]
    cfg = config_from_tree({"data": {"train": [sets[0].model_dump()]}}, tmp_path)
    checked = train_images(check_inputs(cfg, ("train",)).readable("train"), cfg)  # as hem run builds them
    for images in (prepare_train_images(sets, data), checked):
        ds = ChipDataset(images, None, 40, 256, data, False, 0)
        windows = [ds.window(i) for i, k in enumerate(ds.kinds) if k == "bg"]
        assert len(windows) == 40 and all(w.col_off < 100 and w.row_off < 100 for w in windows)
        assert len({(w.col_off, w.row_off) for w in windows}) > 10  # still random within the reach of the area
    unlimited = ChipDataset(prepare_train_images([sets[0].model_copy(update={"aoi": None})], data), None, 40, 256,
                            data, False, 0)
    far = [unlimited.window(i) for i, k in enumerate(unlimited.kinds) if k == "bg"]
    assert max(w.col_off for w in far) >= 100  # without the area they range over the raster


def test_bad_aoi_files_are_one_line_errors(synth_scenes: Path, tmp_path: Path) -> None:
    image = synth_scenes / "test.tif"
    with pytest.raises(DataError, match=r"gone\.gpkg: file not found \(data\.test\)"):
        check_inputs(_config(synth_scenes, image, tmp_path / "gone.gpkg"), ("train", "test"))
    info = open_raster(image)
    gpd.GeoDataFrame(geometry=[shapely.Point(info.bounds[0] + 5, info.bounds[1] + 5)], crs=info.crs).to_file(
        tmp_path / "points.gpkg")
    with pytest.raises(DataError, match=r"points\.gpkg: data\.test aoi must be polygons, got \['Point'\]"):
        check_inputs(_config(synth_scenes, image, tmp_path / "points.gpkg"), ("train", "test"))
    gpd.GeoDataFrame(geometry=[shapely.box(*info.bounds)]).to_file(tmp_path / "nocrs.gpkg")
    with pytest.raises(DataError, match=r"nocrs\.gpkg: data\.test aoi file has no CRS"):
        check_inputs(_config(synth_scenes, image, tmp_path / "nocrs.gpkg"), ("train", "test"))
    assert np.isfinite(info.area_km2())


def test_an_area_that_misses_the_raster_is_named_in_a_warning(synth_scenes: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    from hem_bootstrap.steps import _areas_of_interest

    image = synth_scenes / "test.tif"
    info = open_raster(image)
    far = shapely.box(info.bounds[0] - 5000, info.bounds[1] - 5000, info.bounds[0] - 4000, info.bounds[1] - 4000)
    gpd.GeoDataFrame(geometry=[far], crs=info.crs).to_file(tmp_path / "far.gpkg")
    rasters = check_inputs(_config(synth_scenes, image, None), ("test",)).of("test")
    with caplog.at_level("WARNING", logger="hem_bootstrap.steps"):
        areas = _areas_of_interest(rasters, tmp_path / "far.gpkg")
    assert not areas[image].intersects(shapely.box(0, 0, info.width, info.height))  # kept: nothing is scanned
    assert "test.tif: the area of interest" in caplog.text and "does not touch this raster" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="hem_bootstrap.steps"):
        _areas_of_interest(rasters, None)
    assert "does not touch" not in caplog.text
