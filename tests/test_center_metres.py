"""Centre matching in metres: ``center_dist_m`` means metres on lon/lat rasters too, not degrees.

Detections are placed with pyproj's WGS84 geodesic (``Geod.fwd``), independent of the
code under test, on a real EPSG:4326 GeoTIFF at latitude 60° with 1e-5° pixels (about
0.56 m x 1.1 m); a UTM raster must give exactly the results of the unscaled default.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import shapely
from affine import Affine
from pyproj import Geod

from hem_bootstrap.config import EvaluateConfig, MiningConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.evaluate import EvalImage, evaluate
from hem_bootstrap.geo.raster import RasterInfo, open_raster
from hem_bootstrap.mining.matching import match_detections
from hem_bootstrap.scoring.match import greedy_match

GEOD = Geod(ellps="WGS84")
LON0, LAT0 = 10.0, 60.0
"""Centre of the lon/lat raster (and of its first labelled object)."""
RES_DEG = 1e-5
SIZE_PX = 64
HALF_M = 2.0
"""Half the side of every box, in metres."""
CENTER = MiningConfig(matching="center", center_dist_m=2.0)
UTM_X0, UTM_Y0 = 500_000.0, 5_000_000.0


@pytest.fixture
def lonlat_info(make_raster: Callable[..., Path]) -> RasterInfo:
    """A 64 x 64 EPSG:4326 GeoTIFF centred on (10°E, 60°N), read back through ``open_raster``."""
    top_left = (LON0 - SIZE_PX / 2 * RES_DEG, LAT0 + SIZE_PX / 2 * RES_DEG)
    transform = Affine(RES_DEG, 0.0, top_left[0], 0.0, -RES_DEG, top_left[1])
    path = make_raster(
        "lonlat.tif", width=SIZE_PX, height=SIZE_PX, count=1, crs="EPSG:4326", transform=transform
    )
    return open_raster(path)


def moved(lon: float, lat: float, east_m: float = 0.0, north_m: float = 0.0) -> tuple[float, float]:
    """The point ``east_m`` east and ``north_m`` north of (lon, lat), on the WGS84 ellipsoid."""
    if east_m:
        lon, lat, _ = GEOD.fwd(lon, lat, 90.0 if east_m > 0 else 270.0, abs(east_m))
    if north_m:
        lon, lat, _ = GEOD.fwd(lon, lat, 0.0 if north_m > 0 else 180.0, abs(north_m))
    return lon, lat


def lonlat_box(lon: float, lat: float) -> shapely.Polygon:
    """A box of side ``2 * HALF_M`` metres centred on (lon, lat)."""
    x0, _ = moved(lon, lat, east_m=-HALF_M)
    x1, _ = moved(lon, lat, east_m=HALF_M)
    _, y0 = moved(lon, lat, north_m=-HALF_M)
    _, y1 = moved(lon, lat, north_m=HALF_M)
    return shapely.box(x0, y0, x1, y1)


def frame(geoms: list[shapely.Polygon], crs: str, scores: list[float] | None = None) -> gpd.GeoDataFrame:
    """Detections (with ``scores``) or, without them, ground truth of class 1."""
    n = len(geoms)
    cols: dict[str, object] = {"label": [1] * n}
    if scores is None:
        cols["class"] = ["vehicle"] * n
    else:
        cols.update({"image": ["a.tif"] * n, "score": scores})
    return gpd.GeoDataFrame(cols, geometry=geoms, crs=crs)


# ------------------------------------------------------------------------ RasterInfo


def test_metres_per_unit_of_lonlat_raster_matches_the_geodesic(lonlat_info: RasterInfo) -> None:
    mx, my = lonlat_info.metres_per_unit()
    step = 1e-4  # degrees; the ellipsoid's local metres per degree, within the approximation's 0.5 %
    east = GEOD.inv(LON0, LAT0, LON0 + step, LAT0)[2] / step
    north = GEOD.inv(LON0, LAT0, LON0, LAT0 + step)[2] / step
    assert mx == pytest.approx(east, rel=5e-3) and my == pytest.approx(north, rel=5e-3)
    assert mx == pytest.approx(my / 2, rel=1e-3)  # cos(60°) = 0.5: a degree of longitude is half as long
    px, py = lonlat_info.pixel_size_m()
    assert (px, py) == pytest.approx((RES_DEG * mx, RES_DEG * my))


@pytest.mark.filterwarnings("ignore::rasterio.errors.NotGeoreferencedWarning")
def test_metres_per_unit_of_projected_and_plain_rasters(make_raster: Callable[..., Path]) -> None:
    assert open_raster(make_raster("utm.tif", width=32, height=32)).metres_per_unit() == (1.0, 1.0)
    feet = open_raster(
        make_raster("ft.tif", width=32, height=32, crs="EPSG:2263", transform=Affine(1, 0, 1e6, 0, -1, 2e5))
    )
    assert feet.metres_per_unit() == pytest.approx((0.3048006, 0.3048006))
    assert open_raster(make_raster("plain.tif", width=32, height=32, crs=None)).metres_per_unit() == (
        1.0,
        1.0,
    )


# -------------------------------------------------------------------------- mining


def test_mining_center_matching_is_in_metres_on_lonlat(lonlat_info: RasterInfo) -> None:
    gt = frame([lonlat_box(LON0, LAT0)], "EPSG:4326")
    offsets = [
        (1.5, 0.0),  # 1.5 m east: tp
        (0.0, 1.5),  # 1.5 m north: tp
        (3.0, 0.0),  # 3 m east: between d and 2d -> ignore (6 m if x used the latitude's metres)
        (0.0, 3.0),  # 3 m north: ignore (1.5 m, a tp, if y used the longitude's metres)
        (10.0, 0.0),  # 10 m east: fp
    ]
    geoms = [lonlat_box(*moved(LON0, LAT0, e, n)) for e, n in offsets]
    geoms.append(lonlat_box(LON0 + 0.5, LAT0))  # 0.5 degree east (~28 km): a tp if read as degrees
    dets = frame(geoms, "EPSG:4326", [0.9] * len(geoms))
    out = match_detections(dets, gt, CENTER, metres_per_unit=lonlat_info.metres_per_unit())
    assert out["status"].tolist() == ["tp", "tp", "ignore", "ignore", "fp", "fp"]
    assert out["gt_index"].tolist() == [0, 0, 0, 0, -1, -1]
    # read as degrees (the unscaled default), every one of them would be within 2 "metres"
    assert set(match_detections(dets, gt, CENTER)["status"]) == {"tp"}


def test_mining_on_utm_raster_is_unchanged(make_raster: Callable[..., Path]) -> None:
    info = open_raster(make_raster("utm.tif", width=32, height=32))
    gt = frame([shapely.box(UTM_X0, UTM_Y0, UTM_X0 + 4, UTM_Y0 + 4)], "EPSG:32633")
    rows = [(2, 0, 6, 4), (4, 0, 8, 4), (4.5, 0, 8.5, 4), (1, 1, 3, 3), (0, 1.5, 4, 5.5)]
    geoms = [shapely.box(UTM_X0 + a, UTM_Y0 + b, UTM_X0 + c, UTM_Y0 + d) for a, b, c, d in rows]
    dets = frame(geoms, "EPSG:32633", [0.9] * len(geoms))
    scaled = match_detections(dets, gt, CENTER, metres_per_unit=info.metres_per_unit())
    pd.testing.assert_frame_equal(scaled, match_detections(dets, gt, CENTER))
    assert scaled["status"].tolist() == ["tp", "ignore", "fp", "tp", "tp"]


@pytest.mark.parametrize("bad", [(0.0, 1.0), (1.0, -2.0), (float("nan"), 1.0), (1.0,)])
def test_bad_metres_per_unit_is_a_data_error(bad: tuple[float, ...]) -> None:
    gt = frame([lonlat_box(LON0, LAT0)], "EPSG:4326")
    dets = frame([lonlat_box(LON0, LAT0)], "EPSG:4326", [0.9])
    with pytest.raises(DataError, match=r"match_detections: metres_per_unit = .*expected two"):
        match_detections(dets, gt, CENTER, metres_per_unit=bad)  # type: ignore[arg-type]
    img = EvalImage(image="a.tif", gt=gt, area_km2=1.0, metres_per_unit=bad)  # type: ignore[arg-type]
    with pytest.raises(DataError, match=r"evaluate: image a.tif: metres_per_unit = .*expected two"):
        evaluate(dets, [img], EvaluateConfig(), matching="center", center_dist=2.0)


# ---------------------------------------------------------------------- evaluation


def test_evaluate_center_matching_is_in_metres_on_lonlat(lonlat_info: RasterInfo) -> None:
    centres = [(LON0, LAT0), moved(LON0, LAT0, north_m=100.0), moved(LON0, LAT0, north_m=200.0)]
    gt = frame([lonlat_box(*c) for c in centres], "EPSG:4326")
    dets = frame(
        [
            lonlat_box(*moved(*centres[0], east_m=1.5)),  # 1.5 m: tp
            lonlat_box(*moved(*centres[1], east_m=10.0)),  # 10 m: fp
            lonlat_box(centres[2][0] + 0.5, centres[2][1]),  # 0.5 degree: fp (a tp if read as degrees)
        ],
        "EPSG:4326",
        [0.9, 0.8, 0.7],
    )
    mpu = lonlat_info.metres_per_unit()
    img = EvalImage(image="a.tif", gt=gt, area_km2=lonlat_info.area_km2(), metres_per_unit=mpu)
    m = evaluate(dets, [img], EvaluateConfig(), matching="center", center_dist=2.0)
    assert (m["tp"], m["fp"], m["fn"]) == (1, 2, 2)
    assert m["ap50"] == pytest.approx(1 / 3)  # recall 1/3 at precision 1, then only FPs
    as_degrees = evaluate(
        dets,
        [EvalImage(image="a.tif", gt=gt, area_km2=1.0)],
        EvaluateConfig(),
        matching="center",
        center_dist=2.0,
    )
    assert as_degrees["tp"] == 3  # the bug this guards against


def test_evaluate_ignore_zone_keeps_only_detections_within_metres(lonlat_info: RasterInfo) -> None:
    gt = frame([lonlat_box(LON0, LAT0)], "EPSG:4326")
    zone = gpd.GeoDataFrame(
        geometry=[shapely.box(LON0 - 0.01, LAT0 - 0.01, LON0 + 0.01, LAT0 + 0.01)], crs="EPSG:4326"
    )
    dets = frame(
        [lonlat_box(*moved(LON0, LAT0, east_m=1.5)), lonlat_box(*moved(LON0, LAT0, east_m=10.0))],
        "EPSG:4326",
        [0.9, 0.8],
    )
    img = EvalImage(
        image="a.tif", gt=gt, area_km2=1.0, ignore=zone, metres_per_unit=lonlat_info.metres_per_unit()
    )
    m = evaluate(dets, [img], EvaluateConfig(), matching="center", center_dist=2.0)
    # the 10 m one cannot be a TP, so inside the zone it is not counted; the 1.5 m one is the TP
    assert (m["tp"], m["fp"], m["n_ignored"]) == (1, 0, 1)


def test_greedy_match_groups_in_the_scaled_space() -> None:
    """Centres 6 feet (1.83 m) apart match at 2 m: reach squares too must be in metres, not feet."""
    ft = (0.3048, 0.3048)
    gt = np.array([[0.0, 0.0, 4.0, 4.0]])
    dets = np.array([[6.0, 0.0, 10.0, 4.0], [107.0, 0.0, 111.0, 4.0], [100.0, 0.0, 104.0, 4.0]])
    gt2 = np.r_[gt, [[100.0, 0.0, 104.0, 4.0]]]
    scores, labels = np.array([0.9, 0.8, 0.7]), np.ones(3, dtype=np.int64)
    # det 0: 6 ft from gt 0 -> tp; det 1: 7 ft (2.13 m) from gt 1 -> not; det 2 on gt 1 -> tp
    tp = greedy_match(dets, scores, labels, gt2, np.ones(2, dtype=np.int64), 2.0, "center", ft)
    assert tp.tolist() == [True, False, True]
    assert greedy_match(dets, scores, labels, gt2, np.ones(2, dtype=np.int64), 2.0, "center").tolist() == [
        False,
        False,
        True,
    ]


def test_evaluate_on_utm_raster_is_unchanged(make_raster: Callable[..., Path]) -> None:
    info = open_raster(make_raster("utm.tif", width=32, height=32))
    gt = frame(
        [
            shapely.box(UTM_X0 + 10, UTM_Y0 + 10, UTM_X0 + 14, UTM_Y0 + 14),
            shapely.box(UTM_X0 + 50, UTM_Y0 + 50, UTM_X0 + 54, UTM_Y0 + 54),
        ],
        "EPSG:32633",
    )
    rows = [(11, 9.5, 16, 14.5), (52.5, 52.5, 54.5, 54.5), (12, 12, 14, 14)]
    dets = frame(
        [shapely.box(UTM_X0 + a, UTM_Y0 + b, UTM_X0 + c, UTM_Y0 + d) for a, b, c, d in rows],
        "EPSG:32633",
        [0.9, 0.8, 0.7],
    )
    before = evaluate(
        dets, [EvalImage("a.tif", gt, 0.01)], EvaluateConfig(), matching="center", center_dist=2.0
    )
    after = evaluate(
        dets,
        [EvalImage("a.tif", gt, 0.01, metres_per_unit=info.metres_per_unit())],
        EvaluateConfig(),
        matching="center",
        center_dist=2.0,
    )
    assert after == before
    assert (after["tp"], after["fp"], after["fn"]) == (1, 2, 1)
