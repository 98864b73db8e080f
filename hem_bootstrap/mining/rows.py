"""Rows of the bank's layers: schema normalisation, pixel boxes, processing order, and the one merge by IoU.

The negatives and the review queue keep their rows the same way (schema columns with fixed
dtypes, sorted by id) and take new rows the same way (:func:`merge_by_iou`: a row matching a
kept one updates it, the others are de-duplicated with NMS), so both share these helpers.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from hem_bootstrap.detections import DETECTION_COLUMNS, PX_COLUMNS, WIN_COLUMNS, Naming
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.boxes import best_match, nms

MINED_COLUMNS = (*DETECTION_COLUMNS, *PX_COLUMNS)
"""What a mined row (a false positive or a random window) must carry to enter the bank or the review queue."""


def empty(schema: Mapping[str, str], crs: Any) -> gpd.GeoDataFrame:
    cols = {c: pd.Series([], dtype=object if t == "str" else t) for c, t in schema.items()}
    return normalize(gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs), schema, crs)


def normalize(frame: gpd.GeoDataFrame, schema: Mapping[str, str], crs: Any) -> gpd.GeoDataFrame:
    """Schema columns in order with fixed dtypes, sorted by the id column, fresh index."""
    out = {}
    n = len(frame)
    for col, dtype in schema.items():
        values = frame[col] if col in frame.columns else pd.Series([default(dtype)] * n, index=frame.index)
        if dtype == "str":
            out[col] = pd.array(values.fillna("").astype(str).to_numpy(dtype=object), dtype="str")
        elif dtype == "bool":
            out[col] = values.fillna(False).astype(bool).to_numpy()
        elif dtype == "int64":
            out[col] = values.fillna(-1).astype(np.int64).to_numpy()
        else:
            out[col] = values.astype(np.float64).to_numpy()
    geoms = np.asarray(frame.geometry.values) if n else np.zeros(0, dtype=object)
    norm = gpd.GeoDataFrame(out, geometry=gpd.GeoSeries(list(geoms), crs=crs), crs=crs)
    id_col = next(iter(schema))
    return norm.sort_values(id_col, kind="stable").reset_index(drop=True)


def default(dtype: str) -> Any:
    return {"str": "", "bool": False, "int64": -1, "float64": np.nan}[dtype]


def px_array(frame: pd.DataFrame) -> np.ndarray:
    """(N, 4) float64 pixel boxes, column by column (cheap even on a large GeoDataFrame)."""
    if len(frame) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    return np.column_stack([frame[c].to_numpy(dtype=np.float64) for c in PX_COLUMNS])


def require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; expected {list(columns)}")


def scores_of(frame: pd.DataFrame) -> np.ndarray:
    return np.nan_to_num(frame["score"].to_numpy(dtype=np.float64), nan=0.0)


def sorted_mined(mined: pd.DataFrame) -> pd.DataFrame:
    """Deterministic processing order: image, then score descending, then pixel box."""
    key = mined.assign(_neg_score=-scores_of(mined))
    key = key.sort_values(["image", "_neg_score", *PX_COLUMNS], kind="stable")
    return key.drop(columns="_neg_score")


def src_crs(rows: pd.DataFrame, frame_crs: str) -> np.ndarray:
    """Each row's own CRS: its ``src_crs`` column (rows joined from several CRSs), else the frame's."""
    if "src_crs" in rows.columns:
        own = rows["src_crs"].fillna("").astype(str).to_numpy(dtype=object)
        return np.where(own == "", frame_crs, own).astype(object)
    return np.full(len(rows), frame_crs, dtype=object)


def next_id(frame: pd.DataFrame, col: str) -> int:
    return int(frame[col].max()) + 1 if len(frame) else 1


def write_layer(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    with warnings.catch_warnings():  # a pixel-space bank has no CRS by design
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        pyogrio.write_dataframe(frame, path, layer=layer, driver="GPKG", geometry_type="Polygon")


def merge_by_iou(
    rows: pd.DataFrame, kept_images: np.ndarray, kept_px: np.ndarray, iou: float
) -> tuple[pd.Series, pd.DataFrame]:
    """Match new rows to kept ones of the same image; de-duplicate the rest.

    Args:
        rows: New rows (``image``, ``score``, pixel boxes), in processing order.
        kept_images: ``image`` of each kept row that new rows may match (None where none may).
        kept_px: Their pixel boxes.
        iou: A new row with pixel IoU above this against a kept row is that row again.

    Returns:
        ``(updates, fresh)``: the best new score per matched kept position, and the unmatched
        rows, of which only the highest-scoring of each overlapping group (IoU > ``iou``)
        remains, in input order.
    """
    updates: list[pd.Series] = []
    fresh: list[pd.DataFrame] = []
    for image, group in rows.groupby("image", sort=True):
        kept = np.flatnonzero(kept_images == str(image))
        boxes, scores = px_array(group), scores_of(group)
        matched = np.zeros(len(group), dtype=bool)
        if len(kept):
            best, arg = best_match(boxes, kept_px[kept])
            matched = best > iou
            if matched.any():
                updates.append(pd.Series(scores[matched]).groupby(kept[arg][matched]).max())
        rest = np.flatnonzero(~matched)
        keep = rest[nms(boxes[rest], scores[rest], float(iou))] if len(rest) else rest
        fresh.append(group.iloc[np.sort(keep)])
    top = pd.concat(updates) if updates else pd.Series([], dtype=np.float64)
    return top, pd.concat(fresh) if fresh else rows.iloc[:0]


def entry_columns(rows: pd.DataFrame, round_idx: int, frame_crs: str) -> dict[str, Any]:
    """The columns every new bank or review row takes from its mined row."""
    n = len(rows)
    cols: dict[str, Any] = {c: rows[c].to_numpy() for c in ("label", "score", *WIN_COLUMNS, *PX_COLUMNS)}
    cols.update(
        image=rows["image"].astype(str).to_numpy(dtype=object),
        round_added=np.full(n, round_idx, dtype=np.int64),
        last_round=np.full(n, round_idx, dtype=np.int64),
        src_crs=src_crs(rows, frame_crs),
    )
    cols["class"] = class_names(rows)
    return cols


def class_names(rows: pd.DataFrame, classes: tuple[str, ...] | None = None) -> np.ndarray:
    """Each row's class name: its own ``class`` where it has one, else named from ``label``.

    With ``classes`` (names in id order) every label is named; without, only label 0
    (``background``, a random window) is, and other unnamed rows stay "" until an export names them.
    """
    labels = rows["label"].fillna(0).to_numpy(dtype=np.int64)
    named = Naming(classes or ()).name(labels)
    if classes is None:
        named = np.where(labels == 0, named, "")
    own = rows["class"].fillna("").astype(str).to_numpy(dtype=object) if "class" in rows.columns else named
    return np.where(own != "", own, named).astype(object)
