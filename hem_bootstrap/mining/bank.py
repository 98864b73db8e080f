"""The persistent negative bank: a GeoPackage of mined false positives with provenance.

``bank.gpkg`` holds three layers, all openable in QGIS:

* ``negatives``: one row per hard negative (schema :data:`NEG_SCHEMA`). ``neg_id`` is stable
  and never reused; rows are never deleted, only ``retired`` (kept, flagged) when the model
  stops finding them hard or the bank is over its cap. Geometry is in the bank's CRS (that
  of the first rows added; later images in another CRS are reprojected and keep their own
  in ``src_crs``); the pixel box ``px_*`` in the row's own image is authoritative for
  cutting training chips.
* ``review``: suspected missing labels held out of (or listed next to) the bank until a
  person decides (schema :data:`REVIEW_SCHEMA`).
* ``meta``: id counters, so ids stay unique even after review rows are removed.

Rows are kept sorted by id, so the same inputs give the same bank row for row, and
:meth:`NegativeBank.save` replaces the file atomically: a crash mid-write leaves the
previous bank intact.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pyproj

from hem_bootstrap.config import BankConfig
from hem_bootstrap.detections import PX_COLUMNS, WIN_COLUMNS
from hem_bootstrap.errors import DataError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.files import atomic_path
from hem_bootstrap.geo.boxes import any_overlap, box_iou
from hem_bootstrap.geo.frames import crs_text
from hem_bootstrap.mining.export import export_rows
from hem_bootstrap.mining.queue import REVIEW_SCHEMA, ReviewQueue
from hem_bootstrap.mining.rows import (
    MINED_COLUMNS,
    empty,
    entry_columns,
    merge_by_iou,
    next_id,
    normalize,
    px_array,
    require,
    scores_of,
    sorted_mined,
    write_layer,
)

log = logging.getLogger(__name__)

NEG_LAYER, REVIEW_LAYER, META_LAYER = "negatives", "review", "meta"

NEG_SCHEMA: dict[str, str] = {
    "neg_id": "int64",
    "image": "str",
    "label": "int64",
    "class": "str",
    "score": "float64",
    "last_score": "float64",
    "round_added": "int64",
    "rounds_seen": "int64",
    "last_round": "int64",
    "below_rounds": "int64",
    "retired": "bool",
    "model_hash": "str",
    "strategy": "str",
    **{c: "int64" for c in WIN_COLUMNS},
    **{c: "float64" for c in PX_COLUMNS},
    "src_crs": "str",
    "reviewed": "bool",
}
"""Columns of the ``negatives`` layer (plus ``geometry``), in order. ``label`` / ``class``: the class the
detector took the box for (id and name; ``background`` for a random window). ``reviewed``: a person decided it is
a negative (``hem review apply``), so mining never queues it for review again."""


MATCH_IOU = 0.5
"""IoU above which a mined FP, or a confirmed positive, is the same object as a bank entry."""


# ------------------------------------------------------------------------------ frames


# ------------------------------------------------------------------------------ the bank


class NegativeBank:
    """Hard negatives with provenance, dedupe across rounds, refresh/retirement and review.

    Attributes:
        frame: The ``negatives`` rows (all of them, retired included), sorted by ``neg_id``.
        review_frame: Pending suspects (``review`` layer), sorted by ``review_id``.
        crs: The bank's CRS (``None`` until georeferenced rows arrive, or for plain images).
    """

    def __init__(self, crs: Any = None) -> None:
        self.crs = None if crs is None else pyproj.CRS.from_user_input(crs)
        self.frame: gpd.GeoDataFrame = empty(NEG_SCHEMA, self.crs)
        self.queue = ReviewQueue(self.crs)
        self.next_neg_id = 1

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def review_frame(self) -> gpd.GeoDataFrame:
        """The review queue's rows (``review`` layer)."""
        return self.queue.frame

    @review_frame.setter
    def review_frame(self, frame: gpd.GeoDataFrame) -> None:
        self.queue.frame = frame

    @property
    def next_review_id(self) -> int:
        """The review queue's next id."""
        return self.queue.next_id

    @next_review_id.setter
    def next_review_id(self, value: int) -> None:
        self.queue.next_id = value

    # -------------------------------------------------------------------- persistence

    @classmethod
    def load(cls, path: str | Path) -> NegativeBank:
        """Read ``bank.gpkg``; a missing file gives an empty bank.

        Raises:
            DataError: The file is not a readable GeoPackage or lacks bank columns.
        """
        p = Path(path)
        bank = cls()
        if not p.exists():
            return bank
        try:
            layers = {str(name) for name, _ in pyogrio.list_layers(p)}
            neg = gpd.read_file(p, layer=NEG_LAYER, engine="pyogrio") if NEG_LAYER in layers else None
            rev = gpd.read_file(p, layer=REVIEW_LAYER, engine="pyogrio") if REVIEW_LAYER in layers else None
            meta = pyogrio.read_dataframe(p, layer=META_LAYER) if META_LAYER in layers else None
        except (pyogrio.errors.DataSourceError, pyogrio.errors.DataLayerError, OSError) as err:
            raise DataError(f"{p}: not a readable negative bank GeoPackage ({err})") from None
        if neg is None:
            raise DataError(f"{p}: no '{NEG_LAYER}' layer; is this a negative bank?")
        require(neg, ("neg_id", "image", *PX_COLUMNS), f"{p} layer '{NEG_LAYER}'")
        bank.crs = neg.crs
        bank.frame = normalize(neg, NEG_SCHEMA, bank.crs)
        if rev is not None and len(rev):
            rev = rev.to_crs(bank.crs) if (rev.crs is not None and bank.crs is not None) else rev
            bank.review_frame = normalize(rev, REVIEW_SCHEMA, bank.crs)
        else:
            bank.review_frame = empty(REVIEW_SCHEMA, bank.crs)
        counters = (
            dict(zip(meta["key"], meta["value"], strict=True)) if meta is not None and len(meta) else {}
        )
        bank.next_neg_id = max(int(counters.get("next_neg_id", 1)), next_id(bank.frame, "neg_id"))
        bank.next_review_id = max(
            int(counters.get("next_review_id", 1)), next_id(bank.review_frame, "review_id")
        )
        return bank

    def save(self, path: str | Path) -> None:
        """Write all layers to a temporary file beside ``path``, then rename it over ``path``.

        ``os.replace`` is atomic on one filesystem, so readers see either the old or the new
        bank, never a half-written one; on any error the temporary file is removed and the
        previous bank is untouched.
        """
        with atomic_path(Path(path), ".gpkg") as tmp:
            write_layer(self.frame, tmp, NEG_LAYER)
            write_layer(self.review_frame, tmp, REVIEW_LAYER)
            meta = pd.DataFrame(
                {
                    "key": ["next_neg_id", "next_review_id", "format"],
                    "value": [str(self.next_neg_id), str(self.next_review_id), "hem-bank-1"],
                }
            )
            pyogrio.write_dataframe(meta, tmp, layer=META_LAYER, driver="GPKG")
            fault_point("bank.replace")

    # -------------------------------------------------------------------- adding

    def add(
        self, mined: gpd.GeoDataFrame, round_idx: int, model_hash: str, strategy: str, cfg: BankConfig
    ) -> dict[str, int]:
        """Add a round's mined false positives, merging repeats into existing entries.

        A mined box overlapping an entry of the same image (active or retired) with pixel
        IoU > ``cfg.dedupe_iou`` updates that entry (``rounds_seen`` once per round,
        ``last_score``, ``last_round``, un-retired) instead of adding a duplicate; among the
        remaining new boxes of an image only the highest-scoring of each overlapping group
        (IoU > ``cfg.dedupe_iou``) is added.

        Args:
            mined: Detection frame with ``px_xmin .. px_ymax`` pixel boxes.
            round_idx: The mining round.
            model_hash: Hash of the model that produced the detections (provenance).
            strategy: Strategy label (provenance), see ``strategy_label``.
            cfg: Bank settings.

        Returns:
            ``{"added": new rows, "updated": existing entries updated}``.
        """
        if mined is None or len(mined) == 0:
            return {"added": 0, "updated": 0}
        require(mined, MINED_COLUMNS, "mined negatives")
        src = crs_text(getattr(mined, "crs", None))
        mined = sorted_mined(self._to_bank_crs(mined))
        top, new = merge_by_iou(mined, self.frame["image"].to_numpy(dtype=object), px_array(self.frame),
                                cfg.dedupe_iou)
        if len(top):
            self._touch(top.index.to_numpy(), top.to_numpy(), round_idx)
        if len(new):
            extra = self._new_rows(new, round_idx, model_hash, strategy, src)
            self.frame = normalize(pd.concat([self.frame, extra], ignore_index=True), NEG_SCHEMA, self.crs)
        return {"added": len(new), "updated": len(top)}

    def _to_bank_crs(self, frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        """Adopt the first rows' CRS; reproject later frames in another CRS."""
        crs = getattr(frame, "crs", None)
        if self.crs is None and len(self.frame) == 0 and len(self.review_frame) == 0 and crs is not None:
            self.crs = pyproj.CRS.from_user_input(crs)
            self.frame = self.frame.set_crs(self.crs, allow_override=True)
            self.queue.set_crs(self.crs)
            return frame
        if crs is not None and self.crs is not None and crs != self.crs:
            return frame.to_crs(self.crs)
        if (crs is None) != (self.crs is None):
            log.warning("negative bank: mixing georeferenced and pixel-space rows; geometry kept as given")
        return frame

    def _touch(self, pos: np.ndarray, score: np.ndarray, round_idx: int) -> None:
        """Entries found hard again this round: count the round once, keep the best score."""
        f = self.frame
        last = f["last_round"].to_numpy()[pos]
        prev = np.nan_to_num(f["last_score"].to_numpy(dtype=np.float64)[pos], nan=0.0)
        first_time = last < round_idx
        f.loc[pos, "last_score"] = np.where(first_time, score, np.maximum(prev, score))
        f.loc[pos[first_time], "rounds_seen"] += 1
        f.loc[pos, "last_round"] = np.maximum(last, round_idx)
        f.loc[pos, "below_rounds"] = 0
        f.loc[pos, "retired"] = False

    def _new_rows(
        self, rows: pd.DataFrame, round_idx: int, model_hash: str, strategy: str, src: str
    ) -> gpd.GeoDataFrame:
        """Bank rows for new entries, with fresh ids in processing order."""
        n = len(rows)
        cols = entry_columns(rows, round_idx, src)
        cols.update(
            neg_id=np.arange(self.next_neg_id, self.next_neg_id + n, dtype=np.int64),
            last_score=rows["score"].to_numpy(dtype=np.float64),
            rounds_seen=np.ones(n, dtype=np.int64),
            below_rounds=np.zeros(n, dtype=np.int64),
            retired=np.zeros(n, dtype=bool),
            model_hash=np.full(n, str(model_hash), dtype=object),
            strategy=np.full(n, str(strategy), dtype=object),
        )
        self.next_neg_id += n
        return gpd.GeoDataFrame(cols, geometry=list(np.asarray(rows.geometry.values)), crs=self.crs)

    # -------------------------------------------------------------------- refresh / evict

    def rescore(self, dets: pd.DataFrame, iou: float) -> dict[int, float]:
        """Each active entry's score in a new scan: its best same-image detection at pixel IoU >= ``iou``, else 0.

        ``dets`` needs ``image``, ``score`` and the ``px_*`` columns; feed the result to :meth:`refresh`.
        """
        scores: dict[int, float] = {}
        for image, rows in self.active().groupby("image"):
            d = dets[dets["image"] == image]
            best = np.zeros(len(rows))
            if len(d):
                ious = box_iou(px_array(rows), px_array(d))
                best = np.where(ious >= iou, scores_of(d)[None, :], 0.0).max(axis=1)
            scores.update(zip(rows["neg_id"].astype(int).tolist(), best.astype(float).tolist(), strict=True))
        return scores

    def refresh(
        self, scores: Mapping[int, float] | pd.DataFrame, round_idx: int, cfg: BankConfig
    ) -> dict[str, int]:
        """Record this round's score of bank entries (re-scored with the new model).

        An active entry scoring below ``cfg.retire_below`` for ``cfg.retire_rounds``
        consecutive rounds is retired (kept, flagged): the model has learned it, and spending
        training batches on it would crowd out the entries still hard. Scoring at or above
        resets the count and counts the round in ``rounds_seen``. Retired entries only get
        ``last_score``; they come back if mined again (:meth:`add`).

        Args:
            scores: ``neg_id -> score``, or a frame with ``neg_id`` and ``score`` columns.
            round_idx: The round the scores come from.
            cfg: Bank settings.

        Returns:
            ``{"refreshed": entries scored, "retired": entries retired now}``.

        Raises:
            DataError: A ``neg_id`` that is not in the bank.
        """
        mapping = _score_mapping(scores)
        if not mapping:
            return {"refreshed": 0, "retired": 0}
        ids = self.frame["neg_id"].to_numpy()
        unknown = sorted(set(mapping) - set(ids.tolist()))
        if unknown:
            raise DataError(f"bank refresh: neg_id(s) {unknown[:5]} not in the bank")
        f = self.frame
        pos = np.searchsorted(ids, np.fromiter(mapping, dtype=np.int64))
        new = np.fromiter(mapping.values(), dtype=np.float64)
        active = ~f["retired"].to_numpy()[pos]
        low = new < cfg.retire_below
        f.loc[pos, "last_score"] = new
        below = f["below_rounds"].to_numpy()[pos]
        below = np.where(active & low, below + 1, np.where(active, 0, below))
        f.loc[pos, "below_rounds"] = below
        hard_now = active & ~low & (f["last_round"].to_numpy()[pos] < round_idx)
        f.loc[pos[hard_now], "rounds_seen"] += 1
        f.loc[pos[hard_now], "last_round"] = round_idx
        retire = active & (below >= cfg.retire_rounds)
        f.loc[pos[retire], "retired"] = True
        return {"refreshed": len(mapping), "retired": int(retire.sum())}

    def evict(self, cfg: BankConfig) -> int:
        """Retire the easiest active entries (lowest ``last_score``, then oldest) beyond ``cfg.max_size``."""
        if cfg.max_size is None:
            return 0
        act = self.frame[~self.frame["retired"]]
        excess = len(act) - cfg.max_size
        if excess <= 0:
            return 0
        order = act.assign(_s=np.nan_to_num(act["last_score"].to_numpy(), nan=-1.0)).sort_values(
            ["_s", "neg_id"], kind="stable"
        )
        self.frame.loc[order.index[:excess], "retired"] = True
        return int(excess)

    # -------------------------------------------------------------------- views

    def active(self) -> gpd.GeoDataFrame:
        """Active (not retired) entries, sorted by ``neg_id``."""
        return self.frame[~self.frame["retired"]].reset_index(drop=True)

    def training_negatives(self, cfg: BankConfig | None = None) -> pd.DataFrame:
        """What training needs to cut negative chips from active entries.

        Columns ``image, px_xmin, px_ymin, px_xmax, px_ymax, last_score, neg_id`` and, when
        ``cfg`` is given, ``weight`` (:meth:`sample_weights`), which the chip sampler uses.
        """
        act = self.active()
        out = pd.DataFrame({c: act[c].to_numpy() for c in ("image", *PX_COLUMNS, "last_score", "neg_id")})
        out["image"] = out["image"].astype(str)
        if cfg is not None:
            out["weight"] = self.sample_weights(cfg)
        return out

    def sample_weights(self, cfg: BankConfig) -> np.ndarray:
        """Per active entry (``neg_id`` order): 1, or ``max(last_score ** (1/T), floor)``.

        Score sampling favours the negatives the model still finds hard; the floor keeps
        every entry drawable. Falls back to uniform when every weight would be zero.
        """
        s = np.clip(np.nan_to_num(self.active()["last_score"].to_numpy(dtype=np.float64), nan=0.0), 0.0, 1.0)
        if cfg.sampling == "uniform":
            return np.ones(len(s), dtype=np.float64)
        w = np.maximum(s ** (1.0 / cfg.temperature), cfg.floor)
        return w if (len(w) == 0 or w.sum() > 0) else np.ones(len(s), dtype=np.float64)

    def stats(self) -> dict[str, Any]:
        """Counts by round added and by strategy, active/retired, review, score histogram."""
        f = self.frame
        act = self.active()
        counts, edges = np.histogram(
            act["last_score"].dropna().to_numpy(dtype=np.float64), bins=10, range=(0, 1)
        )
        return {
            "total": int(len(f)),
            "active": int(len(act)),
            "retired": int(f["retired"].sum()),
            "review_pending": int((self.review_frame["decision"] == "").sum()),
            "by_round": {str(k): int(v) for k, v in f.groupby("round_added").size().items()},
            "by_strategy": {str(k): int(v) for k, v in f.groupby("strategy").size().items()},
            "active_by_round": {str(k): int(v) for k, v in act.groupby("round_added").size().items()},
            "score_hist": {"edges": [round(float(e), 2) for e in edges], "counts": [int(c) for c in counts]},
            "crs": crs_text(self.crs),
        }

    # -------------------------------------------------------------------- export and review

    def export(
        self,
        path: str | Path,
        fmt: str,
        rasters: Mapping[str, Any] | None = None,
        include_retired: bool = False,
        classes: Sequence[str] = (),
    ) -> int:
        """Write the active entries (all with ``include_retired``) as GeoJSON or COCO JSON; see :func:`export_rows`."""
        return export_rows(self.frame if include_retired else self.active(), Path(path), fmt, rasters, classes)

    def review(self) -> gpd.GeoDataFrame:
        """The review rows (suspected missing labels), sorted by ``review_id``."""
        return self.queue.frame.copy()

    def add_review(self, rows: gpd.GeoDataFrame, round_idx: int, reason: str) -> int:
        """List suspects for a person to check (see :meth:`ReviewQueue.add`); returns how many are new."""
        if rows is None or len(rows) == 0:
            return 0
        src = crs_text(getattr(rows, "crs", None))
        return self.queue.add(self._to_bank_crs(rows), round_idx, reason, src)

    def mark_reviewed(self, negatives: pd.DataFrame) -> None:
        """Flag the entries a person decided are negatives (those overlapping ``negatives`` above ``MATCH_IOU``)."""
        for pos in self._overlapping(negatives, active_only=False):
            self.frame.loc[pos, "reviewed"] = True

    def retire_overlapping(self, positives: pd.DataFrame) -> int:
        """Retire active entries that are confirmed objects (overlapping ``positives``); returns how many."""
        n = 0
        for pos in self._overlapping(positives, active_only=True):
            self.frame.loc[pos, "retired"] = True
            n += len(pos)
        return n

    def _overlapping(self, rows: pd.DataFrame, active_only: bool) -> list[np.ndarray]:
        """Per image of ``rows``: positions of entries overlapping one of them above ``MATCH_IOU``."""
        f = self.frame
        out = []
        for image, group in rows.groupby("image", sort=True):
            cand = np.flatnonzero((f["image"].to_numpy() == str(image)) & ~(active_only & f["retired"].to_numpy()))
            if len(cand):
                out.append(cand[any_overlap(px_array(f.iloc[cand]), px_array(group), MATCH_IOU)])
        return out


def _score_mapping(scores: Mapping[int, float] | pd.DataFrame) -> dict[int, float]:
    if isinstance(scores, pd.DataFrame):
        require(scores, ("neg_id", "score"), "bank refresh scores")
        return {int(k): float(v) for k, v in zip(scores["neg_id"], scores["score"], strict=True)}
    return {int(k): float(v) for k, v in scores.items()}


# ------------------------------------------------------------------------------ review routing
