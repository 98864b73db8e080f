"""Inference tiles: planning, nodata skipping, collate, worker handles, corrupt rasters."""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from hem_bootstrap.config import DataConfig, TilingConfig
from hem_bootstrap.data.tiles import TileDataset, TileRef, collate_tiles, plan_tiles, scale_tiles
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo.windows import Window


def test_plan_tiles_is_deterministic_and_covers_each_raster(make_raster: Callable[..., Path]) -> None:
    a = make_raster(name="a.tif", width=300, height=200)
    b = make_raster(name="b.tif", width=100, height=100)
    tiling = TilingConfig(tile_size=128, overlap=16)
    refs = plan_tiles([a, b], tiling)
    assert refs == plan_tiles([a, b], tiling)
    assert [r.image_idx for r in refs] == [0] * 6 + [1]
    assert refs[0] == TileRef(0, Window(0, 0, 128, 128, 128, 128))
    assert refs[-1] == TileRef(1, Window(0, 0, 128, 128, 100, 100))


def test_half_nodata_raster_skips_the_nodata_windows(make_raster: Callable[..., Path]) -> None:
    data = np.full((3, 256, 512), 120, dtype="uint8")
    data[:, :, 256:] = 0
    path = make_raster(width=512, height=256, data=data, nodata=0)
    refs = plan_tiles([path], TilingConfig(tile_size=128, overlap=0))
    ds = TileDataset([path], refs, DataConfig(min_valid_fraction=0.5))
    items = [ds[i] for i in range(len(ds))]
    for it in items:
        assert it["image"].shape == (3, 128, 128) and it["image"].dtype == torch.uint8  # scaled by the consumer
        over_nodata = it["window"].col_off >= 256
        assert it["skip"] is over_nodata
        assert it["valid"] == (0.0 if over_nodata else 1.0)
    batch = collate_tiles(items)
    assert batch["n_skipped"] == 4 and batch["images"].shape == (4, 3, 128, 128)
    assert all(w.col_off < 256 for w in batch["windows"]) and batch["image_idx"] == [0] * 4
    none = collate_tiles([it for it in items if it["skip"]])
    assert none["images"] is None and none["n_skipped"] == 4 and none["windows"] == []


def test_padded_small_image_is_not_skipped(make_raster: Callable[..., Path]) -> None:
    path = make_raster(width=60, height=50)
    refs = plan_tiles([path], TilingConfig(tile_size=128, overlap=0))
    item = TileDataset([path], refs, DataConfig(min_valid_fraction=0.9))[0]
    assert not item["skip"] and item["valid"] == 1.0
    assert (item["image"][:, 50:, :] == 0).all() and item["image"][:, :50, :60].min() > 0


def _scaled_batch(batch: dict) -> torch.Tensor:
    if batch["scale"] is None:
        return batch["images"]
    return scale_tiles(batch["images"], *batch["scale"])


@pytest.mark.parametrize("data_cfg", [DataConfig(), DataConfig(scale="fixed", scale_min=30, scale_max=180)])
def test_uint8_tiles_scaled_by_the_consumer_equal_float_reads(make_raster: Callable[..., Path], data_cfg: DataConfig) -> None:
    """uint8 tiles travel unscaled (a quarter of the bytes); scale_tiles gives the reader's floats bit for bit."""
    from hem_bootstrap.geo.raster import RasterReader

    valid = np.ones((200, 300), dtype=bool)
    valid[40:90, 100:220] = False  # an internal mask: invalid pixels must come out 0
    a = make_raster(name="a.tif", width=300, height=200, mask=valid)  # padded edge tiles too
    b = make_raster(name="b.tif", width=150, height=140, dtype="uint16")  # not uint8: scaled by the reader
    refs = plan_tiles([a, b], TilingConfig(tile_size=128, overlap=16))
    ds = TileDataset([a, b], refs, data_cfg)
    items = [ds[i] for i in range(len(ds))]
    assert {it["image"].dtype for it in items} == {torch.uint8, torch.float32}
    want = []
    for ref in refs:
        with RasterReader([a, b][ref.image_idx], data_cfg) as reader:
            want.append(torch.from_numpy(reader.read(ref.window)[0]))
    uint8_only = collate_tiles([it for it in items if it["image_idx"] == 0])
    assert uint8_only["images"].dtype == torch.uint8 and uint8_only["scale"][2] is not None
    got = _scaled_batch(uint8_only)
    assert torch.equal(got, torch.stack([w for w, r in zip(want, refs, strict=True) if r.image_idx == 0]))
    assert got[0, :, 40:90, 100:128].eq(0).all() and not uint8_only["scale"][2][0, 40:90, 100:128].any()
    mixed = collate_tiles(items)  # a batch that spans both rasters: every tile float32 in the worker
    assert mixed["images"].dtype == torch.float32 and mixed["scale"] is None
    assert torch.equal(mixed["images"], torch.stack(want))


def test_dataloader_workers_open_their_own_handles(make_raster: Callable[..., Path]) -> None:
    path = make_raster(width=256, height=256)
    refs = plan_tiles([path], TilingConfig(tile_size=64, overlap=0))
    ds = TileDataset([path], refs, DataConfig())
    first = ds[0]["image"]  # the parent opens a handle before the workers fork
    parent_reader = ds._pool.get(path)
    assert parent_reader._pid == os.getpid()
    loader = DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate_tiles)
    batches = list(loader)
    assert sum(len(b["windows"]) for b in batches) == len(refs)
    torch.testing.assert_close(batches[0]["images"][0], first)
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._pool._readers == {}
    ds.close()


def test_corrupt_raster_read_names_the_file(make_raster: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    path = make_raster(
        name="corrupt.tif", data=rng.integers(0, 255, (3, 256, 256)).astype("uint8"), compress="deflate"
    )
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(b"\x00garbage" * 2000)
    refs = plan_tiles([path], TilingConfig(tile_size=256, overlap=0))  # the header still opens
    ds = TileDataset([path], refs, DataConfig())
    with pytest.raises(DataError, match=r"corrupt.tif: read failed at window col=0 row=0") as ei:
        ds[0]
    assert "\n" not in str(ei.value)
