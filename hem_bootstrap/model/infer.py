"""The hot path: batched inference over large rasters, one driver for one process and for torchrun.

On a CPU a long scan runs single-threaded model replicas, forked workers that each read and run
their own batches and hand back only detections (:mod:`hem_bootstrap.model.replicas`); a short
one reads tiles in the model's process. On CUDA DataLoader workers (each with its own raster
handle) or a reader thread read while the model runs on batches. Tiles without enough valid
pixels never reach the model. Raw per-tile detections are seam-merged (:mod:`hem_bootstrap.model.merge`)
row band by row band in one process, so memory holds about one row of tiles' detections;
under torchrun every rank scans a contiguous share of the tiles and rank 0 merges whole
images, with the same result. Frames follow :mod:`hem_bootstrap.detections`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import torch
from shapely.geometry.base import BaseGeometry
from torch.utils.data import DataLoader

from hem_bootstrap.config import DataConfig, ModelConfig, RuntimeConfig, TilingConfig
from hem_bootstrap.data.tiles import TileDataset, TileRef, collate_tiles, plan_tiles, read_ahead, scale_tiles
from hem_bootstrap.detections import detections_frame
from hem_bootstrap.distributed import all_sum, gather_on_rank0
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.aoi import boxes_touching, windows_touching
from hem_bootstrap.geo.raster import RasterInfo, open_raster
from hem_bootstrap.geo.windows import Window
from hem_bootstrap.logs import Progress
from hem_bootstrap.model.merge import BandMerger, RawDetections, cut_by_inner_edge, merge_whole
from hem_bootstrap.model.precision import PreparedModel, prepare_model
from hem_bootstrap.model.replicas import raise_failed, replica_batches, replica_count, stop_replicas
from hem_bootstrap.remote import location

log = logging.getLogger(__name__)

GATHER_IMAGES = 16
"""Images whose raw detections a sharded scan gathers on rank 0 at once (bounds rank 0's memory)."""


@dataclass
class DetectStats:
    """What a scan did, for logs, the manifest and benchmarks."""

    tiles_total: int = 0
    tiles_run: int = 0
    tiles_skipped: int = 0
    detections: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    """Seconds the model ran (with replicas: per replica, so tiles / model_seconds is still the model's rate)."""
    merge_seconds: float = 0.0
    wait_seconds: float = 0.0
    """Seconds the scan waited for its next batch: for reads, or with replicas for reads and the model."""
    replicas: int = 0
    """Model replicas that ran the scan (0: the model ran in the scan's process), see :mod:`hem_bootstrap.model.replicas`."""
    bad_rasters: list[str] = field(default_factory=list)
    fast_path: str = ""
    """The precision path the model ran (``auto`` resolved; see :mod:`hem_bootstrap.model.precision`)."""

    @property
    def tiles_per_s(self) -> float:
        """End-to-end tiles per second (skipped tiles included: they were read)."""
        return self.tiles_total / self.seconds if self.seconds > 0 else 0.0


def usable_rasters(
    paths: list[Path], on_bad: str, headers: Mapping[Path, RasterInfo | str] | None = None
) -> tuple[list[Path], list[RasterInfo], list[str]]:
    """The rasters that open, with their headers; a broken one is skipped (logged) or fails the scan, by config.

    ``headers``: what the caller already knows per path, a header or the error it met
    opening it; only other paths are opened here.

    Raises:
        DataError: a raster does not open and ``on_bad`` is ``fail``.
    """
    good: list[Path] = []
    infos: list[RasterInfo] = []
    bad: list[str] = []
    for p in paths:
        known = (headers or {}).get(Path(p))
        try:
            if isinstance(known, str):
                raise DataError(known)
            infos.append(known if known is not None else open_raster(p))
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


@dataclass
class ScanPlan:
    """What one process scans: the rasters that open, their headers, its tiles and the job's tile count."""

    paths: list[Path]
    infos: list[RasterInfo]
    refs: list[TileRef]
    total_tiles: int

    @property
    def progress_scale(self) -> float:
        """Job tiles per tile of this share, so rank 0's bar shows the whole job."""
        return self.total_tiles / len(self.refs) if self.refs else 1.0


def plan_scan(paths: list[Path], data_cfg: DataConfig, tiling: TilingConfig, stats: DetectStats,
              rank: int = 0, world: int = 1, headers: Mapping[Path, RasterInfo | str] | None = None,
              aoi: Mapping[Path, BaseGeometry] | None = None) -> ScanPlan:
    """Open each raster once (bad ones skipped or failing, by config) and cut this rank's share of the tiles.

    ``aoi``: per raster, the area of interest in its pixels; only tiles that touch it are planned.
    """
    good, infos, bad = usable_rasters(paths, data_cfg.on_bad_raster, headers)
    stats.bad_rasters.extend(bad)
    refs = plan_tiles(good, tiling, infos)
    if aoi is not None:
        refs = _in_areas(refs, good, aoi)
    return ScanPlan(good, infos, shard_refs(refs, rank, world), len(refs))


def _in_areas(refs: list[TileRef], paths: list[Path], aoi: Mapping[Path, BaseGeometry]) -> list[TileRef]:
    """The tiles that touch their raster's area of interest (one vectorised test per raster; all of a raster without one)."""
    keep = np.ones(len(refs), dtype=bool)
    image = np.array([r.image_idx for r in refs], dtype=np.int64)
    windows = np.array([[r.window.col_off, r.window.row_off, r.window.width, r.window.height] for r in refs],
                       dtype=np.float64).reshape(-1, 4)
    for idx, path in enumerate(paths):
        mine = image == idx
        if path in aoi and mine.any():
            keep[mine] = windows_touching(aoi[path], windows[mine])
    return [r for r, k in zip(refs, keep, strict=True) if k]


def _batches(plan: ScanPlan, data_cfg: DataConfig, runtime: RuntimeConfig, model: PreparedModel,
             replicas: int) -> Iterator[Any]:
    """The plan's tiles in batches: run by CPU replicas, from DataLoader workers, read ahead by a thread (CUDA),
    or read in turn (CPU).

    Without workers on CUDA a reader thread reads the next batches while the GPU computes.
    On a CPU the model's threads use every core, and a reader thread only preempts them:
    measured on a 2-core EPYC at 8192 px, 0.70 of the model-only ceiling with the thread
    against 0.78 reading in turn (the model ran 20 % slower beside it). Replicas do better:
    each reads in its own process, between its own batches (see :mod:`hem_bootstrap.model.replicas`).
    """
    if replicas:
        dataset = TileDataset(plan.paths, plan.refs, data_cfg)
        return replica_batches(dataset, runtime.batch_size, replicas, runtime.prefetch,
                               partial(_replica_batch, model, plan.infos))
    device = model.device
    loader = _loader(plan, data_cfg, runtime, device)
    if detect_workers(runtime, device) > 0 or device.type != "cuda":
        return iter(loader)
    return read_ahead(loader, runtime.prefetch)


def _loader(plan: ScanPlan, data_cfg: DataConfig, runtime: RuntimeConfig, device: torch.device) -> DataLoader:
    workers = detect_workers(runtime, device)
    return DataLoader(
        TileDataset(plan.paths, plan.refs, data_cfg),
        batch_size=runtime.batch_size,
        shuffle=False,
        num_workers=workers,
        collate_fn=collate_tiles,
        pin_memory=device.type == "cuda",
        prefetch_factor=runtime.prefetch if workers > 0 else None,
        persistent_workers=False,
    )


def _count(batch: dict[str, Any], stats: DetectStats) -> int:
    """Book a batch's tiles and read errors (one entry per raster: its first unreadable window)."""
    n = len(batch["image_idx"]) + batch["n_skipped"]
    stats.tiles_total += n
    stats.tiles_skipped += batch["n_skipped"]
    for path, err in batch.get("errors", []):
        if not any(b.startswith(f"{path}: ") for b in stats.bad_rasters):
            stats.bad_rasters.append(f"{path}: {err}")
    return n


def _run(model: PreparedModel, batch: dict[str, Any], stats: DetectStats) -> list[dict[str, torch.Tensor]]:
    """The model on one batch of tiles (uint8 tiles scaled on the device, after the 4x smaller copy)."""
    device = model.device
    images = batch["images"].to(device, non_blocking=True)
    if batch["scale"] is not None:
        images = scale_tiles(images, *batch["scale"])
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)
    tm = time.perf_counter()
    outputs = model(list(images))  # under the model's own autocast (see precision.py)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    stats.model_seconds += time.perf_counter() - tm
    return outputs


def batch_detections(model: PreparedModel, batch: dict[str, Any], infos: list[RasterInfo],
                     stats: DetectStats) -> dict[str, Any]:
    """Run a collated batch: the batch with ``detections`` (per kept tile, :func:`tile_detections` or None)
    in place of its pixels."""
    found: list[tuple[np.ndarray, ...] | None] = []
    if batch["images"] is not None:
        outputs = _run(model, batch, stats)
        for out, idx, win, beyond in zip(outputs, batch["image_idx"], batch["windows"], batch["beyond"], strict=True):
            found.append(tile_detections(out, win, beyond, infos[idx]) if len(out["boxes"]) else None)
    batch.update(images=None, scale=None, detections=found)
    return batch


def _replica_batch(model: PreparedModel, infos: list[RasterInfo], batch: dict[str, Any]) -> dict[str, Any]:
    """What a replica does with a batch (in its own process): the detections and the seconds the model took."""
    stats = DetectStats()
    with torch.inference_mode():
        batch = batch_detections(model, batch, infos, stats)
    batch["model_seconds"] = stats.model_seconds
    return batch


def tile_detections(
    out: dict[str, torch.Tensor], win: Window, beyond: tuple[bool, bool, bool, bool], info: RasterInfo
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One tile's model output in image pixels: ``(boxes, scores, labels, window, cut)``.

    Boxes are clipped to the valid part of a padded tile; slivers and label 0 (background:
    torchvision's sigmoid heads keep a column for it that is never trained positive, yet it can
    score above the floor) are dropped.
    """
    boxes = out["boxes"].float().cpu().numpy()
    labels = out["labels"].cpu().numpy()
    vw, vh = win.valid_width, win.valid_height
    boxes[:, [0, 2]] = boxes[:, [0, 2]].clip(0, vw)
    boxes[:, [1, 3]] = boxes[:, [1, 3]].clip(0, vh)
    ok = (boxes[:, 2] - boxes[:, 0] > 0.5) & (boxes[:, 3] - boxes[:, 1] > 0.5) & (labels > 0)
    boxes = boxes[ok]
    boxes[:, [0, 2]] += win.col_off
    boxes[:, [1, 3]] += win.row_off
    w_arr = np.array([win.col_off, win.row_off, min(win.width, vw), min(win.height, vh)])
    cut = cut_by_inner_edge(boxes, tuple(w_arr), info.width, info.height, beyond)
    return boxes, out["scores"].float().cpu().numpy()[ok], labels[ok], w_arr, cut


def scan_raw(
    model: PreparedModel,
    plan: ScanPlan,
    data_cfg: DataConfig,
    runtime: RuntimeConfig,
    stats: DetectStats,
    progress: bool = True,
    bands: bool = False,
) -> Iterator[tuple[int, RawDetections, int | None]]:
    """Run the model over the plan's tiles in order; yield ``(image_idx, raw detections, frontier)``.

    ``frontier`` is ``None`` when the image ends. With ``bands``, a yield also comes each time
    a new row of tiles starts, with ``frontier`` = that row's first pixel row: no later tile
    of the image reaches above it, so boxes that end above it can be merged and written.
    """
    if not plan.refs:
        return
    bar = Progress(plan.total_tiles, "detect", "tile", enabled=progress, every_s=runtime.log_every_s)
    stats.replicas = replica_count(runtime, model.device, model.fast_path, len(plan.refs))
    if stats.replicas:
        log.info("detect: %d single-threaded model replicas", stats.replicas)
    batches = _batches(plan, data_cfg, runtime, model, stats.replicas)
    try:
        yield from _scan_batches(batches, model, plan, stats, bar, bands)
    finally:
        stop_replicas(batches)
    bar.close()


def _scan_batches(batches: Iterator[Any], model: PreparedModel, plan: ScanPlan, stats: DetectStats, bar: Progress,
                  bands: bool) -> Iterator[tuple[int, RawDetections, int | None]]:
    """The body of :func:`scan_raw`: batches in, raw detections out, image by image (and band by band)."""
    current: int | None = None
    row: int | None = None
    raw = RawDetections()
    with torch.inference_mode():
        while True:
            tw = time.perf_counter()
            batch = next(batches, None)  # time blocked here = the model waiting for reads (or for replicas)
            stats.wait_seconds += time.perf_counter() - tw
            if batch is None:
                break
            raise_failed(batch)
            bar.update(_count(batch, stats) * plan.progress_scale)  # a shard shows the job's progress
            if "detections" in batch:
                stats.model_seconds += batch["model_seconds"] / stats.replicas
            else:
                batch = batch_detections(model, batch, plan.infos, stats)
            stats.tiles_run += len(batch["detections"])
            for found, idx, win in zip(batch["detections"], batch["image_idx"], batch["windows"], strict=True):
                if current is not None and (idx != current or (bands and row is not None and win.row_off > row)):
                    yield current, raw, None if idx != current else int(win.row_off)
                    raw = RawDetections()
                current, row = idx, int(win.row_off)
                if found is not None:
                    raw.add(*found)
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
    shard: tuple[int, int] = (0, 1),
    headers: Mapping[Path, RasterInfo | str] | None = None,
    aoi: Mapping[Path, BaseGeometry] | None = None,
) -> Iterator[gpd.GeoDataFrame]:
    """Detect objects over rasters; yields merged detection frames (several per image), in each raster's CRS.

    ``shard = (rank, world)``: under torchrun every rank scans a contiguous share of the tiles
    (shares differ by at most one tile) and rank 0 yields frames that equal a one-process
    run's; other ranks yield nothing but must exhaust the iterator, which drives the
    collectives. ``stats`` then holds totals over all ranks, and ``stats.seconds`` is rank 0's
    wall time, so ``stats.tiles_per_s`` is the job's rate. An image's last frame comes even
    when empty, so every raster's CRS gets its layer. ``headers``: rasters' headers (or open
    errors) the caller already has, see :func:`usable_rasters`. ``aoi``: per raster, an area of
    interest in its pixels (:mod:`hem_bootstrap.geo.aoi`): only tiles touching it are read and
    only boxes touching it are kept.
    """
    stats = stats if stats is not None else DetectStats()
    t0 = time.perf_counter()
    rank, world = shard
    plan = plan_scan(paths, data_cfg, tiling, stats, rank, world, headers, aoi)
    prepared = prepare_model(model, device, model_cfg, runtime, tiling.tile_size)
    stats.fast_path = prepared.fast_path
    scan = scan_raw(prepared, plan, data_cfg, runtime, stats, progress and rank == 0, bands=world == 1)
    merged = _merge_bands(scan, model_cfg.nms_iou, drop_cut) if world == 1 else _merge_shards(
        scan, len(plan.paths), model_cfg.nms_iou, drop_cut, stats)
    for idx, kept, last in merged:
        tm = time.perf_counter()
        area = aoi.get(plan.paths[idx]) if aoi is not None else None
        if area is not None:  # a box on the far side of a tile that touches the area is still outside it
            inside = boxes_touching(area, kept[0])
            kept = tuple(a[inside] for a in kept)
        frame = detections_frame(location(plan.paths[idx]), plan.infos[idx], *kept)
        stats.merge_seconds += time.perf_counter() - tm
        if len(frame) or last:
            stats.detections += len(frame)
            yield frame
        stats.seconds = time.perf_counter() - t0
    stats.seconds = time.perf_counter() - t0


def _merge_bands(
    scan: Iterator[tuple[int, RawDetections, int | None]], nms_iou: float, drop_cut: bool
) -> Iterator[tuple[int, tuple[np.ndarray, ...], bool]]:
    """One process: merge each image band by band as its rows finish; ``(image, kept, image ended)``."""
    merger: BandMerger | None = None
    for idx, raw, frontier in scan:
        if merger is None or merger.image != idx:
            merger = BandMerger(idx, nms_iou, drop_cut)
        merger.add(raw)
        yield idx, merger.flush(frontier), frontier is None


def _merge_shards(
    scan: Iterator[tuple[int, RawDetections, int | None]],
    n_images: int,
    nms_iou: float,
    drop_cut: bool,
    stats: DetectStats,
) -> Iterator[tuple[int, tuple[np.ndarray, ...], bool]]:
    """Under torchrun: gather every rank's raw detections on rank 0, a few images at a time, and merge whole images."""
    local = {idx: raw.arrays() for idx, raw, _ in scan}
    counts = all_sum(torch.tensor([stats.tiles_total, stats.tiles_skipped, stats.tiles_run], dtype=torch.int64),
                     "detection tile counts")
    stats.tiles_total, stats.tiles_skipped, stats.tiles_run = (int(v) for v in counts)
    for start in range(0, n_images, GATHER_IMAGES):
        chunk = range(start, min(start + GATHER_IMAGES, n_images))
        parts = gather_on_rank0({i: local.pop(i) for i in chunk if i in local}, "gathering detections")
        for idx in chunk:
            pieces = [part[idx] for part in parts if idx in part]
            if pieces:
                raw = RawDetections()
                for piece in pieces:
                    for name, arr in zip(("boxes", "scores", "labels", "windows", "cut"), piece, strict=True):
                        getattr(raw, name).append(arr)
                yield idx, merge_whole(raw, nms_iou, drop_cut), True
