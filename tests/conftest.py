"""Shared fixtures: factories writing tiny real GeoTIFFs / PNGs and GeoPackages of labels."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pytest
import rasterio
import shapely
from affine import Affine

# measured fast-path choices (hem_bootstrap.model.precision) go to a cache of this session, shared
# with the `hem` subprocesses the tests start, never to the user's ~/.cache; removed when the session ends
if "HEM_CACHE_DIR" not in os.environ:
    os.environ["HEM_CACHE_DIR"] = tempfile.mkdtemp(prefix="hem-test-cache-")
    atexit.register(shutil.rmtree, os.environ["HEM_CACHE_DIR"], ignore_errors=True)

@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`hem`'s CLI points the root logger at the stderr of the moment (pytest's capture in a test) and captures
    warnings; put pytest's handlers back after each test, so no later test logs into a closed stream."""
    import logging

    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in root.handlers:
        if handler not in handlers:
            handler.close()
    root.handlers[:] = handlers
    root.setLevel(level)
    logging.captureWarnings(False)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine, 2 spinning OpenMP threads run 10-30x slower.

    Modules that train or build many models use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


UTM_ORIGIN = (500_000.0, 5_000_000.0)
GSD = 0.5


def default_transform(gsd: float = GSD) -> Affine:
    """North-up transform at a UTM-like origin."""
    return Affine(gsd, 0.0, UTM_ORIGIN[0], 0.0, -gsd, UTM_ORIGIN[1])


@pytest.fixture
def make_raster(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write a raster with the chosen size, bands, dtype, CRS, transform, nodata and tiling.

    ``data`` may be an array ``(count, height, width)``; by default a deterministic gradient.
    ``mask`` (bool ``(height, width)``, True = valid) writes an internal dataset mask.
    """

    def factory(
        name: str = "r.tif",
        width: int = 256,
        height: int = 256,
        count: int = 3,
        dtype: str = "uint8",
        crs: str | None = "EPSG:32633",
        transform: Affine | None = None,
        nodata: float | None = None,
        tiled: bool = True,
        blocksize: int = 128,
        data: np.ndarray | None = None,
        driver: str = "GTiff",
        compress: str | None = None,
        mask: np.ndarray | None = None,
    ) -> Path:
        path = tmp_path / name
        if data is None:
            yy, xx = np.mgrid[0:height, 0:width]
            base = (xx + 2 * yy) % 200 + 20
            data = np.stack([base + 5 * b for b in range(count)]).astype(dtype)
        profile: dict[str, Any] = {
            "driver": driver,
            "width": width,
            "height": height,
            "count": count,
            "dtype": dtype,
        }
        if driver == "GTiff":
            profile["tiled"] = tiled
            if tiled:
                profile.update(blockxsize=blocksize, blockysize=blocksize)
            if compress:
                profile["compress"] = compress
        if crs is not None:
            profile["crs"] = crs
            profile["transform"] = transform if transform is not None else default_transform()
        if nodata is not None:
            profile["nodata"] = nodata
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(data)
            if mask is not None:
                dst.write_mask(mask.astype(np.uint8) * 255)
        return path

    return factory


def boxes_to_map(boxes_px: np.ndarray, transform: Affine) -> np.ndarray:
    """Pixel xyxy -> map (minx, miny, maxx, maxy), independent of the code under test."""
    out = []
    for x0, y0, x1, y1 in np.asarray(boxes_px, dtype=float):
        ax, ay = transform @ (x0, y0)
        bx, by = transform @ (x1, y1)
        out.append((min(ax, bx), min(ay, by), max(ax, bx), max(ay, by)))
    return np.array(out, dtype=float).reshape(-1, 4)


@pytest.fixture
def make_labels(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write labels as a GeoPackage (or any OGR file by suffix).

    Give ``boxes_px`` with the raster's ``transform`` (boxes become polygons in map units),
    or ready-made ``geoms``. ``classes`` fills the ``class`` column unless ``field`` is None.
    ``to_crs`` reprojects before writing.
    """

    def factory(
        name: str = "labels.gpkg",
        boxes_px: np.ndarray | None = None,
        transform: Affine | None = None,
        geoms: Sequence[Any] | None = None,
        crs: str | None = "EPSG:32633",
        classes: Sequence[str] | str = "vehicle",
        field: str | None = "class",
        to_crs: str | None = None,
    ) -> Path:
        if geoms is None:
            assert boxes_px is not None
            mb = boxes_to_map(
                np.asarray(boxes_px), transform if transform is not None else default_transform()
            )
            geoms = list(shapely.box(mb[:, 0], mb[:, 1], mb[:, 2], mb[:, 3]))
        n = len(geoms)
        cols: dict[str, Any] = {}
        if field is not None:
            cols[field] = [classes] * n if isinstance(classes, str) else list(classes)
        frame = gpd.GeoDataFrame(cols, geometry=list(geoms), crs=crs)
        if to_crs is not None:
            frame = frame.to_crs(to_crs)
        path = tmp_path / name
        frame.to_file(path)
        return path

    return factory


@pytest.fixture(scope="session")
def synth_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three small synthetic scenes (train / pool / test, 768 px at 0.15 m) shared by the slow-ish tests.

    Seeds picked for content: at this size a scene holds a few parcels, and these have parking
    lots (train 57 vehicles / 28 look-alikes, pool 25 / 26, test 37 / 27).
    """
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    root = tmp_path_factory.mktemp("scenes")
    for name, seed in (("train", 110), ("pool", 106), ("test", 115)):
        write_scene(root, SceneSpec(size=768, gsd=0.15, seed=seed), name=name)
    return root


@pytest.fixture(scope="session")
def trained_small_model(synth_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small_fcos checkpoint trained for real (briefly, 1 thread) on the synthetic train scene."""
    import torch

    from hem_bootstrap.config import config_from_tree
    from hem_bootstrap.data.sampling import RatioBatchSampler
    from hem_bootstrap.data.training import (
        ChipDataset,
        collate_chips,
        prepare_train_images,
    )
    from hem_bootstrap.model.detectors import build_detector
    from hem_bootstrap.model.train import train

    s = synth_scenes
    cfg = config_from_tree(
        {
            "data": {"train": [{"images": [str(s / "train.tif")], "labels": str(s / "train_labels.gpkg")}]},
            "train": {"steps": 150, "batch_size": 4, "warmup_steps": 10, "lr": 2e-3, "background_chips": 4},
            "runtime": {"workers": 0, "seed": 0},
        },
        s,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        images = prepare_train_images(cfg.data.train, cfg.data)
        ds = ChipDataset(images, None, 4, 256, cfg.data, True, 0, overlap=128)
        torch.manual_seed(0)  # the same initial weights whatever ran before in the session
        model = build_detector(cfg.model, cfg.num_classes, 256)
        ckpt = tmp_path_factory.mktemp("model") / "model.pt"
        cached = os.environ.get("HEM_TEST_MODEL_CACHE")  # reuse a trained fixture model while debugging
        if cached and Path(cached).is_file():
            return Path(cached)
        sampler = RatioBatchSampler(ds, 4, 0.25, num_batches=cfg.train.steps, seed=0)
        train(model, ds, cfg.train, cfg.runtime, cfg.train.steps, batch_sampler=sampler, collate_fn=collate_chips,
              ckpt_path=ckpt, progress=False)
        if cached:
            import shutil

            shutil.copyfile(ckpt, cached)
    finally:
        torch.set_num_threads(threads)
    return ckpt
