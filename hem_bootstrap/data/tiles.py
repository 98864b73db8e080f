"""Inference dataset: a plan of windows over rasters; workers read pixels with their own handles.

The plan (:func:`plan_tiles`) is pure coordinates; :class:`TileDataset` turns one
:class:`TileRef` into a tensor. Tiles with too little valid data are flagged ``skip`` and
dropped by :func:`collate_tiles`, so they never reach the model.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch.utils.data import Dataset

from hem_bootstrap.config import DataConfig, TilingConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.faults import fault_point
from hem_bootstrap.geo.raster import RasterInfo, RasterReader, open_raster, valid_fraction
from hem_bootstrap.geo.windows import Window, tile_windows

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TileRef:
    """One tile to run: which raster (index into the path list) and which window."""

    image_idx: int
    window: Window


def plan_tiles(paths: list[Path], tiling: TilingConfig, infos: list[RasterInfo] | None = None) -> list[TileRef]:
    """Every tile of every raster, raster by raster and row by row (deterministic order).

    ``infos``: the rasters' headers when the caller has them (each header is read once).

    Raises:
        DataError: a raster is missing or unreadable (from :func:`open_raster`).
    """
    refs: list[TileRef] = []
    overlap = tiling.overlap_px()
    for idx, path in enumerate(paths):
        info = infos[idx] if infos is not None else open_raster(path)
        refs.extend(TileRef(idx, w) for w in tile_windows(info.width, info.height, tiling.tile_size, overlap))
    return refs


class ReaderPool:
    """Lazily opened :class:`RasterReader` per path, owned by the current process.

    Pickling (a DataLoader worker start) drops every handle; a fork is noticed by the
    process id and the inherited handles are discarded unused, so no GDAL handle is ever
    shared between processes.
    """

    def __init__(self, data_cfg: DataConfig) -> None:
        self.data_cfg = data_cfg
        self._readers: dict[str, RasterReader] = {}
        self._pid = os.getpid()

    def get(self, path: Path | str) -> RasterReader:
        """The reader of ``path`` for this process."""
        if self._pid != os.getpid():
            self._readers = {}
            self._pid = os.getpid()
        key = str(path)
        reader = self._readers.get(key)
        if reader is None:
            reader = RasterReader(path, self.data_cfg)
            self._readers[key] = reader
        return reader

    def close(self) -> None:
        """Close every handle this process opened."""
        if self._pid == os.getpid():
            for reader in self._readers.values():
                reader.close()
        self._readers = {}

    def __getstate__(self) -> dict[str, Any]:
        return {"data_cfg": self.data_cfg}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["data_cfg"])  # type: ignore[misc]


_BAD_READS: set[str] = set()
"""Rasters whose read failure was already logged in this process (one warning per raster)."""


def _warn_bad_read(path: Path, err: DataError) -> None:
    if str(path) not in _BAD_READS:
        _BAD_READS.add(str(path))
        log.warning("skipping unreadable tiles (data.on_bad_raster=skip): %s", err)


class TileDataset(Dataset):
    """Tiles of rasters as float32 tensors ``(C, T, T)`` with their window and valid share."""

    def __init__(self, paths: Sequence[Path | str], refs: list[TileRef], data_cfg: DataConfig) -> None:
        self.paths = [Path(p) for p in paths]
        self.refs = list(refs)
        self.data_cfg = data_cfg
        self._pool = ReaderPool(data_cfg)

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        """One tile; a read failure raises :class:`DataError` naming the file and window."""
        ref = self.refs[i]
        win = ref.window
        fault_point("detect.tile")
        reader = self._pool.get(self.paths[ref.image_idx])
        raw = reader.read_uint8(win)
        if raw is None:
            image, mask = reader.read(win)
            scale: dict[str, Any] = {}
        else:  # scaled by the consumer (scale_tiles): a quarter of the bytes to hand over
            image, mask = raw
            sc = reader.scaling()
            scale = {"lo": sc.lo.astype(np.float32), "span": sc.span(),
                     "mask": None if mask.all() else torch.from_numpy(mask)}
        valid = valid_fraction(mask, win)
        skip = valid < self.data_cfg.min_valid_fraction or valid == 0.0
        beyond = reader.data_beyond(win) if not skip else (False,) * 4
        tensor = torch.from_numpy(image)
        return {"image": tensor, "image_idx": ref.image_idx, "window": win, "valid": valid, "skip": skip,
                "beyond": beyond, **scale}

    def __getitems__(self, indices: list[int]) -> list[dict[str, Any]]:
        """A batch of tiles, as the DataLoader asks for them; applies ``data.on_bad_raster``.

        A raster that opened fine can still fail inside (a truncated file, a damaged block).
        With ``skip`` such a tile is logged (once per raster) and flagged ``skip`` with its
        ``error``, so one bad block does not end a scan of many rasters; with ``fail`` the
        :class:`DataError` propagates.
        """
        return [self._get_or_skip(i) for i in indices]

    def _get_or_skip(self, i: int) -> dict[str, Any]:
        try:
            return self[i]
        except DataError as err:
            if self.data_cfg.on_bad_raster == "fail":
                raise
            ref = self.refs[i]
            win = ref.window
            _warn_bad_read(self.paths[ref.image_idx], err)
            empty = torch.zeros((len(self.data_cfg.bands), win.height, win.width), dtype=torch.float32)
            return {"image": empty, "image_idx": ref.image_idx, "window": win, "valid": 0.0, "skip": True,
                    "error": str(err), "error_path": str(self.paths[ref.image_idx])}

    def close(self) -> None:
        """Close this process's raster handles."""
        self._pool.close()


def _float_tile(item: dict[str, Any]) -> torch.Tensor:
    """A tile item as float32 ``(C, T, T)`` in [0, 1] (uint8 items scaled as :func:`scale_tiles` does)."""
    if "lo" not in item:
        return item["image"]
    mask = item["mask"][None] if item["mask"] is not None else None
    lo, span = torch.from_numpy(item["lo"])[None], torch.from_numpy(item["span"])[None]
    return scale_tiles(item["image"][None], lo, span, mask)[0]


def scale_tiles(images: torch.Tensor, lo: torch.Tensor, span: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """uint8 tiles ``(B, C, T, T)`` to float32 in [0, 1]: ``(v - lo) / span`` clipped, invalid pixels 0.

    The same float32 operations as the reader's scaling, so the result equals a float read
    bit for bit; run on the model's device, after the (4x smaller) uint8 copy.
    """
    out = images.to(torch.float32)
    dev = out.device
    out.sub_(lo.to(dev, torch.float32, non_blocking=True)[:, :, None, None])
    out.div_(span.to(dev, torch.float32, non_blocking=True)[:, :, None, None]).clamp_(0.0, 1.0)
    if mask is not None:
        out.mul_(mask.to(dev, non_blocking=True)[:, None])  # mask is bool: invalid pixels become 0
    return out


def collate_tiles(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack the tiles to run; skipped tiles are counted and dropped.

    Returns ``images`` (B, C, T, T) or None when every tile was skipped, ``scale``,
    ``image_idx``, ``windows`` and ``beyond`` (lists, kept tiles only; ``beyond``: valid data
    past each tile edge, see ``RasterReader.data_beyond``), ``n_skipped`` and ``errors`` (read
    failures skipped under ``data.on_bad_raster: skip``). When every kept tile comes from a
    uint8 raster, ``images`` is uint8 and ``scale`` is ``(lo, span, mask)`` for
    :func:`scale_tiles`; otherwise ``images`` is float32 in [0, 1] and ``scale`` is None.
    """
    kept = [it for it in items if not it["skip"]]
    scale = None
    if kept and all("lo" in it for it in kept):
        images: torch.Tensor | None = torch.stack([it["image"] for it in kept])  # uint8
        masks = None
        if any(it["mask"] is not None for it in kept):
            masks = torch.stack([it["mask"] if it["mask"] is not None else torch.ones(it["image"].shape[1:], dtype=torch.bool)
                                 for it in kept])
        scale = (torch.from_numpy(np.stack([it["lo"] for it in kept])),
                 torch.from_numpy(np.stack([it["span"] for it in kept])), masks)
    elif kept:  # float tiles, or a batch that mixes uint8 and other rasters: all float32 here
        images = torch.stack([_float_tile(it) for it in kept])
    else:
        images = None
    return {
        "images": images,
        "scale": scale,
        "image_idx": [int(it["image_idx"]) for it in kept],
        "windows": [it["window"] for it in kept],
        "beyond": [it["beyond"] for it in kept],
        "n_skipped": len(items) - len(kept),
        "errors": [(it["error_path"], it["error"]) for it in items if it.get("error")],
    }


T = TypeVar("T")


@dataclass
class _Failed:
    error: BaseException


_END = object()


def read_ahead(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` produced by one background thread, at most ``depth`` ahead of the consumer, in order.

    A scan on CUDA without reader processes reads its next tiles in this thread while the GPU
    computes: GDAL's reads and decompression, numpy and torch copies release the GIL. An
    exception in the thread is raised here, at the item where it happened; closing the
    iterator early stops the thread.
    """
    q: queue.Queue[Any] = queue.Queue(maxsize=max(1, depth))
    stop = threading.Event()

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as err:  # handed to the consumer, raised there
            put(_Failed(err))

    thread = threading.Thread(target=produce, name="hem-tile-reader", daemon=True)
    thread.start()
    try:
        while True:
            try:
                item = q.get(timeout=0.5)
            except queue.Empty:
                continue
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item
    finally:
        stop.set()
        thread.join(timeout=10)
