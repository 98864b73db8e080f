"""Atomic file writes: every file of a run is written under a temporary name beside it, then renamed.

``os.replace`` is atomic on one filesystem, so a reader (or a resumed run) sees the old file
or the new one, never half of one. Temporary names are ``.NAME.PID.tmp[SUFFIX]`` in the
target's folder (the suffix keeps the extension that GDAL drivers go by), which is the
pattern :meth:`hem_bootstrap.rundir.RunDir.remove_stale_temps` cleans up after a killed process.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hem_bootstrap.errors import RunError


def cache_dir() -> Path:
    """hem's per-user cache (measured fast paths, virtual rasters): ``$HEM_CACHE_DIR``, else ``~/.cache/hem-bootstrap``."""
    return Path(os.environ.get("HEM_CACHE_DIR") or Path.home() / ".cache" / "hem-bootstrap")


def check_output(out: Path, what: str, folder: bool = False) -> Path:
    """An output path a command may write: not a directory (or, with ``folder``, not a file), and never one of a
    run's own files (``bank.gpkg``, ``round_NNN/model.pt``, ...), which a stray ``--out`` would replace.

    Raises:
        RunError: naming ``out``, ``what`` it was for and what was expected.
    """
    out = Path(out)
    if folder and out.exists() and not out.is_dir():
        raise RunError(f"{what} {out}: a file is in the way; expected a folder (or a new name)")
    if not folder and out.is_dir():
        raise RunError(f"{what} {out}: is a directory; expected a file name")
    if out.is_file():
        parent = out.resolve().parent
        run = parent.parent if re.fullmatch(r"round_\d{3,}", parent.name) else parent
        if (run / "manifest.json").is_file() and (run != parent or out.name in RUN_FILES):
            raise RunError(f"{what} {out}: a file of the run {run}; write the output elsewhere")
    return out


RUN_FILES = ("manifest.json", "config.resolved.yaml", "bank.gpkg", "review_positives.gpkg", "table.txt")
"""The files at the top of a run directory (each round's folder is the run's whole)."""


def temp_path(target: Path, suffix: str = "") -> Path:
    """The temporary name for ``target`` in this process (``suffix``: e.g. ``.gpkg`` for GDAL's driver)."""
    target = Path(target)
    return target.with_name(f".{target.name}.{os.getpid()}.tmp{suffix}")


@contextlib.contextmanager
def atomic_path(target: Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path to write; on success it is renamed over ``target``, on any error removed.

    The folder is created if needed; a stale temporary file of the same name is removed first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(target, suffix)
    tmp.unlink(missing_ok=True)
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    """Write ``data`` to ``target`` atomically, fsynced before the rename."""
    with atomic_path(target) as tmp, open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def atomic_copy(source: Path, target: Path) -> None:
    """Copy ``source`` over ``target`` atomically."""
    with atomic_path(target, Path(target).suffix) as tmp:
        shutil.copyfile(source, tmp)


def atomic_write_text(target: Path, text: str) -> None:
    """Write text atomically (fsynced).

    Raises:
        RunError: the write failed (disk full, read-only); the previous version is intact.
    """
    try:
        atomic_write_bytes(Path(target), text.encode())
    except OSError as err:
        raise RunError(f"{target}: could not write ({err.strerror}); the previous version is intact") from None


def atomic_write_json(target: Path, data: Any) -> None:
    """JSON version of :func:`atomic_write_text`."""
    atomic_write_text(target, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
