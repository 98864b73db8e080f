"""Online hard example mining (OHEM) and focal losses for torchvision detectors.

Offline bootstrapping (the negative bank) decides *which chips* a detector trains on; the
options here decide *which parts of a chip* carry the loss:

* **OHEM** (Shrivastava et al., 2016) for Faster R-CNN: every RoI proposal (plus the ground
  truth boxes, as torchvision adds them) is scored by its loss in a read-only pass, NMS removes
  near-duplicates among them, and only the ``B`` highest-loss RoIs per image go through the box
  head with gradients. There is no fixed foreground:background ratio: the examples that hurt
  most win.
* **Box focal loss** for Faster R-CNN: the box classifier's cross-entropy becomes a *softmax*
  focal loss, so training and the softmax scoring of torchvision's inference stay consistent.
* **Focal parameters** for RetinaNet and FCOS, whose heads call
  :func:`torchvision.ops.sigmoid_focal_loss` with its defaults (alpha 0.25, gamma 2).

Every option changes the class of an existing head in place to a subclass that only adds plain
attributes, so parameters, buffers and ``state_dict`` keys stay exactly those of torchvision
(checkpoints load either way) and eval-mode behaviour is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.retinanet import RetinaNetClassificationHead, RetinaNetHead
from torchvision.models.detection.roi_heads import RoIHeads, fastrcnn_loss
from torchvision.ops import nms, sigmoid_focal_loss

from hem_bootstrap.config import ModelConfig, TrainConfig
from hem_bootstrap.data.training import LOSS_WEIGHT
from hem_bootstrap.errors import ConfigError, ModelError

#: The alpha / gamma torchvision's RetinaNet and FCOS heads use; other values need an override.
TORCHVISION_FOCAL_ALPHA = 0.25
TORCHVISION_FOCAL_GAMMA = 2.0

#: Smooth-L1 transition point of torchvision's Fast R-CNN box loss.
_BOX_BETA = 1.0 / 9.0


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def _check_focal_params(alpha: float, gamma: float) -> None:
    """Reject focal parameters torchvision's convention does not allow (alpha in [0, 1] or -1)."""
    if not (0.0 <= alpha <= 1.0 or alpha == -1.0):
        raise ConfigError(
            f"model.focal_alpha: {alpha} is not allowed, expected a value in [0, 1] or -1 (off)"
        )
    if gamma < 0.0:
        raise ConfigError(f"model.focal_gamma: {gamma} is not allowed, expected a value >= 0")


def softmax_focal_loss(
    logits: Tensor, labels: Tensor, alpha: float, gamma: float, reduction: str = "mean"
) -> Tensor:
    """Softmax focal loss over C classes, class 0 being background.

    ``FL = -alpha_t * (1 - p_t) ** gamma * log(p_t)`` with ``p_t`` the softmax probability of
    the true class. As in torchvision's sigmoid focal loss, ``alpha`` weights foreground
    (label > 0) and ``1 - alpha`` background; ``alpha = -1`` switches the weighting off, so
    ``gamma = 0, alpha = -1`` is exactly cross-entropy. Softmax (not sigmoid) keeps the loss
    consistent with the softmax scores Faster R-CNN's inference reads.

    Args:
        logits: ``(N, C)`` raw class scores.
        labels: ``(N,)`` int64 class indices in ``[0, C)``.
        alpha: foreground weight in [0, 1], or -1 for none.
        gamma: focusing exponent (>= 0).
        reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
        Per-RoI losses ``(N,)`` for ``"none"``, else a scalar.
    """
    log_p = F.log_softmax(logits.float(), dim=-1)
    log_pt = log_p.gather(1, labels[:, None]).squeeze(1)
    loss = -((1.0 - log_pt.exp()) ** gamma) * log_pt
    if alpha >= 0:
        alpha_t = torch.where(labels > 0, alpha, 1.0 - alpha)
        loss = alpha_t * loss
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    raise ValueError(f"reduction: {reduction!r} is not one of 'none', 'mean', 'sum'")


def per_roi_losses(
    class_logits: Tensor,
    box_regression: Tensor,
    labels: Tensor,
    regression_targets: Tensor,
    focal: tuple[float, float] | None = None,
) -> Tensor:
    """Loss of each RoI: classification (CE or softmax focal) plus smooth-L1 box loss if foreground.

    This is the per-RoI term whose mean is torchvision's Fast R-CNN loss; OHEM ranks RoIs by it.

    Args:
        class_logits: ``(N, C)``.
        box_regression: ``(N, 4 * C)`` class-specific box deltas.
        labels: ``(N,)`` int64, 0 = background.
        regression_targets: ``(N, 4)`` encoded targets (ignored for background).
        focal: ``(alpha, gamma)`` to use the softmax focal loss, None for cross-entropy.

    Returns:
        ``(N,)`` float32 losses.
    """
    if focal is None:
        cls = F.cross_entropy(class_logits.float(), labels, reduction="none")
    else:
        cls = softmax_focal_loss(class_logits, labels, focal[0], focal[1], reduction="none")
    n = class_logits.shape[0]
    deltas = box_regression.reshape(n, -1, 4)[torch.arange(n, device=labels.device), labels]
    targets = regression_targets.float()
    box = F.smooth_l1_loss(deltas.float(), targets, beta=_BOX_BETA, reduction="none").sum(1)
    # where, not a product: a background chip's dummy targets encode to inf, and inf * 0 is nan
    return cls + torch.where(labels > 0, box, 0.0)


# --------------------------------------------------------------------------------------------
# Faster R-CNN: OHEM and box focal loss
# --------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _buffers_restored(*modules: nn.Module) -> Iterator[None]:
    """Undo buffer updates (BatchNorm running stats) made inside, so a forward is truly read-only."""
    saved = [(b, b.detach().clone()) for m in modules for b in m.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for buf, copy in saved:
                buf.copy_(copy)


class HardMiningRoIHeads(RoIHeads):
    """torchvision's ``RoIHeads`` with optional OHEM RoI selection and a box focal loss.

    Only the training forward changes; the class adds plain attributes, never parameters.

    Attributes:
        ohem_rois: RoIs kept per image by OHEM, None when OHEM is off.
        ohem_nms_iou: IoU of the NMS among OHEM candidates.
        box_focal: ``(alpha, gamma)`` of the softmax focal loss, None for cross-entropy.
        last_ohem: the last OHEM step, for tests and diagnostics: per image ``indices`` into that
            image's candidates (proposals, then ground truth boxes) highest loss first, their
            ``losses``, the ``candidates`` boxes and ``num_candidates``. Tensors are detached.
    """

    ohem_rois: int | None
    ohem_nms_iou: float
    box_focal: tuple[float, float] | None
    last_ohem: dict[str, Any] | None

    def _init_hard_mining(self) -> None:
        """Give a freshly re-classed instance its default (all off) attributes."""
        self.ohem_rois = None
        self.ohem_nms_iou = 0.7
        self.box_focal = None
        self.last_ohem = None

    def forward(  # type: ignore[override]
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None = None,
    ) -> tuple[list[dict[str, Tensor]], dict[str, Tensor]]:
        """Same contract as ``RoIHeads.forward``; training uses OHEM and/or focal loss when enabled."""
        if not self.training or (self.ohem_rois is None and self.box_focal is None):
            return super().forward(features, proposals, image_shapes, targets)
        _check_target_types(targets)
        if self.ohem_rois is None:
            rois, _, labels, reg_targets = self.select_training_samples(proposals, targets)
        else:
            rois, labels, reg_targets = self._ohem_select(features, proposals, image_shapes, targets)
        class_logits, box_regression = self._predict(features, rois, image_shapes)
        return [], self._fast_rcnn_losses(class_logits, box_regression, labels, reg_targets)

    def _predict(
        self, features: dict[str, Tensor], rois: list[Tensor], image_shapes: list[tuple[int, int]]
    ) -> tuple[Tensor, Tensor]:
        """RoI pooling, box head and predictor: class logits and box deltas of every RoI."""
        pooled = self.box_roi_pool(features, rois, image_shapes)
        return self.box_predictor(self.box_head(pooled))

    def _fast_rcnn_losses(
        self, class_logits: Tensor, box_regression: Tensor, labels: list[Tensor], reg_targets: list[Tensor]
    ) -> dict[str, Tensor]:
        """torchvision's Fast R-CNN losses, the classifier term swapped for focal loss if enabled."""
        if class_logits.shape[0] == 0:  # no RoI at all: zero losses that still reach every parameter
            zero = class_logits.sum() * 0.0 + box_regression.sum() * 0.0
            return {"loss_classifier": zero, "loss_box_reg": zero.clone()}
        loss_cls, loss_box = fastrcnn_loss(class_logits, box_regression, labels, reg_targets)
        if self.box_focal is not None:
            alpha, gamma = self.box_focal
            loss_cls = softmax_focal_loss(class_logits, torch.cat(labels), alpha, gamma)
        return {"loss_classifier": loss_cls, "loss_box_reg": loss_box}

    def _candidates(
        self, proposals: list[Tensor], targets: list[dict[str, Tensor]]
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """All proposals plus gt boxes per image, their labels (-1 ignored) and regression targets."""
        self.check_targets(targets)
        dtype = proposals[0].dtype
        gt_boxes = [t["boxes"].to(dtype) for t in targets]
        gt_labels = [t["labels"] for t in targets]
        candidates = self.add_gt_proposals(proposals, gt_boxes)
        matched_idxs, labels = self.assign_targets_to_proposals(candidates, gt_boxes, gt_labels)
        matched_gt = []
        for boxes, idxs in zip(gt_boxes, matched_idxs, strict=True):
            if boxes.numel() == 0:  # background chip: any target will do, background has no box loss
                boxes = boxes.new_zeros((1, 4))
            matched_gt.append(boxes[idxs])
        reg_targets = list(self.box_coder.encode(matched_gt, candidates))
        return candidates, labels, reg_targets

    def _ohem_select(
        self,
        features: dict[str, Tensor],
        proposals: list[Tensor],
        image_shapes: list[tuple[int, int]],
        targets: list[dict[str, Tensor]] | None,
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Pick the ``ohem_rois`` highest-loss RoIs per image among NMS survivors of all candidates."""
        assert targets is not None and self.ohem_rois is not None  # _check_target_types ensured it
        candidates, labels, reg_targets = self._candidates(proposals, targets)
        with torch.no_grad(), _buffers_restored(self.box_roi_pool, self.box_head, self.box_predictor):
            class_logits, box_regression = self._predict(features, candidates, image_shapes)
            losses = per_roi_losses(
                class_logits,
                box_regression,
                torch.cat(labels).clamp(min=0),
                torch.cat(reg_targets),
                self.box_focal,
            )
        sizes = [len(c) for c in candidates]
        chosen: list[Tensor] = []
        for boxes, lab, loss in zip(candidates, labels, losses.split(sizes), strict=True):
            valid = torch.where(lab >= 0)[0]  # -1: between IoU thresholds, ignored as torchvision does
            keep = nms(boxes[valid].detach().float(), loss[valid], self.ohem_nms_iou)
            chosen.append(valid[keep[: self.ohem_rois]])
        self.last_ohem = {
            "indices": chosen,
            "losses": [loss[idx] for loss, idx in zip(losses.split(sizes), chosen, strict=True)],
            "candidates": [c.detach() for c in candidates],
            "num_candidates": sizes,
        }
        return (
            [c[i] for c, i in zip(candidates, chosen, strict=True)],
            [lab[i] for lab, i in zip(labels, chosen, strict=True)],
            [t[i] for t, i in zip(reg_targets, chosen, strict=True)],
        )


def _check_target_types(targets: list[dict[str, Tensor]] | None) -> None:
    """The dtype checks torchvision's RoIHeads makes before training."""
    if targets is None:
        raise ValueError("targets should not be None in training mode")
    for t in targets:
        if not t["boxes"].is_floating_point():
            raise TypeError(f"target boxes must be of float type, got {t['boxes'].dtype}")
        if t["labels"].dtype != torch.int64:
            raise TypeError(f"target labels must be of int64 type, got {t['labels'].dtype}")


def _hard_mining_roi_heads(model: nn.Module, option: str) -> HardMiningRoIHeads:
    """The model's RoI heads, re-classed in place to ``HardMiningRoIHeads`` (parameters untouched)."""
    heads = getattr(model, "roi_heads", None)
    if not isinstance(heads, RoIHeads):
        raise ModelError(
            f"{option}: {type(model).__name__} has no RoI heads; {option} needs a two-stage detector (Faster R-CNN)"
        )
    if heads.has_mask() or heads.has_keypoint():
        raise ModelError(
            f"{option}: {type(model).__name__} has mask/keypoint heads; only Faster R-CNN is supported"
        )
    if isinstance(heads, HardMiningRoIHeads):
        return heads
    if type(heads) is not RoIHeads:
        raise ModelError(f"{option}: RoI heads of type {type(heads).__name__} are not torchvision's RoIHeads")
    heads.__class__ = HardMiningRoIHeads
    assert isinstance(heads, HardMiningRoIHeads)
    heads._init_hard_mining()
    return heads


def enable_ohem(model: nn.Module, rois_per_image: int, nms_iou: float = 0.7) -> nn.Module:
    """Turn on online hard example mining in a Faster R-CNN's RoI heads.

    Args:
        model: a torchvision two-stage detector (``model.roi_heads`` is a ``RoIHeads``).
        rois_per_image: RoIs per image that get gradients (the highest-loss NMS survivors).
        nms_iou: IoU of the NMS among candidates, so one hard object does not fill the budget.

    Returns:
        The same model, changed in place.

    Raises:
        ModelError: the model has no RoI heads (one-stage detectors) or has mask/keypoint heads.
        ConfigError: ``rois_per_image`` or ``nms_iou`` out of range.
    """
    if rois_per_image <= 0:
        raise ConfigError(f"train.ohem_rois: {rois_per_image} is not allowed, expected a positive integer")
    if not 0.0 < nms_iou <= 1.0:
        raise ConfigError(f"train.ohem_nms_iou: {nms_iou} is not allowed, expected a value in (0, 1]")
    heads = _hard_mining_roi_heads(model, "ohem")
    heads.ohem_rois = int(rois_per_image)
    heads.ohem_nms_iou = float(nms_iou)
    return model


def enable_box_focal(model: nn.Module, alpha: float, gamma: float) -> nn.Module:
    """Replace the box classifier's cross-entropy of a Faster R-CNN by a softmax focal loss.

    See :func:`softmax_focal_loss` for the exact form. Works with and without OHEM.

    Raises:
        ModelError: the model has no RoI heads.
        ConfigError: alpha outside [0, 1] (and not -1) or negative gamma.
    """
    _check_focal_params(alpha, gamma)
    heads = _hard_mining_roi_heads(model, "box_focal")
    heads.box_focal = (float(alpha), float(gamma))
    return model


# --------------------------------------------------------------------------------------------
# RetinaNet and FCOS: configurable focal parameters
# --------------------------------------------------------------------------------------------


class FocalRetinaNetClassificationHead(RetinaNetClassificationHead):
    """RetinaNet's classification head with its sigmoid focal loss alpha/gamma as attributes and per-chip weights."""

    focal_alpha: float
    focal_gamma: float

    def compute_loss(  # type: ignore[override]
        self, targets: list[dict[str, Tensor]], head_outputs: dict[str, Tensor], matched_idxs: list[Tensor]
    ) -> Tensor:
        """Per image: focal loss summed over non-ignored anchors / foreground count; mean over images."""
        per_image = []
        for tgt, logits, matched in zip(targets, head_outputs["cls_logits"], matched_idxs, strict=True):
            fg = matched >= 0
            one_hot = torch.zeros_like(logits)
            one_hot[fg, tgt["labels"][matched[fg]]] = 1.0
            used = matched != self.BETWEEN_THRESHOLDS
            loss = sigmoid_focal_loss(
                logits[used], one_hot[used], alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum"
            )
            per_image.append(loss / fg.sum().clamp(min=1))
        return (torch.stack(per_image) * chip_weights(targets, logits)).mean()


class FocalFCOSHead(FCOSHead):
    """FCOS head with its sigmoid focal loss alpha/gamma as attributes and per-chip weights of that loss.

    A chip whose target carries ``loss_weight`` (bank chips with ``train.bank_loss_weight``)
    has its classification loss scaled by it; box and centre-ness losses, which only
    foreground locations carry, are unchanged.
    """

    focal_alpha: float
    focal_gamma: float

    def compute_loss(
        self,
        targets: list[dict[str, Tensor]],
        head_outputs: dict[str, Tensor],
        anchors: list[Tensor],
        matched_idxs: list[Tensor],
    ) -> dict[str, Tensor]:
        """torchvision's FCOS losses with the classification term recomputed with our alpha/gamma."""
        losses = super().compute_loss(targets, head_outputs, anchors, matched_idxs)
        cls_logits = head_outputs["cls_logits"]
        one_hot = torch.zeros_like(cls_logits)
        for i, (tgt, matched) in enumerate(zip(targets, matched_idxs, strict=True)):
            fg = matched >= 0
            one_hot[i, fg, tgt["labels"][matched[fg]]] = 1.0
        num_fg = torch.stack([(m >= 0).sum() for m in matched_idxs]).sum().clamp(min=1)
        per_image = sigmoid_focal_loss(
            cls_logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="none"
        ).sum(dim=(1, 2))
        losses["classification"] = (per_image * chip_weights(targets, cls_logits)).sum() / num_fg
        return losses


def chip_weights(targets: list[dict[str, Tensor]], like: Tensor) -> Tensor:
    """Each chip's classification loss weight (its target's ``loss_weight``, 1 without one), shaped ``(N,)``."""
    return torch.stack([t[LOSS_WEIGHT].to(like) if LOSS_WEIGHT in t else like.new_ones(()) for t in targets])


def _set_alpha_gamma(module: nn.Module, alpha: float, gamma: float) -> None:
    """Store focal parameters as plain attributes (no buffers, so ``state_dict`` is unchanged)."""
    module.__dict__["focal_alpha"] = float(alpha)
    module.__dict__["focal_gamma"] = float(gamma)


def set_focal_params(model: nn.Module, alpha: float, gamma: float) -> nn.Module:
    """Make the sigmoid focal loss of a RetinaNet or FCOS model use ``alpha`` and ``gamma``.

    Args:
        model: a torchvision RetinaNet or FCOS (``model.head`` a ``RetinaNetHead`` / ``FCOSHead``).
        alpha: weight of positives in [0, 1], or -1 for no weighting (torchvision's convention).
        gamma: focusing exponent (>= 0); 0 gives (weighted) binary cross-entropy.

    Returns:
        The same model, changed in place.

    Raises:
        ModelError: the model has no RetinaNet or FCOS head.
        ConfigError: parameters out of range.
    """
    _check_focal_params(alpha, gamma)
    head = getattr(model, "head", None)
    if isinstance(head, RetinaNetHead):
        cls_head = head.classification_head
        if not isinstance(cls_head, FocalRetinaNetClassificationHead):
            cls_head.__class__ = FocalRetinaNetClassificationHead
        _set_alpha_gamma(cls_head, alpha, gamma)
    elif isinstance(head, FCOSHead):
        if not isinstance(head, FocalFCOSHead):
            head.__class__ = FocalFCOSHead
        _set_alpha_gamma(head, alpha, gamma)
    else:
        raise ModelError(
            f"focal_alpha/focal_gamma: {type(model).__name__} has no RetinaNet or FCOS head; "
            "use model.box_focal for Faster R-CNN"
        )
    return model


# --------------------------------------------------------------------------------------------
# One entry point from the config
# --------------------------------------------------------------------------------------------


def _has_focal_head(model: nn.Module) -> bool:
    """True for detectors whose head trains with a sigmoid focal loss (RetinaNet, FCOS)."""
    return isinstance(getattr(model, "head", None), (RetinaNetHead, FCOSHead))


def apply_loss_options(model: nn.Module, model_cfg: ModelConfig, train_cfg: TrainConfig) -> nn.Module:
    """Apply the config's OHEM / box focal / focal parameter options to a freshly built detector.

    Call it on the bare model, before DDP wrapping or compiling. With every option off (and the
    focal parameters at torchvision's defaults) the model is returned untouched.

    Raises:
        ModelError: an option the architecture cannot take (OHEM or box focal on a one-stage
            detector; non-default focal parameters on a model without any focal loss).
        ConfigError: values out of range.
    """
    alpha, gamma = model_cfg.focal_alpha, model_cfg.focal_gamma
    default_focal = alpha == TORCHVISION_FOCAL_ALPHA and gamma == TORCHVISION_FOCAL_GAMMA
    if train_cfg.ohem:
        enable_ohem(model, train_cfg.ohem_rois, train_cfg.ohem_nms_iou)
    if model_cfg.box_focal:
        enable_box_focal(model, alpha, gamma)
    elif _has_focal_head(model):
        if not default_focal or train_cfg.bank_loss_weight != 1.0:
            set_focal_params(model, alpha, gamma)
    elif train_cfg.bank_loss_weight != 1.0:
        raise ModelError(
            f"train.bank_loss_weight = {train_cfg.bank_loss_weight}: {type(model).__name__} (arch {model_cfg.arch!r}) "
            "has no focal-loss head to weight; expected a FCOS or RetinaNet arch, or bank_loss_weight: 1"
        )
    elif not default_focal:
        raise ModelError(
            f"model.focal_alpha/focal_gamma: ({alpha}, {gamma}) set but {type(model).__name__} "
            f"(arch {model_cfg.arch!r}) uses no focal loss; expected RetinaNet/FCOS or model.box_focal: true"
        )
    return model
