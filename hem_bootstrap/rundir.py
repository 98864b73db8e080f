"""The run directory: atomic writes, the manifest of finished steps, and a lock against a second process.

Every file of a run is written to a temporary name in the same folder and renamed, so a
killed run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hem_bootstrap.errors import RunError
from hem_bootstrap.files import atomic_write_json

MANIFEST = "manifest.json"
LOCK = ".lock"

class RunDir:
    """A run directory and its manifest (rounds, steps done, timings, skipped rasters)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fh: Any = None

    # ------------------------------------------------------------------ paths
    def round_dir(self, r: int) -> Path:
        """``round_XXX`` folder of round ``r`` (created)."""
        d = self.round_path(r)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def round_path(self, r: int) -> Path:
        """``round_XXX`` folder of round ``r``, not created (to look, not to write)."""
        return self.path / f"round_{r:03d}"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    @property
    def bank_path(self) -> Path:
        return self.path / "bank.gpkg"

    # --------------------------------------------------------------- manifest
    def exists(self) -> bool:
        """Whether a manifest is there (the run was started)."""
        return self.manifest_path.is_file()

    def load_manifest(self) -> dict[str, Any]:
        """The manifest, or a fresh one."""
        if not self.manifest_path.is_file():
            return {"rounds": [], "bad_rasters": [], "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            manifest = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise RunError(f"{self.manifest_path}: unreadable manifest ({err}); the run cannot be resumed") from None
        if not (isinstance(manifest, dict) and isinstance(manifest.get("rounds"), list)
                and all(isinstance(e, dict) and isinstance(e.get("round"), int) for e in manifest["rounds"])):
            raise RunError(f"{self.manifest_path}: not a hem manifest (expected an object whose 'rounds' lists "
                           "{round, steps} entries); the run cannot be read")
        return manifest

    def save_manifest(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically."""
        manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        atomic_write_json(self.manifest_path, manifest)

    @staticmethod
    def round_entry(manifest: dict[str, Any], r: int) -> dict[str, Any]:
        """The manifest entry of round ``r`` (created if missing)."""
        for entry in manifest["rounds"]:
            if entry["round"] == r:
                return entry
        entry = {"round": r, "steps": {}}
        manifest["rounds"].append(entry)
        manifest["rounds"].sort(key=lambda e: e["round"])
        return entry

    # ------------------------------------------------------------------- lock
    def acquire(self) -> None:
        """Take the run's lock; fail naming the holder if another process has it."""
        self.path.mkdir(parents=True, exist_ok=True)
        lock_path = self.path / LOCK
        fh = open(lock_path, "a+")  # noqa: SIM115 - held for the life of the run
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "another process"
            fh.close()
            raise RunError(f"{self.path}: run directory is in use by {holder}; wait for it or stop it") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}")
        fh.flush()
        self._lock_fh = fh

    def remove_stale_temps(self) -> list[Path]:
        """Delete temporary files a killed process left behind; call only while holding the lock.

        Every writer names its temporary file ``.NAME...tmp...`` beside the target, so with the
        lock held none of them can belong to a live writer.
        """
        removed = []
        for p in sorted(self.path.rglob(".*")):
            if ".tmp" in p.name and p.is_file():
                with contextlib.suppress(OSError):
                    p.unlink()
                    removed.append(p)
        return removed

    def release(self) -> None:
        """Release the lock."""
        if self._lock_fh is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._lock_fh.fileno(), fcntl.LOCK_UN)
            self._lock_fh.close()
            self._lock_fh = None

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunDir]:
        """Hold the lock for the duration of a block."""
        self.acquire()
        try:
            yield self
        finally:
            self.release()
