"""The inference engine: a tiled scan equals a whole-image run up to seam merging; map coordinates; output."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from torchvision.ops import box_iou

from hem_bootstrap.config import ExperimentConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.windows import map_to_pixel_boxes
from hem_bootstrap.model.detectors import build_detector, load_checkpoint
from hem_bootstrap.model.infer import DetectStats, detect, write_detections


def _cfg(tile: int = 256, overlap: int = 64) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.tiling.tile_size = tile
    cfg.tiling.overlap = overlap
    cfg.runtime.workers = 0
    cfg.runtime.batch_size = 4
    cfg.runtime.device = "cpu"
    return cfg


def _model(ckpt: Path, cfg: ExperimentConfig) -> torch.nn.Module:
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(ckpt, model)
    return model.eval()


def _scan(ckpt: Path, image: Path, cfg: ExperimentConfig, stats: DetectStats | None = None) -> gpd.GeoDataFrame:
    frames = list(
        detect(_model(ckpt, cfg), [image], cfg.data, cfg.tiling, cfg.model, cfg.runtime, torch.device("cpu"),
               stats=stats, progress=False)
    )
    assert len(frames) >= 1 and all(f["image"].eq(str(image)).all() for f in frames)
    return gpd.GeoDataFrame(pd.concat(frames, ignore_index=True), crs=frames[0].crs)  # one per row band


def _px(frame: gpd.GeoDataFrame, transform: object) -> torch.Tensor:
    return torch.tensor(map_to_pixel_boxes(np.array([g.bounds for g in frame.geometry]), transform))


@pytest.fixture(scope="module")
def scan(trained_small_model: Path, synth_scenes: Path) -> tuple[gpd.GeoDataFrame, DetectStats]:
    stats = DetectStats()
    return _scan(trained_small_model, synth_scenes / "test.tif", _cfg(), stats), stats


@pytest.fixture(scope="module")
def whole(trained_small_model: Path, synth_scenes: Path) -> dict[str, torch.Tensor]:
    """The same model run once on the whole 768 px image (no tiling)."""
    cfg = _cfg()
    with rasterio.open(synth_scenes / "test.tif") as src:
        arr = torch.from_numpy(src.read().astype(np.float32) / 255.0)
    whole_cfg = cfg.model.model_copy(update={"detections_per_img": 2000})  # the tiles give 16 x 100
    whole_model = build_detector(whole_cfg, cfg.num_classes, 768)
    load_checkpoint(trained_small_model, whole_model)
    with torch.inference_mode():
        return whole_model.eval()([arr])[0]


def test_tiled_scan_matches_whole_image_run(scan, whole, synth_scenes: Path) -> None:  # noqa: ANN001
    tiled, stats = scan
    assert stats.tiles_total == 16 and stats.tiles_skipped == 0  # 768 px, tile 256, overlap 64 -> 4 x 4
    with rasterio.open(synth_scenes / "test.tif") as src:
        transform = src.transform
    # Compare per labelled vehicle (robust to NMS chains among near-duplicate boxes of a
    # briefly trained model): its best-matching detection's score in both runs. The FCOS head
    # normalises with GroupNorm over its whole input, so scores depend a little on what else is
    # in the tile and exact equality with a whole-image run is not expected (measured 33/37).
    labels = gpd.read_file(synth_scenes / "test_labels.gpkg")
    lab = torch.tensor(map_to_pixel_boxes(np.array([g.envelope.bounds for g in labels.geometry]), transform))
    t_all = _px(tiled, transform)
    t_scores = torch.tensor(tiled["score"].to_numpy())

    def best_score(boxes: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        hit = box_iou(lab, boxes.double()) >= 0.5
        return torch.where(hit, scores[None, :].double(), torch.zeros(1, dtype=torch.float64)).max(dim=1).values

    s_whole = best_score(whole["boxes"], whole["scores"])
    s_tiled = best_score(t_all, t_scores)
    assert int((s_whole >= 0.5).sum()) >= 5, "the trained model should find vehicles"
    # a vehicle found with confidence by one run is found by the other (with a margin for the
    # GroupNorm context effect), and most scores agree closely
    assert float((s_tiled[s_whole >= 0.6] >= 0.4).float().mean()) >= 0.9
    assert float((s_whole[s_tiled >= 0.6] >= 0.4).float().mean()) >= 0.9
    assert float(((s_whole - s_tiled).abs() <= 0.2).float().mean()) >= 0.75
    t_boxes = _px(tiled[tiled["score"] >= 0.5], transform)
    # merged: no object reported twice
    self_iou = box_iou(t_boxes, t_boxes).fill_diagonal_(0)
    assert float(self_iou.max()) < 0.5


def test_boxes_land_on_labels_in_map_coordinates(scan, synth_scenes: Path) -> None:  # noqa: ANN001
    tiled, _ = scan
    labels = gpd.read_file(synth_scenes / "test_labels.gpkg")
    assert tiled.crs == labels.crs
    conf = tiled[tiled["score"] >= 0.5]
    lab = torch.tensor(np.array([g.envelope.bounds for g in labels.geometry]))
    det = torch.tensor(np.array([g.bounds for g in conf.geometry]))
    # in map coordinates (metres), confident detections near a labelled vehicle sit on it (a
    # shift by a tile offset or a flipped axis would leave them beside it); the briefly trained
    # model also fires elsewhere, which is not what this test is about
    best = box_iou(det, lab).max(dim=1).values
    near = best > 0.1
    assert int(near.sum()) >= 5
    assert float((best[near] >= 0.5).float().mean()) >= 0.7


def test_object_across_seam_reported_once(scan, whole, synth_scenes: Path) -> None:  # noqa: ANN001
    tiled, _ = scan
    labels = gpd.read_file(synth_scenes / "test_labels.gpkg")
    with rasterio.open(synth_scenes / "test.tif") as src:
        transform = src.transform
    lab_px = torch.tensor(map_to_pixel_boxes(np.array([g.envelope.bounds for g in labels.geometry]), transform))
    # tiles start at 0, 192, 384 and 512 (the last moved back inside): seams where a tile ends inside
    seams = [256, 448, 640]
    crossing = [i for i, b in enumerate(lab_px.tolist()) if any(b[0] < s < b[2] or b[1] < s < b[3] for s in seams)]
    assert len(crossing) >= 2, "the scene should have vehicles across tile seams"
    t_conf = _px(tiled[tiled["score"] >= 0.5], transform)
    w_conf = whole["boxes"][whole["scores"] >= 0.5].double()
    found = 0
    for i in crossing:
        n_tiled = int((box_iou(lab_px[i : i + 1], t_conf)[0] >= 0.5).sum())
        n_whole = int((box_iou(lab_px[i : i + 1], w_conf)[0] >= 0.5).sum())
        # merging adds no copy that the whole-image run (no seams at all) does not have
        assert n_tiled <= max(1, n_whole), f"vehicle {i} across a seam reported {n_tiled} times ({n_whole} unseamed)"
        found += n_tiled > 0
    assert found >= 1


def test_nodata_tiles_never_reach_the_model(trained_small_model: Path, tmp_path: Path) -> None:
    path = tmp_path / "half.tif"
    data = np.full((3, 256, 768), 120, np.uint8)
    data[:, :, 512:] = 0
    with rasterio.open(path, "w", driver="GTiff", width=768, height=256, count=3, dtype="uint8", nodata=0,
                       crs="EPSG:32633", transform=rasterio.transform.from_origin(500000, 5400000, 0.15, 0.15)) as dst:
        dst.write(data)
    stats = DetectStats()
    cfg = _cfg(overlap=0)
    _ = list(detect(_model(trained_small_model, cfg), [path], cfg.data, cfg.tiling, cfg.model, cfg.runtime,
                    torch.device("cpu"), stats=stats, progress=False))
    assert stats.tiles_total == 3 and stats.tiles_skipped == 1 and stats.tiles_run == 2


def test_streaming_outputs(scan, tmp_path: Path) -> None:  # noqa: ANN001
    tiled, _ = scan
    n, layers = write_detections(iter([tiled]), tmp_path / "d.gpkg")
    back = gpd.read_file(tmp_path / "d.gpkg", layer=layers[0])
    assert n == len(tiled) == len(back) and back.crs == tiled.crs
    write_detections(iter([tiled]), tmp_path / "d.geojson")
    assert len(gpd.read_file(tmp_path / "d.geojson")) == len(tiled)
    write_detections(iter([tiled]), tmp_path / "d.json")
    coco = json.loads((tmp_path / "d.json").read_text())
    assert len(coco["annotations"]) == len(tiled)
    with pytest.raises(DataError, match="unsupported output format"):
        write_detections(iter([tiled]), tmp_path / "d.csv")
    assert not list(tmp_path.glob(".*tmp*"))  # nothing half-written left behind


def test_bf16_fast_path_keeps_detections(scan, trained_small_model: Path, synth_scenes: Path) -> None:  # noqa: ANN001
    from hem_bootstrap.model.infer import resolve_fast_path

    cfg = _cfg()
    cpu = torch.device("cpu")
    assert resolve_fast_path(cfg.model.model_copy(update={"fast_path": "none"}), cpu) == "none"
    assert resolve_fast_path(cfg.model, cpu) in ("bf16", "channels_last")  # auto: by the CPU's bf16 support
    out = {}
    for mode in ("none", "bf16"):
        cfg.model.fast_path = mode  # type: ignore[assignment]
        out[mode] = _scan(trained_small_model, synth_scenes / "test.tif", cfg)
    ref, fast = (f[f["score"] >= 0.5] for f in (out["none"], out["bf16"]))
    transform = rasterio.open(synth_scenes / "test.tif").transform
    iou = box_iou(_px(ref, transform), _px(out["bf16"], transform))
    best, j = iou.max(dim=1)
    assert len(ref) > 10 and (best >= 0.9).float().mean() >= 0.95  # the same boxes, to bf16 precision
    diffs = (torch.tensor(ref["score"].to_numpy()) - torch.tensor(out["bf16"]["score"].to_numpy())[j]).abs()
    assert float(diffs[best >= 0.9].max()) < 0.05
    assert abs(len(fast) - len(ref)) <= max(2, len(ref) // 20)


def test_reader_workers_give_the_same_detections(scan, trained_small_model: Path, synth_scenes: Path) -> None:  # noqa: ANN001
    """Tiles read by DataLoader worker processes (as on CUDA) or in the model's process (CPU default) agree."""
    from hem_bootstrap.model.infer import detect_workers

    cfg = _cfg()
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert detect_workers(cfg.runtime.model_copy(update={"workers": 3}), cpu) == 0
    assert detect_workers(cfg.runtime.model_copy(update={"workers": 3}), gpu) == 3
    assert detect_workers(cfg.runtime.model_copy(update={"detect_workers": 2}), cpu) == 2
    cfg.runtime.detect_workers = 2
    in_workers = _scan(trained_small_model, synth_scenes / "test.tif", cfg)
    tiled, _ = scan
    cols = ["score", "label", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    pd.testing.assert_frame_equal(in_workers[cols].reset_index(drop=True), tiled[cols].reset_index(drop=True))
