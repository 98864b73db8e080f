"""The loop: rounds of train -> detect over the pool -> mine -> bank -> retrain -> evaluate, resumable.

Round 0 trains on positives plus random background chips. Each later round scans the pool
with the previous round's model, mines false positives into the bank, retrains (fine-tune by
default) and evaluates on held-out imagery that is never mined. Each step is recorded in
``manifest.json`` only after its files are in place, so ``--resume`` continues from the last
finished step and the bank never gains duplicate or lost rows. SIGINT / SIGTERM stop cleanly
between steps; an ``OSError`` while writing becomes one line that says the finished steps are
intact.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import yaml

from hem_bootstrap.config import ExperimentConfig, dump_config, with_defaults
from hem_bootstrap.distributed import (
    any_rank,
    barrier,
    broadcast_from_rank0,
    dist_info,
    init_distributed,
    run_on_rank0,
)
from hem_bootstrap.errors import HemError, RunError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.files import atomic_write_text
from hem_bootstrap.inputs import check_inputs
from hem_bootstrap.model.device import resolve_device, seed_everything
from hem_bootstrap.report import format_table, round_table
from hem_bootstrap.rundir import RunDir
from hem_bootstrap.steps import (
    STEPS_ROUND,
    STEPS_ROUND0,
    Context,
    load_model,
    save_empty_bank,
    step_detect,
    step_evaluate,
    step_mine,
    step_train,
)

log = logging.getLogger(__name__)

BREAKING_PREFIXES = ("data.", "tiling.", "model.", "mining.", "bank.", "train.", "runtime.seed")
"""Config keys whose change breaks a run that is resumed (anything under these prefixes)."""


class Interrupted(HemError):
    """SIGINT/SIGTERM arrived; the current step was stopped cleanly."""


# ------------------------------------------------------------------------------ config changes


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def config_diff(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two resolved config trees."""
    a, b = _flatten(old), _flatten(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))


def breaking_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Changed keys that make resuming unsafe (data, tiling, model, mining, bank, train, seed)."""
    return [k for k in config_diff(old, new) if k.startswith(BREAKING_PREFIXES) or k in BREAKING_PREFIXES]


# ------------------------------------------------------------------------------ signals and disk


class _StopFlag:
    requested = False


@contextmanager
def graceful_signals() -> Iterator[None]:
    """SIGINT / SIGTERM set a flag checked between steps; a second signal stops at once."""
    old: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        if _StopFlag.requested:
            raise KeyboardInterrupt
        _StopFlag.requested = True
        log.warning("stop requested (signal %d): finishing the current step, then stopping", signum)

    for stop_sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[int(stop_sig)] = signal.signal(stop_sig, handler)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
        _StopFlag.requested = False


def _check_stop(run: RunDir) -> None:
    if _StopFlag.requested:
        raise Interrupted(f"stopped cleanly; resume with: hem run CONFIG --resume (run directory {run.path})")


@contextmanager
def _disk_errors(run: RunDir, r: int) -> Iterator[None]:
    """An OSError while a round writes (disk full, read-only, quota) becomes a one-line RunError.

    Every file is written under a temporary name and renamed and the manifest is saved only
    after a step's files are in place, so the finished steps stay intact and resumable.
    """
    try:
        yield
    except OSError as err:
        where = err.filename or run.path
        full = err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)
        what, fix = ("could not write", "free space") if full else ("I/O error", "fix it")
        raise RunError(
            f"{where}: {what} in round {r} ({err.strerror or err}); finished steps are intact, "
            f"{fix} and resume with: hem run CONFIG --resume"
        ) from None


# ------------------------------------------------------------------------------ one round


def _run_step(ctx: Context, r: int, step: str) -> dict[str, Any]:
    funcs: dict[str, Callable[[Context, int], dict[str, Any]]] = {
        "detect": step_detect, "evaluate": step_evaluate,
    }
    if step == "train":
        return step_train(ctx, r, resume=(ctx.run.round_dir(r) / "model.pt").exists())
    if step == "mine":  # once, on rank 0: the bank never gets duplicate or interleaved rows
        return run_on_rank0(step_mine, ctx, r, what=f"round {r} mining")
    return funcs[step](ctx, r)


def _record(ctx: Context, r: int, step: str, info: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Put a finished step's summary in the manifest (skipped rasters, bank size, ...)."""
    entry = RunDir.round_entry(manifest, r)
    if step == "detect" and info.get("bad_rasters"):
        bad = manifest.setdefault("bad_rasters", [])
        bad.extend(b for b in info["bad_rasters"] if b not in bad)
    if r == 0 and step == "train":
        if ctx.is_main:
            save_empty_bank(ctx)
        entry.update({"bank_size": 0, "new_negatives": 0, "pool_fp": None})
    if step == "mine":
        entry.update({k: info[k] for k in ("bank_size", "new_negatives", "pool_fp", "review")})
    entry["steps"][step] = info


def run_round(ctx: Context, r: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Run the unfinished steps of round ``r``; the manifest is saved after each step."""
    entry = RunDir.round_entry(manifest, r)
    entry.setdefault("metrics", f"round_{r:03d}/metrics.json")
    if r > 0:
        entry.setdefault("mined", f"round_{r:03d}/mined.gpkg")
    for step in STEPS_ROUND0 if r == 0 else STEPS_ROUND:
        if step in entry["steps"]:
            continue
        _StopFlag.requested = any_rank(_StopFlag.requested)  # every rank stops at the same step
        _check_stop(ctx.run)
        t0 = time.perf_counter()
        log.info("round %d: %s", r, step)
        fault_point(f"round{r}.{step}.start")
        info = broadcast_from_rank0(_run_step(ctx, r, step), what=f"round {r} {step}")  # one manifest everywhere
        info["seconds_total"] = round(time.perf_counter() - t0, 1)
        log.info("round %d: %s done in %.0f s", r, step, info["seconds_total"])
        _record(ctx, r, step, info, manifest)
        fault_point(f"round{r}.{step}.end")
        if ctx.is_main:
            ctx.run.save_manifest(manifest)
        _barrier(ctx)
    return entry


def _barrier(ctx: Context) -> None:
    if ctx.world > 1:
        barrier("run step barrier")


def should_stop(cfg: ExperimentConfig, manifest: dict[str, Any], r: int) -> str | None:
    """Why the loop stops after round ``r`` (``rounds.stop_if_no_new``, ``rounds.patience``), or None."""
    entries = [e for e in manifest["rounds"] if "evaluate" in e.get("steps", {})]
    last = RunDir.round_entry(manifest, r)
    if r > 0 and cfg.rounds.stop_if_no_new and last.get("new_negatives", 1) == 0:
        return "no new negatives"
    if cfg.rounds.patience and len(entries) > cfg.rounds.patience:
        aps = [e["steps"]["evaluate"].get("ap50") or 0.0 for e in entries]
        best_before = max(aps[: -cfg.rounds.patience])
        if max(aps[-cfg.rounds.patience :]) <= best_before:
            return f"no held-out AP gain for {cfg.rounds.patience} rounds"
    return None


# ------------------------------------------------------------------------------ the experiment


def prepare_run(
    cfg: ExperimentConfig, *, resume: bool, fresh: bool, force: bool, config_path: Path | None
) -> tuple[RunDir, dict[str, Any]]:
    """Create or reopen the run directory; check a resumed run's config.

    Raises:
        RunError: the run exists without ``--resume``, or its config changed in a way that matters.
    """
    run = RunDir(Path(cfg.rounds.out_dir) / cfg.rounds.name)
    if resume and fresh:
        raise RunError("--resume and --fresh: choose one (continue the run, or delete it and start over)")
    if run.path.exists() and not run.path.is_dir():
        raise RunError(f"{run.path}: a file is in the way of the run directory (rounds.out_dir / rounds.name)")
    if not run.exists() and _results_of_another_run(run.path):
        raise RunError(f"{run.path}: the folder holds results (a bank, a round's metrics) but no manifest.json, so "
                       "no run hem could resume; move it away or set rounds.name (hem deletes only run directories)")
    if run.exists() and fresh:
        run.acquire()
        run.release()
        shutil.rmtree(run.path)
    if run.exists() and not resume:
        raise RunError(
            f"{run.path}: a run of this name exists; use --resume to continue it, --fresh to start over, "
            "or set rounds.name"
        )
    manifest = run.load_manifest()
    resolved = run.path / "config.resolved.yaml"
    if run.exists() and resolved.is_file():
        broken = breaking_changes(with_defaults(yaml.safe_load(resolved.read_text())), cfg.model_dump(mode="json"))
        if broken and not force:
            shown = ", ".join(broken[:6]) + (" ..." if len(broken) > 6 else "")
            raise RunError(f"{run.path}: config changed since the run started ({shown}); use --force to continue")
        if broken:
            _check_checkpoints_fit(cfg, run, manifest)
    return run, manifest


def _results_of_another_run(folder: Path) -> bool:
    """Whether a folder without a manifest holds what a run leaves (a bank, a round's metrics or bank).

    A log file, the lock, the config or ``hem train``'s round-0 model are no results: a run may start there.
    """
    if not folder.is_dir():
        return False
    rounds = [p for p in folder.glob("round_*") if p.is_dir()]
    return any((folder / name).exists() for name in ("bank.gpkg", "review_positives.gpkg")) or any(
        (r / name).exists() for r in rounds for name in ("metrics.json", "bank.gpkg", "detections.gpkg"))


def _check_checkpoints_fit(cfg: ExperimentConfig, run: RunDir, manifest: dict[str, Any]) -> None:
    """A forced config change must still load the run's last trained model, or nothing is written.

    Raises:
        ModelError: that checkpoint does not fit the model the changed config builds.
    """
    trained = [e["round"] for e in manifest["rounds"] if "train" in e.get("steps", {})]
    ckpt = run.round_path(max(trained)) / "model.pt" if trained else None
    if ckpt is not None and ckpt.is_file():
        load_model(cfg, ckpt)


def _start(ctx: Context, manifest: dict[str, Any], config_path: Path | None) -> None:
    if ctx.is_main:
        atomic_write_text(ctx.run.path / "config.resolved.yaml", dump_config(ctx.cfg))
        manifest.setdefault("name", ctx.cfg.rounds.name)
        manifest.setdefault("config", "config.resolved.yaml")
        if config_path is not None:
            manifest.setdefault("config_source", str(config_path))
        ctx.run.save_manifest(manifest)


def make_context(cfg: ExperimentConfig, run: RunDir, inputs: Any = None) -> Context:
    """Device, ranks, seeds and threads for a process of this experiment."""
    rank, world, local = dist_info()
    device = resolve_device(cfg.runtime.device)
    if world > 1 and device.type == "cuda":
        device = torch.device("cuda", local)
    seed_everything(cfg.runtime.seed)
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    # progress bars follow the log level: `hem -q` (warnings only) shows none
    progress = logging.getLogger().isEnabledFor(logging.INFO)
    return Context(cfg=cfg, run=run, device=device, rank=rank, world=world, progress=progress, inputs=inputs)


def _rounds(ctx: Context, manifest: dict[str, Any], max_new_rounds: int | None) -> None:
    cfg, run = ctx.cfg, ctx.run
    done = [e["round"] for e in manifest["rounds"] if "evaluate" in e.get("steps", {})]
    last_round = cfg.rounds.n_rounds if max_new_rounds is None else (max(done) if done else -1) + max_new_rounds
    for r in range(last_round + 1):
        with _disk_errors(run, r):
            run_round(ctx, r, manifest)
        reason = should_stop(cfg, manifest, r)
        if reason and r < last_round and max_new_rounds is None:
            log.info("stopping after round %d: %s", r, reason)
            manifest["stopped"] = reason
            if ctx.is_main:
                run.save_manifest(manifest)
            return


def _print_table(run: RunDir, manifest: dict[str, Any], show: bool) -> None:
    table = format_table(round_table(run.path))
    atomic_write_text(run.path / "table.txt", table + "\n")
    if show:
        print(table)
        if manifest.get("stopped"):
            print(f"\nstopped early: {manifest['stopped']}")
        print(f"\nrun directory: {run.path}")


def run_experiment(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    fresh: bool = False,
    force: bool = False,
    config_path: Path | None = None,
    max_new_rounds: int | None = None,
    print_table: bool = True,
) -> Path:
    """Run (or resume) the whole experiment; print the round table at the end. Returns the run dir."""
    inputs = check_inputs(cfg)  # before anything is created: bad inputs fail in seconds
    init_distributed(cfg.runtime)
    # rank 0 alone checks, clears or reopens the run directory; the others get its manifest or error
    run, manifest = run_on_rank0(prepare_run, cfg, resume=resume or max_new_rounds is not None, fresh=fresh,
                                 force=force, config_path=config_path, what="preparing the run directory")
    ctx = make_context(cfg, run, inputs)
    if ctx.is_main:
        run.acquire()
        for p in run.remove_stale_temps():
            log.info("removed %s, left by an interrupted process", p)
    try:
        with graceful_signals():
            _start(ctx, manifest, config_path)
            _barrier(ctx)
            _rounds(ctx, manifest, max_new_rounds)
            if ctx.is_main:
                _print_table(run, manifest, print_table)
    finally:
        if ctx.is_main:
            run.release()
    return run.path


def run_one_more_round(cfg: ExperimentConfig, run_dir: Path, *, force: bool = False,
                       config_path: Path | None = None) -> Path:
    """``hem round``: exactly one more round of an existing run (finishing an unfinished one first).

    Raises:
        RunError: ``run_dir`` holds no run.
    """
    run_dir = Path(run_dir).resolve()  # "." names no folder
    if not (run_dir / "manifest.json").is_file():
        raise RunError(f"{run_dir}: no manifest.json; start the run with `hem run CONFIG` first")
    cfg.rounds.out_dir = str(run_dir.parent)
    cfg.rounds.name = run_dir.name
    manifest = RunDir(run_dir).load_manifest()
    unfinished = [e for e in manifest["rounds"] if "evaluate" not in e.get("steps", {})]
    return run_experiment(cfg, resume=True, force=force, config_path=config_path,
                          max_new_rounds=0 if unfinished else 1)
