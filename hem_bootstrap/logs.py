"""Logging for people at a terminal and for batch jobs: levels, a log file, and progress of long steps.

At a terminal a long step (training, a scan, matching a pool, scoring a test set) shows a
tqdm bar. A batch job's stderr is a file (Slurm, nohup, CI), where a bar's carriage returns
pile up into one unreadable line, so there each step logs a plain progress line at a fixed
interval instead, through :mod:`logging`, so that a log file gets the same lines:

    INFO hem_bootstrap.progress: train: 120/300 step (40%), 3.1 step/s, ETA 58 s, loss=0.412

``--log-file`` / ``runtime.log_file`` add a file handler (rank 0 only under torchrun) that
takes every record of the run, warnings included.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from tqdm import tqdm

from hem_bootstrap.errors import ConfigError

log = logging.getLogger("hem_bootstrap.progress")
T = TypeVar("T")

LOG_EVERY_S = 30.0
"""Default seconds between two progress lines when stderr is not a terminal (``runtime.log_every_s``)."""

_FORMAT = "%(levelname)s %(name)s: %(message)s"
_FILE_FORMAT = "%(asctime)s " + _FORMAT
_NOISY = ("pyogrio", "rasterio", "fiona", "matplotlib", "PIL", "faster_coco_eval")


def configure_logging(level: int, log_file: Path | None = None) -> None:
    """The root logger at ``level`` on stderr (and ``log_file``); Python warnings become log records."""
    logging.basicConfig(level=level, format=_FORMAT, force=True)
    for noisy in _NOISY:
        logging.getLogger(noisy).setLevel(logging.INFO if level <= logging.DEBUG else logging.WARNING)
    logging.captureWarnings(True)
    if log_file is not None:
        attach_log_file(log_file, "--log-file")


def attach_log_file(path: Path, what: str) -> Path | None:
    """Append every log record to ``path`` (with a timestamp); once per file, and on rank 0 only.

    Returns the file's path, or None where this process does not write it (another rank).

    Raises:
        ConfigError: the file cannot be opened for appending (``what`` names the setting).
    """
    if os.environ.get("RANK", "0") != "0":
        return None
    target = Path(path).expanduser().resolve()
    root = logging.getLogger()
    if any(isinstance(h, logging.FileHandler) and Path(h.baseFilename) == target for h in root.handlers):
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(target, mode="a", encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{what} = {path}: cannot append to it ({err.strerror or err})") from None
    handler.setFormatter(logging.Formatter(_FILE_FORMAT))
    root.addHandler(handler)
    return target


def log_to_files_only(message: str, level: int = logging.ERROR) -> None:
    """Write a record to the log files only (for a message already printed on stderr, like the final error)."""
    record = logging.getLogger("hem_bootstrap").makeRecord("hem_bootstrap", level, "", 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def interactive() -> bool:
    """True when stderr is a terminal (bars), False for a batch job's log (lines)."""
    isatty = getattr(sys.stderr, "isatty", None)
    return bool(isatty and isatty())


class Progress:
    """Progress of one long step: a bar at a terminal, a log line every ``every_s`` seconds otherwise.

    Args:
        total: Units the step will do.
        what: The step's name, first in each line (``train``, ``detect``, ...).
        unit: The unit's name (``step``, ``tile``, ``image``).
        enabled: False shows nothing (other ranks, ``hem -q``).
        initial: Units already done (a resumed training run).
        every_s: Seconds between two lines in a log; 0 logs every update.
    """

    def __init__(self, total: float, what: str, unit: str, enabled: bool = True, initial: float = 0,
                 every_s: float = LOG_EVERY_S) -> None:
        self.total, self.what, self.unit, self.every_s = float(total), what, unit, float(every_s)
        self.done = self.start = float(initial)
        self.fields: dict[str, Any] = {}
        self.enabled = enabled and log.isEnabledFor(logging.INFO)
        self.bar = tqdm(total=total, initial=initial, unit=unit, desc=what, leave=False, dynamic_ncols=True,
                        disable=not (self.enabled and interactive()))
        self.lines = self.enabled and self.bar.disable
        self.t0 = self.last = time.perf_counter()

    def update(self, n: float = 1, **fields: Any) -> None:
        """``n`` more units done; ``fields`` (e.g. ``loss=0.41``) are shown with the next line or bar refresh."""
        self.done = min(self.total, self.done + n)
        self.fields.update(fields)
        if not self.bar.disable:
            self.bar.update(round(self.done) - self.bar.n)
            self.bar.set_postfix({**self.fields, f"{self.unit}_s": f"{self.rate():.1f}"}, refresh=False)
        elif self.lines and time.perf_counter() - self.last >= self.every_s:
            self.last = time.perf_counter()
            log.info("%s", self.line())

    def rate(self) -> float:
        """Units per second since this step (re)started."""
        return (self.done - self.start) / max(time.perf_counter() - self.t0, 1e-9)

    def line(self) -> str:
        """``what: done/total unit (pct), rate, ETA, fields``."""
        rate = self.rate()
        eta = f"{(self.total - self.done) / rate:.0f} s" if rate > 0 else "?"
        pct = 100.0 * self.done / self.total if self.total else 100.0
        extra = "".join(f", {k}={_short(v)}" for k, v in self.fields.items())
        return (f"{self.what}: {self.done:.0f}/{self.total:.0f} {self.unit} ({pct:.0f}%), "
                f"{rate:.1f} {self.unit}/s, ETA {eta}{extra}")

    def close(self) -> None:
        """End the bar; in a log, one last line with the time the step took."""
        self.bar.close()
        if self.lines:
            log.info("%s; done in %.0f s", self.line(), time.perf_counter() - self.t0)
            self.lines = False


def track(items: Sequence[T], what: str, unit: str, enabled: bool = True, every_s: float = LOG_EVERY_S) -> Iterator[T]:
    """Iterate ``items`` with a :class:`Progress` of one unit per item."""
    bar = Progress(len(items), what, unit, enabled=enabled, every_s=every_s)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
