"""Determinism: two CPU runs with the same seed give identical banks and metrics; another seed differs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import geopandas as gpd
import pandas as pd
import pytest
import yaml
from scenes import scene_data

from hem_bootstrap.config import load_config
from hem_bootstrap.loop import run_experiment

TIMINGS = {"seconds", "seconds_total", "chips_per_s", "tiles_per_s", "init"}


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    root = tmp_path_factory.mktemp("det_scenes")
    for name, seed in (("train", 201), ("pool", 202), ("test", 203)):
        write_scene(root, SceneSpec(size=512, gsd=0.15, seed=seed), name=name)
    return root


def run_once(scenes: Path, folder: Path, name: str, seed: int, n_rounds: int = 2) -> Path:
    tree = {
        "data": scene_data(scenes),
        "tiling": {"tile_size": 256, "overlap": 32},
        "train": {"steps": 3, "finetune_steps": 2, "batch_size": 2, "background_chips": 2, "warmup_steps": 1},
        "mining": {"strategies": [{"name": "per_image_cap", "k": 15}], "review_above": 0.99},
        "bank": {"sampling": "score"},
        "model": {"score_floor": 0.01},
        "rounds": {"name": name, "out_dir": str(folder), "n_rounds": n_rounds, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": seed, "device": "cpu", "threads": 1},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return run_experiment(load_config(path), config_path=path, print_table=False)


def _strip(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


def results(run: Path) -> tuple[pd.DataFrame, list[Any], list[Any]]:
    bank = pd.DataFrame(gpd.read_file(run / "bank.gpkg", layer="negatives"))
    rounds = [_strip(e) for e in json.loads((run / "manifest.json").read_text())["rounds"]]
    metrics = [_strip(json.loads((run / f"round_{e['round']:03d}" / "metrics.json").read_text())) for e in rounds]
    return bank, metrics, rounds


@pytest.mark.slow  # a whole loop, 20-30 s on a slow CPU: run by .ci/run's second stage
def test_same_seed_same_bank_and_metrics(scenes: Path, tmp_path: Path) -> None:
    bank_a, metrics_a, rounds_a = results(run_once(scenes, tmp_path, "a", seed=5))
    bank_b, metrics_b, rounds_b = results(run_once(scenes, tmp_path, "b", seed=5))
    assert len(bank_a) > 0
    assert len(metrics_a) == 3
    pd.testing.assert_frame_equal(bank_a, bank_b)  # geometry, scores, ids, model hashes: row for row
    assert metrics_a == metrics_b
    assert rounds_a == rounds_b  # losses, counts, bank sizes of every step

    run_c = run_once(scenes, tmp_path, "c", seed=6, n_rounds=0)
    rounds_c = json.loads((run_c / "manifest.json").read_text())["rounds"]
    assert _strip(rounds_c[0])["steps"]["train"] != rounds_a[0]["steps"]["train"]  # the seed is really used
