"""Pretrained starts from local files in torchvision's own layout: other class counts, ImageNet trunks, frozen stages.

Every weight file is built here with torchvision's builders and ``weights=None``, saved with
``torch.save``: byte for byte the layout of the file a user downloads (COCO detectors have 91
classes), without downloading anything.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import pytest
import torch
import torchvision.models.detection.ssdlite
from torch import nn
from torchvision.models import mobilenet_v3_large, resnet50
from torchvision.models.detection import (
    fasterrcnn_mobilenet_v3_large_fpn,
    fcos_resnet50_fpn,
    retinanet_resnet50_fpn_v2,
    ssdlite320_mobilenet_v3_large,
)
from torchvision.ops.misc import FrozenBatchNorm2d

from hem_bootstrap.config import ModelConfig
from hem_bootstrap.errors import ModelError
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.pretrained import trunk_of, trunk_stages
from hem_bootstrap.model.train import train_one_step

COCO_CLASSES = 91


pytestmark = pytest.mark.usefixtures("one_thread")


def _save(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def _coco(builder: Callable[..., nn.Module]) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return builder(weights=None, weights_backbone=None, num_classes=COCO_CLASSES).state_dict()


def _coco_ssdlite() -> dict[str, torch.Tensor]:
    """torchvision's COCO SSDlite layout: its builder, with the full MobileNetV3 tail it keeps when given ImageNet weights.

    Built without them, torchvision halves the last blocks (``reduced_tail``); the COCO file was
    trained from ImageNet weights, so its tail is full. Only that flag is changed here.
    """

    def full_tail(**kw: object) -> nn.Module:
        return mobilenet_v3_large(**{**kw, "reduced_tail": False})

    with mock.patch.object(torchvision.models.detection.ssdlite, "mobilenet_v3_large", full_tail):
        return _coco(ssdlite320_mobilenet_v3_large)


COCO_FILES = {
    "fasterrcnn_mobilenet_v3_large_fpn": (
        lambda: _coco(fasterrcnn_mobilenet_v3_large_fpn),
        ["roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.cls_score"],
    ),
    "retinanet_resnet50_fpn_v2": (
        lambda: _coco(retinanet_resnet50_fpn_v2),
        ["head.classification_head.cls_logits"],
    ),
    "fcos_resnet50_fpn": (lambda: _coco(fcos_resnet50_fpn), ["head.classification_head.cls_logits"]),
    "ssdlite320_mobilenet_v3_large": (
        _coco_ssdlite,
        [f"head.classification_head.module_list.{i}.1" for i in range(6)],
    ),
    "small_fcos": (
        lambda: build_detector(ModelConfig(), COCO_CLASSES, 256).state_dict(),
        ["head.classification_head.cls_logits"],
    ),
    "small_frcnn": (
        lambda: build_detector(ModelConfig(arch="small_frcnn"), COCO_CLASSES, 256).state_dict(),
        ["roi_heads.box_predictor.bbox_pred", "roi_heads.box_predictor.cls_score"],
    ),
}


@pytest.mark.parametrize("arch", list(COCO_FILES))
def test_a_coco_file_loads_all_but_the_class_layers(
    arch: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make, class_layers = COCO_FILES[arch]
    state = make()
    path = _save(state, tmp_path / "coco.pth")
    torch.manual_seed(1)
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.model.pretrained"):
        model = build_detector(ModelConfig(arch=arch, weights=str(path), frozen_bn=False), 3, 256)
    got = model.state_dict()
    reinit = {k for k in got if k.rsplit(".", 1)[0] in class_layers}
    assert reinit and all(got[k].shape != state[k].shape for k in reinit)
    for k, v in state.items():
        if k not in reinit:
            assert torch.equal(got[k], v), k
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and str(path) in lines[0] and "another number of classes" in lines[0]
    assert all(layer in lines[0] for layer in class_layers)


def test_a_file_for_another_arch_still_fails_with_the_keys_named(tmp_path: Path) -> None:
    path = _save(build_detector(ModelConfig(), COCO_CLASSES, 256).state_dict(), tmp_path / "small.pth")
    with pytest.raises(ModelError) as err:
        build_detector(ModelConfig(arch="fcos_resnet50_fpn", weights=str(path)), 3, 256)
    msg = str(err.value)
    assert str(path) in msg and "do not fit the model" in msg and "missing: backbone.body.conv1.weight" in msg
    assert "\n" not in msg


def test_a_file_that_fits_keeps_its_class_layers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    torch.manual_seed(2)
    src = build_detector(ModelConfig(), 3, 256)
    path = _save(src.state_dict(), tmp_path / "same.pth")
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.model.pretrained"):
        model = build_detector(ModelConfig(weights=str(path), frozen_bn=False), 3, 256)
    assert torch.equal(
        model.head.classification_head.cls_logits.weight, src.head.classification_head.cls_logits.weight
    )
    assert not caplog.records


def _resnet_file() -> dict[str, torch.Tensor]:
    torch.manual_seed(3)
    return resnet50().state_dict()


def _mobilenet_file() -> dict[str, torch.Tensor]:
    torch.manual_seed(4)
    return mobilenet_v3_large().state_dict()


@pytest.mark.parametrize(
    ("arch", "imagenet"),
    [
        ("fasterrcnn_resnet50_fpn_v2", _resnet_file),
        ("retinanet_resnet50_fpn_v2", _resnet_file),
        ("fcos_resnet50_fpn", _resnet_file),
        ("fasterrcnn_mobilenet_v3_large_fpn", _mobilenet_file),
        ("ssdlite320_mobilenet_v3_large", _mobilenet_file),
    ],
)
def test_imagenet_classification_files_fill_every_trunk(
    arch: str, imagenet: Callable[[], dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    state = imagenet()
    path = _save(state, tmp_path / "imagenet.pth")
    torch.manual_seed(5)
    model = build_detector(ModelConfig(arch=arch, backbone_weights=str(path), frozen_bn=False), 2, 256)
    trunk = trunk_of(model)
    convs = [m for m in trunk.modules() if isinstance(m, nn.Conv2d)]
    file_convs = [v for k, v in state.items() if v.ndim == 4]
    assert len(convs) == len(file_convs)  # every conv of the trunk, first to last, and nothing else
    for conv, w in zip(convs, file_convs, strict=True):
        assert torch.equal(conv.weight, w)
    bns = [m for m in trunk.modules() if isinstance(m, nn.BatchNorm2d)]
    means = [v for k, v in state.items() if k.endswith("running_mean")]
    assert all(torch.equal(bn.running_mean, m) for bn, m in zip(bns, means, strict=True))


def test_a_backbone_file_that_does_not_fit_names_what_is_missing(tmp_path: Path) -> None:
    state = _mobilenet_file()
    path = _save(state, tmp_path / "mobilenet.pth")
    with pytest.raises(ModelError) as err:
        build_detector(ModelConfig(arch="fcos_resnet50_fpn", backbone_weights=str(path)), 2, 256)
    assert "model.backbone_weights" in str(err.value) and "missing: conv1.weight" in str(err.value)


@pytest.mark.parametrize(
    ("arch", "stages"),
    [
        ("fasterrcnn_resnet50_fpn_v2", 5),
        ("fasterrcnn_mobilenet_v3_large_fpn", 6),
        ("ssdlite320_mobilenet_v3_large", 6),
        ("small_fcos", 4),
    ],
)
def test_trunk_stages_count_as_torchvision_does(arch: str, stages: int) -> None:
    model = build_detector(ModelConfig(arch=arch), 2, 256)
    got = trunk_stages(model)
    assert len(got) == stages
    in_stages = {id(p) for stage in got for m in stage for p in m.parameters()}
    assert in_stages == {id(p) for p in trunk_of(model).parameters()}  # every trunk parameter in one stage


def test_pretrained_trunk_freezes_its_first_stages_and_batchnorm(tmp_path: Path) -> None:
    path = _save(_resnet_file(), tmp_path / "r50.pth")
    model = build_detector(ModelConfig(arch="fcos_resnet50_fpn", backbone_weights=str(path)), 2, 256)
    body = model.backbone.body
    assert not any(p.requires_grad for m in (body.conv1, body.layer1) for p in m.parameters())
    assert all(p.requires_grad for m in (body.layer2, body.layer3, body.layer4) for p in m.parameters())
    assert isinstance(body.bn1, FrozenBatchNorm2d) and not any(
        isinstance(m, nn.BatchNorm2d) for m in body.modules()
    )
    assert all(p.requires_grad for p in model.head.parameters())
    everything = build_detector(
        ModelConfig(
            arch="fcos_resnet50_fpn", backbone_weights=str(path), trainable_layers=5, frozen_bn=False
        ),
        2,
        256,
    )
    assert all(p.requires_grad for p in everything.parameters())
    scratch = build_detector(ModelConfig(arch="fcos_resnet50_fpn"), 2, 256)
    assert all(p.requires_grad for p in scratch.parameters())
    assert any(isinstance(m, nn.BatchNorm2d) for m in scratch.backbone.body.modules())
    with pytest.raises(ModelError, match="model.trainable_layers = 6: the IntermediateLayerGetter trunk .* has 5 stages"):
        build_detector(ModelConfig(arch="fcos_resnet50_fpn", trainable_layers=6), 2, 256)


def test_fine_tuning_a_pretrained_start_keeps_the_frozen_trunk(tmp_path: Path) -> None:
    torch.manual_seed(6)
    donor = build_detector(ModelConfig(), 2, 128)
    trunk_file = _save(donor.backbone.body.state_dict(), tmp_path / "trunk.pth")
    model = build_detector(ModelConfig(backbone_weights=str(trunk_file), trainable_layers=2, frozen_bn=True), 2,
                           128).train()
    before = {k: v.clone() for k, v in model.backbone.body.state_dict().items()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 128, 128, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[40.0, 50.0, 64.0, 62.0]]), "labels": torch.tensor([1])}] * 2
    for _ in range(3):
        train_one_step(model, (images, targets), opt)
    after = model.backbone.body.state_dict()
    frozen = [k for k in after if k.startswith(("stem.", "stage1."))]
    trained = [k for k in after if k.startswith("stage3.") and k.endswith("weight")]
    assert frozen and all(torch.equal(after[k], before[k]) for k in frozen)  # weights and BN statistics
    assert all(torch.equal(after[k], donor.backbone.body.state_dict()[k]) for k in frozen)
    assert any(not torch.equal(after[k], before[k]) for k in trained)


@pytest.mark.parametrize(("arch", "imagenet", "frozen_stages", "frozen_bn"), [
    ("fcos_resnet50_fpn", _resnet_file, 2, True),
    ("retinanet_resnet50_fpn_v2", _resnet_file, 2, False),  # torchvision's v2 builders keep plain BatchNorm
    ("fasterrcnn_mobilenet_v3_large_fpn", _mobilenet_file, 3, True),
    ("ssdlite320_mobilenet_v3_large", _mobilenet_file, 0, False),  # SSDlite trains its whole trunk
])
def test_pretrained_defaults_follow_torchvision_per_arch(arch: str, imagenet: Callable[[], dict[str, torch.Tensor]],
                                                          frozen_stages: int, frozen_bn: bool, tmp_path: Path) -> None:
    path = _save(imagenet(), tmp_path / "imagenet.pth")
    model = build_detector(ModelConfig(arch=arch, backbone_weights=str(path)), 2, 256)
    stages = trunk_stages(model)
    frozen = [not any(p.requires_grad for m in st for p in m.parameters()) for st in stages]
    assert frozen == [True] * frozen_stages + [False] * (len(stages) - frozen_stages)
    assert any(isinstance(m, FrozenBatchNorm2d) for m in trunk_of(model).modules()) == frozen_bn


def test_later_rounds_rebuild_a_pretrained_model_from_its_checkpoint_alone(tmp_path: Path) -> None:
    from hem_bootstrap.config import config_from_tree
    from hem_bootstrap.model.checkpoints import model_hash, save_checkpoint
    from hem_bootstrap.steps import load_model

    torch.manual_seed(7)
    trunk_file = _save(build_detector(ModelConfig(), 2, 128).backbone.body.state_dict(), tmp_path / "trunk.pth")
    cfg = config_from_tree({"model": {"backbone_weights": str(trunk_file), "trainable_layers": 2, "frozen_bn": True},
                            "tiling": {"tile_size": 128, "overlap": 16}}, tmp_path)
    first = build_detector(cfg.model, cfg.num_classes, 128)
    save_checkpoint(tmp_path / "model.pt", first)
    trunk_file.unlink()  # the pretrained file is not needed once a checkpoint holds every weight
    again = load_model(cfg, tmp_path / "model.pt")
    assert model_hash(again) == model_hash(first)
    assert isinstance(again.backbone.body.stem[1], FrozenBatchNorm2d)
    assert not any(p.requires_grad for p in again.backbone.body.stage1.parameters())
    assert all(p.requires_grad for p in again.backbone.body.stage3.parameters())
