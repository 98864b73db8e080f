"""The review queue: suspected missing labels held for a person to decide (the bank's ``review`` layer).

A confident false positive may be an object nobody labelled; mining it as a negative would
teach the model that the object is background. Such suspects wait here, one row per object
(a new suspect overlapping a pending row updates it), until ``hem review apply`` decides them.
"""

from __future__ import annotations

from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd

from hem_bootstrap.detections import PX_COLUMNS, WIN_COLUMNS
from hem_bootstrap.mining.rows import (
    MINED_COLUMNS,
    empty,
    entry_columns,
    merge_by_iou,
    normalize,
    px_array,
    require,
    sorted_mined,
)

REVIEW_SCHEMA: dict[str, str] = {
    "review_id": "int64",
    "image": "str",
    "label": "int64",
    "class": "str",
    "score": "float64",
    "round_added": "int64",
    "last_round": "int64",
    "reason": "str",
    "decision": "str",
    "bank_neg_id": "int64",
    **{c: "int64" for c in WIN_COLUMNS},
    **{c: "float64" for c in PX_COLUMNS},
    "src_crs": "str",
}
"""Columns of the ``review`` layer (plus ``geometry``), in order. ``decision`` is "" while pending."""


REVIEW_DEDUPE_IOU = 0.5
"""A suspect overlapping a pending review row above this IoU updates it instead of adding one."""


class ReviewQueue:
    """Pending and decided suspects, sorted by ``review_id``; ids are never reused.

    Attributes:
        frame: The rows (schema :data:`REVIEW_SCHEMA`).
        next_id: The next ``review_id`` to hand out.
    """

    def __init__(self, crs: Any = None) -> None:
        self.frame: gpd.GeoDataFrame = empty(REVIEW_SCHEMA, crs)
        self.next_id = 1

    def set_crs(self, crs: Any) -> None:
        """Adopt the bank's CRS (rows are reprojected when they already have one)."""
        if self.frame.crs is not None and crs is not None and self.frame.crs != crs:
            self.frame = self.frame.to_crs(crs)
        else:
            self.frame = self.frame.set_crs(crs, allow_override=True)

    def add(self, rows: gpd.GeoDataFrame, round_idx: int, reason: str, frame_crs: str) -> int:
        """List suspects (already in the bank's CRS); returns how many new rows were added.

        A row's own ``reason`` column wins over ``reason``. A suspect overlapping a pending row
        of the same image (IoU > :data:`REVIEW_DEDUPE_IOU`) updates that row (best score,
        ``last_round``) so the same object is listed once.
        """
        require(rows, MINED_COLUMNS, "review rows")
        rows = sorted_mined(rows)
        f = self.frame
        pending = np.asarray(np.where(f["decision"].to_numpy(dtype=object) == "", f["image"].to_numpy(dtype=object),
                                      None), dtype=object)
        top, new = merge_by_iou(rows, pending, px_array(f), REVIEW_DEDUPE_IOU)
        if len(top):
            pos = top.index.to_numpy()
            prev = np.nan_to_num(f["score"].to_numpy(dtype=np.float64)[pos], nan=0.0)
            f.loc[pos, "score"] = np.maximum(prev, top.to_numpy())
            f.loc[pos, "last_round"] = round_idx
        if len(new):
            extra = self._new_rows(new, round_idx, reason, frame_crs)
            self.frame = normalize(pd.concat([self.frame, extra], ignore_index=True), REVIEW_SCHEMA, f.crs)
        return len(new)

    def _new_rows(self, rows: pd.DataFrame, round_idx: int, reason: str, frame_crs: str) -> gpd.GeoDataFrame:
        n = len(rows)
        own = rows["reason"].fillna("").astype(str).to_numpy(dtype=object) if "reason" in rows else np.full(n, "")
        neg = rows["bank_neg_id"].fillna(-1).to_numpy(dtype=np.int64) if "bank_neg_id" in rows else np.full(n, -1)
        cols = entry_columns(rows, round_idx, frame_crs)
        cols.update(
            review_id=np.arange(self.next_id, self.next_id + n, dtype=np.int64),
            reason=np.where(own != "", own, str(reason)).astype(object),
            decision=np.full(n, "", dtype=object),
            bank_neg_id=neg.astype(np.int64),
        )
        self.next_id += n
        return gpd.GeoDataFrame(cols, geometry=list(np.asarray(rows.geometry.values)), crs=self.frame.crs)
