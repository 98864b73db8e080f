"""Config sections for the detector and its training engine."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field, field_validator

from hem_bootstrap.config.base import Section

LEGACY_WIDTH = 1.0
"""``model.width`` of a model whose card or saved config predates the option (its channel counts)."""


def with_legacy_width(model: Mapping[str, Any]) -> dict[str, Any]:
    """A saved ``model`` section (card or resolved config); without ``width`` it predates the option: width 1."""
    return {"width": LEGACY_WIDTH, **model}


class ModelConfig(Section):
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

    @field_validator("anchor_sizes")
    @classmethod
    def _sizes_positive(cls, v: list[int]) -> list[int]:
        if not v or any(a < 1 for a in v):
            raise ValueError(f"expected one or more sizes >= 1 px, got {v}")
        return v
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
        1.5, gt=0, le=4,
        description="small_fcos / small_frcnn: channel multiplier of the trunk and FPN (capacity to absorb harder "
        "negatives; 1.5, the default measured on the mining benchmark, is about 2.2x the compute of 1; a model "
        "file whose card has no width is 1).",
    )
    box_focal: bool = Field(False, description="Faster R-CNN: focal loss instead of cross-entropy in the box head.")


class TrainConfig(Section):
    """The training engine."""

    optimizer: Literal["sgd", "adamw"] = Field("adamw", description="Optimizer.")
    lr: float = Field(1e-3, gt=0, allow_inf_nan=False, description="Peak learning rate.")
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
    rotate_any: float = Field(
        0.5, ge=0, le=1,
        description="With augment: share of training chips also turned by a random angle (0-90 degrees), their boxes "
        "the envelopes of the labels' turned outlines (a polygon label's minimum rotated rectangle). For imagery "
        "whose objects lie at a few angles (a street grid) while held-out imagery has others. Labels given as "
        "boxes or points carry no orientation: then no chip turns (a turned box is looser than its object).",
    )
    ema_decay: float = Field(
        0.0, ge=0, lt=1,
        description="Decay of a moving average of the weights over each round's steps; the round's model is the "
        "average (warm-up: update n uses min(decay, (1+n)/(10+n))). 0: off, the last step's weights. Once warmed "
        "up, 0.99 averages over roughly the last 100 steps; a 120-step round ends averaging about its last 12.",
    )
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
