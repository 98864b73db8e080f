"""Joining frames whose rows live in different CRSs (a pool or test set spanning two UTM zones).

Detection, label and bank frames carry pixel boxes (authoritative, per raster) and a map
geometry in their raster's CRS. Frames of rasters in different CRSs cannot simply be
concatenated (geopandas refuses to guess a common CRS). Two ways out, for two uses:

* :func:`concat_native`: rows keep their own raster's coordinates and the frame has no CRS;
  for consumers that work image by image and set each image's CRS themselves (matching,
  evaluation).
* :func:`concat_in_crs`: every row reprojected to one CRS, its own kept in ``src_crs``; for
  frames written as one layer or merged across images (mined negatives, the bank).

:func:`write_geojson` writes any of them as GeoJSON the way RFC 7946 and web maps expect: in
lon/lat (WGS 84), each row's own CRS in ``src_crs``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd
import pyogrio
import pyproj


def crs_text(crs: Any) -> str:
    """``AUTH:CODE`` of a CRS (WKT when it has no authority code); ``""`` for none (pixel space)."""
    if crs is None:
        return ""
    c = pyproj.CRS.from_user_input(crs)
    auth = c.to_authority()
    return f"{auth[0]}:{auth[1]}" if auth else c.to_wkt()


def distinct_crs(frames: Sequence[gpd.GeoDataFrame]) -> list[Any]:
    """The different CRSs of ``frames``, in order of first appearance (``None`` counts as one)."""
    out: list[Any] = []
    for f in frames:
        if not any((f.crs is None and c is None) or (f.crs is not None and c is not None and f.crs == c) for c in out):
            out.append(f.crs)
    return out


def concat_native(frames: Sequence[gpd.GeoDataFrame]) -> gpd.GeoDataFrame:
    """Concatenate frames; with several CRSs each row keeps its coordinates and the result has no CRS."""
    frames = [f for f in frames if f is not None]
    if not frames:
        return gpd.GeoDataFrame(geometry=[])
    if len(frames) == 1:
        return frames[0]
    if len(distinct_crs(frames)) == 1:
        return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), geometry="geometry", crs=frames[0].crs)
    plain = [f.set_crs(None, allow_override=True) for f in frames]
    return gpd.GeoDataFrame(pd.concat(plain, ignore_index=True), geometry="geometry", crs=None)


def concat_in_crs(frames: Sequence[gpd.GeoDataFrame], crs: Any) -> gpd.GeoDataFrame:
    """Concatenate frames reprojected to ``crs`` (None: the first frame's), each row's own CRS in ``src_crs``.

    A row already carrying ``src_crs`` keeps it. Frames without a CRS (pixel space) are
    taken as they are.
    """
    frames = [f for f in frames if f is not None]
    if not frames:
        return gpd.GeoDataFrame({"src_crs": pd.Series([], dtype=object)}, geometry=[], crs=crs)
    target = crs if crs is not None else frames[0].crs
    moved = []
    for f in frames:
        f = f if "src_crs" in f.columns else f.assign(src_crs=crs_text(f.crs))
        if f.crs is not None and target is not None and f.crs != target:
            f = f.to_crs(target)
        moved.append(f.set_crs(None, allow_override=True))
    return gpd.GeoDataFrame(pd.concat(moved, ignore_index=True), geometry="geometry", crs=target)


def write_geojson(frames: Sequence[gpd.GeoDataFrame], path: Path, name: str) -> None:
    """Write ``frames`` as one GeoJSON FeatureCollection called ``name``, in WGS 84 lon/lat (RFC 7946).

    Each row keeps its raster's CRS in ``src_crs`` (pixel boxes stay in their ``px_*`` columns).
    Frames without a CRS (plain images) are written in their pixel coordinates, as GeoJSON
    without a CRS; they cannot share a file with georeferenced ones (the caller checks).
    """
    frames = [f for f in frames if len(f)] or list(frames[:1])
    georeferenced = [f for f in frames if f.crs is not None]
    frame = concat_in_crs(georeferenced, "EPSG:4326") if georeferenced else concat_native(frames)
    options = {"RFC7946": "YES"} if georeferenced else {}
    with warnings.catch_warnings():  # plain images have no CRS to give
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        pyogrio.write_dataframe(frame, path, driver="GeoJSON", layer=name, geometry_type="Polygon",
                                layer_options=options)
