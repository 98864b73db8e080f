"""Areas of interest: a polygon layer that limits a scan to the ground it covers.

Only tile windows that intersect the area are read, and detections whose box does not
intersect it are dropped. The polygons are reprojected to each raster's CRS and taken to its
pixel grid once, so the per-tile test is a rectangle against one geometry.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from hem_bootstrap.geo.labels import load_zones
from hem_bootstrap.geo.raster import RasterInfo


def aoi_in_pixels(path: str | Path, info: RasterInfo, what: str = "area of interest (--aoi)") -> BaseGeometry:
    """The union of the area's polygons in the raster's pixel coordinates (empty when none falls on it).

    Raises:
        DataError: the file is missing, unreadable, not polygons, or without a CRS for a georeferenced raster.
    """
    return zones_in_pixels(load_zones(path, info, what=what), info)


def zones_in_pixels(zones: gpd.GeoDataFrame, info: RasterInfo) -> BaseGeometry:
    """The union of polygons in the raster's CRS, taken to its pixel grid and prepared for many tests."""
    if zones.empty:
        return shapely.Polygon()
    inverse = ~info.transform
    pixels = shapely.transform(zones.geometry.to_numpy(), lambda xy: np.column_stack(inverse @ (xy[:, 0], xy[:, 1])))
    area = shapely.union_all(pixels)
    shapely.prepare(area)  # many tile and box tests against one geometry
    return area


def windows_touching(area: BaseGeometry, windows: np.ndarray) -> np.ndarray:
    """Which ``(col, row, width, height)`` windows intersect ``area`` (a boolean per window)."""
    if len(windows) == 0:
        return np.zeros(0, dtype=bool)
    boxes = shapely.box(windows[:, 0], windows[:, 1], windows[:, 0] + windows[:, 2], windows[:, 1] + windows[:, 3])
    return np.asarray(shapely.intersects(area, boxes), dtype=bool)


def boxes_touching(area: BaseGeometry, boxes: np.ndarray) -> np.ndarray:
    """Which ``(xmin, ymin, xmax, ymax)`` pixel boxes intersect ``area``."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=bool)
    return np.asarray(shapely.intersects(area, shapely.box(*boxes.T)), dtype=bool)
