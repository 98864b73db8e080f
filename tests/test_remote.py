"""Rasters that are not local files: a Cloud-Optimized GeoTIFF over HTTP, read windowed like a local file."""

from __future__ import annotations

import functools
import http.server
import re
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import geopandas as gpd
import pytest
import rasterio.shutil
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.config import ImageSet
from hem_bootstrap.remote import gdal_path, is_remote, shown

pytestmark = pytest.mark.usefixtures("one_thread")


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with HTTP range requests (what GDAL's /vsicurl/ asks for); every request is recorded."""

    seen: list[tuple[str, str, str, int, str]]  # (method, path, Range header, status, User-Agent), one list per server

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range", "")
        if not path.is_file():
            self._record(rng, 404)
            self.send_error(404)
            return
        data = path.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        status = 206 if m else 200
        if m:
            start, end = int(m[1]), min(int(m[2]) if m[2] else len(data) - 1, len(data) - 1)
            body = data[start : end + 1]
        else:
            body = data
        self._record(rng, status)
        self.send_response(status)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self._record("", 404)
            self.send_error(404)
            return
        self._record("", 200)
        self.send_response(200)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(path.stat().st_size))
        self.end_headers()

    def _record(self, rng: str, status: int) -> None:
        self.seen.append((self.command, self.path, rng, status, self.headers.get("User-Agent", "")))


Served = tuple[str, Path, list[tuple[str, str, str, int, str]]]


@pytest.fixture(scope="module")
def cog_server(synth_scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """The test scene as a COG, served on 127.0.0.1 by a server started here; yields (base URL, folder, requests)."""
    root = tmp_path_factory.mktemp("served")
    rasterio.shutil.copy(synth_scenes / "test.tif", root / "test_cog.tif", driver="COG", blocksize=256)
    seen: list[tuple[str, str, str, int, str]] = []
    handler = type("Handler", (_RangeHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, seen
    finally:
        server.shutdown()
        server.server_close()


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
    cfg = loop_config(tmp_path, "remote", scene_data(synth_scenes))
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
    cfg = loop_config(tmp_path, "remote", scene_data(synth_scenes))
    code, err = _detect(capsys, cfg, trained_small_model, f"{base}/gone.tif", tmp_path / "x.gpkg")
    lines = err.strip().splitlines()
    assert code == 2 and lines[-1].startswith("error: ")
    assert f"/vsicurl/{base}/gone.tif" in lines[-1] and "404" in lines[-1]
    assert not (tmp_path / "x.gpkg").exists()
