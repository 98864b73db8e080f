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

import contextlib
import datetime
import gc
import logging
import os
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from hem_bootstrap.config import RuntimeConfig
from hem_bootstrap.errors import HemError, RunError

log = logging.getLogger(__name__)

T = TypeVar("T")

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
    step logs appear once. Returns whether the run is distributed (more than one rank). A
    one-process torchrun job joins a group of one too, so one GPU exercises NCCL's set-up; its
    work is a plain run's (:func:`is_distributed` is False).

    Raises:
        RunError: more local ranks than visible GPUs.
    """
    rank, world, local = dist_info()
    if world <= 1 and "TORCHELASTIC_RUN_ID" not in os.environ:
        return False
    _STATE["timeout_s"] = float(runtime.collective_timeout_s)
    if dist.is_initialized():
        return world > 1
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
    return world > 1


def shutdown_distributed() -> None:
    """Leave the process group after a successful command (no-op without one).

    A process that exits while gloo's worker threads still hold work can abort in the C++
    runtime during interpreter teardown ("terminate called without an active exception",
    SIGABRT), failing a job whose work was done. Destroying the group first avoids that. Only
    called on success: after an error another rank may sit in a collective, and the job is
    failing anyway. A barrier first: a rank that is done (rank 1 while rank 0 still writes the
    checkpoint) must not tear down gloo while its peer may still talk to it; and the DDP
    reducers, which hold the group, are collected before it goes.
    """
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(RuntimeError):  # a peer that already left: nothing left to wait for
            dist.barrier()
        gc.collect()
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


def gather_on_rank0(obj: Any, what: str = "gather") -> list[Any]:
    """Every rank's ``obj`` on rank 0, in rank order (``[obj]`` in one process); an empty list elsewhere."""
    rank, world = rank_world()
    if world == 1:
        return [obj]
    out: list[Any] = [None] * world if rank == 0 else []
    try:
        dist.gather_object(obj, out if rank == 0 else None, dst=0)
    except RuntimeError as err:
        raise _timeout_error(what, err) from None
    return out
