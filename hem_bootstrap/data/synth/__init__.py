"""Synthetic aerial ortho-scenes: vehicles plus labelled look-alike distractors, deterministic by seed.

A scene is laid out in metres (x to the right, y downwards from the top-left corner) on a road
grid turned by a random angle: parcels between the roads are parking lots (rows of stalls, some
at an angle to the grid), residential plots (gabled houses, lawns, trees), industrial yards (flat
roofs with roof units, containers, trailers) or parks (trees, bushes). Vehicles sit in stalls and
road lanes (aligned) and in yards and aisles (any angle); distractors are vehicle-like objects that
are *not* vehicles, rare on lots and common on roofs and yards, so a detector trained on the
scene makes the false positives hard-negative mining is meant to remove. ``distractor_similarity``
moves their size, colour and shape towards a car's.

Rendering is vectorised numpy: textures are value noise at a few scales, every object is painted
in its own small patch with anti-aliased signed-distance coverage, and large shadows are burnt in
with one ``rasterio.features.rasterize`` call. Every random draw comes from streams spawned from
``SceneSpec.seed``, so the same spec gives byte-identical pixels and identical geometries.

Files written by :func:`write_scene` (``name`` defaults to ``"scene"``):

* ``{name}.tif``: RGB uint8 GeoTIFF, 256 px tiles, deflate + predictor 2, no nodata.
* ``{name}_labels.gpkg``: layer ``labels``, one rotated-rectangle polygon per vehicle,
  columns ``id`` (int) and ``class`` (``"vehicle"``, or ``"car"`` / ``"van"`` with ``vehicle_classes``).
* ``{name}_distractors.gpkg``: layer ``distractors``, columns ``id`` and ``class`` (the kind:
  one of :data:`DISTRACTOR_KINDS`).
"""

from __future__ import annotations

import math
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.transform import Affine
from shapely.geometry import box

from hem_bootstrap.data.synth.layout import (
    _distractor_candidates,
    _frame,
    _make_sun,
    _plan_layout,
    _select,
    _tree_candidates,
    _vehicle_candidates,
)
from hem_bootstrap.data.synth.render import _render
from hem_bootstrap.data.synth.shapes import (
    CAR_LENGTH_M,
    CAR_WIDTH_M,
    DISTRACTOR_KINDS,
    MAX_SIZE,
    TILE_SIZE,
    SceneSpec,
    _box_polygons,
    _Thing,
)

__all__ = [
    "CAR_LENGTH_M", "CAR_WIDTH_M", "DISTRACTOR_KINDS", "SceneSpec", "lookalike_window_share", "make_scene", "write_scene",
]
from hem_bootstrap.errors import ConfigError
from hem_bootstrap.files import atomic_path

# ------------------------------------------------------------------------------------- public


def make_scene(spec: SceneSpec) -> tuple[np.ndarray, gpd.GeoDataFrame, gpd.GeoDataFrame, Affine]:
    """Generate a synthetic ortho-scene in memory.

    Args:
        spec: What to generate.

    Returns:
        ``(rgb, labels, distractors, transform)``: a uint8 array ``(3, size, size)``; vehicle
        footprints (columns ``id``, ``class``) and look-alike footprints (``id``, ``class`` = kind)
        as rotated-rectangle polygons in ``EPSG:spec.epsg`` map coordinates; the north-up
        raster transform with pixel size ``spec.gsd``.

    Raises:
        ConfigError: A spec field is out of range, or more vehicles/distractors were asked for
            than fit into the scene.
    """
    crs = _validate(spec)
    # a sixth stream for the look-alike share: the first five stay those of older scenes
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(6)]
    rng_layout, rng_vehicles, rng_distractors, rng_trees, rng_render, rng_share = streams
    extent = spec.size * spec.gsd
    sun = _make_sun(rng_layout)
    layout = _plan_layout(extent, rng_layout)
    _vehicle_candidates(layout, rng_vehicles)
    _distractor_candidates(layout, spec.distractor_similarity, rng_distractors)
    _tree_candidates(layout, rng_trees)

    scene_box = box(0.0, 0.0, extent, extent).buffer(-spec.gsd)
    vehicles = _select(layout.vehicle_cands, [], spec.n_vehicles, scene_box, "n_vehicles")
    distractors = _select(
        layout.distractor_cands,
        list(_box_polygons([v.box for v in vehicles], 0.15)),
        spec.n_distractors,
        scene_box,
        "n_distractors",
    )
    if spec.lookalike_share is not None:
        distractors = _in_share_of_windows(distractors, spec, rng_share)
    fixed = list(_box_polygons([t.box for t in vehicles + distractors], 0.15))
    trees = _select(layout.tree_cands, fixed, None, box(-50, -50, extent + 50, extent + 50), "trees")

    rgb = _render(spec, layout, sun, vehicles, distractors, trees, rng_render)
    transform = Affine(spec.gsd, 0.0, spec.origin[0], 0.0, -spec.gsd, spec.origin[1])
    names = [v.variant if spec.vehicle_classes else "vehicle" for v in vehicles]
    labels = _frame([v.box for v in vehicles], names, spec, crs)
    dis = _frame([d.box for d in distractors], [d.kind for d in distractors], spec, crs)
    return rgb, labels, dis, transform


def write_scene(
    out_dir: str | Path, spec: SceneSpec, name: str = "scene", compress: str = "deflate"
) -> dict[str, Path]:
    """Generate a scene and write it as a GeoTIFF plus two GeoPackages.

    Files: ``{name}.tif`` (RGB uint8, tiled 256, deflate + predictor 2, no nodata),
    ``{name}_labels.gpkg`` (layer ``labels``) and ``{name}_distractors.gpkg`` (layer
    ``distractors``). Each is written under a temporary name and renamed, so a killed run
    never leaves a half-written file under the final name.

    Args:
        out_dir: Folder to write into (created if missing).
        spec: What to generate.
        name: Base name of the three files.
        compress: ``deflate`` (lossless, predictor 2) or ``jpeg`` (YCbCr, quality 90: about
            6x smaller, with the block artefacts of many real orthophotos).

    Returns:
        The written paths keyed ``"image"``, ``"labels"`` and ``"distractors"``.
    """
    if compress not in ("deflate", "jpeg"):
        raise ConfigError(f"compress {compress!r}: expected 'deflate' or 'jpeg'")
    if not name or any(ch in name for ch in "/\\"):
        raise ConfigError(f"name {name!r}: expected a plain file base name without path separators")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb, labels, dis, transform = make_scene(spec)
    paths = {
        "image": out / f"{name}.tif",
        "labels": out / f"{name}_labels.gpkg",
        "distractors": out / f"{name}_distractors.gpkg",
    }
    _write_tif(paths["image"], rgb, transform, spec.epsg, compress)
    _write_gpkg(paths["labels"], labels, "labels")
    _write_gpkg(paths["distractors"], dis, "distractors")
    return paths


def _in_share_of_windows(distractors: list[_Thing], spec: SceneSpec, rng: np.random.Generator) -> list[_Thing]:
    """The look-alikes whose centre lies in ``lookalike_share`` of the tile grid windows, drawn at random.

    Windows are drawn among those holding at least one look-alike; a share larger than the
    layout can fill is an error naming the most it can.
    """
    share = float(spec.lookalike_share or 0.0)
    side = TILE_SIZE * spec.gsd
    n_cols = n_rows = math.ceil(spec.size / TILE_SIZE)
    cells = np.array([int(d.box.cy // side) * n_cols + int(d.box.cx // side) for d in distractors], dtype=np.int64)
    occupied = np.unique(cells)
    want = round(share * n_cols * n_rows)
    if want > len(occupied):
        raise ConfigError(
            f"SceneSpec.lookalike_share={spec.lookalike_share}: this layout has look-alikes in only "
            f"{len(occupied)} of {n_cols * n_rows} windows ({len(occupied) / (n_cols * n_rows):.3f}); use a lower share"
        )
    keep = set(rng.choice(occupied, size=want, replace=False).tolist()) if want else set()
    return [d for d, c in zip(distractors, cells, strict=True) if int(c) in keep]


def lookalike_window_share(distractors: gpd.GeoDataFrame, transform: Affine, size: int) -> float:
    """Share of a scene's :data:`TILE_SIZE` grid windows that hold a look-alike's centre."""
    if len(distractors) == 0:
        return 0.0
    c = distractors.geometry.centroid
    cols = (c.x.to_numpy() - transform.c) / transform.a  # north-up scenes: no rotation terms
    rows = (c.y.to_numpy() - transform.f) / transform.e
    n = math.ceil(size / TILE_SIZE)
    cells = (np.floor(rows / TILE_SIZE) * n + np.floor(cols / TILE_SIZE)).astype(np.int64)
    return len(np.unique(cells)) / (n * n)


# ------------------------------------------------------------------------------------ checks


def _validate(spec: SceneSpec) -> CRS:
    """Check every field of the spec; return its CRS."""
    if not isinstance(spec.size, int) or not 64 <= spec.size <= MAX_SIZE:
        raise ConfigError(f"SceneSpec.size={spec.size!r}: expected an int in [64, {MAX_SIZE}]")
    if not spec.gsd > 0 or not math.isfinite(spec.gsd):
        raise ConfigError(f"SceneSpec.gsd={spec.gsd!r}: expected metres per pixel > 0")
    if not 0.0 <= spec.distractor_similarity <= 1.0:
        raise ConfigError(f"SceneSpec.distractor_similarity={spec.distractor_similarity!r}: expected 0..1")
    share = spec.lookalike_share
    if share is not None and (not isinstance(share, (int, float)) or not 0.0 <= share <= 1.0):
        raise ConfigError(f"SceneSpec.lookalike_share={share!r}: expected None or a share in [0, 1]")
    if share is not None and spec.n_distractors is not None:
        raise ConfigError("SceneSpec: set lookalike_share or n_distractors, not both")
    for key in ("n_vehicles", "n_distractors"):
        val = getattr(spec, key)
        if val is not None and (not isinstance(val, int) or val < 0):
            raise ConfigError(f"SceneSpec.{key}={val!r}: expected None or an int >= 0")
    try:
        crs = CRS.from_epsg(spec.epsg)
    except CRSError:
        raise ConfigError(f"SceneSpec.epsg={spec.epsg!r}: not a known EPSG code") from None
    if not crs.is_projected:
        raise ConfigError(f"SceneSpec.epsg={spec.epsg}: expected a projected CRS in metres (e.g. UTM)")
    return crs


# ------------------------------------------------------------------------------------ writing


def _write_tif(path: Path, rgb: np.ndarray, transform: Affine, epsg: int, compress: str = "deflate") -> None:
    """RGB uint8 GeoTIFF, tiled and compressed, written under a temporary name and renamed."""
    _, h, w = rgb.shape
    profile = {
        "driver": "GTiff",
        "width": w,
        "height": h,
        "count": 3,
        "dtype": "uint8",
        "crs": CRS.from_epsg(epsg),
        "transform": transform,
        "tiled": True,
        "blockxsize": TILE_SIZE,
        "blockysize": TILE_SIZE,
        "compress": "deflate",
        "predictor": 2,
        "photometric": "RGB",
        "nodata": None,
    }
    if compress == "jpeg":
        profile.update({"compress": "jpeg", "photometric": "YCbCr", "jpeg_quality": 90})
        profile.pop("predictor")
    with atomic_path(path, ".tif") as tmp, rasterio.open(tmp, "w", **profile) as dst:
        dst.write(rgb)


def _write_gpkg(path: Path, frame: gpd.GeoDataFrame, layer: str) -> None:
    """One-layer GeoPackage, written under a temporary name and renamed."""
    with atomic_path(path, ".gpkg") as tmp:
        frame.to_file(tmp, layer=layer, driver="GPKG", engine="pyogrio", geometry_type="Polygon")
