"""Raster opening, windowed reads, band selection, scaling, masks, and bounded memory."""

from __future__ import annotations

import logging
import pickle
import resource
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from hem_bootstrap.config import DataConfig
from hem_bootstrap.errors import DataError
from hem_bootstrap.geo import raster as raster_mod
from hem_bootstrap.geo.raster import RasterReader, open_raster, valid_fraction
from hem_bootstrap.geo.windows import Window


def test_open_raster_describes_header(make_raster: Callable[..., Path]) -> None:
    p = make_raster(width=300, height=200, count=4, dtype="uint16", nodata=0)
    info = open_raster(p)
    assert (info.width, info.height, info.count) == (300, 200, 4)
    assert info.dtypes == ("uint16",) * 4
    assert info.georeferenced and info.crs is not None and info.crs.to_epsg() == 32633
    assert info.res == (0.5, -0.5) and info.nodata == 0
    assert info.tiled and info.block_shape == (128, 128)
    assert info.area_km2() == pytest.approx(300 * 200 * 0.25 / 1e6)
    assert info.area_km2(0.5) == pytest.approx(300 * 200 * 0.25 / 2e6)


def test_missing_and_unreadable_raster(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="raster not found"):
        open_raster(tmp_path / "nope.tif")
    bad = tmp_path / "bad.tif"
    bad.write_bytes(b"not a tiff at all")
    with pytest.raises(DataError, match=r"bad.tif: not a readable raster: "):
        open_raster(bad)


def test_plain_png_runs_in_pixel_space_and_warns_once(
    make_raster: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    p = make_raster(name="plain.png", driver="PNG", crs=None, width=64, height=48)
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.geo.raster"):
        info = open_raster(p)
        open_raster(p)
    assert not info.georeferenced and info.crs is None
    assert info.transform == Affine.identity() and info.res == (1.0, 1.0)
    assert sum("pixel space" in r.message for r in caplog.records) == 1


def test_striped_tiff_reads_and_hints_once(
    make_raster: Callable[..., Path], caplog: pytest.LogCaptureFixture
) -> None:
    p = make_raster(name="striped.tif", tiled=False, width=256, height=256)
    with caplog.at_level(logging.INFO, logger="hem_bootstrap.geo.raster"):
        info = open_raster(p)
        open_raster(p)
    assert not info.tiled
    assert sum("TILED=YES" in r.message for r in caplog.records) == 1
    with RasterReader(p, DataConfig()) as reader:
        img, mask = reader.read(Window(10, 20, 64, 64, 64, 64))
    with rasterio.open(p) as src:
        ref = src.read(window=((20, 84), (10, 74)))
    np.testing.assert_allclose(img, ref / 255.0, atol=1e-6)
    assert mask.all()


def test_uint8_read_scales_and_pads_small_raster(make_raster: Callable[..., Path]) -> None:
    p = make_raster(width=100, height=80)
    with RasterReader(p, DataConfig()) as reader:
        img, mask = reader.read(Window(0, 0, 128, 128, 100, 80))
    assert img.shape == (3, 128, 128) and img.dtype == np.float32
    assert (
        mask.shape == (128, 128) and mask[:80, :100].all() and not mask[80:].any() and not mask[:, 100:].any()
    )
    assert (img[:, 80:, :] == 0).all() and img.max() <= 1.0
    with rasterio.open(p) as src:
        np.testing.assert_allclose(img[:, :80, :100], src.read() / 255.0, atol=1e-6)
    assert valid_fraction(mask, Window(0, 0, 128, 128, 100, 80)) == 1.0


def test_rgbn_uint16_band_selection_and_percentile(make_raster: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    data = np.stack(
        [rng.integers(1000 * (b + 1), 1000 * (b + 1) + 4000, (256, 256)) for b in range(4)]
    ).astype("uint16")
    p = make_raster(count=4, dtype="uint16", data=data)
    cfg = DataConfig(bands=[4, 2, 1], scale="percentile", percentiles=(2.0, 98.0))
    with RasterReader(p, cfg) as reader:
        img, _ = reader.read(Window(0, 0, 256, 256, 256, 256))
        sc = reader.scaling()
    assert img.shape == (3, 256, 256)
    for i, band in enumerate([4, 2, 1]):
        lo, hi = np.percentile(data[band - 1], [2, 98])
        assert sc.lo[i] == pytest.approx(lo, rel=0.02) and sc.hi[i] == pytest.approx(hi, rel=0.02)
        # about 2 % of pixels saturate at each end
        assert 0.005 < (img[i] == 0).mean() < 0.05 and 0.005 < (img[i] == 1).mean() < 0.05
    # auto on uint16 takes the same (percentile) path
    with RasterReader(p, DataConfig(bands=[4, 2, 1])) as auto_reader:
        np.testing.assert_allclose(auto_reader.read(Window(0, 0, 256, 256, 256, 256))[0], img)


def test_fixed_and_float_scaling(make_raster: Callable[..., Path]) -> None:
    data = np.full((1, 64, 64), 150, dtype="uint16")
    p = make_raster(name="u16.tif", count=1, dtype="uint16", data=data, width=64, height=64)
    cfg = DataConfig(bands=[1], scale="fixed", scale_min=100, scale_max=300)
    with RasterReader(p, cfg) as reader:
        img, _ = reader.read(Window(0, 0, 64, 64, 64, 64))
    np.testing.assert_allclose(img, 0.25)
    fdata = np.linspace(-0.5, 1.5, 64 * 64, dtype="float32").reshape(1, 64, 64)
    pf = make_raster(name="f.tif", count=1, dtype="float32", data=fdata, width=64, height=64)
    with RasterReader(pf, DataConfig(bands=[1])) as reader:
        img, _ = reader.read(Window(0, 0, 64, 64, 64, 64))
    np.testing.assert_allclose(img, np.clip(fdata, 0, 1))


def test_band_out_of_range_names_band_file_and_count(make_raster: Callable[..., Path]) -> None:
    p = make_raster(count=3)
    reader = RasterReader(p, DataConfig(bands=[1, 2, 5]))
    with pytest.raises(DataError, match=r"r.tif: .*band 5 but the raster has 3 band"):
        reader.read(Window(0, 0, 64, 64, 64, 64))


def test_nodata_value_and_internal_mask(make_raster: Callable[..., Path]) -> None:
    data = np.full((3, 128, 128), 100, dtype="uint8")
    data[:, :, 64:] = 0
    p = make_raster(name="nd.tif", width=128, height=128, data=data, nodata=0)
    with RasterReader(p, DataConfig()) as reader:
        _, mask = reader.read(Window(0, 0, 128, 128, 128, 128))
    assert mask[:, :64].all() and not mask[:, 64:].any()
    assert valid_fraction(mask) == pytest.approx(0.5)
    m = np.ones((128, 128), dtype=bool)
    m[:32] = False
    p2 = make_raster(name="mask.tif", width=128, height=128, mask=m)
    with RasterReader(p2, DataConfig()) as reader:
        img, mask2 = reader.read(Window(0, 0, 128, 128, 128, 128))
    np.testing.assert_array_equal(mask2, m)
    assert (img[:, :32] == 0).all()


def test_reader_pickles_by_path(make_raster: Callable[..., Path]) -> None:
    p = make_raster()
    reader = RasterReader(p, DataConfig())
    a, _ = reader.read(Window(0, 0, 32, 32, 32, 32))
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._src is None
    b, _ = clone.read(Window(0, 0, 32, 32, 32, 32))
    np.testing.assert_array_equal(a, b)
    reader.close()
    clone.close()


def _huge_sparse(path: Path, dtype: str) -> Path:
    profile = dict(
        driver="GTiff",
        width=30_000,
        height=30_000,
        count=3,
        dtype=dtype,
        crs="EPSG:32633",
        transform=Affine(0.5, 0, 500_000, 0, -0.5, 5_000_000),
        tiled=True,
        blockxsize=256,
        blockysize=256,
        compress="deflate",
        SPARSE_OK=True,
    )
    with rasterio.open(path, "w", **profile) as dst:
        block = np.full((3, 256, 256), 200, dtype=dtype)
        dst.write(block, window=((14_848, 15_104), (14_848, 15_104)))
        dst.write(block, window=((0, 256), (0, 256)))
    return path


def test_huge_sparse_raster_windowed_read_keeps_memory_small(tmp_path: Path) -> None:
    p = _huge_sparse(tmp_path / "huge.tif", "uint16")
    assert p.stat().st_size < 5_000_000
    info = open_raster(p)
    assert (info.width, info.height) == (30_000, 30_000)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    tracemalloc.start()
    try:
        with RasterReader(p, DataConfig(scale="percentile")) as reader:
            img, mask = reader.read(Window(14_900, 14_900, 512, 512, 512, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    rss_delta_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert img.shape == (3, 512, 512) and mask.all()
    assert peak < 50 * 2**20, f"python peak {peak / 2**20:.1f} MiB"
    assert rss_delta_mb < 200, f"rss grew {rss_delta_mb:.0f} MiB"
    # the percentile statistics come from a sparse sample, not the 30000^2 raster
    with rasterio.open(p) as src:
        sample, valid = raster_mod.sample_pixels(src, [1, 2, 3])
    assert sample.shape[1] * sample.shape[2] <= 2 * raster_mod.STATS_MAX_SIDE**2
    assert valid.shape == sample.shape[1:]


def test_percentile_from_block_sample_matches_full_statistics(make_raster: Callable[..., Path]) -> None:
    """A large raster without overviews: statistics from a grid of sampled blocks."""
    rng = np.random.default_rng(1)
    data = rng.normal(3000, 400, (1, 2100, 2100)).clip(0, 65535).astype("uint16")
    p = make_raster(name="big.tif", width=2100, height=2100, count=1, dtype="uint16", data=data, blocksize=64)
    with rasterio.open(p) as src:
        sample, valid = raster_mod.sample_pixels(src, [1])
    assert valid.all() and sample.size <= raster_mod.STATS_GRID**2 * 64 * 64
    with RasterReader(p, DataConfig(bands=[1], scale="percentile")) as reader:
        sc = reader.scaling()
    lo, hi = np.percentile(data, [2, 98])
    assert sc.lo[0] == pytest.approx(lo, rel=0.03) and sc.hi[0] == pytest.approx(hi, rel=0.03)


def test_reader_caps_the_gdal_block_cache(make_raster: Callable[..., Path]) -> None:
    from rasterio.env import get_gdal_config

    path = make_raster()
    with RasterReader(path, DataConfig(gdal_cache_mb=48)) as reader:
        reader.read(Window(0, 0, 32, 32, 32, 32))
        assert int(get_gdal_config("GDAL_CACHEMAX")) == 48 * 2**20  # not 5% of RAM
    with RasterReader(path, DataConfig()) as reader:
        reader.read(Window(0, 0, 32, 32, 32, 32))
        assert int(get_gdal_config("GDAL_CACHEMAX")) == 128 * 2**20
