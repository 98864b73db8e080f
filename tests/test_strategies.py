"""Mining strategies on hand-made false positives: exact selections, composition, dedupe, random baseline."""

from __future__ import annotations

import geopandas as gpd
import numpy as np
import pytest
import shapely
from affine import Affine

from hem_bootstrap.config import MiningConfig, StrategySpec
from hem_bootstrap.errors import ConfigError
from hem_bootstrap.mining.strategies import (
    STRATEGIES,
    Budget,
    Compose,
    PerImageCap,
    PerTileCap,
    RandomBaseline,
    ScoreBand,
    ScoreThreshold,
    Strategy,
    build_strategy,
    random_windows,
    spatial_dedupe,
    strategy_label,
    typical_box_px,
)

CRS = "EPSG:32633"
T = Affine(0.5, 0.0, 500_000.0, 0.0, -0.5, 5_000_000.0)


def fps_frame(rows: list[tuple[str, float, int, int, tuple[float, float, float, float]]]) -> gpd.GeoDataFrame:
    """rows: (image, score, win_col, win_row, pixel box); ``fid`` numbers rows for assertions."""
    px = np.array([r[4] for r in rows], dtype=np.float64).reshape(-1, 4)
    from hem_bootstrap.geo.windows import pixel_to_map_boxes

    mb = pixel_to_map_boxes(px, T)
    return gpd.GeoDataFrame(
        {
            "fid": np.arange(len(rows)),
            "image": [r[0] for r in rows],
            "label": np.ones(len(rows), dtype=np.int64),
            "score": [r[1] for r in rows],
            "win_col": [r[2] for r in rows],
            "win_row": [r[3] for r in rows],
            "win_w": [256] * len(rows),
            "win_h": [256] * len(rows),
            "px_xmin": px[:, 0],
            "px_ymin": px[:, 1],
            "px_xmax": px[:, 2],
            "px_ymax": px[:, 3],
        },
        geometry=[shapely.box(*b) for b in mb],
        crs=CRS,
    )


def box(i: int) -> tuple[float, float, float, float]:
    """Disjoint 10-px boxes."""
    return (20.0 * i, 0.0, 20.0 * i + 10, 10.0)


@pytest.fixture
def fps() -> gpd.GeoDataFrame:
    return fps_frame(
        [
            ("a.tif", 0.90, 0, 0, box(0)),  # 0
            ("a.tif", 0.30, 0, 0, box(1)),  # 1
            ("a.tif", 0.70, 224, 0, box(2)),  # 2
            ("a.tif", 0.50, 224, 0, box(3)),  # 3
            ("b.tif", 0.95, 0, 0, box(4)),  # 4
            ("b.tif", 0.60, 0, 0, box(5)),  # 5
            ("b.tif", 0.60, 0, 224, box(6)),  # 6  (tie with 5)
            ("c.tif", 0.10, 0, 0, box(7)),  # 7
        ]
    )


RNG = np.random.default_rng(0)


def fids(frame: gpd.GeoDataFrame) -> list[int]:
    return frame["fid"].tolist()


def test_threshold_strict(fps: gpd.GeoDataFrame) -> None:
    assert fids(ScoreThreshold(0.6).select(fps, RNG)) == [0, 2, 4]
    assert fids(ScoreThreshold(0.0).select(fps, RNG)) == list(range(8))


def test_per_image_cap(fps: gpd.GeoDataFrame) -> None:
    assert fids(PerImageCap(1).select(fps, RNG)) == [0, 4, 7]
    # tie 5/6 at 0.6: the earlier row wins
    assert fids(PerImageCap(2).select(fps, RNG)) == [0, 2, 4, 5, 7]


def test_per_tile_cap(fps: gpd.GeoDataFrame) -> None:
    assert fids(PerTileCap(1).select(fps, RNG)) == [0, 2, 4, 6, 7]


def test_budget_global_top_k(fps: gpd.GeoDataFrame) -> None:
    assert fids(Budget(3).select(fps, RNG)) == [0, 2, 4]
    assert fids(Budget(100).select(fps, RNG)) == list(range(8))


def test_score_band_bounds(fps: gpd.GeoDataFrame) -> None:
    # lo inclusive (0.5 kept), hi exclusive (0.9 dropped)
    assert fids(ScoreBand(0.5, 0.9).select(fps, RNG)) == [2, 3, 5, 6]


def test_compose_order_matters(fps: gpd.GeoDataFrame) -> None:
    cap_then_threshold = Compose([PerImageCap(1), ScoreThreshold(0.5)])
    threshold_then_cap = Compose([ScoreThreshold(0.2), PerImageCap(2), Budget(3)])
    assert fids(cap_then_threshold.select(fps, RNG)) == [0, 4]
    assert fids(threshold_then_cap.select(fps, RNG)) == [0, 2, 4]
    assert fids(Compose([]).select(fps, RNG)) == list(range(8))


def test_random_baseline_passes_through_and_flags(fps: gpd.GeoDataFrame) -> None:
    chain = Compose([ScoreThreshold(0.5), RandomBaseline()])
    assert chain.random and not Compose([ScoreThreshold(0.5)]).random
    assert fids(chain.select(fps, RNG)) == [0, 2, 4, 5, 6]


def test_empty_input_every_strategy(fps: gpd.GeoDataFrame) -> None:
    empty = fps.iloc[:0]
    for s in (
        ScoreThreshold(0.5),
        PerImageCap(2),
        PerTileCap(2),
        Budget(2),
        ScoreBand(0.1, 0.2),
        RandomBaseline(),
    ):
        assert isinstance(s, Strategy)
        assert len(s.select(empty, RNG)) == 0


def test_build_strategy_from_config_and_label() -> None:
    cfg = MiningConfig(
        strategies=[
            StrategySpec(name="threshold", threshold=0.5),
            StrategySpec(name="per_image_cap", k=50),
            StrategySpec(name="score_band", lo=0.2, hi=0.9),
            StrategySpec(name="budget", k=1000),
            StrategySpec(name="random"),
        ]
    )
    chain = build_strategy(cfg.strategies)
    assert [type(s) for s in chain.strategies] == [
        ScoreThreshold,
        PerImageCap,
        ScoreBand,
        Budget,
        RandomBaseline,
    ]
    assert chain.random
    assert (
        strategy_label(cfg.strategies)
        == "threshold>0.5+per_image_cap=50+score_band=[0.2,0.9)+budget=1000+random"
    )
    assert set(STRATEGIES) == {"threshold", "per_image_cap", "per_tile_cap", "budget", "score_band", "random", "none"}


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: PerImageCap(0), "per_image_cap.*k = 0"),
        (lambda: Budget(-3), "budget.*k = -3"),
        (lambda: PerTileCap(2.5), "per_tile_cap.*k = 2.5"),  # type: ignore[arg-type]
        (lambda: ScoreThreshold(1.5), "threshold.*threshold = 1.5"),
        (lambda: ScoreBand(0.6, 0.4), "score_band.*lo = 0.6"),
        (lambda: build_strategy([{"name": "top_k", "k": 3}]), "unknown strategy 'top_k'"),
        (lambda: build_strategy([{"name": "budget", "k": 0}]), r"strategies\[0\]\.k = 0"),
    ],
)
def test_bad_parameters_raise_config_error(make: object, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make()  # type: ignore[operator]


def test_spatial_dedupe_keeps_higher_score_per_image() -> None:
    frame = fps_frame(
        [
            ("a.tif", 0.6, 0, 0, (0, 0, 10, 10)),  # 0 overlaps 1 (IoU 81/119 = 0.68)
            ("a.tif", 0.8, 0, 0, (1, 1, 11, 11)),  # 1 kept
            ("a.tif", 0.7, 0, 0, (6, 0, 16, 10)),  # 2: IoU with 1 = 45/155 = 0.29 -> kept at 0.3
            ("b.tif", 0.5, 0, 0, (0, 0, 10, 10)),  # 3 same pixels, other image -> kept
        ]
    )
    frame.loc[frame["image"] == "b.tif", "geometry"] = frame.geometry.iloc[0]  # same map box too
    assert fids(spatial_dedupe(frame, 0.3)) == [1, 2, 3]
    assert fids(spatial_dedupe(frame, 0.2)) == [1, 3]
    assert len(spatial_dedupe(frame.iloc[:0], 0.3)) == 0


def _meta(name: str, w: int = 200, h: int = 100, t: Affine = T) -> tuple[str, int, int, Affine, str]:
    return (name, w, h, t, CRS)


def test_random_windows_avoid_gt_and_are_deterministic() -> None:
    images = [_meta("a.tif"), _meta("b.tif", 100, 100, Affine.translation(1000, 0) @ T)]
    # ground truth covering a.tif except its right-hand 40 columns (b.tif lies 1 km east)
    from hem_bootstrap.geo.windows import pixel_to_map_boxes

    gt_px = np.array([[0, 0, 160, 100]], dtype=np.float64)
    gt = gpd.GeoDataFrame({"label": [1]}, geometry=[shapely.box(*pixel_to_map_boxes(gt_px, T)[0])], crs=CRS)
    a = random_windows(30, images, 64, np.random.default_rng(7), avoid=gt, box_px=(12, 8))
    b = random_windows(30, images, 64, np.random.default_rng(7), avoid=gt, box_px=(12, 8))
    assert len(a) == 30
    assert a.equals(b)
    assert (a["label"] == 0).all() and a["score"].isna().all()
    assert not a.geometry.intersects(gt.geometry.iloc[0]).any()
    assert np.allclose(a["px_xmax"] - a["px_xmin"], 12) and np.allclose(a["px_ymax"] - a["px_ymin"], 8)
    # boxes inside their image, windows inside and containing the box
    for r in a.itertuples():
        w, h = (200, 100) if r.image == "a.tif" else (100, 100)
        assert 0 <= r.px_xmin and r.px_xmax <= w and 0 <= r.px_ymin and r.px_ymax <= h
        assert r.win_col <= r.px_xmin and r.px_xmax <= r.win_col + r.win_w
        assert r.win_row <= r.px_ymin and r.px_ymax <= r.win_row + r.win_h
    c = random_windows(30, images, 64, np.random.default_rng(8), avoid=gt, box_px=(12, 8))
    assert not c.equals(a)


def test_random_windows_gt_per_image_and_impossible_placement_dropped() -> None:
    from hem_bootstrap.geo.windows import pixel_to_map_boxes

    full = shapely.box(*pixel_to_map_boxes(np.array([[0, 0, 100, 100]], dtype=np.float64), T)[0])
    gt = gpd.GeoDataFrame({"image": ["a.tif"], "label": [1]}, geometry=[full], crs=CRS)
    out = random_windows(
        10, [_meta("a.tif", 100, 100), _meta("b.tif", 100, 100)], 64, np.random.default_rng(1), gt
    )
    # a.tif is covered entirely: only b.tif boxes survive (same extent, but gt belongs to a.tif)
    assert len(out) >= 1 and set(out["image"]) == {"b.tif"}
    assert len(random_windows(0, [_meta("a.tif")], 64, np.random.default_rng(0))) == 0


def test_typical_box_px(fps: gpd.GeoDataFrame) -> None:
    assert typical_box_px(fps) == (10.0, 10.0)
    assert typical_box_px(fps.iloc[:0], default=20) == (20.0, 20.0)


def test_random_windows_mixed_crs_reprojected_to_first() -> None:
    images = [("a.tif", 100, 100, T, CRS), ("b.tif", 100, 100, T, "EPSG:32634")]
    out = random_windows(20, images, 64, np.random.default_rng(3), box_px=10)
    assert out.crs == CRS and set(out["image"]) == {"a.tif", "b.tif"}
    b = out[out["image"] == "b.tif"].iloc[0]
    # b's pixel box in its own CRS, reprojected: it must land on its stored polygon
    from hem_bootstrap.geo.windows import pixel_to_map_boxes

    own = shapely.box(*pixel_to_map_boxes(np.array([[b.px_xmin, b.px_ymin, b.px_xmax, b.px_ymax]]), T)[0])
    back = gpd.GeoSeries([own], crs="EPSG:32634").to_crs(CRS).iloc[0]
    assert back.equals_exact(b.geometry, 1e-6)


def test_none_strategy_mines_nothing() -> None:
    from hem_bootstrap.config import StrategySpec
    from hem_bootstrap.mining.strategies import build_strategy, strategy_label

    fps = gpd.GeoDataFrame({"image": ["a", "a"], "score": [0.9, 0.6]}, geometry=[shapely.box(0, 0, 1, 1), shapely.box(2, 2, 3, 3)])
    specs = [StrategySpec(name="none")]
    assert len(build_strategy(specs).select(fps, np.random.default_rng(0))) == 0
    assert strategy_label(specs) == "none"
