"""Review: which mined false positives go to a person instead of the bank, and decisions that stick.

:func:`route_for_review` holds back confident false positives that may be missing labels;
:func:`apply_review` applies a person's decisions to a bank. Where they land so that the next
round uses them:


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
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pyogrio

from hem_bootstrap.config import BankConfig, MiningConfig
from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import DataError
from hem_bootstrap.files import atomic_path
from hem_bootstrap.geo.boxes import any_overlap, best_match
from hem_bootstrap.geo.labels import PixelLabels
from hem_bootstrap.mining.bank import MATCH_IOU, NegativeBank
from hem_bootstrap.mining.positives import REVIEW_REASON
from hem_bootstrap.mining.rows import px_array, require, scores_of

POSITIVES_FILE = "review_positives.gpkg"
POSITIVES_LAYER = "labels"



def latest_snapshot(run_path: Path, manifest: dict[str, Any]) -> Path | None:
    """The bank snapshot the next round starts from: that of the newest round whose mining finished.

    Round 0's empty snapshot counts once round 0's training finished; a snapshot whose step
    the manifest does not record (a killed mine step, redone on resume) never does.
    """
    done = [e["round"] for e in manifest.get("rounds", [])
            if "mine" in e.get("steps", {}) or (e["round"] == 0 and "train" in e.get("steps", {}))]
    for r in sorted(done, reverse=True):
        path = Path(run_path) / f"round_{r:03d}" / "bank.gpkg"
        if path.is_file():
            return path
    return None


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


# ------------------------------------------------------------------------------ routing and decisions


HIGH_SCORE = 0.8
"""Score above which repeated mining of the same entry looks like a missing label."""


DECISIONS = ("positive", "negative")


REVIEWED_STRATEGY = "review"
"""The ``strategy`` of bank rows a person decided are negatives (they never go back to review)."""


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
    scores = scores_of(mined)
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
    rows = bank.frame  # retired ones too: a person's "negative" stays said when the model later learns it
    decided = rows[rows["reviewed"].to_numpy(dtype=bool)]
    if len(decided) == 0 or not {*PX_COLUMNS} <= set(mined.columns):
        return out
    images = mined["image"].astype(str).to_numpy(dtype=object)
    dec_images = decided["image"].astype(str).to_numpy(dtype=object)
    mined_px, dec_px = px_array(mined), px_array(decided)
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
    vet_px, vet_images = px_array(vet), vet["image"].to_numpy(dtype=object)
    vet_ids, vet_rounds = vet["neg_id"].to_numpy(), vet["rounds_seen"].to_numpy()
    mined_px = px_array(mined)
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
    require(decisions, ("review_id", "decision"), "review decisions")
    chosen = _parse_decisions(decisions, bank)
    rf = bank.review_frame
    pos_rows = rf[rf["review_id"].isin([k for k, v in chosen.items() if v == "positive"])]
    neg_rows = rf[rf["review_id"].isin([k for k, v in chosen.items() if v == "negative"])]
    moved = 0
    for rnd, group in neg_rows.groupby("last_round", sort=True):
        res = bank.add(gpd.GeoDataFrame(group, crs=bank.crs), int(rnd), "", REVIEWED_STRATEGY, cfg)
        moved += res["added"] + res["updated"]
    bank.mark_reviewed(neg_rows)
    retired = bank.retire_overlapping(pos_rows)
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
        try:
            rid = int(rid)
        except (TypeError, ValueError):
            raise DataError(f"review decisions row {i}: review_id = {rid!r}, expected a review_id number of the "
                            "review layer") from None
        if rid not in known:
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
