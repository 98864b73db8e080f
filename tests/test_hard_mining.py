"""OHEM and focal losses: selection recomputed independently, checkpoint compatibility, exact losses."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.detection import FCOS, FasterRCNN, RetinaNet
from torchvision.models.detection._utils import BoxCoder
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, fasterrcnn_mobilenet_v3_large_320_fpn
from torchvision.models.detection.roi_heads import RoIHeads
from torchvision.ops import MultiScaleRoIAlign, box_iou, nms

from hem_bootstrap.config import ModelConfig, TrainConfig
from hem_bootstrap.errors import ConfigError, ModelError
from hem_bootstrap.model.hard_mining import (
    FocalFCOSHead,
    FocalRetinaNetClassificationHead,
    HardMiningRoIHeads,
    apply_loss_options,
    enable_box_focal,
    enable_ohem,
    set_focal_params,
    softmax_focal_loss,
)

SIZE = 128


def _backbone() -> nn.Module:
    """Two strided convs: a stride-4, 32-channel feature map, enough for every torchvision detector."""
    body = nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
    )
    body.out_channels = 32  # type: ignore[assignment]
    return body


def tiny_frcnn(bn_head: bool = False) -> FasterRCNN:
    """A small Faster R-CNN (one feature level); ``bn_head`` puts BatchNorm in the box head."""
    torch.manual_seed(0)
    kwargs = {}
    if bn_head:
        kwargs["box_head"] = nn.Sequential(
            nn.Flatten(), nn.Linear(32 * 49, 64), nn.BatchNorm1d(64), nn.ReLU()
        )
        kwargs["box_predictor"] = FastRCNNPredictor(64, 2)
    model = FasterRCNN(
        _backbone(),
        num_classes=None if bn_head else 2,
        rpn_anchor_generator=AnchorGenerator(((16, 32, 64),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        min_size=SIZE,
        max_size=SIZE,
        **kwargs,
    )
    return model


def tiny_retinanet() -> RetinaNet:
    torch.manual_seed(0)
    anchors = AnchorGenerator(((16, 32),), ((1.0,),))
    return RetinaNet(_backbone(), num_classes=2, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)


def tiny_fcos() -> FCOS:
    torch.manual_seed(0)
    anchors = AnchorGenerator(((8,),), ((1.0,),))
    return FCOS(_backbone(), num_classes=2, anchor_generator=anchors, min_size=SIZE, max_size=SIZE)


def batch() -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    """Two chips: one with two objects, one background chip with boxes of shape (0, 4)."""
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, SIZE, SIZE, generator=g) for _ in range(2)]
    targets = [
        {
            "boxes": torch.tensor([[10.0, 12.0, 40.0, 30.0], [70.0, 60.0, 100.0, 95.0]]),
            "labels": torch.tensor([1, 1]),
        },
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    return images, targets


# ------------------------------------------------------------------------------------------ OHEM


def _reference_ohem(
    model: FasterRCNN, images: list[Tensor], targets: list[dict[str, Tensor]], iou: float
) -> list[tuple[Tensor, Tensor, int]]:
    """OHEM recomputed from scratch: per image the NMS survivors by loss (highest first), losses, count."""
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    with torch.no_grad():
        image_list, tgts = model.transform(images, targets)
        features = {"0": model.backbone(image_list.tensors)}
        proposals, _ = model.rpn(image_list, features, tgts)
        out = []
        for i, (props, tgt) in enumerate(zip(proposals, tgts, strict=True)):
            cand = torch.cat([props, tgt["boxes"]])
            labels = torch.zeros(len(cand), dtype=torch.int64)
            matched = torch.zeros((len(cand), 4))
            if len(tgt["boxes"]):
                best_iou, best = box_iou(cand, tgt["boxes"]).max(1)
                labels = torch.where(best_iou >= 0.5, tgt["labels"][best], 0)
                matched = tgt["boxes"][best]
            reg = coder.encode_single(matched, cand)
            pooled = model.roi_heads.box_roi_pool(
                {k: v[i : i + 1] for k, v in features.items()}, [cand], [image_list.image_sizes[i]]
            )
            logits, deltas = model.roi_heads.box_predictor(model.roi_heads.box_head(pooled))
            ce = -F.log_softmax(logits, 1)[torch.arange(len(cand)), labels]
            d = (deltas.reshape(len(cand), -1, 4)[torch.arange(len(cand)), labels] - reg).abs()
            smooth = torch.where(d < 1 / 9, 0.5 * d**2 * 9, d - 0.5 / 9).sum(1)
            loss = ce + torch.where(labels > 0, smooth, 0.0)
            out.append((nms(cand, loss, iou), loss, len(cand)))
    return out


def test_ohem_keeps_b_highest_loss_rois_among_nms_survivors() -> None:
    model = tiny_frcnn()
    enable_ohem(model, rois_per_image=16, nms_iou=0.7)
    images, targets = batch()
    model.train()
    model(images, targets)
    got = model.roi_heads.last_ohem
    expected = _reference_ohem(model, images, targets, 0.7)
    for i, (survivors, loss, n) in enumerate(expected):
        assert len(survivors) > 16  # a real choice: more NMS survivors than the budget
        keep = survivors[:16]
        assert got["num_candidates"][i] == n
        assert len(got["indices"][i]) == 16
        assert torch.isfinite(got["losses"][i]).all()
        assert set(got["indices"][i].tolist()) == set(keep.tolist())
        torch.testing.assert_close(got["losses"][i], loss[got["indices"][i]], rtol=1e-4, atol=1e-5)
        # highest loss first, and nothing left out of the survivors beats the weakest one kept
        assert torch.all(got["losses"][i][:-1] >= got["losses"][i][1:])
    # image 0 has objects: its gt boxes (the last two candidates) are candidates too
    assert got["candidates"][0][-2:].tolist() == targets[0]["boxes"].tolist()


def test_ohem_training_step_finite_losses_and_gradients_and_read_only_pass() -> None:
    model = tiny_frcnn(bn_head=True)
    enable_ohem(model, rois_per_image=8, nms_iou=0.5)
    enable_box_focal(model, alpha=0.25, gamma=2.0)
    bn = model.roi_heads.box_head[2]
    images, targets = batch()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    losses = model(images, targets)
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    for name, p in model.roi_heads.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert model.roi_heads.box_predictor.cls_score.weight.grad.abs().sum() > 0
    opt.step()
    # the scoring pass over all candidates left BatchNorm alone: one update, from the grad pass only
    assert int(bn.num_batches_tracked) == 1
    assert [len(i) for i in model.roi_heads.last_ohem["indices"]] == [8, 8]


def test_ohem_keeps_state_dict_and_eval_outputs() -> None:
    torch.manual_seed(0)
    model = fasterrcnn_mobilenet_v3_large_320_fpn(
        weights=None, weights_backbone=None, num_classes=2, min_size=SIZE, max_size=SIZE
    )
    model.eval()
    images, _ = batch()
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        before = model(images)
    enable_ohem(model, 32)
    enable_box_focal(model, 0.25, 2.0)
    assert isinstance(model.roi_heads, HardMiningRoIHeads)
    assert list(model.state_dict()) == list(before_state)
    with torch.no_grad():
        after = model(images)
    assert sum(len(o["boxes"]) for o in before) > 0
    for a, b in zip(before, after, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key
    # a checkpoint of the plain model loads strictly into the OHEM one
    model.load_state_dict(before_state, strict=True)


def test_enable_ohem_twice_updates_settings_in_place() -> None:
    model = tiny_frcnn()
    enable_ohem(model, 16)
    heads = model.roi_heads
    enable_ohem(model, 4, 0.3)
    assert model.roi_heads is heads and (heads.ohem_rois, heads.ohem_nms_iou) == (4, 0.3)


# ------------------------------------------------------------------------------------ box focal


def test_softmax_focal_loss_matches_hand_computation() -> None:
    logits = torch.tensor([[2.0, 0.5], [0.1, 1.0], [0.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    alpha, gamma = 0.25, 2.0
    expected = []
    for row, lab in zip(logits.tolist(), labels.tolist(), strict=True):
        p = math.exp(row[lab]) / sum(math.exp(v) for v in row)
        a = alpha if lab > 0 else 1 - alpha
        expected.append(-a * (1 - p) ** gamma * math.log(p))
    got = softmax_focal_loss(logits, labels, alpha, gamma, reduction="none")
    torch.testing.assert_close(got, torch.tensor(expected))
    assert softmax_focal_loss(logits, labels, alpha, gamma).item() == pytest.approx(sum(expected) / 3)
    # gamma 0 without alpha weighting is cross-entropy
    torch.testing.assert_close(softmax_focal_loss(logits, labels, -1, 0.0), F.cross_entropy(logits, labels))


def _frcnn_losses(model: FasterRCNN) -> dict[str, Tensor]:
    images, targets = batch()
    model.train()
    torch.manual_seed(123)  # same fg/bg sampling in every call
    with torch.no_grad():
        return model(images, targets)


def test_box_focal_replaces_cross_entropy_in_faster_rcnn() -> None:
    model = tiny_frcnn()
    ce = _frcnn_losses(model)
    enable_box_focal(model, alpha=-1, gamma=0.0)
    plain = _frcnn_losses(model)
    torch.testing.assert_close(plain["loss_classifier"], ce["loss_classifier"])
    enable_box_focal(model, alpha=0.5, gamma=0.0)
    half = _frcnn_losses(model)
    torch.testing.assert_close(half["loss_classifier"], 0.5 * ce["loss_classifier"])
    enable_box_focal(model, alpha=-1, gamma=2.0)
    focal = _frcnn_losses(model)
    assert 0 < focal["loss_classifier"] < ce["loss_classifier"]
    for losses in (plain, half, focal):
        torch.testing.assert_close(losses["loss_box_reg"], ce["loss_box_reg"])


# ----------------------------------------------------------------------------- RetinaNet / FCOS


def _train_losses(model: nn.Module) -> dict[str, Tensor]:
    images, targets = batch()
    model.train()
    with torch.no_grad():
        return model(images, targets)


@pytest.mark.parametrize("build", [tiny_retinanet, tiny_fcos], ids=["retinanet", "fcos"])
def test_focal_params_change_only_the_classification_loss(build) -> None:
    model = build()
    keys = list(model.state_dict())
    stock = _train_losses(model)
    set_focal_params(model, 0.25, 2.0)  # torchvision's defaults: identical losses
    assert list(model.state_dict()) == keys
    same = _train_losses(model)
    for k in stock:
        torch.testing.assert_close(same[k], stock[k])
    set_focal_params(model, -1, 0.0)
    bce = _train_losses(model)
    set_focal_params(model, 0.5, 0.0)
    half = _train_losses(model)
    torch.testing.assert_close(half["classification"], 0.5 * bce["classification"])
    assert not torch.isclose(bce["classification"], stock["classification"])
    for k in stock:
        if k != "classification":
            torch.testing.assert_close(half[k], stock[k])


def test_retinanet_focal_with_gamma_zero_is_bce_over_non_ignored_anchors() -> None:
    model = set_focal_params(tiny_retinanet(), -1, 0.0)
    head = model.head.classification_head
    assert isinstance(head, FocalRetinaNetClassificationHead)
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 6, 2, generator=g)
    matched = [torch.tensor([0, -1, -2, 1, -1, 0]), torch.tensor([-1, -1, -2, -1, -1, -1])]
    targets = [{"labels": torch.tensor([1, 0])}, {"labels": torch.zeros((0,), dtype=torch.int64)}]
    expected = []
    for lg, m, t in zip(logits, matched, targets, strict=True):
        onehot = torch.zeros_like(lg)
        for a, j in enumerate(m.tolist()):
            if j >= 0:
                onehot[a, t["labels"][j]] = 1.0
        used = m != -2
        bce = F.binary_cross_entropy_with_logits(lg[used], onehot[used], reduction="sum")
        expected.append(bce / max(1, int((m >= 0).sum())))
    got = head.compute_loss(targets, {"cls_logits": logits}, matched)
    torch.testing.assert_close(got, sum(expected) / 2)


def test_fcos_focal_with_gamma_zero_is_bce_over_all_locations() -> None:
    model = set_focal_params(tiny_fcos(), -1, 0.0)
    head = model.head
    assert isinstance(head, FocalFCOSHead)
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 5, 2, generator=g)
    anchors = [
        torch.tensor([[0.0, 0, 8, 8], [8, 0, 16, 8], [0, 8, 8, 16], [8, 8, 16, 16], [4, 4, 12, 12]])
    ] * 2
    outputs = {
        "cls_logits": logits,
        "bbox_regression": torch.rand(2, 5, 4, generator=g),
        "bbox_ctrness": torch.rand(2, 5, 1),
    }
    matched = [torch.tensor([0, -1, 1, -1, 0]), torch.tensor([-1, -1, -1, -1, -1])]
    targets = [
        {"boxes": torch.tensor([[0.0, 0, 12, 12], [0, 6, 10, 16]]), "labels": torch.tensor([1, 0])},
        {"boxes": torch.zeros((0, 4)), "labels": torch.zeros((0,), dtype=torch.int64)},
    ]
    onehot = torch.zeros_like(logits)
    onehot[0, 0, 1] = onehot[0, 2, 0] = onehot[0, 4, 1] = 1.0
    expected = F.binary_cross_entropy_with_logits(logits, onehot, reduction="sum") / 3
    got = head.compute_loss(targets, outputs, anchors, matched)
    torch.testing.assert_close(got["classification"], expected)


@pytest.mark.parametrize("build", [tiny_retinanet, tiny_fcos], ids=["retinanet", "fcos"])
def test_a_chip_loss_weight_scales_only_that_chips_classification_loss(build) -> None:
    model = apply_loss_options(build(), ModelConfig(), TrainConfig(bank_loss_weight=0.5))
    images, targets = batch()
    model.train()

    def losses(weight: float | None) -> dict[str, Tensor]:
        tg = [dict(t) for t in targets]
        if weight is not None:
            tg[0]["loss_weight"], tg[1]["loss_weight"] = torch.tensor(1.0), torch.tensor(weight)
        with torch.no_grad():
            return model(images, tg)

    stock, one, zero, half = losses(None), losses(1.0), losses(0.0), losses(0.5)
    for k in stock:
        torch.testing.assert_close(one[k], stock[k])  # weight 1 is no weight
        if k != "classification":  # the background chip has no box or centre-ness loss to weight
            torch.testing.assert_close(half[k], stock[k])
    # the background chip's share of the classification loss is scaled, the object chip's kept
    assert zero["classification"] < stock["classification"]
    torch.testing.assert_close(half["classification"], (zero["classification"] + stock["classification"]) / 2)


# ----------------------------------------------------------------------------------- the entry point


def test_apply_loss_options_is_a_no_op_with_everything_off() -> None:
    frcnn, retina = tiny_frcnn(), tiny_retinanet()
    assert apply_loss_options(frcnn, ModelConfig(), TrainConfig()) is frcnn
    assert type(frcnn.roi_heads) is RoIHeads
    apply_loss_options(retina, ModelConfig(), TrainConfig())
    assert type(retina.head.classification_head).__name__ == "RetinaNetClassificationHead"


def test_apply_loss_options_applies_each_option() -> None:
    frcnn = apply_loss_options(
        tiny_frcnn(), ModelConfig(box_focal=True, focal_gamma=1.0), TrainConfig(ohem=True, ohem_rois=12)
    )
    heads = frcnn.roi_heads
    assert (heads.ohem_rois, heads.ohem_nms_iou, heads.box_focal) == (12, 0.7, (0.25, 1.0))
    fcos = apply_loss_options(tiny_fcos(), ModelConfig(focal_alpha=0.5, focal_gamma=1.5), TrainConfig())
    assert (fcos.head.focal_alpha, fcos.head.focal_gamma) == (0.5, 1.5)


@pytest.mark.parametrize(
    ("build", "model_cfg", "train_cfg", "fragment"),
    [
        (tiny_retinanet, ModelConfig(), TrainConfig(ohem=True), "RetinaNet has no RoI heads"),
        (tiny_fcos, ModelConfig(box_focal=True), TrainConfig(), "FCOS has no RoI heads"),
        (tiny_frcnn, ModelConfig(focal_gamma=3.0), TrainConfig(), "uses no focal loss"),
        (tiny_frcnn, ModelConfig(), TrainConfig(bank_loss_weight=0.5), "bank_loss_weight = 0.5: FasterRCNN"),
    ],
    ids=["ohem-retinanet", "box_focal-fcos", "focal-frcnn", "bank-weight-frcnn"],
)
def test_apply_loss_options_rejects_options_the_architecture_cannot_take(
    build, model_cfg: ModelConfig, train_cfg: TrainConfig, fragment: str
) -> None:
    with pytest.raises(ModelError, match=fragment) as info:
        apply_loss_options(build(), model_cfg, train_cfg)
    assert "\n" not in str(info.value)


def test_direct_calls_reject_bad_models_and_values() -> None:
    with pytest.raises(ModelError, match="two-stage detector"):
        enable_ohem(tiny_retinanet(), 16)
    with pytest.raises(ModelError, match="FasterRCNN has no RetinaNet or FCOS head"):
        set_focal_params(tiny_frcnn(), 0.25, 2.0)
    with pytest.raises(ConfigError, match="ohem_rois: 0"):
        enable_ohem(tiny_frcnn(), 0)
    with pytest.raises(ConfigError, match="focal_alpha: 1.5"):
        enable_box_focal(tiny_frcnn(), 1.5, 2.0)
    with pytest.raises(ConfigError, match="focal_gamma: -1"):
        set_focal_params(tiny_fcos(), 0.25, -1.0)


def test_small_frcnn_trains_with_ohem_and_box_focal_from_config() -> None:
    """The registry's two-stage ``small_frcnn`` takes both options; OHEM keeps ohem_rois RoIs per tile."""
    from hem_bootstrap.model.detectors import build_detector

    torch.manual_seed(0)
    model_cfg = ModelConfig(arch="small_frcnn", box_focal=True)
    model = apply_loss_options(build_detector(model_cfg, 2, 256), model_cfg, TrainConfig(ohem=True, ohem_rois=24))
    model.train()
    images = [torch.rand(3, 256, 256) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[40.0, 50.0, 64.0, 62.0]]), "labels": torch.tensor([1])}] * 2
    losses = model(images, targets)
    assert set(losses) >= {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert [len(i) for i in model.roi_heads.last_ohem["indices"]] == [24, 24]
    assert model.roi_heads.box_focal == (0.25, 2.0)
