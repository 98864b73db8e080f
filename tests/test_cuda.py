"""The GPU path: CUDA detections equal CPU float32 ones, AMP training, device-side uint8 scaling, SyncBatchNorm keys.

Marker ``cuda``; every test is skipped (with the reason) on a machine without a CUDA GPU, so
``pytest -m cuda`` passes on a CPU-only machine and checks the GPU path where one is lent.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torchvision.ops import box_iou

from hem_bootstrap.config import ExperimentConfig
from hem_bootstrap.data.tiles import scale_tiles
from hem_bootstrap.model.checkpoints import load_checkpoint
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.infer import DetectStats, detect

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible (torch.cuda.is_available() is False)"),
]


def _cfg(device: str, amp: bool = False, amp_dtype: str = "bf16", workers: int = 0) -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.tiling.tile_size, cfg.tiling.overlap = 256, 64
    cfg.runtime.device, cfg.runtime.batch_size = device, 4
    cfg.runtime.amp, cfg.runtime.amp_dtype = amp, amp_dtype  # type: ignore[assignment]
    cfg.runtime.detect_workers = workers
    cfg.model.fast_path = "none" if device == "cpu" else "channels_last"
    return cfg


def _scan(ckpt: Path, image: Path, cfg: ExperimentConfig) -> tuple[pd.DataFrame, DetectStats]:
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(ckpt, model)
    stats = DetectStats()
    frames = list(detect(model, [image], cfg.data, cfg.tiling, cfg.model, cfg.runtime,
                         torch.device(cfg.runtime.device), stats=stats, progress=False))
    return pd.concat(frames, ignore_index=True), stats


def _px(frame: pd.DataFrame) -> torch.Tensor:
    return torch.tensor(frame[["px_xmin", "px_ymin", "px_xmax", "px_ymax"]].to_numpy(dtype=np.float64))


@pytest.mark.parametrize("amp_dtype", ["fp16", "bf16"])
def test_cuda_detections_equal_cpu_float32(trained_small_model: Path, synth_scenes: Path, amp_dtype: str) -> None:
    ref, _ = _scan(trained_small_model, synth_scenes / "test.tif", _cfg("cpu"))
    gpu, stats = _scan(trained_small_model, synth_scenes / "test.tif", _cfg("cuda", amp=True, amp_dtype=amp_dtype))
    conf = ref[ref["score"] >= 0.5]
    best, j = box_iou(_px(conf), _px(gpu)).max(dim=1)
    assert len(conf) > 10 and float((best >= 0.9).float().mean()) >= 0.95, best
    diff = (torch.tensor(conf["score"].to_numpy()) - torch.tensor(gpu["score"].to_numpy())[j]).abs()
    assert float(diff[best >= 0.9].max()) <= 0.02
    assert stats.tiles_run > 0 and stats.fast_path == "channels_last"


def test_reader_workers_on_cuda_give_the_same_detections(trained_small_model: Path, synth_scenes: Path) -> None:
    one, _ = _scan(trained_small_model, synth_scenes / "test.tif", _cfg("cuda", workers=0))
    many, _ = _scan(trained_small_model, synth_scenes / "test.tif", _cfg("cuda", workers=2))
    cols = ["score", "label", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    pd.testing.assert_frame_equal(one[cols].reset_index(drop=True), many[cols].reset_index(drop=True))


def test_uint8_tiles_scaled_on_the_device_equal_cpu_scaling() -> None:
    gen = torch.Generator().manual_seed(0)
    tiles = torch.randint(0, 256, (4, 3, 64, 64), generator=gen, dtype=torch.uint8)
    lo, span = torch.tensor([[3.0, 5.0, 7.0]] * 4), torch.tensor([[200.0, 180.0, 240.0]] * 4)
    mask = torch.rand(4, 64, 64, generator=gen) > 0.1
    cpu = scale_tiles(tiles, lo, span, mask)
    gpu = scale_tiles(tiles.pin_memory().to("cuda", non_blocking=True), lo, span, mask).cpu()
    assert torch.equal(cpu, gpu)  # bit for bit


def test_training_step_under_amp_with_the_grad_scaler() -> None:
    from hem_bootstrap.model.train import train

    cfg = _cfg("cuda", amp=True, amp_dtype="fp16")
    model = build_detector(cfg.model, cfg.num_classes, 128)
    gen = torch.Generator().manual_seed(0)
    data = [(torch.rand(3, 128, 128, generator=gen), {"boxes": torch.tensor([[20.0, 20.0, 40.0, 36.0]]),
                                                      "labels": torch.tensor([1])}) for _ in range(8)]
    cfg.train.batch_size, cfg.train.warmup_steps = 4, 0
    result = train(model, data, cfg.train, cfg.runtime, 3, progress=False)  # type: ignore[arg-type]
    assert result.steps == 3 and all(np.isfinite(result.losses))


def test_sync_batchnorm_keeps_checkpoint_keys_plain(tmp_path: Path) -> None:
    from hem_bootstrap.model.checkpoints import save_checkpoint
    from hem_bootstrap.model.train import prepare_ddp_model

    cfg = _cfg("cuda")
    plain = build_detector(cfg.model, cfg.num_classes, 128)
    keys = list(plain.state_dict())
    synced = prepare_ddp_model(build_detector(cfg.model, cfg.num_classes, 128).cuda(), torch.device("cuda"), world=2)
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules())
    save_checkpoint(tmp_path / "m.pt", synced)
    load_checkpoint(tmp_path / "m.pt", plain)  # strict: the same keys
    assert list(torch.load(tmp_path / "m.pt", map_location="cpu", weights_only=False)["model"]) == keys


def test_one_process_nccl_torchrun_of_detect_equals_a_plain_run(trained_small_model: Path, synth_scenes: Path,
                                                                tmp_path: Path) -> None:
    """``hem detect`` under torchrun (one process, NCCL process group) writes what a plain run writes."""
    import os
    import subprocess
    import sys

    import geopandas as gpd

    args = ["-m", "hem_bootstrap.cli", "detect", str(trained_small_model), str(synth_scenes / "test.tif"),
            "--set", "runtime.device=cuda", "--set", "model.fast_path=channels_last"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    plain = subprocess.run([sys.executable, *args, "--out", str(tmp_path / "plain.gpkg")],
                           capture_output=True, text=True, env=env, timeout=600)
    assert plain.returncode == 0, plain.stderr[-3000:]
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          *args, "--out", str(tmp_path / "torchrun.gpkg")],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "backend nccl" in run.stderr, run.stderr[-3000:]
    a, b = (gpd.read_file(tmp_path / f"{n}.gpkg") for n in ("plain", "torchrun"))
    cols = ["label", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    a, b = (f.sort_values(cols, kind="stable").reset_index(drop=True) for f in (a, b))
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a[cols].to_numpy(float), b[cols].to_numpy(float), atol=1e-3, rtol=0)
    np.testing.assert_allclose(a["score"].to_numpy(float), b["score"].to_numpy(float), atol=1e-5, rtol=0)
