"""Exports of the negative bank for other tools: GeoJSON (QGIS, web maps) and COCO JSON (pixel boxes)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import shapely

from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import DataError, HemError
from hem_bootstrap.files import atomic_path
from hem_bootstrap.geo.frames import write_geojson
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.geo.windows import map_to_pixel_boxes
from hem_bootstrap.mining.rows import class_names

FORMATS = ("geojson", "coco")


def export_rows(rows: gpd.GeoDataFrame, path: Path, fmt: str, rasters: Mapping[str, Any] | None = None,
                classes: Sequence[str] = ()) -> int:
    """Write bank rows as GeoJSON or COCO JSON (atomically); returns how many.

    COCO uses pixel boxes (the ``px_*`` columns; where one is missing and ``rasters`` maps the
    image to its affine transform, it is derived from the geometry) and a single category
    ``hard_negative``; image sizes are read from the rasters when they exist. Each row keeps the
    class the detector took it for: ``label`` and its name in ``predicted_class`` (the row's own
    ``class``; for rows of a bank written before it had one, named from ``classes``).

    Raises:
        DataError: ``fmt`` is neither ``geojson`` nor ``coco``.
    """
    if fmt not in FORMATS:
        raise DataError(f"bank export: format = {fmt!r}, expected 'geojson' or 'coco'")
    rows = rows.assign(predicted_class=class_names(rows, tuple(classes)))
    with atomic_path(Path(path)) as tmp:
        if fmt == "geojson":
            write_geojson([rows], tmp, Path(path).stem)
        else:
            tmp.write_text(json.dumps(_coco(rows, rasters), indent=1))
    return int(len(rows))


def _coco(rows: gpd.GeoDataFrame, rasters: Mapping[str, Any] | None) -> dict[str, Any]:
    """COCO detection dict of hard negatives in pixel coordinates."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (image, group) in enumerate(rows.groupby("image", sort=True), start=1):
        entry: dict[str, Any] = {"id": image_id, "file_name": str(image)}
        if Path(str(image)).is_file():
            try:
                info = open_raster(str(image))
                entry.update(width=int(info.width), height=int(info.height))
            except HemError:
                pass
        images.append(entry)
        px = group[list(PX_COLUMNS)].to_numpy(dtype=np.float64)
        missing = np.isnan(px).any(axis=1)
        if missing.any() and rasters and str(image) in rasters:
            bounds = shapely.bounds(np.asarray(group.geometry.values)[missing])
            px[missing] = map_to_pixel_boxes(bounds, rasters[str(image)])
        for (x0, y0, x1, y1), row in zip(px, group.itertuples(index=False), strict=True):
            if np.isnan([x0, y0, x1, y1]).any():
                continue
            w, h = float(x1 - x0), float(y1 - y0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "score": None if pd.isna(row.last_score) else float(row.last_score),
                    "neg_id": int(row.neg_id),
                    "predicted_label": int(row.label),
                    "predicted_class": str(row.predicted_class),
                }
            )
    return {
        "info": {"description": "hem-bootstrap negative bank (hard negatives)"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "hard_negative", "supercategory": "background"}],
    }
