"""A pool and a test set spanning two UTM zones: detection, mining, the bank and evaluation all work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import geopandas as gpd
import numpy as np
import pyogrio
import pytest
import rasterio
import shapely
from scenes import loop_config

from hem_bootstrap.config import load_config
from hem_bootstrap.detections import write_detections
from hem_bootstrap.geo.frames import concat_in_crs, concat_native
from hem_bootstrap.loop import run_experiment

ZONE2 = "EPSG:32634"


def _in_zone(scenes: Path, name: str, out: Path) -> tuple[Path, Path, Path]:
    """A copy of scene ``name`` georeferenced in another UTM zone, labels and distractors moved with it."""
    out.mkdir(parents=True, exist_ok=True)
    tif = out / f"{name}_z34.tif"
    shutil.copyfile(scenes / f"{name}.tif", tif)
    with rasterio.open(tif, "r+") as dst:
        dst.crs = rasterio.crs.CRS.from_string(ZONE2)  # same numbers, another zone: another place on Earth
    files = []
    for kind in ("labels", "distractors"):
        frame = gpd.read_file(scenes / f"{name}_{kind}.gpkg").set_crs(ZONE2, allow_override=True)
        path = out / f"{name}_{kind}_z34.gpkg"
        frame.to_file(path)
        files.append(path)
    return tif, files[0], files[1]


def test_two_zone_pool_and_test_set_run_whole_loop(synth_scenes: Path, tmp_path: Path) -> None:
    s = synth_scenes
    pool2, pool2_labels, pool2_d = _in_zone(s, "pool", tmp_path / "z34")
    test2, test2_labels, test2_d = _in_zone(s, "test", tmp_path / "z34")

    def iset(img: Path, labels: Path, dist: Path) -> dict[str, object]:
        return {"images": [str(img)], "labels": str(labels), "distractors": str(dist)}

    data = {
        "train": [iset(s / "train.tif", s / "train_labels.gpkg", s / "train_distractors.gpkg")],
        "pool": [iset(s / "pool.tif", s / "pool_labels.gpkg", s / "pool_distractors.gpkg"),
                 iset(pool2, pool2_labels, pool2_d)],
        "test": [iset(s / "test.tif", s / "test_labels.gpkg", s / "test_distractors.gpkg"),
                 iset(test2, test2_labels, test2_d)],
    }
    cfg_path = loop_config(tmp_path, "zones", data, k=15, steps=8)
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    layers = [name for name, _ in pyogrio.list_layers(run / "round_001" / "detections.gpkg")]
    assert len(layers) == 2  # one per CRS
    bank = gpd.read_file(run / "bank.gpkg", layer="negatives")
    assert set(bank["image"]) == {str(s / "pool.tif"), str(pool2)}  # mined in both zones (15 each)
    by_image = bank.groupby("image")["src_crs"].unique().to_dict()
    assert list(by_image[str(s / "pool.tif")]) == ["EPSG:32633"] and list(by_image[str(pool2)]) == [ZONE2]
    # pixel boxes are each image's own: the same scene in both zones gives the same boxes
    a = bank[bank["image"] == str(s / "pool.tif")][["px_xmin", "px_ymin"]].to_numpy()
    b = bank[bank["image"] == str(pool2)][["px_xmin", "px_ymin"]].to_numpy()
    assert len(a) == len(b) and np.allclose(np.sort(a, axis=0), np.sort(b, axis=0))
    one = json.loads((run / "round_001" / "metrics.json").read_text())
    assert one["area_km2"] == pytest.approx(2 * one["area_by_image"][str(s / "test.tif")]["evaluated_km2"])
    assert one["n_gt"] % 2 == 0 and one["tp"] % 2 == 0  # the twin scenes count alike: each zone's own CRS is used


def test_detections_of_two_crs_in_one_geojson(tmp_path: Path) -> None:
    def frame(crs: str, x: float) -> gpd.GeoDataFrame:
        return gpd.GeoDataFrame({"image": [f"{crs}.tif"], "label": [1], "score": [0.9], "win_col": [0], "win_row": [0],
                                 "win_w": [256], "win_h": [256], "px_xmin": [1.0], "px_ymin": [1.0], "px_xmax": [9.0],
                                 "px_ymax": [9.0]}, geometry=[shapely.box(x, 5_400_000, x + 4, 5_400_004)], crs=crs)

    frames = [frame("EPSG:32633", 500_000), frame(ZONE2, 500_000)]
    n, layers = write_detections(iter(frames), tmp_path / "d.gpkg")
    assert n == 2 and len(layers) == 2
    n, _ = write_detections(iter(frames), tmp_path / "d.geojson")
    back = gpd.read_file(tmp_path / "d.geojson")
    assert n == len(back) == 2 and back.crs.to_epsg() == 4326  # every row kept, in GeoJSON's own CRS
    assert sorted(back["src_crs"]) == ["EPSG:32633", ZONE2]
    assert back.geometry.centroid.x.iloc[0] == pytest.approx(15.0, abs=0.01)  # UTM 33N centre meridian
    assert back.geometry.centroid.x.iloc[1] == pytest.approx(21.0, abs=0.01)
    native = concat_native(frames)
    assert native.crs is None and native.geometry.bounds["minx"].tolist() == [500_000, 500_000]
    joined = concat_in_crs(frames, "EPSG:32633")
    assert joined.crs == "EPSG:32633" and joined["src_crs"].tolist() == ["EPSG:32633", ZONE2]
