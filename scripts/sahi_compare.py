"""SAHI beside hem's scan: SAHI's sliced prediction with the same torchvision model, tile and overlap.

Run by ``scripts/bench_inference.py --compare-sahi`` in a child process (when ``sahi`` is
installed): :func:`sahi_child` times SAHI on the whole raster and dumps its boxes;
:func:`agreement` says how many confident boxes each method finds that the other finds too.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from hem_bootstrap.geo.boxes import overlapping, paired_iou

PX = ["px_xmin", "px_ymin", "px_xmax", "px_ymax"]


def sahi_child(model: Any, score_floor: float, device: str, raster: Path, tile: int, overlap: int,
               dump: Path | None, peak_rss_mb: Callable[[], float]) -> dict:
    """SAHI's sliced prediction of ``model`` (a torchvision detector in eval mode) over ``raster``."""
    import rasterio
    from sahi.models.torchvision import TorchVisionDetectionModel  # type: ignore[import-not-found]
    from sahi.predict import get_sliced_prediction  # type: ignore[import-not-found]

    det = TorchVisionDetectionModel(model=model, confidence_threshold=score_floor, device=device,
                                    category_mapping={"1": "vehicle"}, load_at_init=True, image_size=tile)
    t0 = time.perf_counter()
    with rasterio.open(raster) as src:
        image = np.transpose(src.read(), (1, 2, 0))  # SAHI needs the whole image in memory
    ratio = overlap / tile
    res = get_sliced_prediction(image, det, slice_height=tile, slice_width=tile,
                                overlap_height_ratio=ratio, overlap_width_ratio=ratio, verbose=0)
    secs = time.perf_counter() - t0
    if dump:
        rows = [[*p.bbox.to_xyxy(), p.score.value] for p in res.object_prediction_list]
        np.save(dump, np.asarray(rows, dtype=np.float64).reshape(-1, 5))
    return {"seconds": secs, "detections": len(res.object_prediction_list), "peak_rss_mb": peak_rss_mb()}


def agreement(ours_gpkg: Path, sahi_npy: Path, min_score: float = 0.3, iou: float = 0.5) -> dict:
    """How many detections scoring >= ``min_score`` each method finds that the other also finds (IoU >= ``iou``)."""
    import geopandas as gpd

    ours = gpd.read_file(ours_gpkg)
    a = ours.loc[ours["score"] >= min_score, PX].to_numpy(float)
    sahi = np.load(sahi_npy)
    b = sahi[sahi[:, 4] >= min_score, :4]
    if len(a) == 0 or len(b) == 0:
        return {"ours": len(a), "sahi": len(b), "ours_found_by_sahi": 0, "sahi_found_by_ours": 0}
    i, j = overlapping(a, b)
    good = paired_iou(a[i], b[j]) >= iou
    return {"min_score": min_score, "iou": iou, "ours": len(a), "sahi": len(b),
            "ours_found_by_sahi": int(len(np.unique(i[good]))) / len(a),
            "sahi_found_by_ours": int(len(np.unique(j[good]))) / len(b)}
