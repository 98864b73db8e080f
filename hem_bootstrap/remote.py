"""Raster locations that are not local files: URLs and GDAL virtual file systems.

A raster may be any path GDAL opens: ``/vsicurl/https://...`` (a Cloud-Optimized GeoTIFF over
HTTP), ``/vsis3/bucket/key``, ``/vsigs/...``, ``/vsiaz/...``, or a plain ``https://`` / ``s3://``
/ ``gs://`` URL, which becomes its ``/vsi`` path here. Such a raster is read windowed, exactly
like a local file (GDAL fetches the byte ranges of the tiles a window needs); only the checks
that ask the local disk (does the file exist, does a glob match) are skipped, and GDAL's own
error then names the URL.

``pathlib`` folds the ``//`` after a URL's scheme into ``/``; GDAL opens either spelling, and
:func:`shown` restores the URL for messages.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

_SCHEMES = {"http": "/vsicurl/", "https": "/vsicurl/", "s3": "/vsis3/", "gs": "/vsigs/", "az": "/vsiaz/"}
_URL = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.+)$", re.IGNORECASE)
_FOLDED = re.compile(r"(https?|s3|gs|az):/(?!/)", re.IGNORECASE)


def gdal_path(location: str) -> str:
    """``location`` as GDAL opens it: a URL becomes its ``/vsi`` path; anything else is returned unchanged."""
    m = _URL.match(location)
    if m is None:
        return location
    scheme = m["scheme"].lower()
    if scheme not in _SCHEMES:
        return location
    return _SCHEMES[scheme] + (location if scheme in ("http", "https") else m["rest"])


def is_remote(location: str | Path) -> bool:
    """True for a GDAL virtual path (``/vsi...``) or a URL: not something to look for on the local disk."""
    text = str(location)
    return text.startswith("/vsi") or _URL.match(text) is not None


def exists(location: str | Path) -> bool:
    """Whether a local raster file exists; a remote one is taken to exist until GDAL says otherwise."""
    return is_remote(location) or Path(location).exists()


def shown(location: str | Path) -> str:
    """The location as a person wrote it (the ``://`` that ``pathlib`` folds restored)."""
    text = str(location)
    return _FOLDED.sub(lambda m: m.group(0) + "/", text) if is_remote(text) else text


def location(path: str | Path) -> str:
    """The string a raster goes by in every file and message: its path, or its URL as written."""
    return shown(Path(path))


def apply_gdal_options(options: Mapping[str, str]) -> None:
    """Set GDAL configuration options (``runtime.gdal``) for this process and the workers it starts.

    They go into the environment, which GDAL reads when an option is first needed and which
    DataLoader workers inherit, however they are started.
    """
    for key, value in options.items():
        os.environ[str(key)] = str(value)
