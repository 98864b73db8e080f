"""torchrun with 2 CPU processes (gloo): sharded detection, DDP training, the loop, failures.

Each test launches ``python -m torch.distributed.run --standalone --nproc-per-node 2`` for real.
The training and timeout checks run this file itself as the torchrun script (see ``_worker``).
Equality and tolerances are documented in the README section "Scaling out with torchrun".
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from scenes import scene_data

from hem_bootstrap.rundir import RunDir

pytestmark = pytest.mark.distributed

HERE = Path(__file__).resolve()
TIMEOUT_S = 3  # collective timeout of the failure tests
DDP_STEPS = 3
DDP_BATCH = 2  # per rank; the single-process reference uses DDP_BATCH * 2


# ----------------------------------------------------------------------------- launching


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc), *args]


def torchrun(*args: str, cwd: Path, timeout: float = 300, nproc: int = 2) -> subprocess.CompletedProcess[str]:
    """Run a torchrun job (2 processes unless told) to the end; output of every rank captured."""
    return subprocess.run(
        _torchrun_cmd(*args, nproc=nproc), capture_output=True, text=True, timeout=timeout, cwd=cwd, env=_env()
    )


def _ok(proc: subprocess.CompletedProcess[str]) -> None:
    assert proc.returncode == 0, (
        f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    )


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    root = tmp_path_factory.mktemp("scenes")
    for name, seed in (("train", 101), ("pool", 102), ("test", 103)):
        write_scene(root, SceneSpec(size=512, gsd=0.15, seed=seed), name=name)
    return root


def loop_config(scenes: Path, out_dir: Path, name: str, n_rounds: int = 2) -> Path:
    """The tiny loop of ``tests/test_loop.py`` on CPU with 2 workers' worth of threads."""

    tree = {
        "data": scene_data(scenes),
        "tiling": {"tile_size": 256, "overlap": 32},
        "train": {
            "steps": 12,
            "finetune_steps": 6,
            "batch_size": 2,
            "background_chips": 4,
            "warmup_steps": 2,
            "checkpoint_every": 4,
        },
        "mining": {"strategies": [{"name": "per_image_cap", "k": 20}], "review_above": 0.99},
        # float32: bf16 (the auto fast path on CPUs with native bf16) rounds scores to 2-3 digits
        # and its results depend on how tiles are batched, so shards could not equal one process
        "model": {"score_floor": 0.01, "fast_path": "channels_last"},
        "rounds": {"name": name, "out_dir": str(out_dir), "n_rounds": n_rounds, "stop_if_no_new": False},
        "runtime": {"device": "cpu", "workers": 0, "batch_size": 4, "seed": 3, "collective_timeout_s": 120},
    }
    path = out_dir / f"{name}.yaml"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(tree))
    return path


@pytest.fixture(scope="module")
def dist_run(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-round ``hem run`` under torchrun (2 CPU ranks); returns the run directory."""
    root = tmp_path_factory.mktemp("dist_run")
    cfg = loop_config(scenes, root / "runs", "ddp")
    t0 = time.perf_counter()
    proc = torchrun("-m", "hem_bootstrap.cli", "run", str(cfg), cwd=root, timeout=900)
    _ok(proc)
    print(f"torchrun hem run: {time.perf_counter() - t0:.1f} s")
    return root / "runs" / "ddp"


# ------------------------------------------------------------------------------- helpers


def _sorted_dets(frame: pd.DataFrame) -> pd.DataFrame:
    cols = ["image", "label", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    frame = pd.DataFrame(frame).assign(image=lambda f: f["image"].map(lambda p: Path(p).name))
    return frame.sort_values(cols, kind="stable").reset_index(drop=True)


def assert_same_detections(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Same boxes (to 1e-3 px), labels, windows and images; scores within 1e-5."""
    a, b = _sorted_dets(got), _sorted_dets(want)
    assert len(a) == len(b) > 0
    assert a["image"].tolist() == b["image"].tolist()
    np.testing.assert_array_equal(a["label"].to_numpy(), b["label"].to_numpy())
    px = ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    np.testing.assert_allclose(a[px].to_numpy(float), b[px].to_numpy(float), atol=1e-3, rtol=0)
    win = ["win_col", "win_row", "win_w", "win_h"]
    np.testing.assert_array_equal(a[win].to_numpy(), b[win].to_numpy())
    np.testing.assert_allclose(a["score"].to_numpy(float), b["score"].to_numpy(float), atol=1e-5, rtol=0)


def single_detect(cfg_path: Path, model_path: Path, images: list[Path]) -> gpd.GeoDataFrame:
    """One process, no process group: the reference output."""
    from hem_bootstrap.config import load_config
    from hem_bootstrap.model.checkpoints import load_checkpoint
    from hem_bootstrap.model.detectors import build_detector
    from hem_bootstrap.model.infer import detect

    cfg = load_config(cfg_path)
    model = build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
    load_checkpoint(model_path, model)
    frames = list(
        detect(
            model, images, cfg.data, cfg.tiling, cfg.model, cfg.runtime, torch.device("cpu"), progress=False
        )
    )
    return pd.concat(frames, ignore_index=True)


def _read_dets(path: Path) -> gpd.GeoDataFrame:
    from hem_bootstrap.detections import read_detections as _read_detections

    return _read_detections(path)


def _bank_rows(path: Path) -> pd.DataFrame:
    frame = gpd.read_file(path, layer="negatives")
    return pd.DataFrame(frame.drop(columns="geometry")).reset_index(drop=True)


# ---------------------------------------------------------------------- DDP training parts


def chip_dataset(
    n: int = 8, size: int = 64, seed: int = 5
) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Noise chips with one 16 px bright square each, on the 16 px grid.

    Every chip then has the same number of FCOS foreground points, so FCOS's per-rank loss
    normalisation (divide by the rank's foreground count) equals the global one and DDP is
    mathematically the same as one process with the global batch.
    """
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        img = torch.rand(3, size, size, generator=g) * 0.4
        col, row = (int(v) * 16 for v in torch.randint(0, size // 16, (2,), generator=g))
        img[:, row : row + 16, col : col + 16] += 0.5
        boxes = torch.tensor([[col, row, col + 16, row + 16]], dtype=torch.float32)
        out.append((img.clamp(0, 1), {"boxes": boxes, "labels": torch.ones(1, dtype=torch.int64)}))
    return out


def freeze_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Replace BatchNorm2d by torchvision's FrozenBatchNorm2d (same statistics), in place."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    for name, child in module.named_children():
        if isinstance(child, torch.nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            frozen.weight.copy_(child.weight.detach())
            frozen.bias.copy_(child.bias.detach())
            frozen.running_mean.copy_(child.running_mean)
            frozen.running_var.copy_(child.running_var)
            setattr(module, name, frozen)
        else:
            freeze_batchnorm(child)
    return module


def ddp_model() -> torch.nn.Module:
    """small_fcos (seeded) with frozen BatchNorm: no per-rank batch statistics."""
    from hem_bootstrap.config import ModelConfig
    from hem_bootstrap.model.detectors import build_detector

    torch.manual_seed(11)
    return freeze_batchnorm(build_detector(ModelConfig(), 2, 64))


def ddp_configs(batch_size: int) -> tuple[Any, Any]:
    from hem_bootstrap.config import RuntimeConfig, TrainConfig

    train_cfg = TrainConfig(
        optimizer="sgd",
        lr=0.02,
        momentum=0.9,
        steps=DDP_STEPS,
        warmup_steps=0,
        batch_size=batch_size,
        checkpoint_every=100,
        augment=False,
    )
    return train_cfg, RuntimeConfig(device="cpu", workers=0, seed=4, collective_timeout_s=60)


def run_ddp_training(out: Path, distributed: bool) -> None:
    """Train the same model on the same chips; per-rank batch DDP_BATCH, or 2x that in one process."""
    from hem_bootstrap.model.train import train

    train_cfg, runtime = ddp_configs(DDP_BATCH if distributed else DDP_BATCH * 2)
    train(
        ddp_model(),
        chip_dataset(),
        train_cfg,
        runtime,
        DDP_STEPS,
        ckpt_path=out,
        progress=False,
        distributed=distributed,
    )


# ------------------------------------------------------------------------------- workers


def _worker(mode: str, arg: str) -> int:
    """Body of one rank when torchrun runs this file: ``train OUT`` or ``hang``."""
    from hem_bootstrap.config import RuntimeConfig
    from hem_bootstrap.distributed import barrier, init_distributed, shutdown_distributed
    from hem_bootstrap.errors import HemError

    torch.set_num_threads(1)
    if mode == "train":
        init_distributed(RuntimeConfig(device="cpu", collective_timeout_s=60))
        run_ddp_training(Path(arg), distributed=True)
        shutdown_distributed()
        return 0
    init_distributed(RuntimeConfig(device="cpu", collective_timeout_s=TIMEOUT_S))
    if int(os.environ["RANK"]) == 1:
        time.sleep(120)  # a rank that hangs (killed by torchrun once rank 0 fails)
    try:
        barrier("test barrier")
    except HemError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


# --------------------------------------------------------------------------------- tests


def test_ddp_training_equals_one_process_with_the_global_batch(tmp_path: Path) -> None:
    ckpt = tmp_path / "ddp.pt"
    proc = torchrun(str(HERE), "train", str(ckpt), cwd=tmp_path, timeout=300)
    _ok(proc)
    single = tmp_path / "single.pt"
    run_ddp_training(single, distributed=False)
    a = torch.load(ckpt, map_location="cpu", weights_only=False)
    b = torch.load(single, map_location="cpu", weights_only=False)
    assert a["step"] == b["step"] == DDP_STEPS
    sa, sb = a["model"], b["model"]
    assert sa.keys() == sb.keys()
    init = ddp_model().state_dict()
    moved = max(float((sb[k].float() - init[k].float()).abs().max()) for k in sb)
    assert moved > 1e-3  # training really changed the weights
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    # the logged loss is the mean over ranks, i.e. the global batch's loss
    np.testing.assert_allclose(a["extra"]["losses"], b["extra"]["losses"], rtol=1e-5)


def test_sharded_detect_equals_single_process(dist_run: Path, scenes: Path, tmp_path: Path) -> None:
    cfg = dist_run.parent / "ddp.yaml"
    model = dist_run / "round_000" / "model.pt"
    images = [scenes / f"{n}.tif" for n in ("train", "pool", "test")]  # 27 tiles: 13 + 14, pool split
    out = tmp_path / "dets.gpkg"
    proc = torchrun(
        "-m",
        "hem_bootstrap.cli",
        "detect",
        str(cfg),
        "--model",
        str(model),
        "--out",
        str(out),
        *[a for im in images for a in ("--images", str(im))],
        cwd=tmp_path,
    )
    _ok(proc)
    assert "27 tiles" in proc.stdout
    assert_same_detections(gpd.read_file(out), single_detect(cfg, model, images))


@pytest.mark.slow  # 20 s; the same code path as the 2-rank detect test, with world 1
def test_one_process_torchrun_joins_a_group_of_one_and_detects_as_a_plain_run(
    dist_run: Path, scenes: Path, tmp_path: Path
) -> None:
    """A one-process torchrun job sets up the process group (NCCL on one GPU: what tests/test_cuda.py checks)."""
    cfg = dist_run.parent / "ddp.yaml"
    model = dist_run / "round_000" / "model.pt"
    image = scenes / "test.tif"
    out = tmp_path / "dets.gpkg"
    proc = torchrun("-m", "hem_bootstrap.cli", "detect", str(cfg), "--model", str(model), "--out", str(out),
                    "--images", str(image), cwd=tmp_path, nproc=1)
    _ok(proc)
    assert "distributed: 1 ranks, backend gloo" in proc.stderr
    assert_same_detections(gpd.read_file(out), single_detect(cfg, model, [image]))


def test_loop_under_torchrun_mines_once_and_matches_one_process(
    dist_run: Path, scenes: Path, tmp_path: Path
) -> None:
    from hem_bootstrap.config import load_config
    from hem_bootstrap.steps import Context, step_mine

    manifest = RunDir(dist_run).load_manifest()
    assert [e["round"] for e in manifest["rounds"]] == [0, 1, 2]
    assert all(set(e["steps"]) >= {"train", "evaluate"} for e in manifest["rounds"])
    final = _bank_rows(dist_run / "bank.gpkg")
    assert len(final) > 0 and final["neg_id"].is_unique
    assert not final.duplicated(["image", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]).any()
    cfg_path = dist_run.parent / "ddp.yaml"
    cfg = load_config(cfg_path)
    for r in (1, 2):
        rd = dist_run / f"round_{r:03d}"
        # the sharded scan of the pool equals one process's scan with the same model
        assert_same_detections(
            _read_dets(rd / "detections.gpkg"),
            single_detect(cfg_path, dist_run / f"round_{r - 1:03d}" / "model.pt", [scenes / "pool.tif"]),
        )
        # mining and the bank write happened once: one process mining the same inputs gives
        # exactly the same bank, row for row
        replay = RunDir(tmp_path / f"replay{r}")
        for name in ("bank.gpkg", "model.pt"):
            shutil.copy(dist_run / f"round_{r - 1:03d}" / name, replay.round_dir(r - 1) / name)
        shutil.copy(rd / "detections.gpkg", replay.round_dir(r) / "detections.gpkg")
        info = step_mine(Context(cfg=cfg, run=replay, device=torch.device("cpu"), progress=False), r)
        assert info["bank_size"] == manifest["rounds"][r]["bank_size"]
        pd.testing.assert_frame_equal(
            _bank_rows(replay.round_dir(r) / "bank.gpkg"), _bank_rows(rd / "bank.gpkg")
        )
    pd.testing.assert_frame_equal(final, _bank_rows(dist_run / "round_002" / "bank.gpkg"))


def test_existing_run_is_refused_on_every_rank_and_resumes_as_a_no_op(dist_run: Path) -> None:
    cfg = dist_run.parent / "ddp.yaml"
    before = (dist_run / "manifest.json").read_text()
    refused = torchrun("-m", "hem_bootstrap.cli", "run", str(cfg), cwd=dist_run.parent, timeout=120)
    assert refused.returncode != 0
    assert refused.stderr.count("use --resume to continue it") == 2  # rank 0's error, raised on both ranks
    resumed = torchrun(
        "-m", "hem_bootstrap.cli", "run", str(cfg), "--resume", cwd=dist_run.parent, timeout=120
    )
    _ok(resumed)
    after = RunDir(dist_run).load_manifest()
    assert {k: v for k, v in after.items() if k != "updated"} == {
        k: v for k, v in json.loads(before).items() if k != "updated"
    }


def test_hanging_rank_fails_the_job_after_the_collective_timeout(tmp_path: Path) -> None:
    t0 = time.perf_counter()
    proc = torchrun(str(HERE), "hang", "-", cwd=tmp_path, timeout=120)
    took = time.perf_counter() - t0
    assert proc.returncode != 0
    assert "collective_timeout_s=3" in proc.stderr and "Ranks 1 failed to pass" in proc.stderr
    assert took < 60


def _worker_pids(agent: int) -> dict[int, int]:
    """``{RANK: pid}`` of the worker processes torchrun started (read from /proc)."""
    out: dict[int, int] = {}
    for task in Path(f"/proc/{agent}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            for item in env:
                if item.startswith(b"RANK="):
                    out[int(item[5:])] = int(pid)
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_killed_rank_fails_the_whole_run(scenes: Path, tmp_path: Path) -> None:
    cfg = loop_config(scenes, tmp_path / "runs", "killed", n_rounds=1)
    proc = subprocess.Popen(
        _torchrun_cmd("-m", "hem_bootstrap.cli", "run", str(cfg)),
        cwd=tmp_path,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        pids: dict[int, int] = {}
        while time.monotonic() < deadline and proc.poll() is None:
            pids = _worker_pids(proc.pid)
            if len(pids) == 2 and (tmp_path / "runs" / "killed" / "manifest.json").exists():
                break  # both ranks are inside the run
            time.sleep(0.2)
        assert 1 in pids, "torchrun workers did not start"
        os.kill(pids[1], signal.SIGKILL)
        t_kill = time.perf_counter()
        out, err = proc.communicate(timeout=60)
        took = time.perf_counter() - t_kill
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode != 0
    assert "exitcode  : -9" in err and "SIGKILL" in err, err[-3000:]
    assert took < 30


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else "-"))
