"""Regenerate the bundled ``data_samples/`` scenes exactly (same bytes for the same library version).

Three scenes at 0.15 m (cars about 30 x 13 px), JPEG-compressed GeoTIFFs (quality 90, as
many real orthophotos are) plus ``*_labels.gpkg`` and ``*_distractors.gpkg``:

* ``train``: seed 4, 2048 x 2048;
* ``pool``: seed 7, 2048 x 2048, scanned each round to mine false positives (labelled, so
  real vehicles are told apart from false positives);
* ``test``: seed 8, 1536 x 1536, held out, never mined.

Usage: python scripts/make_samples.py [OUT_DIR]   (default: data_samples/ next to this folder)
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from hem_bootstrap.data.synth import SceneSpec, write_scene

SAMPLES: dict[str, tuple[int, int]] = {"train": (4, 2048), "pool": (7, 2048), "test": (8, 1536)}
"""Sample name -> (seed, size in pixels)."""
GSD = 0.15


def main(out_dir: Path) -> None:
    """Write every sample scene into ``out_dir`` and print what was written."""
    for name, (seed, size) in SAMPLES.items():
        start = time.perf_counter()
        paths = write_scene(out_dir, SceneSpec(size=size, gsd=GSD, seed=seed), name=name, compress="jpeg")
        print(f"{name}: seed {seed}, {time.perf_counter() - start:.1f} s -> {paths['image']}")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "data_samples"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
