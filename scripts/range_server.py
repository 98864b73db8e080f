"""A static file server with HTTP range requests on 127.0.0.1, for tests and benchmarks of remote rasters.

GDAL's ``/vsicurl/`` reads a Cloud-Optimized GeoTIFF by byte ranges; Python's own
``http.server`` answers every GET with the whole file, so this one answers ``Range: bytes=a-b``
with 206 and the slice, and records each request (method, path, Range header, status,
User-Agent) so a test can check that reads were windowed.

Usage:
    with serve(folder) as (base_url, seen):
        ...  # rasters under folder are at f"{base_url}/name.tif"
"""

from __future__ import annotations

import functools
import http.server
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

Request = tuple[str, str, str, int, str]
"""(method, path, Range header, status, User-Agent)."""


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    seen: list[Request]

    def log_message(self, *args: Any) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802 - the http.server hook's name
        self._answer(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def _answer(self, body: bool) -> None:
        path = Path(self.translate_path(self.path))
        rng = self.headers.get("Range", "")
        if not path.is_file():
            self._record(rng, 404)
            self.send_error(404)
            return
        size = path.stat().st_size
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng)
        start, end = (int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)) if m else (0, size - 1)
        self._record(rng, 206 if m else 200)
        self.send_response(206 if m else 200)
        if m:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(end - start + 1))
        self.end_headers()
        if body:
            with path.open("rb") as f:
                f.seek(start)
                self.wfile.write(f.read(end - start + 1))

    def _record(self, rng: str, status: int) -> None:
        self.seen.append((self.command, self.path, rng, status, self.headers.get("User-Agent", "")))


@contextmanager
def serve(root: Path) -> Iterator[tuple[str, list[Request]]]:
    """Serve ``root`` on a free port of 127.0.0.1 in a thread; yields the base URL and the request log."""
    seen: list[Request] = []
    handler = type("Handler", (_RangeHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
