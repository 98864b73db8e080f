"""torch.distributed glue: rank discovery, process-group setup, rank-0 work, sharded detection.

Under ``torchrun`` every rank runs the same program. Work that must happen once (run directory
checks, mining, bank and manifest writes) runs on rank 0 and its result is broadcast, so every
rank keeps the same manifest and takes the same decisions. Detection shards the pool's tiles
into contiguous, balanced shares; raw per-tile detections are gathered on rank 0, which merges
them with the same seam NMS as a single process, so the output equals a single-process run's.

Every collective waits at most ``runtime.collective_timeout_s``: a rank that crashed or hangs
makes the others fail with a one-line :class:`~hem_bootstrap.errors.RunError` instead of
waiting forever (torchrun then stops the whole job).
"""

from __future__ import annotations

import datetime
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hem_bootstrap.config import ExperimentConfig, RuntimeConfig
from hem_bootstrap.errors import HemError, RunError

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Images whose raw detections are gathered on rank 0 at once (bounds rank 0's memory).
GATHER_IMAGES = 16

_STATE: dict[str, float] = {"timeout_s": 600.0}


def dist_info() -> tuple[int, int, int]:
    """``(rank, world_size, local_rank)`` from the torchrun environment (0, 1, 0 without it)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return rank, world, local


def is_distributed() -> bool:
    """Whether a process group with more than one rank is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the active process group, ``(0, 1)`` without one."""
    if is_distributed():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(runtime: RuntimeConfig) -> bool:
    """Join the process group when launched by torchrun (nccl on CUDA, gloo on CPU).

    Collectives time out after ``runtime.collective_timeout_s`` so a crashed rank makes the
    job fail instead of hang. Ranks other than 0 log warnings and errors only, so progress and
    step logs appear once. Returns whether the run is distributed.

    Raises:
        RunError: more local ranks than visible GPUs.
    """
    rank, world, local = dist_info()
    if world <= 1:
        return False
    _STATE["timeout_s"] = float(runtime.collective_timeout_s)
    if dist.is_initialized():
        return True
    use_cuda = torch.cuda.is_available() and runtime.device != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        n_gpu = torch.cuda.device_count()
        if local >= n_gpu:
            raise RunError(
                f"LOCAL_RANK={local}: only {n_gpu} CUDA device(s) visible on this node; "
                f"start at most {n_gpu} processes per node (torchrun --nproc-per-node)"
            )
        torch.cuda.set_device(local)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=runtime.collective_timeout_s))
    if rank != 0:
        logging.getLogger().setLevel(logging.WARNING)
    log.info(
        "distributed: %d ranks, backend %s, collective timeout %d s",
        world,
        backend,
        runtime.collective_timeout_s,
    )
    return True


def shutdown_distributed() -> None:
    """Leave the process group after a successful command (no-op without one).

    A process that exits while gloo's worker threads still hold work can abort in the C++
    runtime during interpreter teardown ("terminate called without an active exception",
    SIGABRT), failing a job whose work was done. Destroying the group first avoids that. Only
    called on success: after an error another rank may sit in a collective, and the job is
    failing anyway.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _timeout_error(what: str, err: BaseException) -> RunError:
    rank = dist.get_rank() if dist.is_initialized() else 0
    detail = " ".join(str(err).split())[:300]
    return RunError(
        f"rank {rank}: {what} failed or timed out after runtime.collective_timeout_s="
        f"{_STATE['timeout_s']:.0f} s, another rank probably crashed or hangs ({detail})"
    )


def barrier(what: str = "barrier") -> None:
    """Wait for every rank (no-op in one process); a missing rank raises instead of hanging.

    On gloo a monitored barrier names the ranks that did not arrive.

    Raises:
        RunError: a rank did not arrive within ``runtime.collective_timeout_s``.
    """
    if not is_distributed():
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(
                timeout=datetime.timedelta(seconds=_STATE["timeout_s"]), wait_all_ranks=True
            )
        else:
            dist.barrier()
    except RuntimeError as err:
        raise _timeout_error(what, err) from None


def broadcast_from_rank0(obj: T, what: str = "broadcast") -> T:
    """Rank 0's ``obj`` on every rank (picklable objects; identity in one process)."""
    if not is_distributed():
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    try:
        dist.broadcast_object_list(box, src=0)
    except RuntimeError as err:
        raise _timeout_error(what, err) from None
    return box[0]  # type: ignore[return-value]


def run_on_rank0(fn: Callable[..., T], *args: Any, what: str | None = None, **kwargs: Any) -> T:
    """Call ``fn`` on rank 0 only and hand its result to every rank.

    Other ranks wait, so whatever ``fn`` wrote exists when they continue. An error on rank 0
    reaches every rank: a :class:`HemError` is raised as is, anything else as a ``RunError``
    naming it on the other ranks, so no rank is left waiting.
    """
    if not is_distributed():
        return fn(*args, **kwargs)
    label = str(what or getattr(fn, "__name__", "rank-0 work"))
    outcome: tuple[str, Any] = ("ok", None)
    error: BaseException | None = None
    if dist.get_rank() == 0:
        try:
            outcome = ("ok", fn(*args, **kwargs))
        except HemError as err:
            error, outcome = err, ("err", err)
        except Exception as err:
            error = err
            outcome = ("err", RunError(f"rank 0 failed in {label}: {type(err).__name__}: {err}"))
    kind, value = broadcast_from_rank0(outcome, what=label)
    if error is not None:
        raise error
    if kind == "err":
        raise value
    return value  # type: ignore[no-any-return]


def any_rank(flag: bool, what: str = "stop flag") -> bool:
    """Whether ``flag`` is set on any rank, so all ranks take the same branch."""
    if not is_distributed():
        return flag
    return bool(all_sum(torch.tensor([int(flag)], dtype=torch.int64), what).item() > 0)


def all_sum(values: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Element-wise sum of a tensor over ranks (the tensor itself in one process)."""
    if not is_distributed():
        return values
    out = values.detach().clone()
    try:
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
    except RuntimeError as err:
        raise _timeout_error(what, err) from None
    return out


def all_mean(values: torch.Tensor, what: str = "all_reduce") -> torch.Tensor:
    """Element-wise mean of a tensor over ranks (the tensor itself in one process)."""
    return all_sum(values, what) / rank_world()[1]


def detect_distributed(
    model: torch.nn.Module,
    paths: list[Path],
    cfg: ExperimentConfig,
    device: torch.device,
    *,
    stats: Any = None,
    progress: bool = True,
) -> Iterator[Any]:
    """Sharded detection: every rank scans its share, rank 0 yields merged frames per image.

    Tiles are planned identically on every rank and cut into contiguous shares that differ by
    at most one tile. Raw detections reach rank 0 in groups of :data:`GATHER_IMAGES` images
    and are merged there exactly as :func:`~hem_bootstrap.model.infer.detect` merges them, so
    the frames (and their order) equal a single-process run's. Other ranks yield nothing but
    must still exhaust the iterator, since it drives the collectives. Rank 0's progress bar
    counts every rank's tiles (its own scaled by the shard ratio) and ``stats`` holds totals
    over all ranks; ``stats.seconds`` is rank 0's wall time, so ``stats.tiles_per_s`` is the
    job's rate.
    """
    from hem_bootstrap.data.tiles import plan_tiles
    from hem_bootstrap.model.infer import (
        DetectStats,
        RawDetections,
        _merged_frame,
        scan_raw,
        shard_refs,
        usable_rasters,
    )
    from hem_bootstrap.model.precision import prepare_model

    rank, world = rank_world()
    stats = stats if stats is not None else DetectStats()
    t0 = time.perf_counter()
    good, infos, bad = usable_rasters(paths, cfg.data.on_bad_raster)
    stats.bad_rasters.extend(bad)
    refs = plan_tiles(good, cfg.tiling)
    mine = shard_refs(refs, rank, world)
    prepared = prepare_model(model, device, cfg.model, cfg.runtime, cfg.tiling.tile_size)
    stats.fast_path = prepared.fast_path
    scale = len(refs) / len(mine) if mine else 1.0
    local: dict[int, tuple] = {}
    for idx, raw, _ in scan_raw(
        prepared,
        good,
        infos,
        mine,
        cfg.data,
        cfg.runtime,
        device,
        stats,
        progress=progress and rank == 0,
        total_tiles=len(refs),
        progress_scale=scale,
    ):
        local[idx] = raw.arrays()
    counts = torch.tensor([stats.tiles_total, stats.tiles_skipped, stats.tiles_run], dtype=torch.int64)
    counts = all_sum(counts, "detection tile counts")
    stats.tiles_total, stats.tiles_skipped, stats.tiles_run = (int(v) for v in counts)
    for start in range(0, len(good), GATHER_IMAGES):
        chunk = range(start, min(start + GATHER_IMAGES, len(good)))
        parts = _gather_on_rank0({i: local.pop(i) for i in chunk if i in local})
        for idx in chunk:
            merged = RawDetections()
            seen = False
            for part in parts:
                if idx in part:
                    seen = True
                    b, s, lab, w, c = part[idx]
                    merged.boxes.append(b)
                    merged.scores.append(s)
                    merged.labels.append(lab)
                    merged.windows.append(w)
                    merged.cut.append(c)
            if not seen:
                continue
            frame = _merged_frame(good[idx], infos[idx], merged, cfg.model.nms_iou, True)
            stats.detections += len(frame)
            stats.seconds = time.perf_counter() - t0
            yield frame
    stats.seconds = time.perf_counter() - t0
    if rank == 0:
        log.info(
            "detect: %d tiles (%d skipped) on %d ranks in %.1f s, %.1f tiles/s",
            stats.tiles_total,
            stats.tiles_skipped,
            world,
            stats.seconds,
            stats.tiles_per_s,
        )


def _gather_on_rank0(obj: dict[int, tuple]) -> list[dict[int, tuple]]:
    """Every rank's ``obj`` on rank 0 (rank order); an empty list elsewhere."""
    rank, world = rank_world()
    out: list[Any] = [None] * world if rank == 0 else []
    try:
        dist.gather_object(obj, out if rank == 0 else None, dst=0)
    except RuntimeError as err:
        raise _timeout_error("gathering detections", err) from None
    return out
