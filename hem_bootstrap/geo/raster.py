"""Opening and validating rasters; windowed reads; band selection; dtype scaling; nodata masks.

A raster is never read whole: tiles are windowed reads, and the statistics that percentile
scaling needs come from an overview or a sparse sample of small windows.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.crs import CRS
from rasterio.enums import MaskFlags, Resampling
from rasterio.env import set_gdal_config
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.windows import Window as RioWindow

from hem_bootstrap.config import DataConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.windows import Window, pixel_to_map_boxes
from hem_bootstrap.remote import exists, shown

log = logging.getLogger(__name__)

_WARNED: set[tuple[str, str]] = set()
"""(path, kind) pairs already warned about, so each hint is logged once per raster."""

STATS_MAX_SIDE = 1024
"""Largest side of the decimated read used for percentile statistics."""
STATS_GRID = 8
"""At most ``STATS_GRID**2`` blocks are sampled from a large raster without overviews."""
STATS_WINDOW = 128
"""Each sampled block is read decimated to at most this many pixels a side."""
STATS_BUDGET_BYTES = 32 * 2**20
"""Decoded bytes of the blocks sampled for statistics (GDAL caches them)."""
M_PER_DEGREE = 111_320.0
"""Metres per degree of latitude (and of longitude at the equator), the local approximation used."""


def _once(path: Path | str, kind: str, level: int, msg: str, *args: Any) -> None:
    key = (str(path), kind)
    if key in _WARNED:
        return
    _WARNED.add(key)
    log.log(level, msg, *args)


# --------------------------------------------------------------------------- info


@dataclass
class RasterInfo:
    """What the pipeline needs to know about a raster, read once from its header."""

    path: Path
    width: int
    height: int
    count: int
    dtypes: tuple[str, ...]
    crs: CRS | None
    transform: Affine
    res: tuple[float, float]
    nodata: float | None
    georeferenced: bool
    tiled: bool
    block_shape: tuple[int, int]
    driver: str = ""
    has_overviews: bool = False

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        """Map bounds ``(minx, miny, maxx, maxy)`` of the whole raster."""
        box = np.array([[0, 0, self.width, self.height]], dtype=np.float64)
        minx, miny, maxx, maxy = pixel_to_map_boxes(box, self.transform)[0]
        return float(minx), float(miny), float(maxx), float(maxy)

    def pixel_size_m(self) -> tuple[float, float]:
        """Ground size of one pixel in metres (x, y).

        Projected CRSs use their linear unit; geographic ones use the length of a degree at
        the raster's centre latitude. Plain images count one pixel as one metre, so areas
        read as megapixels.
        """
        if not self.georeferenced or self.crs is None:
            return 1.0, 1.0
        mx, my = self.metres_per_unit()
        return abs(self.res[0]) * mx, abs(self.res[1]) * my

    def metres_per_unit(self) -> tuple[float, float]:
        """Ground metres per CRS unit along x and along y, so map offsets can be compared in metres.

        ``(1, 1)`` for a projected CRS in metres and for plain images (whose unit is the pixel,
        counted as one metre); the linear unit's factor for other projected CRSs (feet); for a
        geographic CRS the length of a degree of longitude and of latitude at the raster's
        centre latitude (the same local approximation as :meth:`pixel_size_m`).
        """
        if not self.georeferenced or self.crs is None:
            return 1.0, 1.0
        if self.crs.is_geographic:
            lat = (self.bounds[1] + self.bounds[3]) / 2
            return M_PER_DEGREE * max(math.cos(math.radians(lat)), 1e-6), M_PER_DEGREE
        try:
            factor = float(self.crs.linear_units_factor[1])
        except Exception:  # noqa: BLE001 - unknown unit: assume metres
            factor = 1.0
        return factor, factor

    def area_km2(self, valid_fraction: float = 1.0) -> float:
        """Ground area in km² (times ``valid_fraction``, the share of pixels with data)."""
        mx, my = self.pixel_size_m()
        return self.width * self.height * mx * my * valid_fraction / 1e6


def _is_striped(width: int, height: int, block: tuple[int, int]) -> bool:
    bh, bw = block
    return bw >= width and bh < height


def open_raster(path: str | Path) -> RasterInfo:
    """Open a raster's header and describe it.

    Raises:
        DataError: the file is missing or GDAL cannot read it.
    """
    p = Path(path)
    if not exists(p):
        raise DataError(f"{p}: raster not found")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(shown(p)) as src:
                info = _describe(p, src)
    except RasterioError as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{shown(p)}: not a readable raster: {shown(msg)}") from None
    if info.count == 0:
        raise DataError(f"{shown(p)}: not a readable raster: it has no bands")
    if not info.georeferenced:
        _once(p, "pixel", logging.WARNING, "%s: no georeferencing; working in pixel space", p)
    if not info.tiled and info.driver == "GTiff":
        _once(
            p,
            "striped",
            logging.INFO,
            "%s: striped (untiled) GeoTIFF; `gdal_translate -co TILED=YES in.tif out.tif` makes windowed reads faster",
            p,
        )
    return info


def _describe(p: Path, src: Any) -> RasterInfo:
    georef = src.crs is not None
    transform = src.transform if georef else Affine.identity()
    res = (float(transform.a), float(transform.e)) if georef else (1.0, 1.0)
    block = tuple(src.block_shapes[0]) if src.count else (1, src.width)
    return RasterInfo(
        path=p,
        width=int(src.width),
        height=int(src.height),
        count=int(src.count),
        dtypes=tuple(src.dtypes),
        crs=src.crs if georef else None,
        transform=transform,
        res=res,
        nodata=src.nodata,
        georeferenced=georef,
        tiled=not _is_striped(src.width, src.height, block),  # type: ignore[arg-type]
        block_shape=block,  # type: ignore[arg-type]
        driver=str(src.driver),
        has_overviews=bool(src.count and src.overviews(1)),
    )


# --------------------------------------------------------------------------- reading


def gdal_message(err: BaseException) -> str:
    """One line saying what GDAL reported (rasterio often puts it in the chained cause)."""
    parts = [str(err).splitlines()[0] if str(err) else type(err).__name__]
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause):
        parts.append(str(cause).splitlines()[0])
    return ": ".join(parts)


def _fmt_window(window: Window) -> str:
    return f"window col={window.col_off} row={window.row_off} size={window.width}x{window.height}"


def valid_fraction(mask: np.ndarray, window: Window | None = None) -> float:
    """Share of valid pixels in the part of ``mask`` that lies inside the raster."""
    if window is not None:
        mask = mask[: window.valid_height, : window.valid_width]
    return float(mask.mean()) if mask.size else 0.0


@dataclass
class _Scaling:
    """Per-band affine map ``(v - lo) / (hi - lo)`` followed by a clip to [0, 1]."""

    lo: np.ndarray
    hi: np.ndarray

    def span(self) -> np.ndarray:
        """float32 ``hi - lo`` per band (1 where the range is empty)."""
        return np.where(self.hi > self.lo, self.hi - self.lo, 1.0).astype(np.float32)

    def apply(self, data: np.ndarray) -> np.ndarray:
        out = (data.astype(np.float32) - self.lo.astype(np.float32)[:, None, None]) / self.span()[:, None, None]
        return np.clip(out, 0.0, 1.0, out=out)


_CACHE_SET_IN: dict[int, int] = {}
"""Process id -> the GDAL block cache limit (MB) set in it."""


def limit_gdal_cache(mb: int) -> None:
    """Cap GDAL's block cache in this process (once per process and value).

    GDAL's default cap is 5% of RAM; a scan of a large compressed raster fills it, so a
    reader's memory would grow with the raster. Tiles are read row by row, so a cache of a few
    rows of blocks keeps every block decoded once.
    """
    if _CACHE_SET_IN.get(os.getpid()) == mb:
        return
    set_gdal_config("GDAL_CACHEMAX", int(mb) * 2**20)
    _CACHE_SET_IN[os.getpid()] = mb


class RasterReader:
    """Windowed reads of one raster, scaled to float32 in [0, 1] with a validity mask.

    Cheap to construct: the file is opened on the first read, and again after a fork or an
    unpickle (the handle is dropped when pickled), so each DataLoader worker owns its own
    GDAL handle.
    """

    def __init__(self, path: str | Path, data_cfg: DataConfig) -> None:
        self.path = Path(path)
        self.data_cfg = data_cfg
        self._src: Any = None
        self._pid = -1
        self._scaling: _Scaling | None = None
        self._all_valid = False
        self._uint8 = False

    def __repr__(self) -> str:
        return f"RasterReader({str(self.path)!r}, bands={self.bands})"

    # -- lifecycle
    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "data_cfg": self.data_cfg, "_scaling": self._scaling}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["data_cfg"])  # type: ignore[misc]
        self._scaling = state.get("_scaling")

    def __enter__(self) -> RasterReader:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the GDAL handle (a later read reopens it)."""
        if self._src is not None and self._pid == os.getpid():
            self._src.close()
        self._src = None

    @property
    def bands(self) -> list[int]:
        """1-based band indexes read."""
        return list(self.data_cfg.bands)

    def dataset(self) -> Any:
        """The open rasterio dataset of this process, opened (and checked) on first use."""
        if self._src is not None and self._pid == os.getpid():
            return self._src
        if not exists(self.path):
            raise DataError(f"{self.path}: raster not found")
        limit_gdal_cache(self.data_cfg.gdal_cache_mb)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", NotGeoreferencedWarning)
                src = rasterio.open(shown(self.path))
        except RasterioError as err:
            raise DataError(f"{shown(self.path)}: not a readable raster: {shown(str(err).splitlines()[0])}") from None
        bad = [b for b in self.bands if b > src.count]
        if bad:
            src.close()
            raise DataError(
                f"{self.path}: data.bands asks for band {bad[0]} but the raster has {src.count} band(s)"
            )
        self._src, self._pid = src, os.getpid()
        self._all_valid = all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in self.bands)
        self._uint8 = all(np.dtype(src.dtypes[b - 1]) == np.uint8 for b in self.bands)
        return src

    # -- reads
    def read(self, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read ``window``: float32 ``(C, height, width)`` in [0, 1] and a bool ``(height, width)`` mask.

        Pixels outside the raster (a padded window) are 0 and masked invalid.

        Raises:
            DataError: the band selection does not fit the raster, or GDAL fails to read.
        """
        src = self.dataset()
        with self._read_errors(window):
            raw, mask = self._read_raw(src, window)
            scaled = self._scale(src, raw)
        scaled[:, ~mask] = 0.0
        return scaled, mask

    def read_uint8(self, window: Window) -> tuple[np.ndarray, np.ndarray] | None:
        """``window`` as unscaled uint8 ``(C, height, width)`` plus the validity mask; None unless uint8.

        For the detection hot path: a uint8 tile is a quarter of the bytes of its float32 form
        to hand from a reader process to the model's (and to a GPU), and :meth:`scaling` maps
        it to exactly what :meth:`read` returns (see ``hem_bootstrap.data.tiles.scale_tiles``).
        Pixels outside the raster are 0 and masked invalid.

        Raises:
            DataError: as :meth:`read`.
        """
        src = self.dataset()
        if not self._uint8:
            return None
        with self._read_errors(window):
            return self._read_raw(src, window)

    def valid_at(self, cols: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Whether each pixel ``(cols[i], rows[i])`` (inside the raster) holds data: its masks only, nothing
        read when the raster declares no nodata or mask, one pixel's masks each otherwise.

        Raises:
            DataError: as :meth:`read`.
        """
        src = self.dataset()
        if self._all_valid:
            return np.ones(len(cols), dtype=bool)
        out = np.zeros(len(cols), dtype=bool)
        for i, (c, r) in enumerate(zip(cols, rows, strict=True)):
            with self._read_errors(Window(int(c), int(r), 1, 1, 1, 1)):
                out[i] = bool((src.read_masks(self.bands, window=RioWindow(int(c), int(r), 1, 1)) > 0).all())
        return out

    def data_beyond(self, window: Window) -> tuple[bool, bool, bool, bool]:
        """Whether valid data lies just outside each edge of ``window`` (left, top, right, bottom).

        An edge with no raster or only nodata beyond it (a collar, the outside of a rotated
        strip) is no seam: no neighbouring tile can see an object there whole. Reads the
        one-pixel ring of masks around the window, and nothing when the raster is all valid.

        Raises:
            DataError: as :meth:`read`.
        """
        src = self.dataset()
        c0, r0 = window.col_off, window.row_off
        c1, r1 = c0 + window.valid_width, r0 + window.valid_height
        inside = (c0 > 0, r0 > 0, c1 < src.width, r1 < src.height)
        if self._all_valid or not any(inside):
            return inside
        e0, f0, e1, f1 = max(c0 - 1, 0), max(r0 - 1, 0), min(c1 + 1, src.width), min(r1 + 1, src.height)
        with self._read_errors(window):
            ring = (src.read_masks(self.bands, window=RioWindow(e0, f0, e1 - e0, f1 - f0)) > 0).all(axis=0)
        rows, cols = slice(r0 - f0, r1 - f0), slice(c0 - e0, c1 - e0)
        return (
            inside[0] and bool(ring[rows, 0].any()),
            inside[1] and bool(ring[0, cols].any()),
            inside[2] and bool(ring[rows, -1].any()),
            inside[3] and bool(ring[-1, cols].any()),
        )

    @contextmanager
    def _read_errors(self, window: Window) -> Iterator[None]:
        """Turn a GDAL failure inside the block into a one-line :class:`DataError` naming file and window."""
        try:
            yield
        except (RasterioError, OSError) as err:
            raise DataError(
                f"{self.path}: read failed at {_fmt_window(window)}: {gdal_message(err)}"
            ) from None

    def _read_raw(self, src: Any, window: Window) -> tuple[np.ndarray, np.ndarray]:
        """Read the in-raster part of a window and pad it to the window's full size."""
        c0, r0 = max(window.col_off, 0), max(window.row_off, 0)
        c1 = min(window.col_off + window.width, src.width)
        r1 = min(window.row_off + window.height, src.height)
        shape = (len(self.bands), window.height, window.width)
        if c1 <= c0 or r1 <= r0:
            return np.zeros(shape, dtype=src.dtypes[self.bands[0] - 1]), np.zeros(shape[1:], dtype=bool)
        rio_win = RioWindow(c0, r0, c1 - c0, r1 - r0)
        data = src.read(self.bands, window=rio_win)
        if self._all_valid:
            inner = np.ones(data.shape[1:], dtype=bool)
        else:
            inner = (src.read_masks(self.bands, window=rio_win) > 0).all(axis=0)
        if np.issubdtype(data.dtype, np.floating):
            inner &= np.isfinite(data).all(axis=0)
        if data.shape == shape:
            return data, inner
        out = np.zeros(shape, dtype=data.dtype)
        mask = np.zeros(shape[1:], dtype=bool)
        y, x = r0 - window.row_off, c0 - window.col_off
        out[:, y : y + data.shape[1], x : x + data.shape[2]] = data
        mask[y : y + data.shape[1], x : x + data.shape[2]] = inner
        return out, mask

    def _scale(self, src: Any, raw: np.ndarray) -> np.ndarray:
        return self.scaling().apply(np.nan_to_num(raw, copy=False) if raw.dtype.kind == "f" else raw)

    def scaling(self) -> _Scaling:
        """The per-band scaling, decided once per raster from config and dtype."""
        if self._scaling is not None:
            return self._scaling
        src = self.dataset()
        n = len(self.bands)
        dtype = np.dtype(src.dtypes[self.bands[0] - 1])
        mode = self.data_cfg.scale
        if mode == "fixed":
            sc = _Scaling(np.full(n, self.data_cfg.scale_min), np.full(n, self.data_cfg.scale_max))
        elif mode == "percentile" or (mode == "auto" and dtype.kind in "iu" and dtype != np.uint8):
            sc = self._percentile_scaling(src)
        elif dtype == np.uint8:
            sc = _Scaling(np.zeros(n), np.full(n, 255.0))
        else:  # float passthrough (clipped)
            sc = _Scaling(np.zeros(n), np.ones(n))
        self._scaling = sc
        return sc

    def _percentile_scaling(self, src: Any) -> _Scaling:
        sample, valid = sample_pixels(src, self.bands)
        lo_p, hi_p = self.data_cfg.percentiles
        n = len(self.bands)
        lo, hi = np.zeros(n), np.ones(n)
        for i in range(n):
            vals = sample[i][valid]
            vals = vals[np.isfinite(vals)] if vals.dtype.kind == "f" else vals
            if vals.size == 0:
                continue
            lo[i], hi[i] = np.percentile(vals, [lo_p, hi_p])
            if hi[i] <= lo[i]:
                hi[i] = lo[i] + 1.0
        log.debug("%s: percentile scaling lo=%s hi=%s", self.path, lo, hi)
        return _Scaling(lo, hi)


def sample_pixels(src: Any, bands: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """A small, spread-out sample of a raster's pixels and their validity, never a full read.

    A raster that is small or has overviews gets one decimated read (GDAL picks the
    overview). A large one without overviews gets a grid of whole blocks, each read
    decimated; the number of blocks is chosen so that the decoded blocks stay within
    :data:`STATS_BUDGET_BYTES`, whatever the block layout (tiles or strips).
    """
    w, h = src.width, src.height
    all_valid = all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands)
    if bool(src.overviews(bands[0])) or max(w, h) <= 2 * STATS_MAX_SIDE:
        scale = min(1.0, STATS_MAX_SIDE / max(w, h))
        shape = (len(bands), max(1, int(h * scale)), max(1, int(w * scale)))
        data = src.read(bands, out_shape=shape, resampling=Resampling.nearest)
        if all_valid:
            return data, np.ones(shape[1:], dtype=bool)
        masks = src.read_masks(bands, out_shape=shape, resampling=Resampling.nearest)
        return data, (masks > 0).all(axis=0)
    bh, bw = (int(v) for v in src.block_shapes[bands[0] - 1])
    block_bytes = bh * bw * src.count * np.dtype(src.dtypes[bands[0] - 1]).itemsize
    n = int(np.clip(STATS_BUDGET_BYTES // max(block_bytes, 1), 4, STATS_GRID**2))
    n_cols = max(1, min(int(np.sqrt(n)), math.ceil(w / bw)))
    n_rows = max(1, min(n // n_cols, math.ceil(h / bh)))
    cols = np.unique(np.linspace(0, math.ceil(w / bw) - 1, n_cols).astype(int)) * bw
    rows = np.unique(np.linspace(0, math.ceil(h / bh) - 1, n_rows).astype(int)) * bh
    datas, valids = [], []
    for r in rows:
        for c in cols:
            win = RioWindow(int(c), int(r), min(bw, w - int(c)), min(bh, h - int(r)))
            shape = (len(bands), min(int(win.height), STATS_WINDOW), min(int(win.width), STATS_WINDOW))
            data = src.read(bands, window=win, out_shape=shape, resampling=Resampling.nearest)
            datas.append(data.reshape(len(bands), -1))
            if all_valid:
                valids.append(np.ones(data.shape[1] * data.shape[2], dtype=bool))
            else:
                m = src.read_masks(bands, window=win, out_shape=shape, resampling=Resampling.nearest)
                valids.append((m > 0).all(axis=0).reshape(-1))
    return np.concatenate(datas, axis=1)[:, None, :], np.concatenate(valids)[None, :]


