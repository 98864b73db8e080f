"""Fuzzing the input edges: config trees and text, label files, tiling parameters.

Only the documented errors may escape: ``ConfigError`` from ``load_config``, a ``HemError`` from
``load_labels``, ``ValueError`` from ``tile_windows`` for impossible parameters. Example counts
are bounded so the file runs in well under a minute.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
import yaml
from affine import Affine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hem_bootstrap.config import DataConfig, ExperimentConfig, load_config
from hem_bootstrap.errors import ConfigError, HemError
from hem_bootstrap.geo.labels import load_labels
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.geo.windows import tile_windows


def fuzz(n: int) -> settings:
    """Bounded examples, no deadline (file I/O), tmp_path reused across examples on purpose."""
    return settings(max_examples=n, deadline=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# ------------------------------------------------------------------------- config

SECTIONS = list(ExperimentConfig.model_fields)
FIELDS = sorted({f for s in SECTIONS for f in ExperimentConfig.model_fields[s].annotation.model_fields})  # type: ignore[union-attr]
KEYS = st.sampled_from(SECTIONS + FIELDS + ["name", "images", "labels", "k", "threshold"]) | st.text(max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
TREES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS, inner, max_size=5),
    max_leaves=20,
)
# trees shaped like a config: known sections holding known or unknown keys
CONFIG_LIKE = st.dictionaries(
    st.sampled_from(SECTIONS), st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=6), TREES, max_size=4),
    max_size=4,
)


def _load(tmp: Path, text: str, overrides: list[str] | None = None) -> None:
    path = tmp / "fuzz.yaml"
    path.write_text(text)
    try:
        load_config(path, overrides)
    except ConfigError as err:
        assert "\n" not in str(err), str(err)


@fuzz(150)
@given(tree=CONFIG_LIKE | TREES)
def test_random_config_trees(tree: Any, tmp_path: Path) -> None:
    _load(tmp_path, yaml.safe_dump(tree, allow_unicode=True))


@fuzz(100)
@given(text=st.text(alphabet=st.sampled_from(list("abc:-[]{}'\"\n\t &*!|>%@`#,.0123456789")), max_size=60))
def test_random_yaml_text(text: str, tmp_path: Path) -> None:
    _load(tmp_path, text)


@fuzz(100)
@given(overrides=st.lists(st.text(alphabet=st.sampled_from(list("train.stepsiling=0123[]{}:-,'\" ")), max_size=24),
                          max_size=3))
def test_random_overrides(overrides: list[str], tmp_path: Path) -> None:
    _load(tmp_path, "{}\n", overrides)


# ------------------------------------------------------------------------- labels

ORIGIN = (500_000.0, 5_000_000.0)


@pytest.fixture(scope="module")
def raster_info(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path = tmp_path_factory.mktemp("fuzz_raster") / "r.tif"
    with rasterio.open(
        path, "w", driver="GTiff", width=64, height=64, count=3, dtype="uint8", crs="EPSG:32633",
        transform=Affine(0.5, 0, ORIGIN[0], 0, -0.5, ORIGIN[1]),
    ) as dst:
        dst.write(np.zeros((3, 64, 64), np.uint8))
    return open_raster(path)


COORD = st.floats(min_value=-1e3, max_value=1e3) | st.sampled_from([1e15, -1e15, 1e30, 0.0])


@st.composite
def geometry(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["box", "point", "line", "bowtie", "empty", "multi", "huge"]))
    x, y = ORIGIN[0] + draw(COORD), ORIGIN[1] - draw(COORD)
    w, h = draw(st.floats(min_value=0, max_value=50)), draw(st.floats(min_value=0, max_value=50))
    if kind == "box":
        return shapely.box(x, y, x + w, y + h)
    if kind == "point":
        return shapely.Point(x, y)
    if kind == "line":
        return shapely.LineString([(x, y), (x + w + 1, y + h)])
    if kind == "bowtie":  # self-intersecting, invalid
        return shapely.Polygon([(x, y), (x + w + 1, y + h + 1), (x + w + 1, y), (x, y + h + 1)])
    if kind == "empty":
        return shapely.Polygon()
    if kind == "multi":
        return shapely.MultiPolygon([shapely.box(x, y, x + 1, y + 1), shapely.box(x + 3, y, x + 4, y + 1)])
    return shapely.box(-1e12, -1e12, 1e12, 1e12)


CLASSES = st.sampled_from(["vehicle", "truck", "", "1"]) | st.none() | st.integers(0, 3)


@fuzz(60)
@given(
    geoms=st.lists(geometry(), max_size=6),
    classes=st.data(),
    crs=st.sampled_from(["EPSG:32633", "EPSG:4326", "EPSG:3857", None]),
    fmt=st.sampled_from(["gpkg", "geojson"]),
    class_column=st.booleans(),
)
def test_random_label_files(
    geoms: list[Any], classes: st.DataObject, crs: str | None, fmt: str, class_column: bool, raster_info: Any,
    tmp_path: Path,
) -> None:
    cols = {"class": [classes.draw(CLASSES) for _ in geoms]} if class_column else {"note": ["x"] * len(geoms)}
    frame = gpd.GeoDataFrame(cols, geometry=geoms, crs=crs)
    path = tmp_path / f"labels.{fmt}"
    if path.exists():
        path.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame.to_file(path)
    try:
        out = load_labels(path, raster_info, DataConfig())
    except HemError as err:
        assert "\n" not in str(err), str(err)
        return
    assert set(out["label"]) <= {1}
    assert out.geometry.is_valid.all()
    bounds = out.geometry.bounds.to_numpy()
    assert np.isfinite(bounds).all()


def test_label_file_that_is_not_a_vector(raster_info: Any, tmp_path: Path) -> None:
    path = tmp_path / "labels.gpkg"
    path.write_bytes(b"SQLite format 3\x00" + bytes(range(256)) * 4)
    with pytest.raises(HemError, match="labels.gpkg: not a readable vector file"):
        load_labels(path, raster_info, DataConfig())


# ------------------------------------------------------------------------- windows


@settings(max_examples=400, deadline=None)
@given(
    width=st.integers(-2, 3000),
    height=st.integers(-2, 3000),
    tile=st.integers(-2, 600),
    overlap=st.integers(-2, 600),
)
def test_tile_windows_invariants(width: int, height: int, tile: int, overlap: int) -> None:
    if tile <= 0 or not 0 <= overlap < tile or width <= 0 or height <= 0:
        with pytest.raises(ValueError):
            tile_windows(width, height, tile, overlap)
        return
    wins = tile_windows(width, height, tile, overlap)
    cover = np.zeros((min(height, 3000), min(width, 3000)), bool)
    for w in wins:
        assert w.width == w.height == tile
        assert w.valid_width == min(width, tile) and w.valid_height == min(height, tile)
        assert 0 <= w.col_off and 0 <= w.row_off
        assert w.col_off + w.valid_width <= width and w.row_off + w.valid_height <= height
        cover[w.row_off : w.row_off + w.valid_height, w.col_off : w.col_off + w.valid_width] = True
    assert cover.all()
    cols = sorted({w.col_off for w in wins})
    stride = tile - overlap
    expected = 1 if width <= tile else math.ceil((width - overlap) / stride)
    assert len(cols) == expected
    assert all(b - a <= stride for a, b in zip(cols, cols[1:], strict=False))  # neighbours share >= overlap
    assert len(wins) == len(cols) * len({w.row_off for w in wins})
