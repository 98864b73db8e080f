"""Seam merging: cut boxes dropped where a neighbour saw the object whole; class-aware NMS; order-free."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import shapely

from hem_bootstrap.detections import empty_detections
from hem_bootstrap.errors import DataError
from hem_bootstrap.model.merge import BandMerger, RawDetections, cut_by_inner_edge, merge_detections


def test_cut_by_inner_edge_ignores_image_border() -> None:
    # tile at (0, 0) of a 512 x 512 image, 256 px: right and bottom edges are inner
    boxes = np.array([[0, 10, 20, 30], [240, 10, 256, 30], [100, 250, 120, 256], [100, 100, 120, 120]], float)
    assert cut_by_inner_edge(boxes, (0, 0, 256, 256), 512, 512).tolist() == [False, True, True, False]
    # the last tile: its right/bottom edges are the image's
    boxes2 = np.array([[490, 10, 512, 30]], float)
    assert cut_by_inner_edge(boxes2, (256, 0, 256, 256), 512, 512).tolist() == [False]


def test_object_across_seam_reported_once() -> None:
    # the same car seen whole by tile B and cut by tile A's right edge
    boxes = np.array([[230, 100, 256, 115], [230, 100, 262, 115]], np.float32)
    scores = np.array([0.9, 0.8], np.float32)
    labels = np.array([1, 1])
    cut = np.array([True, False])
    keep = merge_detections(boxes, scores, labels, cut, nms_iou=0.5)
    assert keep.tolist() == [1]  # the whole one survives although it scored lower


def test_class_aware_nms_and_order_independence() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 400, size=(60, 2))
    wh = rng.uniform(10, 30, size=(60, 2))
    boxes = np.concatenate([xy, xy + wh], axis=1).astype(np.float32)
    boxes = np.concatenate([boxes, boxes + 1.0])  # near-duplicates
    scores = rng.uniform(0.05, 1, size=len(boxes)).astype(np.float32)
    labels = rng.integers(1, 3, size=len(boxes))
    cut = np.zeros(len(boxes), bool)
    keep = merge_detections(boxes, scores, labels, cut, nms_iou=0.5)
    perm = rng.permutation(len(boxes))
    keep_p = merge_detections(boxes[perm], scores[perm], labels[perm], cut[perm], nms_iou=0.5)
    assert sorted(map(tuple, boxes[keep].tolist())) == sorted(map(tuple, boxes[perm][keep_p].tolist()))
    # a near-duplicate of another class is not suppressed
    two = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], np.float32)
    kept = merge_detections(two, np.array([0.9, 0.8], np.float32), np.array([1, 2]), np.zeros(2, bool), 0.5)
    assert len(kept) == 2


def test_empty() -> None:
    keep = merge_detections(np.zeros((0, 4), np.float32), np.zeros(0, np.float32), np.zeros(0, np.int64),
                            np.zeros(0, bool), 0.5)
    assert keep.shape == (0,)


def test_sparse_nms_equals_torchvision_batched_nms() -> None:
    import torch
    from torchvision.ops import batched_nms

    rng = np.random.default_rng(1)
    n = 2000
    xy = rng.uniform(0, 1500, size=(n, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(10, 40, size=(n, 2))], axis=1).astype(np.float32)
    scores = rng.uniform(0, 1, size=n).astype(np.float32)
    labels = rng.integers(1, 3, size=n)
    keep = merge_detections(boxes, scores, labels, np.zeros(n, bool), nms_iou=0.5)
    ref = batched_nms(torch.from_numpy(boxes).double(), torch.from_numpy(scores).double(),
                      torch.from_numpy(labels), 0.5).numpy()
    assert keep.tolist() == ref.tolist()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_band_merger_equals_whole_image_merge(seed: int) -> None:
    """Merging row band by row band keeps exactly what one merge of the whole image keeps."""
    rng = np.random.default_rng(seed)
    tile, stride, size = 256, 192, 1000
    starts = [0, 192, 384, 576, 744]  # the last row is shifted to end at the image edge
    bands: list[RawDetections] = []
    for row in starts:
        raw = RawDetections()
        for col in starts:
            n = 120
            xy = rng.uniform(0, tile - 8, size=(n, 2)) + [col, row]
            wh = rng.uniform(6, 40, size=(n, 2))
            boxes = np.concatenate([xy, np.minimum(xy + wh, [col + tile, row + tile])], axis=1).astype(np.float32)
            boxes = np.concatenate([boxes, boxes + rng.uniform(-2, 2, size=boxes.shape).astype(np.float32)])
            boxes[:, 1] = np.maximum(boxes[:, 1], row)  # a tile's boxes never reach above it
            cut = cut_by_inner_edge(boxes, (col, row, tile, tile), size, size)
            raw.add(boxes, rng.uniform(0.05, 1, len(boxes)).astype(np.float32),
                    rng.integers(1, 3, len(boxes)), np.array([col, row, tile, tile]), cut)
        bands.append(raw)
    assert stride == starts[1]
    whole = RawDetections()
    for raw in bands:
        for name in ("boxes", "scores", "labels", "windows", "cut"):
            getattr(whole, name).extend(getattr(raw, name))
    b, s, lab, w, c = whole.arrays()
    keep = merge_detections(b, s, lab, c, nms_iou=0.5)
    expected = sorted(map(tuple, np.concatenate([b[keep], s[keep, None]], axis=1).tolist()))

    merger = BandMerger(0, nms_iou=0.5, drop_cut=True)
    got, waited = [], []
    for k, raw in enumerate(bands):
        merger.add(raw)
        frontier = starts[k + 1] if k + 1 < len(starts) else None
        kb, ks, _, _ = merger.flush(frontier)
        got.extend(map(tuple, np.concatenate([kb, ks[:, None]], axis=1).tolist()))
        waited.append(sum(len(x) for x in merger.pending.boxes))
    assert sorted(got) == expected
    assert max(waited) < len(b) / 3  # only about a band's worth waits at any time


def _frame(image: str, n: int, crs: str) -> gpd.GeoDataFrame:
    x = np.arange(n, dtype=float)
    cols = {c: np.zeros(n, np.int64) for c in ("label", "win_col", "win_row", "win_w", "win_h")}
    cols["label"] += 1
    frame = gpd.GeoDataFrame(
        {"image": [image] * n, **cols, "score": np.full(n, 0.5),
         "px_xmin": x, "px_ymin": x, "px_xmax": x + 1, "px_ymax": x + 1},
        geometry=shapely.box(x, x, x + 1, x + 1), crs=crs,
    )
    return frame[list(empty_detections().columns)]  # the column order of detections_frame


def test_write_detections_one_layer_per_crs_with_its_spatial_index(tmp_path: Path) -> None:
    import sqlite3

    import pyogrio

    from hem_bootstrap.detections import write_detections

    frames = [_frame("a.tif", 3, "EPSG:32633"), _frame("a.tif", 4, "EPSG:32633"), _frame("b.tif", 2, "EPSG:32634"),
              _frame("b.tif", 0, "EPSG:32634"), _frame("c.tif", 6, "EPSG:32633"), _frame("d.tif", 0, "EPSG:32635")]
    n, layers = write_detections(iter(frames), tmp_path / "d.gpkg")
    assert n == 15 and layers == ["detections", "detections_epsg_32634", "detections_epsg_32635"]
    assert sorted(name for name, _ in pyogrio.list_layers(tmp_path / "d.gpkg")) == sorted(layers)
    a = gpd.read_file(tmp_path / "d.gpkg", layer="detections")
    b = gpd.read_file(tmp_path / "d.gpkg", layer="detections_epsg_32634")
    d = gpd.read_file(tmp_path / "d.gpkg", layer="detections_epsg_32635")  # a raster without detections keeps its layer
    assert a["image"].tolist() == ["a.tif"] * 7 + ["c.tif"] * 6 and a.crs == "EPSG:32633"
    assert b["image"].tolist() == ["b.tif"] * 2 and b.crs == "EPSG:32634"
    assert len(d) == 0 and d.crs == "EPSG:32635" and list(d.columns) == list(a.columns)
    assert a["px_xmax"].tolist() == [1, 2, 3, 1, 2, 3, 4, 1, 2, 3, 4, 5, 6] and a["label"].dtype == np.int64
    with sqlite3.connect(tmp_path / "d.gpkg") as db:  # QGIS draws large layers through the R-tree
        assert db.execute("SELECT count(*) FROM rtree_detections_geom").fetchone() == (13,)
        assert db.execute("SELECT count(*) FROM rtree_detections_epsg_32634_geom").fetchone() == (2,)


@pytest.mark.parametrize("error", [DataError("b.tif: not a raster"), KeyboardInterrupt("second Ctrl-C")])
def test_write_detections_raises_the_scans_own_error_and_leaves_no_file(tmp_path: Path, error: BaseException) -> None:
    """The scan runs inside GDAL's write session; what it raises comes out as itself, not as a stream error."""
    from hem_bootstrap.detections import write_detections

    def frames() -> Iterator[gpd.GeoDataFrame]:
        yield _frame("a.tif", 3, "EPSG:32633")
        raise error

    with pytest.raises(type(error), match=str(error)):
        write_detections(frames(), tmp_path / "d.gpkg")
    assert list(tmp_path.iterdir()) == []


def test_an_edge_with_only_nodata_beyond_is_no_seam(make_raster) -> None:  # noqa: ANN001
    """A nodata collar acts like the image border: boxes touching it are not 'cut' (no tile sees them whole)."""
    from hem_bootstrap.config import DataConfig
    from hem_bootstrap.geo.raster import RasterReader
    from hem_bootstrap.geo.windows import Window

    mask = np.zeros((512, 768), bool)
    mask[:, 256:] = True  # the western 256 px are a collar
    path = make_raster("collar.tif", width=768, height=512, mask=mask)
    with RasterReader(path, DataConfig()) as reader:
        assert reader.data_beyond(Window(256, 0, 256, 256, 256, 256)) == (False, False, True, True)
        assert reader.data_beyond(Window(512, 256, 256, 256, 256, 256)) == (True, True, False, False)
    with RasterReader(make_raster("full.tif", width=768, height=512), DataConfig()) as reader:  # all valid: no read
        assert reader.data_beyond(Window(256, 0, 256, 256, 256, 256)) == (True, False, True, True)
    boxes = np.array([[256.5, 40, 280, 60], [300, 40, 330, 60]], np.float32)
    assert cut_by_inner_edge(boxes, (256, 0, 256, 256), 768, 512).tolist() == [True, False]
    assert cut_by_inner_edge(boxes, (256, 0, 256, 256), 768, 512, (False, False, True, True)).tolist() == [False, False]
