"""Matching detections to ground truth: thresholds, the ignore band, ignore zones, centre mode."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely

from hem_bootstrap.config import MiningConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.mining.matching import match_detections

CRS = "EPSG:32633"
X0, Y0 = 500_000.0, 5_000_000.0


def dets_frame(
    boxes: list[tuple[float, float, float, float]], image: str = "a.tif", crs: str | None = CRS
) -> gpd.GeoDataFrame:
    """Detections with boxes given relative to a UTM-like origin."""
    n = len(boxes)
    return gpd.GeoDataFrame(
        {
            "image": [image] * n,
            "label": np.ones(n, dtype=np.int64),
            "score": np.linspace(0.9, 0.5, n) if n else np.zeros(0),
            "win_col": np.zeros(n, dtype=np.int64),
            "win_row": np.zeros(n, dtype=np.int64),
            "win_w": np.full(n, 256, dtype=np.int64),
            "win_h": np.full(n, 256, dtype=np.int64),
        },
        geometry=[shapely.box(X0 + b[0], Y0 + b[1], X0 + b[2], Y0 + b[3]) for b in boxes],
        crs=crs,
    )


def gt_frame(boxes: list[tuple[float, float, float, float]], crs: str | None = CRS) -> gpd.GeoDataFrame:
    return gpd.GeoDataFrame(
        {"label": [1] * len(boxes), "class": ["vehicle"] * len(boxes)},
        geometry=[shapely.box(X0 + b[0], Y0 + b[1], X0 + b[2], Y0 + b[3]) for b in boxes],
        crs=crs,
    )


CFG = MiningConfig(tp_iou=0.5, fp_max_iou=0.1)


def test_iou_exactly_at_tp_threshold_is_tp() -> None:
    # det 10x10 inside gt 10x20: IoU = 100 / 200 = 0.5 exactly
    out = match_detections(dets_frame([(0, 0, 10, 10)]), gt_frame([(0, 0, 10, 20)]), CFG)
    assert out["status"].tolist() == ["tp"]
    assert out["best_iou"].iloc[0] == pytest.approx(0.5)
    assert out["gt_index"].tolist() == [0]


def test_iou_exactly_at_fp_max_is_ignore_and_just_below_is_fp() -> None:
    # det 10x10 inside gt 10x100: IoU = 0.1 exactly -> ignore band (not < 0.1)
    at = match_detections(dets_frame([(0, 0, 10, 10)]), gt_frame([(0, 0, 10, 100)]), CFG)
    assert at["status"].tolist() == ["ignore"]
    assert at["best_iou"].iloc[0] == pytest.approx(0.1)
    # 10x10 inside 10x125: IoU = 100 / 1250 = 0.08 < 0.1 -> fp, still pointing at the object
    below = match_detections(dets_frame([(0, 0, 10, 10)]), gt_frame([(0, 0, 10, 125)]), CFG)
    assert below["status"].tolist() == ["fp"]
    assert below["gt_index"].tolist() == [0]


def test_ignore_band_between_thresholds() -> None:
    gt = gt_frame([(0, 0, 10, 10), (100, 100, 110, 110)])
    dets = dets_frame([(0, 0, 10, 10), (0, 0, 10, 30), (50, 50, 60, 60), (105, 100, 115, 110)])
    out = match_detections(dets, gt, CFG)
    # IoUs: 1.0 tp; 1/3 ignore; 0 fp; 50/150 = 1/3 ignore (against the second object)
    assert out["status"].tolist() == ["tp", "ignore", "fp", "ignore"]
    assert out["gt_index"].tolist() == [0, 0, -1, 1]
    assert out["best_iou"].tolist() == pytest.approx([1.0, 1 / 3, 0.0, 1 / 3])


def test_class_agnostic_fp_decision() -> None:
    dets = dets_frame([(0, 0, 10, 10)])
    dets["label"] = 2  # wrong class on a real object: not a hard negative
    out = match_detections(dets, gt_frame([(0, 0, 10, 10)]), CFG)
    assert out["status"].tolist() == ["tp"]


def test_no_gt_everything_fp_and_input_untouched() -> None:
    dets = dets_frame([(0, 0, 10, 10), (20, 20, 30, 30)])
    before = dets.copy()
    out = match_detections(dets, gt_frame([]), CFG)
    assert out["status"].tolist() == ["fp", "fp"]
    assert out["gt_index"].tolist() == [-1, -1]
    assert out["best_iou"].tolist() == [0.0, 0.0]
    assert "status" not in dets.columns
    assert dets.equals(before)


def test_no_detections_gives_empty_frame_with_columns() -> None:
    out = match_detections(dets_frame([]), gt_frame([(0, 0, 10, 10)]), CFG)
    assert len(out) == 0
    assert {"status", "best_iou", "gt_index"} <= set(out.columns)
    assert out.crs == CRS


def test_ignore_zone_by_area_and_by_centre() -> None:
    zone = gpd.GeoDataFrame(geometry=[shapely.box(X0 + 0, Y0 + 0, X0 + 50, Y0 + 50)], crs=CRS)
    dets = dets_frame(
        [
            (10, 10, 20, 20),  # fully inside -> ignore
            (44, 10, 54, 20),  # 60 % inside, centre (49, 15) inside -> ignore
            (47, 10, 57, 20),  # 30 % inside, centre (52, 15) outside -> fp
            (200, 200, 210, 210),  # far away -> fp
        ]
    )
    out = match_detections(dets, gt_frame([]), CFG, ignore=zone)
    assert out["status"].tolist() == ["ignore", "ignore", "fp", "fp"]


def test_ignore_by_area_with_centre_outside_union_of_pieces() -> None:
    # two zones each covering 30 % of the box (together 60 %) with the centre on neither
    zones = gpd.GeoDataFrame(
        geometry=[
            shapely.box(X0 + 0, Y0 + 0, X0 + 3, Y0 + 10),
            shapely.box(X0 + 7, Y0 + 0, X0 + 10, Y0 + 10),
        ],
        crs=CRS,
    )
    out = match_detections(dets_frame([(0, 0, 10, 10)]), gt_frame([]), CFG, ignore=zones)
    assert out["status"].tolist() == ["ignore"]


def test_clipped_edge_object_as_ignore_box_and_tp_kept() -> None:
    clipped = gpd.GeoDataFrame(geometry=[shapely.box(X0 + 0, Y0 + 0, X0 + 4, Y0 + 10)], crs=CRS)
    dets = dets_frame([(0, 0, 5, 10), (100, 100, 110, 110)])
    gt = gt_frame([(100, 100, 110, 110)])
    out = match_detections(dets, gt, CFG, ignore=clipped)
    assert out["status"].tolist() == ["ignore", "tp"]


def test_ignore_in_other_crs_is_reprojected() -> None:
    zone = gpd.GeoDataFrame(geometry=[shapely.box(X0 + 0, Y0 + 0, X0 + 50, Y0 + 50)], crs=CRS).to_crs(
        "EPSG:4326"
    )
    out = match_detections(dets_frame([(10, 10, 20, 20), (80, 80, 90, 90)]), gt_frame([]), CFG, ignore=zone)
    assert out["status"].tolist() == ["ignore", "fp"]


def test_center_mode_bands() -> None:
    cfg = MiningConfig(matching="center", center_dist_m=2.0)
    gt = gt_frame([(0, 0, 4, 4)])  # centre (2, 2)
    dets = dets_frame(
        [
            (2, 0, 6, 4),  # centre distance 2 -> tp (<=)
            (4, 0, 8, 4),  # 4 = 2d -> ignore (not > 2d)
            (4.5, 0, 8.5, 4),  # 4.5 -> fp
            (1, 1, 3, 3),  # 0 -> tp
        ]
    )
    out = match_detections(dets, gt, cfg)
    assert out["status"].tolist() == ["tp", "ignore", "fp", "tp"]
    assert out["gt_index"].tolist() == [0, 0, -1, 0]
    assert out["best_iou"].iloc[0] == pytest.approx(8 / 24)


def test_center_mode_no_gt() -> None:
    cfg = MiningConfig(matching="center", center_dist_m=2.0)
    out = match_detections(dets_frame([(0, 0, 4, 4)]), gt_frame([]), cfg)
    assert out["status"].tolist() == ["fp"]


def test_pixel_space_frames_without_crs() -> None:
    dets = dets_frame([(0, 0, 10, 10), (50, 50, 60, 60)], crs=None)
    out = match_detections(dets, gt_frame([(0, 0, 10, 10)], crs=None), CFG)
    assert out["status"].tolist() == ["tp", "fp"]


def test_several_images_rejected() -> None:
    dets = dets_frame([(0, 0, 10, 10), (50, 50, 60, 60)])
    dets.loc[1, "image"] = "b.tif"
    with pytest.raises(DataError, match="one image"):
        match_detections(dets, gt_frame([]), CFG)


def test_best_match_equals_full_matrix_and_torchvision() -> None:
    import torch
    from torchvision.ops import box_iou as tv_box_iou
    from torchvision.ops import nms as tv_nms

    from hem_bootstrap.geo.boxes import batched_nms, best_match, box_iou, nms

    rng = np.random.default_rng(0)
    xy = rng.random((50, 2)) * 100
    a = np.concatenate([xy, xy + 5 + rng.random((50, 2)) * 10], axis=1)
    b = a[::3] + 1.5
    full = tv_box_iou(torch.from_numpy(a), torch.from_numpy(b))
    np.testing.assert_allclose(box_iou(a, b), full.numpy(), rtol=1e-12, atol=1e-12)  # the reference
    best, idx = best_match(a, b)
    np.testing.assert_allclose(best, full.max(dim=1).values.numpy(), rtol=1e-12)
    assert np.array_equal(idx, full.max(dim=1).indices.numpy())
    grid = rng.integers(0, 60, (3000, 2)).astype(float)  # integer corners: touching boxes, equal IoUs, no overlap
    c, d = np.c_[grid, grid + rng.integers(1, 6, (3000, 2))], np.c_[grid[:400], grid[:400] + 3]
    dense = box_iou(c, d)
    best, idx = best_match(c, d)  # through an STRtree: the same maxima and first-index ties as the dense matrix
    assert np.array_equal(best, dense.max(axis=1)) and np.array_equal(idx, dense.argmax(axis=1))
    empty_best, empty_idx = best_match(a[:0], b)
    assert empty_best.shape == (0,) and empty_idx.shape == (0,)
    none_best, none_idx = best_match(a, b[:0])
    assert (none_best == 0).all() and (none_idx == -1).all()
    scores = rng.random(50)
    for thr in (0.1, 0.3, 0.5):
        assert nms(a, scores, thr).tolist() == tv_nms(torch.from_numpy(a), torch.from_numpy(scores), thr).tolist()
    groups = rng.integers(0, 3, 50)
    keep = batched_nms(a, scores, groups, 0.3)
    per_group = sorted(int(i) for g in range(3) for i in np.flatnonzero(groups == g)[nms(a[groups == g], scores[groups == g], 0.3)])
    assert sorted(keep.tolist()) == per_group and (np.diff(scores[keep]) <= 0).all()
