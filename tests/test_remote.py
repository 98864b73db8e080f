"""Rasters that are not local files: a Cloud-Optimized GeoTIFF over HTTP, read windowed like a local file."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import geopandas as gpd
import pytest
import rasterio.shutil
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.config import ImageSet
from hem_bootstrap.remote import gdal_path, is_remote, shown

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from range_server import Request, serve  # noqa: E402 - a test tool kept with the benchmark that uses it too

pytestmark = pytest.mark.usefixtures("one_thread")


Served = tuple[str, Path, list[Request]]


@pytest.fixture(scope="module")
def cog_server(synth_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The test scene as a COG, served on 127.0.0.1 by a server started here; yields (base URL, folder, requests)."""
    root = tmp_path_factory.mktemp("served")
    rasterio.shutil.copy(synth_scenes / "test.tif", root / "test_cog.tif", driver="COG", blocksize=256)
    with serve(root) as (base, seen):
        yield base, root, seen


def _detect(capsys: pytest.CaptureFixture[str], cfg: Path, model: Path, image: str, out: Path,
            *extra: str) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main(["detect", str(cfg), "--model", str(model), image, "--out", str(out),
              "--set", "model.fast_path=none", "--set", "runtime.batch_size=4", *extra])
        code = 0
    except SystemExit as ex:
        code = int(ex.code or 0)
    return code, capsys.readouterr().err


def _boxes(path: Path) -> gpd.GeoDataFrame:
    cols = ["label", "score", "px_xmin", "px_ymin", "px_xmax", "px_ymax"]
    return gpd.read_file(path).sort_values(cols).reset_index(drop=True)[[*cols, "geometry"]]


def test_locations_as_gdal_opens_them() -> None:
    assert gdal_path("https://example.org/a.tif") == "/vsicurl/https://example.org/a.tif"
    assert gdal_path("s3://bucket/tiles/a.tif") == "/vsis3/bucket/tiles/a.tif"
    assert gdal_path("/data/a.tif") == "/data/a.tif" and not is_remote("/data/a.tif")
    assert is_remote("/vsicurl/https://x/a.tif") and is_remote("gs://b/a.tif")
    assert shown(Path("/vsicurl/https://x/a.tif")) == "/vsicurl/https://x/a.tif"  # pathlib folds the //
    signed = "https://x/a.tif?X-Amz-Signature=ab[c]"
    assert ImageSet(images=[signed]).resolved_images() == [Path("/vsicurl/" + signed)]  # a query is no glob


def test_a_cog_over_http_detects_like_the_local_file(cog_server: Served, synth_scenes: Path,
                                                     trained_small_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base, root, seen = cog_server
    cfg = loop_config(tmp_path, "remote", scene_data(synth_scenes), width=None)
    code, err = _detect(capsys, cfg, trained_small_model, str(root / "test_cog.tif"), tmp_path / "local.gpkg")
    assert code == 0, err
    before = len(seen)
    code, err = _detect(capsys, cfg, trained_small_model, f"{base}/test_cog.tif", tmp_path / "remote.gpkg",
                        "--set", "runtime.gdal.GDAL_HTTP_USERAGENT=hem-test",
                        "--set", "runtime.gdal.GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR")
    assert code == 0, err
    assert "Warning" not in err and "ERROR" not in err
    local, remote = _boxes(tmp_path / "local.gpkg"), _boxes(tmp_path / "remote.gpkg")
    assert len(local) > 0 and local.drop(columns="geometry").equals(remote.drop(columns="geometry"))
    assert local.geometry.geom_equals_exact(remote.geometry, tolerance=1e-9).all()
    assert set(gpd.read_file(tmp_path / "remote.gpkg")["image"]) == {f"/vsicurl/{base}/test_cog.tif"}
    tif = [r for r in seen[before:] if r[1] == "/test_cog.tif"]
    gets = [r for r in tif if r[0] == "GET"]
    assert len(gets) > 1 and all(r[2] and r[3] == 206 for r in gets)  # windowed: byte ranges, never the whole file
    assert {r[4] for r in tif} == {"hem-test"}  # runtime.gdal reached GDAL


def test_a_missing_url_is_a_one_line_error_naming_it(cog_server: Served, synth_scenes: Path,
                                                     trained_small_model: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    base, _, _ = cog_server
    cfg = loop_config(tmp_path, "remote", scene_data(synth_scenes), width=None)
    code, err = _detect(capsys, cfg, trained_small_model, f"{base}/gone.tif", tmp_path / "x.gpkg")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ")
    assert f"/vsicurl/{base}/gone.tif" in lines[-1] and "404" in lines[-1]
    assert not (tmp_path / "x.gpkg").exists()
