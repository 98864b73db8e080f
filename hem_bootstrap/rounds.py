"""The orchestrator: rounds of train -> detect over the pool -> mine -> bank -> retrain -> evaluate.

Round 0 trains on positives plus random background chips. Each later round scans the pool
with the previous round's model, mines false positives into the bank, retrains (fine-tune by
default) and evaluates on held-out imagery that is never mined. Each step is recorded in
``manifest.json`` only after its files are in place, so ``--resume`` continues from the last
finished step and the bank never gains duplicate or lost rows.
"""

from __future__ import annotations

import errno
import logging
import shutil
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import yaml

from hem_bootstrap.config import ExperimentConfig, ImageSet, dump_config
from hem_bootstrap.detections import read_detections, write_detections
from hem_bootstrap.errors import DataError, HemError, RunError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.files import atomic_copy, atomic_path, atomic_write_text
from hem_bootstrap.rundir import RunDir

log = logging.getLogger(__name__)

STEPS_ROUND0 = ("train", "evaluate")
STEPS_ROUND = ("detect", "mine", "train", "evaluate")

# Config keys whose change breaks a run that is resumed (anything under these prefixes).
BREAKING_PREFIXES = ("data.", "tiling.", "model.", "mining.", "bank.", "train.", "runtime.seed")


class Interrupted(HemError):
    """SIGINT/SIGTERM arrived; the current step was stopped cleanly."""


# ----------------------------------------------------------------------------- context


@dataclass
class Context:
    """What every step needs: the config, the run directory, the device and distributed state."""

    cfg: ExperimentConfig
    run: RunDir
    device: Any
    rank: int = 0
    world: int = 1
    progress: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0


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


# --------------------------------------------------------------------------- signals


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


# ------------------------------------------------------------------------- data helpers


def _images(sets: list[ImageSet], what: str) -> list[tuple[Path, ImageSet]]:
    out: list[tuple[Path, ImageSet]] = []
    seen: set[Path] = set()
    for s in sets:
        paths = s.resolved_images()
        if not paths:
            raise DataError(f"data.{what}: no raster matches {s.images}")
        for p in paths:
            rp = p.resolve()
            if rp in seen:
                raise DataError(f"data.{what}: image {p} is listed twice")
            seen.add(rp)
            out.append((p, s))
    return out


def _readable_images(sets: list[ImageSet], what: str, cfg: ExperimentConfig) -> list[tuple[Path, ImageSet]]:
    """The rasters of ``sets`` that open; with ``data.on_bad_raster: skip`` the others are left out.

    The scan already logged and counted them (manifest ``bad_rasters``); mining, evaluation and
    bank-negative training must skip the same rasters instead of failing on them later.
    """
    from hem_bootstrap.geo.raster import open_raster

    out = []
    for path, s in _images(sets, what):
        try:
            open_raster(path)
        except DataError:
            if cfg.data.on_bad_raster == "fail":
                raise
            continue
        out.append((path, s))
    return out


def _as_sets(items: list[tuple[Path, ImageSet]]) -> list[ImageSet]:
    return [s.model_copy(update={"images": [str(p)]}) for p, s in items]


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


def read_truth(
    path: Path, s: ImageSet, cfg: ExperimentConfig, accepted: dict[str, Any] | None = None
) -> tuple[Any, gpd.GeoDataFrame]:
    """Raster info and its labels (empty frame when the set has no labels), plus objects accepted in review."""
    from hem_bootstrap.geo.labels import load_labels, with_pixel_labels
    from hem_bootstrap.geo.raster import open_raster
    from hem_bootstrap.mining.review import for_image

    info = open_raster(path)
    if s.labels is None:
        gt = gpd.GeoDataFrame({"label": [], "class": []}, geometry=[], crs=info.crs if info.georeferenced else None)
    else:
        gt = load_labels(s.labels, info, cfg.data, image_name=Path(path).name)
    if accepted:
        gt = with_pixel_labels(gt, info, *for_image(accepted, path), cfg.data)
    return info, gt


def read_overlay(path: str | None, info: Any) -> gpd.GeoDataFrame | None:
    """Distractors or ignore zones, reprojected to the raster's CRS, any attribute kept."""
    if path is None:
        return None
    if not Path(path).is_file():
        raise DataError(f"{path}: file not found")
    frame = gpd.read_file(path)
    if info.georeferenced and frame.crs is not None and frame.crs != info.crs:
        frame = frame.to_crs(info.crs)
    return frame


def _load_model(cfg: ExperimentConfig, ckpt: Path | None) -> Any:
    from hem_bootstrap.model.detectors import build_detector, load_checkpoint

    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    return model


# ------------------------------------------------------------------------------ steps


def step_train(ctx: Context, r: int, resume: bool = False) -> dict[str, Any]:
    """Train the round's model on positives + bank negatives + random background."""
    from hem_bootstrap.data.training import (
        ChipDataset,
        RatioBatchSampler,
        collate_chips,
        prepare_train_images,
    )
    from hem_bootstrap.mining.bank import NegativeBank
    from hem_bootstrap.mining.review import accepted_pixel_labels
    from hem_bootstrap.model.train import train

    cfg = ctx.cfg
    rd = ctx.run.round_dir(r)
    train_images = prepare_train_images(cfg.data.train, cfg.data)
    negatives = None
    hard_path = rd / "hard_positives.gpkg"
    pool_images = []
    accepted = accepted_pixel_labels(ctx.run.path) if r > 0 else {}  # objects accepted in review
    if r > 0:
        bank = NegativeBank.load(ctx.run.round_dir(r) / "bank.gpkg")
        negatives = bank.training_negatives(cfg.bank)
        if len(negatives) or accepted:
            pool_images = prepare_train_images(_as_sets(_readable_images(cfg.data.pool, "pool", cfg)), cfg.data,
                                               extra=accepted)
    dataset = ChipDataset(
        train_images,
        negatives=negatives,
        n_background=cfg.train.background_chips,
        tile_size=cfg.tiling.tile_size,
        data_cfg=cfg.data,
        augment=cfg.train.augment,
        seed=cfg.runtime.seed + 1000 * r,
        negative_images=pool_images,
        accepted=accepted,
    )
    hard_chips = 0
    if r > 0 and cfg.train.hard_positive_factor > 1 and hard_path.exists():
        from hem_bootstrap.mining.positives import oversample_boxes

        hard = gpd.read_file(hard_path)
        hard_chips = dataset.mark_hard_positives(oversample_boxes(hard), cfg.train.hard_positive_factor)
    steps = cfg.train.steps if r == 0 or not cfg.train.finetune else cfg.train.finetune_steps
    init = ctx.run.round_dir(r - 1) / "model.pt" if (r > 0 and cfg.train.finetune) else None
    model = _load_model(cfg, None)
    if init is not None:
        from hem_bootstrap.model.detectors import load_checkpoint

        load_checkpoint(init, model)
    from hem_bootstrap.model.hard_mining import apply_loss_options

    model = apply_loss_options(model, cfg.model, cfg.train)
    sampler = RatioBatchSampler(
        dataset,
        batch_size=cfg.train.batch_size,
        neg_fraction=cfg.train.neg_fraction,
        num_batches=steps,
        seed=cfg.runtime.seed + 1000 * r,
        rank=ctx.rank,
        world_size=ctx.world,
        bank_fraction=cfg.train.bank_fraction,
    )
    result = train(
        model,
        dataset,
        cfg.train,
        cfg.runtime,
        steps,
        batch_sampler=sampler,
        collate_fn=collate_chips,
        ckpt_path=rd / "model.pt",
        resume=resume,
        round_idx=r,
        config_dump=cfg.model_dump(mode="json"),
        progress=ctx.progress and ctx.is_main,
        distributed=ctx.world > 1,
    )
    info = {
        "steps": result.steps,
        "final_loss": round(float(result.final_loss), 5),
        "chips_per_s": round(float(result.chips_per_s), 2),
        "seconds": round(float(result.seconds), 1),
        "chips": {k: int(v) for k, v in zip(*np.unique(dataset.kinds, return_counts=True), strict=True)},
        "init": str(init) if init else "scratch",
        "hard_positive_chips": hard_chips,
        "accepted_positives": int(sum(len(b) for b, _ in accepted.values())),
    }
    return info


def _scan(ctx: Context, model_path: Path, sets: list[ImageSet], what: str, out: Path) -> dict[str, Any]:
    """Detect over a set of rasters with a model, streaming merged detections into ``out``."""
    from hem_bootstrap.model.infer import DetectStats, detect

    cfg = ctx.cfg
    paths = [p for p, _ in _images(sets, what)]
    model = _load_model(cfg, model_path)
    stats = DetectStats()
    frames = detect(model, paths, cfg.data, cfg.tiling, cfg.model, cfg.runtime, ctx.device, stats=stats,
                    progress=ctx.progress, shard=(ctx.rank, ctx.world))
    if ctx.is_main:
        n, _ = write_detections(frames, out)
    else:
        n = sum(len(f) for f in frames)  # drives the collectives; rank 0 alone writes
    from hem_bootstrap.distributed import broadcast_from_rank0

    return broadcast_from_rank0({
        "detections": n,
        "tiles": stats.tiles_total,
        "tiles_skipped": stats.tiles_skipped,
        "tiles_per_s": round(stats.tiles_per_s, 2),
        "seconds": round(stats.seconds, 1),
        "bad_rasters": stats.bad_rasters,
    }, what=f"{what} scan summary")


def step_detect(ctx: Context, r: int) -> dict[str, Any]:
    """Scan the pool with the previous round's model (and the training images, for hard positives)."""
    rd = ctx.run.round_dir(r)
    model = ctx.run.round_dir(r - 1) / "model.pt"
    info = _scan(ctx, model, ctx.cfg.data.pool, "pool", rd / "detections.gpkg")
    if ctx.cfg.train.hard_positive_factor > 1:
        train_scan = _scan(ctx, model, ctx.cfg.data.train, "train", rd / "train_detections.gpkg")
        info["train_scan"] = {k: train_scan[k] for k in ("detections", "tiles", "seconds")}
    return info


def _hard_positives(ctx: Context, r: int, bank: Any) -> dict[str, Any]:
    """Find this round's hard positives on the training images; list chronic ones for review."""
    from hem_bootstrap.geo.frames import concat_in_crs
    from hem_bootstrap.mining.positives import (
        LAYER,
        REVIEW_REASON,
        carry_history,
        hard_positives,
        review_rows,
    )

    cfg, rd = ctx.cfg, ctx.run.round_dir(r)
    dets = read_detections(rd / "train_detections.gpkg")
    frames = []
    for path, s in _readable_images(cfg.data.train, "train", cfg):
        info, gt = read_truth(path, s, cfg)
        d = dets[dets["image"] == str(path)]
        frames.append(hard_positives(str(path), gt, d, info.transform, cfg.evaluate.iou, cfg.train.hard_positive_below))
    current = concat_in_crs(frames, frames[0].crs).drop(columns="src_crs")
    prev_path = ctx.run.round_dir(r - 1) / "hard_positives.gpkg"
    previous = gpd.read_file(prev_path, layer=LAYER) if prev_path.exists() else None
    frame = carry_history(current, previous, cfg.train.hard_positive_max_rounds)
    _write_frame(frame, rd / "hard_positives.gpkg", LAYER)
    to_review = review_rows(frame)
    if len(to_review):
        bank.add_review(to_review, r, REVIEW_REASON)
    return {
        "hard_positives": int(frame["hard"].sum()),
        "hard_positives_oversampled": int(frame["oversample"].sum()),
        "hard_positives_to_review": int(frame["review"].sum()),
    }


def step_mine(ctx: Context, r: int) -> dict[str, Any]:
    """Match the scan to ground truth, select false positives, refresh and update the bank."""
    from hem_bootstrap.geo.frames import concat_in_crs, crs_text
    from hem_bootstrap.mining.bank import NegativeBank, route_for_review
    from hem_bootstrap.mining.matching import match_detections
    from hem_bootstrap.mining.review import accepted_pixel_labels
    from hem_bootstrap.mining.strategies import (
        build_strategy,
        random_windows,
        spatial_dedupe,
        strategy_label,
        typical_box_px,
    )
    from hem_bootstrap.model.detectors import model_hash

    cfg = ctx.cfg
    rd = ctx.run.round_dir(r)
    prev_bank = ctx.run.round_dir(r - 1) / "bank.gpkg"
    bank = NegativeBank.load(prev_bank)  # always restart from the previous round's snapshot
    dets = read_detections(rd / "detections.gpkg")
    matched = []
    images_meta = []
    truths: list[gpd.GeoDataFrame] = []
    avoid_images: list[str] = []
    accepted = accepted_pixel_labels(ctx.run.path)  # accepted in review: objects, never mined again
    for path, s in _readable_images(cfg.data.pool, "pool", cfg):
        info, gt = read_truth(path, s, cfg, accepted)
        zones = read_overlay(s.ignore_zones, info)
        truths.append(gt)
        avoid_images.append(str(path))
        images_meta.append((str(path), info.width, info.height, info.transform, info.crs))
        d = dets[dets["image"] == str(path)]
        if len(d) == 0:
            continue
        d = gpd.GeoDataFrame(d, geometry="geometry", crs=gt.crs)
        matched.append(match_detections(d, gt, cfg.mining, ignore=zones, metres_per_unit=info.metres_per_unit()))
    # one frame for the strategies, in the bank's CRS (else the first raster's), each row's own CRS in src_crs
    common = bank.crs if bank.crs is not None else (images_meta[0][4] if images_meta else None)
    allm = concat_in_crs(matched, common) if matched else dets.assign(status=[], best_iou=[], gt_index=[])
    fps = allm[allm["status"] == "fp"]
    pool_fp = int((fps["score"] >= cfg.evaluate.score_threshold).sum())
    rng = np.random.default_rng(cfg.runtime.seed + 7919 * r)
    strategy = build_strategy(cfg.mining.strategies)
    selected = strategy.select(fps, rng)
    selected = spatial_dedupe(selected, cfg.mining.dedupe_iou)
    shadow: dict[str, int] = {}
    if strategy.random:
        shadow = {"strategy_selected": len(selected), "shadow_new": _shadow_count(ctx, r, selected)}
        avoid = concat_in_crs([t.assign(image=p) for t, p in zip(truths, avoid_images, strict=True) if len(t)],
                              common) if any(len(t) for t in truths) else None
        box_px = typical_box_px(selected) if len(selected) else None
        selected = random_windows(shadow["shadow_new"], images_meta, cfg.tiling.tile_size, rng, avoid=avoid, box_px=box_px)
    own_crs = {m[0]: crs_text(m[4]) for m in images_meta}
    selected = selected.assign(src_crs=selected["image"].astype(str).map(own_crs).fillna("")) if len(selected) else selected
    refreshed = 0
    if cfg.bank.refresh and len(bank.active()):
        scores = bank.rescore(dets, cfg.bank.dedupe_iou)
        bank.refresh(scores, r, cfg.bank)
        refreshed = len(scores)
    to_bank, to_review = route_for_review(selected, bank, cfg.mining)
    mhash = model_hash(_load_model(cfg, ctx.run.round_dir(r - 1) / "model.pt"))
    label = strategy_label(cfg.mining.strategies)
    added = bank.add(to_bank, r, mhash, label, cfg.bank)
    if len(to_review):
        bank.add_review(to_review, r, f"score>{cfg.mining.review_above}")
    bank.evict(cfg.bank)
    hard_info = _hard_positives(ctx, r, bank) if cfg.train.hard_positive_factor > 1 else {}
    mined_path = rd / "mined.gpkg"
    _write_frame(selected if len(selected) else selected, mined_path, "mined")
    bank.save(rd / "bank.gpkg")
    atomic_copy(rd / "bank.gpkg", ctx.run.bank_path)
    return {
        "pool_fp": pool_fp,
        "pool_fp_all": int(len(fps)),
        "selected": int(len(selected)),
        "new_negatives": int(added["added"]),
        "updated": int(added["updated"]),
        "review": int(len(to_review)),
        "refreshed": refreshed,
        "bank_size": int(len(bank.active())),
        "bank_total": int(len(bank.frame)) if hasattr(bank, "frame") else int(len(bank.active())),
        "strategy": label,
        **shadow,
        **hard_info,
    }


def _shadow_count(ctx: Context, r: int, selected: gpd.GeoDataFrame) -> int:
    """How many of a random run's selected FPs a mining run would add as *new* bank rows.

    The random baseline must add as many negatives as the strategy it stands in for. Counting
    the selection itself over-counts: in a mining run an FP found again only updates its
    existing bank row. So a random run keeps a shadow bank of its selections
    (``round_NNN/shadow_bank.gpkg``), routed and deduplicated exactly as the real bank would
    be, and mines as many random windows as the shadow bank gained.
    """
    from hem_bootstrap.mining.bank import NegativeBank, route_for_review

    cfg = ctx.cfg
    shadow = NegativeBank.load(ctx.run.round_dir(r - 1) / "shadow_bank.gpkg")
    to_bank, _ = route_for_review(selected, shadow, cfg.mining)
    added = shadow.add(to_bank, r, "shadow", "shadow", cfg.bank)["added"]
    shadow.save(ctx.run.round_dir(r) / "shadow_bank.gpkg")
    return int(added)


def _write_frame(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    import pyogrio

    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == bool:
            frame[col] = frame[col].astype(np.int64)
    with atomic_path(path, ".gpkg") as tmp:
        pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG")


def evaluate_model(ctx: Context, model_path: Path, dets_out: Path) -> dict[str, Any]:
    """Detect over the held-out set and compute metrics (AP, P/R, FP per km²)."""
    from hem_bootstrap.evaluate import EvalImage, evaluate
    from hem_bootstrap.geo.raster import evaluated_area

    cfg = ctx.cfg
    scan = _scan(ctx, model_path, cfg.data.test, "test", dets_out)
    if not ctx.is_main:
        return {}
    dets = read_detections(dets_out)
    images = []
    areas: dict[str, dict[str, float]] = {}
    for path, s in _readable_images(cfg.data.test, "test", cfg):
        info, gt = read_truth(path, s, cfg)
        ignore = read_overlay(s.ignore_zones, info)
        area = evaluated_area(info, cfg.data.bands, ignore)  # nodata and ignore zones are not searched ground
        areas[str(path)] = {"raster_km2": area.raster_km2, "valid_km2": area.valid_km2,
                            "ignored_km2": area.ignored_km2, "evaluated_km2": area.evaluated_km2}
        images.append(
            EvalImage(
                image=str(path),
                gt=gt,
                area_km2=area.evaluated_km2,
                transform=info.transform,
                distractors=read_overlay(s.distractors, info),
                ignore=ignore,
                metres_per_unit=info.metres_per_unit(),
            )
        )
    metrics = evaluate(dets, images, cfg.evaluate, matching=cfg.mining.matching, center_dist=cfg.mining.center_dist_m)
    metrics["area_by_image"] = areas
    metrics["scan"] = scan
    return metrics


def step_evaluate(ctx: Context, r: int) -> dict[str, Any]:
    """Evaluate the round's model on held-out imagery and write ``metrics.json``."""
    from hem_bootstrap.evaluate import write_metrics

    rd = ctx.run.round_dir(r)
    metrics = evaluate_model(ctx, rd / "model.pt", rd / "test_detections.gpkg")
    if ctx.is_main:
        write_metrics(rd / "metrics.json", metrics)
    return {k: metrics.get(k) for k in ("ap50", "ap", "precision", "recall", "fp_per_km2")}


# --------------------------------------------------------------------------- the loop


def _save_empty_bank(ctx: Context) -> None:
    from hem_bootstrap.mining.bank import NegativeBank

    path = ctx.run.round_dir(0) / "bank.gpkg"
    if not path.exists():
        NegativeBank.load(path).save(path)


def run_round(ctx: Context, r: int, manifest: dict[str, Any]) -> dict[str, Any]:
    """Run the unfinished steps of round ``r``; the manifest is saved after each step."""
    steps = STEPS_ROUND0 if r == 0 else STEPS_ROUND
    entry = RunDir.round_entry(manifest, r)
    entry.setdefault("metrics", f"round_{r:03d}/metrics.json")
    if r > 0:
        entry.setdefault("mined", f"round_{r:03d}/mined.gpkg")
    from hem_bootstrap.distributed import any_rank, broadcast_from_rank0, run_on_rank0

    funcs = {"detect": step_detect, "mine": step_mine, "train": step_train, "evaluate": step_evaluate}
    for step in steps:
        if step in entry["steps"]:
            continue
        _StopFlag.requested = any_rank(_StopFlag.requested)  # every rank stops at the same step
        _check_stop(ctx.run)
        t0 = time.perf_counter()
        log.info("round %d: %s", r, step)
        fault_point(f"round{r}.{step}.start")
        if step == "train":
            ckpt = ctx.run.round_dir(r) / "model.pt"
            info = step_train(ctx, r, resume=ckpt.exists())
        elif step == "mine":  # once, on rank 0: the bank never gets duplicate or interleaved rows
            info = run_on_rank0(step_mine, ctx, r, what=f"round {r} mining")
        else:
            info = funcs[step](ctx, r)
        info = broadcast_from_rank0(info, what=f"round {r} {step}")  # same manifest on every rank
        info["seconds_total"] = round(time.perf_counter() - t0, 1)
        if step == "detect" and info.get("bad_rasters"):
            manifest.setdefault("bad_rasters", [])
            for b in info["bad_rasters"]:
                if b not in manifest["bad_rasters"]:
                    manifest["bad_rasters"].append(b)
        if r == 0 and step == "train":
            _save_empty_bank(ctx) if ctx.is_main else None
            entry.update({"bank_size": 0, "new_negatives": 0, "pool_fp": None})
        if step == "mine":
            entry.update({k: info[k] for k in ("bank_size", "new_negatives", "pool_fp", "review")})
        entry["steps"][step] = info
        fault_point(f"round{r}.{step}.end")
        if ctx.is_main:
            ctx.run.save_manifest(manifest)
        _barrier(ctx)
    return entry


def _barrier(ctx: Context) -> None:
    if ctx.world > 1:
        from hem_bootstrap.distributed import barrier

        barrier("run step barrier")


def _should_stop(cfg: ExperimentConfig, manifest: dict[str, Any], r: int) -> str | None:
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


def preflight(cfg: ExperimentConfig) -> None:
    """Check every input before a run starts, so a bad path, band or label file fails in seconds, not after training.

    Opens each raster's header and loads its labels once. A pool or test raster that does not
    open is left to the scan under ``data.on_bad_raster: skip`` (logged and counted there).

    Raises:
        DataError: no image matched, an image listed twice or in both the pool/train and the
            held-out set, a missing or unreadable file, a band that does not exist, bad labels.
        ModelError: a weights file that does not exist.
    """
    from hem_bootstrap.errors import ModelError
    from hem_bootstrap.geo.labels import load_labels
    from hem_bootstrap.geo.raster import open_raster

    if not cfg.data.train:
        raise DataError("data.train: no training imagery configured; expected at least one image set")
    where: dict[Path, str] = {}
    for what, sets in (("train", cfg.data.train), ("pool", cfg.data.pool), ("test", cfg.data.test)):
        readable: dict[int, int] = {}
        first_error: dict[int, str] = {}
        for path, s in _images(sets, what):
            other = where.get(path.resolve())
            if other is not None and "test" in (what, other):
                raise DataError(f"data.{what}: image {path} is also in data.{other}; held-out imagery must not be "
                                "trained on or mined")
            where[path.resolve()] = what
            if not path.exists():  # a typo, not a bad raster: data.on_bad_raster does not apply
                raise DataError(f"{path}: raster not found (data.{what})")
            set_key = id(s)
            readable.setdefault(set_key, 0)
            try:
                info = open_raster(path)
            except DataError as err:
                if what == "train" or cfg.data.on_bad_raster == "fail":
                    raise
                first_error.setdefault(set_key, str(err))
                continue
            readable[set_key] += 1
            bad = [b for b in cfg.data.bands if b > info.count]
            if bad:
                raise DataError(f"{path}: data.bands asks for band {bad[0]} but the raster has {info.count} band(s)")
            if s.labels is not None:
                load_labels(s.labels, info, cfg.data, image_name=path.name)
            for extra in (s.distractors, s.ignore_zones):
                if extra is not None and not Path(extra).is_file():
                    raise DataError(f"{extra}: file not found (data.{what})")
        for i, s in enumerate(sets):
            if readable.get(id(s), 1) == 0:
                raise DataError(f"data.{what}[{i}]: no readable raster in {s.images} (data.on_bad_raster: skip "
                                f"skips bad rasters, but a set needs one that reads); first: {first_error[id(s)]}")
    for key in ("weights", "backbone_weights"):
        value = getattr(cfg.model, key)
        if value is not None and not Path(value).is_file():
            raise ModelError(f"model.{key}: {value} not found; give a local .pth/.pt file")


def prepare_run(
    cfg: ExperimentConfig, *, resume: bool, fresh: bool, force: bool, config_path: Path | None
) -> tuple[RunDir, dict[str, Any]]:
    """Create or reopen the run directory; check a resumed run's config."""
    run = RunDir(Path(cfg.rounds.out_dir) / cfg.rounds.name)
    new_tree = cfg.model_dump(mode="json")
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
        old_tree = yaml.safe_load(resolved.read_text())
        broken = breaking_changes(old_tree, new_tree)
        if broken and not force:
            shown = ", ".join(broken[:6]) + (" ..." if len(broken) > 6 else "")
            raise RunError(f"{run.path}: config changed since the run started ({shown}); use --force to continue")
    return run, manifest


def _start(ctx: Context, manifest: dict[str, Any], config_path: Path | None) -> None:
    if ctx.is_main:
        atomic_write_text(ctx.run.path / "config.resolved.yaml", dump_config(ctx.cfg))
        manifest.setdefault("name", ctx.cfg.rounds.name)
        manifest.setdefault("config", "config.resolved.yaml")
        if config_path is not None:
            manifest.setdefault("config_source", str(config_path))
        ctx.run.save_manifest(manifest)


def _make_context(cfg: ExperimentConfig, run: RunDir) -> Context:
    from hem_bootstrap.distributed import dist_info
    from hem_bootstrap.model.device import resolve_device, seed_everything

    rank, world, local = dist_info()
    device = resolve_device(cfg.runtime.device)
    if world > 1 and device.type == "cuda":
        import torch

        device = torch.device("cuda", local)
    seed_everything(cfg.runtime.seed)
    if cfg.runtime.threads:
        import torch

        torch.set_num_threads(cfg.runtime.threads)
    # progress bars follow the log level: `hem -q` (warnings only) shows none
    progress = logging.getLogger().isEnabledFor(logging.INFO)
    return Context(cfg=cfg, run=run, device=device, rank=rank, world=world, progress=progress)


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
    preflight(cfg)
    from hem_bootstrap.distributed import init_distributed, run_on_rank0

    init_distributed(cfg.runtime)
    # rank 0 alone checks, clears or reopens the run directory; the others get its manifest or error
    run, manifest = run_on_rank0(prepare_run, cfg, resume=resume or max_new_rounds is not None, fresh=fresh,
                                 force=force, config_path=config_path, what="preparing the run directory")
    ctx = _make_context(cfg, run)
    if ctx.is_main:
        run.acquire()
        for p in run.remove_stale_temps():
            log.info("removed %s, left by an interrupted process", p)
    try:
        with graceful_signals():
            _start(ctx, manifest, config_path)
            _barrier(ctx)
            done = [e["round"] for e in manifest["rounds"] if "evaluate" in e.get("steps", {})]
            last_round = cfg.rounds.n_rounds
            if max_new_rounds is not None:
                last_round = (max(done) if done else -1) + max_new_rounds
            r = 0
            while r <= last_round:
                with _disk_errors(run, r):
                    run_round(ctx, r, manifest)
                reason = _should_stop(cfg, manifest, r)
                if reason and r < last_round and max_new_rounds is None:
                    log.info("stopping after round %d: %s", r, reason)
                    manifest["stopped"] = reason
                    if ctx.is_main:
                        run.save_manifest(manifest)
                    break
                r += 1
            if ctx.is_main:
                from hem_bootstrap.report import format_table, round_table

                table = format_table(round_table(run.path))
                atomic_write_text(run.path / "table.txt", table + "\n")
                if print_table:
                    print(table)
                    if manifest.get("stopped"):
                        print(f"\nstopped early: {manifest['stopped']}")
                    print(f"\nrun directory: {run.path}")
    finally:
        if ctx.is_main:
            run.release()
    return run.path


def run_one_more_round(cfg: ExperimentConfig, run_dir: Path, *, force: bool = False,
                       config_path: Path | None = None) -> Path:
    """``hem round``: exactly one more round of an existing run (finishing an unfinished one first)."""
    run_dir = Path(run_dir)
    if not (run_dir / "manifest.json").is_file():
        raise RunError(f"{run_dir}: no manifest.json; start the run with `hem run CONFIG` first")
    cfg.rounds.out_dir = str(run_dir.parent)
    cfg.rounds.name = run_dir.name
    manifest = RunDir(run_dir).load_manifest()
    unfinished = [e for e in manifest["rounds"] if "evaluate" not in e.get("steps", {})]
    n = 0 if unfinished else 1
    return run_experiment(cfg, resume=True, force=force, config_path=config_path, max_new_rounds=n)


# ------------------------------------------------------------------------ CLI helpers


def run_status(run_dir: Path) -> str:
    """Text for ``hem status``."""
    run = RunDir(Path(run_dir))
    if not run.exists():
        raise RunError(f"{run_dir}: not a run directory (no manifest.json)")
    m = run.load_manifest()
    lines = [f"run: {run.path}", f"updated: {m.get('updated', '?')}"]
    for e in m["rounds"]:
        steps = STEPS_ROUND0 if e["round"] == 0 else STEPS_ROUND
        done = [s for s in steps if s in e.get("steps", {})]
        todo = [s for s in steps if s not in done]
        ap = e.get("steps", {}).get("evaluate", {}).get("ap50")
        lines.append(
            f"round {e['round']}: done {','.join(done) or '-'}"
            + (f"; pending {','.join(todo)}" if todo else "")
            + (f"; bank {e.get('bank_size')}" if e.get("bank_size") is not None else "")
            + (f"; AP50 {ap:.3f}" if isinstance(ap, float) else "")
        )
    if m.get("stopped"):
        lines.append(f"stopped: {m['stopped']}")
    bad = m.get("bad_rasters", [])
    lines.append(f"skipped rasters: {len(bad)}")
    lines.extend(f"  {b}" for b in bad)
    lock = run.path / ".lock"
    if lock.exists():
        import fcntl

        with open(lock) as fh:
            try:
                fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
            except BlockingIOError:
                lines.append(f"in use by {fh.read().strip()}")
    return "\n".join(lines)


def _run_from_cfg(cfg: ExperimentConfig) -> RunDir:
    return RunDir(Path(cfg.rounds.out_dir) / cfg.rounds.name)


def train_round_cli(cfg: ExperimentConfig, round_idx: int, resume: bool) -> Path:
    """``hem train``: train one round's model with the run's bank as of that round."""
    run = _run_from_cfg(cfg)
    if round_idx > 0 and not (run.round_dir(round_idx) / "bank.gpkg").exists():
        raise RunError(f"{run.path}: round {round_idx} has no bank yet; run `hem round` or mine first")
    from contextlib import nullcontext

    from hem_bootstrap.distributed import init_distributed

    init_distributed(cfg.runtime)
    ctx = _make_context(cfg, run)
    with run.locked() if ctx.is_main else nullcontext():  # under torchrun rank 0 holds the lock
        step_train(ctx, round_idx, resume=resume)
    return run.round_dir(round_idx) / "model.pt"


def _check_model(model: Path) -> Path:
    model = Path(model)
    if not model.is_file():
        raise RunError(f"{model}: model checkpoint not found")
    return model


def detect_cli(cfg: ExperimentConfig, model: Path, images: list[str] | None, out: Path) -> str:
    """``hem detect``: scan rasters (default: the pool) and write merged detections."""
    from hem_bootstrap.distributed import init_distributed

    init_distributed(cfg.runtime)
    sets = cfg.data.pool
    if images:
        sets = [ImageSet(images=images)]
        if not ImageSet(images=images).resolved_images():
            raise DataError(f"--images {' '.join(images)}: no file matches")
        missing = [p for p in ImageSet(images=images).resolved_images() if not p.exists()]
        if missing:
            raise DataError(f"--images: {missing[0]} does not exist")
    ctx = _make_context(cfg, _run_from_cfg(cfg))
    info = _scan(ctx, _check_model(model), sets, "pool" if not images else "images", Path(out))
    return (
        f"{info['detections']} detections from {info['tiles']} tiles ({info['tiles_skipped']} skipped) "
        f"at {info['tiles_per_s']} tiles/s -> {out}"
    )


def evaluate_cli(cfg: ExperimentConfig, model: Path, out: Path | None) -> str:
    """``hem evaluate``: metrics of a model on the held-out set."""
    import json
    import tempfile

    from hem_bootstrap.distributed import broadcast_from_rank0, init_distributed
    from hem_bootstrap.evaluate import write_metrics

    init_distributed(cfg.runtime)
    ctx = _make_context(cfg, _run_from_cfg(cfg))
    with tempfile.TemporaryDirectory() as tmp:  # under torchrun rank 0's scan output; the others write none
        metrics = evaluate_model(ctx, _check_model(model), Path(tmp) / "dets.gpkg")
    metrics = broadcast_from_rank0(metrics, what="evaluation metrics")
    if out is not None and ctx.is_main:
        write_metrics(out, metrics)
    keys = ["ap50", "ap", "precision", "recall", "f1", "fp_per_km2", "fp_per_km2_at_recall",
            "recall_at_fp_per_km2", "fp_on_distractors_share", "n_gt", "n_det", "area_km2"]
    return json.dumps({k: metrics.get(k) for k in keys}, indent=2)


def export_model_cli(run_dir: Path, out: Path, round_idx: int | None) -> str:
    """``hem export-model``: weights plus a JSON model card."""
    import json

    from hem_bootstrap.model.detectors import export_model

    run = RunDir(Path(run_dir))
    m = run.load_manifest()
    trained = [e["round"] for e in m["rounds"] if "train" in e.get("steps", {})]
    if not trained:
        raise RunError(f"{run_dir}: no trained round to export")
    r = max(trained) if round_idx is None else round_idx
    if r not in trained:
        raise RunError(f"{run_dir}: round {r} has no trained model; trained rounds: {trained}")
    cfg_tree = yaml.safe_load((run.path / "config.resolved.yaml").read_text())
    metrics_path = run.path / f"round_{r:03d}" / "metrics.json"
    card = {
        "architecture": cfg_tree["model"]["arch"],
        "classes": cfg_tree["data"]["classes"],
        "tile_size": cfg_tree["tiling"]["tile_size"],
        "bands": cfg_tree["data"]["bands"],
        "round": r,
        "training_data": [s["images"] for s in cfg_tree["data"]["train"]],
        "negatives_from": [s["images"] for s in cfg_tree["data"]["pool"]],
        "metrics": json.loads(metrics_path.read_text()) if metrics_path.exists() else None,
    }
    try:
        from hem_bootstrap.geo.raster import open_raster

        first = cfg_tree["data"]["train"][0]["images"][0]
        card["gsd_m"] = abs(open_raster(first).res[0])
    except (HemError, IndexError, KeyError):
        card["gsd_m"] = None
    if card["metrics"]:
        card["metrics"] = {k: card["metrics"].get(k) for k in ("ap50", "ap", "precision", "recall", "fp_per_km2")}
    export_model(run.path / f"round_{r:03d}" / "model.pt", Path(out), card)
    return f"weights: {out}\nmodel card: {Path(out).with_suffix('.json')}"


def _bank_of(run_dir: Path) -> Any:
    from hem_bootstrap.mining.bank import NegativeBank

    path = Path(run_dir) / "bank.gpkg"
    if not path.is_file():
        raise RunError(f"{run_dir}: no bank.gpkg (has round 1 been mined?)")
    return NegativeBank.load(path)


def bank_stats_text(run_dir: Path) -> str:
    """``hem bank stats``."""
    import json

    return json.dumps(_bank_of(run_dir).stats(), indent=2, default=str)


def bank_export_cli(run_dir: Path, out: Path, fmt: str) -> str:
    """``hem bank export``."""
    from hem_bootstrap.geo.raster import open_raster

    bank = _bank_of(run_dir)
    images = sorted(set(bank.active()["image"])) if len(bank.active()) else []
    rasters = {}
    for im in images:
        try:
            rasters[im] = open_raster(im).transform
        except HemError:
            pass
    bank.export(Path(out), fmt, rasters)
    return f"{fmt}: {out}"


def review_apply_cli(run_dir: Path, decisions: Path) -> str:
    """``hem review apply``: decisions go into the bank snapshot the next round starts from.

    Negatives join the latest ``round_NNN/bank.gpkg`` (and the top-level copy); positives are
    appended to the run's accepted labels, which every later round trains and mines with
    (see :mod:`hem_bootstrap.mining.review`). The manifest lists each application.
    """
    from hem_bootstrap.mining.bank import NegativeBank, apply_review
    from hem_bootstrap.mining.review import POSITIVES_FILE, append_accepted, latest_snapshot

    run = RunDir(Path(run_dir))
    if not Path(decisions).is_file():
        raise DataError(f"{decisions}: decisions file not found")
    frame = gpd.read_file(decisions)
    with run.locked():
        snapshot = latest_snapshot(run.path)
        if snapshot is None:
            raise RunError(f"{run_dir}: no bank snapshot (round_NNN/bank.gpkg); has round 1 been mined?")
        bank = NegativeBank.load(snapshot)
        result = apply_review(bank, frame)
        bank.save(snapshot)
        bank.save(run.bank_path)
        cfg_tree = yaml.safe_load((run.path / "config.resolved.yaml").read_text())
        round_idx = int(snapshot.parent.name.split("_")[1])
        added = append_accepted(run.path, result["new_positives"], list(cfg_tree["data"]["classes"]), round_idx)
        manifest = run.load_manifest()
        manifest.setdefault("reviews", []).append({
            "decisions": str(Path(decisions).resolve()), "snapshot": str(snapshot.relative_to(run.path)),
            "negatives_added": int(result["negatives_added"]), "positives_accepted": added,
            "negatives_retired": int(result["negatives_retired"]),
        })
        run.save_manifest(manifest)
    return (
        f"{result['negatives_added']} moved to the bank ({snapshot.relative_to(run.path)}), {added} accepted as "
        f"objects ({POSITIVES_FILE}); the next round trains with them and never mines them again"
    )
