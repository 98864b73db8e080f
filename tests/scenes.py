"""Helpers shared by the tests that run the loop on synthetic scenes written by ``write_scene``."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def scene_data(scenes: Path) -> dict[str, Any]:
    """The ``data`` section for a folder holding ``train``, ``pool`` and ``test`` scenes."""

    def imageset(n: str) -> dict[str, Any]:
        return {
            "images": [str(scenes / f"{n}.tif")],
            "labels": str(scenes / f"{n}_labels.gpkg"),
            "distractors": str(scenes / f"{n}_distractors.gpkg"),
        }

    return {"train": [imageset("train")], "pool": [imageset("pool")], "test": [imageset("test")]}
