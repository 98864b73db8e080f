"""Synthetic scenes: painting a layout into RGB pixels (value-noise textures, anti-aliased objects, shadows)."""

from __future__ import annotations

import math

import numpy as np
import shapely
from rasterio.features import rasterize
from rasterio.transform import Affine
from shapely.geometry import LineString, Point

from hem_bootstrap.data.synth.shapes import (
    _F32,
    _GLASS,
    _RNG,
    _SHADOW_TINT,
    SceneSpec,
    _Box,
    _Building,
    _Layout,
    _Lot,
    _Road,
    _Sun,
    _Thing,
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

    def box_frame(
        self, b: _Box, margin: float
    ) -> tuple[tuple[slice, slice], np.ndarray, np.ndarray, float, float] | None:
        """:meth:`frame` around a box (its circumradius plus ``margin``) and the box's half length and width."""
        fr = self.frame(b.cx, b.cy, b.angle, 0.5 * math.hypot(b.length, b.width) + margin)
        return None if fr is None else (*fr, b.length / 2, b.width / 2)

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
    fr = cv.box_frame(b, 0.5)
    if fr is None:
        return
    sl, a, bb, hl, hw = fr
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
    fr = cv.box_frame(b, 1.5)
    if fr is None:
        return
    sl, a, bb, hl, hw = fr
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
    fr = cv.box_frame(b, 1)
    if fr is None:
        return
    sl, a, bb, hl, hw = fr
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


