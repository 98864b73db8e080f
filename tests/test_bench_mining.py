"""scripts/bench_mining.py end to end at toy sizes, so the effectiveness benchmark cannot rot.

Toy sizes mean the numbers are meaningless; what is checked is the machinery: scenes at the
asked look-alike density, shared round 0, every arm, resumability and the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import geopandas as gpd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TOY = ["--densities", "0.2", "--seeds", "1", "--rounds", "1", "--train-size", "768", "--val-size", "512",
       "--pool-size", "1024", "--pool-rasters", "2", "--test-size", "768", "--test-scenes", "2", "--steps", "16",
       "--finetune-steps", "8", "--k", "4", "--workers", "0"]


def _bench(work: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_mining.py"), *TOY, "--work", str(work), *extra],
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.mark.slow  # about 2 minutes on an AVX2-only 2-core CPU: pytest -m slow
def test_bench_mining_toy_sweep(tmp_path: Path) -> None:
    done = _bench(tmp_path, "--arms", "none", "random", "topk", "dense")
    assert done.returncode == 0, done.stderr[-2000:]
    scenes = tmp_path / "scenes" / "d0.2_s1"
    assert not len(gpd.read_file(scenes / "pool_0_labels.gpkg"))  # a background pool: no vehicles
    out = json.loads((tmp_path / "default.json").read_text())
    arms = out["results"]["0.2"]
    assert set(arms) == {"none", "random", "topk", "dense"}
    r1 = {arm: next(x for x in rows["1"] if x["round"] == 1) for arm, rows in arms.items()}
    assert r1["none"]["new"] == 0 and r1["dense"]["new"] == 2 * 16  # dense: every tile window of the pool
    assert 0 < r1["random"]["new"] <= 8 and 0 < r1["topk"]["new"] <= 8
    assert r1["random"]["box_on_lookalike"] is not None and r1["topk"]["window_with_lookalike"] is not None
    for x in r1.values():
        assert len(x["scenes"]["log_avg"]) == 2 and x["val_threshold"] is not None
        assert all(f is None or f <= v + 1e-9 for f, v in zip(x["scenes"]["floor"], x["scenes"]["log_avg"], strict=True))
    assert set(out["headroom"]["0.2"]) == set(arms)
    assert all(len(x["scenes"]["away"]) == 2 for x in r1.values())
    comp = {(c["arm"], c["control"]) for c in out["comparisons"]["0.2"]}
    assert ("topk", "random") in comp and ("topk", "none") in comp
    md = (tmp_path / "default.md").read_text()
    assert "paired difference" in md and "seed-level t interval, sign p" in md and "recall at val thr" in md
    topk = next(c for c in out["comparisons"]["0.2"] if (c["arm"], c["control"]) == ("topk", "random"))
    # the operating point, paired per seed (toy runs: both arms at recall 0, so no seed differs and no p exists)
    assert topk["op_recall"]["n_seeds"] == 1 and topk["op_recall"]["sign_p"] is None
    # finished runs are kept: a second call trains nothing; a run without its table is redone, alone
    runs = tmp_path / "runs" / "default" / "d0.2"
    stamps = {p.name: (p / "manifest.json").stat().st_mtime_ns for p in runs.iterdir()}
    (runs / "s1_topk" / "table.txt").unlink()
    again = _bench(tmp_path, "--arms", "none", "random", "topk", "dense")
    assert again.returncode == 0, again.stderr[-2000:]
    changed = {p.name for p in runs.iterdir() if (p / "manifest.json").stat().st_mtime_ns != stamps.get(p.name)}
    assert changed == {"s1_topk"}
    collected = _bench(tmp_path, "--arms", "none", "random", "topk", "dense", "--collect-only")
    assert collected.returncode == 0, collected.stderr[-2000:]
    assert set(json.loads((tmp_path / "default.json").read_text())["results"]["0.2"]) == set(arms)
    # each arm against the same arm of another recipe (here the same runs: every difference is zero)
    vs = _bench(tmp_path, "--arms", "random", "topk", "--collect-only", "--against", "default", "--out",
                str(tmp_path / "vs.json"))
    assert vs.returncode == 0, vs.stderr[-2000:]
    same = {c["control"]: c for c in json.loads((tmp_path / "vs.json").read_text())["comparisons"]["0.2"]
            if c["arm"] == "topk"}
    assert same["topk (default)"]["ap50"]["mean"] == 0 and "random" in same
    missing = _bench(tmp_path, "--collect-only", "--against", "nosuchtag")
    assert missing.returncode != 0 and "--against nosuchtag: no runs" in missing.stderr
    # a round scored before metrics had the near-object floor is re-scored from its saved detections
    metrics = runs / "s1_none" / "round_001" / "metrics.json"
    m = json.loads(metrics.read_text())
    metrics.write_text(json.dumps({k: v for k, v in m.items()
                                   if k not in ("log_avg_fp_near_per_km2", "log_avg_fp_away_per_km2")}))
    assert _bench(tmp_path, "--arms", "none", "random", "topk", "dense", "--collect-only").returncode == 0
    rescored = json.loads((metrics.parent / "near_floor.json").read_text())
    for key in ("log_avg_fp_near_per_km2", "log_avg_fp_away_per_km2"):
        assert rescored[key] == pytest.approx(m[key])
    # another tag's round 0 built with another model is refused before anything is written
    narrow = _bench(tmp_path, "--arms", "random", "--tag", "narrow", "--round0-from", "default",
                    "--set", "model.width=1.0")
    assert narrow.returncode != 0 and "round 0 was built with another model" in narrow.stderr
    assert "model.width: 1.5 there, 1.0 here" in narrow.stderr
    assert not (tmp_path / "runs" / "narrow" / "d0.2" / "s1_random").exists()
    # the same folders with other settings are refused, not silently reused
    other = _bench(tmp_path, "--arms", "none", "--k", "3")
    assert other.returncode != 0 and "--k 4" in other.stderr and "--work or --tag" in other.stderr


def test_seed_level_column_and_ratios() -> None:
    """The seed-level text of a comparison (also when no seed differs) and ratios exponentiated whole."""
    import importlib.util

    from hem_bootstrap.scoring.paired import paired_bootstrap

    spec = importlib.util.spec_from_file_location("bench_mining", ROOT / "scripts" / "bench_mining.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    same = paired_bootstrap({1: [2.0], 2: [3.0]}, {1: [2.0], 2: [3.0]}, n_boot=100)
    assert bench._seed_level(same.__dict__) == "[0, 0], p = n/a (no seed differs)"
    d = paired_bootstrap({s: [v] for s, v in enumerate([-0.5, -0.4, -0.6])}, {s: [0.0] for s in range(3)}, n_boot=100)
    ratio = bench._as_ratio(d)
    assert ratio["t_lo"] < ratio["mean"] < ratio["t_hi"] < 1 and ratio["mean"] == pytest.approx(0.6065, abs=1e-3)
    assert bench._seed_level(d.__dict__).endswith("p = 0.25")
