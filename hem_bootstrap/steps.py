"""The steps of a round: train, detect over the pool, mine into the bank, evaluate on held-out imagery.

Each step takes a :class:`Context` and a round number, writes its files under
``round_NNN/`` (every one atomically) and returns the summary the manifest records. Inputs
come from :class:`~hem_bootstrap.inputs.Inputs`: every raster's header and labels are read
once per process, not once per step.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pyogrio
import shapely
import torch

from hem_bootstrap.config import EvaluateConfig, ExperimentConfig, TrainConfig
from hem_bootstrap.data.sampling import RatioBatchSampler
from hem_bootstrap.data.training import ChipDataset, TrainImage, collate_chips
from hem_bootstrap.detections import Naming, read_detections, write_detections
from hem_bootstrap.distributed import broadcast_from_rank0
from hem_bootstrap.evaluate import EvalImage, evaluate, write_metrics
from hem_bootstrap.files import atomic_copy, atomic_path
from hem_bootstrap.geo.aoi import aoi_in_pixels
from hem_bootstrap.geo.frames import concat_in_crs, crs_text
from hem_bootstrap.geo.labels import LabelIndex, PixelLabels
from hem_bootstrap.inputs import Inputs, RasterInput, check_inputs
from hem_bootstrap.logs import track
from hem_bootstrap.mining.bank import NegativeBank
from hem_bootstrap.mining.matching import match_detections
from hem_bootstrap.mining.positives import (
    LAYER,
    REVIEW_REASON,
    carry_history,
    hard_positives,
    oversample_boxes,
    review_rows,
)
from hem_bootstrap.mining.review import accepted_pixel_labels, route_for_review
from hem_bootstrap.mining.strategies import (
    build_strategy,
    random_windows,
    spatial_dedupe,
    strategy_label,
    typical_box_px,
)
from hem_bootstrap.model.card import gsd_of, model_card
from hem_bootstrap.model.checkpoints import checkpoint_hash, load_checkpoint
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.hard_mining import apply_loss_options
from hem_bootstrap.model.infer import DetectStats, detect
from hem_bootstrap.model.pretrained import resolve_freezing
from hem_bootstrap.model.train import train
from hem_bootstrap.remote import location
from hem_bootstrap.rundir import RunDir

log = logging.getLogger(__name__)

STEPS_ROUND0 = ("train", "evaluate")
STEPS_ROUND = ("detect", "mine", "train", "evaluate")


@dataclass
class Context:
    """What every step needs: the config, its checked inputs, the run directory, device and ranks."""

    cfg: ExperimentConfig
    run: RunDir
    device: torch.device
    rank: int = 0
    world: int = 1
    progress: bool = True
    inputs: Inputs | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def data(self) -> Inputs:
        """The checked inputs (checked here on first use when the caller gave none)."""
        if self.inputs is None:
            self.inputs = check_inputs(self.cfg)
        return self.inputs


def load_model(cfg: ExperimentConfig, ckpt: Path | None) -> torch.nn.Module:
    """The configured detector, with a checkpoint's weights when one is given.

    With a checkpoint the pretrained files are not read again (the checkpoint holds every
    weight); the model keeps the stages and BatchNorm they froze.
    """
    model_cfg = cfg.model
    if ckpt is not None:
        trainable, frozen = resolve_freezing(model_cfg)
        model_cfg = model_cfg.model_copy(update={"weights": None, "backbone_weights": None,
                                                 "trainable_layers": trainable, "frozen_bn": frozen})
    model = build_detector(model_cfg, cfg.num_classes, cfg.tiling.tile_size)
    if ckpt is not None:
        load_checkpoint(ckpt, model)
    return model


def write_frame(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    """A one-layer GeoPackage, atomically (booleans as integers, which every GDAL reads)."""
    frame = frame.copy()
    for col in frame.columns:
        if frame[col].dtype == bool:
            frame[col] = frame[col].astype(np.int64)
    with atomic_path(path, ".gpkg") as tmp:
        pyogrio.write_dataframe(frame, tmp, layer=layer, driver="GPKG")


# ------------------------------------------------------------------------------ train


def train_images(rasters: list[RasterInput], cfg: ExperimentConfig, accepted: PixelLabels | None = None) -> list[TrainImage]:
    """Chip sources from checked rasters: labels (plus accepted objects) and ignore zones in a pixel index, the area
    of interest in pixels (background chips are drawn where they touch it)."""
    return [
        TrainImage(r.path, r.header(), LabelIndex(r.truth(cfg, accepted), r.header(), cfg.data.min_visible_fraction,
                                                  r.zones()), r.aoi_pixels())
        for r in rasters
    ]


def round_seed(cfg: ExperimentConfig, r: int) -> int:
    """The seed of round ``r``'s chips and batches: each round draws its own, and a resumed round the same again."""
    return cfg.runtime.seed + 1000 * r


def step_train(ctx: Context, r: int, resume: bool = False) -> dict[str, Any]:
    """Train the round's model on positives + bank negatives + random background (+ objects accepted in review)."""
    cfg, rd = ctx.cfg, ctx.run.round_dir(r)
    dataset, chip_info = training_chips(ctx, r)
    steps, init, train_cfg = round_schedule(ctx, r)
    model = apply_loss_options(load_model(cfg, init), cfg.model, cfg.train)
    sampler = RatioBatchSampler(
        dataset, batch_size=cfg.train.batch_size, neg_fraction=cfg.train.neg_fraction, num_batches=steps,
        seed=round_seed(cfg, r), rank=ctx.rank, world_size=ctx.world, bank_fraction=cfg.train.bank_fraction,
        bank_chips=cfg.train.bank_chips,
    )
    result = train(
        model, dataset, train_cfg, cfg.runtime, steps, batch_sampler=sampler, collate_fn=collate_chips,
        ckpt_path=rd / "model.pt", resume=resume, round_idx=r, config_dump=cfg.model_dump(mode="json"),
        card=model_card(cfg, training_gsd(ctx)),
        progress=ctx.progress and ctx.is_main, distributed=ctx.world > 1,
    )
    return {
        "steps": result.steps,
        "final_loss": round(float(result.final_loss), 5),
        "chips_per_s": round(float(result.chips_per_s), 2),
        "seconds": round(float(result.seconds), 1),
        "chips": {k: int(v) for k, v in zip(*np.unique(dataset.kinds, return_counts=True), strict=True)},
        "init": str(init) if init else "scratch",
        "lr": train_cfg.lr,
        "batch": {"positives": sampler.n_pos, "background": sampler.n_bg, "bank": sampler.n_bank},
        **chip_info,
    }


def training_chips(ctx: Context, r: int) -> tuple[ChipDataset, dict[str, int]]:
    """Round ``r``'s chips: positives, background (of the training images, and of the pool if asked), the bank
    snapshot's negatives, objects accepted in review; chips holding hard positives marked for oversampling."""
    cfg, rd = ctx.cfg, ctx.run.round_dir(r)
    accepted = accepted_pixel_labels(ctx.run.path) if r > 0 else {}
    negatives = NegativeBank.load(rd / "bank.gpkg").training_negatives(cfg.bank) if r > 0 else None
    needs_pool = cfg.train.pool_background_chips > 0 or (negatives is not None and (len(negatives) > 0 or bool(accepted)))
    pool = train_images(ctx.data.readable("pool"), cfg, accepted) if needs_pool else []
    dataset = ChipDataset(
        train_images(ctx.data.readable("train"), cfg, accepted), negatives=negatives,
        n_background=cfg.train.background_chips,
        tile_size=cfg.tiling.tile_size, data_cfg=cfg.data, augment=cfg.train.augment,
        seed=round_seed(cfg, r), negative_images=pool, accepted=accepted,
        bank_loss_weight=cfg.train.bank_loss_weight, pool_background=cfg.train.pool_background_chips,
        rotate_any=cfg.train.rotate_any,
    )
    hard_path = rd / "hard_positives.gpkg"
    hard_chips = 0
    if r > 0 and cfg.train.hard_positive_factor > 1 and hard_path.exists():
        hard_chips = dataset.mark_hard_positives(oversample_boxes(gpd.read_file(hard_path)),
                                                 cfg.train.hard_positive_factor)
    return dataset, {"hard_positive_chips": hard_chips,
                     "accepted_positives": int(sum(len(b) for b, _ in accepted.values()))}


def round_schedule(ctx: Context, r: int) -> tuple[int, Path | None, TrainConfig]:
    """Round ``r``'s steps, the checkpoint it starts from (None: from scratch) and its training settings
    (a fine-tuning round at ``train.finetune_lr`` when that is set)."""
    cfg = ctx.cfg.train
    if r == 0 or not cfg.finetune:
        return cfg.steps, None, cfg
    init = ctx.run.round_dir(r - 1) / "model.pt"
    return cfg.finetune_steps, init, cfg if cfg.finetune_lr is None else cfg.model_copy(update={"lr": cfg.finetune_lr})


def training_gsd(ctx: Context) -> float | None:
    """Metres per pixel of the first readable training raster (what the model card records); None for plain images."""
    rasters = ctx.data.readable("train")
    return gsd_of(rasters[0].header()) if rasters else None


# ------------------------------------------------------------------------------ detect


def scan(ctx: Context, model_path: Path, role: str, out: Path, aoi: Path | None = None) -> dict[str, Any]:
    """Detect over one role's rasters with a model, streaming merged detections into ``out`` (rank 0 writes).

    ``aoi``: a polygon file (``--aoi``) that replaces the image sets' own ``aoi``; only the ground it covers
    is scanned (:mod:`hem_bootstrap.geo.aoi`).
    """
    rasters = ctx.data.of(role)
    stats = DetectStats()
    frames = detect(
        load_model(ctx.cfg, model_path), [r.path for r in rasters], ctx.cfg.data, ctx.cfg.tiling, ctx.cfg.model,
        ctx.cfg.runtime, ctx.device, stats=stats, progress=ctx.progress, shard=(ctx.rank, ctx.world),
        headers={r.path: r.info if r.info is not None else r.error for r in rasters},
        aoi=_areas_of_interest(rasters, aoi),
    )
    naming = Naming(tuple(ctx.cfg.data.classes), {location(r.path): (r.info.width, r.info.height)
                                                   for r in rasters if r.info is not None})
    crs = next((r.info.crs for r in rasters if r.info is not None), None)  # of an empty file
    n = (write_detections(frames, out, naming=naming, empty_crs=crs)[0] if ctx.is_main
         else sum(len(f) for f in frames))  # others drive collectives
    summary = {
        "detections": n,
        "tiles": stats.tiles_total,
        "tiles_skipped": stats.tiles_skipped,
        "tiles_per_s": round(stats.tiles_per_s, 2),
        "seconds": round(stats.seconds, 1),
        "bad_rasters": stats.bad_rasters,
        "fast_path": stats.fast_path,
        "replicas": stats.replicas,
    }
    return broadcast_from_rank0(summary, what=f"{role} scan summary")


def _areas_of_interest(rasters: list[RasterInput], aoi: Path | None) -> dict[Path, Any]:
    """Each readable raster's area of interest in pixels: ``aoi`` (``--aoi``) when given, else its image set's.

    An area that misses a raster altogether (often a CRS mix-up) is named in a warning: nothing of it is scanned.
    """
    areas = {}
    for r in (r for r in rasters if r.readable):
        area = aoi_in_pixels(aoi, r.header()) if aoi is not None else r.aoi_pixels()
        if area is None:
            continue
        if not area.intersects(shapely.box(0, 0, r.header().width, r.header().height)):
            log.warning("%s: the area of interest (%s) does not touch this raster; nothing of it is scanned "
                        "(is its CRS right?)", location(r.path), aoi if aoi is not None else "the image set's aoi")
        areas[r.path] = area
    return areas


def step_detect(ctx: Context, r: int) -> dict[str, Any]:
    """Scan the pool with the previous round's model (and the training images, for hard positives)."""
    rd = ctx.run.round_dir(r)
    model = ctx.run.round_dir(r - 1) / "model.pt"
    if not _needs_pool_scan(ctx.cfg, NegativeBank.load(ctx.run.round_dir(r - 1) / "bank.gpkg")):
        if ctx.is_main:
            crs = next((t.header().crs for t in ctx.data.readable("pool")), None)
            write_detections(iter(()), rd / "detections.gpkg", naming=Naming(tuple(ctx.cfg.data.classes)),
                             empty_crs=crs)
        return {"detections": 0, "tiles": 0, "skipped": "mining.strategies: none, and no bank to refresh"}
    info = scan(ctx, model, "pool", rd / "detections.gpkg")
    if ctx.cfg.train.hard_positive_factor > 1:
        train_scan = scan(ctx, model, "train", rd / "train_detections.gpkg")
        info["train_scan"] = {k: train_scan[k] for k in ("detections", "tiles", "seconds")}
    return info


def _needs_pool_scan(cfg: ExperimentConfig, bank: NegativeBank) -> bool:
    """False for a no-mining control with nothing in ``bank`` (the previous snapshot) to re-score."""
    if cfg.train.hard_positive_factor > 1 or any(s.name != "none" for s in cfg.mining.strategies):
        return True
    return bool(cfg.bank.refresh and len(bank.active()))


# ------------------------------------------------------------------------------ mine


@dataclass
class PoolMatch:
    """One round's pool detections matched to ground truth, joined in one CRS, with what mining needs."""

    fps: gpd.GeoDataFrame
    truths: gpd.GeoDataFrame | None
    images: list[tuple[str, int, int, Any, Any]]
    crs: Any


def match_pool(ctx: Context, dets: gpd.GeoDataFrame, bank_crs: Any) -> PoolMatch:
    """TP / FP / ignore for every pool detection (objects accepted in review count as ground truth)."""
    cfg = ctx.cfg
    accepted = accepted_pixel_labels(ctx.run.path)
    matched, truths, images = [], [], []
    for raster in track(ctx.data.readable("pool"), "mine (match the pool)", "raster", ctx.progress and ctx.is_main,
                        cfg.runtime.log_every_s):
        info, gt = raster.header(), raster.truth(cfg, accepted)
        truths.append(gt.assign(image=location(raster.path)))
        images.append((location(raster.path), info.width, info.height, info.transform, info.crs))
        d = dets[dets["image"] == location(raster.path)]
        if len(d):
            d = gpd.GeoDataFrame(d, geometry="geometry", crs=gt.crs)
            matched.append(match_detections(d, gt, cfg.mining, ignore=raster.zones(),
                                            metres_per_unit=info.metres_per_unit()))
    crs = bank_crs if bank_crs is not None else (images[0][4] if images else None)
    allm = concat_in_crs(matched, crs) if matched else dets.assign(status=[], best_iou=[], gt_index=[])
    labelled = [t for t in truths if len(t)]
    return PoolMatch(allm[allm["status"] == "fp"], concat_in_crs(labelled, crs) if labelled else None, images, crs)


def select_negatives(ctx: Context, r: int, pool: PoolMatch) -> tuple[gpd.GeoDataFrame, dict[str, int]]:
    """The strategy's pick of false positives, or as many random windows for a random baseline."""
    cfg = ctx.cfg
    rng = np.random.default_rng(cfg.runtime.seed + 7919 * r)
    strategy = build_strategy(cfg.mining.strategies)
    selected = spatial_dedupe(strategy.select(pool.fps, rng), cfg.mining.dedupe_iou)
    shadow: dict[str, int] = {}
    if strategy.random:
        fixed = strategy.random_k
        shadow = ({"random_k": fixed} if fixed is not None else
                  {"strategy_selected": len(selected), "shadow_new": shadow_count(ctx, r, selected)})
        box_px = typical_box_px(selected) if len(selected) else None
        selected = random_windows(shadow.get("shadow_new", fixed or 0), pool.images, cfg.tiling.tile_size, rng, avoid=pool.truths,
                                  box_px=box_px)
    if len(selected):
        own = {m[0]: crs_text(m[4]) for m in pool.images}
        selected = selected.assign(src_crs=selected["image"].astype(str).map(own).fillna(""))
    return selected, shadow


def shadow_count(ctx: Context, r: int, selected: gpd.GeoDataFrame) -> int:
    """How many of a random run's selected FPs a mining run would add as *new* bank rows.

    The random baseline must add as many negatives as the strategy it stands in for. Counting
    the selection itself over-counts: in a mining run an FP found again only updates its
    existing bank row. So a random run keeps a shadow bank of its selections
    (``round_NNN/shadow_bank.gpkg``), routed and deduplicated exactly as the real bank would
    be, and mines as many random windows as the shadow bank gained.
    """
    shadow = NegativeBank.load(ctx.run.round_dir(r - 1) / "shadow_bank.gpkg")
    to_bank, _ = route_for_review(selected, shadow, ctx.cfg.mining)
    added = shadow.add(to_bank, r, "shadow", "shadow", ctx.cfg.bank)["added"]
    shadow.save(ctx.run.round_dir(r) / "shadow_bank.gpkg")
    return int(added)


def step_mine(ctx: Context, r: int) -> dict[str, Any]:
    """Match the scan to ground truth, select false positives, refresh and update the bank."""
    cfg, rd = ctx.cfg, ctx.run.round_dir(r)
    bank = NegativeBank.load(ctx.run.round_dir(r - 1) / "bank.gpkg")  # always from the previous snapshot
    scanned = _needs_pool_scan(cfg, bank)
    dets = read_detections(rd / "detections.gpkg")
    pool = match_pool(ctx, dets, bank.crs)
    selected, shadow = select_negatives(ctx, r, pool)
    refreshed = 0
    if cfg.bank.refresh and len(bank.active()):
        scores = bank.rescore(dets, cfg.bank.dedupe_iou)
        bank.refresh(scores, r, cfg.bank)
        refreshed = len(scores)
    to_bank, to_review = route_for_review(selected, bank, cfg.mining)
    label = strategy_label(cfg.mining.strategies)
    added = bank.add(to_bank, r, checkpoint_hash(ctx.run.round_dir(r - 1) / "model.pt"), label, cfg.bank)
    if len(to_review):
        bank.add_review(to_review, r, f"score>{cfg.mining.review_above}")
    bank.evict(cfg.bank)
    hard_info = hard_positives_step(ctx, r, bank) if cfg.train.hard_positive_factor > 1 else {}
    write_frame(selected, rd / "mined.gpkg", "mined")
    bank.save(rd / "bank.gpkg")
    atomic_copy(rd / "bank.gpkg", ctx.run.bank_path)
    return {
        "pool_fp": int((pool.fps["score"] >= cfg.evaluate.score_threshold).sum()) if scanned else None,
        "pool_fp_all": int(len(pool.fps)),
        "selected": int(len(selected)),
        "new_negatives": int(added["added"]),
        "updated": int(added["updated"]),
        "review": int(len(to_review)),
        "refreshed": refreshed,
        "bank_size": int(len(bank.active())),
        "bank_total": int(len(bank.frame)),
        "strategy": label,
        **shadow,
        **hard_info,
    }


def hard_positives_step(ctx: Context, r: int, bank: NegativeBank) -> dict[str, Any]:
    """Find this round's hard positives on the training images; list chronic ones for review."""
    cfg, rd = ctx.cfg, ctx.run.round_dir(r)
    dets = read_detections(rd / "train_detections.gpkg")
    frames = [
        hard_positives(location(t.path), t.truth(cfg), dets[dets["image"] == location(t.path)], t.header().transform,
                       cfg.evaluate.iou, cfg.train.hard_positive_below)
        for t in ctx.data.readable("train")
    ]
    current = concat_in_crs(frames, frames[0].crs).drop(columns="src_crs")
    prev_path = ctx.run.round_dir(r - 1) / "hard_positives.gpkg"
    previous = gpd.read_file(prev_path, layer=LAYER) if prev_path.exists() else None
    frame = carry_history(current, previous, cfg.train.hard_positive_max_rounds)
    write_frame(frame, rd / "hard_positives.gpkg", LAYER)
    to_review = review_rows(frame)
    if len(to_review):
        bank.add_review(to_review, r, REVIEW_REASON)
    return {
        "hard_positives": int(frame["hard"].sum()),
        "hard_positives_oversampled": int(frame["oversample"].sum()),
        "hard_positives_to_review": int(frame["review"].sum()),
    }


# ------------------------------------------------------------------------------ evaluate


def evaluate_model(ctx: Context, model_path: Path, dets_out: Path) -> dict[str, Any]:
    """Detect over the held-out set and compute metrics (AP, P/R, FP per km² of the ground searched).

    With ``data.val``, the operating point on the test scenes uses the threshold that reaches
    ``evaluate.calibrate_recall`` on the validation scenes (``calibration`` in the metrics).
    """
    cfg = ctx.cfg
    eval_cfg, calibration = cfg.evaluate, None
    if cfg.data.val:
        val = _evaluate_role(ctx, model_path, "val", dets_out.with_name("val_detections.gpkg"),
                             cfg.evaluate.model_copy(update={"fixed_recalls": [cfg.evaluate.calibrate_recall]}))
        if ctx.is_main:
            calibration = _calibration(val, cfg.evaluate)
            eval_cfg = cfg.evaluate.model_copy(update={"score_threshold": calibration["threshold"]})
    metrics = _evaluate_role(ctx, model_path, "test", dets_out, eval_cfg)
    if calibration is not None:
        metrics["calibration"] = calibration
    return metrics


def _calibration(val: dict[str, Any], cfg: EvaluateConfig) -> dict[str, Any]:
    """The validation threshold at ``cfg.calibrate_recall`` (``cfg.score_threshold`` if it is never reached)."""
    key = str(float(cfg.calibrate_recall))
    thr = val["threshold_at_recall"].get(key)
    if thr is None:
        log.warning("data.val never reaches recall %s; the operating threshold stays evaluate.score_threshold=%s",
                    cfg.calibrate_recall, cfg.score_threshold)
    return {"recall_target": cfg.calibrate_recall, "threshold": cfg.score_threshold if thr is None else thr,
            "reached": thr is not None, "val_ap50": val.get("ap50"), "val_fp_per_km2": val["fp_per_km2_at_recall"].get(key),
            "val_area_km2": val.get("area_km2")}


def _evaluate_role(ctx: Context, model_path: Path, role: str, dets_out: Path, eval_cfg: EvaluateConfig) -> dict[str, Any]:
    summary = scan(ctx, model_path, role, dets_out)
    if not ctx.is_main:
        return {}
    metrics = score_detections(ctx, role, dets_out, eval_cfg)
    metrics["scan"] = summary
    return metrics


def score_detections(ctx: Context, role: str, dets: Path, eval_cfg: EvaluateConfig) -> dict[str, Any]:
    """Metrics of a detections file already written for one role's rasters (no model is run)."""
    cfg = ctx.cfg
    images, areas = [], {}
    for t in track(ctx.data.readable(role), f"score ({role})", "raster", ctx.progress and ctx.is_main,
                   cfg.runtime.log_every_s):
        info = t.header()
        area = t.searched_area(cfg)
        areas[location(t.path)] = {"raster_km2": area.raster_km2, "valid_km2": area.valid_km2,
                              "ignored_km2": area.ignored_km2, "evaluated_km2": area.evaluated_km2}
        images.append(EvalImage(image=location(t.path), gt=t.truth(cfg), area_km2=area.evaluated_km2,
                                transform=info.transform, distractors=t.distractors(), ignore=t.zones(),
                                metres_per_unit=info.metres_per_unit()))
    metrics = evaluate(read_detections(dets), images, eval_cfg, matching=cfg.mining.matching,
                       center_dist=cfg.mining.center_dist_m)
    metrics["area_by_image"] = areas
    return metrics


def step_evaluate(ctx: Context, r: int) -> dict[str, Any]:
    """Evaluate the round's model on held-out imagery and write ``metrics.json``."""
    rd = ctx.run.round_dir(r)
    metrics = evaluate_model(ctx, rd / "model.pt", rd / "test_detections.gpkg")
    if ctx.is_main:
        write_metrics(rd / "metrics.json", metrics)
    info = {k: metrics.get(k) for k in ("ap50", "ap", "precision", "recall", "fp_per_km2", "log_avg_fp_per_km2")}
    if "calibration" in metrics:
        info["threshold"] = metrics["calibration"]["threshold"]
    return info


def save_empty_bank(ctx: Context) -> None:
    """Round 0's bank snapshot: empty, so round 1 mines from a file like every later round."""
    path = ctx.run.round_dir(0) / "bank.gpkg"
    if not path.exists():  # in the pool's CRS (its first raster's), so even the empty file opens in place
        NegativeBank(next((t.header().crs for t in ctx.data.readable("pool")), None)).save(path)
