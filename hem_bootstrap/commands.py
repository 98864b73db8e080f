"""What the CLI commands do, one library function each, returning the text they print.

``cli.py`` parses options and calls these; the loop itself lives in :mod:`hem_bootstrap.loop`.
"""

from __future__ import annotations

import fcntl
import json
import logging
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import yaml

from hem_bootstrap.config import ExperimentConfig, ImageSet, load_config
from hem_bootstrap.distributed import broadcast_from_rank0, init_distributed
from hem_bootstrap.errors import DataError, HemError, RunError
from hem_bootstrap.evaluate import write_metrics
from hem_bootstrap.files import atomic_write_bytes, check_output
from hem_bootstrap.geo.labels import read_vector
from hem_bootstrap.geo.raster import open_raster
from hem_bootstrap.inputs import check_inputs
from hem_bootstrap.loop import make_context
from hem_bootstrap.mining.bank import NegativeBank
from hem_bootstrap.mining.review import POSITIVES_FILE, append_accepted, apply_review, latest_snapshot
from hem_bootstrap.model.card import check_gsd, config_for_model, gsd_of, model_card, read_card
from hem_bootstrap.model.checkpoints import export_model
from hem_bootstrap.remote import exists, location, shown
from hem_bootstrap.rundir import RunDir
from hem_bootstrap.steps import STEPS_ROUND, STEPS_ROUND0, evaluate_model, scan, step_train

log = logging.getLogger(__name__)

EVALUATE_KEYS = ("ap50", "ap", "score_threshold", "precision", "recall", "f1", "fp_per_km2", "fp_per_km2_at_recall",
                 "log_avg_fp_per_km2", "recall_at_fp_per_km2", "fp_on_distractors_share", "n_gt", "n_det", "area_km2",
                 "calibration")


def run_status(run_dir: Path) -> str:
    """Text for ``hem status``: steps done per round, bank size, AP, skipped rasters, lock holder.

    Raises:
        RunError: ``run_dir`` holds no run.
    """
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
    holder = _lock_holder(run.path / ".lock")
    if holder:
        lines.append(f"in use by {holder}")
    return "\n".join(lines)


def _lock_holder(lock: Path) -> str | None:
    if not lock.exists():
        return None
    with open(lock) as fh:
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        except BlockingIOError:
            return fh.read().strip()
    return None


def _run_of(cfg: ExperimentConfig) -> RunDir:
    return RunDir(Path(cfg.rounds.out_dir) / cfg.rounds.name)


def _check_model(model: Path) -> Path:
    model = Path(model)
    if not model.is_file():
        raise RunError(f"{model}: model checkpoint not found")
    return model


def train_round_cli(cfg: ExperimentConfig, round_idx: int, resume: bool, force: bool = False) -> Path:
    """``hem train``: train one round's model with the run's bank as of that round.

    A round whose training the manifest records as done is not trained again without
    ``force``: its metrics and every later round were made with the model it would replace.

    Raises:
        RunError: that round has no bank snapshot yet, or its model is trained and ``force`` is not set.
    """
    run = _run_of(cfg)
    if round_idx < 0:
        raise RunError(f"--round {round_idx}: expected a round number >= 0")
    if round_idx > 0 and not (run.round_path(round_idx) / "bank.gpkg").exists():
        raise RunError(f"{run.path}: round {round_idx} has no bank yet; run `hem round` or mine first")
    if run.exists() and "train" in RunDir.round_entry(run.load_manifest(), round_idx)["steps"]:
        if not force:
            raise RunError(f"{run.path}: round {round_idx}'s model is already trained and the run's later steps were "
                           "made with it; --force replaces it anyway, or set rounds.name for a new run")
        log.warning("%s: replacing round %d's trained model; its metrics and later rounds still describe the "
                    "old one", run.path, round_idx)
    inputs = check_inputs(cfg, ("train", "pool"))
    init_distributed(cfg.runtime)
    ctx = make_context(cfg, run, inputs)
    with run.locked() if ctx.is_main else nullcontext():  # under torchrun rank 0 holds the lock
        step_train(ctx, round_idx, resume=resume)
    return run.round_dir(round_idx) / "model.pt"


def detect_cli(cfg: ExperimentConfig, model: Path, images: list[str] | None, out: Path, aoi: Path | None = None) -> str:
    """``hem detect CONFIG --model M``: scan rasters (default: the pool) and write merged detections.

    Raises:
        DataError: ``images`` match nothing or name a missing file.
        RunError: the model checkpoint does not exist.
    """
    if images:
        cfg = cfg.model_copy(deep=True)
        cfg.data.pool = [ImageSet(images=_check_images(images))]
    return _detect(cfg, _check_model(model), Path(out), None, aoi)


def detect_model_cli(model: Path, images: list[str], out: Path, overrides: list[str] | None,
                     aoi: Path | None = None) -> str:
    """``hem detect MODEL IMAGES...``: the same with no config, settings from the model's card.

    Raises:
        DataError: no images named, or they match nothing / name a missing file.
        ModelError: the model has no card (see :func:`hem_bootstrap.model.card.read_card`).
        RunError: the model file does not exist.
    """
    model = _check_model(model)
    if not images:
        raise DataError(f"hem detect {model}: name the rasters to scan (paths or glob patterns)")
    cfg, card = config_for_model(model, _check_images(images), overrides)
    return _detect(cfg, model, Path(out), card.get("gsd_m"), aoi)


def _check_images(images: list[str]) -> list[str]:
    paths = ImageSet(images=images).resolved_images()
    if not paths:
        raise DataError(f"images {' '.join(images)}: no file matches")
    missing = [p for p in paths if not exists(p)]
    if missing:
        raise DataError(f"images: {missing[0]} does not exist")
    return [shown(p) for p in paths]


def _detect(cfg: ExperimentConfig, model: Path, out: Path, gsd_m: float | None, aoi: Path | None) -> str:
    check_output(out, "--out")
    if aoi is not None and not Path(aoi).is_file():
        raise DataError(f"--aoi {aoi}: file not found")
    init_distributed(cfg.runtime)
    ctx = make_context(cfg, _run_of(cfg), check_inputs(cfg, ("pool",)))
    for r in ctx.data.readable("pool") if ctx.is_main else []:
        check_gsd(location(r.path), gsd_of(r.header()), gsd_m)
    info = scan(ctx, model, "pool", out, aoi)
    return (
        f"{info['detections']} detections from {info['tiles']} tiles ({info['tiles_skipped']} skipped) "
        f"at {info['tiles_per_s']} tiles/s -> {out}"
    )


def evaluate_cli(cfg: ExperimentConfig, model: Path, out: Path | None) -> str:
    """``hem evaluate``: metrics of a model on the held-out set (JSON text of the main ones)."""
    if out is not None:
        check_output(out, "--out")
    inputs = check_inputs(cfg, ("val", "test"))
    init_distributed(cfg.runtime)
    ctx = make_context(cfg, _run_of(cfg), inputs)
    with tempfile.TemporaryDirectory() as tmp:  # under torchrun rank 0's scan output; the others write none
        metrics = evaluate_model(ctx, _check_model(model), Path(tmp) / "dets.gpkg")
    metrics = broadcast_from_rank0(metrics, what="evaluation metrics")
    if out is not None and ctx.is_main:
        write_metrics(out, metrics)
    return json.dumps({k: metrics.get(k) for k in EVALUATE_KEYS}, indent=2)


def export_model_cli(run_dir: Path, out: Path, round_idx: int | None, fmt: str = "pth") -> str:
    """``hem export-model``: weights plus a JSON model card; with ``fmt="onnx"`` also ``NAME.onnx``.

    The ONNX graph is the detector's dense part (backbone and heads, dynamic batch and size), the
    one ``model.fast_path=onnxruntime`` runs; the card says what goes in and comes out.

    Raises:
        RunError: no trained round, or not the asked one.
        ModelError: ``onnx`` for a detector that is not single-stage.
    """
    if fmt not in ("pth", "onnx"):
        raise RunError(f"--format {fmt}: expected pth or onnx")
    run = RunDir(Path(run_dir))
    trained = [e["round"] for e in run.load_manifest()["rounds"] if "train" in e.get("steps", {})]
    if not trained:
        raise RunError(f"{run_dir}: no trained round to export")
    r = max(trained) if round_idx is None else round_idx
    if r not in trained:
        raise RunError(f"{run_dir}: round {r} has no trained model; trained rounds: {trained}")
    cfg_path = run.path / "config.resolved.yaml"
    if not cfg_path.is_file():
        raise RunError(f"{cfg_path}: missing; the run's config is needed for the model card")
    for path in (out, Path(out).with_suffix(".json"), *([Path(out).with_suffix(".onnx")] if fmt == "onnx" else [])):
        check_output(path, "--out")
    cfg_tree = yaml.safe_load(cfg_path.read_text())
    metrics_path = run.round_path(r) / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.exists() else None
    if Path(out).suffix.lower() == ".json":
        raise RunError(f"--out {out}: the model card is written beside the weights as NAME.json; give the weights "
                       "a .pth or .pt name")
    own = read_card(run.round_dir(r) / "model.pt")  # the card the checkpoint was trained with (older ones: rebuilt)
    card = {
        **own,
        **model_card(load_config(cfg_path), own.get("gsd_m") or _training_gsd(cfg_tree)),
        "round": r,
        "training_data": [s["images"] for s in cfg_tree["data"]["train"]],
        "negatives_from": [s["images"] for s in cfg_tree["data"]["pool"]],
        "metrics": {k: metrics.get(k) for k in ("ap50", "ap", "precision", "recall", "fp_per_km2")} if metrics else None,
    }
    lines = [f"weights: {out}", f"model card: {Path(out).with_suffix('.json')}"]
    if fmt == "onnx":
        onnx_file = Path(out).with_suffix(".onnx")
        card["onnx"] = _export_onnx(load_config(cfg_path), run.round_dir(r) / "model.pt", onnx_file)
        lines.append(f"onnx: {onnx_file}")
    export_model(run.round_dir(r) / "model.pt", Path(out), card)
    return "\n".join(lines)


def _export_onnx(cfg: ExperimentConfig, ckpt: Path, out: Path) -> dict:
    """The dense part of a run's model as ONNX at ``out``; returns the card's ``onnx`` entry."""
    from hem_bootstrap.model import onnx_path
    from hem_bootstrap.model.checkpoints import load_checkpoint
    from hem_bootstrap.model.detectors import build_detector

    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(ckpt, model)
    atomic_write_bytes(out, onnx_path.onnx_bytes(model, cfg.tiling.tile_size))
    tf: Any = model.transform
    return {"file": out.name, "opset": onnx_path.OPSET,
            "input": "images: float32 (batch, 3, height, width), pixels in [0, 1] normalised as (x - mean) / std",
            "mean": list(tf.image_mean), "std": list(tf.image_std),
            "outputs": onnx_path.DensePart.output_names(model),
            "then": "torchvision's anchors, box decoding, score floor and NMS (hem_bootstrap/model/onnx_path.py)"}


def _training_gsd(cfg_tree: dict) -> float | None:
    try:
        paths = ImageSet(images=cfg_tree["data"]["train"][0]["images"]).resolved_images()
        return gsd_of(open_raster(paths[0]))
    except (HemError, IndexError, KeyError):
        return None


def _run_classes(run: RunDir) -> list[str]:
    """The class names of a run, from its resolved config."""
    path = run.path / "config.resolved.yaml"
    if not path.is_file():
        raise RunError(f"{path}: missing; is {run.path} a complete run directory?")
    return list(yaml.safe_load(path.read_text())["data"]["classes"])


def _bank_of(run_dir: Path) -> NegativeBank:
    path = Path(run_dir) / "bank.gpkg"
    if not (Path(run_dir) / "manifest.json").is_file():
        raise RunError(f"{run_dir}: not a run directory (no manifest.json)")
    if not path.is_file():
        raise RunError(f"{run_dir}: no bank.gpkg (has round 1 been mined?)")
    return NegativeBank.load(path)


def bank_stats_text(run_dir: Path) -> str:
    """``hem bank stats``."""
    return json.dumps(_bank_of(run_dir).stats(), indent=2, default=str)


def bank_export_cli(run_dir: Path, out: Path, fmt: str) -> str:
    """``hem bank export``: GeoJSON or COCO of the active negatives."""
    check_output(out, "--out")
    bank = _bank_of(run_dir)
    rasters = {}
    for im in sorted(set(bank.active()["image"])) if len(bank.active()) else []:
        try:
            rasters[im] = open_raster(im).transform
        except HemError:
            pass
    bank.export(Path(out), fmt, rasters, classes=_run_classes(RunDir(Path(run_dir))))
    return f"{fmt}: {out}"


def review_apply_cli(run_dir: Path, decisions: Path) -> str:
    """``hem review apply``: decisions go into the bank snapshot the next round starts from.

    Negatives join the latest ``round_NNN/bank.gpkg`` (and the top-level copy); positives are
    appended to the run's accepted labels, which every later round trains and mines with
    (see :mod:`hem_bootstrap.mining.review`). The manifest lists each application.

    Raises:
        DataError: the decisions file is missing or malformed.
        RunError: the run has no bank snapshot yet, or another process holds it.
    """
    run = RunDir(Path(run_dir))
    frame = read_vector(Path(decisions), "decisions file", prefer="review")
    with run.locked():
        manifest = run.load_manifest()
        snapshot = latest_snapshot(run.path, manifest)
        if snapshot is None:
            raise RunError(f"{run_dir}: no bank snapshot (round_NNN/bank.gpkg); has round 1 been mined?")
        classes = _run_classes(run)
        bank = NegativeBank.load(snapshot)
        result = apply_review(bank, frame)
        # positives first (appending is idempotent by review_id), then the banks: a stop in between
        # leaves the decisions re-appliable instead of lost
        added = append_accepted(run.path, result["new_positives"], classes, int(snapshot.parent.name.split("_")[1]))
        bank.save(snapshot)
        bank.save(run.bank_path)
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
