"""Synthetic ortho-scenes: determinism, georeferencing, written layers, look-alikes, bad specs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from rasterio.features import rasterize
from shapely import STRtree

from hem_bootstrap.data.synth import (
    CAR_LENGTH_M,
    CAR_WIDTH_M,
    DISTRACTOR_KINDS,
    SceneSpec,
    lookalike_window_share,
    make_scene,
    write_scene,
)
from hem_bootstrap.errors import ConfigError, HemError

SPEC = SceneSpec(size=768, gsd=0.15, seed=2)
SAMPLES = Path(__file__).resolve().parents[1] / "data_samples"


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One small scene written to disk, shared by the read-back tests."""
    return write_scene(tmp_path_factory.mktemp("scene"), SPEC, name="s2")


def _side_lengths(poly: shapely.Polygon) -> tuple[float, float]:
    """Long and short side of a rectangle polygon."""
    xy = np.asarray(poly.exterior.coords)[:4]
    sides = np.hypot(*(np.roll(xy, -1, axis=0) - xy).T)
    return float(sides.max()), float(sides.min())


def _heading_deg(poly: shapely.Polygon) -> float:
    """Direction of the long side, modulo 180 degrees."""
    xy = np.asarray(poly.exterior.coords)[:4]
    edges = np.roll(xy, -1, axis=0) - xy
    e = edges[np.argmax(np.hypot(*edges.T))]
    return math.degrees(math.atan2(e[1], e[0])) % 180.0


# ------------------------------------------------------------------------------ determinism


def test_same_spec_gives_identical_pixels_and_geometries() -> None:
    rgb1, lab1, dis1, tr1 = make_scene(SPEC)
    rgb2, lab2, dis2, tr2 = make_scene(SceneSpec(size=768, gsd=0.15, seed=2))
    assert rgb1.dtype == np.uint8 and rgb1.shape == (3, 768, 768)
    assert rgb1.tobytes() == rgb2.tobytes()
    assert tr1 == tr2
    for a, b in ((lab1, lab2), (dis1, dis2)):
        assert len(a) == len(b) > 0
        assert list(a["class"]) == list(b["class"])
        assert shapely.equals_exact(a.geometry.values, b.geometry.values, tolerance=0.0).all()


def test_other_seed_gives_a_different_scene() -> None:
    rgb1, lab1, _, _ = make_scene(SPEC)
    rgb2, lab2, _, _ = make_scene(SceneSpec(size=768, gsd=0.15, seed=3))
    assert np.mean(rgb1 != rgb2) > 0.5
    assert len(lab1) != len(lab2) or not lab1.geometry.geom_equals(lab2.geometry).all()


def test_requested_counts_are_exact() -> None:
    _, lab, dis, _ = make_scene(SceneSpec(size=768, gsd=0.15, seed=2, n_vehicles=40, n_distractors=12))
    assert len(lab) == 40
    assert len(dis) == 12
    assert list(lab["id"]) == list(range(1, 41))


# ------------------------------------------------------------------------------ written files


def test_geotiff_georeferencing_round_trip(written: dict[str, Path]) -> None:
    rgb, _, _, transform = make_scene(SPEC)
    with rasterio.open(written["image"]) as ds:
        assert ds.crs.to_epsg() == 32633
        assert ds.res == pytest.approx((0.15, 0.15))
        assert (ds.transform.c, ds.transform.f) == SPEC.origin
        assert ds.transform == transform
        assert ds.count == 3 and ds.dtypes == ("uint8",) * 3
        assert ds.nodata is None
        assert ds.block_shapes[0] == (256, 256)
        assert ds.compression is not None and ds.compression.value.lower() == "deflate"
        assert ds.read().tobytes() == rgb.tobytes()


def test_geopackages_read_back_with_crs_and_columns(written: dict[str, Path]) -> None:
    lab = gpd.read_file(written["labels"], layer="labels")
    dis = gpd.read_file(written["distractors"], layer="distractors")
    for frame in (lab, dis):
        assert frame.crs is not None and frame.crs.to_epsg() == 32633
        assert {"id", "class", "geometry"} <= set(frame.columns)
        assert frame["id"].is_unique
        assert set(frame.geom_type) == {"Polygon"}
    assert set(lab["class"]) == {"vehicle"}
    assert set(dis["class"]) <= set(DISTRACTOR_KINDS)
    assert written["labels"].name == "s2_labels.gpkg" and written["distractors"].name == "s2_distractors.gpkg"


def test_labels_lie_inside_the_raster_and_stand_out_from_their_surroundings(written: dict[str, Path]) -> None:
    lab = gpd.read_file(written["labels"])
    with rasterio.open(written["image"]) as ds:
        bounds = shapely.box(*ds.bounds)
        assert shapely.contains(bounds, lab.geometry.values).all()
        img = ds.read().astype(np.float64)
        shape, transform = (ds.height, ds.width), ds.transform
    ids = lab["id"].to_numpy()
    inside = rasterize(
        zip(lab.geometry, ids, strict=True), out_shape=shape, transform=transform, fill=0, dtype="int32"
    )
    rings = [g.buffer(1.2).difference(g.buffer(0.3)) for g in lab.geometry]
    ring = rasterize(
        zip(rings, ids, strict=True), out_shape=shape, transform=transform, fill=0, dtype="int32"
    )
    # A ring pixel that falls on another vehicle (or its margin) is not "surroundings".
    near_any = rasterize(((g.buffer(0.3), 1) for g in lab.geometry), out_shape=shape, transform=transform)
    ring[near_any > 0] = 0
    n = int(ids.max()) + 1

    def means(zones: np.ndarray) -> np.ndarray:
        counts = np.bincount(zones.ravel(), minlength=n)
        sums = np.stack([np.bincount(zones.ravel(), weights=b.ravel(), minlength=n) for b in img], axis=1)
        return sums / np.maximum(counts, 1)[:, None]

    diff = np.abs(means(inside) - means(ring)).mean(axis=1)[ids]
    assert diff.mean() > 15.0
    assert np.median(diff) > 8.0


# ------------------------------------------------------------------------------ objects


def test_vehicles_have_car_footprints_at_many_orientations() -> None:
    geoms = [
        g for seed in (0, 1, 3) for g in make_scene(SceneSpec(size=1024, gsd=0.15, seed=seed))[1].geometry
    ]
    sides = np.array([_side_lengths(g) for g in geoms])
    assert sides[:, 0].min() >= CAR_LENGTH_M * 0.9 - 1e-6 and sides[:, 0].max() <= CAR_LENGTH_M * 1.1 + 1e-6
    assert sides[:, 1].min() >= CAR_WIDTH_M * 0.9 - 1e-6 and sides[:, 1].max() <= CAR_WIDTH_M * 1.1 + 1e-6
    bins = np.bincount((np.array([_heading_deg(g) for g in geoms]) // 15).astype(int), minlength=12)
    assert (bins > 0).sum() >= 9


def test_distractors_exist_and_never_overlap_vehicles_or_each_other() -> None:
    _, lab, dis, _ = make_scene(SPEC)
    assert len(dis) > 0
    tree = STRtree(lab.geometry.values)
    assert tree.query(dis.geometry.values, predicate="intersects").size == 0
    pairs = tree.query(lab.geometry.values, predicate="intersects")
    assert (pairs[0] == pairs[1]).all()  # each vehicle touches only itself
    pairs = STRtree(dis.geometry.values).query(dis.geometry.values, predicate="intersects")
    assert (pairs[0] == pairs[1]).all()


def test_similarity_moves_distractor_sizes_towards_a_car() -> None:
    car_area = CAR_LENGTH_M * CAR_WIDTH_M
    spread = {}
    for sim in (0.0, 1.0):
        _, _, dis, _ = make_scene(SceneSpec(size=1024, gsd=0.15, seed=4, distractor_similarity=sim))
        assert len(dis) > 5
        spread[sim] = float(np.median(np.abs(np.log(dis.geometry.area / car_area))))
    assert spread[1.0] < 0.15 < spread[0.0]


# ------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(
    "kwargs",
    [
        {"size": 10},
        {"gsd": 0.0},
        {"distractor_similarity": 1.5},
        {"n_vehicles": -1},
        {"epsg": 4326},
        {"epsg": 999999},
    ],
)
def test_bad_spec_raises_a_one_line_config_error(kwargs: dict) -> None:
    with pytest.raises(ConfigError) as err:
        make_scene(SceneSpec(**{"size": 256, **kwargs}))
    assert "\n" not in str(err.value) and "SceneSpec." in str(err.value)


def test_more_vehicles_than_fit_is_an_error() -> None:
    with pytest.raises(ConfigError, match="n_vehicles=100000"):
        make_scene(SceneSpec(size=256, gsd=0.15, n_vehicles=100000))


def test_write_scene_rejects_a_name_with_a_path(tmp_path: Path) -> None:
    with pytest.raises(HemError, match="name"):
        write_scene(tmp_path, SceneSpec(size=128), name="a/b")


# ------------------------------------------------------------------------------ bundled samples


@pytest.mark.parametrize("name", ["train", "pool", "test"])
def test_bundled_samples_are_readable(name: str) -> None:
    tif = SAMPLES / f"{name}.tif"
    if not tif.exists():
        pytest.skip("data_samples/ not generated")
    with rasterio.open(tif) as ds:
        assert ds.crs.to_epsg() == 32633 and ds.count == 3
        bounds = shapely.box(*ds.bounds)
    lab = gpd.read_file(SAMPLES / f"{name}_labels.gpkg", layer="labels")
    dis = gpd.read_file(SAMPLES / f"{name}_distractors.gpkg", layer="distractors")
    assert len(lab) > 0 and len(dis) > 0
    assert shapely.contains(bounds, lab.geometry.values).all()


def test_lookalike_share_sets_density_apart_from_the_layout() -> None:
    """The share of 256 px windows holding look-alikes is what was asked; the layout and vehicles stay."""
    base = SceneSpec(size=1024, gsd=0.15, seed=4)
    rgb0, lab0, dis0, tr = make_scene(base)
    full = lookalike_window_share(dis0, tr, base.size)
    assert full > 0.25
    for share in (1 / 16, 3 / 16):
        _, lab, dis, _ = make_scene(dataclasses.replace(base, lookalike_share=share))
        assert lookalike_window_share(dis, tr, base.size) == pytest.approx(share)
        assert set(dis.geometry.to_wkb()) <= set(dis0.geometry.to_wkb())  # a subset of the default look-alikes
        assert len(lab) == len(lab0)
    _, _, none, _ = make_scene(dataclasses.replace(base, lookalike_share=0.0))
    assert len(none) == 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [({"lookalike_share": 1.5}, "lookalike_share=1.5"), ({"lookalike_share": 0.99}, "look-alikes in only"),
     ({"lookalike_share": 0.1, "n_distractors": 3}, "not both")],
)
def test_lookalike_share_errors_name_the_field(changes: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        make_scene(dataclasses.replace(SceneSpec(size=1024, gsd=0.15, seed=4), **changes))
