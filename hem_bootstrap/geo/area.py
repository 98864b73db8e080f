"""The ground an evaluation searched: a raster's valid pixels inside its area of interest, minus ignore zones."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import NotGeoreferencedWarning, RasterioError
from rasterio.features import geometry_mask

from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.raster import RasterInfo, gdal_message
from hem_bootstrap.remote import shown

AREA_MAX_SIDE = 4096
"""Largest side of the (decimated) mask grid on which the evaluated area is counted."""


@dataclass(frozen=True)
class EvaluatedArea:
    """Ground area of one raster that an evaluation searched, in km².

    Attributes:
        raster_km2: The whole raster rectangle.
        valid_km2: Pixels with data in every selected band (nodata collars and masks excluded),
            inside the area of interest when there is one.
        ignored_km2: Of those, the ground inside ignore zones (not evaluated).
    """

    raster_km2: float
    valid_km2: float
    ignored_km2: float

    @property
    def evaluated_km2(self) -> float:
        """Valid ground outside ignore zones: the denominator of FP per km²."""
        return max(self.valid_km2 - self.ignored_km2, 0.0)


def evaluated_area(info: RasterInfo, bands: list[int], zones: Any = None, aoi: Any = None) -> EvaluatedArea:
    """Valid-data area of a raster (inside ``aoi`` when given) minus the valid ground under ignore zones.

    The validity mask (GDAL's per-band masks: nodata values, alpha or internal masks; NaN for
    float data) and the zones are counted on one grid: the raster's own pixels when its long
    side is at most :data:`AREA_MAX_SIDE`, else a nearest-neighbour decimation to that size
    (exact for collars and zones larger than a few decimated cells).

    Args:
        info: The raster's header (see :func:`open_raster`).
        bands: 1-based bands whose masks must all be valid.
        zones: Ignore geometries in the raster's CRS (pixel coordinates for plain images), or None.
        aoi: Area-of-interest polygons in the same coordinates, or None (the whole raster).

    Raises:
        DataError: GDAL cannot read the raster's masks.
    """
    scale = min(1.0, AREA_MAX_SIDE / max(info.width, info.height))
    shape = (max(1, round(info.height * scale)), max(1, round(info.width * scale)))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            with rasterio.open(shown(info.path)) as src:
                valid = _valid_grid(src, bands, shape)
    except RasterioError as err:
        raise DataError(f"{info.path}: could not read its nodata mask: {gdal_message(err)}") from None
    grid = info.transform @ Affine.scale(info.width / shape[1], info.height / shape[0])
    ignored = _inside(zones, shape, grid, default=False)
    valid &= _inside(aoi, shape, grid, default=True)
    cells = float(shape[0] * shape[1])
    whole = info.area_km2()
    return EvaluatedArea(
        raster_km2=whole,
        valid_km2=whole * float(valid.sum()) / cells,
        ignored_km2=whole * float((valid & ignored).sum()) / cells,
    )


def _inside(polygons: Any, shape: tuple[int, int], grid: Affine, default: bool) -> np.ndarray:
    """Cells whose centre falls inside ``polygons`` (a frame or None: every cell ``default``)."""
    if polygons is None:
        return np.full(shape, default, dtype=bool)
    geoms = [g for g in polygons.geometry if g is not None and not g.is_empty]
    if not geoms:
        return np.zeros(shape, dtype=bool)
    return np.asarray(geometry_mask(geoms, out_shape=shape, transform=grid, invert=True, all_touched=False))


def _valid_grid(src: Any, bands: list[int], shape: tuple[int, int]) -> np.ndarray:
    """Validity of every cell of ``shape`` (the raster resampled by nearest neighbour)."""
    out_shape = (len(bands), *shape)
    valid = np.ones(shape, dtype=bool)
    if not all(MaskFlags.all_valid in src.mask_flag_enums[b - 1] for b in bands):
        masks = src.read_masks(bands, out_shape=out_shape, resampling=Resampling.nearest)
        valid &= (masks > 0).all(axis=0)
    if np.dtype(src.dtypes[bands[0] - 1]).kind == "f":
        data = src.read(bands, out_shape=out_shape, resampling=Resampling.nearest)
        valid &= np.isfinite(data).all(axis=0)
    return valid
