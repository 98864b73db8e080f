"""Evaluation metrics on hand-built cases with known answers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine

from hem_bootstrap.config import EvaluateConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.evaluate import EvalImage, evaluate, write_metrics
from hem_bootstrap.scoring.match import greedy_match, overlap_groups
from hem_bootstrap.scoring.sweep import (
    build_sweep,
    coco_interpolated_ap,
    log_average_fp_per_km2,
    threshold_at_recall,
)

X0, Y0 = 500_000.0, 5_000_000.0
GSD = 0.1
CRS = "EPSG:32633"
TRANSFORM = Affine(GSD, 0, X0, 0, -GSD, Y0 + 100.0)
AREA_KM2 = 1000 * 1000 * GSD * GSD / 1e6  # a 1000 x 1000 px raster at 0.1 m = 0.01 km²


def boxes(rows: list[tuple[float, float, float, float]]) -> list[shapely.Polygon]:
    """Boxes given relative to the scene origin, in metres."""
    return [shapely.box(X0 + a, Y0 + b, X0 + c, Y0 + d) for a, b, c, d in rows]


def gt_frame(
    rows: list[tuple[float, float, float, float]],
    labels: list[int] | None = None,
    names: list[str] | None = None,
) -> gpd.GeoDataFrame:
    labels = labels or [1] * len(rows)
    names = names or ["vehicle"] * len(rows)
    return gpd.GeoDataFrame({"label": labels, "class": names}, geometry=boxes(rows), crs=CRS)


def det_frame(
    rows: list[tuple[float, float, float, float]],
    scores: list[float],
    labels: list[int] | None = None,
    image: str = "a.tif",
) -> gpd.GeoDataFrame:
    n = len(rows)
    return gpd.GeoDataFrame(
        {
            "image": [image] * n,
            "label": labels or [1] * n,
            "score": scores,
            "win_col": [0] * n,
            "win_row": [0] * n,
            "win_w": [256] * n,
            "win_h": [256] * n,
        },
        geometry=boxes(rows),
        crs=CRS,
    )


def grid(n: int, size: float = 4.0, step: float = 10.0) -> list[tuple[float, float, float, float]]:
    """``n`` separated boxes on a grid inside the 100 m scene."""
    return [
        ((i % 9) * step + 1, (i // 9) * step + 1, (i % 9) * step + 1 + size, (i // 9) * step + 1 + size)
        for i in range(n)
    ]


def image(gt: gpd.GeoDataFrame, name: str = "a.tif", **kw: object) -> EvalImage:
    return EvalImage(image=name, gt=gt, area_km2=AREA_KM2, transform=TRANSFORM, **kw)  # type: ignore[arg-type]


def test_perfect_detector() -> None:
    rows = grid(6)
    m = evaluate(det_frame(rows, [0.9] * 6), [image(gt_frame(rows))], EvaluateConfig())
    assert m["ap50"] == pytest.approx(1.0) and m["ap"] == pytest.approx(1.0)
    assert (m["tp"], m["fp"], m["fn"]) == (6, 0, 0)
    assert m["fp_per_km2"] == 0.0
    assert m["precision"] == m["recall"] == m["f1"] == 1.0
    assert m["area_km2"] == pytest.approx(0.01)
    assert (m["n_gt"], m["n_det"]) == (6, 6)


def test_known_fp_count_over_known_area() -> None:
    rows = grid(5)
    fps = [(95, 95, 98, 98), (95, 85, 98, 88), (85, 95, 88, 98)]
    dets = det_frame(rows + fps, [0.9] * 5 + [0.8, 0.7, 0.6])
    m = evaluate(dets, [image(gt_frame(rows))], EvaluateConfig(score_threshold=0.5))
    assert (m["tp"], m["fp"], m["fn"]) == (5, 3, 0)
    assert m["fp_per_km2"] == pytest.approx(300.0)
    assert m["precision"] == pytest.approx(5 / 8)
    assert m["ap50"] == pytest.approx(1.0)  # every FP scores below every TP


@pytest.mark.parametrize(("dx", "is_tp"), [(3.30, True), (3.36, False)])
def test_shifted_box_either_side_of_iou_threshold(dx: float, is_tp: bool) -> None:
    # a 10 m box shifted by dx has IoU (10 - dx) / (10 + dx): 0.5 at dx = 10/3
    gt = gt_frame([(10, 10, 20, 20)])
    dets = det_frame([(10 + dx, 10, 20 + dx, 20)], [0.9])
    m = evaluate(dets, [image(gt)], EvaluateConfig(iou=0.5))
    assert (m["tp"], m["fp"]) == ((1, 0) if is_tp else (0, 1))
    assert m["ap50"] == pytest.approx(1.0 if is_tp else 0.0)


def test_sweep_fp_at_recall_and_recall_at_fp() -> None:
    rows = grid(5)  # 5 objects; the detector finds 4 of them, interleaved with 3 FPs
    fps = [(95, 95, 98, 98), (95, 85, 98, 88), (85, 95, 88, 98)]
    det_rows = [rows[0], fps[0], rows[1], fps[1], rows[2], fps[2], rows[3]]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]
    cfg = EvaluateConfig(
        score_threshold=0.55, fixed_recalls=[0.4, 0.8, 0.9], fixed_fp_per_km2=[0.0, 100.0, 250.0, 1000.0]
    )
    m = evaluate(det_frame(det_rows, scores), [image(gt_frame(rows))], cfg)
    # kept at 0.55: 0.9 TP, 0.8 FP, 0.7 TP, 0.6 FP
    assert (m["tp"], m["fp"], m["fn"]) == (2, 2, 3)
    assert m["precision"] == pytest.approx(0.5) and m["recall"] == pytest.approx(0.4)
    assert m["fp_per_km2"] == pytest.approx(200.0)
    assert m["fp_per_km2_at_recall"]["0.4"] == pytest.approx(100.0)
    assert m["fp_per_km2_at_recall"]["0.8"] == pytest.approx(300.0)
    assert m["fp_per_km2_at_recall"]["0.9"] is None  # never reached
    assert m["recall_at_fp_per_km2"] == pytest.approx({"0.0": 0.2, "100.0": 0.4, "250.0": 0.6, "1000.0": 0.8})
    # COCO's 101-point AP: precision envelope 1 up to R .2, 2/3 to .4, 3/5 to .6, 4/7 to .8
    expected = (21 * 1 + 20 * (2 / 3) + 20 * (3 / 5) + 20 * (4 / 7)) / 101
    assert m["ap50"] == pytest.approx(expected)
    assert m["pr_curve"]["recall"][-1] == pytest.approx(0.8)
    assert len(m["pr_curve"]["scores"]) == 7


def test_fp_split_into_near_objects_and_away() -> None:
    # 4 objects; a duplicate and a shifted box touch objects, two FPs sit on bare ground
    rows = grid(4)
    x0, y0, x1, y1 = rows[0]
    dup = (x0 + 0.5, y0, x1 + 0.5, y1)  # IoU ~0.9 with object 0, which the 0.9 box already took
    loc = (rows[1][0] + 2.4, rows[1][1], rows[1][2] + 2.4, rows[1][3])  # IoU 0.25 with object 1
    bare = [(95, 95, 98, 98), (95, 85, 98, 88)]
    det_rows = [rows[0], dup, bare[0], rows[1], loc, rows[2], bare[1], rows[3]]
    scores = [0.9, 0.85, 0.8, 0.7, 0.65, 0.6, 0.55, 0.3]
    cfg = EvaluateConfig(score_threshold=0.5, fixed_recalls=[0.75, 1.0])
    m = evaluate(det_frame(det_rows, scores), [image(gt_frame(rows))], cfg)
    assert (m["tp"], m["fp"]) == (3, 4)
    assert m["fp_near_objects"] == 2
    assert m["fp_per_km2"] == pytest.approx(400.0)
    assert m["fp_away_per_km2"] == pytest.approx(200.0)
    # recall 0.75 is reached at 0.6: 3 FPs in all, 1 of them away from objects
    assert m["fp_per_km2_at_recall"]["0.75"] == pytest.approx(300.0)
    assert m["fp_away_per_km2_at_recall"]["0.75"] == pytest.approx(100.0)
    assert m["fp_away_per_km2_at_recall"]["1.0"] == pytest.approx(200.0)
    # the near-object floor drops both bare boxes: recall 0.5 at 0.7 (the duplicate: 1 FP), 0.55-0.75
    # at 0.6 (+ the shifted box: 2 FPs), 0.8-0.9 at 0.3 (still 2)
    floor = math.exp((math.log(100.0) + 8 * math.log(200.0)) / 9)
    assert m["log_avg_fp_near_per_km2"] == pytest.approx(floor)
    assert m["per_image"]["a.tif"]["log_avg_fp_near_per_km2"] == pytest.approx(floor)
    # away from objects: the bare box at 0.8 (1 FP) for recall 0.5-0.75, both bare boxes (2) for 0.8-0.9
    away = math.exp((6 * math.log(100.0) + 3 * math.log(200.0)) / 9)
    assert m["log_avg_fp_away_per_km2"] == pytest.approx(away)
    assert m["per_image"]["a.tif"]["log_avg_fp_away_per_km2"] == pytest.approx(away)
    assert m["log_avg_fp_per_km2"] == pytest.approx(math.exp((math.log(200.0) + 5 * math.log(300.0)
                                                               + 3 * math.log(400.0)) / 9))


def test_tied_scores_enter_the_sweep_together() -> None:
    rows = grid(2)
    dets = det_frame([rows[0], (95, 95, 98, 98), rows[1]], [0.9, 0.5, 0.5])
    cfg = EvaluateConfig(fixed_recalls=[1.0], fixed_fp_per_km2=[50.0])
    m = evaluate(dets, [image(gt_frame(rows))], cfg)
    assert m["fp_per_km2_at_recall"]["1.0"] == pytest.approx(100.0)
    assert m["recall_at_fp_per_km2"]["50.0"] == pytest.approx(0.5)  # the tie brings its FP along


def test_greedy_sweep_agrees_with_cocoeval_on_random_scenes() -> None:
    rng = np.random.default_rng(3)
    images, frames, flags, scores = [], [], [], []
    n_gt = 0
    for i in range(4):
        xy = rng.uniform(0, 90, size=(30, 2))
        gt_rows = [(x, y, x + 5, y + 5) for x, y in xy]
        fake = rng.uniform(0, 90, size=(15, 2))
        src = np.r_[np.c_[xy, xy + 5], np.c_[fake, fake + 5]]  # 30 near-hits and 15 clutter boxes
        det = src + rng.normal(0, 0.7, size=src.shape)
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        det_rows = [tuple(r) for r in det]
        s = rng.uniform(0.05, 1.0, size=len(det_rows))
        name = f"img{i}.tif"
        gt = gt_frame(gt_rows)
        images.append(image(gt, name=name))
        frames.append(det_frame(det_rows, s.tolist(), image=name))
        b = np.array([[X0 + r[0], Y0 + r[1], X0 + r[2], Y0 + r[3]] for r in det_rows])
        g = np.array([[X0 + r[0], Y0 + r[1], X0 + r[2], Y0 + r[3]] for r in gt_rows])
        flags.append(greedy_match(b, s, np.ones(len(b), int), g, np.ones(len(g), int), 0.5))
        scores.append(s)
        n_gt += len(gt_rows)
    dets = gpd.GeoDataFrame(gpd.pd.concat(frames, ignore_index=True), crs=CRS)
    m = evaluate(dets, images, EvaluateConfig(iou=0.5))
    sweep = build_sweep(np.concatenate(scores), np.concatenate(flags), n_gt)
    assert 0.2 < m["ap50"] < 0.95  # a case with both hits and misses
    assert m["ap50"] == pytest.approx(coco_interpolated_ap(sweep), abs=1e-9)
    assert m["tp"] == int(np.concatenate(flags)[np.concatenate(scores) >= 0.5].sum())


def test_coco_precision_equals_pycocotools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ COCOeval (faster-coco-eval) gives pycocotools' precision table, two classes, clustered boxes."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    import hem_bootstrap.scoring.match as match

    rng = np.random.default_rng(5)
    prepared = {}
    for i in range(3):
        gt = np.c_[(xy := rng.uniform(0, 60, (40, 2))), xy + rng.uniform(2, 6, (40, 2))]
        det = np.r_[gt + rng.normal(0, 0.8, gt.shape), np.c_[(f := rng.uniform(0, 60, (60, 2))), f + 4]]
        det[:, 2:] = np.maximum(det[:, 2:], det[:, :2] + 0.5)
        prepared[f"img{i}"] = match.PreparedImage(det, rng.uniform(0.05, 1, len(det)), rng.integers(1, 3, len(det)),
                                                  gt, rng.integers(1, 3, len(gt)))
    thrs = np.unique(np.r_[match.COCO_IOUS, 0.5])
    fast = match._coco_precision(prepared, [1, 2], thrs)

    def reference_coco(dataset: dict) -> COCO:
        gt = COCO()
        gt.dataset = dataset
        gt.createIndex()
        return gt

    monkeypatch.setattr(match, "COCO", reference_coco)
    monkeypatch.setattr(match, "COCOeval_faster", COCOeval)
    reference = match._coco_precision(prepared, [1, 2], thrs)
    assert fast.shape == reference.shape == (10, 101, 2, 1, 1) and (reference > 0).any()
    np.testing.assert_allclose(fast, reference, rtol=0, atol=1e-12)


def test_more_than_100_detections_per_image_are_all_counted() -> None:
    # 156 touching boxes: one group of overlapping boxes, so COCOeval sees them as one image
    rows = [(x * 4, y * 4, x * 4 + 4, y * 4 + 4) for x in range(13) for y in range(12)]
    m = evaluate(det_frame(rows, [0.9] * len(rows)), [image(gt_frame(rows))], EvaluateConfig())
    assert m["ap50"] == pytest.approx(1.0) and m["n_det"] == 156


def test_overlap_groups() -> None:
    chain = [(0, 0, 2, 2), (1, 1, 3, 3), (2, 2, 4, 4), (10, 10, 11, 11), (3.5, 3.5, 5, 5), (20, 0, 21, 1)]
    groups = overlap_groups(np.array(chain, dtype=np.float64))
    assert groups[0] == groups[1] == groups[2] == groups[4]
    assert len({groups[0], groups[3], groups[5]}) == 3
    assert overlap_groups(np.zeros((0, 4))).shape == (0,)


def test_distractor_share_and_classes() -> None:
    gt_rows = [(10, 10, 14, 14)]
    distractors = gpd.GeoDataFrame(
        {"class": ["shadow", "bush", "bush"]},
        geometry=boxes([(40, 40, 44, 44), (60, 60, 70, 70), (80, 10, 84, 14)]),
        crs=CRS,
    )
    det_rows = [
        gt_rows[0],  # TP
        (40.5, 40, 44.5, 44),  # FP, IoU ~0.78 with the shadow
        (64, 64, 66, 66),  # FP, centre inside the big bush, IoU 0.04
        (20, 80, 24, 84),  # FP on nothing
        (30, 30, 34, 34),  # FP on nothing
        (80, 10, 84, 14),  # on a bush but below the operating threshold
    ]
    dets = det_frame(det_rows, [0.9, 0.8, 0.8, 0.7, 0.6, 0.2])
    m = evaluate(
        dets, [image(gt_frame(gt_rows), distractors=distractors)], EvaluateConfig(score_threshold=0.5)
    )
    assert m["fp"] == 4
    assert m["fp_on_distractors"] == 2
    assert m["fp_on_distractors_share"] == pytest.approx(0.5)
    assert m["fp_by_distractor_class"] == {"bush": 1, "shadow": 1}


def test_no_distractor_keys_without_distractors() -> None:
    rows = grid(2)
    m = evaluate(det_frame(rows, [0.9, 0.9]), [image(gt_frame(rows))], EvaluateConfig())
    assert "fp_on_distractors_share" not in m


def test_center_matching() -> None:
    gt = gt_frame([(10, 10, 14, 14), (50, 50, 54, 54)])  # centres (12, 12) and (52, 52)
    det_rows = [
        (11, 9.5, 16, 14.5),  # centre 1.5 m away, IoU 0.41: TP by centre only
        (52.5, 52.5, 54.5, 54.5),  # centre (53.5, 53.5): 2.12 m away: FP at 2.0 m
        (12, 12, 14, 14),  # a second hit on the first object: FP (one-to-one)
    ]
    dets = det_frame(det_rows, [0.9, 0.8, 0.7])
    m = evaluate(dets, [image(gt)], EvaluateConfig(), matching="center", center_dist=2.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 1)
    assert m["ap_method"] == "allpoint-center" and m["ap"] is None
    assert m["ap50"] == pytest.approx(0.5)  # recall 0.5 at precision 1, then nothing
    iou = evaluate(dets, [image(gt)], EvaluateConfig())
    assert iou["tp"] == 0  # by IoU nothing is close enough
    # FP kinds by centre distance, at recall 1.0 (a last exact hit on the second object): the second
    # hit on the first object is a duplicate (1.4 m), the one 2.12 m from the second a localisation error
    full = pd.concat([dets, det_frame([(50, 50, 54, 54)], [0.1])])
    kinds = evaluate(full, [image(gt)], EvaluateConfig(fixed_recalls=[1.0]), matching="center",
                     center_dist=2.0)["fp_kinds_at_recall"]["1.0"]
    assert (kinds["duplicate"], kinds["localisation"], kinds["background"]) == (1, 1, 0)


def test_ignore_zone_drops_unmatched_detections_only() -> None:
    gt = gt_frame([(10, 10, 14, 14)])
    zone = gpd.GeoDataFrame(geometry=boxes([(0, 0, 50, 50)]), crs=CRS)
    det_rows = [(10, 10, 14, 14), (30, 30, 34, 34), (48, 48, 56, 56), (70, 70, 74, 74)]
    dets = det_frame(det_rows, [0.9, 0.9, 0.9, 0.9])
    m = evaluate(dets, [image(gt, ignore=zone)], EvaluateConfig())
    # TP inside the zone stays; the FP inside it is dropped; one only a quarter inside stays an FP
    assert (m["tp"], m["fp"], m["n_ignored"]) == (1, 2, 1)


def test_detection_on_unknown_image_is_a_data_error() -> None:
    dets = det_frame(grid(1), [0.9], image="elsewhere/b.tif")
    with pytest.raises(DataError, match="elsewhere/b.tif"):
        evaluate(dets, [image(gt_frame(grid(1)))], EvaluateConfig())


def test_no_detections() -> None:
    empty = det_frame([], [])
    m = evaluate(empty, [image(gt_frame(grid(3)))], EvaluateConfig())
    assert m["ap50"] == 0.0 and m["recall"] == 0.0 and m["fp"] == 0 and m["fn"] == 3
    assert m["precision"] is None
    assert m["fp_per_km2_at_recall"]["0.8"] is None
    assert m["pr_curve"] == {"precision": [], "recall": [], "scores": []}


def test_per_class_ap_with_two_classes() -> None:
    rows = grid(4)
    gt = gt_frame(rows, labels=[1, 1, 2, 2], names=["car", "car", "truck", "truck"])
    # both cars found; trucks detected with the wrong class: class-aware matching makes them FPs
    dets = det_frame(rows, [0.9] * 4, labels=[1, 1, 1, 1])
    m = evaluate(dets, [image(gt)], EvaluateConfig())
    assert m["per_class"]["car"]["ap50"] == pytest.approx(1.0)
    assert m["per_class"]["truck"]["ap50"] == pytest.approx(0.0)
    assert m["per_class"]["truck"]["n_gt"] == 2
    assert (m["tp"], m["fp"]) == (2, 2)
    # the two trucks taken for cars are the cars' false positives: 2 over 0.01 km²
    assert m["per_class"]["car"]["fp_per_km2"] == pytest.approx(200.0)
    assert m["per_class"]["truck"]["fp_per_km2"] == pytest.approx(0.0)
    assert m["per_class"]["car"]["fp_per_km2_at_recall"]["0.8"] == pytest.approx(200.0)  # ties enter together
    assert m["per_class"]["truck"]["fp_per_km2_at_recall"]["0.8"] is None  # never reached


def test_pr_curve_is_downsampled() -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 95, size=(600, 2))
    det_rows = [(x, y, x + 3, y + 3) for x, y in xy]
    m = evaluate(
        det_frame(det_rows, rng.uniform(0, 1, 600).tolist()), [image(gt_frame(grid(20)))], EvaluateConfig()
    )
    curve = m["pr_curve"]
    assert 100 < len(curve["precision"]) <= 200
    assert len(curve["precision"]) == len(curve["recall"]) == len(curve["scores"])
    assert curve["scores"] == sorted(curve["scores"], reverse=True)


def test_write_metrics_is_json_and_atomic(tmp_path: Path) -> None:
    rows = grid(3)
    m = evaluate(det_frame(rows, [0.9] * 3), [image(gt_frame(rows))], EvaluateConfig())
    m["odd"] = [np.float32(0.5), float("nan"), np.int64(3)]
    out = tmp_path / "round_000" / "metrics.json"
    write_metrics(out, m)
    back = json.loads(out.read_text())
    assert back["ap50"] == pytest.approx(1.0)
    assert back["odd"] == [0.5, None, 3]
    assert [p.name for p in out.parent.iterdir()] == ["metrics.json"]


def test_log_average_fp_per_km2_by_hand() -> None:
    """Geometric mean of FP/km² at recall 0.5, 0.55, ..., 0.9; no FP counts as half an FP."""
    # 10 objects found in score order, 1 FP after the 6th TP and 3 FPs after the 8th
    is_tp = np.array([1] * 6 + [0] + [1] * 2 + [0] * 3 + [1] * 2, dtype=bool)
    scores = np.linspace(1.0, 0.1, len(is_tp))
    sweep = build_sweep(scores, is_tp, 10)
    area = 0.5
    # recall 0.5, 0.55, 0.6: 0 FP -> 0.5 FP; 0.65, 0.7: 1 FP; 0.75, 0.8: 1; 0.85, 0.9: 4
    fp = [0.5, 0.5, 0.5, 1, 1, 1, 1, 4, 4]
    expect = float(np.exp(np.mean(np.log(np.array(fp) / area))))
    assert log_average_fp_per_km2(sweep, area) == pytest.approx(expect)
    assert threshold_at_recall(sweep, 0.6) == pytest.approx(scores[5])
    assert threshold_at_recall(sweep, 1.01) is None
    # a detector that never reaches recall 0.9 is not ranked (its missing points would flatter it)
    short = build_sweep(scores[:9], is_tp[:9], 10)  # reaches recall 0.8 only
    assert log_average_fp_per_km2(short, area) is None


def test_fp_kinds_per_image_and_tp_scores() -> None:
    """FPs at the recall threshold split into look-alike, background, duplicate and localisation; per image too."""
    gt_a = [(10, 10, 14, 14), (30, 10, 34, 14)]
    distractors = gpd.GeoDataFrame({"class": ["shadow"]}, geometry=boxes([(60, 60, 64, 64)]), crs=CRS)
    dets_a = det_frame(
        [gt_a[0], gt_a[1], (10.2, 10, 14.2, 14), (12, 10, 16, 14), (60, 60, 64, 64), (80, 80, 84, 84), (90, 5, 94, 9)],
        [0.9, 0.8, 0.85, 0.7, 0.75, 0.6, 0.1],
    )
    gt_b = [(10, 10, 14, 14)]
    dets_b = det_frame([gt_b[0], (50, 50, 54, 54)], [0.95, 0.3], image="b.tif")
    images = [image(gt_frame(gt_a), distractors=distractors), image(gt_frame(gt_b), name="b.tif")]
    m = evaluate(pd.concat([dets_a, dets_b]), images, EvaluateConfig(fixed_recalls=[0.6, 1.0]))
    # recall 1.0 needs the TP at 0.8: FPs above it are the duplicate (0.85) only
    assert m["fp_kinds_at_recall"]["0.6"] == {"threshold": 0.9, "look-alike": 0, "background": 0, "duplicate": 0,
                                              "localisation": 0, "localisation_enclosing": 0}
    kinds = m["fp_kinds_at_recall"]["1.0"]
    assert kinds["threshold"] == pytest.approx(0.8)
    assert (kinds["duplicate"], kinds["localisation"], kinds["look-alike"], kinds["background"]) == (1, 0, 0, 0)
    m2 = evaluate(pd.concat([dets_a, dets_b]), images, EvaluateConfig(fixed_recalls=[1.0], score_threshold=0.05))
    assert m2["per_image"]["a.tif"]["n_gt"] == 2 and m2["per_image"]["b.tif"]["n_gt"] == 1
    assert m2["per_image"]["b.tif"]["fp_per_km2_at_recall"]["1.0"] == 0.0
    assert m2["per_image"]["a.tif"]["fp_per_km2_at_recall"]["1.0"] == pytest.approx(1 / AREA_KM2)
    assert m2["tp_score_quantiles"]["0.5"] == pytest.approx(0.9)
    # every kind once, when the recall target needs every a.tif detection
    everything = evaluate(dets_a.assign(score=[0.1, 0.05, 0.9, 0.8, 0.7, 0.6, 0.5]), images[:1],
                          EvaluateConfig(fixed_recalls=[1.0]))
    assert everything["fp_kinds_at_recall"]["1.0"] == {"threshold": 0.05, "look-alike": 1, "background": 2,
                                                       "duplicate": 1, "localisation": 1, "localisation_enclosing": 0}


def test_localisation_errors_that_enclose_their_object_are_counted() -> None:
    """A box drawn too large around an unmatched object (IoU 0.44, covering all of it) is an enclosing localisation error."""
    gt = [(10, 10, 14, 14), (30, 10, 34, 14)]
    dets = det_frame([gt[0], (29, 9, 35, 15), (32, 10, 36, 14)], [0.6, 0.8, 0.7])
    everything = evaluate(dets, [image(gt_frame(gt))], EvaluateConfig(fixed_recalls=[0.5]))["fp_kinds_at_recall"]["0.5"]
    # at the threshold of the one TP (0.6) both other boxes are localisation errors on the second
    # object; only the large one (6 x 6 around its 4 x 4) encloses it, the shifted one covers half
    assert (everything["localisation"], everything["localisation_enclosing"]) == (2, 1)
