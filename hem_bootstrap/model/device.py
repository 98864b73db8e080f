"""Device selection, training mixed precision and seeding.

Inference precision (fast paths, bf16 on a CPU) lives in :mod:`hem_bootstrap.model.precision`.

Everything here works on a CPU-only machine; CUDA features (AMP, cuDNN flags) switch on only
when the resolved device is a GPU.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import random
import re

import numpy as np
import torch

from hem_bootstrap.errors import ConfigError

log = logging.getLogger(__name__)

_DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""
KEEP_FREED_BYTES = 512 << 20
"""Freed heap memory glibc may keep for reuse before it gives it back to the system."""
MMAP_THRESHOLD_BYTES = 32 << 20
"""Allocations from this size on get their own mapping (glibc's largest dynamic threshold)."""
_MALLOC_TUNED: list[bool] = []


def resolve_device(spec: str) -> torch.device:
    """Turn ``runtime.device`` into a :class:`torch.device`.

    ``auto`` picks CUDA when a GPU is visible, else the CPU, so one config runs anywhere.

    Raises:
        ConfigError: the spec is malformed, or names a GPU this machine does not have.
    """
    text = str(spec).strip().lower()
    if not _DEVICE_RE.match(text):
        raise ConfigError(f"runtime.device = {spec!r}: expected auto, cpu, cuda or cuda:N")
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"runtime.device = {spec!r}: no CUDA GPU is visible; use auto or cpu")
        dev = torch.device(text)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"runtime.device = {spec!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        return dev
    if text == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ConfigError(f"runtime.device = {spec!r}: MPS is not available on this machine")
    return torch.device(text)


def amp_dtype(dtype: str) -> torch.dtype:
    """``"bf16"`` / ``"fp16"`` (the config's spelling) as a torch dtype.

    Raises:
        ConfigError: any other spelling.
    """
    table = {"bf16": torch.bfloat16, "fp16": torch.float16}
    if dtype not in table:
        raise ConfigError(f"runtime.amp_dtype = {dtype!r}: expected one of {sorted(table)}")
    return table[dtype]


def amp_enabled(device: torch.device, enabled: bool) -> bool:
    """Training AMP runs only on CUDA (CPU training stays float32; CPU inference may use bf16, see precision.py)."""
    return bool(enabled) and device.type == "cuda"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so runs repeat.

    cuDNN autotuning stays on: bit-exact GPU determinism is not promised, CPU runs are.
    """
    s = int(seed)
    random.seed(s)
    np.random.seed(s % (2**32))
    torch.manual_seed(s)
    os.environ.setdefault("PYTHONHASHSEED", str(s))


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for the next batch instead of returning it; True when applied.

    A model's activations are freed after every batch. With glibc's default thresholds, a
    scan (which allocates detection frames and GeoPackage rows between batches) gives much of
    that memory back to the system and faults it in again for the next batch: measured on a
    2-core EPYC, 11,000 minor page faults per batch of 8 tiles inside a scan against 1,100 in a
    bare model loop, and the model ran 10-20 % slower inside the scan. A fixed mmap threshold
    and a higher trim threshold keep it (138 faults per batch). Peak memory is unchanged: only
    memory the process already used is kept. A no-op (False) where libc has no ``mallopt``.
    """
    if _MALLOC_TUNED:
        return _MALLOC_TUNED[0]
    ok = False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
            libc.mallopt(M_TRIM_THRESHOLD, KEEP_FREED_BYTES))
    except (OSError, AttributeError):
        ok = False
    log.debug("malloc thresholds %s", "set" if ok else "left as they are (no glibc mallopt)")
    _MALLOC_TUNED.append(ok)
    return ok
