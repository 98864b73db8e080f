"""The run directory: atomic writes, the manifest of finished steps, and a lock against a second process.

Every file of a run is written to a temporary name in the same folder and renamed, so a
killed run leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hem_bootstrap.errors import RunError

MANIFEST = "manifest.json"
LOCK = ".lock"

KILL_ENV = "HEM_KILL_AT"
"""Fault-injection hook for tests (see :func:`fault_point`); never set it in production."""

_FAULT_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test-only fault injection: kill this process at a named point when ``HEM_KILL_AT`` asks for it.

    ``HEM_KILL_AT=NAME`` (first time ``NAME`` is reached) or ``NAME#N`` (the N-th time, counted in
    this process) sends SIGKILL to the process itself, which is the harshest crash there is: no
    handler, no ``finally``, no flush. A ``:TERM`` or ``:INT`` suffix sends that signal instead, to
    check the graceful stop; several points may be given, comma-separated. The crash-safety tests
    use it to stop a real ``hem run`` at a chosen step deterministically. Points: ``round{r}.{step}.start`` / ``round{r}.{step}.end`` (step files
    written, manifest not yet), ``bank.replace`` (bank written under its temporary name, not yet
    renamed), ``train.batch`` (a training batch collated) and ``detect.tile`` (a tile read).
    Costs one environment lookup when unset.
    """
    wanted = os.environ.get(KILL_ENV)
    if not wanted:
        return
    hits = _FAULT_HITS[name] = _FAULT_HITS.get(name, 0) + 1
    for want in wanted.split(","):
        sig = signal.SIGKILL
        if ":" in want:
            want, sig_name = want.rsplit(":", 1)
            sig = {"TERM": signal.SIGTERM, "INT": signal.SIGINT}.get(sig_name, signal.SIGKILL)
        target, _, nth = want.strip().partition("#")
        if target == name and hits == (int(nth) if nth.isdigit() else 1):
            os.kill(os.getpid(), sig)


def atomic_write_text(path: Path, text: str) -> None:
    """Write text under a temporary name, fsync and rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RunError(f"{path}: could not write ({err.strerror}); the previous version is intact") from None


def atomic_write_json(path: Path, data: Any) -> None:
    """JSON version of :func:`atomic_write_text`."""
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def file_sha(path: Path, n: int = 12) -> str:
    """Short sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:n]


class RunDir:
    """A run directory and its manifest (rounds, steps done, timings, skipped rasters)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock_fh: Any = None

    # ------------------------------------------------------------------ paths
    def round_dir(self, r: int) -> Path:
        """``round_XXX`` folder of round ``r`` (created)."""
        d = self.path / f"round_{r:03d}"
        d.mkdir(parents=True, exist_ok=True)
        return d

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
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise RunError(f"{self.manifest_path}: unreadable manifest ({err}); the run cannot be resumed") from None

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

    @staticmethod
    def step_done(manifest: dict[str, Any], r: int, step: str) -> bool:
        """Whether ``step`` of round ``r`` finished."""
        for entry in manifest["rounds"]:
            if entry["round"] == r:
                return step in entry.get("steps", {})
        return False

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
