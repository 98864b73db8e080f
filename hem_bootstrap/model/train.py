"""The training engine: a fixed number of optimizer steps with AMP, clipping, schedule and checkpoints.

Training is counted in steps, not epochs: the chip set changes every round (new bank negatives),
so a step budget keeps rounds comparable. Each step's batch is a pure function of
``(seed, step)``, so a run resumed from a checkpoint ends with the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR
from torch.utils.data import DataLoader, Dataset, Sampler

from hem_bootstrap.config import RuntimeConfig, TrainConfig
from hem_bootstrap.distributed import all_mean, rank_world
from hem_bootstrap.errors import TrainingError
from hem_bootstrap.logs import Progress
from hem_bootstrap.model.checkpoints import load_checkpoint, save_checkpoint
from hem_bootstrap.model.device import amp_dtype, amp_enabled, resolve_device
from hem_bootstrap.model.ema import WeightAverage

log = logging.getLogger(__name__)

Batch = tuple[list[Tensor], list[dict[str, Tensor]]]

#: On CUDA the loss is read back (a device sync) only every this many steps.
CUDA_SYNC_EVERY = 10


@dataclass
class TrainResult:
    """What a training run did: steps reached, last loss, throughput, time and the loss curve."""

    steps: int
    final_loss: float
    chips_per_s: float
    seconds: float
    losses: list[float] = field(default_factory=list)


# ------------------------------------------------------------------------------ sampling


def step_seed(seed: int, step: int) -> int:
    """A 63-bit seed for one step, derived from the run seed and the step alone."""
    return int(
        np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(step)]).generate_state(2, np.uint64)[0] >> 1
    )


class StepBatchSampler(Sampler[list[int]]):
    """Batches drawn with replacement, each from ``(seed, step)``; rank ``r`` takes its slice.

    The global batch is ``batch_size * world_size`` indices; ranks get disjoint slices of it, so
    a distributed run sees the same chips per step as one process with a larger batch.
    """

    def __init__(
        self,
        n_items: int,
        batch_size: int,
        steps: int,
        seed: int,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if n_items <= 0:
            raise TrainingError("training dataset is empty: no chips to sample")
        self.n_items, self.batch_size = int(n_items), int(batch_size)
        self.start, self.steps, self.seed = int(start), int(steps), int(seed)
        self.rank, self.world_size = int(rank), int(world_size)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def batch_at(self, step: int) -> list[int]:
        """The indices this rank trains on at ``step``."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, int(step), 0x5A17])
        idx = rng.integers(0, self.n_items, size=self.batch_size * self.world_size)
        return idx[self.rank * self.batch_size : (self.rank + 1) * self.batch_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start, self.steps):
            yield self.batch_at(step)


class _StepWindow(Sampler[list[int]]):
    """Steps ``start..steps`` of a user batch sampler, re-iterating it if it runs out early."""

    def __init__(self, batch_sampler: Iterable[list[int]], start: int, steps: int) -> None:
        self.batch_sampler, self.start, self.steps = batch_sampler, int(start), int(steps)

    def __len__(self) -> int:
        return max(0, self.steps - self.start)

    def _forever(self) -> Iterator[list[int]]:
        while True:
            empty = True
            for batch in self.batch_sampler:
                empty = False
                yield list(batch)
            if empty:
                raise TrainingError("batch_sampler yielded no batch: nothing to train on")

    def __iter__(self) -> Iterator[list[int]]:
        yield from itertools.islice(self._forever(), self.start, self.steps)


def collate_detection(batch: Sequence[tuple[Tensor, dict[str, Tensor]]]) -> Batch:
    """Lists of images and targets, as torchvision detectors take them."""
    return [b[0] for b in batch], [b[1] for b in batch]


# ------------------------------------------------------------------------------ optimisation


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Two groups: weights with decay, and norm parameters / biases (1-d tensors) without.

    Decaying norm scales and biases only pulls them toward zero without regularising anything.
    """
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [
        {"params": decay, "weight_decay": float(weight_decay)},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov) or AdamW from the config, with decay off for norms and biases."""
    groups = param_groups(model, train_cfg.weight_decay)
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=train_cfg.lr, momentum=train_cfg.momentum, nesterov=train_cfg.momentum > 0
        )
    return torch.optim.AdamW(groups, lr=train_cfg.lr)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then cosine / step / constant."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        return 0.1 if step >= (2 * total_steps) // 3 else 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def make_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig, total_steps: int) -> LambdaLR:
    """A :class:`LambdaLR` over ``total_steps`` following :func:`lr_factor`."""

    def factor(step: int) -> float:
        return lr_factor(step, total_steps, train_cfg.warmup_steps, train_cfg.schedule)

    return LambdaLR(optimizer, factor)


def _to_device(batch: Batch, device: torch.device) -> Batch:
    images, targets = batch
    nb = device.type == "cuda"
    images = [im.to(device, non_blocking=nb) for im in images]
    targets = [{k: v.to(device, non_blocking=nb) for k, v in t.items()} for t in targets]
    return images, targets


def train_one_step(
    model: nn.Module,
    batch: Batch,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    grad_clip: float | None = None,
    autocast_dtype: torch.dtype | None = None,
    device_type: str = "cpu",
) -> tuple[Tensor, dict[str, Tensor]]:
    """One forward/backward/update on a batch already on the model's device.

    Returns the total loss and its parts, detached and still on the device (reading them back
    is the caller's choice, as it synchronises a GPU).
    """
    images, targets = batch
    optimizer.zero_grad(set_to_none=True)
    if autocast_dtype is not None:
        with torch.autocast(device_type=device_type, dtype=autocast_dtype):
            loss_dict = model(images, targets)
    else:
        loss_dict = model(images, targets)
    loss = sum(loss_dict.values())
    assert isinstance(loss, Tensor)
    use_scaler = scaler is not None and scaler.is_enabled()
    if use_scaler:
        assert scaler is not None
        scaler.scale(loss).backward()
        if grad_clip:
            scaler.unscale_(optimizer)
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
    return loss.detach().float(), {k: v.detach().float() for k, v in loss_dict.items()}


# ------------------------------------------------------------------------------ the engine


@dataclass
class _Pending:
    """Losses not yet read back from the device (CUDA reads them in groups)."""

    steps: list[int] = field(default_factory=list)
    totals: list[Tensor] = field(default_factory=list)
    parts: list[dict[str, Tensor]] = field(default_factory=list)

    def add(self, step: int, total: Tensor, parts: dict[str, Tensor]) -> None:
        """Keep one step's loss (and its parts) on the device until the next flush."""
        self.steps.append(step)
        self.totals.append(total)
        self.parts.append(parts)

    def flush(self, into: list[float], distributed: bool = False) -> None:
        """Read losses back, append them to ``into``; stop at the first non-finite one.

        Distributed, the losses are averaged over ranks first: the log and checkpoint show the
        global batch's loss, and a non-finite loss on any rank stops every rank at the same step
        (none is left waiting in a collective).
        """
        if not self.steps:
            return
        stacked = torch.stack(self.totals)
        if distributed:
            stacked = all_mean(stacked, "loss all_reduce")
        values = stacked.cpu().tolist()
        for step, value, parts in zip(self.steps, values, self.parts, strict=True):
            if not math.isfinite(value):
                shown = {k: round(float(v), 4) for k, v in parts.items()}
                raise TrainingError(f"non-finite loss at step {step}: {shown}")
            into.append(float(value))
        self.steps.clear()
        self.totals.clear()
        self.parts.clear()


def _dist_rank_world(distributed: bool) -> tuple[int, int]:
    return rank_world() if distributed else (0, 1)


#: Devices where :class:`torch.nn.SyncBatchNorm` works (it refuses CPU tensors).
SYNC_BN_DEVICES = ("cuda", "xpu", "hpu")

_WARNED = {"per_rank_bn": False}


def _has_trainable_bn(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def prepare_ddp_model(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """Make BatchNorm see the global batch where possible, before the optimizer is built.

    On CUDA, BatchNorm layers become :class:`torch.nn.SyncBatchNorm` (same parameters and
    state-dict keys, so checkpoints load into the plain model): statistics then cover the global
    batch, as in one process. SyncBatchNorm does not run on a CPU, so under gloo each rank
    normalises with its own share of the batch (standard DDP behaviour); a warning says so.
    """
    if world <= 1 or not _has_trainable_bn(model):
        return model
    if device.type in SYNC_BN_DEVICES:
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    if rank_world()[0] == 0 and not _WARNED["per_rank_bn"]:
        _WARNED["per_rank_bn"] = True
        log.warning(
            "distributed training on %s: BatchNorm statistics are per rank (SyncBatchNorm needs a GPU), "
            "so results differ slightly from one process with the same global batch",
            device.type,
        )
    return model


def _wrap_ddp(model: nn.Module, device: torch.device, world: int) -> nn.Module:
    """DDP around ``model`` (the model itself in one process): gradients averaged over ranks."""
    if world <= 1:
        return model
    ids = (
        [device.index if device.index is not None else torch.cuda.current_device()]
        if device.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def _make_loader(
    dataset: Dataset,
    sampler: Sampler[list[int]],
    collate_fn: Callable[..., Any] | None,
    runtime_cfg: RuntimeConfig,
    device: torch.device,
    seed: int,
) -> DataLoader:
    workers = int(runtime_cfg.workers)
    extra: dict[str, Any] = {}
    if workers > 0:
        extra = {"persistent_workers": True, "prefetch_factor": int(runtime_cfg.prefetch)}
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn or collate_detection,
        pin_memory=device.type == "cuda",
        generator=torch.Generator().manual_seed(int(seed)),
        **extra,
    )


def _resume_state(ckpt_path: Path | None, resume: bool, run: _Run) -> tuple[int, list[float]]:
    """Step to start from and the loss history, from the checkpoint when resuming."""
    if not (resume and ckpt_path is not None and Path(ckpt_path).is_file()):
        if resume:
            log.info("resume requested but no checkpoint at %s: training from step 0", ckpt_path)
        return 0, []
    meta = load_checkpoint(Path(ckpt_path), run.model, run.optimizer, run.scheduler, run.scaler)
    if run.ema is not None and meta["extra"].get("ema") is not None:
        run.ema.load_state_dict(meta["extra"]["ema"])
    log.info("resuming from %s at step %d", ckpt_path, meta["step"])
    return int(meta["step"]), [float(x) for x in meta["extra"].get("losses", [])]


def train(
    model: nn.Module,
    dataset: Dataset,
    train_cfg: TrainConfig,
    runtime_cfg: RuntimeConfig,
    steps: int,
    *,
    batch_sampler: Iterable[list[int]] | None = None,
    collate_fn: Callable[..., Any] | None = None,
    ckpt_path: Path | None = None,
    resume: bool = False,
    round_idx: int = 0,
    config_dump: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
    progress: bool = True,
    distributed: bool = False,
) -> TrainResult:
    """Train ``model`` in place for ``steps`` optimizer steps on ``dataset``.

    ``dataset[i]`` gives ``(image float (C, H, W) in [0, 1], target)``. Without a
    ``batch_sampler`` every step draws ``train_cfg.batch_size`` chips with replacement from
    ``(runtime_cfg.seed, step)``. A given ``batch_sampler`` is resumed by skipping its first
    batches. Checkpoints (model, optimizer, scheduler, AMP scaler, step, round, config, the
    model ``card``) go to ``ckpt_path`` every ``train_cfg.checkpoint_every`` steps and at the end; with
    ``resume=True`` an existing checkpoint is continued to ``steps``.

    Under ``torchrun`` with ``distributed=True`` the model is wrapped in DDP: ``batch_size`` is
    per rank, each rank trains on its own slice of the global batch (``batch_size * world``),
    gradients are averaged, losses are averaged over ranks before they are logged, and only
    rank 0 writes checkpoints and shows progress. On CUDA BatchNorm becomes SyncBatchNorm (see
    :func:`prepare_ddp_model`). Detection losses are normalised per rank (e.g. FCOS divides by
    the rank's foreground count), so DDP equals one process with the global batch exactly only
    when ranks hold equal normalisers; otherwise it is the usual DDP approximation.

    Raises:
        TrainingError: empty dataset, or a non-finite loss (the step and loss parts named).
    """
    run = _start(model, train_cfg, runtime_cfg, steps, distributed)
    start, losses = _resume_state(ckpt_path, resume, run)
    if start >= steps:
        return TrainResult(start, losses[-1] if losses else float("nan"), 0.0, 0.0, losses)
    seed = int(runtime_cfg.seed)
    if batch_sampler is None:
        sampler: Sampler[list[int]] = StepBatchSampler(
            len(dataset), train_cfg.batch_size, steps, seed, start, run.rank, run.world  # type: ignore[arg-type]
        )
    else:
        sampler = _StepWindow(batch_sampler, start, steps)
    loader = _make_loader(dataset, sampler, collate_fn, runtime_cfg, run.device, step_seed(seed, start))
    net = _wrap_ddp(run.model, run.device, run.world)
    bar = Progress(steps, "train", "step", enabled=progress and run.rank == 0, initial=start,
                   every_s=runtime_cfg.log_every_s)
    pending = _Pending()
    sync_every = CUDA_SYNC_EVERY if run.device.type == "cuda" else 1
    chips, step, t0 = 0, start, time.perf_counter()
    for batch in loader:
        torch.manual_seed(step_seed(seed, step))
        batch = _to_device(batch, run.device)
        loss, parts = train_one_step(net, batch, run.optimizer, scaler=run.scaler, grad_clip=train_cfg.grad_clip,
                                     autocast_dtype=run.autocast_dtype, device_type=run.device.type)
        run.scheduler.step()
        if run.ema is not None:
            run.ema.update(run.model)
        pending.add(step, loss, parts)
        chips += len(batch[0]) * run.world
        step += 1
        done = step == steps
        if done and run.ema is not None:
            run.ema.copy_to(run.model)  # the round's model is the average
        save_now = ckpt_path is not None and (step % train_cfg.checkpoint_every == 0 or done)
        shown: dict[str, float] = {}
        if len(pending.steps) >= sync_every or save_now or done:
            pending.flush(losses, distributed=run.world > 1)
            shown = {"loss": round(losses[-1], 4), "chips_s": round(chips / max(time.perf_counter() - t0, 1e-9), 1)}
        bar.update(1, **shown)
        if save_now and run.rank == 0 and ckpt_path is not None:
            run.save(Path(ckpt_path), step, round_idx, config_dump, losses, card)
    bar.close()
    seconds = time.perf_counter() - t0
    pending.flush(losses, distributed=run.world > 1)
    return TrainResult(steps=step, final_loss=losses[-1] if losses else float("nan"),
                       chips_per_s=chips / seconds if seconds > 0 else 0.0, seconds=seconds, losses=losses)


@dataclass
class _Run:
    """A training run's device, ranks, model (unwrapped, on its device), optimizer, schedule and AMP scaler."""

    device: torch.device
    rank: int
    world: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: Any
    autocast_dtype: torch.dtype | None
    ema: WeightAverage | None = None

    def save(self, path: Path, step: int, round_idx: int, config: dict[str, Any] | None, losses: list[float],
             card: dict[str, Any] | None = None) -> None:
        """A checkpoint with everything a resume needs, and the model card."""
        save_checkpoint(path, self.model, self.optimizer, self.scheduler,
                        self.scaler if self.scaler.is_enabled() else None, step=step, round_idx=round_idx,
                        config=config, extra={"losses": losses, "ema": self.ema.state_dict() if self.ema else None},
                        card=card)


def _start(model: nn.Module, train_cfg: TrainConfig, runtime_cfg: RuntimeConfig, steps: int, distributed: bool) -> _Run:
    device = resolve_device(runtime_cfg.device)
    if device.type == "cuda" and device.index is None and distributed:
        device = torch.device("cuda", torch.cuda.current_device())
    rank, world = _dist_rank_world(distributed)
    torch.manual_seed(int(runtime_cfg.seed))
    model.to(device)
    model.train()
    model = prepare_ddp_model(model, device, world)
    use_amp = amp_enabled(device, runtime_cfg.amp)
    ac_dtype = amp_dtype(runtime_cfg.amp_dtype) if use_amp else None
    optimizer = make_optimizer(model, train_cfg)
    scheduler = make_scheduler(optimizer, train_cfg, steps)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp and ac_dtype == torch.float16)
    ema = WeightAverage(model, train_cfg.ema_decay) if train_cfg.ema_decay > 0 else None
    return _Run(device, rank, world, model, optimizer, scheduler, scaler, ac_dtype, ema)
