"""Experiment configuration: typed pydantic models, YAML loading, ``--set`` overrides.

A config is validated once, here, and then passed around as typed objects. Errors name
the key, its section, the bad value and what was allowed.
"""

from __future__ import annotations

import difflib
import glob
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hem_bootstrap.errors import ConfigError
from hem_bootstrap.remote import gdal_path, is_remote


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ImageSet(_Section):
    """A group of rasters with their (optional) vector labels."""

    images: list[str] = Field(default_factory=list, description="Raster paths or glob patterns.")
    labels: str | None = Field(None, description="Vector labels (any OGR format) or pixel CSV.")
    distractors: str | None = Field(
        None, description="Look-alike objects (synthetic scenes); only used to analyse false positives."
    )
    ignore_zones: str | None = Field(None, description="Polygons where labels are incomplete.")
    mosaic: Literal["auto", "off"] = Field(
        "auto", description="auto: rasters that are adjacent tiles of one mosaic (same CRS, resolution and pixel "
        "grid, no overlap) are read as one through a VRT, so an object on a file boundary is one object; off: "
        "always file by file.",
    )
    aoi: str | None = Field(
        None, description="Area of interest: polygons (any OGR format and CRS). Only tiles that touch them are read, "
        "detections outside are dropped, objects outside are not counted, FP/km² divides by the valid ground inside, "
        "and training background chips are drawn inside.",
    )

    def resolved_images(self) -> list[Path]:
        """Expand glob patterns into a sorted, de-duplicated list of paths (URLs and GDAL /vsi paths as they are)."""
        out: list[Path] = []
        for pattern in self.images:
            if is_remote(pattern):  # a URL's "?" is a query, not a glob
                out.append(Path(gdal_path(pattern)))
            elif any(ch in pattern for ch in "*?["):
                out.extend(Path(p) for p in sorted(glob.glob(pattern)))
            else:
                out.append(Path(pattern))
        seen: set[Path] = set()
        unique = []
        for p in out:
            if p not in seen:
                seen.add(p)
                unique.append(p)
        return unique


class DataConfig(_Section):
    """Imagery and labels for training, the background pool and held-out evaluation."""

    train: list[ImageSet] = Field(default_factory=list, description="Labelled training imagery.")
    pool: list[ImageSet] = Field(
        default_factory=list, description="Imagery scanned for hard negatives (labels needed to tell FPs)."
    )
    test: list[ImageSet] = Field(default_factory=list, description="Held-out imagery, never mined.")
    val: list[ImageSet] = Field(
        default_factory=list,
        description="Validation imagery, never trained on or mined: each round's operating threshold is chosen "
        "here (evaluate.calibrate_recall) and applied to data.test, never chosen on the test scenes.",
    )
    classes: list[str] = Field(default_factory=lambda: ["vehicle"], description="Class names, in id order.")
    class_field: str = Field("class", description="Label attribute holding the class name.")
    geometry: Literal["auto", "polygon", "point"] = Field(
        "auto", description="How to read label geometries: bounding box of polygons, or box around points."
    )
    point_box_m: float = Field(4.5, gt=0, description="Side in metres of the box put around point labels.")
    bands: list[int] = Field(default_factory=lambda: [1, 2, 3], description="1-based band indexes to read.")
    scale: Literal["auto", "fixed", "percentile"] = Field(
        "auto", description="Scaling to [0,1]: auto (by dtype), fixed (scale_min/max), percentile."
    )
    scale_min: float = Field(0.0, description="Value mapped to 0 with scale=fixed.")
    scale_max: float = Field(255.0, description="Value mapped to 1 with scale=fixed.")
    percentiles: tuple[float, float] = Field((2.0, 98.0), description="Percentiles with scale=percentile.")
    gsd: float | None = Field(
        None, gt=0,
        description="Ground sample distance (metres per pixel) to read every raster at: a raster of another GSD is "
        "resampled through a VRT, so the model sees objects at the size it learnt. None: each at its own (a set of "
        "mixed GSDs is named in a warning).",
    )
    resampling: Literal["auto", "nearest", "bilinear", "cubic", "average", "lanczos"] = Field(
        "auto", description="Resampling for data.gsd; auto: average when shrinking, bilinear when enlarging.")
    min_valid_fraction: float = Field(0.5, ge=0, le=1, description="Skip windows with less valid data.")
    min_visible_fraction: float = Field(
        0.5, ge=0, le=1, description="Keep a clipped box as a target if this share of it is inside the tile."
    )
    on_bad_raster: Literal["skip", "fail"] = Field("skip", description="A broken raster in the pool.")
    gdal_cache_mb: int = Field(
        128, ge=8, description="GDAL block cache per reading process (GDAL's default, 5% of RAM, grows with the raster)."
    )

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"bands must be 1-based indexes >= 1, got {v}")
        return v


class TilingConfig(_Section):
    """How large rasters are cut into tiles."""

    tile_size: int = Field(256, gt=0, le=4096, description="Tile side in pixels.")
    overlap: float = Field(32, ge=0, description="Overlap in pixels (>= 1) or as a fraction of the tile (< 1).")

    def overlap_px(self) -> int:
        """Overlap in pixels, whichever way it was given."""
        px = int(round(self.overlap * self.tile_size)) if self.overlap < 1 else int(self.overlap)
        return px

    @model_validator(mode="after")
    def _check_overlap(self) -> TilingConfig:
        if self.overlap_px() >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self


class ModelConfig(_Section):
    """Which torchvision detector and its small-object settings."""

    arch: str = Field("small_fcos", description="Detector name, see `hem_bootstrap.model.detectors.ARCHS`.")
    weights: str | None = Field(None, description="Local weights file (.pth / .pt) to start from.")
    backbone_weights: str | None = Field(
        None, description="Local backbone weights file: torchvision's ImageNet resnet50 / mobilenet_v3_large "
        "classification file, or a detector file whose trunk fits.")
    trainable_layers: int | None = Field(
        None, ge=0,
        description="Trunk stages trained, counted from the top as torchvision's trainable_backbone_layers (ResNet 0-5, "
        "MobileNetV3 0-6, small trunk 0-4); the rest are frozen. None: all without pretrained weights; with them "
        "torchvision's default for the arch (3; SSDlite and the small archs: all).",
    )
    frozen_bn: bool | None = Field(
        None, description="Trunk BatchNorm as FrozenBatchNorm2d (fixed statistics). None: as torchvision's builder with "
        "pretrained weights (frozen for fcos_resnet50_fpn and fasterrcnn_mobilenet_v3_large_fpn), else not.")
    anchor_sizes: list[int] = Field(
        default_factory=lambda: [16, 32, 64], description="Anchor / object sizes in pixels, per FPN level."
    )
    detections_per_img: int = Field(100, gt=0, description="Maximum detections per tile.")
    score_floor: float = Field(0.05, ge=0, le=1, description="Detections below this score are dropped.")
    nms_iou: float = Field(
        0.3, gt=0, le=1,
        description="IoU of the detector's NMS (per tile and across seams). Seen top-down, objects do not occlude each "
        "other, so two boxes of one class overlapping this much are one object (a warning names labels that overlap "
        "more).",
    )
    channels_last: bool = Field(True, description="Use channels_last memory format.")
    fast_path: Literal["auto", "none", "channels_last", "compile", "bf16", "onnxruntime"] = Field(
        "auto",
        description="Inference fast path. bf16: channels_last + bfloat16 autocast on CPU, box outputs in float32; "
        "onnxruntime: backbone and heads in onnxruntime, float32 (CPU, single-stage detectors); "
        "auto: measured on a CPU (the fastest of eager, channels_last, onnxruntime when installed and, with native "
        "bfloat16, bf16), cached per machine; on CUDA channels_last with runtime.amp deciding precision.",
    )
    focal_alpha: float = Field(0.25, ge=0, le=1, description="Focal loss alpha (RetinaNet, FCOS, box_focal).")
    focal_gamma: float = Field(2.0, ge=0, description="Focal loss gamma (RetinaNet, FCOS, box_focal).")
    width: float = Field(
        1.0, gt=0, le=4,
        description="small_fcos / small_frcnn: channel multiplier of the trunk and FPN (capacity to absorb harder "
        "negatives; 1.5 is about 2.2x the compute).",
    )
    box_focal: bool = Field(False, description="Faster R-CNN: focal loss instead of cross-entropy in the box head.")


class TrainConfig(_Section):
    """The training engine."""

    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, description="Peak learning rate.")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(1e-4, ge=0, description="Weight decay.")
    steps: int = Field(300, gt=0, description="Optimizer steps in round 0.")
    finetune_steps: int = Field(150, gt=0, description="Optimizer steps in each later round.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    schedule: Literal["cosine", "step", "constant"] = Field("cosine", description="LR schedule.")
    batch_size: int = Field(8, gt=0, description="Chips per batch.")
    grad_clip: float | None = Field(10.0, gt=0, description="Clip gradient norm (None: off).")
    neg_fraction: float = Field(0.5, ge=0, lt=1, description="Share of each batch drawn from negatives.")
    background_chips: int = Field(64, ge=0, description="Random background chips per training image set.")
    pool_background_chips: int = Field(
        0, ge=0,
        description="Random background chips per pool raster, in every round from round 0 on, beside "
        "background_chips: the easy negatives of the imagery that is mined, so that mined chips add hard ones "
        "to them rather than stand in for them.",
    )
    bank_fraction: float | None = Field(
        0.5, ge=0, le=1,
        description="Share of the negative slots of each batch given to bank negatives when there are any "
        "(the rest: random background); None: in proportion to their counts. Used only with bank_chips: null.",
    )
    bank_chips: int | None = Field(
        2, ge=0,
        description="Bank negatives added to every batch on top of its batch_size chips, which keep the positive and "
        "background mix of a round without a bank (mined chips then add to that mix instead of displacing "
        "positives and background; the recipe that beat no mining and random negatives in "
        "scripts/bench_mining.py); None: bank negatives take bank_fraction of the negative slots instead.",
    )
    bank_loss_weight: float = Field(
        1.0, gt=0,
        description="Weight of a bank chip's classification loss (FCOS and RetinaNet archs): below 1 a mined chip "
        "pulls the model less far from the positives it has learnt.",
    )
    finetune: bool = Field(True, description="Later rounds fine-tune the previous model (else restart).")
    finetune_lr: float | None = Field(
        None, gt=0, description="Peak learning rate of the fine-tuning rounds; None: train.lr.")
    augment: bool = Field(True, description="Flips, 90-degree rotations, mild colour jitter.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between checkpoints.")
    ohem: bool = Field(False, description="Online hard example mining of RoIs (two-stage detectors).")
    ohem_rois: int = Field(128, gt=0, description="OHEM: RoIs kept per image (highest loss after NMS).")
    ohem_nms_iou: float = Field(0.7, gt=0, le=1, description="OHEM: NMS IoU among RoI candidates.")
    hard_positive_factor: int = Field(
        1, ge=1, description="Oversample chips of missed objects this many times (1: off; >1 scans the training images)."
    )
    hard_positive_below: float = Field(0.3, ge=0, le=1, description="An object whose best score is below this is hard.")
    hard_positive_max_rounds: int = Field(
        2, ge=1, description="An object hard this many rounds in a row goes to review instead (bad label?)."
    )


class StrategySpec(_Section):
    """One mining strategy with its parameters (only those of its kind are used)."""

    name: Literal["threshold", "per_image_cap", "per_tile_cap", "budget", "score_band", "random", "none"] = Field(
        ..., description="Strategy kind."
    )
    threshold: float | None = Field(None, ge=0, le=1, description="threshold: keep FPs with score > this.")
    k: int | None = Field(None, gt=0, description="per_image_cap / per_tile_cap / budget: how many to keep; random: this many random windows per round (fewer only where they cannot avoid ground truth).")
    lo: float | None = Field(None, ge=0, le=1, description="score_band: lower bound (inclusive).")
    hi: float | None = Field(None, ge=0, le=1, description="score_band: upper bound (exclusive).")

    @model_validator(mode="after")
    def _check_params(self) -> StrategySpec:
        need = {
            "threshold": ["threshold"],
            "per_image_cap": ["k"],
            "per_tile_cap": ["k"],
            "budget": ["k"],
            "score_band": ["lo", "hi"],
            "random": [],
            "none": [],
        }[self.name]
        missing = [p for p in need if getattr(self, p) is None]
        if missing:
            raise ValueError(f"strategy '{self.name}' needs {', '.join(missing)}")
        if self.name == "score_band" and self.lo is not None and self.hi is not None and self.lo >= self.hi:
            raise ValueError(f"score_band needs lo < hi, got lo={self.lo} hi={self.hi}")
        return self


class MiningConfig(_Section):
    """Matching detections to ground truth and choosing which false positives to mine."""

    matching: Literal["iou", "center"] = Field("iou", description="Match by IoU, or centre distance (points).")
    tp_iou: float = Field(0.5, gt=0, le=1, description="IoU at or above which a detection is a true positive.")
    fp_max_iou: float = Field(0.1, ge=0, le=1, description="Best IoU below which a detection is a false positive.")
    center_dist_m: float = Field(2.0, gt=0, description="Centre matching: distance for a true positive.")
    strategies: list[StrategySpec] = Field(
        default_factory=lambda: [StrategySpec(name="per_image_cap", k=8)],
        description="Applied in order; each narrows the previous one's selection. Default: the 8 highest-scoring "
        "false positives per pool raster and round (per-image top-K, as ACF mines; in scripts/bench_mining.py "
        "it beat a 0.5 score threshold, which lost to random windows).",
    )
    dedupe_iou: float = Field(0.3, gt=0, le=1, description="NMS IoU among one round's mined FPs.")
    review_above: float | None = Field(
        0.95, ge=0, le=1, description="FPs scoring above this go to review (suspected missing labels)."
    )
    review_mode: Literal["hold", "bank"] = Field("hold", description="hold: keep out of the bank until accepted.")
    review_after_rounds: int = Field(3, gt=0, description="Mined again this many rounds at a high score: review.")

    @model_validator(mode="after")
    def _check_ious(self) -> MiningConfig:
        if self.fp_max_iou > self.tp_iou:
            raise ValueError(f"fp_max_iou ({self.fp_max_iou}) must not exceed tp_iou ({self.tp_iou})")
        return self


class BankConfig(_Section):
    """The persistent negative bank."""

    dedupe_iou: float = Field(0.5, gt=0, le=1, description="A new FP overlapping an entry above this updates it.")
    refresh: bool = Field(True, description="Re-score the bank every round.")
    retire_below: float = Field(0.1, ge=0, le=1, description="Entries scoring below this are candidates to retire.")
    retire_rounds: int = Field(2, gt=0, description="Rounds below retire_below before an entry is retired.")
    max_size: int | None = Field(None, gt=0, description="Cap on active entries; the easiest are evicted.")
    sampling: Literal["uniform", "score"] = Field("uniform", description="How training draws bank negatives.")
    temperature: float = Field(1.0, gt=0, description="score sampling: weight = last_score ** (1/T).")
    floor: float = Field(0.05, ge=0, le=1, description="score sampling: minimum weight.")


class RoundsConfig(_Section):
    """The multi-round loop."""

    name: str = Field("run", description="Run name; the run directory is out_dir/name.")
    out_dir: str = Field("runs", description="Folder holding run directories.")
    n_rounds: int = Field(3, ge=0, description="Mining rounds after round 0.")
    stop_if_no_new: bool = Field(True, description="Stop when a round mines no new negative.")
    patience: int | None = Field(None, gt=0, description="Stop after this many rounds without held-out gain.")


class EvaluateConfig(_Section):
    """Held-out evaluation."""

    iou: float = Field(0.5, gt=0, le=1, description="IoU for AP and for counting true positives.")
    score_threshold: float = Field(0.5, ge=0, le=1, description="Operating threshold.")
    fixed_recalls: list[float] = Field(default_factory=lambda: [0.8, 0.9], description="Report FP/km2 here.")
    fixed_fp_per_km2: list[float] = Field(default_factory=lambda: [10.0, 100.0], description="Report recall here.")
    calibrate_recall: float = Field(
        0.8, gt=0, le=1,
        description="With data.val: the operating threshold of each round is the highest score reaching this "
        "recall on data.val (harder negatives move scores, so a fixed score_threshold drifts); without "
        "data.val, score_threshold is used.",
    )


class RuntimeConfig(_Section):
    """Where and how fast things run."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    workers: int = Field(2, ge=0, description="DataLoader workers (training; detection on CUDA).")
    detect_workers: int | None = Field(
        None, ge=0,
        description="DataLoader workers of detection; None: runtime.workers on CUDA, 0 on CPU, where the "
        "model's threads already use every core and tiles read in its own process cost less than worker "
        "processes that compete with it (scripts/bench_inference.py).",
    )
    batch_size: int = Field(8, gt=0, description="Tiles per inference batch.")
    prefetch: int = Field(4, gt=0, description="Batches prefetched per worker.")
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    amp_dtype: Literal["bf16", "fp16"] = Field("bf16", description="AMP dtype on CUDA.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")
    seed: int = Field(0, description="Seed for everything random.")
    collective_timeout_s: int = Field(600, gt=0, description="Timeout of torch.distributed collectives.")
    gdal: dict[str, str] = Field(
        default_factory=dict,
        description="GDAL configuration options for every raster read, e.g. {GDAL_HTTP_MULTIPLEX: 'YES', "
        "VSI_CACHE: 'TRUE', GDAL_CACHEMAX: '512', GDAL_DISABLE_READDIR_ON_OPEN: 'EMPTY_DIR'} for rasters "
        "read over HTTP or from object storage (credentials too: AWS_*, GS_*, AZURE_*).",
    )
    log_every_s: float = Field(
        30.0, ge=0,
        description="Seconds between two progress lines of a long step when stderr is not a terminal "
        "(a batch job's log); a terminal shows bars instead.",
    )
    log_file: str | None = Field(
        None, description="Also append every log line (progress, warnings, errors) to this file, relative to the "
        "config file; rank 0 only under torchrun. The --log-file option does the same.",
    )


class ExperimentConfig(_Section):
    """A whole experiment."""

    data: DataConfig = Field(default_factory=DataConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @property
    def num_classes(self) -> int:
        """Classes plus background (torchvision convention: label 0 is background)."""
        return len(self.data.classes) + 1


# --------------------------------------------------------------------------- loading


def _fields_of(model: type[BaseModel], path: list[str | int]) -> list[str]:
    """Valid keys at ``path`` inside ``model`` (for 'did you mean')."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        nxt = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        current = nxt
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _one_line(text: str) -> str:
    """Escape control characters (a key may be any YAML string, even a newline) so the error stays one line."""
    return "".join(ch if ch.isprintable() or ch == " " else repr(ch)[1:-1] for ch in text)


def format_validation_error(err: ValidationError, source: str) -> str:
    """Turn the first pydantic error into one line naming key, section, value and constraint."""
    return _one_line(_format_validation_error(err, source))


def _format_validation_error(err: ValidationError, source: str) -> str:
    e = err.errors()[0]
    loc = [p for p in e["loc"]]
    dotted = ".".join(str(p) for p in loc) or "<root>"
    if e["type"] == "extra_forbidden":
        key = str(loc[-1])
        section = ".".join(str(p) for p in loc[:-1]) or "top level"
        valid = _fields_of(ExperimentConfig, loc[:-1])
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
        return f"{source}: unknown key '{key}' in section '{section}'{hint}"
    value = e.get("input")
    msg = e["msg"]
    shown = repr(value)
    if len(shown) > 80:
        shown = shown[:77] + "..."
    return f"{source}: {dotted} = {shown}: {msg}"


def _set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        nxt = node.get(part)
        if nxt is None:
            nxt = {}
            node[part] = nxt
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node = nxt
    node[parts[-1]] = value


def apply_overrides(tree: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides; values are parsed as YAML (``8``, ``true``, ``[1,2]``)."""
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected section.key=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {item!r}: empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        _set_dotted(tree, key, value)
    return tree


def _resolve_path(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    if is_remote(p):
        return p
    path = Path(p).expanduser()
    return str(path if path.is_absolute() else (base / path))


def _resolve_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    for sets in (cfg.data.train, cfg.data.pool, cfg.data.val, cfg.data.test):
        for s in sets:
            s.images = [str(_resolve_path(p, base)) for p in s.images]
            s.labels = _resolve_path(s.labels, base)
            s.distractors = _resolve_path(s.distractors, base)
            s.ignore_zones = _resolve_path(s.ignore_zones, base)
            s.aoi = _resolve_path(s.aoi, base)
    cfg.model.weights = _resolve_path(cfg.model.weights, base)
    cfg.model.backbone_weights = _resolve_path(cfg.model.backbone_weights, base)
    cfg.rounds.out_dir = str(_resolve_path(cfg.rounds.out_dir, base))
    cfg.runtime.log_file = _resolve_path(cfg.runtime.log_file, base)
    return cfg


def config_from_tree(tree: dict[str, Any], base: Path, source: str = "config") -> ExperimentConfig:
    """Validate a plain dict into an :class:`ExperimentConfig`, resolving paths against ``base``."""
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, source)) from None
    return _resolve_paths(cfg, base)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML experiment config, apply overrides and validate it.

    Relative paths inside the file resolve against the file's folder; with no file,
    against the current directory.
    """
    tree: Any = {}
    base = Path.cwd()
    source = "config"
    if path is not None:
        p = Path(path)
        source = str(p)
        if not p.is_file():
            raise ConfigError(f"{p}: config file not found")
        try:
            tree = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{p}: not valid YAML{where}") from None
        base = p.resolve().parent
    if not isinstance(tree, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(tree).__name__}")
    tree = apply_overrides(tree, overrides)
    return config_from_tree(tree, base, source)


def dump_config(cfg: ExperimentConfig) -> str:
    """The resolved config as YAML."""
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def describe_defaults() -> str:
    """Every key with its default and help, as commented YAML."""
    lines: list[str] = []

    def walk(model: type[BaseModel], indent: int) -> None:
        for name, field in model.model_fields.items():
            ann = field.annotation
            pad = "  " * indent
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                doc = (ann.__doc__ or "").strip().splitlines()[0] if ann.__doc__ else ""
                lines.append(f"{pad}{name}:  # {doc}")
                walk(ann, indent + 1)
                continue
            if field.default_factory is not None:
                default = field.default_factory()  # type: ignore[call-arg]
            else:
                default = field.default
            if isinstance(default, BaseModel):
                default = default.model_dump(mode="json")
            if isinstance(default, list):
                default = [d.model_dump(mode="json", exclude_none=True) if isinstance(d, BaseModel) else d for d in default]
            if isinstance(default, tuple):
                default = list(default)
            text = yaml.safe_dump(default, default_flow_style=True).strip()
            if text.endswith("\n...") or text.endswith("..."):
                text = text.replace("\n...", "").replace("...", "").strip()
            help_ = field.description or ""
            lines.append(f"{pad}{name}: {text}  # {help_}")

    walk(ExperimentConfig, 0)
    return "\n".join(lines) + "\n"
