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
  columns ``id`` (int) and ``class`` (``"vehicle"``).
* ``{name}_distractors.gpkg``: layer ``distractors``, columns ``id`` and ``class`` (the kind:
  one of :data:`DISTRACTOR_KINDS`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import geopandas as gpd
import numpy as np
import rasterio
import shapely
from rasterio.crs import CRS
from rasterio.errors import CRSError
from rasterio.features import rasterize
from rasterio.transform import Affine
from shapely import STRtree
from shapely.geometry import LineString, Point, Polygon, box

from hem_bootstrap.errors import ConfigError
from hem_bootstrap.files import atomic_path

CAR_LENGTH_M = 4.5
"""Nominal vehicle length in metres (each vehicle is jittered by +-10 %)."""
CAR_WIDTH_M = 1.9
"""Nominal vehicle width in metres (each vehicle is jittered by +-10 %)."""
MAX_SIZE = 8192
"""Largest scene side in pixels: a scene is rendered in memory, about 100 bytes per pixel at peak
(1.7 GB for 4096 x 4096). Bigger rasters: tile several scenes (see scripts/bench_inference.py)."""
DISTRACTOR_KINDS: tuple[str, ...] = ("roof_unit", "container", "shadow", "bush", "boat", "trailer")
"""Values of the ``class`` column of the distractors layer."""
TILE_SIZE = 256
"""GeoTIFF block size in pixels."""

_RNG = np.random.Generator
_F32 = np.float32
_GLASS = np.array([30.0, 34.0, 42.0], dtype=_F32)
_SHADOW_TINT = np.array([0.42, 0.45, 0.55], dtype=_F32)

_CAR_COLOURS = np.array(
    [
        [226, 226, 222],  # white
        [26, 27, 30],  # black
        [92, 94, 98],  # grey
        [166, 168, 171],  # silver
        [36, 60, 118],  # blue
        [148, 28, 26],  # red
        [30, 68, 44],  # dark green
        [188, 172, 138],  # beige
        [205, 175, 40],  # yellow
        [92, 62, 42],  # brown
    ],
    dtype=_F32,
)
_CAR_COLOUR_P = np.array([0.25, 0.20, 0.16, 0.15, 0.08, 0.08, 0.03, 0.03, 0.01, 0.01])

_KIND_COLOURS: dict[str, np.ndarray] = {
    "roof_unit": np.array([[176, 178, 180], [206, 207, 205], [128, 130, 132], [150, 146, 138]], dtype=_F32),
    "container": np.array(
        [[142, 62, 42], [42, 72, 130], [52, 100, 62], [200, 112, 42], [122, 122, 120], [205, 205, 200]],
        dtype=_F32,
    ),
    "shadow": np.array([[0, 0, 0]], dtype=_F32),
    "bush": np.array([[52, 76, 36], [64, 88, 40], [44, 66, 34]], dtype=_F32),
    "boat": np.array([[232, 232, 228], [210, 215, 222], [40, 62, 110]], dtype=_F32),
    "trailer": np.array([[140, 140, 138], [205, 205, 200], [120, 92, 62]], dtype=_F32),
}
# (length range m, width range m, height m, corner radius m); a bush's width follows its length.
_KIND_SHAPE: dict[str, tuple[tuple[float, float], tuple[float, float], float, float]] = {
    "roof_unit": ((0.8, 2.6), (0.7, 1.6), 0.9, 0.05),
    "container": ((6.0, 12.2), (2.44, 2.44), 2.6, 0.05),
    "shadow": ((2.5, 8.0), (1.0, 3.5), 0.0, 0.4),
    "bush": ((1.2, 3.5), (1.0, 1.0), 1.2, 0.0),
    "boat": ((5.0, 9.0), (1.8, 3.0), 1.3, 0.0),
    "trailer": ((2.4, 4.0), (1.4, 2.0), 1.1, 0.08),
}


@dataclass
class SceneSpec:
    """What to generate: raster size and pixel size, seed, object counts and look-alike difficulty.

    Attributes:
        size: Raster width = height in pixels.
        gsd: Metres per pixel.
        seed: Random seed; the same spec gives byte-identical pixels and identical geometries.
        n_vehicles: Number of vehicles; None for a density-based default (stall occupancy,
            traffic, parked cars in yards).
        n_distractors: Number of look-alikes; None for a density-based default.
        distractor_similarity: 0..1, how closely look-alikes resemble vehicles in size, colour
            and shape; at 1.0 some are car-sized, car-coloured boxes with a shadow.
        epsg: Projected CRS of the raster and the vector layers.
        origin: Map x of the left edge and map y of the top edge.
    """

    size: int = 4096
    gsd: float = 0.125
    seed: int = 7
    n_vehicles: int | None = None
    n_distractors: int | None = None
    distractor_similarity: float = 0.7
    epsg: int = 32633
    origin: tuple[float, float] = (500000.0, 5400000.0)


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class _Box:
    """A rotated rectangle in scene metres; ``angle`` is the direction of the length axis."""

    cx: float
    cy: float
    length: float
    width: float
    angle: float

    def corners(self, pad: float = 0.0) -> np.ndarray:
        """The four corners (4, 2), the rectangle grown by ``pad`` on every side."""
        ca, sa = math.cos(self.angle), math.sin(self.angle)
        hl, hw = self.length / 2 + pad, self.width / 2 + pad
        u = np.array([ca, sa]) * hl
        v = np.array([-sa, ca]) * hw
        c = np.array([self.cx, self.cy])
        return np.stack([c + u + v, c - u + v, c - u - v, c + u - v])

    def polygon(self, pad: float = 0.0) -> Polygon:
        """The rectangle as a shapely polygon (scene metres)."""
        return Polygon(self.corners(pad))


def _box_corners(boxes: Sequence[_Box], pad: float = 0.0) -> np.ndarray:
    """Corners (N, 4, 2) of many boxes at once, each grown by ``pad``."""
    arr = np.array([(b.cx, b.cy, b.length, b.width, b.angle) for b in boxes], dtype=float).reshape(-1, 5)
    ca, sa = np.cos(arr[:, 4]), np.sin(arr[:, 4])
    hl, hw = arr[:, 2] / 2 + pad, arr[:, 3] / 2 + pad
    u = np.stack([ca * hl, sa * hl], axis=1)
    v = np.stack([-sa * hw, ca * hw], axis=1)
    c = arr[:, :2]
    return np.stack([c + u + v, c - u + v, c - u - v, c + u - v], axis=1)


def _box_polygons(boxes: Sequence[_Box], pad: float = 0.0) -> np.ndarray:
    """Shapely polygons (N,) of many boxes at once (scene metres)."""
    if not boxes:
        return np.empty(0, dtype=object)
    return shapely.polygons(_box_corners(boxes, pad))


@dataclass
class _Thing:
    """A placed object: vehicle, distractor or tree (``box`` is the crown's square for a tree)."""

    box: _Box
    kind: str
    colour: np.ndarray
    height: float
    variant: str = ""
    radius: float = 0.0
    dark_band: bool = False
    corner: float = 0.35
    score: float = 0.0


@dataclass
class _Road:
    """A straight road of the grid: along ``axis`` ("u" or "v") at ``offset`` metres from the centre."""

    axis: str
    offset: float
    width: float


@dataclass
class _Lot:
    """An asphalt parking lot with rows of stalls in its own frame (``row_angle``)."""

    area: _Box
    row_angle: float
    rows: list[float]
    stall_width: float
    stall_depth: float
    stall_angle: float


@dataclass
class _Building:
    """A building footprint with its roof style, colour and height (for its shadow)."""

    box: _Box
    roof: str
    colour: np.ndarray
    height: float


@dataclass
class _Layout:
    """Everything that is placed before objects: roads, parcels, lots, buildings and object regions."""

    extent: float
    theta: float
    roads: list[_Road] = field(default_factory=list)
    surfaces: list[tuple[_Box, str]] = field(default_factory=list)
    lots: list[_Lot] = field(default_factory=list)
    buildings: list[_Building] = field(default_factory=list)
    vehicle_cands: list[_Thing] = field(default_factory=list)
    distractor_cands: list[_Thing] = field(default_factory=list)
    tree_cands: list[_Thing] = field(default_factory=list)
    regions: list[_Region] = field(default_factory=list)


@dataclass(frozen=True)
class _Sun:
    """Direction shadows fall in (unit vector, scene metres) and shadow length per metre of height."""

    dx: float
    dy: float
    per_m: float

    def offset(self, height: float) -> tuple[float, float]:
        """Shadow displacement of a point ``height`` metres above the ground."""
        return self.dx * height * self.per_m, self.dy * height * self.per_m


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
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(5)]
    rng_layout, rng_vehicles, rng_distractors, rng_trees, rng_render = streams
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
    fixed = list(_box_polygons([t.box for t in vehicles + distractors], 0.15))
    trees = _select(layout.tree_cands, fixed, None, box(-50, -50, extent + 50, extent + 50), "trees")

    rgb = _render(spec, layout, sun, vehicles, distractors, trees, rng_render)
    transform = Affine(spec.gsd, 0.0, spec.origin[0], 0.0, -spec.gsd, spec.origin[1])
    labels = _frame([v.box for v in vehicles], ["vehicle"] * len(vehicles), spec, crs)
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


# ------------------------------------------------------------------------------------ checks


def _validate(spec: SceneSpec) -> CRS:
    """Check every field of the spec; return its CRS."""
    if not isinstance(spec.size, int) or not 64 <= spec.size <= MAX_SIZE:
        raise ConfigError(f"SceneSpec.size={spec.size!r}: expected an int in [64, {MAX_SIZE}]")
    if not spec.gsd > 0 or not math.isfinite(spec.gsd):
        raise ConfigError(f"SceneSpec.gsd={spec.gsd!r}: expected metres per pixel > 0")
    if not 0.0 <= spec.distractor_similarity <= 1.0:
        raise ConfigError(f"SceneSpec.distractor_similarity={spec.distractor_similarity!r}: expected 0..1")
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


# ------------------------------------------------------------------------------------ layout


def _make_sun(rng: _RNG) -> _Sun:
    """Random shadow direction and sun elevation between 35 and 60 degrees."""
    az = rng.uniform(0, 2 * math.pi)
    elev = math.radians(rng.uniform(35, 60))
    return _Sun(math.cos(az), math.sin(az), 1.0 / math.tan(elev))


def _grid_positions(rng: _RNG, reach: float) -> list[float]:
    """Road offsets from the scene centre, 65-115 m apart, covering [-reach, reach]."""
    out, pos = [], -reach + rng.uniform(0, 60)
    while pos < reach:
        out.append(pos)
        pos += rng.uniform(65, 115)
    return out


def _plan_layout(extent: float, rng: _RNG) -> _Layout:
    """Lay out the road grid, classify the parcels between roads and fill each one."""
    theta = rng.uniform(0, math.pi / 2)
    lay = _Layout(extent=extent, theta=theta)
    reach = extent * math.sqrt(0.5) + 60
    for axis in ("u", "v"):
        for off in _grid_positions(rng, reach):
            lay.roads.append(
                _Road(axis, off, float(rng.choice([7.0, 8.0, 9.0, 13.0], p=[0.3, 0.3, 0.25, 0.15])))
            )
    us = sorted((r for r in lay.roads if r.axis == "u"), key=lambda r: r.offset)
    vs = sorted((r for r in lay.roads if r.axis == "v"), key=lambda r: r.offset)
    scene = box(0, 0, extent, extent)
    fillers: dict[str, Callable[[_Layout, _Box, _RNG], None]] = {
        "lot": _fill_lot,
        "residential": _fill_residential,
        "industrial": _fill_industrial,
        "park": _fill_park,
    }
    kinds = list(fillers)
    for a, b in zip(us, us[1:], strict=False):
        for c, d in zip(vs, vs[1:], strict=False):
            # A "u" road runs along u at a fixed v offset, so it bounds parcels in v; and vice versa.
            v0, v1 = a.offset + a.width / 2 + 3.0, b.offset - b.width / 2 - 3.0
            u0, u1 = c.offset + c.width / 2 + 3.0, d.offset - d.width / 2 - 3.0
            parcel = _grid_box(extent, theta, (u0 + u1) / 2, (v0 + v1) / 2, u1 - u0, v1 - v0)
            kind = str(rng.choice(kinds, p=[0.25, 0.33, 0.17, 0.25]))
            if u1 - u0 < 20 or v1 - v0 < 20 or not parcel.polygon().intersects(scene):
                continue
            fillers[kind](lay, parcel, rng)
    return lay


def _grid_box(extent: float, theta: float, u: float, v: float, du: float, dv: float) -> _Box:
    """A box given in the grid frame (u along ``theta``, v across it, origin at the scene centre)."""
    c = extent / 2
    ca, sa = math.cos(theta), math.sin(theta)
    return _Box(c + u * ca - v * sa, c + u * sa + v * ca, du, dv, theta)


def _sub_box(parent: _Box, da: float, db: float, length: float, width: float, turn: float = 0.0) -> _Box:
    """A box at offset (da along, db across) in ``parent``'s frame, turned by ``turn``."""
    ca, sa = math.cos(parent.angle), math.sin(parent.angle)
    return _Box(
        parent.cx + da * ca - db * sa, parent.cy + da * sa + db * ca, length, width, parent.angle + turn
    )


def _fill_lot(lay: _Layout, parcel: _Box, rng: _RNG) -> None:
    """A parking lot: rows of stalls along the parcel, across it, or at a random angle."""
    area = _sub_box(parcel, 0, 0, parcel.length - 2, parcel.width - 2)
    roll = rng.uniform()
    turn = 0.0 if roll < 0.35 else (math.pi / 2 if roll < 0.65 else rng.uniform(0, math.pi))
    stall_angle = math.pi / 2 if rng.uniform() < 0.7 else math.radians(rng.uniform(55, 70))
    depth = 5.2 if stall_angle > 1.5 else 5.6
    reach = 0.5 * math.hypot(area.length, area.width)
    rows, t, k = [], -reach + rng.uniform(0, 6), 0
    while t + depth <= reach:
        rows.append(t)
        t += depth + (6.5 if k % 2 == 0 else 0.0)
        k += 1
    lot = _Lot(area, area.angle + turn, rows, 2.6, depth, stall_angle)
    lay.lots.append(lot)
    lay.surfaces.append((area, "asphalt"))


def _fill_residential(lay: _Layout, parcel: _Box, rng: _RNG) -> None:
    """Houses (mostly gabled) on a grid of plots, with lawns around them."""
    n_a = max(1, int(parcel.length // 28))
    n_b = max(1, int(parcel.width // 28))
    pa, pb = parcel.length / n_a, parcel.width / n_b
    lay.surfaces.append((parcel, "lawn"))
    for i in range(n_a):
        for j in range(n_b):
            if rng.uniform() < 0.15 or min(pa, pb) < 16:
                continue
            # Footprint measured along the parcel's axes, then possibly turned a quarter.
            dim_a, dim_b = rng.uniform(8, min(17, pa - 7)), rng.uniform(8, min(12, pb - 7))
            da = -parcel.length / 2 + pa * (i + 0.5) + rng.uniform(-1, 1) * (pa - dim_a - 6) / 2
            db = -parcel.width / 2 + pb * (j + 0.5) + rng.uniform(-1, 1) * (pb - dim_b - 6) / 2
            turn = math.pi / 2 if rng.uniform() < 0.4 else 0.0
            length, width = (dim_b, dim_a) if turn else (dim_a, dim_b)
            gabled = rng.uniform() < 0.75
            colour = _pick(rng, _ROOF_GABLED if gabled else _ROOF_FLAT)
            b = _sub_box(parcel, da, db, length, width, turn)
            lay.buildings.append(_Building(b, "gabled" if gabled else "flat", colour, rng.uniform(6, 9)))
    _add_region(lay, parcel, "residential")


def _fill_industrial(lay: _Layout, parcel: _Box, rng: _RNG) -> None:
    """One or two large flat-roofed halls on a concrete or gravel yard."""
    lay.surfaces.append((parcel, str(rng.choice(["concrete", "gravel"]))))
    n = 1 if parcel.length < 70 or rng.uniform() < 0.5 else 2
    for k in range(n):
        seg = parcel.length / n
        length = rng.uniform(0.45, 0.75) * seg
        width = rng.uniform(0.4, 0.65) * parcel.width
        da = -parcel.length / 2 + seg * (k + 0.5)
        db = rng.uniform(-1, 1) * (parcel.width - width - 8) / 2
        b = _sub_box(parcel, da, db, length, width)
        lay.buildings.append(_Building(b, "flat", _pick(rng, _ROOF_FLAT), rng.uniform(8, 14)))
    _add_region(lay, parcel, "industrial")


def _fill_park(lay: _Layout, parcel: _Box, rng: _RNG) -> None:
    """Grass with trees and bushes."""
    lay.surfaces.append((parcel, "park"))
    _add_region(lay, parcel, "park")


_ROOF_FLAT = np.array(
    [[182, 182, 180], [98, 98, 95], [218, 218, 212], [62, 62, 64], [150, 140, 128]], dtype=_F32
)
_ROOF_GABLED = np.array(
    [[152, 72, 52], [88, 58, 46], [72, 74, 80], [138, 54, 46], [110, 100, 92]], dtype=_F32
)


def _pick(rng: _RNG, palette: np.ndarray, p: np.ndarray | None = None) -> np.ndarray:
    """A palette colour with a little brightness and hue jitter."""
    c = palette[rng.choice(len(palette), p=p)]
    return np.clip(c * rng.uniform(0.92, 1.08) + rng.normal(0, 4, 3), 0, 255).astype(_F32)


# ---------------------------------------------------------------------------------- candidates


@dataclass
class _Region:
    """Free ground of a parcel (a polygon) and what may be placed there."""

    poly: object
    kind: str
    angle: float


def _add_region(lay: _Layout, parcel: _Box, kind: str) -> None:
    """Register the parcel's yard (minus buildings) as a region for objects."""
    poly = parcel.polygon(-1.5)
    for b in lay.buildings:
        poly = poly.difference(b.box.polygon(1.5))
    lay.regions.append(_Region(poly, kind, parcel.angle))


def _sample_in(poly: object, n: int, rng: _RNG, inset: float) -> np.ndarray:
    """Up to ``n`` uniform points (n, 2) inside ``poly`` shrunk by ``inset`` metres."""
    inner = shapely.buffer(poly, -inset)
    if inner.is_empty or n <= 0:
        return np.zeros((0, 2))
    x0, y0, x1, y1 = inner.bounds
    pts = rng.uniform([x0, y0], [x1, y1], size=(n * 4 + 8, 2))
    keep = shapely.contains_xy(inner, pts[:, 0], pts[:, 1])
    return pts[keep][:n]


def _vehicle(rng: _RNG, cx: float, cy: float, angle: float, p: float) -> _Thing:
    """A car or van with a realistic colour at a position; ``p`` is its default chance of presence."""
    length = CAR_LENGTH_M * rng.uniform(0.9, 1.1)
    width = CAR_WIDTH_M * rng.uniform(0.9, 1.1)
    variant = "van" if rng.uniform() < 0.12 else "car"
    colour = _pick(rng, _CAR_COLOURS, _CAR_COLOUR_P)
    score = rng.uniform() / max(p, 1e-9)
    return _Thing(_Box(cx, cy, length, width, angle), "vehicle", colour, 1.5, variant, score=score)


def _vehicle_candidates(lay: _Layout, rng: _RNG) -> None:
    """Every place a vehicle may stand: stalls, road lanes, lot aisles and yards."""
    cands = lay.vehicle_cands
    for lot in lay.lots:
        occupancy = rng.uniform(0.35, 0.9)
        poly = lot.area.polygon(-0.3)
        reach = 0.5 * math.hypot(lot.area.length, lot.area.width)
        frame = _Box(lot.area.cx, lot.area.cy, 1, 1, lot.row_angle)
        pitch = lot.stall_width / math.sin(lot.stall_angle)
        for k, t in enumerate(lot.rows):
            mid = t + lot.stall_depth / 2
            heading = lot.stall_angle if k % 2 == 0 else -lot.stall_angle
            stalls = []
            for j in range(-int(reach / pitch) - 1, int(reach / pitch) + 1):
                flip = math.pi if rng.uniform() < 0.5 else 0.0
                c = _sub_box(frame, (j + 0.5) * pitch, mid, 1, 1)
                stalls.append(
                    _vehicle(rng, c.cx, c.cy, lot.row_angle + heading + flip + rng.normal(0, 0.04), occupancy)
                )
            fits = shapely.contains(poly, _box_polygons([v.box for v in stalls]))
            cands.extend(v for v, ok in zip(stalls, fits, strict=True) if ok)
        for xy in _sample_in(poly, 8, rng, 3.0):  # manoeuvring in the aisles, any angle
            cands.append(_vehicle(rng, xy[0], xy[1], rng.uniform(0, 2 * math.pi), 0.35))
    _road_vehicle_candidates(lay, rng)
    for reg in lay.regions:
        n, p = {"residential": (6, 0.4), "industrial": (12, 0.4), "park": (2, 0.15)}[reg.kind]
        for xy in _sample_in(reg.poly, n, rng, 3.0):
            ang = (
                reg.angle + rng.choice([0, math.pi / 2, math.pi])
                if rng.uniform() < 0.5
                else rng.uniform(0, 6.3)
            )
            cands.append(_vehicle(rng, xy[0], xy[1], float(ang), p))


def _road_vehicle_candidates(lay: _Layout, rng: _RNG) -> None:
    """Slots every 6.5 m in every lane, right-hand traffic, about one car in twelve occupied."""
    reach = lay.extent * math.sqrt(0.5) + 10
    scene = box(0, 0, lay.extent, lay.extent)
    for road in lay.roads:
        lanes = 4 if road.width >= 12 else 2
        for i in range(lanes):
            off = road.width * ((i + 0.5) / lanes - 0.5)
            forward = off > 0
            for s in np.arange(-reach, reach, 6.5):
                if road.axis == "v":  # runs along v at u = offset
                    b = _grid_box(lay.extent, lay.theta, road.offset + off, s, 1, 1)
                    ang = lay.theta + (math.pi / 2 if forward else -math.pi / 2)
                else:
                    b = _grid_box(lay.extent, lay.theta, s, road.offset - off, 1, 1)
                    ang = lay.theta + (0.0 if forward else math.pi)
                if scene.contains(Point(b.cx, b.cy)):
                    lay.vehicle_cands.append(_vehicle(rng, b.cx, b.cy, ang + rng.normal(0, 0.03), 0.08))


def _distractor(rng: _RNG, kind: str, cx: float, cy: float, angle: float, sim: float, p: float) -> _Thing:
    """A look-alike of ``kind`` whose size, colour and shape move towards a car's as ``sim`` grows."""
    (l0, l1), (w0, w1), height, corner = _KIND_SHAPE[kind]
    length = rng.uniform(l0, l1)
    width = length * rng.uniform(0.75, 1.0) if kind == "bush" else rng.uniform(w0, w1)
    car_l, car_w = CAR_LENGTH_M * rng.uniform(0.9, 1.1), CAR_WIDTH_M * rng.uniform(0.9, 1.1)
    length = (1 - sim) * length + sim * car_l
    width = (1 - sim) * width + sim * car_w
    if rng.uniform() < 0.8 * sim and kind != "shadow":
        colour = _pick(rng, _CAR_COLOURS, _CAR_COLOUR_P)
    else:
        colour = _pick(rng, _KIND_COLOURS[kind])
    height = (1 - sim) * height + sim * 1.5 if kind != "shadow" else 0.0
    dark_band = kind in ("trailer", "container", "boat", "roof_unit") and rng.uniform() < 0.4 * sim * sim
    score = rng.uniform() / max(p, 1e-9)
    corner = (1 - sim) * corner + sim * 0.35
    box_ = _Box(cx, cy, length, width, angle)
    return _Thing(box_, kind, colour, height, dark_band=dark_band, corner=corner, score=score)


_REGION_KINDS: dict[str, tuple[int, float, list[str], list[float]]] = {
    # region kind: (candidates, default presence, kinds, kind weights)
    "residential": (
        24,
        0.5,
        ["bush", "trailer", "boat", "shadow", "container"],
        [0.5, 0.2, 0.12, 0.13, 0.05],
    ),
    "industrial": (
        40,
        0.45,
        ["container", "trailer", "shadow", "boat", "bush"],
        [0.55, 0.2, 0.15, 0.05, 0.05],
    ),
    "park": (30, 0.5, ["bush", "shadow", "boat", "trailer"], [0.75, 0.12, 0.08, 0.05]),
}


def _distractor_candidates(lay: _Layout, sim: float, rng: _RNG) -> None:
    """Look-alikes: many on roofs and in yards and parks, a few in parking lot aisles."""
    cands = lay.distractor_cands
    for b in lay.buildings:
        flat = b.roof == "flat"
        n = int(np.clip(b.box.length * b.box.width / 40, 4, 40)) if flat else 3
        poly = b.box.polygon(-1.2)
        for xy in _sample_in(poly, n, rng, 1.5):
            ang = b.box.angle + (
                rng.choice([0, math.pi / 2]) if rng.uniform() < 0.85 else rng.uniform(0, 3.2)
            )
            cands.append(_distractor(rng, "roof_unit", xy[0], xy[1], float(ang), sim, 0.55 if flat else 0.4))
    for reg in lay.regions:
        n, p, kinds, w = _REGION_KINDS[reg.kind]
        n = max(1, int(n * shapely.area(reg.poly) / 5000))
        for xy in _sample_in(reg.poly, n, rng, 3.0):
            kind = str(rng.choice(kinds, p=w))
            ang = reg.angle + rng.choice([0, math.pi / 2]) if rng.uniform() < 0.5 else rng.uniform(0, 6.3)
            cands.append(_distractor(rng, kind, xy[0], xy[1], float(ang), sim, p))
    for lot in lay.lots:
        for xy in _sample_in(lot.area.polygon(), 3, rng, 3.0):
            kind = str(rng.choice(["shadow", "trailer"]))
            cands.append(_distractor(rng, kind, xy[0], xy[1], rng.uniform(0, 6.3), sim, 0.12))


def _tree_candidates(lay: _Layout, rng: _RNG) -> None:
    """Round crowns: dense in parks, scattered in gardens, rare in industrial yards."""
    per_m2 = {"park": 1 / 90, "residential": 1 / 260, "industrial": 1 / 2000}
    for reg in lay.regions:
        n = int(shapely.area(reg.poly) * per_m2[reg.kind])
        for xy in _sample_in(reg.poly, n, rng, 2.0):
            r = rng.uniform(2.2, 5.0)
            colour = np.array([rng.uniform(38, 62), rng.uniform(66, 92), rng.uniform(30, 44)], dtype=_F32)
            t = _Thing(_Box(xy[0], xy[1], 2 * r, 2 * r, 0.0), "tree", colour, rng.uniform(5, 12), radius=r)
            t.score = rng.uniform()
            lay.tree_cands.append(t)


def _select(
    cands: list[_Thing], fixed: Sequence[Polygon], n: int | None, bounds: Polygon, what: str
) -> list[_Thing]:
    """Greedy non-overlapping subset in score order: all with score < 1 by default, else exactly ``n``.

    Candidates touching ``fixed`` polygons or not inside ``bounds`` are dropped. Trees are tested
    as circles, everything else as its rectangle grown by 0.15 m.
    """
    if not cands:
        if n:
            raise ConfigError(f"SceneSpec.{what}={n}: no room for any in this scene; use a larger size")
        return []
    boxes = [t.box for t in cands]
    if cands[0].kind == "tree":
        centres = shapely.points(np.array([(b.cx, b.cy) for b in boxes]))
        geoms = shapely.buffer(centres, np.array([t.radius for t in cands]), quad_segs=4)
    else:
        geoms = _box_polygons(boxes, 0.15)
    inside = shapely.contains(bounds, _box_polygons(boxes))
    order = np.argsort(np.array([t.score for t in cands]), kind="stable")
    n_fixed = len(fixed)
    taken = np.zeros(n_fixed + len(cands), dtype=bool)
    taken[:n_fixed] = True
    tree = STRtree(np.concatenate([np.array(fixed, dtype=object), geoms]))
    out: list[_Thing] = []
    for i in order:
        if not inside[i]:
            continue
        if n is None and cands[i].score >= 1.0:
            break
        if n is not None and len(out) >= n:
            break
        hits = tree.query(geoms[i], predicate="intersects")
        if taken[hits].any():
            continue
        taken[n_fixed + i] = True
        out.append(cands[i])
    if n is not None and len(out) < n:
        raise ConfigError(
            f"SceneSpec.{what}={n}: only {len(out)} fit in this scene; use fewer or a larger size"
        )
    return out


def _frame(boxes: list[_Box], classes: list[str], spec: SceneSpec, crs: CRS) -> gpd.GeoDataFrame:
    """Footprints in map coordinates with ``id`` and ``class`` columns."""
    corners = _box_corners(boxes)
    corners[..., 0] += spec.origin[0]
    corners[..., 1] = spec.origin[1] - corners[..., 1]
    geoms = shapely.polygons(corners) if len(boxes) else []
    return gpd.GeoDataFrame(
        {"id": np.arange(1, len(boxes) + 1, dtype=np.int64), "class": classes}, geometry=list(geoms), crs=crs
    )


# ---------------------------------------------------------------------------------- rendering


class _Canvas:
    """The float image being painted, its pixel size and shared texture fields."""

    def __init__(self, size: int, gsd: float, rng: _RNG) -> None:
        self.size = size
        self.gsd = gsd
        self.img = np.empty((3, size, size), dtype=_F32)
        self.tex_mid = _value_noise(rng, size, 3.0 / gsd)
        self.tex_fine = _value_noise(rng, size, max(0.5 / gsd, 1.5))

    def frame(
        self, cx: float, cy: float, angle: float, radius: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray] | None:
        """Pixel patch around a point and its local coordinates in metres (a along ``angle``, b across)."""
        g, n = self.gsd, self.size
        c0, c1 = max(int((cx - radius) / g), 0), min(int((cx + radius) / g) + 2, n)
        r0, r1 = max(int((cy - radius) / g), 0), min(int((cy + radius) / g) + 2, n)
        if c0 >= c1 or r0 >= r1:
            return None
        xs = ((np.arange(c0, c1, dtype=_F32) + 0.5) * g - cx)[None, :]
        ys = ((np.arange(r0, r1, dtype=_F32) + 0.5) * g - cy)[:, None]
        ca, sa = _F32(math.cos(angle)), _F32(math.sin(angle))
        return (slice(r0, r1), slice(c0, c1)), xs * ca + ys * sa, ys * ca - xs * sa

    def soft(self, inside_m: np.ndarray) -> np.ndarray:
        """Anti-aliased coverage from a signed distance (metres, positive inside)."""
        return np.clip(inside_m * _F32(1.0 / self.gsd) + _F32(0.5), 0.0, 1.0)

    def paint(
        self, sl: tuple[slice, slice], cov: np.ndarray, colour: np.ndarray, mod: np.ndarray | None = None
    ) -> None:
        """Blend ``colour`` over the patch with coverage ``cov``.

        ``colour`` is (3,) (optionally times a texture ``mod`` (h, w)) or (3, h, w). Works one
        channel at a time so that full-scene paints never build (3, H, W) temporaries.
        """
        for ch in range(3):
            band = self.img[ch, sl[0], sl[1]]
            if colour.ndim == 3:
                tmp = colour[ch] - band
            elif mod is not None:
                tmp = mod * _F32(colour[ch])
                tmp -= band
            else:
                tmp = _F32(colour[ch]) - band
            tmp *= cov
            band += tmp

    def darken(self, sl: tuple[slice, slice], cov: np.ndarray, tint: np.ndarray = _SHADOW_TINT) -> None:
        """Multiply the patch towards ``tint`` (a shadow) with coverage ``cov``."""
        patch = self.img[:, sl[0], sl[1]]
        patch *= 1.0 - cov[None] * (1.0 - tint.reshape(3, 1, 1))


def _value_noise(rng: _RNG, size: int, cell_px: float) -> np.ndarray:
    """Smooth zero-mean noise (size, size) with features about ``cell_px`` pixels wide."""
    n = int(size / cell_px) + 3
    grid = rng.standard_normal((n, n)).astype(_F32)
    t = (np.arange(size, dtype=_F32) + _F32(0.5)) / _F32(cell_px)
    i = t.astype(np.intp)
    f = t - i.astype(_F32)
    f = f * f * (_F32(3) - _F32(2) * f)
    # Columns first on the small grid, then rows: gathering along axis 0 keeps the result C-ordered.
    cols = grid[:, i] * (1 - f)[None, :] + grid[:, i + 1] * f[None, :]
    out = cols[i] * (1 - f)[:, None]
    out += cols[i + 1] * f[:, None]
    out *= _F32(1.4)
    return out


def _rrect(cv: _Canvas, a: np.ndarray, b: np.ndarray, hl: float, hw: float, r: float) -> np.ndarray:
    """Coverage of a rounded rectangle with half sizes ``hl`` x ``hw`` and corner radius ``r``."""
    r = min(r, hl, hw)
    qa = np.abs(a) - _F32(hl - r)
    qb = np.abs(b) - _F32(hw - r)
    out = np.hypot(np.maximum(qa, 0), np.maximum(qb, 0)) + np.minimum(np.maximum(qa, qb), 0)
    return cv.soft(_F32(r) - out)


def _render(
    spec: SceneSpec,
    lay: _Layout,
    sun: _Sun,
    vehicles: list[_Thing],
    distractors: list[_Thing],
    trees: list[_Thing],
    rng: _RNG,
) -> np.ndarray:
    """Paint the scene bottom-up: ground, surfaces, roads, objects, shadows, roofs, trees."""
    cv = _Canvas(spec.size, spec.gsd, rng)
    _paint_ground(cv, rng)
    for area, kind in lay.surfaces:
        _paint_surface(cv, area, kind, rng)
    for lot in lay.lots:
        _paint_lot_markings(cv, lot)
    _paint_roads(cv, lay)
    ground = [d for d in distractors if d.kind != "roof_unit"]
    for t in vehicles + ground:
        if t.height > 0:
            _drop_shadow(cv, t, sun)
    for v in vehicles:
        _paint_vehicle(cv, v)
    for d in ground:
        _paint_distractor(cv, d, sun)
    _paint_big_shadows(cv, lay, trees, sun)
    for b in lay.buildings:
        _paint_building(cv, b, sun)
    for d in distractors:
        if d.kind == "roof_unit":
            _drop_shadow(cv, d, sun)
            _paint_distractor(cv, d, sun)
    for t in trees:
        _paint_tree(cv, t, sun)
    return _finish(cv, rng)


def _paint_ground(cv: _Canvas, rng: _RNG) -> None:
    """Grass, dry grass and bare soil mixed by large-scale noise, textured at two finer scales."""
    low = _value_noise(rng, cv.size, 45.0 / cv.gsd)
    soil = np.clip(_value_noise(rng, cv.size, 15.0 / cv.gsd) - _F32(0.6), 0, 1)
    dry = np.clip(low * _F32(0.6) + _F32(0.35), 0, 1)
    mod = 1 + _F32(0.07) * cv.tex_mid + _F32(0.06) * cv.tex_fine
    grass, dry_c, soil_c = (
        np.array(c, dtype=_F32) * rng.uniform(0.93, 1.07)
        for c in ([76, 104, 50], [138, 132, 92], [128, 108, 82])
    )
    for ch in range(3):
        band = cv.img[ch]
        np.multiply(dry, dry_c[ch] - grass[ch], out=band)
        band += grass[ch]
        band += soil * (soil_c[ch] - band)
        band *= mod


_SURFACE: dict[str, tuple[tuple[float, float, float], float, float]] = {
    # surface: (colour, mid-scale texture, fine texture); "lawn"/"park" tint the ground instead.
    "asphalt": ((84, 86, 88), 0.05, 0.05),
    "concrete": ((162, 160, 152), 0.06, 0.05),
    "gravel": ((138, 128, 112), 0.07, 0.12),
}


def _paint_surface(cv: _Canvas, area: _Box, kind: str, rng: _RNG) -> None:
    """Fill a parcel: asphalt, concrete or gravel, or tint its ground greener for lawns and parks."""
    fr = cv.frame(area.cx, area.cy, area.angle, 0.5 * math.hypot(area.length, area.width) + 1)
    if fr is None:
        return
    sl, a, b = fr
    cov = _rrect(cv, a, b, area.length / 2, area.width / 2, 0.5)
    if kind in ("lawn", "park"):
        tint = np.array([0.92, 1.06, 0.9] if kind == "park" else [0.97, 1.03, 0.95], dtype=_F32)
        patch = cv.img[:, sl[0], sl[1]]
        patch *= 1 + cov[None] * (tint.reshape(3, 1, 1) - 1)
        return
    colour, k_mid, k_fine = _SURFACE[kind]
    col = np.array(colour, dtype=_F32) * rng.uniform(0.9, 1.1)
    mod = 1 + k_mid * cv.tex_mid[sl] + k_fine * cv.tex_fine[sl]
    cv.paint(sl, cov, col, mod)


def _paint_lot_markings(cv: _Canvas, lot: _Lot) -> None:
    """White stall separators in each row, clipped to the lot."""
    area = lot.area
    fr = cv.frame(area.cx, area.cy, lot.row_angle, 0.5 * math.hypot(area.length, area.width) + 1)
    if fr is None:
        return
    sl, a, c = fr
    inside = np.zeros_like(a)
    pitch = lot.stall_width / math.sin(lot.stall_angle)
    cot = 1.0 / math.tan(lot.stall_angle)
    for k, t in enumerate(lot.rows):
        in_row = cv.soft(np.minimum(c - _F32(t), _F32(t + lot.stall_depth) - c))
        # Separators pass through multiples of the pitch on the row's centre line, tilted like the stalls.
        sign = 1.0 if k % 2 == 0 else -1.0
        shifted = a - _F32(sign * cot) * (c - _F32(t + lot.stall_depth / 2))
        phase = np.abs(np.mod(shifted, _F32(pitch)) - _F32(pitch / 2))
        line = cv.soft(_F32(0.06) - (_F32(pitch / 2) - phase))
        np.maximum(inside, in_row * line, out=inside)
    fa = lot.area
    fr2 = cv.frame(fa.cx, fa.cy, fa.angle, 0.5 * math.hypot(fa.length, fa.width) + 1)
    assert fr2 is not None
    _, a2, b2 = fr2
    inside *= _rrect(cv, a2, b2, fa.length / 2 - 0.5, fa.width / 2 - 0.5, 0.5)
    cv.paint(sl, inside * _F32(0.85), np.array([222, 222, 215], dtype=_F32))


def _paint_roads(cv: _Canvas, lay: _Layout) -> None:
    """Sidewalks, asphalt and lane markings of the whole grid, each axis at once via nearest road."""
    g = cv.gsd
    coords = (np.arange(cv.size, dtype=_F32) + 0.5) * _F32(g) - _F32(lay.extent / 2)
    ca, sa = _F32(math.cos(lay.theta)), _F32(math.sin(lay.theta))
    u = coords[None, :] * ca + coords[:, None] * sa
    v = coords[:, None] * ca - coords[None, :] * sa
    covers: dict[str, np.ndarray] = {}
    marks: dict[str, np.ndarray] = {}
    for axis, across, along in (("v", u, v), ("u", v, u)):
        roads = sorted((r for r in lay.roads if r.axis == axis), key=lambda r: r.offset)
        d, half = _nearest_road(across, roads)
        dist = np.abs(d)
        covers[axis + "_walk"] = cv.soft(half + _F32(2.0) - dist)
        covers[axis] = cv.soft(half - dist)
        phase = along * _F32(1 / 9.0)
        phase -= np.floor(phase)
        centre = cv.soft(_F32(0.07) - dist) * (phase < _F32(0.5))
        edge = cv.soft(_F32(0.07) - np.abs(dist - (half - _F32(0.4))))
        marks[axis] = np.maximum(centre, edge)
        del d, half, dist
    full = (slice(0, cv.size), slice(0, cv.size))
    walk = np.maximum(covers["u_walk"], covers["v_walk"])
    walk *= _F32(0.9)
    cv.paint(full, walk, np.array([172, 170, 164], dtype=_F32), 1 + _F32(0.04) * cv.tex_fine)
    road = np.maximum(covers["u"], covers["v"])
    mod = 1 + _F32(0.07) * cv.tex_mid
    mod += _F32(0.05) * cv.tex_fine
    cv.paint(full, road, np.array([72, 74, 77], dtype=_F32), mod)
    # Markings of one axis stop where the other axis' road (and sidewalk) crosses.
    mark = marks["u"] * (1 - covers["v_walk"])
    np.maximum(mark, marks["v"] * (1 - covers["u_walk"]), out=mark)
    mark *= _F32(0.9)
    cv.paint(full, mark, np.array([225, 225, 218], dtype=_F32))


def _nearest_road(across: np.ndarray, roads: list[_Road]) -> tuple[np.ndarray, np.ndarray]:
    """Signed distance of every pixel to its nearest road centre line, and that road's half width."""
    best = across - _F32(roads[0].offset)
    half = np.full_like(across, roads[0].width / 2)
    for r in roads[1:]:
        d = across - _F32(r.offset)
        closer = np.abs(d) < np.abs(best)
        np.copyto(best, d, where=closer)
        np.copyto(half, _F32(r.width / 2), where=closer)
    return best, half


def _drop_shadow(cv: _Canvas, t: _Thing, sun: _Sun) -> None:
    """The shadow of a box of height ``t.height``, swept from its base to its top."""
    b = t.box
    ox, oy = sun.offset(t.height)
    fr = cv.frame(
        b.cx + ox / 2, b.cy + oy / 2, b.angle, 0.5 * math.hypot(b.length, b.width) + math.hypot(ox, oy)
    )
    if fr is None:
        return
    sl, a, bb = fr
    ca, sa = math.cos(b.angle), math.sin(b.angle)
    cov = np.zeros_like(a)
    r = 0.4 if t.kind == "bush" else 0.3
    for k in (0.0, 0.5, 1.0):
        # Offset of the shadow's centre (from base to top) relative to the patch centre, in the box frame.
        dx, dy = (k - 0.5) * ox, (k - 0.5) * oy
        da, db = dx * ca + dy * sa, -dx * sa + dy * ca
        np.maximum(cov, _rrect(cv, a - _F32(da), bb - _F32(db), b.length / 2, b.width / 2, r), out=cov)
    cv.darken(sl, cov * _F32(0.85))


def _paint_vehicle(cv: _Canvas, v: _Thing) -> None:
    """A car or van from above: rounded body, shaded sides, windscreen, rear and side windows."""
    b = v.box
    fr = cv.frame(b.cx, b.cy, b.angle, 0.5 * math.hypot(b.length, b.width) + 0.5)
    if fr is None:
        return
    sl, a, bb = fr
    hl, hw = b.length / 2, b.width / 2
    body = _rrect(cv, a, bb, hl, hw, 0.35)
    an, bn = a * _F32(1 / hl), np.abs(bb) * _F32(1 / hw)
    if v.variant == "van":
        front, back, rear = (0.52, 0.68), (-0.92, 0.5), None
    else:
        front, back, rear = (0.10, 0.36), (-0.46, 0.08), (-0.68, -0.5)
    ws = (
        cv.soft((an - _F32(front[0])) * _F32(hl))
        * cv.soft((_F32(front[1]) - an) * _F32(hl))
        * cv.soft((_F32(0.74) + _F32(0.5) * (an - _F32(front[0])) - bn) * _F32(hw))
    )
    side = (
        cv.soft((an - _F32(back[0])) * _F32(hl))
        * cv.soft((_F32(back[1]) - an) * _F32(hl))
        * cv.soft(np.minimum(bn - _F32(0.72), _F32(0.88) - bn) * _F32(hw))
    )
    glass = np.maximum(ws, side * _F32(0.8))
    if rear is not None:
        rw = (
            cv.soft((an - _F32(rear[0])) * _F32(hl))
            * cv.soft((_F32(rear[1]) - an) * _F32(hl))
            * cv.soft((_F32(0.7) - bn) * _F32(hw))
        )
        glass = np.maximum(glass, rw * _F32(0.9))
    roof = cv.soft((an - _F32(back[0])) * _F32(hl)) * cv.soft((_F32(front[0]) - an) * _F32(hl))
    shade = _F32(1) - _F32(0.25) * bn * bn + _F32(0.06) * roof
    col = v.colour.reshape(3, 1, 1) * shade[None]
    col += glass[None] * (_GLASS.reshape(3, 1, 1) - col)
    cv.paint(sl, body, col)


def _paint_distractor(cv: _Canvas, d: _Thing, sun: _Sun) -> None:
    """Dispatch to the painter of the distractor's kind."""
    b = d.box
    fr = cv.frame(b.cx, b.cy, b.angle, 0.5 * math.hypot(b.length, b.width) + 1.5)
    if fr is None:
        return
    sl, a, bb = fr
    hl, hw = b.length / 2, b.width / 2
    if d.kind == "shadow":
        cov = _rrect(cv, a, bb, hl, hw, d.corner)
        cv.darken(sl, cov * _F32(0.8), np.array([0.3, 0.32, 0.38], dtype=_F32))
        return
    if d.kind == "bush":
        _paint_bush(cv, sl, a, bb, d, sun)
        return
    if d.kind == "boat":
        an, bn = a / _F32(hl), np.abs(bb) / _F32(hw)
        profile = np.sqrt(np.clip(1 - np.maximum(an - _F32(0.1), 0) ** 2 / _F32(0.81), 0, 1))
        cov = cv.soft(np.minimum((profile - bn) * _F32(hw), (1 - np.abs(an)) * _F32(hl)))
        deck = cv.soft((profile - _F32(0.25) - bn) * _F32(hw))
        col = d.colour.reshape(3, 1, 1) * (1 - _F32(0.12) * deck)[None]
    else:
        cov = _rrect(cv, a, bb, hl, hw, d.corner)
        rim = cv.soft(np.minimum(_F32(hl) - np.abs(a), _F32(hw) - np.abs(bb)) - _F32(0.15))
        shade = _F32(0.88) + _F32(0.12) * rim
        if d.kind == "container":
            shade = shade * (1 + _F32(0.06) * np.sin(a * _F32(2 * math.pi / 0.3)))
        col = d.colour.reshape(3, 1, 1) * shade[None]
        if d.kind == "roof_unit" and not d.dark_band:
            fan = cv.soft(_F32(0.3 * hw) - np.hypot(a - _F32(0.3 * hl), bb))
            col += fan[None] * (_F32(45) - col)
        if d.kind == "trailer":
            tongue = cv.soft(
                np.minimum(_F32(0.07) - np.abs(bb), np.minimum(a - _F32(hl), _F32(hl + 1.0) - a))
            )
            cov = np.maximum(cov, tongue)
            col += tongue[None] * (_F32(60) - col)
    if d.dark_band:
        an, bn = a / _F32(hl), np.abs(bb) / _F32(hw)
        band = cv.soft(np.minimum((an - _F32(0.12)) * _F32(hl), (_F32(0.34) - an) * _F32(hl)))
        band = band * cv.soft((_F32(0.75) - bn) * _F32(hw))
        col += band[None] * (_GLASS.reshape(3, 1, 1) - col)
    cv.paint(sl, cov, col)


def _paint_bush(
    cv: _Canvas, sl: tuple[slice, slice], a: np.ndarray, b: np.ndarray, d: _Thing, sun: _Sun
) -> None:
    """An elliptical, lumpy, textured green (or, when look-alike, car-coloured) shrub."""
    hl, hw = d.box.length / 2, d.box.width / 2
    r = np.hypot(a / _F32(hl), b / _F32(hw))
    ang = np.arctan2(b, a)
    lump = 1 + _F32(0.07) * np.sin(ang * 5 + _F32(d.box.cx)) + _F32(0.05) * np.sin(ang * 9 + _F32(d.box.cy))
    cov = cv.soft((lump - r) * _F32(min(hl, hw)))
    light = _sun_light(d.box.angle, a, b, sun, min(hl, hw))
    mod = 1 + _F32(0.25) * cv.tex_fine[sl] + _F32(0.2) * light
    cv.paint(sl, cov, d.colour, mod)


def _sun_light(angle: float, a: np.ndarray, b: np.ndarray, sun: _Sun, scale: float) -> np.ndarray:
    """-1..1: how much a point of a round object faces the sun (away from the shadow direction)."""
    ca, sa = math.cos(angle), math.sin(angle)
    sa_, sb_ = sun.dx * ca + sun.dy * sa, -sun.dx * sa + sun.dy * ca
    return np.clip(-(a * _F32(sa_) + b * _F32(sb_)) / _F32(scale), -1, 1)


def _paint_big_shadows(cv: _Canvas, lay: _Layout, trees: list[_Thing], sun: _Sun) -> None:
    """Shadows of buildings and trees, burnt in with a single rasterize call (hard edges, softened later)."""
    shapes = []
    n_buildings = len(lay.buildings)
    for bld in lay.buildings:
        ox, oy = sun.offset(bld.height)
        c = bld.box.corners()
        shapes.append(shapely.MultiPoint(np.vstack([c, c + [ox, oy]])).convex_hull)
    for t in trees:
        ox, oy = sun.offset(t.height - t.radius)
        base = (t.box.cx, t.box.cy)
        top = (t.box.cx + ox, t.box.cy + oy)
        shapes.append(Point(top).buffer(t.radius * 0.95, 16).union(LineString([base, top]).buffer(0.25)))
    if not shapes:
        return
    mask = rasterize(
        [(s, 1 if k < n_buildings else 2) for k, s in enumerate(shapes)],
        out_shape=(cv.size, cv.size),
        transform=Affine(cv.gsd, 0, 0, 0, cv.gsd, 0),
        fill=0,
        dtype="uint8",
    )
    # Buildings cast full shadows; tree canopies let some light through.
    cov = np.array([0.0, 0.9, 0.72], dtype=_F32)[mask]
    cv.darken((slice(0, cv.size), slice(0, cv.size)), cov)


def _paint_building(cv: _Canvas, bld: _Building, sun: _Sun) -> None:
    """A flat roof with a parapet, or a gabled roof with a lit and an unlit side and a ridge."""
    b = bld.box
    fr = cv.frame(b.cx, b.cy, b.angle, 0.5 * math.hypot(b.length, b.width) + 1)
    if fr is None:
        return
    sl, a, bb = fr
    hl, hw = b.length / 2, b.width / 2
    cov = _rrect(cv, a, bb, hl, hw, 0.1)
    edge = np.minimum(_F32(hl) - np.abs(a), _F32(hw) - np.abs(bb))
    if bld.roof == "flat":
        parapet = cv.soft(_F32(0.45) - edge)
        shade = 1 + _F32(0.06) * cv.tex_mid[sl] + _F32(0.05) * cv.tex_fine[sl] + _F32(0.1) * parapet
    else:
        lit = math.copysign(1.0, -(-sun.dx * math.sin(b.angle) + sun.dy * math.cos(b.angle)))
        side = np.sign(bb) * _F32(lit)
        tiles = _F32(0.05) * np.sin(np.abs(bb) * _F32(2 * math.pi / 0.4))
        ridge = cv.soft(_F32(0.12) - np.abs(bb))
        shade = 1 + _F32(0.16) * side + tiles + _F32(0.04) * cv.tex_fine[sl] - _F32(0.2) * ridge
    cv.paint(sl, cov, bld.colour, shade)


def _paint_tree(cv: _Canvas, t: _Thing, sun: _Sun) -> None:
    """A lumpy round crown, lit on the sun side, with leafy texture."""
    r = t.radius
    fr = cv.frame(t.box.cx, t.box.cy, 0.0, r * 1.2 + 0.5)
    if fr is None:
        return
    sl, a, b = fr
    dist = np.hypot(a, b)
    ang = np.arctan2(b, a)
    phase = _F32(t.box.cx * 3.1 + t.box.cy)
    lump = _F32(r) * (1 + _F32(0.08) * np.sin(ang * 5 + phase) + _F32(0.06) * np.sin(ang * 11 - phase))
    cov = cv.soft(lump - dist)
    light = _sun_light(0.0, a, b, sun, r)
    mod = 1 + _F32(0.3) * cv.tex_fine[sl] + _F32(0.28) * light
    cv.paint(sl, cov, t.colour, mod)


def _finish(cv: _Canvas, rng: _RNG) -> np.ndarray:
    """Scene colour balance, a slight optical blur and sensor noise; to uint8."""
    img = cv.img
    gain = rng.uniform(0.94, 1.06, 3).astype(_F32)
    for ch in range(3):
        band = img[ch]
        band *= gain[ch]
        # Separable [1, 2, 1] / 4 blur, edges replicated.
        tmp = band * _F32(0.5)
        tmp[1:] += band[:-1] * _F32(0.25)
        tmp[:-1] += band[1:] * _F32(0.25)
        tmp[0] += band[0] * _F32(0.25)
        tmp[-1] += band[-1] * _F32(0.25)
        band[:] = tmp * _F32(0.5)
        band[:, 1:] += tmp[:, :-1] * _F32(0.25)
        band[:, :-1] += tmp[:, 1:] * _F32(0.25)
        band[:, 0] += tmp[:, 0] * _F32(0.25)
        band[:, -1] += tmp[:, -1] * _F32(0.25)
    noise = rng.standard_normal((cv.size, cv.size), dtype=_F32) * _F32(2.0)
    out = np.empty(img.shape, dtype=np.uint8)
    for ch in range(3):
        band = img[ch]
        band += noise
        band += _F32(0.5)
        np.clip(band, 0, 255, out=band)
        out[ch] = band
    return out


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
