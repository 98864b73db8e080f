"""Seam merging of tiled detections: pure array functions, no I/O and no model.

Raw per-tile detections (image pixels) are merged with class-aware NMS plus the seam rule
(a box cut by an inner tile edge goes when an uncut box of its class covers most of it).
:class:`BandMerger` merges an image row band by row band with the same result as
:func:`merge_detections` over the whole image, so memory holds about one row of tiles.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from hem_bootstrap.geo.boxes import overlapping

EDGE_MARGIN_PX = 2.0
"""A box closer than this to an inner tile edge counts as cut by that edge."""


@dataclass
class RawDetections:
    """Per-tile detections of one image in full-image pixel coordinates, before seam merging."""

    boxes: list[np.ndarray] = field(default_factory=list)  # (n, 4) xyxy image pixels
    scores: list[np.ndarray] = field(default_factory=list)
    labels: list[np.ndarray] = field(default_factory=list)
    windows: list[np.ndarray] = field(default_factory=list)  # (n, 4) col, row, w, h
    cut: list[np.ndarray] = field(default_factory=list)  # (n,) bool: touches an inner tile edge

    def add(self, boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, win: np.ndarray, cut: np.ndarray) -> None:
        """Append one tile's detections."""
        self.boxes.append(boxes)
        self.scores.append(scores)
        self.labels.append(labels)
        self.windows.append(np.repeat(win[None, :], len(boxes), axis=0))
        self.cut.append(cut)

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Concatenated arrays (empty with the right shapes when nothing was detected)."""
        if not self.boxes:
            return (
                np.zeros((0, 4), np.float32),
                np.zeros((0,), np.float32),
                np.zeros((0,), np.int64),
                np.zeros((0, 4), np.int64),
                np.zeros((0,), bool),
            )
        return (
            np.concatenate(self.boxes).astype(np.float32),
            np.concatenate(self.scores).astype(np.float32),
            np.concatenate(self.labels).astype(np.int64),
            np.concatenate(self.windows).astype(np.int64),
            np.concatenate(self.cut).astype(bool),
        )


def cut_by_inner_edge(
    boxes: np.ndarray,
    win: tuple[int, int, int, int],
    width: int,
    height: int,
    beyond: tuple[bool, bool, bool, bool] | None = None,
) -> np.ndarray:
    """Which boxes (image pixels) touch an edge of their tile that is a seam, not an edge of the data.

    Without ``beyond`` an edge is a seam when it lies inside the image; with it (valid data
    past the left, top, right, bottom edge) only where there is data on the other side, so a
    nodata collar acts like the image's border.
    """
    col, row, w, h = win
    if len(boxes) == 0:
        return np.zeros((0,), bool)
    m = EDGE_MARGIN_PX
    seam = beyond if beyond is not None else (col > 0, row > 0, col + w < width, row + h < height)
    left = (boxes[:, 0] <= col + m) & seam[0]
    top = (boxes[:, 1] <= row + m) & seam[1]
    right = (boxes[:, 2] >= col + w - m) & seam[2]
    bottom = (boxes[:, 3] >= row + h - m) & seam[3]
    return left | top | right | bottom


def _overlapping_pairs(boxes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs ``(i, j)``, ``i != j``, of boxes that intersect (both directions; never n x n)."""
    i, j = overlapping(boxes, boxes)
    off = i != j
    return i[off], j[off]


@dataclass(frozen=True)
class _Pairs:
    """Same-class pairs of intersecting boxes, both directions, with their intersection area and IoU."""

    i: np.ndarray
    j: np.ndarray
    inter: np.ndarray
    iou: np.ndarray

    def within(self, member: np.ndarray, local: np.ndarray) -> _Pairs:
        """The pairs with both ends in ``member`` (a mask), numbered by ``local`` (old index -> new)."""
        both = member[self.i] & member[self.j]
        return _Pairs(local[self.i[both]], local[self.j[both]], self.inter[both], self.iou[both])

    def renumbered(self, new: np.ndarray) -> _Pairs:
        """The same pairs with box ``k`` called ``new[k]``."""
        return _Pairs(new[self.i], new[self.j], self.inter, self.iou)


def _class_pairs(boxes: np.ndarray, labels: np.ndarray) -> _Pairs:
    """Every pair that NMS or the seam rule may act on: same class, intersecting."""
    b = boxes.astype(np.float64)
    i, j = _overlapping_pairs(b) if len(b) else (np.zeros(0, np.int64),) * 2
    same = labels[i] == labels[j]
    i, j = i[same], j[same]
    return _Pairs(i, j, *_pair_overlaps(b, i, j))


def _pair_overlaps(boxes: np.ndarray, i: np.ndarray, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Intersection area and IoU of each pair."""
    lt = np.maximum(boxes[i, :2], boxes[j, :2])
    rb = np.minimum(boxes[i, 2:], boxes[j, 2:])
    inter = np.clip(rb - lt, 0, None).prod(axis=1)
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    union = area[i] + area[j] - inter
    return inter, inter / np.maximum(union, 1e-12)


def _covered_by_whole(
    boxes: np.ndarray, cut: np.ndarray, i: np.ndarray, j: np.ndarray, inter: np.ndarray
) -> np.ndarray:
    """Per pair: box ``i`` is cut by a tile edge and more than half covered by uncut box ``j`` (seam rule)."""
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return cut[i] & ~cut[j] & (inter / np.maximum(area[i], 1e-12) > 0.5)


def merge_detections(
    boxes: np.ndarray,
    scores: np.ndarray,
    labels: np.ndarray,
    cut: np.ndarray,
    nms_iou: float,
    drop_cut: bool = True,
    pairs: _Pairs | None = None,
) -> np.ndarray:
    """Indices kept after seam merging of one image's raw detections, highest score first.

    Boxes cut by an inner tile edge are dropped when an uncut box of the same class covers
    most of them (a neighbouring tile saw the object whole); then greedy class-aware NMS (the
    rule of ``torchvision.ops.batched_nms``: a box is suppressed by a kept, higher-ranked box of
    its class with IoU above ``nms_iou``). Overlaps come from a spatial index, so the cost grows
    with the number of overlapping pairs, not with the square of a large image's detections.
    Inputs are put in a canonical order first, so the result does not depend on the order tiles
    were processed in (one process or many). ``pairs``: :func:`_class_pairs` of ``boxes`` when
    the caller has them already, saving a spatial query.
    """
    n = len(boxes)
    if n == 0:
        return np.zeros((0,), np.int64)
    order = np.lexsort((boxes[:, 3], boxes[:, 2], boxes[:, 1], boxes[:, 0], labels, -scores))
    b = boxes[order].astype(np.float64)
    c = cut[order].astype(bool)
    if pairs is None:
        p = _class_pairs(b, labels[order])
    else:
        rank = np.empty(n, np.int64)
        rank[order] = np.arange(n)
        p = pairs.renumbered(rank)
    alive = np.ones(n, bool)
    if drop_cut and c.any() and (~c).any():
        alive[np.unique(p.i[_covered_by_whole(b, c, p.i, p.j, p.inter)])] = False
    return order[_greedy_nms(alive, p.i, p.j, p.iou > nms_iou)]


def _greedy_nms(alive: np.ndarray, i: np.ndarray, j: np.ndarray, suppress: np.ndarray) -> np.ndarray:
    """Greedy NMS over a sparse graph of boxes in rank order: the kept indices, ascending.

    A box suppresses only lower-ranked ones (``j > i``), so a box's fate is settled once every
    box above it is; only boxes that can suppress another need a turn in the loop.
    """
    down = suppress & (j > i)
    i, j = i[down], j[down]
    srt = np.argsort(i, kind="stable")
    i, j = i[srt], j[srt]
    heads, starts = np.unique(i, return_index=True)
    ends = np.append(starts[1:], len(i))[: len(starts)]
    for k, a, z in zip(heads.tolist(), starts.tolist(), ends.tolist(), strict=True):
        if alive[k]:
            alive[j[a:z]] = False
    return np.flatnonzero(alive)


class BandMerger:
    """Seam merging of one image, row band by row band, with the same result as merging it whole.

    Raw detections wait here until no later tile can touch them. At a frontier (the first
    pixel row of the next tile row) a pending box is final when neither it nor anything linked
    to it through a chain of links (pairs that NMS or the cut-box rule acts on, see
    :func:`_linked_to`) reaches the frontier: the merge of a box depends on nothing else, so
    those boxes are merged now, exactly as a whole-image merge would, and the rest wait. Memory holds about one row of tiles'
    detections, whatever the raster size.
    """

    def __init__(self, image: int, nms_iou: float, drop_cut: bool) -> None:
        self.image = image
        self.nms_iou = nms_iou
        self.drop_cut = drop_cut
        self.pending = RawDetections()

    def add(self, raw: RawDetections) -> None:
        """Queue one band's raw detections."""
        for name in ("boxes", "scores", "labels", "windows", "cut"):
            getattr(self.pending, name).extend(getattr(raw, name))

    def flush(self, frontier: int | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Merge and return ``(boxes, scores, labels, windows)`` that are final at ``frontier`` (None: all)."""
        boxes, scores, labels, windows, cut = self.pending.arrays()
        pairs = _class_pairs(boxes, labels)
        if frontier is None:
            done = np.ones(len(boxes), bool)
        else:
            reach = boxes[:, 3] >= frontier
            done = ~_linked_to(boxes, cut, reach, self.nms_iou, self.drop_cut, pairs)
        rest = ~done
        self.pending = RawDetections()
        if rest.any():
            self.pending.boxes.append(boxes[rest])
            self.pending.scores.append(scores[rest])
            self.pending.labels.append(labels[rest])
            self.pending.windows.append(windows[rest])
            self.pending.cut.append(cut[rest])
        sel = np.flatnonzero(done)
        local = np.full(len(boxes), -1, np.int64)
        local[sel] = np.arange(len(sel))
        sub = pairs.within(done, local)  # a finished box never overlaps a waiting one that matters
        keep = sel[merge_detections(boxes[sel], scores[sel], labels[sel], cut[sel], self.nms_iou, self.drop_cut, sub)]
        return boxes[keep], scores[keep], labels[keep], windows[keep]


def _linked_to(
    boxes: np.ndarray, cut: np.ndarray, seed: np.ndarray, nms_iou: float, drop_cut: bool, pairs: _Pairs,
) -> np.ndarray:
    """``seed`` grown along the links that decide a merge, until closed.

    Two boxes are linked when one can remove the other in :func:`merge_detections`: same class
    and IoU above ``nms_iou`` (NMS), or a cut box more than half covered by an uncut one
    (seams). Mere touching is no link, so the marked set stays local even in dense scenes.
    """
    mark = seed.copy()
    if not mark.any() or mark.all():
        return mark
    i, j = pairs.i, pairs.j
    link = pairs.iou > nms_iou
    if drop_cut:
        b = boxes.astype(np.float64)
        c = cut.astype(bool)
        link |= _covered_by_whole(b, c, i, j, pairs.inter) | _covered_by_whole(b, c, j, i, pairs.inter)
    i, j = i[link], j[link]
    while True:
        grow = mark[i] & ~mark[j]
        if not grow.any():
            return mark
        mark[j[grow]] = True


def merge_whole(raw: RawDetections, nms_iou: float, drop_cut: bool) -> tuple[np.ndarray, ...]:
    """Merge one image's raw detections at once: ``(boxes, scores, labels, windows)`` kept."""
    boxes, scores, labels, windows, cut = raw.arrays()
    keep = merge_detections(boxes, scores, labels, cut, nms_iou, drop_cut)
    return boxes[keep], scores[keep], labels[keep], windows[keep]
