"""Shared fixtures: factories writing tiny real GeoTIFFs / PNGs and GeoPackages of labels."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

UTM_ORIGIN = (500_000.0, 5_000_000.0)
GSD = 0.5


def default_transform(gsd: float = GSD) -> Affine:
    """North-up transform at a UTM-like origin."""
    return Affine(gsd, 0.0, UTM_ORIGIN[0], 0.0, -gsd, UTM_ORIGIN[1])


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a raster with the chosen size, bands, dtype, CRS, transform, nodata and tiling.

    ``data`` may be an array ``(count, height, width)``; by default a deterministic gradient.
    ``mask`` (bool ``(height, width)``, True = valid) writes an internal dataset mask.
    """

    def factory(
        name: str = "r.tif",
        width: int = 256,
        height: int = 256,
        count: int = 3,
        dtype: str = "uint8",
        crs: str | None = "EPSG:32633",
        transform: Affine | None = None,
        nodata: float | None = None,
        tiled: bool = True,
        blocksize: int = 128,
        data: np.ndarray | None = None,
        driver: str = "GTiff",
        compress: str | None = None,
        mask: np.ndarray | None = None,
    ) -> Path:
        path = tmp_path / name
        if data is None:
            yy, xx = np.mgrid[0:height, 0:width]
            base = (xx + 2 * yy) % 200 + 20
            data = np.stack([base + 5 * b for b in range(count)]).astype(dtype)
        profile: dict[str, Any] = {
            "driver": driver,
            "width": width,
            "height": height,
            "count": count,
            "dtype": dtype,
        }
        if driver == "GTiff":
            profile["tiled"] = tiled
            if tiled:
                profile.update(blockxsize=blocksize, blockysize=blocksize)
            if compress:
                profile["compress"] = compress
        if crs is not None:
            profile["crs"] = crs
            profile["transform"] = transform if transform is not None else default_transform()
        if nodata is not None:
            profile["nodata"] = nodata
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if mask is not None:
                dst.write_mask(mask.astype(np.uint8) * 255)
        return path

    return factory


def boxes_to_map(boxes_px: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel xyxy -> map (minx, miny, maxx, maxy), independent of the code under test."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes_px, dtype=float):
        ax, ay = transform @ (x0, y0)
        bx, by = transform @ (x1, y1)
        out.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return np.array(out, dtype=float).reshape(-1, 4)


@pytest.fixture
def make_labels(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write labels as a GeoPackage (or any OGR file by suffix).

    Give ``boxes_px`` with the raster's ``transform`` (boxes become polygons in map units),
    or ready-made ``geoms``. ``classes`` fills the ``class`` column unless ``field`` is None.
    ``to_crs`` reprojects before writing.
    """

    def factory(
        name: str = "labels.gpkg",
        boxes_px: np.ndarray | None = None,
        transform: Affine | None = None,
        geoms: Sequence[Any] | None = None,
        crs: str | None = "EPSG:32633",
        classes: Sequence[str] | str = "vehicle",
        field: str | None = "class",
        to_crs: str | None = None,
    ) -> Path:
        if geoms is None:
            assert boxes_px is not None
            mb = boxes_to_map(
                np.asarray(boxes_px), transform if transform is not None else default_transform()
            )
            geoms = list(shapely.box(mb[:, 0], mb[:, 1], mb[:, 2], mb[:, 3]))
        n = len(geoms)
        cols: dict[str, Any] = {}
        if field is not None:
            cols[field] = [classes] * n if isinstance(classes, str) else list(classes)
        frame = gpd.GeoDataFrame(cols, geometry=list(geoms), crs=crs)
        if to_crs is not None:
            frame = frame.to_crs(to_crs)
        path = tmp_path / name
        frame.to_file(path)
        return path

    return factory
