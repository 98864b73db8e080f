"""Helpers shared by the tests that run the loop on synthetic scenes written by ``write_scene``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def scene_data(scenes: Path) -> dict[str, Any]:
    """The ``data`` section for a folder holding ``train``, ``pool`` and ``test`` scenes."""

    def imageset(n: str) -> dict[str, Any]:
        return {
            "images": [str(scenes / f"{n}.tif")],
            "labels": str(scenes / f"{n}_labels.gpkg"),
            "distractors": str(scenes / f"{n}_distractors.gpkg"),
        }

    return {"train": [imageset("train")], "pool": [imageset("pool")], "test": [imageset("test")]}


def loop_config(
    folder: Path, name: str, data: dict[str, Any], *, k: int = 20, review_above: float = 0.99, steps: int = 12
) -> Path:
    """A fast one-round loop config (tiny training, per-image-cap mining) written to ``folder/name.yaml``."""
    tree = {
        "data": data,
        "tiling": {"tile_size": 256, "overlap": 32},
        "train": {"steps": steps, "finetune_steps": steps // 2, "batch_size": 4, "background_chips": 4,
                  "warmup_steps": 2},
        "mining": {"strategies": [{"name": "per_image_cap", "k": k}], "review_above": review_above},
        "model": {"score_floor": 0.01},
        "rounds": {"name": name, "out_dir": str(folder / "runs"), "n_rounds": 1, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": 3},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path
