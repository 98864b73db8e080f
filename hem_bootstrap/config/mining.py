"""Config sections for the mining loop: strategies, the negative bank, rounds and evaluation."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from hem_bootstrap.config.base import Section


class StrategySpec(Section):
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


class MiningConfig(Section):
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


class BankConfig(Section):
    """The persistent negative bank."""

    dedupe_iou: float = Field(0.5, gt=0, le=1, description="A new FP overlapping an entry above this updates it.")
    refresh: bool = Field(True, description="Re-score the bank every round.")
    retire_below: float = Field(0.1, ge=0, le=1, description="Entries scoring below this are candidates to retire.")
    retire_rounds: int = Field(2, gt=0, description="Rounds below retire_below before an entry is retired.")
    max_size: int | None = Field(None, gt=0, description="Cap on active entries; the easiest are evicted.")
    sampling: Literal["uniform", "score"] = Field("uniform", description="How training draws bank negatives.")
    temperature: float = Field(1.0, gt=0, description="score sampling: weight = last_score ** (1/T).")
    floor: float = Field(0.05, ge=0, le=1, description="score sampling: minimum weight.")


class RoundsConfig(Section):
    """The multi-round loop."""

    name: str = Field("run", description="Run name; the run directory is out_dir/name.")
    out_dir: str = Field("runs", description="Folder holding run directories.")
    n_rounds: int = Field(3, ge=0, description="Mining rounds after round 0.")
    stop_if_no_new: bool = Field(True, description="Stop when a round mines no new negative.")
    patience: int | None = Field(None, gt=0, description="Stop after this many rounds without held-out gain.")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # the run directory is out_dir/name, and --fresh deletes it: never out_dir itself or a folder elsewhere
        if not v or v in (".", "..") or "/" in v or "\\" in v or v != v.strip():
            raise ValueError(f"expected a plain folder name (no '/', not empty, '.' or '..'), got {v!r}")
        return v


class EvaluateConfig(Section):
    """Held-out evaluation."""

    iou: float = Field(0.5, gt=0, le=1, description="IoU for AP and for counting true positives.")
    score_threshold: float = Field(0.5, ge=0, le=1, description="Operating threshold.")
    fixed_recalls: list[float] = Field(default_factory=lambda: [0.8, 0.9], description="Report FP/km2 here.")
    fixed_fp_per_km2: list[float] = Field(default_factory=lambda: [10.0, 100.0], description="Report recall here.")

    @field_validator("fixed_recalls")
    @classmethod
    def _recalls(cls, v: list[float]) -> list[float]:
        if any(not 0 < r <= 1 for r in v):
            raise ValueError(f"expected recalls in (0, 1], got {v}")
        return v

    @field_validator("fixed_fp_per_km2")
    @classmethod
    def _rates(cls, v: list[float]) -> list[float]:
        if any(not 0 <= r < float("inf") for r in v):
            raise ValueError(f"expected false positives per km² >= 0 (0: recall before the first), got {v}")
        return v
    calibrate_recall: float = Field(
        0.8, gt=0, le=1,
        description="With data.val: the operating threshold of each round is the highest score reaching this "
        "recall on data.val (harder negatives move scores, so a fixed score_threshold drifts); without "
        "data.val, score_threshold is used.",
    )
