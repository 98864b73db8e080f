"""Synthetic scenes: the road grid, parcels, and where vehicles and look-alikes go (all in metres)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import geopandas as gpd
import numpy as np
import shapely
from rasterio.crs import CRS
from shapely import STRtree
from shapely.geometry import Point, Polygon, box

from hem_bootstrap.data.synth.shapes import (
    _CAR_COLOUR_P,
    _CAR_COLOURS,
    _F32,
    _KIND_COLOURS,
    _KIND_SHAPE,
    _RNG,
    CAR_LENGTH_M,
    CAR_WIDTH_M,
    SceneSpec,
    _Box,
    _box_corners,
    _box_polygons,
    _Building,
    _Layout,
    _Lot,
    _Region,
    _Road,
    _Sun,
    _Thing,
)
from hem_bootstrap.errors import ConfigError

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


