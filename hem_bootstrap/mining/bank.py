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

import json
import logging
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio
import pyproj
import shapely

from hem_bootstrap.config import BankConfig, MiningConfig
from hem_bootstrap.detections import DETECTION_COLUMNS, PX_COLUMNS, WIN_COLUMNS
from hem_bootstrap.errors import DataError, HemError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.files import atomic_path
from hem_bootstrap.geo.boxes import any_overlap, best_match, box_iou, nms
from hem_bootstrap.geo.frames import crs_text

log = logging.getLogger(__name__)

NEG_LAYER, REVIEW_LAYER, META_LAYER = "negatives", "review", "meta"

NEG_SCHEMA: dict[str, str] = {
    "neg_id": "int64",
    "image": "str",
    "label": "int64",
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
"""Columns of the ``negatives`` layer (plus ``geometry``), in order. ``reviewed``: a person decided it is
a negative (``hem review apply``), so mining never queues it for review again."""

REVIEW_SCHEMA: dict[str, str] = {
    "review_id": "int64",
    "image": "str",
    "label": "int64",
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

MINED_COLUMNS = (*DETECTION_COLUMNS, *PX_COLUMNS)
REVIEW_DEDUPE_IOU = 0.5
"""A suspect overlapping a pending review row above this IoU updates it instead of adding one."""
MATCH_IOU = 0.5
"""IoU above which a mined FP, or a confirmed positive, is the same object as a bank entry."""
HIGH_SCORE = 0.8
"""Score above which repeated mining of the same entry looks like a missing label."""
DECISIONS = ("positive", "negative")
REVIEWED_STRATEGY = "review"
"""The ``strategy`` of bank rows a person decided are negatives (they never go back to review)."""


# ------------------------------------------------------------------------------ frames


def _empty(schema: Mapping[str, str], crs: Any) -> gpd.GeoDataFrame:
    cols = {c: pd.Series([], dtype=object if t == "str" else t) for c, t in schema.items()}
    return _normalize(gpd.GeoDataFrame(cols, geometry=gpd.GeoSeries([], crs=crs), crs=crs), schema, crs)


def _normalize(frame: gpd.GeoDataFrame, schema: Mapping[str, str], crs: Any) -> gpd.GeoDataFrame:
    """Schema columns in order with fixed dtypes, sorted by the id column, fresh index."""
    out = {}
    n = len(frame)
    for col, dtype in schema.items():
        values = frame[col] if col in frame.columns else pd.Series([_default(dtype)] * n, index=frame.index)
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


def _default(dtype: str) -> Any:
    return {"str": "", "bool": False, "int64": -1, "float64": np.nan}[dtype]


def _px_array(frame: pd.DataFrame) -> np.ndarray:
    """(N, 4) float64 pixel boxes, column by column (cheap even on a large GeoDataFrame)."""
    if len(frame) == 0:
        return np.zeros((0, 4), dtype=np.float64)
    return np.column_stack([frame[c].to_numpy(dtype=np.float64) for c in PX_COLUMNS])


def _require(frame: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing column(s) {missing}; expected {list(columns)}")


def _scores(frame: pd.DataFrame) -> np.ndarray:
    return np.nan_to_num(frame["score"].to_numpy(dtype=np.float64), nan=0.0)


def _sorted_mined(mined: pd.DataFrame) -> pd.DataFrame:
    """Deterministic processing order: image, then score descending, then pixel box."""
    key = mined.assign(_neg_score=-_scores(mined))
    key = key.sort_values(["image", "_neg_score", *PX_COLUMNS], kind="stable")
    return key.drop(columns="_neg_score")


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
        self.frame: gpd.GeoDataFrame = _empty(NEG_SCHEMA, self.crs)
        self.review_frame: gpd.GeoDataFrame = _empty(REVIEW_SCHEMA, self.crs)
        self.next_neg_id = 1
        self.next_review_id = 1

    def __len__(self) -> int:
        return len(self.frame)

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
        _require(neg, ("neg_id", "image", *PX_COLUMNS), f"{p} layer '{NEG_LAYER}'")
        bank.crs = neg.crs
        bank.frame = _normalize(neg, NEG_SCHEMA, bank.crs)
        if rev is not None and len(rev):
            rev = rev.to_crs(bank.crs) if (rev.crs is not None and bank.crs is not None) else rev
            bank.review_frame = _normalize(rev, REVIEW_SCHEMA, bank.crs)
        else:
            bank.review_frame = _empty(REVIEW_SCHEMA, bank.crs)
        counters = (
            dict(zip(meta["key"], meta["value"], strict=True)) if meta is not None and len(meta) else {}
        )
        bank.next_neg_id = max(int(counters.get("next_neg_id", 1)), _next_id(bank.frame, "neg_id"))
        bank.next_review_id = max(
            int(counters.get("next_review_id", 1)), _next_id(bank.review_frame, "review_id")
        )
        return bank

    def save(self, path: str | Path) -> None:
        """Write all layers to a temporary file beside ``path``, then rename it over ``path``.

        ``os.replace`` is atomic on one filesystem, so readers see either the old or the new
        bank, never a half-written one; on any error the temporary file is removed and the
        previous bank is untouched.
        """
        with atomic_path(Path(path), ".gpkg") as tmp:
            _write_layer(self.frame, tmp, NEG_LAYER)
            _write_layer(self.review_frame, tmp, REVIEW_LAYER)
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
        _require(mined, MINED_COLUMNS, "mined negatives")
        src = crs_text(getattr(mined, "crs", None))
        mined = _sorted_mined(self._to_bank_crs(mined))
        bank_px = _px_array(self.frame)
        bank_images = self.frame["image"].to_numpy(dtype=object)
        fresh: list[pd.DataFrame] = []
        updated = 0
        for image, group in mined.groupby("image", sort=True):
            existing = np.flatnonzero(bank_images == str(image))
            keep, n_upd = self._merge_image(group, existing, bank_px[existing], round_idx, cfg.dedupe_iou)
            updated += n_upd
            fresh.append(keep)
        new = pd.concat(fresh) if fresh else mined.iloc[:0]
        if len(new):
            extra = self._new_rows(new, round_idx, model_hash, strategy, src)
            self.frame = _normalize(pd.concat([self.frame, extra], ignore_index=True), NEG_SCHEMA, self.crs)
        return {"added": len(new), "updated": updated}

    def _to_bank_crs(self, frame: gpd.GeoDataFrame) -> gpd.GeoDataFrame:
        """Adopt the first rows' CRS; reproject later frames in another CRS."""
        crs = getattr(frame, "crs", None)
        if self.crs is None and len(self.frame) == 0 and len(self.review_frame) == 0 and crs is not None:
            self.crs = pyproj.CRS.from_user_input(crs)
            self.frame = self.frame.set_crs(self.crs, allow_override=True)
            self.review_frame = self.review_frame.set_crs(self.crs, allow_override=True)
            return frame
        if crs is not None and self.crs is not None and crs != self.crs:
            return frame.to_crs(self.crs)
        if (crs is None) != (self.crs is None):
            log.warning("negative bank: mixing georeferenced and pixel-space rows; geometry kept as given")
        return frame

    def _merge_image(
        self, group: pd.DataFrame, existing: np.ndarray, existing_px: np.ndarray, round_idx: int, iou: float
    ) -> tuple[pd.DataFrame, int]:
        """Update entries matched by ``group`` rows; return the unmatched, de-duplicated rows."""
        boxes = _px_array(group)
        scores = _scores(group)
        matched = np.zeros(len(group), dtype=bool)
        n_upd = 0
        if len(existing):
            best, arg = best_match(boxes, existing_px)
            matched = best > iou
            targets = existing[arg][matched]
            if len(targets):
                top = pd.Series(scores[matched]).groupby(targets).max()
                self._touch(top.index.to_numpy(), top.to_numpy(), round_idx)
                n_upd = len(top)
        rest = np.flatnonzero(~matched)
        if len(rest) == 0:
            return group.iloc[[]], n_upd
        keep = nms(boxes[rest], scores[rest], float(iou))
        return group.iloc[np.sort(rest[keep])], n_upd

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
        cols: dict[str, Any] = {c: rows[c].to_numpy() for c in ("label", "score", *WIN_COLUMNS, *PX_COLUMNS)}
        cols.update(
            neg_id=np.arange(self.next_neg_id, self.next_neg_id + n, dtype=np.int64),
            image=rows["image"].astype(str).to_numpy(dtype=object),
            last_score=rows["score"].to_numpy(dtype=np.float64),
            round_added=np.full(n, round_idx, dtype=np.int64),
            rounds_seen=np.ones(n, dtype=np.int64),
            last_round=np.full(n, round_idx, dtype=np.int64),
            below_rounds=np.zeros(n, dtype=np.int64),
            retired=np.zeros(n, dtype=bool),
            model_hash=np.full(n, str(model_hash), dtype=object),
            strategy=np.full(n, str(strategy), dtype=object),
            src_crs=_src_crs(rows, src),
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
                ious = box_iou(_px_array(rows), _px_array(d))
                best = np.where(ious >= iou, _scores(d)[None, :], 0.0).max(axis=1)
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

    # -------------------------------------------------------------------- export

    def export(
        self,
        path: str | Path,
        fmt: str,
        rasters: Mapping[str, Any] | None = None,
        include_retired: bool = False,
    ) -> int:
        """Write the active entries (all with ``include_retired``) as GeoJSON or COCO JSON.

        COCO uses pixel boxes (the ``px_*`` columns; where one is missing and ``rasters``
        maps the image to its affine transform, it is derived from the geometry) and a single
        category ``hard_negative``; image sizes are read from the rasters when they exist.

        Returns:
            The number of entries written.

        Raises:
            DataError: ``fmt`` is neither ``geojson`` nor ``coco``.
        """
        rows = self.frame if include_retired else self.active()
        if fmt not in ("geojson", "coco"):
            raise DataError(f"bank export: format = {fmt!r}, expected 'geojson' or 'coco'")
        with atomic_path(Path(path)) as tmp:
            if fmt == "geojson":
                _write_geojson(rows, tmp)
            else:
                tmp.write_text(json.dumps(_coco(rows, rasters), indent=1))
        return int(len(rows))

    # -------------------------------------------------------------------- review

    def review(self) -> gpd.GeoDataFrame:
        """The review rows (suspected missing labels), sorted by ``review_id``."""
        return self.review_frame.copy()

    def add_review(self, rows: gpd.GeoDataFrame, round_idx: int, reason: str) -> int:
        """List suspects for a person to check; returns how many new review rows were added.

        A row's own ``reason`` column (from :func:`route_for_review`) wins over ``reason``.
        A suspect overlapping a pending row of the same image (IoU > 0.5) updates that row
        (best score, ``last_round``) so the same object is listed once.
        """
        if rows is None or len(rows) == 0:
            return 0
        _require(rows, MINED_COLUMNS, "review rows")
        src = crs_text(getattr(rows, "crs", None))
        rows = _sorted_mined(self._to_bank_crs(rows))
        rf = self.review_frame
        review_px = _px_array(rf)
        open_images = np.where(
            rf["decision"].to_numpy(dtype=object) == "", rf["image"].to_numpy(dtype=object), None
        )
        fresh: list[pd.DataFrame] = []
        for image, group in rows.groupby("image", sort=True):
            pending = np.flatnonzero(open_images == str(image))
            fresh.append(self._merge_review(group, pending, review_px[pending], round_idx))
        new = pd.concat(fresh) if fresh else rows.iloc[:0]
        if len(new):
            extra = self._new_review_rows(new, round_idx, reason, src)
            merged = pd.concat([self.review_frame, extra], ignore_index=True)
            self.review_frame = _normalize(merged, REVIEW_SCHEMA, self.crs)
        return len(new)

    def _merge_review(
        self, group: pd.DataFrame, pending: np.ndarray, pending_px: np.ndarray, round_idx: int
    ) -> pd.DataFrame:
        """Update pending rows matched by ``group``; return the unmatched, de-duplicated rows."""
        boxes = _px_array(group)
        scores = _scores(group)
        matched = np.zeros(len(group), dtype=bool)
        if len(pending):
            best, arg = best_match(boxes, pending_px)
            matched = best > REVIEW_DEDUPE_IOU
            targets = pending[arg][matched]
            if len(targets):
                top = pd.Series(scores[matched]).groupby(targets).max()
                pos = top.index.to_numpy()
                rf = self.review_frame
                prev = np.nan_to_num(rf["score"].to_numpy(dtype=np.float64)[pos], nan=0.0)
                rf.loc[pos, "score"] = np.maximum(prev, top.to_numpy())
                rf.loc[pos, "last_round"] = round_idx
        rest = np.flatnonzero(~matched)
        if len(rest) == 0:
            return group.iloc[[]]
        keep = nms(boxes[rest], scores[rest], REVIEW_DEDUPE_IOU)
        return group.iloc[np.sort(rest[keep])]

    def _new_review_rows(self, rows: pd.DataFrame, round_idx: int, reason: str, src: str) -> gpd.GeoDataFrame:
        """Pending review rows with fresh ids; a row's own ``reason`` wins over ``reason``."""
        n = len(rows)
        own = (
            rows["reason"].fillna("").astype(str).to_numpy(dtype=object)
            if "reason" in rows
            else np.full(n, "")
        )
        neg = (
            rows["bank_neg_id"].fillna(-1).to_numpy(dtype=np.int64)
            if "bank_neg_id" in rows
            else np.full(n, -1)
        )
        cols: dict[str, Any] = {c: rows[c].to_numpy() for c in ("label", "score", *WIN_COLUMNS, *PX_COLUMNS)}
        cols.update(
            review_id=np.arange(self.next_review_id, self.next_review_id + n, dtype=np.int64),
            image=rows["image"].astype(str).to_numpy(dtype=object),
            round_added=np.full(n, round_idx, dtype=np.int64),
            last_round=np.full(n, round_idx, dtype=np.int64),
            reason=np.where(own != "", own, str(reason)).astype(object),
            decision=np.full(n, "", dtype=object),
            bank_neg_id=neg.astype(np.int64),
            src_crs=_src_crs(rows, src),
        )
        self.next_review_id += n
        return gpd.GeoDataFrame(cols, geometry=list(np.asarray(rows.geometry.values)), crs=self.crs)


def _src_crs(rows: pd.DataFrame, frame_crs: str) -> np.ndarray:
    """Each row's own CRS: its ``src_crs`` column (rows joined from several CRSs), else the frame's."""
    if "src_crs" in rows.columns:
        own = rows["src_crs"].fillna("").astype(str).to_numpy(dtype=object)
        return np.where(own == "", frame_crs, own).astype(object)
    return np.full(len(rows), frame_crs, dtype=object)


def _next_id(frame: pd.DataFrame, col: str) -> int:
    return int(frame[col].max()) + 1 if len(frame) else 1


def _score_mapping(scores: Mapping[int, float] | pd.DataFrame) -> dict[int, float]:
    if isinstance(scores, pd.DataFrame):
        _require(scores, ("neg_id", "score"), "bank refresh scores")
        return {int(k): float(v) for k, v in zip(scores["neg_id"], scores["score"], strict=True)}
    return {int(k): float(v) for k, v in scores.items()}


def _write_layer(frame: gpd.GeoDataFrame, path: Path, layer: str) -> None:
    with warnings.catch_warnings():  # a pixel-space bank has no CRS by design
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        pyogrio.write_dataframe(frame, path, layer=layer, driver="GPKG", geometry_type="Polygon")


def _write_geojson(rows: gpd.GeoDataFrame, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="'crs' was not provided")
        pyogrio.write_dataframe(rows, path, driver="GeoJSON", geometry_type="Polygon")


def _coco(rows: gpd.GeoDataFrame, rasters: Mapping[str, Any] | None) -> dict[str, Any]:
    """COCO detection dict of hard negatives in pixel coordinates."""
    from hem_bootstrap.geo.raster import open_raster
    from hem_bootstrap.geo.windows import map_to_pixel_boxes

    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    for image_id, (image, group) in enumerate(rows.groupby("image", sort=True), start=1):
        entry: dict[str, Any] = {"id": image_id, "file_name": str(image)}
        if Path(str(image)).is_file():
            try:
                info = open_raster(str(image))
                entry.update(width=int(info.width), height=int(info.height))
            except HemError:
                pass
        images.append(entry)
        px = group[list(PX_COLUMNS)].to_numpy(dtype=np.float64)
        missing = np.isnan(px).any(axis=1)
        if missing.any() and rasters and str(image) in rasters:
            bounds = shapely.bounds(np.asarray(group.geometry.values)[missing])
            px[missing] = map_to_pixel_boxes(bounds, rasters[str(image)])
        for (x0, y0, x1, y1), row in zip(px, group.itertuples(index=False), strict=True):
            if np.isnan([x0, y0, x1, y1]).any():
                continue
            w, h = float(x1 - x0), float(y1 - y0)
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": 1,
                    "bbox": [float(x0), float(y0), w, h],
                    "area": w * h,
                    "iscrowd": 0,
                    "score": None if pd.isna(row.last_score) else float(row.last_score),
                    "neg_id": int(row.neg_id),
                    "predicted_label": int(row.label),
                }
            )
    return {
        "info": {"description": "hem-bootstrap negative bank (hard negatives)"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "hard_negative", "supercategory": "background"}],
    }


# ------------------------------------------------------------------------------ review routing


def route_for_review(
    mined: gpd.GeoDataFrame, bank: NegativeBank, cfg: MiningConfig
) -> tuple[gpd.GeoDataFrame, gpd.GeoDataFrame]:
    """Split mined FPs into those for the bank and suspected missing labels for review.

    A false positive is suspect when its score is above ``cfg.review_above`` (reason
    ``score>0.95``), or when it matches (IoU > 0.5) an active bank entry already found hard
    in ``cfg.review_after_rounds`` rounds, still scoring > 0.8 and scoring > 0.8 again
    (reason ``mined N rounds``): a model that insists is often right and the label missing.
    With ``review_mode == "hold"`` suspects stay out of the bank; with ``"bank"`` they go to
    both. ``to_review`` carries ``reason`` and ``bank_neg_id`` (-1 when none) columns.
    """
    if len(mined) == 0:
        return mined, mined.assign(
            reason=pd.Series([], dtype=object), bank_neg_id=pd.Series([], dtype=np.int64)
        )
    scores = _scores(mined)
    reason = np.full(len(mined), "", dtype=object)
    match_id = np.full(len(mined), -1, dtype=np.int64)
    if cfg.review_above is not None:
        reason[scores > cfg.review_above] = f"score>{cfg.review_above:g}"
    _repeated(mined, bank, cfg.review_after_rounds, scores, reason, match_id)
    reason[_decided_negative(mined, bank)] = ""  # a person already said: background
    suspect = reason != ""
    to_review = mined[suspect].assign(reason=reason[suspect], bank_neg_id=match_id[suspect])
    to_bank = mined if cfg.review_mode == "bank" else mined[~suspect]
    return to_bank, to_review


def _decided_negative(mined: gpd.GeoDataFrame, bank: NegativeBank) -> np.ndarray:
    """Mined rows that match (IoU > ``MATCH_IOU``) a bank entry a person decided is a negative."""
    out = np.zeros(len(mined), dtype=bool)
    act = bank.active()
    decided = act[act["reviewed"].to_numpy(dtype=bool)]
    if len(decided) == 0 or not {*PX_COLUMNS} <= set(mined.columns):
        return out
    images = mined["image"].astype(str).to_numpy(dtype=object)
    dec_images = decided["image"].astype(str).to_numpy(dtype=object)
    mined_px, dec_px = _px_array(mined), _px_array(decided)
    for image in np.unique(images):
        ent = np.flatnonzero(dec_images == image)
        if len(ent):
            rows = np.flatnonzero(images == image)
            out[rows[any_overlap(mined_px[rows], dec_px[ent], MATCH_IOU)]] = True
    return out


def _repeated(
    mined: gpd.GeoDataFrame,
    bank: NegativeBank,
    after_rounds: int,
    scores: np.ndarray,
    reason: np.ndarray,
    match_id: np.ndarray,
) -> None:
    """Mark (in place) high-scoring FPs matching bank entries hard for ``after_rounds`` rounds."""
    act = bank.active()
    if len(act) == 0 or not {*PX_COLUMNS} <= set(mined.columns):
        return
    vet = act[(act["rounds_seen"] >= after_rounds) & (act["last_score"] > HIGH_SCORE)]
    if len(vet) == 0:
        return
    vet_px, vet_images = _px_array(vet), vet["image"].to_numpy(dtype=object)
    vet_ids, vet_rounds = vet["neg_id"].to_numpy(), vet["rounds_seen"].to_numpy()
    mined_px = _px_array(mined)
    images = mined["image"].astype(str).to_numpy(dtype=object)
    for image in np.unique(images[scores > HIGH_SCORE]):
        ent = np.flatnonzero(vet_images == image)
        rows = np.flatnonzero((images == image) & (scores > HIGH_SCORE))
        if len(ent) == 0:
            continue
        best, arg = best_match(mined_px[rows], vet_px[ent])
        for i, hit, j in zip(rows, (best > MATCH_IOU).tolist(), ent[arg], strict=True):
            if hit:
                match_id[i] = int(vet_ids[j])
                if not reason[i]:
                    reason[i] = f"mined {int(vet_rounds[j])} rounds"


def apply_review(
    bank: NegativeBank, decisions: pd.DataFrame, cfg: BankConfig | None = None
) -> dict[str, Any]:
    """Apply a person's review decisions to the bank.

    ``decisions`` needs ``review_id`` and ``decision`` columns (e.g. the ``review`` layer
    edited in QGIS). ``negative`` rows move into the bank (strategy ``review``);
    ``positive`` rows are returned for the caller to add to the labels, and bank entries
    overlapping them (IoU > 0.5) are retired, since they are objects after all; a hard
    positive listed because it was missed every round is already labelled, so ``positive``
    only confirms it. Both leave the
    review layer; blank decisions stay pending.

    Returns:
        ``{"new_positives": GeoDataFrame, "negatives_added": int, "negatives_retired": int}``.

    Raises:
        DataError: A missing column, an unknown ``review_id`` or a decision other than
            ``positive``, ``negative`` or blank, naming the row.
    """
    cfg = cfg or BankConfig.model_validate({})
    _require(decisions, ("review_id", "decision"), "review decisions")
    chosen = _parse_decisions(decisions, bank)
    rf = bank.review_frame
    pos_rows = rf[rf["review_id"].isin([k for k, v in chosen.items() if v == "positive"])]
    neg_rows = rf[rf["review_id"].isin([k for k, v in chosen.items() if v == "negative"])]
    moved = 0
    for rnd, group in neg_rows.groupby("last_round", sort=True):
        res = bank.add(gpd.GeoDataFrame(group, crs=bank.crs), int(rnd), "", REVIEWED_STRATEGY, cfg)
        moved += res["added"] + res["updated"]
    _mark_reviewed(bank, neg_rows)
    retired = _retire_overlapping(bank, pos_rows)
    from hem_bootstrap.mining.positives import REVIEW_REASON

    pos_rows = pos_rows[pos_rows["reason"] != REVIEW_REASON]  # already labelled: confirmed, nothing to add
    positives = gpd.GeoDataFrame(
        pos_rows[["review_id", "image", "label", "score", *PX_COLUMNS, "geometry"]].reset_index(drop=True),
        geometry="geometry",
        crs=bank.crs,
    )
    bank.review_frame = rf[~rf["review_id"].isin(list(chosen))].reset_index(drop=True)
    return {"new_positives": positives, "negatives_added": moved, "negatives_retired": retired}


def _parse_decisions(decisions: pd.DataFrame, bank: NegativeBank) -> dict[int, str]:
    """``review_id -> decision`` for decided rows, validated."""
    known = set(bank.review_frame["review_id"].tolist())
    out: dict[int, str] = {}
    for i, (rid, raw) in enumerate(zip(decisions["review_id"], decisions["decision"], strict=True)):
        if pd.isna(rid) or int(rid) not in known:
            raise DataError(f"review decisions row {i}: review_id = {rid!r} is not in the review layer")
        value = "" if raw is None or (isinstance(raw, float) and np.isnan(raw)) else str(raw).strip().lower()
        if value == "":
            continue
        if value not in DECISIONS:
            raise DataError(
                f"review decisions row {i} (review_id {int(rid)}): decision = {raw!r}, "
                f"expected 'positive', 'negative' or blank (pending)"
            )
        if out.get(int(rid), value) != value:
            raise DataError(f"review decisions row {i}: review_id {int(rid)} is both positive and negative")
        out[int(rid)] = value
    return out


def _mark_reviewed(bank: NegativeBank, negatives: pd.DataFrame) -> None:
    """Flag the entries a person decided are negatives (those overlapping ``negatives`` above ``MATCH_IOU``)."""
    f = bank.frame
    for image, group in negatives.groupby("image", sort=True):
        cand = np.flatnonzero(f["image"].to_numpy() == str(image))
        if len(cand):
            hit = any_overlap(_px_array(f.iloc[cand]), _px_array(group), MATCH_IOU)
            f.loc[cand[hit], "reviewed"] = True


def _retire_overlapping(bank: NegativeBank, positives: pd.DataFrame) -> int:
    """Retire active bank entries that are confirmed objects; returns how many."""
    n = 0
    f = bank.frame
    for image, group in positives.groupby("image", sort=True):
        cand = np.flatnonzero((f["image"].to_numpy() == str(image)) & ~f["retired"].to_numpy())
        if len(cand) == 0:
            continue
        hit = any_overlap(_px_array(f.iloc[cand]), _px_array(group), MATCH_IOU)
        f.loc[cand[hit], "retired"] = True
        n += int(hit.sum())
    return n
