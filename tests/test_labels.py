"""Vector labels: reprojection onto raster pixels, formats, errors, and per-window targets."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from conftest import boxes_to_map, default_transform
from rasterio.warp import transform_geom

from hem_bootstrap.config import DataConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.labels import LabelIndex, load_labels, load_zones
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.geo.windows import Window, map_to_pixel_boxes

CFG = DataConfig(classes=["vehicle", "truck"])


def test_labels_in_4326_land_on_the_right_pixels(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path], tmp_path: Path
) -> None:
    info = open_raster(make_raster(width=512, height=512))
    px = np.array([[100.0, 200.0, 110.0, 206.0], [300.0, 40.0, 320.0, 50.0]])
    mb = boxes_to_map(px, default_transform())
    geoms = [
        shapely.geometry.shape(transform_geom("EPSG:32633", "EPSG:4326", shapely.box(*b).__geo_interface__))
        for b in mb
    ]
    path = make_labels(geoms=geoms, crs="EPSG:4326", classes=["vehicle", "truck"])
    frame = load_labels(path, info, CFG)
    assert frame.crs == info.crs
    assert frame["label"].tolist() == [1, 2] and frame["class"].tolist() == ["vehicle", "truck"]
    assert frame["label"].dtype == np.int64
    got = map_to_pixel_boxes(frame.geometry.bounds.to_numpy(), info.transform)
    np.testing.assert_allclose(got, px, atol=1.0)


def test_points_become_boxes_of_point_box_m(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    info = open_raster(make_raster())  # 0.5 m pixels
    x, y = default_transform() @ (50.0, 60.0)
    path = make_labels(geoms=[shapely.Point(x, y)], field=None)
    frame = load_labels(path, info, DataConfig(point_box_m=4.0))  # one class, no class column
    assert frame["label"].tolist() == [1]
    got = map_to_pixel_boxes(frame.geometry.bounds.to_numpy(), info.transform)
    np.testing.assert_allclose(got, [[46.0, 56.0, 54.0, 64.0]], atol=1e-6)


def test_geojson_input(make_raster: Callable[..., Path], make_labels: Callable[..., Path]) -> None:
    info = open_raster(make_raster())
    gj = make_labels(name="l.geojson", boxes_px=np.array([[10, 10, 20, 20]]))
    frame = load_labels(gj, info, DataConfig())
    got = map_to_pixel_boxes(frame.geometry.bounds.to_numpy(), info.transform)
    np.testing.assert_allclose(got, [[10, 10, 20, 20]], atol=1e-6)


def test_a_geopackage_of_several_layers_reads_its_first_with_one_warning(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path], tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    info = open_raster(make_raster())
    gpkg = make_labels(name="l.gpkg", boxes_px=np.array([[10, 10, 20, 20], [30, 30, 40, 40]]))
    gpd.read_file(gpkg).iloc[:1].to_file(gpkg, layer="drafts")  # a second layer in the same file
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.geo.labels"):
        assert len(load_labels(gpkg, info, DataConfig())) == 2
        assert len(load_labels(gpkg, info, DataConfig())) == 2  # the same file again: no second warning
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "2 layers" in lines[0] and "drafts" in lines[0] and "\n" not in lines[0]


def test_a_folder_dataset_reads(make_raster: Callable[..., Path], make_labels: Callable[..., Path],
                                tmp_path: Path) -> None:
    """OGR datasets that are folders (a folder of shapefiles; a FileGDB alike) read as labels."""
    info = open_raster(make_raster())
    gpkg = make_labels(name="l.gpkg", boxes_px=np.array([[10, 10, 20, 20]]))
    folder = tmp_path / "shapes"
    folder.mkdir()
    gpd.read_file(gpkg).to_file(folder / "labels.shp")
    assert len(load_labels(folder, info, DataConfig())) == 1


def test_geoparquet_input(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path], tmp_path: Path
) -> None:
    pytest.importorskip("pyarrow")
    info = open_raster(make_raster())
    frame = gpd.read_file(make_labels(boxes_px=np.array([[10, 10, 20, 20]])))
    pq = tmp_path / "l.parquet"
    frame.to_parquet(pq)
    assert len(load_labels(pq, info, DataConfig())) == 1


def test_pixel_csv_for_plain_png(make_raster: Callable[..., Path], tmp_path: Path) -> None:
    png = make_raster(name="scene.png", driver="PNG", crs=None, width=128, height=96)
    info = open_raster(png)
    csv = tmp_path / "labels.csv"
    pd.DataFrame(
        {
            "image": ["imgs/scene.png", "other.png", "scene.png"],
            "xmin": [10, 1, 50],
            "ymin": [20, 1, 60],
            "xmax": [30, 5, 70],
            "ymax": [25, 5, 80],
            "label": ["vehicle", "vehicle", "truck"],
        }
    ).to_csv(csv, index=False)
    frame = load_labels(csv, info, CFG, image_name="scene.png")
    assert frame.crs is None and frame["label"].tolist() == [1, 2]
    np.testing.assert_allclose(frame.geometry.bounds.to_numpy(), [[10, 20, 30, 25], [50, 60, 70, 80]])


def test_errors_are_one_line_data_errors(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path], tmp_path: Path
) -> None:
    info = open_raster(make_raster())
    with pytest.raises(DataError, match="label file not found"):
        load_labels(tmp_path / "missing.gpkg", info, CFG)
    no_crs = make_labels(name="nocrs.gpkg", boxes_px=np.array([[1, 1, 5, 5]]), crs=None)
    with pytest.raises(DataError, match="has no CRS"):
        load_labels(no_crs, info, CFG)
    far = make_labels(name="far.gpkg", geoms=[shapely.box(0, 0, 10, 10)])
    with pytest.raises(
        DataError, match=r"do not overlap.*labels bounds \(0, 0, 10, 10\).*raster bounds \(500000,"
    ) as ei:
        load_labels(far, info, CFG)
    assert "\n" not in str(ei.value)
    unknown = make_labels(name="unk.gpkg", boxes_px=np.array([[1, 1, 5, 5]]), classes="boat")
    with pytest.raises(DataError, match=r"unknown class 'boat'.*\['vehicle', 'truck'\]"):
        load_labels(unknown, info, CFG)
    x0, y0 = default_transform() @ (1.0, 1.0)
    x1, y1 = default_transform() @ (9.0, 9.0)
    line = make_labels(name="line.gpkg", geoms=[shapely.LineString([(x0, y0), (x1, y1)])])
    with pytest.raises(DataError, match="unsupported geometry type"):
        load_labels(line, info, CFG)
    missing_field = make_labels(name="nofield.gpkg", boxes_px=np.array([[1, 1, 5, 5]]), field=None)
    with pytest.raises(DataError, match="no 'class' column"):
        load_labels(missing_field, info, CFG)


def test_empty_label_file_gives_empty_frame(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    info = open_raster(make_raster())
    path = make_labels(name="empty.gpkg", geoms=[], field=None)
    frame = load_labels(path, info, CFG)
    assert len(frame) == 0 and {"label", "class"} <= set(frame.columns)
    index = LabelIndex(frame, info, 0.5)
    t = index.targets(Window(0, 0, 64, 64, 64, 64))
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,) and t["ignore"].shape == (0, 4)


def test_label_index_clips_and_ignores_by_visible_fraction(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    info = open_raster(make_raster(width=256, height=256))
    px = np.array(
        [
            [10, 10, 20, 20],  # fully inside window 0
            [60, 10, 70, 20],  # 40 % inside window 0 (cut at x=64): ignored there
            [58, 30, 68, 40],  # 60 % inside window 0: kept, clipped
            [200, 200, 210, 210],  # far away
        ],
        dtype=float,
    )
    frame = load_labels(make_labels(boxes_px=px), info, CFG)
    index = LabelIndex(frame, info, min_visible_fraction=0.5)
    assert index.count() == 4
    np.testing.assert_allclose(index.pixel_boxes(), px, atol=1e-6)
    t = index.targets(Window(0, 0, 64, 64, 64, 64))
    np.testing.assert_allclose(t["boxes"], [[10, 10, 20, 20], [58, 30, 64, 40]])
    assert t["boxes"].dtype == np.float32 and t["labels"].dtype == np.int64 and t["labels"].tolist() == [1, 1]
    np.testing.assert_allclose(t["ignore"], [[60, 10, 64, 20]])
    # in the next window the same objects are seen from the other side, in tile coordinates
    t2 = index.targets(Window(56, 0, 64, 64, 64, 64))
    np.testing.assert_allclose(t2["boxes"], [[4, 10, 14, 20], [2, 30, 12, 40]])


def test_ignore_zones_are_reported(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    info = open_raster(make_raster())
    zones_path = make_labels(name="zones.gpkg", boxes_px=np.array([[100, 100, 150, 150]]), field=None)
    zones = load_zones(zones_path, info)
    frame = load_labels(make_labels(boxes_px=np.array([[10, 10, 20, 20]])), info, CFG)
    index = LabelIndex(frame, info, 0.5, ignore_zones=zones)
    t = index.targets(Window(128, 128, 64, 64, 64, 64))
    assert t["boxes"].shape == (0, 4)
    np.testing.assert_allclose(t["ignore"], [[0, 0, 22, 22]])


def test_shared_label_file_spanning_a_raster_without_objects_is_empty(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    info = open_raster(make_raster(width=100, height=100))
    # objects on neighbouring rasters west and east of this one: their extent spans it
    path = make_labels(boxes_px=np.array([[-300, 10, -290, 20], [400, 10, 410, 20]]))
    frame = load_labels(path, info, CFG)
    assert len(frame) == 0


def test_labels_overlapping_more_than_the_nms_iou_are_named_in_one_warning(
        make_raster: Callable[..., Path], make_labels: Callable[..., Path], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    from hem_bootstrap.config import config_from_tree
    from hem_bootstrap.inputs import check_inputs

    raster = make_raster()
    # two cars side by side (IoU 0), a pair of one class at IoU 0.6, and a tree over a car (other class)
    boxes = np.array([[10, 10, 40, 24], [10, 26, 40, 40], [100, 100, 130, 114], [107.5, 100, 137.5, 114],
                      [10, 100, 40, 114], [12, 100, 42, 114]], float)
    labels = make_labels(boxes_px=boxes, classes=["car"] * 5 + ["tree"])
    tree = {"data": {"classes": ["car", "tree"], "train": [{"images": [str(raster)], "labels": str(labels)}]}}
    for nms_iou, expect in ((0.3, "2 of 6 labelled objects"), (0.7, None)):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
            check_inputs(config_from_tree({**tree, "model": {"nms_iou": nms_iou}}, tmp_path))
        warned = [r.getMessage() for r in caplog.records if "model.nms_iou" in r.getMessage()]
        if expect is None:
            assert warned == []
        else:
            assert len(warned) == 1 and expect in warned[0] and f"IoU > model.nms_iou ({nms_iou:g})" in warned[0]
            assert warned[0].startswith(str(raster))
