"""The negative bank: dedupe across rounds, refresh/retirement, eviction, atomic save, review, export."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pytest
import shapely
from affine import Affine
from pycocotools.coco import COCO

from hem_bootstrap.config import BankConfig, MiningConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.windows import pixel_to_map_boxes
from hem_bootstrap.mining.bank import NegativeBank
from hem_bootstrap.mining.review import apply_review, route_for_review

CRS = "EPSG:32633"
T = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)
CFG = BankConfig(dedupe_iou=0.5, retire_below=0.1, retire_rounds=2)

Row = tuple[str, float, tuple[float, float, float, float]]


def mined(rows: list[Row], crs: str | None = CRS, transform: Affine = T) -> gpd.GeoDataFrame:
    """A mined frame: (image, score, pixel box) per row, geometry from the transform."""
    px = np.array([r[2] for r in rows], dtype=np.float64).reshape(-1, 4)
    n = len(rows)
    return gpd.GeoDataFrame(
        {
            "image": [r[0] for r in rows],
            "label": np.ones(n, dtype=np.int64),
            "score": np.array([r[1] for r in rows], dtype=np.float64),
            "win_col": np.zeros(n, dtype=np.int64),
            "win_row": np.zeros(n, dtype=np.int64),
            "win_w": np.full(n, 256, dtype=np.int64),
            "win_h": np.full(n, 256, dtype=np.int64),
            "px_xmin": px[:, 0],
            "px_ymin": px[:, 1],
            "px_xmax": px[:, 2],
            "px_ymax": px[:, 3],
        },
        geometry=[shapely.box(*b) for b in pixel_to_map_boxes(px, transform)],
        crs=crs,
    )


def box(i: int, shift: float = 0.0) -> tuple[float, float, float, float]:
    return (20.0 * i + shift, 0.0, 20.0 * i + 10 + shift, 10.0)


def test_same_fp_in_two_rounds_is_one_row() -> None:
    bank = NegativeBank()
    assert bank.add(
        mined([("a.tif", 0.8, box(0)), ("a.tif", 0.6, box(1))]), 1, "h1", "threshold>0.5", CFG
    ) == {
        "added": 2,
        "updated": 0,
    }
    # round 2: the first one again (shifted by 1 px, IoU 0.82), plus a new one
    res = bank.add(
        mined([("a.tif", 0.7, box(0, 1.0)), ("a.tif", 0.9, box(3))]), 2, "h2", "threshold>0.5", CFG
    )
    assert res == {"added": 1, "updated": 1}
    f = bank.frame
    assert f["neg_id"].tolist() == [1, 2, 3]
    first = f.iloc[0]
    assert (first.rounds_seen, first.last_round, first.round_added) == (2, 2, 1)
    assert (first.score, first.last_score) == (0.8, 0.7)
    assert first.px_xmin == 0.0  # the stored box is the first one seen
    assert first.model_hash == "h1" and f.iloc[2].model_hash == "h2"
    assert f["src_crs"].tolist() == ["EPSG:32633"] * 3
    assert bank.crs == CRS


def test_overlaps_within_one_call_and_images_kept_apart() -> None:
    bank = NegativeBank()
    rows = [("a.tif", 0.6, box(0)), ("a.tif", 0.9, box(0, 1.0)), ("b.tif", 0.5, box(0))]
    assert bank.add(mined(rows), 1, "h", "s", CFG) == {"added": 2, "updated": 0}
    assert bank.frame["image"].tolist() == ["a.tif", "b.tif"]
    assert bank.frame["score"].tolist() == [0.9, 0.5]
    # the same entry matched twice in one round counts the round once, keeps the best score
    res = bank.add(mined([("a.tif", 0.3, box(0)), ("a.tif", 0.4, box(0, 0.5))]), 2, "h", "s", CFG)
    assert res == {"added": 0, "updated": 1}
    assert bank.frame.iloc[0].rounds_seen == 2 and bank.frame.iloc[0].last_score == 0.4


def test_refresh_and_retirement_after_r_rounds() -> None:
    bank = NegativeBank()
    bank.add(
        mined([("a.tif", 0.8, box(0)), ("a.tif", 0.8, box(1)), ("a.tif", 0.8, box(2))]), 1, "h", "s", CFG
    )
    assert bank.refresh({1: 0.05, 2: 0.5, 3: 0.05}, 2, CFG) == {"refreshed": 3, "retired": 0}
    f = bank.frame
    assert f["below_rounds"].tolist() == [1, 0, 1]
    assert f["rounds_seen"].tolist() == [1, 2, 1]  # entry 2 still hard in round 2
    # round 3: entry 1 low again -> retired; entry 3 recovers -> count reset
    res = bank.refresh(pd.DataFrame({"neg_id": [1, 2, 3], "score": [0.02, 0.3, 0.4]}), 3, CFG)
    assert res == {"refreshed": 3, "retired": 1}
    f = bank.frame
    assert f["retired"].tolist() == [True, False, False]
    assert f["below_rounds"].tolist() == [2, 0, 0]
    assert f["last_score"].tolist() == [0.02, 0.3, 0.4]
    assert bank.active()["neg_id"].tolist() == [2, 3]
    assert len(bank) == 3  # retired rows are kept
    # re-mined later: un-retired, counted
    assert bank.add(mined([("a.tif", 0.7, box(0))]), 4, "h", "s", CFG) == {"added": 0, "updated": 1}
    r = bank.frame.iloc[0]
    assert (bool(r.retired), r.below_rounds, r.rounds_seen, r.last_round) == (False, 0, 2, 4)
    with pytest.raises(DataError, match=r"neg_id\(s\) \[99\]"):
        bank.refresh({99: 0.5}, 5, CFG)


def test_refresh_then_add_in_same_round_counts_once() -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.8, box(0))]), 1, "h", "s", CFG)
    bank.refresh({1: 0.9}, 2, CFG)
    bank.add(mined([("a.tif", 0.85, box(0))]), 2, "h", "s", CFG)
    r = bank.frame.iloc[0]
    assert (r.rounds_seen, r.last_round, r.last_score) == (2, 2, 0.9)


def test_evict_retires_easiest_beyond_cap() -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", s, box(i)) for i, s in enumerate([0.9, 0.6, 0.7, 0.6])]), 1, "h", "s", CFG)
    assert bank.evict(CFG) == 0
    assert bank.evict(BankConfig(max_size=2)) == 2
    # ids follow score within an image: 0.9 -> 1, 0.7 -> 2, then the two 0.6 -> 3, 4
    assert bank.active()["neg_id"].tolist() == [1, 2]
    bank2 = NegativeBank()
    bank2.add(mined([("a.tif", s, box(i)) for i, s in enumerate([0.9, 0.6, 0.7, 0.6])]), 1, "h", "s", CFG)
    bank2.evict(BankConfig(max_size=3))  # a tie at 0.6: the older entry goes
    assert bank2.active()["neg_id"].tolist() == [1, 2, 4]


def _bank_with_review() -> NegativeBank:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.8, box(0)), ("b.tif", 0.4, box(1))]), 1, "h", "threshold>0.5", CFG)
    bank.add(mined([("a.tif", 0.6, box(2))]), 2, "h", "budget=10", CFG)
    bank.refresh({1: 0.05, 2: 0.35, 3: 0.65}, 2, CFG)
    bank.add_review(mined([("a.tif", 0.97, box(5))]), 2, "score>0.95")
    return bank


def test_save_load_round_trip_row_for_row(tmp_path: Path) -> None:
    bank = _bank_with_review()
    path = tmp_path / "run" / "bank.gpkg"
    bank.save(path)
    assert {str(n) for n, _ in pyogrio.list_layers(path)} >= {"negatives", "review"}
    raw = gpd.read_file(path, layer="negatives", engine="pyogrio")
    assert raw.crs == CRS and len(raw) == 3 and raw["neg_id"].tolist() == [1, 2, 3]
    back = NegativeBank.load(path)
    pd.testing.assert_frame_equal(back.frame, bank.frame)
    pd.testing.assert_frame_equal(back.review_frame, bank.review_frame)
    assert back.crs == CRS
    # ids keep counting after a reload
    back.add(mined([("c.tif", 0.9, box(0))]), 3, "h", "s", CFG)
    assert back.frame["neg_id"].tolist() == [1, 2, 3, 4]
    assert list(tmp_path.joinpath("run").iterdir()) == [path]  # no temp file left behind


def test_empty_and_missing_bank(tmp_path: Path) -> None:
    bank = NegativeBank.load(tmp_path / "nope.gpkg")
    assert len(bank) == 0 and len(bank.active()) == 0 and len(bank.training_negatives()) == 0
    bank.save(tmp_path / "empty.gpkg")
    again = NegativeBank.load(tmp_path / "empty.gpkg")
    pd.testing.assert_frame_equal(again.frame, bank.frame)
    assert bank.add(mined([]), 1, "h", "s", CFG) == {"added": 0, "updated": 0}


def test_not_a_bank_is_a_data_error(tmp_path: Path) -> None:
    other = tmp_path / "labels.gpkg"
    gpd.GeoDataFrame({"x": [1]}, geometry=[shapely.box(0, 0, 1, 1)], crs=CRS).to_file(other, layer="labels")
    with pytest.raises(DataError, match="no 'negatives' layer"):
        NegativeBank.load(other)
    junk = tmp_path / "junk.gpkg"
    junk.write_text("not a geopackage")
    with pytest.raises(DataError, match="junk.gpkg"):
        NegativeBank.load(junk)
    with pytest.raises(DataError, match="missing column"):
        NegativeBank().add(mined([("a.tif", 0.5, box(0))]).drop(columns="px_xmin"), 1, "h", "s", CFG)


def test_atomic_save_survives_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "bank.gpkg"
    bank = _bank_with_review()
    bank.save(path)
    before = path.read_bytes()
    bank.add(mined([("z.tif", 0.9, box(0))]), 3, "h", "s", CFG)

    def crash(src: object, dst: object) -> None:
        raise OSError("simulated crash during rename")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        bank.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert len(NegativeBank.load(path)) == 3
    assert [p.name for p in tmp_path.iterdir()] == ["bank.gpkg"]


def test_deterministic_regardless_of_input_order(tmp_path: Path) -> None:
    rows = [
        ("b.tif", 0.7, box(1)),
        ("a.tif", 0.8, box(0)),
        ("a.tif", 0.6, box(0, 2.0)),
        ("a.tif", 0.9, box(4)),
    ]
    one, two = NegativeBank(), NegativeBank()
    one.add(mined(rows), 1, "h", "s", CFG)
    two.add(mined(rows[::-1]), 1, "h", "s", CFG)
    pd.testing.assert_frame_equal(one.frame, two.frame)
    one.save(tmp_path / "1.gpkg")
    two.save(tmp_path / "2.gpkg")
    pd.testing.assert_frame_equal(
        gpd.read_file(tmp_path / "1.gpkg", layer="negatives"),
        gpd.read_file(tmp_path / "2.gpkg", layer="negatives"),
    )


def test_other_crs_is_reprojected_and_keeps_pixel_box() -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.8, box(0))]), 1, "h", "s", CFG)
    t34 = Affine(0.5, 0.0, 300_000.0, 0.0, -0.5, 5_000_000.0)
    other = mined([("b.tif", 0.7, box(1))], crs="EPSG:32634", transform=t34)
    bank.add(other, 1, "h", "s", CFG)
    b = bank.frame.iloc[1]
    assert b.src_crs == "EPSG:32634"
    assert (b.px_xmin, b.px_xmax) == (20.0, 30.0)
    expected = other.to_crs(CRS).geometry.iloc[0]
    assert b.geometry.equals_exact(expected, 1e-6)


def test_training_negatives_and_sample_weights() -> None:
    bank = _bank_with_review()  # last scores 0.05 (one round below: still active), 0.35, 0.65
    tn = bank.training_negatives()
    assert list(tn.columns) == ["image", "px_xmin", "px_ymin", "px_xmax", "px_ymax", "last_score", "neg_id"]
    assert tn["neg_id"].tolist() == [1, 2, 3]
    assert bank.sample_weights(BankConfig()).tolist() == [1.0, 1.0, 1.0]
    w = bank.sample_weights(BankConfig(sampling="score", temperature=0.5, floor=0.05))
    assert w == pytest.approx([0.05, 0.1225, 0.4225])  # 0.05**2 = 0.0025 -> floor
    w1 = bank.sample_weights(BankConfig(sampling="score", temperature=1.0, floor=0.0))
    assert w1 == pytest.approx([0.05, 0.35, 0.65])
    with_w = bank.training_negatives(BankConfig(sampling="score", floor=0.1))
    assert with_w["weight"].tolist() == pytest.approx([0.1, 0.35, 0.65])


def test_stats() -> None:
    bank = _bank_with_review()
    bank.evict(BankConfig(max_size=2))
    s = bank.stats()
    assert (s["total"], s["active"], s["retired"], s["review_pending"]) == (3, 2, 1, 1)
    assert s["by_round"] == {"1": 2, "2": 1}
    assert s["by_strategy"] == {"budget=10": 1, "threshold>0.5": 2}
    assert len(s["score_hist"]["edges"]) == 11 and sum(s["score_hist"]["counts"]) == 2
    assert s["score_hist"]["counts"][3] == 1 and s["score_hist"]["counts"][6] == 1
    json.dumps(s)


def test_export_geojson_and_coco(tmp_path: Path, make_raster: Callable[..., Path]) -> None:
    tif = make_raster("scene.tif", width=120, height=80)
    bank = NegativeBank()
    bank.add(
        mined([(str(tif), 0.8, box(0)), (str(tif), 0.6, box(2)), ("gone.tif", 0.7, box(1))]), 1, "h", "s", CFG
    )
    bank.evict(BankConfig(max_size=2))  # retires the 0.6 one
    gj = tmp_path / "out" / "neg.geojson"
    assert bank.export(gj, "geojson") == 2
    back = gpd.read_file(gj)
    assert len(back) == 2 and sorted(back["neg_id"].tolist()) == [1, 3]
    assert set(back["predicted_class"]) == {"1"}  # no class names given: the id as text
    assert back.crs.to_epsg() == 4326 and set(back["src_crs"]) == {CRS}  # RFC 7946 lon/lat; the bank's CRS kept
    assert json.loads(gj.read_text())["name"] == "neg"  # named after the file
    assert bank.export(tmp_path / "all.geojson", "geojson", include_retired=True) == 3

    cj = tmp_path / "neg.json"
    bank.export(cj, "coco", {str(tif): T}, classes=["vehicle"])
    coco = COCO(str(cj))
    assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == ["hard_negative"]
    imgs = {im["file_name"]: im for im in coco.dataset["images"]}
    assert (imgs[str(tif)]["width"], imgs[str(tif)]["height"]) == (120, 80)
    assert "width" not in imgs["gone.tif"]
    ann = coco.loadAnns(coco.getAnnIds(imgIds=[imgs[str(tif)]["id"]]))
    assert [a["bbox"] for a in ann] == [[0.0, 0.0, 10.0, 10.0]]
    assert ann[0]["area"] == 100.0 and ann[0]["neg_id"] == 1
    assert (ann[0]["predicted_label"], ann[0]["predicted_class"]) == (1, "vehicle")
    with pytest.raises(DataError, match="'shp'"):
        bank.export(tmp_path / "x", "shp")


def test_rows_keep_their_class_name_through_save_review_and_export(tmp_path: Path) -> None:
    bank = NegativeBank()
    cars = mined([("a.tif", 0.8, box(0)), ("a.tif", 0.97, box(2))]).assign(**{"class": "car"})
    randoms = mined([("a.tif", float("nan"), box(4))]).assign(label=0)  # a random window: label 0, no class column
    to_bank, to_review = route_for_review(cars, bank, MiningConfig(review_above=0.95))
    bank.add(pd.concat([to_bank, randoms], ignore_index=True), 1, "h", "s", CFG)
    bank.add_review(to_review, 1, "score>0.95")
    bank.save(tmp_path / "bank.gpkg")
    neg = gpd.read_file(tmp_path / "bank.gpkg", layer="negatives")
    assert dict(zip(neg["label"], neg["class"], strict=True)) == {1: "car", 0: "background"}
    assert gpd.read_file(tmp_path / "bank.gpkg", layer="review")["class"].tolist() == ["car"]
    bank.export(tmp_path / "n.geojson", "geojson", classes=["vehicle"])  # the row's own name wins
    assert sorted(gpd.read_file(tmp_path / "n.geojson")["predicted_class"]) == ["background", "car"]


def test_a_bank_written_before_the_class_column_loads_and_exports_named(tmp_path: Path) -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.8, box(0))]), 1, "h", "s", CFG)
    bank.save(tmp_path / "bank.gpkg")
    old = gpd.read_file(tmp_path / "bank.gpkg", layer="negatives").drop(columns="class")
    pyogrio.write_dataframe(old, tmp_path / "bank.gpkg", layer="negatives", driver="GPKG")
    back = NegativeBank.load(tmp_path / "bank.gpkg")
    assert back.frame["class"].tolist() == [""]
    back.export(tmp_path / "n.geojson", "geojson", classes=["vehicle"])
    assert gpd.read_file(tmp_path / "n.geojson")["predicted_class"].tolist() == ["vehicle"]


def test_route_for_review_score_and_modes() -> None:
    bank = NegativeBank()
    m = mined([("a.tif", 0.99, box(0)), ("a.tif", 0.6, box(1)), ("a.tif", 0.96, box(2))])
    to_bank, to_review = route_for_review(m, bank, MiningConfig(review_above=0.95, review_mode="hold"))
    assert to_bank["score"].tolist() == [0.6]
    assert to_review["score"].tolist() == [0.99, 0.96]
    assert to_review["reason"].tolist() == ["score>0.95", "score>0.95"]
    to_bank, to_review = route_for_review(m, bank, MiningConfig(review_above=0.95, review_mode="bank"))
    assert len(to_bank) == 3 and len(to_review) == 2
    to_bank, to_review = route_for_review(m, bank, MiningConfig(review_above=None))
    assert len(to_bank) == 3 and len(to_review) == 0


def test_route_for_review_repeated_entry() -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.9, box(0)), ("a.tif", 0.9, box(1))]), 1, "h", "s", CFG)
    for r in (2, 3):
        bank.refresh({1: 0.9, 2: 0.5}, r, CFG)
    assert bank.frame["rounds_seen"].tolist() == [3, 3]
    cfg = MiningConfig(review_above=0.99, review_after_rounds=3)
    m = mined([("a.tif", 0.92, box(0, 1.0)), ("a.tif", 0.93, box(1)), ("b.tif", 0.92, box(0))])
    to_bank, to_review = route_for_review(m, bank, cfg)
    # entry 2 scores 0.5 now: not suspicious; b.tif has no entry
    assert to_review["reason"].tolist() == ["mined 3 rounds"]
    assert to_review["bank_neg_id"].tolist() == [1]
    assert to_bank["score"].tolist() == [0.93, 0.92]
    assert bank.add_review(to_review, 4, "unused") == 1
    assert bank.review()["reason"].tolist() == ["mined 3 rounds"]
    assert bank.review()["bank_neg_id"].tolist() == [1]


def test_add_review_dedupes_pending_rows() -> None:
    bank = NegativeBank()
    assert bank.add_review(mined([("a.tif", 0.96, box(0))]), 1, "score>0.95") == 1
    assert (
        bank.add_review(mined([("a.tif", 0.98, box(0, 1.0)), ("a.tif", 0.97, box(3))]), 2, "score>0.95") == 1
    )
    rv = bank.review()
    assert rv["review_id"].tolist() == [1, 2]
    assert rv["score"].tolist() == [0.98, 0.97]
    assert rv["last_round"].tolist() == [2, 2] and rv["round_added"].tolist() == [1, 2]
    assert rv["decision"].tolist() == ["", ""]


def test_apply_review(tmp_path: Path) -> None:
    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.9, box(0))]), 1, "h", "s", CFG)  # neg 1: will turn out an object
    bank.add_review(
        mined([("a.tif", 0.97, box(0, 0.5)), ("a.tif", 0.96, box(3)), ("a.tif", 0.99, box(5))]), 2, "r"
    )
    path = tmp_path / "bank.gpkg"
    bank.save(path)
    decisions = gpd.read_file(path, layer="review")  # a person edits the layer in QGIS
    # review ids follow score: 0.99 (box 5) -> 1, 0.97 (box 0) -> 2, 0.96 (box 3) -> 3
    decisions["decision"] = ["", "Positive", "negative"]
    bank = NegativeBank.load(path)
    out = apply_review(bank, decisions)
    pos = out["new_positives"]
    assert pos["review_id"].tolist() == [2] and pos.crs == CRS and pos.geometry.iloc[0].area > 0
    assert out["negatives_added"] == 1 and out["negatives_retired"] == 1
    assert bank.review()["review_id"].tolist() == [1]
    f = bank.frame
    assert f["neg_id"].tolist() == [1, 2]
    assert f["retired"].tolist() == [True, False]
    assert f.iloc[1].strategy == "review" and f.iloc[1].px_xmin == 60.0
    # ids of removed review rows are not reused
    bank.add_review(mined([("a.tif", 0.97, box(8))]), 3, "r")
    assert bank.review()["review_id"].tolist() == [1, 4]


def test_apply_review_bad_input() -> None:
    bank = NegativeBank()
    bank.add_review(mined([("a.tif", 0.97, box(0))]), 1, "r")
    with pytest.raises(DataError, match=r"row 0 \(review_id 1\): decision = 'maybe'.*'positive', 'negative'"):
        apply_review(bank, pd.DataFrame({"review_id": [1], "decision": ["maybe"]}))
    with pytest.raises(DataError, match="review_id = 7"):
        apply_review(bank, pd.DataFrame({"review_id": [7], "decision": ["negative"]}))
    with pytest.raises(DataError, match="missing column"):
        apply_review(bank, pd.DataFrame({"review_id": [1]}))
    assert len(bank.review()) == 1


def test_re_adding_the_same_round_output_adds_nothing() -> None:
    rng = np.random.default_rng(5)
    xy = rng.uniform(0, 500, (60, 2))
    rows = [
        (f"i{k % 3}.tif", float(s), (x, y, x + 12, y + 12))
        for k, ((x, y), s) in enumerate(zip(xy, rng.uniform(0.5, 1, 60), strict=True))
    ]
    bank = NegativeBank()
    first = bank.add(mined(rows), 1, "h", "s", CFG)
    again = bank.add(mined(rows), 2, "h", "s", CFG)
    assert again == {"added": 0, "updated": first["added"]}
    assert (bank.frame["rounds_seen"] == 2).all()
    assert bank.frame["neg_id"].is_unique


def test_a_rejected_suspect_never_returns_to_review_even_once_retired() -> None:
    from hem_bootstrap.config import MiningConfig

    bank = NegativeBank()
    bank.add(mined([("a.tif", 0.97, box(0))]), 1, "h", "review", CFG)
    bank.mark_reviewed(mined([("a.tif", 0.97, box(0))]))
    bank.frame.loc[0, "retired"] = True  # the model learned it (refresh) or the cap evicted it
    cfg = MiningConfig(review_above=0.95)
    again = mined([("a.tif", 0.99, box(0, 0.5)), ("a.tif", 0.99, box(3))])
    to_bank, to_review = route_for_review(again, bank, cfg)
    assert to_review["px_xmin"].tolist() == [60.0]  # only the new suspect; the decided one goes to the bank
    assert len(to_bank) == 1 and to_bank["px_xmin"].tolist() == [0.5]


def test_review_applies_to_the_snapshot_of_the_newest_finished_mining(tmp_path: Path) -> None:
    from hem_bootstrap.mining.review import latest_snapshot

    for r in (0, 1, 2):
        NegativeBank().save(tmp_path / f"round_{r:03d}" / "bank.gpkg")
    manifest = {"rounds": [{"round": 0, "steps": {"train": {}, "evaluate": {}}},
                           {"round": 1, "steps": {"detect": {}, "mine": {}}},
                           {"round": 2, "steps": {"detect": {}}}]}  # round 2's mining was killed
    assert latest_snapshot(tmp_path, manifest) == tmp_path / "round_001" / "bank.gpkg"
    assert latest_snapshot(tmp_path, {"rounds": manifest["rounds"][:1]}) == tmp_path / "round_000" / "bank.gpkg"
    assert latest_snapshot(tmp_path, {"rounds": []}) is None
