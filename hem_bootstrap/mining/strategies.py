"""Mining strategies: small composable selectors of false positives behind one Protocol.

Each strategy takes the round's false positives and returns a subset of its rows (in their
input order); :class:`Compose` chains them so each narrows the previous selection, e.g.
``threshold>0.5`` then ``per_image_cap=50`` then ``budget=1000``. Ties in score are broken
by input order (stable sorts), so a selection is deterministic for a given input.

:class:`RandomBaseline` is the control experiment: it lets the preceding selection through
unchanged but flags the composition ``random``, and the loop then replaces the selected
false positives by as many random background boxes (:func:`random_windows`) as a mining run
would have added as new bank rows (counted on a shadow bank of the selections).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

import geopandas as gpd
import numpy as np
import pyproj
import shapely
from affine import Affine
from pydantic import ValidationError

from hem_bootstrap.config import StrategySpec
from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import ConfigError, DataError
from hem_bootstrap.geo.boxes import batched_nms
from hem_bootstrap.geo.windows import pixel_to_map_boxes, window_around_box

log = logging.getLogger(__name__)

TILE_KEYS = ("image", "win_col", "win_row", "win_w", "win_h")
RANDOM_TRIES = 50
"""Draws per random box before giving up on placing it clear of ground truth."""

ImageMeta = tuple[str, int, int, Affine, Any]
"""``(path, width, height, transform, crs)`` of one raster."""


@runtime_checkable
class Strategy(Protocol):
    """Selects a subset of false positives (rows of a detection frame)."""

    name: str

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """Return the kept rows of ``fps``, in input order."""
        ...


# ------------------------------------------------------------------------------ helpers


def _by_score(fps: gpd.GeoDataFrame) -> np.ndarray:
    """Row positions sorted by descending score, ties in input order (NaN last)."""
    scores = np.nan_to_num(fps["score"].to_numpy(dtype=np.float64), nan=-np.inf)
    return np.argsort(-scores, kind="stable")


def _keep(fps: gpd.GeoDataFrame, positions: np.ndarray) -> gpd.GeoDataFrame:
    """Rows at ``positions`` in input order."""
    mask = np.zeros(len(fps), dtype=bool)
    mask[np.asarray(positions, dtype=np.int64)] = True
    return fps.iloc[np.flatnonzero(mask)]


def _top_k_per_group(fps: gpd.GeoDataFrame, keys: Sequence[str], k: int) -> gpd.GeoDataFrame:
    """The ``k`` highest-scoring rows of each group of ``keys``."""
    if len(fps) == 0:
        return fps
    order = _by_score(fps)
    ranked = fps.iloc[order].reset_index(drop=True)
    rank = ranked.groupby(list(keys), sort=False, dropna=False).cumcount().to_numpy()
    return _keep(fps, order[rank < k])


def _check_k(name: str, k: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k <= 0:
        raise ConfigError(f"mining strategy '{name}': k = {k!r}, expected an integer > 0")


def _check_unit(name: str, key: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ConfigError(f"mining strategy '{name}': {key} = {value!r}, expected a number in [0, 1]")


# ------------------------------------------------------------------------------ strategies


@dataclass(frozen=True)
class ScoreThreshold:
    """Keep false positives scoring strictly above ``threshold``."""

    threshold: float
    name: ClassVar[str] = "threshold"
    random: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_unit(self.name, "threshold", self.threshold)

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """Rows with ``score > threshold``."""
        return fps[fps["score"].to_numpy(dtype=np.float64) > self.threshold]

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> ScoreThreshold:
        """Build from a validated config entry."""
        return cls(_need(spec, "threshold"))


@dataclass(frozen=True)
class _TopK:
    """Keep the ``k`` highest-scoring false positives of each group of :attr:`keys` (of the round without keys)."""

    k: int
    name: ClassVar[str] = "top_k"
    random: ClassVar[bool] = False
    keys: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        _check_k(self.name, self.k)

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """Top ``k`` by score per group."""
        if not self.keys:
            return _keep(fps, _by_score(fps)[: self.k])
        return _top_k_per_group(fps, self.keys, self.k)

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> _TopK:
        """Build from a validated config entry."""
        return cls(_need(spec, "k"))


@dataclass(frozen=True)
class PerImageCap(_TopK):
    """Keep the ``k`` highest-scoring false positives of each image (spreads mining out)."""

    name: ClassVar[str] = "per_image_cap"
    keys: ClassVar[tuple[str, ...]] = ("image",)


@dataclass(frozen=True)
class PerTileCap(_TopK):
    """Keep the ``k`` highest-scoring false positives of each tile (one busy tile cannot dominate)."""

    name: ClassVar[str] = "per_tile_cap"
    keys: ClassVar[tuple[str, ...]] = TILE_KEYS


@dataclass(frozen=True)
class Budget(_TopK):
    """Keep the ``k`` highest-scoring false positives of the whole round."""

    name: ClassVar[str] = "budget"


@dataclass(frozen=True)
class ScoreBand:
    """Keep false positives with ``lo <= score < hi`` (e.g. skip the suspiciously confident ones)."""

    lo: float
    hi: float
    name: ClassVar[str] = "score_band"
    random: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _check_unit(self.name, "lo", self.lo)
        _check_unit(self.name, "hi", self.hi)
        if self.lo >= self.hi:
            raise ConfigError(
                f"mining strategy '{self.name}': lo = {self.lo} >= hi = {self.hi}, expected lo < hi"
            )

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """Rows with ``lo <= score < hi``."""
        s = fps["score"].to_numpy(dtype=np.float64)
        return fps[(s >= self.lo) & (s < self.hi)]

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> ScoreBand:
        """Build from a validated config entry."""
        return cls(_need(spec, "lo"), _need(spec, "hi"))


@dataclass(frozen=True)
class RandomBaseline:
    """Control: passes the selection through and marks the round ``random``.

    The loop then mines random background boxes (:func:`random_windows`) instead of the
    false positives themselves: as many as the selection would have added as *new* rows to
    a bank of past selections (an FP found again only updates its row), so a random run and
    a mining run add the same number of negatives. With ``k`` it adds ``k`` random windows
    per round instead (fewer only where boxes cannot be placed clear of ground truth) (a dense sample of the pool: the upper-bound control that
    trains on much of the pool with the same steps).
    """

    k: int | None = None
    name: ClassVar[str] = "random"
    random: ClassVar[bool] = True

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """The input unchanged (only its count matters)."""
        return fps

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> RandomBaseline:
        """Build from a validated config entry."""
        if spec.k is not None:
            _check_k(cls.name, spec.k)
        return cls(spec.k)


class NoMining:
    """Control: mines nothing, so later rounds only fine-tune (the "no mining" baseline)."""

    name: ClassVar[str] = "none"
    random: ClassVar[bool] = False

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """No rows."""
        return fps.iloc[0:0]

    @classmethod
    def from_spec(cls, spec: StrategySpec) -> NoMining:
        """Build from a validated config entry."""
        return cls()


@dataclass(frozen=True)
class Compose:
    """Strategies applied in order, each narrowing the previous one's selection."""

    strategies: list[Strategy] = field(default_factory=list)
    name: ClassVar[str] = "compose"

    @property
    def random(self) -> bool:
        """True when a :class:`RandomBaseline` is part of the chain."""
        return any(getattr(s, "random", False) for s in self.strategies)

    @property
    def random_k(self) -> int | None:
        """The fixed count of a ``random`` strategy with ``k`` (None: match the mining count)."""
        return next((s.k for s in self.strategies if isinstance(s, RandomBaseline) and s.k is not None), None)

    def select(self, fps: gpd.GeoDataFrame, rng: np.random.Generator) -> gpd.GeoDataFrame:
        """Apply every strategy in turn."""
        _check_columns(fps)
        out = fps
        for strategy in self.strategies:
            out = strategy.select(out, rng)
        return out


STRATEGIES: dict[str, Any] = {
    cls.name: cls for cls in (ScoreThreshold, PerImageCap, PerTileCap, Budget, ScoreBand, RandomBaseline, NoMining)
}
"""Registry: config name -> strategy class (each has ``from_spec``)."""


def _need(spec: StrategySpec, key: str) -> Any:
    value = getattr(spec, key)
    if value is None:
        raise ConfigError(f"mining strategy '{spec.name}': {key} is missing")
    return value


def _check_columns(fps: gpd.GeoDataFrame) -> None:
    missing = [c for c in ("image", "score") if c not in fps.columns]
    if missing:
        raise DataError(f"mining strategies: false-positive frame lacks column(s) {missing}")


def build_strategy(specs: Sequence[StrategySpec | dict[str, Any]]) -> Compose:
    """Turn config entries into a :class:`Compose` via :data:`STRATEGIES`.

    Raises:
        ConfigError: An unknown strategy name or a bad parameter, naming both.
    """
    chain: list[Strategy] = []
    for i, raw in enumerate(specs):
        name = raw.get("name") if isinstance(raw, dict) else getattr(raw, "name", None)
        cls = STRATEGIES.get(str(name))
        if cls is None:
            raise ConfigError(
                f"mining.strategies[{i}]: unknown strategy {name!r}; expected one of {', '.join(STRATEGIES)}"
            )
        spec = raw if isinstance(raw, StrategySpec) else _validate_spec(raw, i)
        chain.append(cls.from_spec(spec))
    return Compose(chain)


def _validate_spec(raw: Any, i: int) -> StrategySpec:
    try:
        return StrategySpec.model_validate(raw)
    except ValidationError as err:
        e = err.errors()[0]
        where = ".".join(str(p) for p in e["loc"]) or "<entry>"
        raise ConfigError(f"mining.strategies[{i}].{where} = {e.get('input')!r}: {e['msg']}") from None


def strategy_label(specs: Sequence[StrategySpec]) -> str:
    """A short provenance label such as ``threshold>0.5+per_image_cap=50``."""
    parts = []
    for s in specs:
        if s.name == "threshold":
            parts.append(f"threshold>{s.threshold:g}")
        elif s.name == "score_band":
            parts.append(f"score_band=[{s.lo:g},{s.hi:g})")
        elif s.name in ("random", "none"):
            parts.append(s.name)
        else:
            parts.append(f"{s.name}={s.k}")
    return "+".join(parts) if parts else "all"


# ------------------------------------------------------------------------------ dedupe


def spatial_dedupe(fps: gpd.GeoDataFrame, iou: float) -> gpd.GeoDataFrame:
    """Class-agnostic NMS among one round's mined false positives, per image.

    Overlapping detections of one background structure (seam duplicates, two classes on one
    roof) become a single negative: the higher score is kept. Rows stay in input order.
    """
    if len(fps) < 2:
        return fps
    if all(c in fps.columns for c in PX_COLUMNS):  # pixel boxes: exact in any CRS, however the frame was joined
        boxes = fps[list(PX_COLUMNS)].to_numpy(dtype=np.float64)
    else:
        boxes = np.array(shapely.bounds(np.asarray(fps.geometry.values)), dtype=np.float64)
    scores = np.nan_to_num(fps["score"].to_numpy(dtype=np.float64), nan=0.0)
    _, groups = np.unique(fps["image"].astype(str).to_numpy(), return_inverse=True)
    return _keep(fps, batched_nms(boxes, scores, groups, float(iou)))


# ------------------------------------------------------------------------------ random baseline


def typical_box_px(frame: gpd.GeoDataFrame, default: float = 32.0) -> tuple[float, float]:
    """Median pixel width and height of a frame's boxes (``px_*`` columns); ``default`` when empty."""
    if len(frame) == 0 or any(c not in frame.columns for c in PX_COLUMNS):
        return float(default), float(default)
    w = (frame["px_xmax"] - frame["px_xmin"]).to_numpy(dtype=np.float64)
    h = (frame["px_ymax"] - frame["px_ymin"]).to_numpy(dtype=np.float64)
    return float(np.median(w)), float(np.median(h))


def random_windows(
    n: int,
    images: Sequence[ImageMeta],
    tile_size: int,
    rng: np.random.Generator,
    avoid: gpd.GeoDataFrame | None = None,
    box_px: float | tuple[float, float] | None = None,
) -> gpd.GeoDataFrame:
    """``n`` random background boxes shaped like mined false positives (the random baseline).

    Images are drawn in proportion to their pixel area; each box (``box_px``, default
    ``max(8, tile_size // 8)`` pixels; pass :func:`typical_box_px` of the mined FPs to match
    their size) is placed uniformly inside its image, redrawn up to :data:`RANDOM_TRIES`
    times while it touches an ``avoid`` geometry (ground truth; restricted to the same image
    when ``avoid`` has an ``image`` column). Boxes that cannot be placed are dropped with a
    warning. Rows carry ``label`` 0, ``score`` NaN, the tile window around the box, the
    pixel box and its map polygon, in the first image's CRS. Deterministic for a given ``rng``.
    """
    if n < 0:
        raise DataError(f"random_windows: n = {n}, expected >= 0")
    if n and not images:
        raise DataError("random_windows: no images to place random boxes in")
    bw, bh = _box_size(box_px, tile_size)
    crs = images[0][4] if images else None
    if n == 0:
        return _random_frame([], crs)
    areas = np.array([float(w) * float(h) for _, w, h, _, _ in images], dtype=np.float64)
    picks = rng.choice(len(images), size=n, p=areas / areas.sum())
    rows: list[dict[str, Any]] = []
    failed = 0
    for i, meta in enumerate(images):
        count = int((picks == i).sum())
        if count:
            placed = _place_in_image(meta, count, bw, bh, tile_size, rng, avoid)
            failed += count - len(placed)
            rows.extend(placed)
    if failed:
        log.warning("random_windows: %d of %d random boxes could not avoid ground truth; dropped", failed, n)
    return _random_frame(rows, crs)


def _box_size(box_px: float | tuple[float, float] | None, tile_size: int) -> tuple[float, float]:
    if box_px is None:
        side = float(max(8, tile_size // 8))
        return side, side
    bw, bh = (float(box_px), float(box_px)) if isinstance(box_px, (int, float)) else map(float, box_px)
    if not (bw > 0 and bh > 0 and math.isfinite(bw) and math.isfinite(bh)):
        raise DataError(f"random_windows: box_px = {box_px!r}, expected positive sizes")
    return bw, bh


def _avoid_tree(avoid: gpd.GeoDataFrame | None, path: str, crs: Any) -> shapely.STRtree | None:
    if avoid is None or len(avoid) == 0:
        return None
    frame = avoid
    if "image" in frame.columns:
        frame = frame[frame["image"].astype(str) == str(path)]
    target = _as_crs(crs)
    if frame.crs is not None and target is not None and frame.crs != target:
        frame = frame.to_crs(target)
    geoms = np.asarray(frame.geometry.values)
    return shapely.STRtree(geoms) if len(geoms) else None


def _place_in_image(
    meta: ImageMeta,
    count: int,
    bw: float,
    bh: float,
    tile_size: int,
    rng: np.random.Generator,
    avoid: gpd.GeoDataFrame | None,
) -> list[dict[str, Any]]:
    """``count`` boxes placed in one image clear of its ground truth."""
    path, width, height, transform, crs = meta
    tree = _avoid_tree(avoid, path, crs)
    w, h = min(bw, float(width)), min(bh, float(height))
    rows: list[dict[str, Any]] = []
    for _ in range(count):
        for _try in range(RANDOM_TRIES):
            x0 = float(rng.uniform(0.0, width - w))
            y0 = float(rng.uniform(0.0, height - h))
            px = np.array([[x0, y0, x0 + w, y0 + h]], dtype=np.float64)
            geom = shapely.box(*pixel_to_map_boxes(px, transform)[0])
            if tree is None or len(tree.query(geom, predicate="intersects")) == 0:
                u = (float(rng.random()), float(rng.random()))
                win = window_around_box(px[0], tile_size, int(width), int(height), u)
                rows.append(_random_row(str(path), px[0], win, geom, crs))
                break
    return rows


def _random_row(path: str, px: np.ndarray, win: Any, geom: shapely.Geometry, crs: Any) -> dict[str, Any]:
    return {
        "image": path,
        "label": 0,
        "score": float("nan"),
        "win_col": win.col_off,
        "win_row": win.row_off,
        "win_w": win.width,
        "win_h": win.height,
        "px_xmin": float(px[0]),
        "px_ymin": float(px[1]),
        "px_xmax": float(px[2]),
        "px_ymax": float(px[3]),
        "geometry": geom,
        "_crs": crs,
    }


def _as_crs(crs: Any) -> pyproj.CRS | None:
    return None if crs is None else pyproj.CRS.from_user_input(crs)


def _random_frame(rows: list[dict[str, Any]], crs: Any) -> gpd.GeoDataFrame:
    """Rows from several images in one frame, reprojected to ``crs`` where an image differs."""
    cols = ["image", "label", "score", "win_col", "win_row", "win_w", "win_h", *PX_COLUMNS]
    if not rows:
        empty = {
            c: np.zeros(0, dtype=np.int64 if c.startswith("win_") or c == "label" else np.float64)
            for c in cols
        }
        empty["image"] = np.zeros(0, dtype=object)
        return gpd.GeoDataFrame(empty, geometry=[], crs=crs)
    target = _as_crs(crs)
    own = [_as_crs(r.pop("_crs")) for r in rows]
    frame = gpd.GeoDataFrame(rows, geometry="geometry", crs=target)
    if target is not None:
        for other in {c for c in own if c is not None and c != target}:
            sel = np.array([c == other for c in own])
            moved = gpd.GeoSeries(list(np.asarray(frame.geometry.values)[sel]), crs=other).to_crs(target)
            frame.loc[sel, "geometry"] = moved.values
    for c in ("label", "win_col", "win_row", "win_w", "win_h"):
        frame[c] = frame[c].astype(np.int64)
    return frame[[*cols, "geometry"]]
