"""Training chips: kinds, targets inside every chip, augmentation, the ratio sampler."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from hem_bootstrap.config import DataConfig, ImageSet
from hem_bootstrap.data.augment import ChipAugment
from hem_bootstrap.data.sampling import RatioBatchSampler
from hem_bootstrap.data.training import (
    ChipDataset,
    TrainImage,
    collate_chips,
    prepare_train_images,
)
from hem_bootstrap.errors import DataError, TrainingError

# objects painted bright on a dark scene, so a box's pixels can be checked after augmentation
OBJECTS = np.array([[40, 50, 52, 58], [300, 310, 316, 318], [130, 400, 140, 416]], dtype=float)
TILE = 128


@pytest.fixture
def scene(make_raster: Callable[..., Path], make_labels: Callable[..., Path]) -> tuple[Path, Path]:
    data = np.full((3, 512, 512), 10, dtype="uint8")
    for x0, y0, x1, y1 in OBJECTS.astype(int):
        data[:, y0:y1, x0:x1] = 250
    return make_raster(name="scene.tif", width=512, height=512, data=data), make_labels(boxes_px=OBJECTS)


def _images(scene: tuple[Path, Path], cfg: DataConfig) -> list[TrainImage]:
    raster, labels = scene
    return prepare_train_images([ImageSet(images=[str(raster)], labels=str(labels))], cfg)


def _dataset(
    scene: tuple[Path, Path],
    negatives: pd.DataFrame | None = None,
    augment: bool = False,
    n_background: int = 4,
    cfg: DataConfig | None = None,
) -> ChipDataset:
    cfg = cfg or DataConfig()
    return ChipDataset(_images(scene, cfg), negatives, n_background, TILE, cfg, augment, seed=3)


def _assert_boxes_on_bright_pixels(image: torch.Tensor, boxes: torch.Tensor) -> None:
    bright = image[0] > 0.5
    for x0, y0, x1, y1 in boxes.round().int().tolist():
        assert bright[y0:y1, x0:x1].all(), (x0, y0, x1, y1)
    covered = torch.zeros_like(bright)
    for x0, y0, x1, y1 in boxes.round().int().tolist():
        covered[y0:y1, x0:x1] = True
    assert not (bright & ~covered).any()  # no bright pixel left unlabelled (all objects fully visible here)


def test_prepare_train_images_needs_an_image(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no image matched"):
        prepare_train_images([ImageSet(images=[str(tmp_path / "*.tif")])], DataConfig())
    with pytest.raises(DataError, match="no training images"):
        prepare_train_images([], DataConfig())


def test_positive_chips_carry_every_object_inside(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene, n_background=0)
    assert ds.n_positive == len(ds) and set(ds.kinds) == {"pos"}
    seen = 0
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.shape == (3, TILE, TILE) and image.dtype == torch.float32
        assert target["boxes"].dtype == torch.float32 and target["labels"].dtype == torch.int64
        assert len(target["boxes"]) >= 1 and (target["labels"] == 1).all()
        win = ds.window(i)
        full = [
            b
            for b in OBJECTS
            if win.col_off <= b[0]
            and b[2] <= win.col_off + TILE
            and win.row_off <= b[1]
            and b[3] <= win.row_off + TILE
        ]
        seen += len(full)
        if len(full) == len(target["boxes"]):
            _assert_boxes_on_bright_pixels(image, target["boxes"])
    assert seen >= len(OBJECTS)


def test_negative_chips_keep_ground_truth_and_move_around(scene: tuple[Path, Path]) -> None:
    raster, _ = scene
    # a bank negative right next to the first vehicle: its chip must label that vehicle
    neg = pd.DataFrame(
        {"image": [str(raster)], "px_xmin": [60.0], "px_ymin": [50.0], "px_xmax": [70.0], "px_ymax": [60.0]}
    )
    ds = _dataset(scene, negatives=neg, n_background=0)
    (i,) = np.flatnonzero(ds.kinds == "neg")
    offsets = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        win = ds.window(i)
        offsets.add((win.col_off, win.row_off))
        assert (
            win.col_off <= 60 and 70 <= win.col_off + TILE and win.row_off <= 50 and 60 <= win.row_off + TILE
        )
        image, target = ds[i]
        inside = (win.col_off <= 40) and (win.row_off <= 50) and 52 <= win.col_off + TILE
        if inside:
            assert len(target["boxes"]) >= 1
            _assert_boxes_on_bright_pixels(image, target["boxes"])
    assert len(offsets) > 1  # the negative is not always at the same place in its chip
    ds.set_epoch(2)
    a = ds[i]
    ds.set_epoch(2)
    torch.testing.assert_close(ds[i][0], a[0])  # deterministic from (seed, index, epoch)


def test_background_chip_without_objects_has_empty_targets(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene, n_background=40)
    empties = 0
    for i in np.flatnonzero(ds.kinds == "bg"):
        _, target = ds[int(i)]
        if len(target["boxes"]) == 0:
            empties += 1
            assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)
    assert empties > 0
    assert ds.n_background == 40


def test_objects_below_min_visible_fraction_are_dropped(scene: tuple[Path, Path]) -> None:
    raster, _ = scene
    # a negative whose chip must end at x 305 or 306, cutting the second vehicle (x 300..316): < 40 % visible
    neg = pd.DataFrame(
        {
            "image": [str(raster)],
            "px_xmin": [178.0],
            "px_ymin": [305.0],
            "px_xmax": [305.0],
            "px_ymax": [318.0],
        }
    )
    for frac, expected in ((0.5, 0), (0.3, 1)):
        ds = _dataset(scene, negatives=neg, n_background=0, cfg=DataConfig(min_visible_fraction=frac))
        (i,) = np.flatnonzero(ds.kinds == "neg")
        for epoch in range(4):
            ds.set_epoch(epoch)
            win = ds.window(i)
            assert win.col_off + TILE in (305, 306) and win.row_off <= 310 and 318 <= win.row_off + TILE
            _, target = ds[i]
            assert target["boxes"].shape == (expected, 4)


def test_no_positive_chip_is_a_training_error(
    make_raster: Callable[..., Path], make_labels: Callable[..., Path]
) -> None:
    raster = make_raster(name="empty.tif")
    labels = make_labels(name="none.gpkg", geoms=[], field=None)
    images = prepare_train_images([ImageSet(images=[str(raster)], labels=str(labels))], DataConfig())
    with pytest.raises(
        TrainingError,
        match=r"no positive training chips: 1 training image\(s\) with 0 label\(s\).*background=5",
    ):
        ChipDataset(images, None, 5, TILE, DataConfig(), False, 0)


@pytest.mark.parametrize("hflip", [False, True])
@pytest.mark.parametrize("vflip", [False, True])
@pytest.mark.parametrize("turns", [0, 1, 2, 3])
def test_augmentation_keeps_boxes_on_their_pixels(hflip: bool, vflip: bool, turns: int) -> None:
    image = torch.full((3, 64, 64), 0.05)
    boxes = torch.tensor([[5.0, 10.0, 17.0, 14.0], [40.0, 30.0, 44.0, 60.0]])
    for x0, y0, x1, y1 in boxes.int().tolist():
        image[:, y0:y1, x0:x1] = 0.9
    aug = ChipAugment()
    out_img, out_boxes = aug.geometric(image, boxes, hflip, vflip, turns)
    assert out_img.shape == image.shape and out_boxes.shape == boxes.shape
    _assert_boxes_on_bright_pixels(out_img, out_boxes)
    areas = (out_boxes[:, 2] - out_boxes[:, 0]) * (out_boxes[:, 3] - out_boxes[:, 1])
    torch.testing.assert_close(areas, torch.tensor([48.0, 120.0]))


def test_augmented_dataset_chips_stay_consistent(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene, augment=True, n_background=0)
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, target = ds[i]
            assert 0.0 <= image.min() and image.max() <= 1.0
            win = ds.window(i)
            full = [
                b
                for b in OBJECTS
                if win.col_off <= b[0]
                and b[2] <= win.col_off + TILE
                and win.row_off <= b[1]
                and b[3] <= win.row_off + TILE
            ]
            if len(full) == len(target["boxes"]):
                _assert_boxes_on_bright_pixels(image, target["boxes"])


def test_collate_chips_gives_lists(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene)
    images, targets = collate_chips([ds[0], ds[len(ds) - 1]])
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
    assert targets[1]["boxes"].shape[1] == 4


def _kinds_dataset(n_pos: int, n_neg: int, n_bg: int) -> ChipDataset:
    """A ChipDataset shell with only kinds (the sampler needs nothing else)."""
    ds = ChipDataset.__new__(ChipDataset)
    ds.kinds = np.array(["pos"] * n_pos + ["neg"] * n_neg + ["bg"] * n_bg, dtype=object)
    ds.weights = np.ones(len(ds.kinds))
    return ds


def test_ratio_sampler_fraction_ranks_and_determinism() -> None:
    ds = _kinds_dataset(30, 10, 6)
    sampler = RatioBatchSampler(ds, batch_size=8, neg_fraction=0.25, num_batches=50, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 50
    for b in batches:
        assert len(b) == 8 and sum(ds.kinds[i] != "pos" for i in b) == 2
    assert batches == list(RatioBatchSampler(ds, batch_size=8, neg_fraction=0.25, num_batches=50, seed=1))
    # every positive is seen about equally often (shuffled passes)
    counts = np.bincount([i for b in batches for i in b if ds.kinds[i] == "pos"], minlength=30)
    assert counts.min() >= 9 and counts.max() <= 11
    r0 = list(RatioBatchSampler(ds, 8, 0.25, num_batches=5, seed=1, rank=0, world_size=2))
    r1 = list(RatioBatchSampler(ds, 8, 0.25, num_batches=5, seed=1, rank=1, world_size=2))
    for a, b in zip(r0, r1, strict=True):
        pos_a = {i for i in a if ds.kinds[i] == "pos"}
        pos_b = {i for i in b if ds.kinds[i] == "pos"}
        assert not pos_a & pos_b  # disjoint shares of each global batch


def test_ratio_sampler_falls_back_without_negatives() -> None:
    only_pos = _kinds_dataset(12, 0, 0)
    b = next(iter(RatioBatchSampler(only_pos, 4, 0.5, seed=0)))  # infinite stream
    assert len(b) == 4 and all(only_pos.kinds[i] == "pos" for i in b)
    with_bg = _kinds_dataset(12, 0, 5)
    b = next(iter(RatioBatchSampler(with_bg, 4, 0.5, num_batches=1)))
    assert sum(with_bg.kinds[i] == "bg" for i in b) == 2


def test_ratio_sampler_gives_the_bank_its_share() -> None:
    ds = _kinds_dataset(30, 3, 60)  # a small bank among many background chips
    batches = list(RatioBatchSampler(ds, 8, 0.5, num_batches=40, seed=2, bank_fraction=0.5))
    for b in batches:
        kinds = [ds.kinds[i] for i in b]
        assert kinds.count("pos") == 4 and kinds.count("neg") == 2 and kinds.count("bg") == 2
    # None: in proportion to the counts (3 of 63 negatives -> round(4 * 3/63) = 0 bank slots)
    b = next(iter(RatioBatchSampler(ds, 8, 0.5, num_batches=1, seed=2, bank_fraction=None)))
    assert sum(ds.kinds[i] == "neg" for i in b) == 0
    # without background the bank takes every negative slot
    only_bank = _kinds_dataset(10, 5, 0)
    b = next(iter(RatioBatchSampler(only_bank, 8, 0.5, num_batches=1, bank_fraction=0.25)))
    assert sum(only_bank.kinds[i] == "neg" for i in b) == 4
    with pytest.raises(ValueError, match="bank_fraction"):
        RatioBatchSampler(ds, 8, 0.5, bank_fraction=1.5)


def _bank_then_background(n_pos: int, n_bg: int, n_neg: int) -> ChipDataset:
    """A kinds-only shell in ChipDataset's own order: positives, background, then bank negatives."""
    ds = ChipDataset.__new__(ChipDataset)
    ds.kinds = np.array(["pos"] * n_pos + ["bg"] * n_bg + ["neg"] * n_neg, dtype=object)
    ds.weights = np.ones(len(ds.kinds))
    return ds


def test_ratio_sampler_adds_bank_chips_on_top_of_the_mix_without_a_bank() -> None:
    without = list(RatioBatchSampler(_bank_then_background(30, 60, 0), 8, 0.5, num_batches=60, seed=4, bank_chips=2))
    ds = _bank_then_background(30, 60, 5)
    with_bank = list(RatioBatchSampler(ds, 8, 0.5, num_batches=60, seed=4, bank_chips=2))
    for a, b in zip(without, with_bank, strict=True):
        kinds = [ds.kinds[i] for i in b]
        assert (kinds.count("pos"), kinds.count("bg"), kinds.count("neg")) == (4, 4, 2)
        assert [i for i in b if ds.kinds[i] != "neg"] == a  # the same positives and background, step by step
    # every bank chip is drawn, in passes
    counts = np.bincount([i - 90 for b in with_bank for i in b if ds.kinds[i] == "neg"], minlength=5)
    assert counts.min() == counts.max() == 24
    # a bank of another size or content changes none of the other draws either
    other = list(RatioBatchSampler(_bank_then_background(30, 60, 40), 8, 0.5, num_batches=60, seed=4, bank_chips=3))
    assert [[i for i in b if i < 90] for b in other] == without
    with pytest.raises(ValueError, match="bank_chips"):
        RatioBatchSampler(ds, 8, 0.5, bank_chips=-1)


def test_ratio_sampler_positives_do_not_depend_on_the_bank_in_its_share_either() -> None:
    small = list(RatioBatchSampler(_bank_then_background(30, 60, 3), 8, 0.5, num_batches=40, seed=6, bank_fraction=0.5))
    large = list(RatioBatchSampler(_bank_then_background(30, 60, 50), 8, 0.5, num_batches=40, seed=6,
                                   bank_fraction=0.5))
    assert [[i for i in b if i < 90] for b in small] == [[i for i in b if i < 90] for b in large]


def test_background_chips_and_loss_weights_do_not_depend_on_the_bank(scene: tuple[Path, Path]) -> None:
    raster, _ = scene
    neg = pd.DataFrame(
        {"image": [str(raster)] * 2, "px_xmin": [60.0, 200.0], "px_ymin": [50.0, 200.0],
         "px_xmax": [70.0, 210.0], "px_ymax": [60.0, 210.0]}
    )
    cfg = DataConfig()
    plain = ChipDataset(_images(scene, cfg), None, 6, TILE, cfg, True, seed=3)
    banked = ChipDataset(_images(scene, cfg), neg, 6, TILE, cfg, True, seed=3, bank_loss_weight=0.25)
    assert list(banked.kinds[: len(plain)]) == list(plain.kinds)  # the bank comes last
    for i in range(len(plain)):
        assert banked.window(i) == plain.window(i)
        torch.testing.assert_close(banked[i][0], plain[i][0])
        assert "loss_weight" not in plain[i][1] and float(banked[i][1]["loss_weight"]) == 1.0
    for i in np.flatnonzero(banked.kinds == "neg"):
        assert float(banked[int(i)][1]["loss_weight"]) == 0.25


def test_pool_background_chips_come_from_the_pool_rasters_only(
    scene: tuple[Path, Path], make_raster: Callable[..., Path]
) -> None:
    pool_path = make_raster(name="pool.tif", width=300, height=260)
    cfg = DataConfig()
    pool = prepare_train_images([ImageSet(images=[str(pool_path)])], cfg)
    ds = ChipDataset(_images(scene, cfg), None, 3, TILE, cfg, False, seed=3, negative_images=pool, pool_background=5)
    bg = np.flatnonzero(ds.kinds == "bg")
    sources = [Path(ds.images[ds._img[i]].path).name for i in bg]
    assert sources == ["scene.tif"] * 3 + ["pool.tif"] * 5
    for i in bg[3:]:
        win = ds.window(int(i))
        assert win.col_off + win.width <= 300 and win.row_off + win.height <= 260
        image, target = ds[int(i)]
        assert image.shape == (3, TILE, TILE) and target["boxes"].shape == (0, 4)
    # without a pool, the same training background
    plain = ChipDataset(_images(scene, cfg), None, 3, TILE, cfg, False, seed=3)
    assert [plain.window(int(i)) for i in np.flatnonzero(plain.kinds == "bg")] == [ds.window(int(i)) for i in bg[:3]]


def test_ratio_sampler_repeats_hard_positive_chips_by_the_factor() -> None:
    ds = _kinds_dataset(20, 0, 10)
    ds.repeats = np.ones(len(ds.kinds), dtype=np.int64)
    ds.repeats[:4] = 3  # chips 0..3 hold hard positives, factor 3
    batches = list(RatioBatchSampler(ds, 8, 0.5, num_batches=280, seed=5))  # 1120 positive draws = 40 passes of 28
    counts = np.bincount([i for b in batches for i in b if ds.kinds[i] == "pos"], minlength=20)
    assert counts[:4].tolist() == [120] * 4  # 3 per pass
    assert counts[4:20].tolist() == [40] * 16  # 1 per pass: exactly the factor apart
    for b in batches:  # a chip may repeat across batches, never inside one
        assert len(set(b)) == len(b)


def test_mark_hard_positives_marks_chips_holding_the_centre(scene: tuple[Path, Path]) -> None:
    ds = _dataset(scene)
    pos = np.flatnonzero(ds.kinds == "pos")
    win = ds._win[pos[0]]
    cx, cy = win.col_off + 10, win.row_off + 10  # only inside chips covering this corner area
    path = str(ds.images[ds._img[pos[0]]].path)
    n = ds.mark_hard_positives({path: np.array([[cx - 3, cy - 3, cx + 3, cy + 3]])}, 4)
    assert n >= 1
    marked = np.flatnonzero(ds.repeats == 4)
    assert pos[0] in marked and len(marked) == n
    for i in marked:
        w = ds._win[i]
        assert w.col_off <= cx < w.col_off + w.width and w.row_off <= cy < w.row_off + w.height
    assert ds.mark_hard_positives({}, 4) == 0 and (ds.repeats == 1).all()
