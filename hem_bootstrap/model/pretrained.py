"""Starting from pretrained files: other class counts, ImageNet trunks, frozen stages and frozen BatchNorm.

What practitioners start from is a torchvision file trained for another task: a COCO detector
(91 classes) or an ImageNet classifier. A detector file loads everything that fits and leaves
the class-dependent layers (:data:`CLASS_LAYERS`) at their fresh initialisation, saying so in
one line; anything else that does not fit is still an error naming the keys. A classifier file
fills the detector's trunk, matched by name (``features.`` / ``backbone.`` prefixes stripped)
or, where the detector regrouped the trunk's modules (SSDlite splits a MobileNet block), by
order and shape. With pretrained weights the first trunk stages are frozen and BatchNorm
becomes :class:`~torchvision.ops.FrozenBatchNorm2d` where torchvision's builders do so
(:data:`PRETRAINED_DEFAULTS`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.ops.misc import FrozenBatchNorm2d

from hem_bootstrap.config import ModelConfig
from hem_bootstrap.errors import ModelError
from hem_bootstrap.model.checkpoints import (
    check_state_dict,
    is_bookkeeping,
    mismatch_message,
    read_torch_file,
    state_dict_of,
)

log = logging.getLogger(__name__)

_RCNN = ("roi_heads.box_predictor.cls_score.", "roi_heads.box_predictor.bbox_pred.")
_ONE_STAGE = ("head.classification_head.cls_logits.",)
CLASS_LAYERS: dict[str, tuple[str, ...]] = {
    "small_fcos": _ONE_STAGE,
    "small_frcnn": _RCNN,
    "fasterrcnn_resnet50_fpn_v2": _RCNN,
    "fasterrcnn_mobilenet_v3_large_fpn": _RCNN,
    "retinanet_resnet50_fpn_v2": _ONE_STAGE,
    "fcos_resnet50_fpn": _ONE_STAGE,
    "ssdlite320_mobilenet_v3_large": ("head.classification_head.module_list.",),
}
"""Per arch, the layers whose shape depends on the number of classes (key prefixes)."""

PRETRAINED_DEFAULTS: dict[str, tuple[int | None, bool]] = {
    "small_fcos": (None, False),
    "small_frcnn": (None, False),
    "fasterrcnn_resnet50_fpn_v2": (3, False),
    "retinanet_resnet50_fpn_v2": (3, False),
    "fcos_resnet50_fpn": (3, True),
    "fasterrcnn_mobilenet_v3_large_fpn": (3, True),
    "ssdlite320_mobilenet_v3_large": (None, False),
}
"""Per arch, what torchvision's builder does with pretrained weights: trunk stages left trainable
(None: all) and whether the trunk's BatchNorm is frozen. The small archs have no torchvision
builder; starting from one of hem's own models, they train everything as a later round does."""


def resolve_freezing(model_cfg: ModelConfig) -> tuple[int | None, bool]:
    """``(trainable_layers, frozen_bn)`` for a model: the config's values, else the arch's pretrained defaults."""
    pretrained = bool(model_cfg.backbone_weights or model_cfg.weights)
    trainable, frozen = PRETRAINED_DEFAULTS.get(model_cfg.arch, (None, False)) if pretrained else (None, False)
    if model_cfg.trainable_layers is not None:
        trainable = model_cfg.trainable_layers
    return trainable, frozen if model_cfg.frozen_bn is None else model_cfg.frozen_bn


def load_detector_weights(model: nn.Module, path: Path, arch: str) -> list[str]:
    """Load a full-detector file; class-dependent layers shaped for another class count keep their fresh init.

    Returns:
        The re-initialised layers (empty when the file fits entirely).

    Raises:
        ModelError: missing/corrupt file, or missing / unexpected keys or other shapes that do
            not fit (named in the message).
    """
    what = "model.weights"
    state = state_dict_of(read_torch_file(path, what), path, what)
    expected = model.state_dict()
    missing, unexpected, shapes = check_state_dict(expected, state)
    odd = [k for k in expected if k in state and tuple(expected[k].shape) != tuple(state[k].shape)]
    reinit = [k for k in odd if k.startswith(CLASS_LAYERS.get(arch, ()))]
    if missing or unexpected or len(reinit) < len(odd):
        raise ModelError(mismatch_message(path, what, missing, unexpected, shapes))
    model.load_state_dict({k: v for k, v in state.items() if k not in reinit}, strict=False)
    layers = sorted({k.rsplit(".", 1)[0] for k in reinit})
    if layers:
        k = reinit[0]
        log.warning(
            "%s %s: re-initialised %s: shaped for another number of classes (%s %s in the file, %s in "
            "the model); every other layer loaded",
            what,
            path,
            ", ".join(layers),
            k,
            tuple(state[k].shape),
            tuple(expected[k].shape),
        )
    return layers


def trunk_of(model: nn.Module) -> nn.Module:
    """The classification trunk inside a detector's backbone (ResNet / MobileNet body, SSDlite features)."""
    backbone = getattr(model, "backbone", None)
    if backbone is None:
        raise ModelError(f"{type(model).__name__} has no backbone to load weights into")
    for part in ("body", "features"):
        if isinstance(getattr(backbone, part, None), nn.Module):
            return getattr(backbone, part)
    return backbone


def load_trunk_weights(model: nn.Module, path: Path) -> None:
    """Fill the detector's trunk from a classification file (torchvision's ImageNet ResNet-50 or MobileNetV3) or a detector file.

    Keys of parts the detector dropped (classifier, unused stages) are ignored.

    Raises:
        ModelError: missing/corrupt file, or trunk tensors that are not in the file (named).
    """
    what = "model.backbone_weights"
    state = state_dict_of(read_torch_file(path, what), path, what)
    for prefix in ("backbone.body.", "backbone.features.", "backbone.", "features."):
        if any(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            break
    trunk = trunk_of(model)
    expected = trunk.state_dict()
    missing, _, shapes = check_state_dict(expected, state)
    if missing or shapes:
        state = _by_order(expected, state) or {}
        if not state:
            raise ModelError(mismatch_message(path, what, missing, [], shapes))
    trunk.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)


def _by_order(expected: Mapping[str, Tensor], got: Mapping[str, Tensor]) -> dict[str, Tensor] | None:
    """``got`` renamed to ``expected``'s keys when the trunk's tensors open the file in the same order and shapes.

    A detector that regroups a classifier's modules (SSDlite cuts a MobileNet block in two)
    keeps their order, so the trunk's sequence of shapes is a prefix of the file's.
    """
    want = [k for k in expected if not is_bookkeeping(k)]
    have = [k for k in got if not is_bookkeeping(k)]
    if len(have) < len(want):
        return None
    if any(
        tuple(expected[w].shape) != tuple(got[h].shape) for w, h in zip(want, have[: len(want)], strict=True)
    ):
        return None
    return {w: got[h] for w, h in zip(want, have[: len(want)], strict=True)}


def trunk_stages(model: nn.Module) -> list[list[nn.Module]]:
    """The trunk's stages from input to output, as torchvision counts them for ``trainable_backbone_layers``.

    ResNet: conv1 (with bn1), layer1-4; MobileNet: the blocks from each down-sampling block on
    (SSDlite's split block starts a stage); the small trunk: stem and its three stages.
    """
    trunk = trunk_of(model)
    named = dict(trunk.named_children())
    if "layer1" in named:
        return [[named["conv1"], named["bn1"]], *([named[f"layer{i}"]] for i in range(1, 5))]
    if "stem" in named:
        return [[m] for m in named.values()]
    units: list[nn.Module] = list(named.values())
    starts = {0}
    first, *rest = units
    if isinstance(first, nn.Sequential) and len(rest) == 1 and isinstance(rest[0], nn.Sequential):
        starts.add(len(first) - 1)  # SSDlite: (blocks .., c4 block part 1), (c4 block rest, blocks ..)
        units = [*first.children(), *rest[0].children()]
    starts |= {i for i, u in enumerate(units) if getattr(u, "_is_cn", False)} | {len(units) - 1}
    bounds = sorted(starts) + [len(units)]
    return [units[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def freeze_trunk(model: nn.Module, trainable_layers: int | None, frozen_bn: bool) -> tuple[int, int]:
    """Freeze all but the last ``trainable_layers`` trunk stages (None: none frozen); frozen BatchNorm if asked.

    Returns:
        ``(stages frozen, stages in the trunk)``.

    Raises:
        ModelError: ``trainable_layers`` above the trunk's stage count.
    """
    stages = trunk_stages(model)
    keep = len(stages) if trainable_layers is None else trainable_layers
    if keep > len(stages):
        raise ModelError(f"model.trainable_layers = {keep}: the {type(trunk_of(model)).__name__} trunk of this "
                         f"model has {len(stages)} stages")
    for stage in stages[: len(stages) - keep]:
        for m in stage:
            m.requires_grad_(False)
    if frozen_bn:
        _freeze_batchnorm(trunk_of(model))
    return len(stages) - keep, len(stages)


def _freeze_batchnorm(module: nn.Module) -> None:
    """Replace every BatchNorm2d under ``module`` by a FrozenBatchNorm2d with the same statistics."""
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                for key in ("weight", "bias", "running_mean", "running_var"):
                    getattr(frozen, key).copy_(getattr(child, key))
            setattr(module, name, frozen)
        else:
            _freeze_batchnorm(child)
