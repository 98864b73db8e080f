"""The detection frame: its columns, its constructors, and the paired write / read of detection files.

* A tile / chip target is ``{"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,)}``;
  a negative or background chip has ``boxes`` of shape ``(0, 4)``. Label ids are 1..K for
  the classes in ``data.classes`` order (0 is background, the torchvision convention).
* A detection frame is a GeoDataFrame in the raster's CRS (``crs=None`` and pixel
  coordinates for plain images) with the columns in :data:`DETECTION_COLUMNS`, the pixel
  box in :data:`PX_COLUMNS` (authoritative: the map box is derived from it) and ``geometry``
  (an axis-aligned box polygon).
* A detection file holds one layer per CRS (:func:`write_detections`);
  :func:`read_detections` gives them back as one frame.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyarrow as pa
import pyogrio
import shapely
from pyogrio.raw import write_arrow

from hem_bootstrap.errors import DataError
from hem_bootstrap.files import atomic_path, temp_path
from hem_bootstrap.geo.frames import concat_native, distinct_crs, write_geojson
from hem_bootstrap.geo.raster import RasterInfo
from hem_bootstrap.geo.windows import pixel_to_map_boxes

log = logging.getLogger(__name__)

DETECTION_COLUMNS: tuple[str, ...] = ("image", "label", "score", "win_col", "win_row", "win_w", "win_h")
"""``image``: raster path as str; ``label``: int class id (1..K); ``score``: float in [0, 1];
``win_*``: the tile window (pixels) the detection came from."""
WIN_COLUMNS = ("win_col", "win_row", "win_w", "win_h")
"""The tile window a detection came from (pixels)."""
PX_COLUMNS = ("px_xmin", "px_ymin", "px_xmax", "px_ymax")
"""The detection's box in its own raster's pixels (authoritative for chips, matching and merging)."""


def detections_frame(
    image: str,
    info: RasterInfo,
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    windows: np.ndarray,
) -> gpd.GeoDataFrame:
    """Build a detection frame in the raster's CRS from image-pixel boxes."""
    map_boxes = pixel_to_map_boxes(boxes, info.transform) if len(boxes) else np.zeros((0, 4))
    geoms = shapely.box(map_boxes[:, 0], map_boxes[:, 1], map_boxes[:, 2], map_boxes[:, 3])
    frame = gpd.GeoDataFrame(
        {
            "image": [image] * len(boxes),
            "label": labels.astype(np.int64),
            "score": scores.astype(np.float64),
            "win_col": windows[:, 0].astype(np.int64),
            "win_row": windows[:, 1].astype(np.int64),
            "win_w": windows[:, 2].astype(np.int64),
            "win_h": windows[:, 3].astype(np.int64),
            "px_xmin": boxes[:, 0].astype(np.float64),
            "px_ymin": boxes[:, 1].astype(np.float64),
            "px_xmax": boxes[:, 2].astype(np.float64),
            "px_ymax": boxes[:, 3].astype(np.float64),
        },
        geometry=geoms,
        crs=info.crs if info.georeferenced else None,
    )
    return frame


def empty_detections(crs: object = None) -> gpd.GeoDataFrame:
    """A detection frame with no rows but every column."""
    z = np.zeros((0,), np.float64)
    cols = {c: z.astype(np.int64) for c in ("label", "win_col", "win_row", "win_w", "win_h")}
    frame = gpd.GeoDataFrame(
        {"image": np.array([], dtype=object), **cols, "score": z,
         "px_xmin": z, "px_ymin": z, "px_xmax": z, "px_ymax": z},
        geometry=[],
        crs=crs,
    )
    return frame[[*DETECTION_COLUMNS, *PX_COLUMNS, "geometry"]]


@dataclass(frozen=True)
class Naming:
    """What a detections file says about its classes and images: names in id order, raster sizes (COCO)."""

    classes: tuple[str, ...] = ()
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Raster path -> (width, height) in pixels."""

    def name(self, labels: np.ndarray) -> np.ndarray:
        """The class name of each label id (1..K; 0 is ``background``); ids beyond the names keep their number as text."""
        names = np.array([str(i) for i in range(int(labels.max(initial=0)) + 1)], dtype=object)
        names[0] = "background"
        names[1:len(self.classes) + 1] = list(self.classes)[: len(names) - 1]
        return names[labels.astype(np.int64)]


def write_detections(
    frames: Iterator[gpd.GeoDataFrame], out: Path, layer: str = "detections", naming: Naming | None = None,
    empty_crs: Any = None,
) -> tuple[int, list[str]]:
    """Stream detection frames into one file, written under a temporary name and renamed at the end.

    GeoPackage (``.gpkg``): one layer per CRS (``detections`` for the first CRS met,
    ``detections_<epsg>`` for others), appended frame by frame so memory stays flat.
    GeoJSON (``.geojson``, in WGS 84 lon/lat, each row's CRS in ``src_crs``) and COCO (``.json``)
    are converted from a temporary GeoPackage.
    With ``naming``, every row carries its ``class`` name next to the ``label`` id (an
    attribute in QGIS) and COCO files get named categories and each image's width and height.
    ``empty_crs`` is the CRS of the one empty layer written when no frame arrives (nothing of the
    rasters was scanned: outside the area of interest, no data), so that file opens in place too.
    Returns the number of rows and the layer names.

    Raises:
        DataError: an unsupported output format.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".gpkg", ".geojson", ".json"):
        raise DataError(f"{out}: unsupported output format '{suffix}', expected .gpkg, .geojson or .json (COCO)")
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = temp_path(out, ".gpkg")
    scratch.unlink(missing_ok=True)
    if naming is not None:
        frames = (_named(f, naming) for f in frames)
    try:
        total, layers = _stream_gpkg(frames, scratch, layer, named=naming is not None, empty_crs=empty_crs)
        if suffix == ".gpkg":
            os.replace(scratch, out)
        else:
            back = [gpd.read_file(scratch, layer=name) for name in layers]
            with atomic_path(out) as tmp:
                if suffix == ".geojson":
                    _check_geojson(back, out)
                    write_geojson(back, tmp, out.stem)
                else:
                    _write_coco(back, tmp, naming or Naming())
    finally:
        scratch.unlink(missing_ok=True)
    return total, layers


def _named(frame: gpd.GeoDataFrame, naming: Naming) -> gpd.GeoDataFrame:
    frame = frame.copy()
    frame.insert(int(frame.columns.get_loc("label")) + 1, "class", naming.name(frame["label"].to_numpy()))
    return frame


def _stream_gpkg(frames: Iterator[gpd.GeoDataFrame], path: Path, layer: str, named: bool = False,
                 empty_crs: Any = None) -> tuple[int, list[str]]:
    """Write frames into a GeoPackage, one layer per CRS; returns rows and layer names.

    Each run of frames in one CRS (a scan gives a raster's frames in turn) is one GDAL write
    session fed by an Arrow stream: memory stays flat, and the layer's R-tree is built once at
    the end of the session instead of row by row (3x fewer µs per row, measured).
    """
    layers: dict[str, str] = {}
    total = 0
    for key, run in itertools.groupby(frames, key=_crs_key):
        first = next(run)
        if key not in layers:
            layers[key] = layer if not layers else f"{layer}_{key.replace(':', '_').lower()}"
        total += _write_run(itertools.chain([first], run), path, layers[key], first.crs, named)  # noqa: B031 - read once
    if not layers:  # no raster gave a frame: the caller's CRS, if any
        _write_run(iter(()), path, layer, empty_crs, named)
        layers["pixel" if empty_crs is None else str(empty_crs)] = layer
    return total, list(layers.values())


def _write_run(frames: Iterator[gpd.GeoDataFrame], path: Path, layer: str, crs: Any, named: bool) -> int:
    """One write session of frames in one CRS into ``layer`` (created if new, else appended to); returns the rows.

    An exception raised while producing the frames (a bad raster, a signal) is raised again
    as itself, not as GDAL's report that the stream failed.
    """
    schema = _arrow_schema(named)
    rows = 0
    failed: list[BaseException] = []

    def batches() -> Iterator[pa.RecordBatch]:
        nonlocal rows
        try:
            for frame in frames:
                if len(frame):
                    rows += len(frame)
                    yield _arrow_batch(frame, schema)
        except BaseException as err:
            failed.append(err)
            raise

    try:
        with warnings.catch_warnings():  # plain images have no CRS to give
            warnings.filterwarnings("ignore", message="'crs' was not provided")
            write_arrow(pa.RecordBatchReader.from_batches(schema, batches()), path, layer=layer, driver="GPKG",
                        geometry_name="geometry", geometry_type="Polygon", crs=_crs_text(crs), append=path.exists())
    except BaseException:
        if failed:
            raise failed[0] from None
        raise
    return rows


def _arrow_schema(named: bool) -> pa.Schema:
    """The Arrow schema of a detection frame's columns (from :func:`empty_detections`), geometry as WKB."""
    frame = _named(empty_detections(), Naming()) if named else empty_detections()
    types = {np.dtype(np.int64): pa.int64(), np.dtype(np.float64): pa.float64()}
    fields = [pa.field(c, types.get(frame[c].dtype, pa.string())) for c in frame.columns if c != "geometry"]
    return pa.schema([*fields, pa.field("geometry", pa.binary())])


def _arrow_batch(frame: gpd.GeoDataFrame, schema: pa.Schema) -> pa.RecordBatch:
    """The frame as one Arrow batch, column by column (``pa.Table.from_pandas`` starts threads per call)."""
    columns = [pa.array(frame[f.name].to_numpy(), type=f.type) for f in schema if f.name != "geometry"]
    return pa.RecordBatch.from_arrays([*columns, pa.array(shapely.to_wkb(frame.geometry.values))], schema=schema)


def _crs_text(crs: Any) -> str | None:
    """The CRS as GDAL takes it: ``EPSG:n`` where there is a code, WKT otherwise."""
    if crs is None:
        return None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg else crs.to_wkt("WKT1_GDAL")


def _crs_key(frame: gpd.GeoDataFrame) -> str:
    return frame.crs.to_string() if frame.crs is not None else "pixel"


def _check_geojson(frames: list[gpd.GeoDataFrame], out: Path) -> None:
    """GeoJSON holds lon/lat or plain pixels, not both.

    Raises:
        DataError: pixel-space (not georeferenced) and georeferenced rows together.
    """
    frames = [f for f in frames if len(f)]
    if len(distinct_crs(frames)) > 1 and any(f.crs is None for f in frames):
        raise DataError(f"{out}: detections of plain (not georeferenced) and georeferenced rasters cannot share "
                        "one GeoJSON file; write .gpkg (one layer per CRS) or .json (COCO)")


def _write_coco(frames: list[gpd.GeoDataFrame], out: Path, naming: Naming) -> None:
    """COCO results with their images (and sizes, when known) and named categories (every class, detected or not)."""
    images: dict[str, int] = {}
    anns: list[dict[str, Any]] = []
    category_ids: set[int] = set(range(1, len(naming.classes) + 1))
    for frame in frames:
        for row in frame.itertuples(index=False):
            img_id = images.setdefault(row.image, len(images) + 1)
            w = float(row.px_xmax - row.px_xmin)
            h = float(row.px_ymax - row.px_ymin)
            category_ids.add(int(row.label))
            anns.append({
                "id": len(anns) + 1, "image_id": img_id, "category_id": int(row.label),
                "bbox": [float(row.px_xmin), float(row.px_ymin), w, h], "area": w * h,
                "score": float(row.score), "iscrowd": 0,
            })
    for image in naming.sizes:  # images scanned without a detection are still part of the result
        images.setdefault(image, len(images) + 1)
    ids = np.array(sorted(category_ids), dtype=np.int64)
    doc = {
        "images": [{"id": i, "file_name": name, **_size(naming.sizes.get(name))} for name, i in images.items()],
        "annotations": anns,
        "categories": [{"id": int(c), "name": str(n)} for c, n in zip(ids, naming.name(ids), strict=True)],
    }
    out.write_text(json.dumps(doc))


def _size(wh: tuple[int, int] | None) -> dict[str, int]:
    return {} if wh is None else {"width": int(wh[0]), "height": int(wh[1])}


def read_detections(path: Path) -> gpd.GeoDataFrame:
    """All layers of a detections file (one per CRS) as one frame.

    With more than one CRS the frame has none and each row keeps its raster's coordinates
    (:func:`~hem_bootstrap.geo.frames.concat_native`): its consumers work image by image.
    """
    every = [gpd.read_file(path, layer=name, use_arrow=True) for name, _ in pyogrio.list_layers(path)]
    frames = [f for f in every if len(f)]
    if not frames:  # an empty scan keeps its raster's CRS
        return empty_detections(every[0].crs if every else None)
    return concat_native(frames)
