"""FP per km² divides by the ground actually evaluated: valid data minus ignore zones."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine

from hem_bootstrap.config import config_from_tree
from hem_bootstrap.geo.area import evaluated_area
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.rundir import RunDir
from hem_bootstrap.steps import Context, evaluate_model

COLLAR = 256  # one tile: with overlap 0 the content tiles of both rasters hold the same pixels


def _collared(src_path: Path, out: Path, collar: int) -> Path:
    """The scene padded with a nodata collar (an internal mask), same ground coordinates."""
    with rasterio.open(src_path) as src:
        data, prof = src.read(), src.profile
    c, h, w = data.shape
    big = np.zeros((c, h + 2 * collar, w + 2 * collar), data.dtype)
    big[:, collar : collar + h, collar : collar + w] = data
    mask = np.zeros(big.shape[1:], np.uint8)
    mask[collar : collar + h, collar : collar + w] = 255
    t = prof["transform"]
    prof.update(width=w + 2 * collar, height=h + 2 * collar, transform=t @ Affine.translation(-collar, -collar),
                tiled=True, blockxsize=256, blockysize=256)
    with rasterio.open(out, "w", **prof) as dst:
        dst.write(big)
        dst.write_mask(mask)
    return out


def eval_config(scenes: Path, image: Path, **overlays: Path | None) -> Any:
    """A config evaluating ``image`` (with the test scene's labels and the given overlays, e.g. ``aoi``) on the CPU."""
    test: dict[str, Any] = {"images": [str(image)], "labels": str(scenes / "test_labels.gpkg")}
    test.update({k: str(v) for k, v in overlays.items() if v is not None})
    return config_from_tree({
        "data": {"train": [{"images": [str(scenes / "train.tif")], "labels": str(scenes / "train_labels.gpkg")}],
                 "test": [test]},
        "tiling": {"tile_size": 256, "overlap": 0},
        "model": {"fast_path": "none"},
        "runtime": {"workers": 0, "batch_size": 1, "device": "cpu"},
    }, scenes)


def _metrics(scenes: Path, image: Path, model: Path, tmp: Path, ignore: Path | None = None) -> dict[str, Any]:
    cfg = eval_config(scenes, image, ignore_zones=ignore)
    ctx = Context(cfg=cfg, run=RunDir(tmp / "run"), device=torch.device("cpu"), progress=False)
    return evaluate_model(ctx, model, tmp / f"{image.stem}_dets.gpkg")


def test_nodata_collar_is_not_searched_ground(synth_scenes: Path, trained_small_model: Path, tmp_path: Path) -> None:
    plain = synth_scenes / "test.tif"
    collared = _collared(plain, tmp_path / "collared.tif", COLLAR)
    a = _metrics(synth_scenes, plain, trained_small_model, tmp_path)
    b = _metrics(synth_scenes, collared, trained_small_model, tmp_path)
    assert a["fp"] == b["fp"] > 0 and a["tp"] == b["tp"]  # the collar adds no detections
    whole_b = open_raster(collared).area_km2()
    assert whole_b == pytest.approx(a["area_km2"] * (768 + 2 * COLLAR) ** 2 / 768**2)
    # the collared raster's evaluated area is its valid part, the plain scene's whole rectangle
    assert b["area_km2"] == pytest.approx(a["area_km2"], rel=1e-9)
    assert b["fp_per_km2"] == pytest.approx(a["fp_per_km2"], rel=1e-9)
    area = b["area_by_image"][str(collared)]
    assert area["raster_km2"] == pytest.approx(whole_b) and area["valid_km2"] == pytest.approx(a["area_km2"])


def test_ignore_zones_are_taken_off_the_area(synth_scenes: Path, trained_small_model: Path, tmp_path: Path) -> None:
    plain = synth_scenes / "test.tif"
    info = open_raster(plain)
    minx, miny, maxx, maxy = info.bounds
    # the western quarter of the scene, and a zone wholly off the raster that must not count
    zones = gpd.GeoDataFrame(geometry=[shapely.box(minx, miny, minx + (maxx - minx) / 4, maxy),
                                       shapely.box(maxx + 10, miny, maxx + 50, maxy)], crs=info.crs)
    zones.to_file(tmp_path / "ignore.gpkg")
    with_zone = _metrics(synth_scenes, plain, trained_small_model, tmp_path, ignore=tmp_path / "ignore.gpkg")
    assert with_zone["area_km2"] == pytest.approx(info.area_km2() * 0.75, rel=1e-3)
    area = with_zone["area_by_image"][str(plain)]
    assert area["ignored_km2"] == pytest.approx(info.area_km2() * 0.25, rel=1e-3)


def test_evaluated_area_of_nodata_values_and_decimated_grid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nodata *values* (not only masks) count as unsearched; large rasters are counted on a coarser grid."""
    data = np.full((3, 400, 600), 100, np.uint8)
    data[:, :, :150] = 0  # a quarter of the raster is nodata
    path = tmp_path / "nd.tif"
    with rasterio.open(path, "w", driver="GTiff", width=600, height=400, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 5400000, 0.5, 0.5)) as dst:
        dst.write(data)
    info = open_raster(path)
    exact = evaluated_area(info, [1, 2, 3])
    assert exact.valid_km2 == pytest.approx(info.area_km2() * 0.75)
    monkeypatch.setattr("hem_bootstrap.geo.area.AREA_MAX_SIDE", 60)  # a 10x decimation
    coarse = evaluated_area(info, [1, 2, 3])
    assert coarse.valid_km2 == pytest.approx(exact.valid_km2, rel=0.02)
