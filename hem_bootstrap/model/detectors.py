"""Registry of torchvision detectors with small-object settings, local weights and checkpoints.

Every detector is built without downloading anything (``weights=None, weights_backbone=None``);
pretrained weights come only from local files named in the config. Tiles enter the network at
their own size: the transform never resizes, so a 12 px car stays 12 px.

``small_fcos`` (the default) is a light detector assembled from torchvision parts (a four-stage
conv trunk, :class:`torchvision.ops.FeaturePyramidNetwork` at strides 4/8/16 and torchvision's
:class:`~torchvision.models.detection.FCOS`) that trains from scratch on a CPU in minutes.
``small_frcnn`` puts torchvision's Faster R-CNN (RPN, RoIAlign, two-layer box head) on the
same trunk: the two-stage detector that OHEM and the box focal loss apply to, cheap enough to
compare recipes on a CPU.
"""

from __future__ import annotations

import functools
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torchvision.models import mobilenet_v3_large
from torchvision.models.detection import (
    FCOS,
    FasterRCNN,
    fasterrcnn_resnet50_fpn_v2,
    fcos_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    ssdlite,
)
from torchvision.models.detection._utils import retrieve_out_channels
from torchvision.models.detection.anchor_utils import AnchorGenerator, DefaultBoxGenerator
from torchvision.models.detection.backbone_utils import mobilenet_backbone
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.fcos import FCOSHead
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.ssd import SSD
from torchvision.models.detection.transform import GeneralizedRCNNTransform
from torchvision.ops import FeaturePyramidNetwork, MultiScaleRoIAlign

from hem_bootstrap.config import ModelConfig
from hem_bootstrap.errors import ModelError
from hem_bootstrap.model.pretrained import (
    freeze_trunk,
    load_detector_weights,
    load_trunk_weights,
    resolve_freezing,
)

#: ImageNet statistics, torchvision's default input normalisation.
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TileTransform(GeneralizedRCNNTransform):
    """torchvision's detection transform without the resize: normalise and batch only.

    Tiles are already cut at the working resolution, and upsampling a 256 px tile to 800 px
    (torchvision's default) would cost 10x the compute for no gain in ground resolution.
    """

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        """Return the image and target unchanged."""
        return image, target

    def forward(
        self, images: list[Tensor], targets: list[dict[str, Tensor]] | None = None
    ) -> tuple[ImageList, list[dict[str, Tensor]] | None]:
        """A batch of equal tiles (every scan and training batch) is stacked once and normalised in place.

        torchvision normalises image by image into new tensors and then copies them into a padded
        batch; with no padding to add, the same arithmetic on the stacked batch gives the same
        bits with one allocation instead of ``2 * len(images) + 1``. Anything else (mixed sizes,
        sizes that need padding, integer images, tracing for export) takes torchvision's path.
        """
        images = list(images)
        shapes = {tuple(img.shape) for img in images}
        if len(shapes) != 1 or torchvision._is_tracing() or not images[0].is_floating_point():
            return super().forward(images, targets)
        shape = shapes.pop()
        if len(shape) != 3 or shape[1] % self.size_divisible or shape[2] % self.size_divisible:
            return super().forward(images, targets)
        batch = torch.stack(images)
        mean = torch.as_tensor(self.image_mean, dtype=batch.dtype, device=batch.device)
        std = torch.as_tensor(self.image_std, dtype=batch.dtype, device=batch.device)
        batch.sub_(mean[None, :, None, None]).div_(std[None, :, None, None])
        kept = [dict(t) for t in targets] if targets is not None else None  # callers' dicts stay theirs
        return ImageList(batch, [(shape[1], shape[2])] * len(images)), kept


def _tile_transform(
    tile_size: int, mean: list[float], std: list[float], size_divisible: int = 32
) -> TileTransform:
    return TileTransform(tile_size, tile_size, mean, std, size_divisible=size_divisible)


def _level_sizes(anchor_sizes: list[int], n_levels: int) -> list[int]:
    """One size per pyramid level: the configured sizes, extended by doubling or truncated."""
    sizes = [int(s) for s in anchor_sizes] or [16]
    while len(sizes) < n_levels:
        sizes.append(sizes[-1] * 2)
    return sizes[:n_levels]


# ------------------------------------------------------------------------------ small_fcos


def _conv_bn_relu(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)
    )


class SmallTrunk(nn.Module):
    """Four conv-bn-relu stages; returns feature maps at strides 4, 8 and 16.

    Plain 3x3 convolutions train quickly from scratch and run at full speed on CPU BLAS, unlike
    depthwise blocks that are cheap in FLOPs but slow per FLOP on a CPU.
    """

    def __init__(self, widths: tuple[int, int, int, int] = (24, 32, 64, 128)) -> None:
        super().__init__()
        a, b, c, d = widths
        self.stem = _conv_bn_relu(3, a, 2)
        self.stage1 = nn.Sequential(_conv_bn_relu(a, b, 2), _conv_bn_relu(b, b, 1))
        self.stage2 = nn.Sequential(_conv_bn_relu(b, c, 2), _conv_bn_relu(c, c, 1))
        self.stage3 = nn.Sequential(_conv_bn_relu(c, d, 2), _conv_bn_relu(d, d, 1))
        self.out_widths = [b, c, d]

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Features keyed "0" (stride 4), "1" (stride 8), "2" (stride 16)."""
        c2 = self.stage1(self.stem(x))
        c3 = self.stage2(c2)
        c4 = self.stage3(c3)
        return OrderedDict([("0", c2), ("1", c3), ("2", c4)])


class SmallBackbone(nn.Module):
    """:class:`SmallTrunk` plus torchvision's FPN; ``out_channels`` as torchvision detectors expect."""

    def __init__(self, fpn_channels: int = 64, width: float = 1.0) -> None:
        super().__init__()
        a, b, c, d = _widened((24, 32, 64, 128), width)
        self.body = SmallTrunk((a, b, c, d))
        fpn_channels = _widened((fpn_channels,), width)[0]
        self.fpn = FeaturePyramidNetwork(self.body.out_widths, fpn_channels)
        self.out_channels = fpn_channels

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """Pyramid features at strides 4, 8, 16."""
        return self.fpn(self.body(x))


def _widened(widths: tuple[int, ...], factor: float) -> tuple[int, ...]:
    """Channel counts times ``factor``, rounded to multiples of 8 (fast on CPU BLAS and tensor cores)."""
    return tuple(max(8, int(w * factor / 8 + 0.5) * 8) for w in widths)


#: Strides of the small backbone's pyramid levels.
SMALL_STRIDES = (4, 8, 16)


def _fcos_point_sizes(model_cfg: ModelConfig, strides: tuple[int, ...]) -> tuple[tuple[int], ...]:
    """FCOS 'anchor' (point) size per level.

    torchvision's FCOS gives level ``l`` the objects whose farthest edge lies 4-8 point sizes
    from a location, so an object of size ``s`` belongs with point size ``s / 4``. The point
    size never drops below the stride, or centre sampling could miss every grid point.
    """
    sizes = _level_sizes(model_cfg.anchor_sizes, len(strides))
    return tuple((max(int(stride), int(round(s / 4))),) for s, stride in zip(sizes, strides, strict=True))


def _build_small_fcos(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    backbone = SmallBackbone(fpn_channels=64, width=model_cfg.width)
    sizes = _fcos_point_sizes(model_cfg, SMALL_STRIDES)
    anchors = AnchorGenerator(sizes, ((1.0,),) * len(sizes))
    head = FCOSHead(backbone.out_channels, 1, num_classes, num_convs=2)
    model = FCOS(
        backbone,
        num_classes,
        min_size=tile_size,
        max_size=tile_size,
        anchor_generator=anchors,
        head=head,
        center_sampling_radius=1.5,
        score_thresh=model_cfg.score_floor,
        nms_thresh=model_cfg.nms_iou,
        detections_per_img=model_cfg.detections_per_img,
        topk_candidates=max(1000, model_cfg.detections_per_img),
    )
    model.transform = _tile_transform(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


def _build_small_frcnn(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """Faster R-CNN on :class:`SmallBackbone`: one anchor size x three ratios per level (4/8/16).

    The box head is torchvision's two-layer MLP at 256 wide (its default 1024 is sized for
    ResNet features); the RPN keeps fewer proposals than torchvision's 2000 and the box head
    samples 256 RoIs per tile, not 512: a tile holds tens of objects, not an image's hundreds.
    """
    backbone = SmallBackbone(fpn_channels=64, width=model_cfg.width)
    sizes = _level_sizes(model_cfg.anchor_sizes, len(SMALL_STRIDES))
    anchors = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * len(sizes))
    pooler = MultiScaleRoIAlign([str(i) for i in range(len(SMALL_STRIDES))], output_size=7, sampling_ratio=2)
    width = 256
    model = FasterRCNN(
        backbone,
        rpn_anchor_generator=anchors,
        box_roi_pool=pooler,
        box_head=TwoMLPHead(backbone.out_channels * 7 * 7, width),
        box_predictor=FastRCNNPredictor(width, num_classes),
        rpn_pre_nms_top_n_train=1000,
        rpn_post_nms_top_n_train=600,
        box_batch_size_per_image=256,
        rpn_pre_nms_top_n_test=600,
        rpn_post_nms_top_n_test=300,
        **_rcnn_kwargs(model_cfg, tile_size),
    )
    model.transform = _tile_transform(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


# ------------------------------------------------------------------------------ torchvision archs


def _postprocess_kwargs(model_cfg: ModelConfig, tile_size: int, prefix: str = "") -> dict[str, Any]:
    """No resize, and the configured score floor, NMS IoU and detections per tile (R-CNN names take ``box_``)."""
    return {
        "min_size": tile_size,
        "max_size": tile_size,
        f"{prefix}score_thresh": model_cfg.score_floor,
        f"{prefix}nms_thresh": model_cfg.nms_iou,
        f"{prefix}detections_per_img": model_cfg.detections_per_img,
    }


def _rcnn_kwargs(model_cfg: ModelConfig, tile_size: int) -> dict[str, Any]:
    return _postprocess_kwargs(model_cfg, tile_size, "box_")


def _one_stage_kwargs(model_cfg: ModelConfig, tile_size: int) -> dict[str, Any]:
    return _postprocess_kwargs(model_cfg, tile_size)


def _build_frcnn_r50(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """Faster R-CNN v2; five levels (strides 4-64), one size x three ratios per level as torchvision."""
    model = fasterrcnn_resnet50_fpn_v2(
        weights=None, weights_backbone=None, num_classes=num_classes, **_rcnn_kwargs(model_cfg, tile_size)
    )
    sizes = _level_sizes(model_cfg.anchor_sizes, 5)
    model.rpn.anchor_generator = AnchorGenerator(tuple((s,) for s in sizes), ((0.5, 1.0, 2.0),) * 5)
    model.transform = _tile_transform(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


def _build_frcnn_mobilenet(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """Faster R-CNN on MobileNetV3-Large FPN (strides 16/32/64) with five sizes per level.

    Keeps torchvision's 15 anchors per location, so its COCO weights still fit the RPN head.
    """
    backbone = mobilenet_backbone(
        backbone_name="mobilenet_v3_large",
        weights=None,
        fpn=True,
        trainable_layers=6,
        norm_layer=nn.BatchNorm2d,
    )
    sizes = tuple(_level_sizes(model_cfg.anchor_sizes, 5))
    anchors = AnchorGenerator((sizes,) * 3, ((0.5, 1.0, 2.0),) * 3)
    model = FasterRCNN(
        backbone,
        num_classes=num_classes,
        rpn_anchor_generator=anchors,
        rpn_score_thresh=0.05,
        **_rcnn_kwargs(model_cfg, tile_size),
    )
    model.transform = _tile_transform(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


def _one_stage(builder: Callable[..., nn.Module], model_cfg: ModelConfig, num_classes: int, tile_size: int,
               anchors: AnchorGenerator) -> nn.Module:
    """A torchvision one-stage detector built offline, with our anchors and the no-resize tile transform."""
    model = builder(weights=None, weights_backbone=None, num_classes=num_classes,
                    **_one_stage_kwargs(model_cfg, tile_size))
    model.anchor_generator = anchors
    model.transform = _tile_transform(tile_size, IMAGENET_MEAN, IMAGENET_STD)
    return model


def _build_retinanet_r50(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """RetinaNet v2 (strides 8-128); three octave scales x three ratios per level as torchvision."""
    sizes = _level_sizes(model_cfg.anchor_sizes, 5)
    per_level = tuple(tuple(int(round(s * 2 ** (k / 3))) for k in range(3)) for s in sizes)
    anchors = AnchorGenerator(per_level, ((0.5, 1.0, 2.0),) * 5)
    return _one_stage(retinanet_resnet50_fpn_v2, model_cfg, num_classes, tile_size, anchors)


def _build_fcos_r50(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """FCOS on ResNet-50 FPN (strides 8-128)."""
    sizes = _fcos_point_sizes(model_cfg, (8, 16, 32, 64, 128))
    return _one_stage(fcos_resnet50_fpn, model_cfg, num_classes, tile_size, AnchorGenerator(sizes, ((1.0,),) * 5))


def _build_ssdlite(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """SSDlite on MobileNetV3-Large; default-box scales taken from the anchor sizes (in tile units).

    torchvision's scales (20-95 % of the image) are far too large for 10-40 px objects. The
    trunk keeps MobileNetV3's full tail: torchvision's builder halves the last blocks when it
    builds without ImageNet weights, but its COCO and ImageNet files have the full tail, so a
    reduced model could load neither.
    """
    kwargs = _one_stage_kwargs(model_cfg, tile_size)
    kwargs.pop("min_size")
    kwargs.pop("max_size")
    norm = functools.partial(nn.BatchNorm2d, eps=0.001, momentum=0.03)  # torchvision's SSDlite BatchNorm
    trunk = mobilenet_v3_large(weights=None, norm_layer=norm, reduced_tail=False)
    ssdlite._normal_init(trunk)
    backbone = ssdlite._mobilenet_extractor(trunk, 6, norm)
    sizes = _level_sizes(model_cfg.anchor_sizes, 7)
    anchors = DefaultBoxGenerator([[2, 3] for _ in range(6)], scales=[min(1.0, s / float(tile_size)) for s in sizes])
    head = ssdlite.SSDLiteHead(retrieve_out_channels(backbone, (320, 320)), anchors.num_anchors_per_location(),
                               num_classes, norm)
    model = SSD(backbone, anchors, (tile_size, tile_size), num_classes, head=head, topk_candidates=300, **kwargs)
    model.transform = _tile_transform(tile_size, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], size_divisible=1)
    return model


#: Detector name -> builder ``(model_cfg, num_classes, tile_size) -> nn.Module``.
ARCHS: dict[str, Callable[[ModelConfig, int, int], nn.Module]] = {
    "small_fcos": _build_small_fcos,
    "small_frcnn": _build_small_frcnn,
    "fasterrcnn_resnet50_fpn_v2": _build_frcnn_r50,
    "fasterrcnn_mobilenet_v3_large_fpn": _build_frcnn_mobilenet,
    "retinanet_resnet50_fpn_v2": _build_retinanet_r50,
    "fcos_resnet50_fpn": _build_fcos_r50,
    "ssdlite320_mobilenet_v3_large": _build_ssdlite,
}


def build_detector(model_cfg: ModelConfig, num_classes: int, tile_size: int) -> nn.Module:
    """Build ``model_cfg.arch`` for ``num_classes`` (background included) at ``tile_size`` px.

    Small-object settings come from the config (anchor sizes, score floor, NMS IoU, detections
    per tile); then optional local backbone weights and full weights are loaded (see
    :mod:`hem_bootstrap.model.pretrained`), and with either the first trunk stages and the
    trunk's BatchNorm are frozen as torchvision does for that arch, unless ``trainable_layers`` /
    ``frozen_bn`` say otherwise.

    Raises:
        ModelError: unknown arch, bad class count, or weights that are missing or do not fit.
    """
    builder = ARCHS.get(model_cfg.arch)
    if builder is None:
        raise ModelError(
            f"model.arch = {model_cfg.arch!r}: unknown detector; valid names: {', '.join(ARCHS)}"
        )
    if num_classes < 2:
        raise ModelError(f"num_classes = {num_classes}: expected >= 2 (background plus at least one class)")
    if tile_size < 32:
        raise ModelError(f"tile_size = {tile_size}: expected >= 32 px for a detector")
    model = builder(model_cfg, num_classes, tile_size)
    if model_cfg.backbone_weights:
        load_trunk_weights(model, Path(model_cfg.backbone_weights))
    if model_cfg.weights:
        load_detector_weights(model, Path(model_cfg.weights), model_cfg.arch)
    freeze_trunk(model, *resolve_freezing(model_cfg))
    return model


