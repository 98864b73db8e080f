"""Review decisions that stick: where ``hem review apply`` puts them so the next round uses them.

A person decides each suspected missing label (the bank's ``review`` layer):

* ``negative``: it moves into the bank (strategy ``review``) of the run's latest snapshot,
  ``round_NNN/bank.gpkg``, the one the next round starts from; mining never queues it for
  review again (:func:`hem_bootstrap.mining.bank.route_for_review`).
* ``positive``: it is an object after all. It is appended to the run's accepted-positive
  labels, ``review_positives.gpkg`` (layer ``labels``: ``image``, ``label``, ``class``,
  pixel box, map box). Every later round reads that file: training treats the objects as
  labelled (positive chips around them, targets in any chip that holds them) and mining
  matches detections against them, so they are never mined again. No config change and no
  hand merge is needed.
"""

from __future__ import annotations

from pathlib import Path

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import DataError
from hem_bootstrap.files import atomic_path

POSITIVES_FILE = "review_positives.gpkg"
POSITIVES_LAYER = "labels"

PixelLabels = dict[str, tuple[np.ndarray, np.ndarray]]
"""Resolved raster path -> ``(boxes (N, 4) float64 pixels, class ids (N,) int64)``."""


def latest_snapshot(run_path: Path) -> Path | None:
    """The newest ``round_NNN/bank.gpkg`` of a run: the bank the next round starts from."""
    snapshots = sorted(Path(run_path).glob("round_[0-9][0-9][0-9]/bank.gpkg"))
    return snapshots[-1] if snapshots else None


def append_accepted(run_path: Path, positives: gpd.GeoDataFrame, classes: list[str], round_idx: int) -> int:
    """Add positives accepted in review to the run's labels file (atomic replace); returns how many.

    Rows already there (same image and ``review_id``) are not added twice, so applying the
    same decisions file again changes nothing.
    """
    if len(positives) == 0:
        return 0
    path = Path(run_path) / POSITIVES_FILE
    old = _read(path)
    new = positives.assign(
        image=positives["image"].astype(str),
        label=positives["label"].astype(np.int64),
        **{"class": [classes[int(i) - 1] if 0 < int(i) <= len(classes) else str(i) for i in positives["label"]]},
        decided_round=np.int64(round_idx),
    )
    if old is not None and len(old):
        seen = set(zip(old["image"].astype(str), old["review_id"].astype(np.int64), strict=True))
        fresh = [(im, int(rid)) not in seen for im, rid in zip(new["image"], new["review_id"], strict=True)]
        new = new[np.asarray(fresh, dtype=bool)]
        if len(new) == 0:
            return 0
        new = new.to_crs(old.crs) if old.crs is not None and new.crs is not None and new.crs != old.crs else new
        joined = gpd.GeoDataFrame(pd.concat([old, new], ignore_index=True), geometry="geometry", crs=old.crs)
    else:
        joined = new
    with atomic_path(path, ".gpkg") as tmp:
        pyogrio.write_dataframe(joined, tmp, layer=POSITIVES_LAYER, driver="GPKG")
    return len(new)


def accepted_pixel_labels(run_path: Path) -> PixelLabels:
    """The accepted positives of a run, as pixel boxes and class ids per raster (empty when none)."""
    frame = _read(Path(run_path) / POSITIVES_FILE)
    if frame is None or len(frame) == 0:
        return {}
    out: PixelLabels = {}
    for image, rows in frame.groupby(frame["image"].astype(str), sort=True):
        boxes = rows[list(PX_COLUMNS)].to_numpy(dtype=np.float64)
        out[str(Path(image).resolve())] = (boxes, rows["label"].to_numpy(dtype=np.int64))
    return out


def for_image(accepted: PixelLabels, path: Path | str) -> tuple[np.ndarray, np.ndarray]:
    """One raster's accepted positives (empty arrays when it has none)."""
    return accepted.get(str(Path(path).resolve()), (np.zeros((0, 4)), np.zeros(0, dtype=np.int64)))


def _read(path: Path) -> gpd.GeoDataFrame | None:
    if not path.exists():
        return None
    try:
        frame = gpd.read_file(path, layer=POSITIVES_LAYER)
    except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as err:
        raise DataError(f"{path}: not a readable accepted-positives file ({err})") from None
    missing = [c for c in ("image", "label", "review_id", *PX_COLUMNS) if c not in frame.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; expected image, label, review_id and px_* columns")
    return frame
