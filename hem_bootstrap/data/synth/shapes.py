"""Synthetic scenes: the spec, palettes and the geometry types a layout is made of (metres, y downwards)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely.geometry import Polygon

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
        lookalike_share: None, or the share (0..1) of the scene's :data:`TILE_SIZE` grid windows
            that hold look-alikes: the look-alikes laid out by default are kept in that many
            windows drawn at random and removed elsewhere, so look-alike density is set apart
            from the scene layout (rare confusers in a large background pool). Exclusive with
            ``n_distractors``.
        epsg: Projected CRS of the raster and the vector layers.
        origin: Map x of the left edge and map y of the top edge.
        vehicle_classes: Label vehicles as two classes, ``car`` and ``van`` (about 12 % vans, told
            apart from above by their long windscreen and missing rear window), not all ``vehicle``.
            The pixels are the same either way.
    """

    size: int = 4096
    gsd: float = 0.125
    seed: int = 7
    n_vehicles: int | None = None
    n_distractors: int | None = None
    distractor_similarity: float = 0.7
    lookalike_share: float | None = None
    epsg: int = 32633
    origin: tuple[float, float] = (500000.0, 5400000.0)
    vehicle_classes: bool = False


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
class _Region:
    """Free ground of a parcel (a polygon) and what may be placed there."""

    poly: object
    kind: str
    angle: float


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


