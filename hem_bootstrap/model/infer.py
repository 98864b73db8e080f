"""The hot path: batched inference over large rasters, seam merging in map space, streaming output.

DataLoader workers read windows (each with its own raster handle) while the model runs on
batches; tiles without enough valid pixels never reach the model. Raw per-tile detections are
merged with class-aware NMS row band by row band (:class:`BandMerger`: the result equals a
whole-image merge) and yielded as detection frames (see :mod:`hem_bootstrap.contracts`), so
memory holds about one row of tiles' detections, never the pool's or a whole raster's.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import shapely
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from hem_bootstrap.config import DataConfig, ModelConfig, RuntimeConfig, TilingConfig
from hem_bootstrap.contracts import DETECTION_COLUMNS
from hem_bootstrap.data.tiles import TileDataset, TileRef, collate_tiles, plan_tiles, scale_tiles
from hem_bootstrap.errors import DataError
from hem_bootstrap.files import atomic_path, temp_path
from hem_bootstrap.geo.frames import concat_in_crs, concat_native, distinct_crs
from hem_bootstrap.geo.raster import RasterInfo, open_raster
from hem_bootstrap.geo.windows import pixel_to_map_boxes
from hem_bootstrap.model.precision import PreparedModel, prepare_model

log = logging.getLogger(__name__)

WRITE_BATCH_ROWS = 50_000
"""Detections buffered before one GeoPackage append (bounded memory, few file opens)."""
EDGE_MARGIN_PX = 2.0
"""A box closer than this to an inner tile edge counts as cut by that edge."""


@dataclass
class RawDetections:
    """Per-tile detections of one image in full-image pixel coordinates, before seam merging."""

    boxes: list[np.ndarray] = field(default_factory=list)  # (n, 4) xyxy image pixels
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    windows: list[np.ndarray] = field(default_factory=list)  # (n, 4) col, row, w, h
    cut: list[np.ndarray] = field(default_factory=list)  # (n,) bool: touches an inner tile edge

    def add(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, win: np.ndarray, cut: np.ndarray) -> None:
        """Append one tile's detections."""
        self.boxes.append(boxes)
        self.scores.append(scores)
        self.labels.append(labels)
        self.windows.append(np.repeat(win[None, :], len(boxes), axis=0))
        self.cut.append(cut)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Concatenated arrays (empty with the right shapes when nothing was detected)."""
        if not self.boxes:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros((0,), np.float32),
                np.zeros((0,), np.int64),
                np.zeros((0, 4), np.int64),
                np.zeros((0,), bool),
            )
        return (
            np.concatenate(self.boxes).astype(np.float32),
            np.concatenate(self.scores).astype(np.float32),
            np.concatenate(self.labels).astype(np.int64),
            np.concatenate(self.windows).astype(np.int64),
            np.concatenate(self.cut).astype(bool),
        )


@dataclass
class DetectStats:
    """What a scan did, for logs, the manifest and benchmarks."""

    tiles_total: int = 0
    tiles_run: int = 0
    tiles_skipped: int = 0
    detections: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    merge_seconds: float = 0.0
    wait_seconds: float = 0.0
    bad_rasters: list[str] = field(default_factory=list)
    fast_path: str = ""
    """The precision path the model ran (``auto`` resolved; see :mod:`hem_bootstrap.model.precision`)."""

    @property
    def tiles_per_s(self) -> float:
        """End-to-end tiles per second (skipped tiles included: they were read)."""
        return self.tiles_total / self.seconds if self.seconds > 0 else 0.0


def cut_by_inner_edge(
    boxes: np.ndarray,
    win: tuple[int, int, int, int],
    width: int,
    height: int,
    beyond: tuple[bool, bool, bool, bool] | None = None,
) -> np.ndarray:
    """Which boxes (image pixels) touch an edge of their tile that is a seam, not an edge of the data.

    Without ``beyond`` an edge is a seam when it lies inside the image; with it (valid data
    past the left, top, right, bottom edge) only where there is data on the other side, so a
    nodata collar acts like the image's border.
    """
    col, row, w, h = win
    if len(boxes) == 0:
        return np.zeros((0,), bool)
    m = EDGE_MARGIN_PX
    seam = beyond if beyond is not None else (col > 0, row > 0, col + w < width, row + h < height)
    left = (boxes[:, 0] <= col + m) & seam[0]
    top = (boxes[:, 1] <= row + m) & seam[1]
    right = (boxes[:, 2] >= col + w - m) & seam[2]
    bottom = (boxes[:, 3] >= row + h - m) & seam[3]
    return left | top | right | bottom


def _overlapping_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i != j``, of boxes that intersect (an STRtree query, never n x n)."""
    geoms = shapely.box(boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3])
    tree = shapely.STRtree(geoms)
    i, j = tree.query(geoms, predicate="intersects")
    off = i != j
    return i[off], j[off]


def _pair_overlaps(boxes: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection area and IoU of each pair."""
    lt = np.maximum(boxes[i, :2], boxes[j, :2])
    rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[i] + area[j] - inter
    return inter, inter / np.maximum(union, 1e-12)


def _covered_by_whole(
    boxes: np.ndarray, cut: np.ndarray, i: np.ndarray, j: np.ndarray, inter: np.ndarray
) -> np.ndarray:
    """Per pair: box ``i`` is cut by a tile edge and more than half covered by uncut box ``j`` (seam rule)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return cut[i] & ~cut[j] & (inter / np.maximum(area[i], 1e-12) > 0.5)


def merge_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    cut: np.ndarray,
    nms_iou: float,
    drop_cut: bool = True,
    pairs: tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """Indices kept after seam merging of one image's raw detections, highest score first.

    Boxes cut by an inner tile edge are dropped when an uncut box of the same class covers
    most of them (a neighbouring tile saw the object whole); then greedy class-aware NMS (the
    rule of ``torchvision.ops.batched_nms``: a box is suppressed by a kept, higher-ranked box of
    its class with IoU above ``nms_iou``). Overlaps come from a spatial index, so the cost grows
    with the number of overlapping pairs, not with the square of a large image's detections.
    Inputs are put in a canonical order first, so the result does not depend on the order tiles
    were processed in (one process or many). ``pairs``: the intersecting index pairs of
    ``boxes`` when the caller has them already (both directions), saving a spatial query.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -scores))
    b = boxes[order].astype(np.float64)
    lab = labels[order]
    c = cut[order].astype(bool)
    if pairs is None:
        i, j = _overlapping_pairs(b)
    else:
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        i, j = rank[pairs[0]], rank[pairs[1]]
    same = lab[i] == lab[j]
    i, j = i[same], j[same]
    inter, iou = _pair_overlaps(b, i, j)
    alive = np.ones(n, bool)
    if drop_cut and c.any() and (~c).any():
        alive[np.unique(i[_covered_by_whole(b, c, i, j, inter)])] = False
    # greedy NMS over the sparse overlap graph, in canonical (score-descending) order
    sup = iou > nms_iou
    i, j = i[sup], j[sup]
    srt = np.argsort(i, kind="stable")
    i, j = i[srt], j[srt]
    ptr = np.searchsorted(i, np.arange(n + 1))
    keep: list[int] = []
    for k in range(n):
        if not alive[k]:
            continue
        keep.append(k)
        nb = j[ptr[k] : ptr[k + 1]]
        alive[nb[nb > k]] = False
    return order[np.asarray(keep, dtype=np.int64)]


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
    assert all(col in frame.columns for col in DETECTION_COLUMNS)
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
    return frame[["image", "label", "score", "win_col", "win_row", "win_w", "win_h",
                  "px_xmin", "px_ymin", "px_xmax", "px_ymax", "geometry"]]


def usable_rasters(paths: list[Path], on_bad: str) -> tuple[list[Path], list[RasterInfo], list[str]]:
    """Open every raster once; a broken one is skipped (logged) or fails the scan, by config."""
    good: list[Path] = []
    infos: list[RasterInfo] = []
    bad: list[str] = []
    for p in paths:
        try:
            infos.append(open_raster(p))
            good.append(Path(p))
        except DataError as err:
            if on_bad == "fail":
                raise
            log.warning("skipping raster: %s", err)
            bad.append(f"{p}: {err}")
    return good, infos, bad


def shard_refs(refs: list[TileRef], rank: int, world: int) -> list[TileRef]:
    """A contiguous, balanced, deterministic share of the tiles for one rank."""
    n = len(refs)
    lo = (n * rank) // world
    hi = (n * (rank + 1)) // world
    return refs[lo:hi]


def detect_workers(runtime: RuntimeConfig, device: torch.device) -> int:
    """Reader processes of a scan: ``runtime.detect_workers``, else ``runtime.workers`` on CUDA and 0 on CPU.

    On CPU the model's intra-op threads use every core, so worker processes only take cycles
    from it (and hand tiles over through shared memory); reading in the model's process is
    cheaper. On 2 cores: 0.92 of the model-only ceiling with 0 workers, 0.83 with 2.
    """
    if runtime.detect_workers is not None:
        return runtime.detect_workers
    return runtime.workers if device.type == "cuda" else 0


def scan_raw(
    model: PreparedModel,
    paths: list[Path],
    infos: list[RasterInfo],
    refs: list[TileRef],
    data_cfg: DataConfig,
    runtime: RuntimeConfig,
    device: torch.device,
    stats: DetectStats,
    progress: bool = True,
    total_tiles: int | None = None,
    progress_scale: float = 1.0,
    bands: bool = False,
) -> Iterator[tuple[int, RawDetections, int | None]]:
    """Run the model over tiles in order; yield ``(image_idx, raw detections, frontier)``.

    ``frontier`` is ``None`` when the image ends. With ``bands``, a yield also comes each time
    a new row of tiles starts, with ``frontier`` = that row's first pixel row: no later tile
    of the image reaches above it, so boxes that end above it can be merged and written.
    The progress bar counts ``total_tiles``; each tile read advances it by ``progress_scale``,
    so rank 0 of a sharded scan can show the whole job's progress and rate from its own share.
    """
    if not refs:
        return
    workers = detect_workers(runtime, device)
    loader = DataLoader(
        TileDataset(paths, refs, data_cfg),
        batch_size=runtime.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_tiles,
        pin_memory=device.type == "cuda",
        prefetch_factor=runtime.prefetch if workers > 0 else None,
        persistent_workers=False,
    )
    current: int | None = None
    row: int | None = None
    raw = RawDetections()
    total = total_tiles or len(refs)
    bar = tqdm(total=total, unit="tile", disable=not progress, dynamic_ncols=True, desc="detect", leave=False)
    read, shown = 0, 0.0
    t0 = time.perf_counter()
    batches = iter(loader)
    with torch.inference_mode():
        while True:
            tw = time.perf_counter()
            batch = next(batches, None)  # time blocked here = the model waiting for reads
            stats.wait_seconds += time.perf_counter() - tw
            if batch is None:
                break
            n_in_batch = len(batch["image_idx"]) + batch["n_skipped"]
            stats.tiles_total += n_in_batch
            stats.tiles_skipped += batch["n_skipped"]
            for path, err in batch.get("errors", []):
                # one entry per raster: the first unreadable window's error
                if not any(b.startswith(f"{path}: ") for b in stats.bad_rasters):
                    stats.bad_rasters.append(f"{path}: {err}")
            read += n_in_batch
            shown_next = min(float(total), read * progress_scale)
            bar.update(round(shown_next) - round(shown))
            shown = shown_next
            if batch["images"] is None:
                continue
            images = batch["images"].to(device, non_blocking=True)
            if batch["scale"] is not None:  # uint8 tiles: scaled here, after the 4x smaller copy
                images = scale_tiles(images, *batch["scale"])
            if device.type == "cuda":
                images = images.contiguous(memory_format=torch.channels_last)
            tm = time.perf_counter()
            outputs = model(list(images))  # under the model's own autocast (see precision.py)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            stats.model_seconds += time.perf_counter() - tm
            stats.tiles_run += len(batch["image_idx"])
            for out, idx, win, beyond in zip(outputs, batch["image_idx"], batch["windows"], batch["beyond"],
                                             strict=True):
                if current is not None and idx != current:
                    yield current, raw, None
                    raw = RawDetections()
                    row = None
                elif bands and row is not None and win.row_off > row:
                    yield current, raw, int(win.row_off)  # type: ignore[misc]
                    raw = RawDetections()
                current, row = idx, int(win.row_off)
                boxes = out["boxes"].float().cpu().numpy()
                if len(boxes) == 0:
                    continue
                vw, vh = win.valid_width, win.valid_height
                # clip to the valid part of a padded tile, then shift to image pixels
                boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, vw)
                boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, vh)
                labels = out["labels"].cpu().numpy()
                # label 0 is background: torchvision's sigmoid heads (FCOS, RetinaNet) keep a
                # column for it that is never trained positive, yet can still score above the floor
                ok = (boxes[:, 2] - boxes[:, 0] > 0.5) & (boxes[:, 3] - boxes[:, 1] > 0.5) & (labels > 0)
                boxes = boxes[ok]
                boxes[:, [0, 2]] += win.col_off
                boxes[:, [1, 3]] += win.row_off
                info = infos[idx]
                w_arr = np.array([win.col_off, win.row_off, min(win.width, vw), min(win.height, vh)])
                cut = cut_by_inner_edge(boxes, tuple(w_arr), info.width, info.height, beyond)
                raw.add(
                    boxes,
                    out["scores"].float().cpu().numpy()[ok],
                    labels[ok],
                    w_arr,
                    cut,
                )
            if progress:
                el = time.perf_counter() - t0
                rate = shown / el if el > 0 else 0.0
                left = total - shown
                bar.set_postfix(tiles_s=f"{rate:.1f}", eta_s=f"{left / rate:.0f}" if rate else "?")
    bar.close()
    if current is not None:
        yield current, raw, None


def detect(
    model: torch.nn.Module,
    paths: list[Path],
    data_cfg: DataConfig,
    tiling: TilingConfig,
    model_cfg: ModelConfig,
    runtime: RuntimeConfig,
    device: torch.device,
    *,
    stats: DetectStats | None = None,
    progress: bool = True,
    drop_cut: bool = True,
) -> Iterator[gpd.GeoDataFrame]:
    """Detect objects over rasters; yields one merged detection frame per image, in the raster's CRS.

    Under ``torchrun`` use :func:`detect_distributed` instead, which shards tiles over ranks.
    """
    stats = stats if stats is not None else DetectStats()
    t0 = time.perf_counter()
    good, infos, bad = usable_rasters(paths, data_cfg.on_bad_raster)
    stats.bad_rasters.extend(bad)
    refs = plan_tiles(good, tiling)
    prepared = prepare_model(model, device, model_cfg, runtime, tiling.tile_size)
    stats.fast_path = prepared.fast_path
    merger: BandMerger | None = None
    for idx, raw, frontier in scan_raw(prepared, good, infos, refs, data_cfg, runtime, device, stats, progress,
                                       bands=True):
        if merger is None or merger.image != idx:
            merger = BandMerger(idx, model_cfg.nms_iou, drop_cut)
        tm = time.perf_counter()
        merger.add(raw)
        kept = merger.flush(frontier)
        frame = detections_frame(str(good[idx]), infos[idx], *kept)
        stats.merge_seconds += time.perf_counter() - tm
        if len(frame) or frontier is None:  # an image's last frame comes even when empty (its CRS layer)
            stats.detections += len(frame)
            yield frame
        stats.seconds = time.perf_counter() - t0
    stats.seconds = time.perf_counter() - t0


class BandMerger:
    """Seam merging of one image, row band by row band, with the same result as merging it whole.

    Raw detections wait here until no later tile can touch them. At a frontier (the first
    pixel row of the next tile row) a pending box is final when neither it nor anything linked
    to it through a chain of links (pairs that NMS or the cut-box rule acts on, see
    :func:`_linked_to`) reaches the frontier: the merge of a box depends on nothing else, so
    those boxes are merged now, exactly as a whole-image merge would, and the rest wait. Memory holds about one row of tiles'
    detections, whatever the raster size.
    """

    def __init__(self, image: int, nms_iou: float, drop_cut: bool) -> None:
        self.image = image
        self.nms_iou = nms_iou
        self.drop_cut = drop_cut
        self.pending = RawDetections()

    def add(self, raw: RawDetections) -> None:
        """Queue one band's raw detections."""
        for name in ("boxes", "scores", "labels", "windows", "cut"):
            getattr(self.pending, name).extend(getattr(raw, name))

    def flush(self, frontier: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Merge and return ``(boxes, scores, labels, windows)`` that are final at ``frontier`` (None: all)."""
        boxes, scores, labels, windows, cut = self.pending.arrays()
        i, j = _overlapping_pairs(boxes.astype(np.float64)) if len(boxes) else (np.zeros(0, np.int64),) * 2
        if frontier is None:
            done = np.ones(len(boxes), bool)
        else:
            reach = boxes[:, 3] >= frontier
            done = ~_linked_to(boxes, labels, cut, reach, self.nms_iou, self.drop_cut, (i, j))
        rest = ~done
        self.pending = RawDetections()
        if rest.any():
            self.pending.boxes.append(boxes[rest])
            self.pending.scores.append(scores[rest])
            self.pending.labels.append(labels[rest])
            self.pending.windows.append(windows[rest])
            self.pending.cut.append(cut[rest])
        sel = np.flatnonzero(done)
        local = np.full(len(boxes), -1, np.int64)
        local[sel] = np.arange(len(sel))
        both = done[i] & done[j]  # a finished box never overlaps a waiting one that matters
        sub = (local[i[both]], local[j[both]])
        keep = sel[merge_detections(boxes[sel], scores[sel], labels[sel], cut[sel], self.nms_iou, self.drop_cut, sub)]
        return boxes[keep], scores[keep], labels[keep], windows[keep]


def _linked_to(
    boxes: np.ndarray,
    labels: np.ndarray,
    cut: np.ndarray,
    seed: np.ndarray,
    nms_iou: float,
    drop_cut: bool,
    pairs: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """``seed`` grown along the links that decide a merge, until closed.

    Two boxes are linked when one can remove the other in :func:`merge_detections`: same class
    and IoU above ``nms_iou`` (NMS), or a cut box more than half covered by an uncut one
    (seams). Mere touching is no link, so the marked set stays local even in dense scenes.
    """
    mark = seed.copy()
    if not mark.any() or mark.all():
        return mark
    b = boxes.astype(np.float64)
    i, j = pairs
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    inter, iou = _pair_overlaps(b, i, j)
    link = iou > nms_iou
    if drop_cut:
        c = cut.astype(bool)
        link |= _covered_by_whole(b, c, i, j, inter) | _covered_by_whole(b, c, j, i, inter)
    i, j = i[link], j[link]
    while True:
        grow = mark[i] & ~mark[j]
        if not grow.any():
            return mark
        mark[j[grow]] = True


def _merged_frame(path: Path, info: RasterInfo, raw: RawDetections, nms_iou: float, drop_cut: bool) -> gpd.GeoDataFrame:
    boxes, scores, labels, windows, cut = raw.arrays()
    keep = merge_detections(boxes, scores, labels, cut, nms_iou, drop_cut)
    return detections_frame(str(path), info, boxes[keep], scores[keep], labels[keep], windows[keep])


def write_detections(
    frames: Iterator[gpd.GeoDataFrame], out: Path, layer: str = "detections"
) -> tuple[int, list[str]]:
    """Stream detection frames into one file, written under a temporary name and renamed at the end.

    GeoPackage (``.gpkg``): one layer per CRS (``detections`` for the first CRS met,
    ``detections_<epsg>`` for others), appended frame by frame so memory stays flat.
    GeoJSON (``.geojson``) and COCO (``.json``) are converted from a temporary GeoPackage.
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
    try:
        total, layers = _stream_gpkg(frames, scratch, layer)
        if suffix == ".gpkg":
            os.replace(scratch, out)
        else:
            back = [gpd.read_file(scratch, layer=name) for name in layers]
            with atomic_path(out) as tmp:
                if suffix == ".geojson":
                    _geojson_frame(back, out).to_file(tmp, driver="GeoJSON")
                else:
                    _write_coco(back, tmp)
    finally:
        scratch.unlink(missing_ok=True)
    return total, layers


def _stream_gpkg(frames: Iterator[gpd.GeoDataFrame], path: Path, layer: str) -> tuple[int, list[str]]:
    """Append frames to a GeoPackage, one layer per CRS, ~50k rows per write; returns rows and layer names."""
    layers: dict[str, str] = {}
    total = 0
    buffer: list[gpd.GeoDataFrame] = []

    def flush() -> None:
        if buffer:
            chunk = buffer[0] if len(buffer) == 1 else pd.concat(buffer, ignore_index=True)
            pyogrio.write_dataframe(chunk, path, layer=layers[_crs_key(chunk)], driver="GPKG", append=True)
        buffer.clear()

    for frame in frames:
        key = _crs_key(frame)
        if buffer and buffer[0].crs != frame.crs:
            flush()
        if key not in layers:
            layers[key] = layer if not layers else f"{layer}_{key.replace(':', '_').lower()}"
            pyogrio.write_dataframe(empty_detections(frame.crs), path, layer=layers[key], driver="GPKG",
                                    append=path.exists())
        if len(frame):
            buffer.append(frame)
            if sum(len(f) for f in buffer) >= WRITE_BATCH_ROWS:  # one append per ~50k rows, not per row band
                flush()
        total += len(frame)
    flush()
    if not layers:
        pyogrio.write_dataframe(empty_detections(None), path, layer=layer, driver="GPKG")
        layers["pixel"] = layer
    return total, list(layers.values())


def _crs_key(frame: gpd.GeoDataFrame) -> str:
    return frame.crs.to_string() if frame.crs is not None else "pixel"


def _geojson_frame(frames: list[gpd.GeoDataFrame], out: Path) -> gpd.GeoDataFrame:
    """One frame for a GeoJSON file: as it is for one CRS; for several, all in WGS 84 (GeoJSON's own CRS).

    Each row keeps its raster's CRS in ``src_crs``; pixel boxes stay in the ``px_*`` columns.

    Raises:
        DataError: pixel-space (not georeferenced) and georeferenced rows together.
    """
    frames = [f for f in frames if len(f)] or frames[:1]
    if len(distinct_crs(frames)) == 1:
        return frames[0] if len(frames) == 1 else concat_native(frames)
    if any(f.crs is None for f in frames):
        raise DataError(f"{out}: detections of plain (not georeferenced) and georeferenced rasters cannot share "
                        "one GeoJSON file; write .gpkg (one layer per CRS) or .json (COCO)")
    log.info("%s: detections in %d CRSs written in EPSG:4326 (each row's own CRS in src_crs)", out, len(frames))
    return concat_in_crs(frames, "EPSG:4326")


def _write_coco(frames: list[gpd.GeoDataFrame], out: Path) -> None:
    images: dict[str, int] = {}
    anns: list[dict[str, Any]] = []
    category_ids: set[int] = set()
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
    doc = {
        "images": [{"id": i, "file_name": name} for name, i in images.items()],
        "annotations": anns,
        "categories": [{"id": c, "name": str(c)} for c in sorted(category_ids)],
    }
    out.write_text(json.dumps(doc))
