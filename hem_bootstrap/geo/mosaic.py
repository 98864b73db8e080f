"""Image sets whose rasters are tiles of one mosaic, read as one raster through a GDAL VRT.

Orthophotos ship as grids of files. Scanned file by file, an object on a file boundary is cut
in two and found twice or not at all. When every raster of a set shares CRS, resolution, band
layout and pixel grid and no two overlap, the set is read through a VRT that places each file
at its offset in one mosaic (:func:`mosaic_paths`), so tiling, seam merging, mining, chips
and evaluation all see one raster. Ground no file covers is masked invalid (the VRT's mask
band is built from the files' own masks), so it is never searched or counted as area.

Rasters that differ or overlap are not merged: one log line says why they are read one by one.
The VRT is written once per set of files (by their paths, sizes and modification times) under
``$HEM_CACHE_DIR/mosaics`` (default ``~/.cache/hem-bootstrap``); it refers to the files by
absolute path.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import escape

import shapely

from hem_bootstrap.files import atomic_write_text
from hem_bootstrap.geo.raster import RasterInfo, open_raster
from hem_bootstrap.remote import is_remote, shown

log = logging.getLogger(__name__)

GRID_TOLERANCE = 1e-3
"""Largest offset, in pixels, between a file's origin and the mosaic's pixel grid."""


@dataclass(frozen=True)
class _Member:
    info: RasterInfo
    col: int
    row: int


def mosaic_paths(paths: list[Path], what: str) -> list[Path]:
    """``paths``, or ``[vrt]`` when they are adjacent tiles of one mosaic (logged either way when several).

    Args:
        paths: The rasters of one image set.
        what: The set, for the log line (e.g. ``data.pool[0]``).
    """
    if len(paths) < 2 or any(is_remote(p) for p in paths):
        return paths
    try:
        infos = [open_raster(p) for p in paths]
    except Exception:  # noqa: BLE001 - a bad raster is reported, file by file, by the checks that follow
        return paths
    reason = why_not_one_mosaic(infos)
    if reason is not None:
        log.info("%s: %d rasters read one by one, not as one mosaic: %s", what, len(paths), reason)
        return paths
    members = _place(infos)
    width = max(m.col + m.info.width for m in members)
    height = max(m.row + m.info.height for m in members)
    vrt = _write_vrt(members, width, height)
    log.info("%s: %d rasters are tiles of one mosaic (%d x %d px, %s, %.3g m), read as one: %s", what, len(paths),
             width, height, infos[0].crs, abs(infos[0].res[0]), vrt)
    return [vrt]


def why_not_one_mosaic(infos: list[RasterInfo]) -> str | None:
    """Why these rasters cannot be read as one mosaic, or None when they can."""
    first = infos[0]
    names = [i.path.name for i in infos]
    if not all(i.georeferenced for i in infos):
        return "not all are georeferenced"
    if len({str(i.crs) for i in infos}) > 1:
        return f"they are in different CRSs ({', '.join(sorted({str(i.crs) for i in infos}))})"
    if any(not math.isclose(i.res[0], first.res[0], rel_tol=1e-6) or not math.isclose(i.res[1], first.res[1],
                                                                                         rel_tol=1e-6) for i in infos):
        gsds = sorted({f"{n} {abs(i.res[0]):.3g} m" for n, i in zip(names, infos, strict=True)})
        return f"their resolutions differ ({', '.join(gsds)}); set data.gsd to read them at one"
    if any(i.transform.b != 0 or i.transform.d != 0 for i in infos):
        return "some are rotated"
    if len({(i.count, i.dtypes) for i in infos}) > 1:
        return "their bands differ in number or type"
    offsets = [_offset(first, i) for i in infos]
    off_grid = [n for n, (c, r) in zip(names, offsets, strict=True)
                if abs(c - round(c)) > GRID_TOLERANCE or abs(r - round(r)) > GRID_TOLERANCE]
    if off_grid:
        return f"{off_grid[0]} is not on the others' pixel grid"
    boxes = [shapely.box(round(c), round(r), round(c) + i.width, round(r) + i.height)
             for (c, r), i in zip(offsets, infos, strict=True)]
    tree = shapely.STRtree(boxes)
    a, b = tree.query(boxes, predicate="overlaps")
    pairs = [(int(x), int(y)) for x, y in zip(a, b, strict=True) if x < y]
    pairs += [(int(x), int(y)) for x, y in zip(*tree.query(boxes, predicate="contains"), strict=True) if x != y]
    if pairs:
        x, y = pairs[0]
        return f"{names[x]} and {names[y]} overlap"
    return None


def _offset(ref: RasterInfo, info: RasterInfo) -> tuple[float, float]:
    """``info``'s origin in ``ref``'s pixel grid (column, row)."""
    col, row = ~ref.transform @ (info.transform.c, info.transform.f)
    return float(col), float(row)


def _place(infos: list[RasterInfo]) -> list[_Member]:
    """Each raster's integer offset in the mosaic whose origin is the top-left of them all."""
    offsets = [tuple(round(v) for v in _offset(infos[0], i)) for i in infos]
    c0, r0 = min(c for c, _ in offsets), min(r for _, r in offsets)
    return [_Member(i, c - c0, r - r0) for i, (c, r) in zip(infos, offsets, strict=True)]


def _write_vrt(members: list[_Member], width: int, height: int) -> Path:
    """The VRT of the mosaic in the cache (written only when that set of files has none yet)."""
    key = hashlib.sha256()
    for m in members:
        st = os.stat(m.info.path)
        key.update(f"{m.info.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{m.col}|{m.row}\n".encode())
    root = Path(os.environ.get("HEM_CACHE_DIR") or Path.home() / ".cache" / "hem-bootstrap") / "mosaics"
    path = root / f"mosaic_{key.hexdigest()[:16]}.vrt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _vrt_xml(members, width, height))
    return path


def _vrt_xml(members: list[_Member], width: int, height: int) -> str:
    first, t = members[0].info, members[0].info.transform
    x0, y0 = t @ (-members[0].col, -members[0].row)  # the mosaic's pixel (0, 0), in the first file's grid
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"  <SRS>{escape(first.crs.to_wkt() if first.crs is not None else '')}</SRS>",
             f"  <GeoTransform>{x0!r}, {t.a!r}, 0.0, {y0!r}, 0.0, {t.e!r}</GeoTransform>"]
    for band in range(1, first.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{_gdal_type(first.dtypes[band - 1])}" band="{band}">')
        lines += [_source(m, str(band)) for m in members]
        lines.append("  </VRTRasterBand>")
    lines.append('  <MaskBand>\n    <VRTRasterBand dataType="Byte">')
    lines += [_source(m, "mask,1") for m in members]
    lines.append("    </VRTRasterBand>\n  </MaskBand>\n</VRTDataset>\n")
    return "\n".join(lines)


def _source(m: _Member, band: str) -> str:
    w, h = m.info.width, m.info.height
    return (f"    <SimpleSource><SourceFilename relativeToVRT=\"0\">{escape(shown(m.info.path.resolve()))}"
            f"</SourceFilename><SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{w}" ySize="{h}"/>'
            f'<DstRect xOff="{m.col}" yOff="{m.row}" xSize="{w}" ySize="{h}"/></SimpleSource>')


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}


def _gdal_type(dtype: str) -> str:
    return _GDAL_TYPES[str(dtype)]
