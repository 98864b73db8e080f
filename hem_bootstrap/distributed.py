"""torch.distributed glue: rank discovery, process-group setup, sharded detection merged on rank 0.

Under ``torchrun`` every rank scans a contiguous, balanced share of the pool's tiles; raw
per-tile detections are gathered on rank 0, which merges them with the same seam NMS as a
single process, so the output equals a single-process run's.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from hem_bootstrap.config import ExperimentConfig, RuntimeConfig

log = logging.getLogger(__name__)


def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def init_distributed(runtime: RuntimeConfig) -> bool:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU).

    Collectives time out after ``runtime.collective_timeout_s`` so a crashed rank makes the
    job fail instead of hang. Returns whether the run is distributed.
    """
    _, world, local = dist_info()
    if world <= 1:
        return False
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and runtime.device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=runtime.collective_timeout_s))
    log.info("distributed: rank %d of %d, backend %s", dist.get_rank(), dist.get_world_size(), backend)
    return True


def detect_distributed(
    model: torch.nn.Module,
    paths: list[Path],
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    stats: Any = None,
    progress: bool = True,
) -> Iterator[Any]:
    """Sharded detection: every rank scans its share, rank 0 yields merged frames per image."""
    from hem_bootstrap.data.tiles import plan_tiles
    from hem_bootstrap.model.infer import (
        DetectStats,
        RawDetections,
        _merged_frame,
        prepare_model,
        scan_raw,
        shard_refs,
        usable_rasters,
    )

    rank, world = dist.get_rank(), dist.get_world_size()
    stats = stats if stats is not None else DetectStats()
    good, infos, bad = usable_rasters(paths, cfg.data.on_bad_raster)
    stats.bad_rasters.extend(bad)
    refs = plan_tiles(good, cfg.tiling)
    mine = shard_refs(refs, rank, world)
    model = prepare_model(model, device, cfg.model)
    local: dict[int, tuple] = {}
    for idx, raw in scan_raw(model, good, infos, mine, cfg.data, cfg.runtime, device, stats,
                             progress=progress and rank == 0, total_tiles=len(mine)):
        local[idx] = raw.arrays()
    counts = torch.tensor([stats.tiles_total, stats.tiles_skipped, stats.tiles_run], dtype=torch.int64)
    dist.all_reduce(counts)
    stats.tiles_total, stats.tiles_skipped, stats.tiles_run = (int(v) for v in counts)
    gathered: list[Any] = [None] * world if rank == 0 else []
    dist.gather_object(local, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return
    for idx in range(len(good)):
        merged = RawDetections()
        for part in gathered:
            if idx in part:
                b, s, lab, w, c = part[idx]
                merged.boxes.append(b)
                merged.scores.append(s)
                merged.labels.append(lab)
                merged.windows.append(w)
                merged.cut.append(c)
        if not merged.boxes:
            continue
        frame = _merged_frame(good[idx], infos[idx], merged, cfg.model.nms_iou, True)
        stats.detections += len(frame)
        yield frame
