"""Crash safety: a real ``hem run`` killed at chosen points resumes to the uninterrupted result.

Each run is a subprocess (``python -m hem_bootstrap.cli run cfg.yaml``) stopped by the test-only
fault-injection hook ``HEM_KILL_AT`` (see :func:`hem_bootstrap.faults.fault_point`): SIGKILL at
a named point, so no handler, ``finally`` or flush runs. ``--resume`` must then give the same
bank (row for row, no duplicate ids), the same finished steps and the same round metrics as
an uninterrupted run with the same seed. SIGTERM must stop after the current step with a
one-line message naming ``--resume``.

Most kill points are ``slow`` (each costs two process starts); ``.ci/run`` runs them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd
import pytest
import yaml
from scenes import scene_data

VOLATILE = {"seconds", "seconds_total", "chips_per_s", "tiles_per_s"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    root = tmp_path_factory.mktemp("crash_scenes")
    for name, seed in (("train", 101), ("pool", 102), ("test", 103)):
        write_scene(root, SceneSpec(size=512, gsd=0.15, seed=seed), name=name)
    return root


def tiny_config(scenes: Path, folder: Path, name: str) -> Path:
    """Two mining rounds on 512 px scenes, 4 tiles a raster, a few training steps, no workers."""

    tree = {
        "data": scene_data(scenes),
        "tiling": {"tile_size": 256, "overlap": 0},
        "train": {"steps": 3, "finetune_steps": 2, "batch_size": 2, "background_chips": 2, "warmup_steps": 1,
                  "checkpoint_every": 1},
        "mining": {"strategies": [{"name": "per_image_cap", "k": 20}], "review_above": 0.99},
        "model": {"score_floor": 0.01},
        "rounds": {"name": name, "out_dir": str(folder / "runs"), "n_rounds": 2, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": 3, "threads": 1, "device": "cpu"},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def hem(*args: str, kill_at: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run the CLI as a real process (optionally with the fault-injection hook set)."""
    env = {k: v for k, v in os.environ.items() if k != "HEM_KILL_AT"}
    if kill_at:
        env["HEM_KILL_AT"] = kill_at
    return subprocess.run(
        [sys.executable, "-m", "hem_bootstrap.cli", "-q", *args],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def _clean(value: Any, run: Path) -> Any:
    """Drop timings and make run-directory paths relative, so two runs compare equal."""
    if isinstance(value, dict):
        return {k: _clean(v, run) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v, run) for v in value]
    if isinstance(value, str):
        return value.replace(str(run), "<run>")
    return value


def outcome(run: Path) -> dict[str, Any]:
    """Everything that must not depend on whether the run was interrupted."""
    bank = gpd.read_file(run / "bank.gpkg", layer="negatives")
    manifest = json.loads((run / "manifest.json").read_text())
    rounds = [_clean(e, run) for e in manifest["rounds"]]
    metrics = {
        r: _clean(json.loads((run / f"round_{r:03d}" / "metrics.json").read_text()), run) for r in (0, 1, 2)
    }
    return {"bank": bank, "rounds": rounds, "metrics": metrics}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["bank"]["neg_id"].is_unique
    assert len(got["bank"]) > 0
    pd.testing.assert_frame_equal(got["bank"], want["bank"])
    assert [sorted(e["steps"]) for e in got["rounds"]] == [sorted(e["steps"]) for e in want["rounds"]]
    assert got["rounds"] == want["rounds"]
    assert got["metrics"] == want["metrics"]


def no_temp_files(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if ".tmp" in p.name]


@pytest.fixture(scope="module")
def baseline(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("crash_base")
    proc = hem("run", str(tiny_config(scenes, folder, "base")))
    assert proc.returncode == 0, proc.stderr[-2000:]
    return outcome(folder / "runs" / "base")


# Tiles: round 0 evaluation reads 1-4, round 1 detection 5-8, round 1 evaluation 9-12.
# Training batches: round 0 collates 1-3, round 1 4-5. Bank saves: round 0 empty bank #1,
# round 1 mining #2, round 2 mining #3 (with refresh of the rows already in the bank).
KILL_POINTS = [
    pytest.param("bank.replace#3", id="bank-write-round2"),
    pytest.param("train.batch#2", id="training-round0", marks=pytest.mark.slow),
    pytest.param("detect.tile#6", id="detection-round1", marks=pytest.mark.slow),
    pytest.param("round1.detect.end", id="after-detect-before-manifest", marks=pytest.mark.slow),
    pytest.param("bank.replace#2", id="bank-write-round1", marks=pytest.mark.slow),
    pytest.param("round1.mine.end", id="after-mine-before-manifest", marks=pytest.mark.slow),
    pytest.param("train.batch#5", id="training-round1-after-checkpoint", marks=pytest.mark.slow),
    pytest.param("round1.train.end", id="after-train-before-manifest", marks=pytest.mark.slow),
    pytest.param("detect.tile#10", id="evaluation-round1", marks=pytest.mark.slow),
    pytest.param("round1.evaluate.end", id="after-evaluate-before-manifest", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("point", KILL_POINTS)
def test_sigkill_then_resume_equals_uninterrupted(
    point: str, scenes: Path, tmp_path: Path, baseline: dict[str, Any]
) -> None:
    cfg = tiny_config(scenes, tmp_path, "cut")
    killed = hem("run", str(cfg), kill_at=point)
    assert killed.returncode == -signal.SIGKILL, f"{point} was never reached: {killed.stderr[-1500:]}"
    run = tmp_path / "runs" / "cut"
    assert (run / "manifest.json").is_file()
    status = hem("status", str(run))
    assert status.returncode == 0 and "in use by" not in status.stdout  # the kernel dropped the lock

    resumed = hem("run", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(outcome(run), baseline)
    assert no_temp_files(run) == []


def test_sigterm_stops_after_the_step_and_resumes(scenes: Path, tmp_path: Path, baseline: dict[str, Any]) -> None:
    cfg = tiny_config(scenes, tmp_path, "term")
    # SIGTERM arrives at the start of round 1's mining: mining finishes, training never starts
    stopped = hem("run", str(cfg), kill_at="round1.mine.start:TERM")
    assert stopped.returncode == 2, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    lines = [ln for ln in stopped.stderr.splitlines() if "--resume" in ln]
    assert len(lines) == 1 and lines[0].startswith("error: stopped cleanly"), stopped.stderr[-2000:]
    run = tmp_path / "runs" / "term"
    manifest = json.loads((run / "manifest.json").read_text())
    round1 = next(e for e in manifest["rounds"] if e["round"] == 1)
    assert sorted(round1["steps"]) == ["detect", "mine"]

    resumed = hem("run", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(outcome(run), baseline)


def test_second_signal_stops_at_once_and_resumes(scenes: Path, tmp_path: Path, baseline: dict[str, Any]) -> None:
    cfg = tiny_config(scenes, tmp_path, "twice")
    # first SIGTERM as round 0 training starts, a second one inside it (batch 2): stop at once
    stopped = hem("run", str(cfg), kill_at="round0.train.start:TERM,train.batch#2:TERM")
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "Traceback" not in stopped.stderr
    lines = [ln for ln in stopped.stderr.splitlines() if "--resume" in ln]
    assert len(lines) == 1 and lines[0].startswith("interrupted"), stopped.stderr[-2000:]
    run = tmp_path / "runs" / "twice"
    manifest = json.loads((run / "manifest.json").read_text())
    assert all(not e["steps"] for e in manifest["rounds"])  # nothing recorded as finished
    assert (run / "round_000" / "model.pt").is_file()  # but training checkpointed step 1

    resumed = hem("run", str(cfg), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_same(outcome(run), baseline)
