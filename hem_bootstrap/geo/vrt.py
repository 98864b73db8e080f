"""Virtual rasters: the files of an image set as the rasters the model should see, through GDAL VRTs.

Two jobs, one mechanism (a VRT places each file's pixels, resampled or not, in one grid):

* **Mosaics.** Orthophotos ship as grids of files. Scanned file by file, an object on a file
  boundary is cut in two and found twice or not at all. When every raster of a set shares
  CRS, resolution (after resampling), band layout and pixel grid and no two overlap, the set
  is read through one VRT that places each file at its offset, so tiling, seam merging,
  mining, chips and evaluation all see one raster. Ground no file covers is masked invalid
  (the VRT's mask band is built from the files' own masks), so it is never searched or
  counted as area. Rasters that differ or overlap are not merged: one log line says why.
* **One ground resolution.** With ``data.gsd``, a raster of another ground sample distance
  is read through a VRT at that GSD (``data.resampling``; ``auto``: ``average`` when
  shrinking, ``bilinear`` when enlarging), so a 0.10 m and a 0.20 m raster of the same ground
  look alike to the model. Windows, chips and boxes are in the VRT's pixels; detections go
  back to map coordinates through its transform, as for any raster.

A VRT is written once per set of files and settings (by paths, sizes, modification times and
target grid) under ``$HEM_CACHE_DIR/vrt`` (default ``~/.cache/hem-bootstrap``); it refers to
the files by absolute path. Detections of a virtual raster name the VRT in their ``image``.
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
from affine import Affine

from hem_bootstrap.files import atomic_write_text, cache_dir
from hem_bootstrap.geo.raster import RasterInfo, open_raster
from hem_bootstrap.remote import is_remote, shown

log = logging.getLogger(__name__)

GRID_TOLERANCE = 1e-3
"""Largest offset, in target pixels, between a file's origin and the mosaic's pixel grid."""


@dataclass(frozen=True)
class _Member:
    """One file in a virtual raster: where its pixels go (offset and size in the VRT's grid) and how."""

    info: RasterInfo
    col: int
    row: int
    width: int
    height: int
    resampling: str | None


def virtual_paths(paths: list[Path], what: str, labels: str | None = None, mosaic: bool = True,
                  gsd: float | None = None, resampling: str = "auto") -> list[Path]:
    """The rasters an image set is read as: ``paths``, one mosaic VRT, or VRTs at ``gsd`` (logged when not plain).

    Args:
        paths: The files of one image set.
        what: The set, for log lines (e.g. ``data.pool[0]``).
        labels: The set's label file: pixel-CSV labels name their image files, so such a set stays file by file.
        mosaic: Whether adjacent tiles may be read as one mosaic (``mosaic: auto``).
        gsd: Ground sample distance in metres to read every raster at (``data.gsd``), or None.
        resampling: ``data.resampling``.
    """
    if not paths or any(is_remote(p) for p in paths) or (gsd is None and (len(paths) < 2 or not mosaic)):
        return paths  # nothing to decide: no header is opened twice
    try:
        infos = [open_raster(p) for p in paths]
    except Exception:  # noqa: BLE001 - a bad raster is reported, file by file, by the checks that follow
        return paths
    if gsd is not None and not all(i.georeferenced and i.transform.b == 0 == i.transform.d for i in infos):
        log.warning("%s: data.gsd = %s needs georeferenced, north-up rasters; read as they are", what, gsd)
        gsd = None
    if mosaic and len(paths) > 1:
        reason = why_not_one_mosaic(infos, gsd, labels)
        if reason is None:
            members, res = _place(infos, gsd, resampling)
            vrt = _write_vrt(members, res)
            log.info("%s: %d rasters are tiles of one mosaic (%d x %d px, %s, %.3g m), read as one: %s", what,
                     len(paths), *_size(members), infos[0].crs, gsd or abs(infos[0].res[0]), vrt)
            return [vrt]
        log.info("%s: %d rasters read one by one, not as one mosaic: %s", what, len(paths), reason)
    if gsd is None:
        return paths
    out = [_write_vrt(*_place([i], gsd, resampling)) if _needs_resampling(i, gsd) else p
           for p, i in zip(paths, infos, strict=True)]
    moved = [f"{i.path.name} {_gsd(i):.3g} m" for i in infos if _needs_resampling(i, gsd)]
    if moved:
        log.info("%s: %d raster(s) read at data.gsd = %.3g m: %s", what, len(moved), gsd, ", ".join(moved))
    return out


def why_not_one_mosaic(infos: list[RasterInfo], gsd: float | None = None, labels: str | None = None) -> str | None:
    """Why these rasters cannot be read as one mosaic (at ``gsd`` when given), or None when they can."""
    first = infos[0]
    names = [i.path.name for i in infos]
    if labels is not None and Path(labels).suffix.lower() == ".csv":
        return "pixel-CSV labels name their files"
    if not all(i.georeferenced for i in infos):
        return "not all are georeferenced"
    if len({str(i.crs) for i in infos}) > 1:
        return f"they are in different CRSs ({', '.join(sorted({str(i.crs) for i in infos}))})"
    if any(i.transform.b != 0 or i.transform.d != 0 for i in infos):
        return "some are rotated"
    res = [_target_res(i, gsd) for i in infos]
    if any(not (math.isclose(r[0], res[0][0], rel_tol=1e-6) and math.isclose(r[1], res[0][1], rel_tol=1e-6))
           for r in res):
        gsds = sorted({f"{n} {_gsd(i):.3g} m" for n, i in zip(names, infos, strict=True)})
        return f"their resolutions differ ({', '.join(gsds)}); set data.gsd to read them at one"
    if len({(i.count, i.dtypes) for i in infos}) > 1:
        return "their bands differ in number or type"
    grid = _grid(first, res[0])
    offsets = [_offset(grid, i) for i in infos]
    off_grid = [n for n, (c, r) in zip(names, offsets, strict=True)
                if abs(c - round(c)) > GRID_TOLERANCE or abs(r - round(r)) > GRID_TOLERANCE]
    if off_grid:
        return f"{off_grid[0]} is not on the others' pixel grid"
    sizes = [_dest_size(i, res[0]) for i in infos]
    boxes = [shapely.box(round(c), round(r), round(c) + w, round(r) + h)
             for (c, r), (w, h) in zip(offsets, sizes, strict=True)]
    tree = shapely.STRtree(boxes)
    pairs = [(int(x), int(y)) for x, y in zip(*tree.query(boxes, predicate="overlaps"), strict=True) if x < y]
    pairs += [(int(x), int(y)) for x, y in zip(*tree.query(boxes, predicate="contains"), strict=True) if x != y]
    if pairs:
        x, y = pairs[0]
        return f"{names[x]} and {names[y]} overlap"
    return None


def _gsd(info: RasterInfo) -> float:
    return float(info.pixel_size_m()[0])


def _needs_resampling(info: RasterInfo, gsd: float) -> bool:
    return not math.isclose(_gsd(info), gsd, rel_tol=1e-6)


def _target_res(info: RasterInfo, gsd: float | None) -> tuple[float, float]:
    """Pixel size in CRS units (x, y; y negative for north-up) of ``info`` read at ``gsd`` metres."""
    if gsd is None:
        return float(info.transform.a), float(info.transform.e)
    mx, my = info.pixel_size_m()
    return float(info.transform.a) * gsd / mx, float(info.transform.e) * gsd / my


def _grid(info: RasterInfo, res: tuple[float, float]) -> Affine:
    """A pixel grid of resolution ``res`` whose origin is ``info``'s top-left corner."""
    return Affine(res[0], 0.0, info.transform.c, 0.0, res[1], info.transform.f)


def _offset(grid: Affine, info: RasterInfo) -> tuple[float, float]:
    """``info``'s top-left corner in ``grid``'s pixels (column, row)."""
    col, row = ~grid @ (info.transform.c, info.transform.f)
    return float(col), float(row)


def _dest_size(info: RasterInfo, res: tuple[float, float]) -> tuple[int, int]:
    """``info``'s size in pixels of ``res``."""
    return (max(1, round(info.width * info.transform.a / res[0])),
            max(1, round(info.height * info.transform.e / res[1])))


def _place(infos: list[RasterInfo], gsd: float | None, resampling: str) -> tuple[list[_Member], tuple[float, float]]:
    """Each raster's offset and size in the virtual raster (whose origin is the top-left of them all), and its
    pixel size in CRS units."""
    res = _target_res(infos[0], gsd)
    grid = _grid(infos[0], res)
    offsets = [tuple(round(v) for v in _offset(grid, i)) for i in infos]
    c0, r0 = min(c for c, _ in offsets), min(r for _, r in offsets)
    members = []
    for info, (c, r) in zip(infos, offsets, strict=True):
        w, h = _dest_size(info, res)
        how = None
        if (w, h) != (info.width, info.height):
            how = resampling if resampling != "auto" else ("average" if w < info.width else "bilinear")
        members.append(_Member(info, c - c0, r - r0, w, h, how))
    return members, res


def _size(members: list[_Member]) -> tuple[int, int]:
    return max(m.col + m.width for m in members), max(m.row + m.height for m in members)


def _write_vrt(members: list[_Member], res: tuple[float, float]) -> Path:
    """The VRT of ``members`` in the cache (written only when that set of files and grid has none yet)."""
    key = hashlib.sha256()
    for m in members:
        st = os.stat(m.info.path)
        key.update(f"{m.info.path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{m.col}|{m.row}|{m.width}|{m.height}|"
                   f"{m.resampling}|{res}\n".encode())
    root = cache_dir() / "vrt"
    stem = "mosaic" if len(members) > 1 else members[0].info.path.stem
    path = root / f"{stem}_{key.hexdigest()[:16]}.vrt"
    if not path.exists():
        root.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, _vrt_xml(members, res))
    return path


def _vrt_xml(members: list[_Member], res: tuple[float, float]) -> str:
    first = members[0]
    info = first.info
    x0, y0 = _grid(info, res) @ (-first.col, -first.row)  # the VRT's pixel (0, 0)
    width, height = _size(members)
    wkt = info.crs.to_wkt() if info.crs is not None else ""
    lines = [f'<VRTDataset rasterXSize="{width}" rasterYSize="{height}">',
             f"  <SRS>{escape(wkt)}</SRS>",
             f"  <GeoTransform>{x0!r}, {res[0]!r}, 0.0, {y0!r}, 0.0, {res[1]!r}</GeoTransform>"]
    for band in range(1, info.count + 1):
        lines.append(f'  <VRTRasterBand dataType="{_GDAL_TYPES[str(info.dtypes[band - 1])]}" band="{band}">')
        lines += [_source(m, str(band), m.resampling) for m in members]
        lines.append("  </VRTRasterBand>")
    lines.append('  <MaskBand>\n    <VRTRasterBand dataType="Byte">')
    lines += [_source(m, "mask,1", "nearest" if m.resampling else None) for m in members]
    lines.append("    </VRTRasterBand>\n  </MaskBand>\n</VRTDataset>\n")
    return "\n".join(lines)


def _source(m: _Member, band: str, resampling: str | None) -> str:
    how = f' resampling="{resampling}"' if resampling else ""
    return (f"    <SimpleSource{how}><SourceFilename relativeToVRT=\"0\">{escape(shown(m.info.path.resolve()))}"
            f"</SourceFilename><SourceBand>{band}</SourceBand>"
            f'<SrcRect xOff="0" yOff="0" xSize="{m.info.width}" ySize="{m.info.height}"/>'
            f'<DstRect xOff="{m.col}" yOff="{m.row}" xSize="{m.width}" ySize="{m.height}"/></SimpleSource>')


_GDAL_TYPES = {"uint8": "Byte", "int8": "Int8", "uint16": "UInt16", "int16": "Int16", "uint32": "UInt32",
               "int32": "Int32", "float32": "Float32", "float64": "Float64"}
