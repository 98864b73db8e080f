"""Helpers shared by the tests that run the loop on synthetic scenes written by ``write_scene``, and that rewrite
a scene as a grid of files or at another ground resolution."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import rasterio
import yaml
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window


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
    folder: Path, name: str, data: dict[str, Any], *, k: int = 20, review_above: float = 0.99, steps: int = 12,
    width: float | None = 1.0,
) -> Path:
    """A fast one-round loop config (tiny training, per-image-cap mining) written to ``folder/name.yaml``.

    ``width`` 1 (the default before 1.5) keeps these machinery tests as fast as they were; None leaves the
    default, for configs that scan with the session fixture model (conftest.py), which has it.
    """
    tree = {
        "data": data,
        "tiling": {"tile_size": 256, "overlap": 32},
        "train": {"steps": steps, "finetune_steps": steps // 2, "batch_size": 4, "background_chips": 4,
                  "warmup_steps": 2},
        "mining": {"strategies": [{"name": "per_image_cap", "k": k}], "review_above": review_above},
        "model": {"score_floor": 0.01, **({} if width is None else {"width": width})},
        "rounds": {"name": name, "out_dir": str(folder / "runs"), "n_rounds": 1, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": 3},
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def cut_into_files(scene: Path, out: Path, size: int) -> list[Path]:
    """The scene cut into square files of ``size`` px, each with its own transform (tiled GeoTIFFs)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with rasterio.open(scene) as src:
        for row in range(0, src.height, size):
            for col in range(0, src.width, size):
                win = Window(col, row, min(size, src.width - col), min(size, src.height - row))
                prof = src.profile | {"width": win.width, "height": win.height,
                                      "transform": src.window_transform(win), "tiled": True,
                                      "blockxsize": 128, "blockysize": 128}
                path = out / f"tile_{row // size}_{col // size}.tif"
                with rasterio.open(path, "w", **prof) as dst:
                    dst.write(src.read(window=win))
                paths.append(path)
    return paths


def at_gsd(src_path: Path, out: Path, factor: float) -> Path:
    """The same ground written with ``factor`` times as many pixels per side (bilinear)."""
    with rasterio.open(src_path) as src:
        h, w = round(src.height * factor), round(src.width * factor)
        data = src.read(out_shape=(src.count, h, w), resampling=Resampling.bilinear)
        prof = src.profile | {"width": w, "height": h, "transform": src.transform @ Affine.scale(1 / factor),
                              "tiled": True, "blockxsize": 256, "blockysize": 256}
    with rasterio.open(out, "w", **prof) as dst:
        dst.write(data)
    return out
