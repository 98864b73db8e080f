"""Regenerate the bundled ``data_samples/`` scenes exactly (same bytes for the same library version).

Three 1024 x 1024 scenes at 0.15 m (cars about 30 x 13 px), each a GeoTIFF plus
``*_labels.gpkg`` and ``*_distractors.gpkg``:

* ``train``: seed 4, lots and halls, many vehicles;
* ``pool``: seed 7, mostly background (gardens, parks, roofs) with some vehicles; the
  detector is run over it to mine false positives;
* ``test``: seed 8, held out, never mined.

Usage: python scripts/make_samples.py [OUT_DIR]   (default: data_samples/ next to this folder)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hem_bootstrap.data.synth import SceneSpec, write_scene

SAMPLES: dict[str, int] = {"train": 4, "pool": 7, "test": 8}
"""Sample name -> seed."""
SIZE = 1024
GSD = 0.15


def main(out_dir: Path) -> None:
    """Write every sample scene into ``out_dir`` and print what was written."""
    for name, seed in SAMPLES.items():
        start = time.perf_counter()
        paths = write_scene(out_dir, SceneSpec(size=SIZE, gsd=GSD, seed=seed), name=name)
        print(f"{name}: seed {seed}, {time.perf_counter() - start:.1f} s -> {paths['image']}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "data_samples"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
