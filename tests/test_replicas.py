"""CPU model replicas: the same detections as the model in the scan's process, when they start, bad reads."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
from pathlib import Path
from types import FrameType

import numpy as np
import pandas as pd
import pytest
import rasterio
import torch
from torchvision.ops import box_iou

from hem_bootstrap.config import ExperimentConfig, RuntimeConfig
from hem_bootstrap.errors import DataError, ModelError
from hem_bootstrap.model.checkpoints import load_checkpoint
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.infer import DetectStats, detect
from hem_bootstrap.model.replicas import MAX_AUTO_REPLICAS, MIN_TILES_PER_REPLICA, raise_failed, replica_count

BOX = ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]


def _cfg(replicas: int | None, fast_path: str = "none") -> ExperimentConfig:
    cfg = ExperimentConfig()
    cfg.tiling.overlap = 64
    cfg.runtime.workers = 0
    cfg.runtime.batch_size = 4
    cfg.runtime.device = "cpu"
    cfg.runtime.cpu_replicas = replicas
    cfg.model.fast_path = fast_path  # type: ignore[assignment]
    return cfg


def _scan(ckpt: Path, images: list[Path], cfg: ExperimentConfig, stats: DetectStats) -> pd.DataFrame:
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(ckpt, model)
    frames = list(detect(model.eval(), images, cfg.data, cfg.tiling, cfg.model, cfg.runtime, torch.device("cpu"),
                         stats=stats, progress=False))
    return pd.concat(frames, ignore_index=True)


@pytest.mark.parametrize("fast_path", ["none", "bf16", "onnxruntime"])
def test_replicas_give_the_detections_of_the_scan_process(trained_small_model: Path, synth_scenes: Path,
                                                         fast_path: str) -> None:
    """Two single-threaded replicas over two rasters: the rows of the model run in the scan's process.

    Compared row to row by box, not by position: one thread against two moves scores by float
    rounding (3e-7 in float32, 1e-5 in bf16 on an AVX-512 bf16 Xeon), enough to swap the order of
    two near-tied rows on some CPU.
    """
    images = [synth_scenes / "test.tif", synth_scenes / "pool.tif"]
    here, there = DetectStats(), DetectStats()
    ref = _scan(trained_small_model, images, _cfg(0, fast_path), here)
    got = _scan(trained_small_model, images, _cfg(2, fast_path), there)
    assert here.replicas == 0 and there.replicas == 2 and there.fast_path == fast_path
    assert there.tiles_run == here.tiles_run == 32 and there.tiles_total == here.tiles_total
    assert there.tiles_skipped == here.tiles_skipped and there.bad_rasters == here.bad_rasters == []
    assert there.model_seconds > 0 and len(ref) > 20
    for image in map(str, images):
        a, b = ref[ref["image"] == image], got[got["image"] == image]
        assert len(a) == len(b) > 0
        iou = box_iou(torch.tensor(a[BOX].to_numpy()), torch.tensor(b[BOX].to_numpy()))
        best, j = iou.max(dim=1)
        assert float(best.min()) >= 0.999, best.min()
        matched = b.iloc[j.numpy()]
        assert (matched["label"].to_numpy() == a["label"].to_numpy()).all()
        score_tol = 1e-3 if fast_path == "bf16" else 1e-4
        assert np.abs(matched["score"].to_numpy() - a["score"].to_numpy()).max() <= score_tol


def test_when_replicas_start(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    auto = RuntimeConfig()
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    long_scan = MIN_TILES_PER_REPLICA * 4
    assert replica_count(auto, cpu, "bf16", long_scan) == 4
    assert replica_count(auto, cpu, "channels_last", long_scan - 1) == 0  # ends before replicas warm up
    assert replica_count(auto, cuda, "channels_last", long_scan) == 0
    assert replica_count(auto, cpu, "onnxruntime", long_scan) == 4  # each replica opens its own session
    assert replica_count(auto, cpu, "compile", long_scan) == 0  # kernels built for the parent's threads
    assert replica_count(auto.model_copy(update={"detect_workers": 2}), cpu, "none", long_scan) == 0
    assert replica_count(auto.model_copy(update={"cpu_replicas": 3}), cpu, "none", 1) == 3  # asked for: always
    assert replica_count(auto.model_copy(update={"cpu_replicas": 1}), cpu, "none", long_scan) == 0
    monkeypatch.setattr(torch, "get_num_threads", lambda: 64)
    assert replica_count(auto, cpu, "none", 10**6) == MAX_AUTO_REPLICAS
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert replica_count(auto, cpu, "none", 10**6) == 0


def _truncated(path: Path) -> Path:
    rgb = np.random.default_rng(0).integers(0, 255, (3, 512, 512), dtype=np.uint8)
    with rasterio.open(path, "w", driver="GTiff", width=512, height=512, count=3, dtype="uint8", tiled=True,
                       blockxsize=128, blockysize=128, compress="deflate", crs="EPSG:32633",
                       transform=rasterio.transform.from_origin(500000, 5400000, 0.15, 0.15)) as dst:
        dst.write(rgb)
    with open(path, "r+b") as fh:  # the header opens, the last blocks fail mid-scan
        fh.truncate(int(path.stat().st_size * 0.6))
    return path


def test_a_tile_a_replica_cannot_read(trained_small_model: Path, tmp_path: Path) -> None:
    """on_bad_raster fail: one line naming the file, raised in the scan's process; skip: counted, the rest scanned."""
    bad = _truncated(tmp_path / "cut.tif")
    cfg = _cfg(2)
    cfg.tiling.overlap = 0
    cfg.data.on_bad_raster = "fail"
    with pytest.raises(DataError) as err:
        _scan(trained_small_model, [bad], cfg, DetectStats())
    assert "cut.tif" in str(err.value) and "\n" not in str(err.value)
    cfg.data.on_bad_raster = "skip"
    stats = DetectStats()
    list(detect(build_detector(cfg.model, cfg.num_classes, 256).eval(), [bad], cfg.data, cfg.tiling, cfg.model,
                cfg.runtime, torch.device("cpu"), stats=stats, progress=False))
    assert stats.replicas == 2 and stats.tiles_total == 4 and 0 < stats.tiles_skipped < 4
    assert len(stats.bad_rasters) == 1 and "cut.tif" in stats.bad_rasters[0]


def _too_long(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("a scan with replicas hung")


def test_replicas_of_a_parent_with_more_threads_do_not_hang(trained_small_model: Path, synth_scenes: Path) -> None:
    """GNU OpenMP cannot open a parallel region of 2+ threads in a fork of a parent that ran one: one thread each."""
    before = torch.get_num_threads()
    old = signal.signal(signal.SIGALRM, _too_long)
    try:
        torch.set_num_threads(4)
        torch.ones(4_000_000).mul(2).sum()  # the parent's OpenMP pool is now started
        signal.alarm(240)
        stats = DetectStats()
        rows = _scan(trained_small_model, [synth_scenes / "test.tif"], _cfg(2), stats)
        assert stats.replicas == 2 and stats.tiles_run == 16 and len(rows) > 10
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        torch.set_num_threads(before)


def test_a_scan_stopped_early_stops_its_replicas(trained_small_model: Path, synth_scenes: Path) -> None:
    cfg = _cfg(2)
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(trained_small_model, model)
    frames = detect(model.eval(), [synth_scenes / "test.tif", synth_scenes / "pool.tif"], cfg.data, cfg.tiling,
                    cfg.model, cfg.runtime, torch.device("cpu"), progress=False)
    next(frames)
    assert multiprocessing.active_children()  # the replicas, running ahead
    frames.close()
    assert not multiprocessing.active_children()


def test_a_replica_error_is_raised_as_its_own_kind() -> None:
    raise_failed({"detections": []})  # nothing failed
    with pytest.raises(ModelError, match=r"^m.pt: no such model$"):
        raise_failed({"failed": ("ModelError", "m.pt: no such model")})
    with pytest.raises(DataError):
        raise_failed({"failed": ("DataError", "cut.tif: unreadable")})


ABANDONED = """
import sys
from pathlib import Path
import torch
from hem_bootstrap.config import ExperimentConfig
from hem_bootstrap.model.checkpoints import load_checkpoint
from hem_bootstrap.model.detectors import build_detector
from hem_bootstrap.model.infer import detect

cfg = ExperimentConfig()
cfg.runtime.device, cfg.runtime.batch_size, cfg.runtime.cpu_replicas = "cpu", 2, 2
model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
load_checkpoint(Path(sys.argv[1]), model)
frames = detect(model.eval(), [Path(sys.argv[2])], cfg.data, cfg.tiling, cfg.model, cfg.runtime,
                torch.device("cpu"), progress=False)
next(frames)
sys.exit(3)  # the scan is abandoned, its generator still alive when the interpreter exits
"""


def test_a_process_that_abandons_a_scan_still_exits(trained_small_model: Path, synth_scenes: Path) -> None:
    """Replicas ignore SIGTERM, so multiprocessing's exit handler cannot stop them: ours stops them first."""
    proc = subprocess.run([sys.executable, "-c", ABANDONED, str(trained_small_model), str(synth_scenes / "test.tif")],
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]
