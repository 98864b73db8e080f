"""scripts/gpu_check.sh cannot rot: its dry run, in smoke mode, runs every step a GPU machine would run.

On this CPU the CUDA parts are skipped (and say so in ``summary.json``); the benchmark step runs
``scripts/bench_inference.py`` for real, on a small raster, through the same options the GPU run uses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_dry_run_smoke(tmp_path: Path) -> None:
    out = tmp_path / "gpu"
    env = {**os.environ, "VENV": sys.prefix}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--dry-run", "--smoke", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    log = (out / "gpu_check.log").read_text() if (out / "gpu_check.log").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + log[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dry_run"] is True and summary["device"] == "cpu"
    steps = summary["steps"]
    assert steps["bench_small_fcos_b8"] == "ok"
    assert steps["train"].startswith("skipped") and steps["sahi"].startswith("skipped")
    bench = json.loads((out / "bench_small_fcos_b8.json").read_text())
    row = bench["sizes"]["512"]
    assert row["end_to_end"]["tiles"] > 0 and row["ratio"] > 0
    assert bench["amp"] is True and bench["batch"] == 8 and bench["workers"] == 0
    assert not (out / "rasters").exists()  # the generated rasters are removed, the figures kept


def test_gpu_check_rejects_an_unknown_option(tmp_path: Path) -> None:
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--fast"], capture_output=True, text=True)
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr
