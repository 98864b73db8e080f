"""The inference precision policy, in one place: which fast path a scan runs, and what it promises.

Fast paths (``model.fast_path``):

* ``none``: eager float32, the reference.
* ``channels_last``: float32 in channels-last memory format; the same detections.
* ``compile``: channels_last plus ``torch.compile`` of the backbone.
* ``bf16``: channels_last with the trunk, the pyramid and the classification under bfloat16
  autocast, while the box-regression output layers (and so the box decoding that follows
  them) run in float32. What it promises against eager float32, on any CPU: scores within
  0.01, and at least 95 % of confident boxes at IoU >= 0.9 with the rest at IoU >= 0.85.
  bfloat16 features move a box edge by up to about a pixel, enough to swap which of two
  neighbouring locations wins a near-tie, and that is what those few boxes are. Boxes
  regressed in bfloat16 drift further (measured: 89 % at IoU >= 0.9 with AVX2 only).
* ``onnxruntime``: float32, the backbone and heads run by onnxruntime, anchors, decoding and NMS
  by torchvision (:mod:`hem_bootstrap.model.onnx_path`); CPU only, single-stage detectors
  (FCOS, RetinaNet). Head outputs equal eager float32's to about 1e-4, so the same detections.
* ``auto``: on CUDA, ``channels_last`` with ``runtime.amp`` deciding precision. On a CPU it is
  chosen by measuring: eager float32, channels_last, onnxruntime (when it is installed and the
  detector is single-stage) and (when the CPU reports native bf16, AVX512-BF16 or AMX) bf16
  are timed on the real model, one batch of tiles each, and the fastest wins, where bf16 must
  beat the best float32 path by :data:`BF16_MIN_GAIN` and channels_last or onnxruntime eager
  float32 by :data:`LAYOUT_MIN_GAIN`. So ``auto`` never picks a path
  slower than eager float32, and never bf16 where it is emulated (6.5x slower on AVX2). The
  choice is kept per CPU, torch version, architecture, tile and batch size in
  ``$HEM_CACHE_DIR/fast_path.json`` (default ``~/.cache/hem-bootstrap``), so every process
  on one machine makes the same choice and a resumed run detects exactly as before.

Training mixed precision is separate: it runs on CUDA only (see :func:`hem_bootstrap.model.device.amp_enabled`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import time
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from hem_bootstrap.config import ModelConfig, RuntimeConfig
from hem_bootstrap.distributed import broadcast_from_rank0, rank_world
from hem_bootstrap.errors import ModelError
from hem_bootstrap.files import atomic_write_bytes, cache_dir
from hem_bootstrap.model import onnx_path
from hem_bootstrap.model.device import keep_freed_memory

log = logging.getLogger(__name__)

BF16_MIN_GAIN = 1.2
"""bf16 trades a little precision; ``auto`` takes it only for at least this speed-up over float32."""
LAYOUT_MIN_GAIN = 1.03
"""channels_last or onnxruntime must beat eager float32 by this much to be chosen (else the reference stays)."""
FLOAT32_PATHS = ("none", "channels_last", "onnxruntime")
"""The paths that compute in float32 (the same detections); ``auto`` keeps the fastest of them unless bf16 wins."""
MEASURE_ROUNDS = 3
"""Timed forward passes per candidate (interleaved, the fastest of each kept), after one warm-up."""
BOX_OUTPUT_LAYERS = ("bbox_reg", "bbox_ctrness", "bbox_pred")
"""Names of the box-regression output layers of torchvision's detectors (FCOS, RetinaNet, R-CNN)."""

_CHOICES: dict[str, str] = {}
"""In-process cache of measured ``auto`` choices, by key (see :func:`_choice_key`)."""


# ------------------------------------------------------------------------------ CPU facts


ISA_LIMITS = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")
"""Environment variables that hold oneDNN, ATen and MKL to an older instruction set (e.g. AVX2 on an AVX-512 CPU)."""
ONEDNN_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE", "AVX512_CORE_VNNI")
"""``ONEDNN_MAX_CPU_ISA`` values under which oneDNN, which runs the convolutions, emulates bfloat16."""


def cpu_has_native_bf16() -> bool:
    """True when this CPU reports native bfloat16 (AVX512-BF16 or AMX) and ``ONEDNN_MAX_CPU_ISA`` does not hold
    oneDNN below it, so bf16 can be fast, not emulated."""
    if os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().upper() in ONEDNN_WITHOUT_BF16:
        return False
    cpu = getattr(torch, "cpu", None)
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(cpu, name, lambda: False)()) for name in checks)


def isa_limits() -> dict[str, str]:
    """The ISA limits set in this environment (for cache keys and benchmark reports)."""
    return {var: os.environ[var] for var in ISA_LIMITS if os.environ.get(var)}


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), for cache keys and benchmark reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ------------------------------------------------------------------------------ the prepared model


class Detector(Protocol):
    """What a scan calls: a torchvision detector in eval mode, or :class:`~hem_bootstrap.model.onnx_path.OnnxDetector`."""

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]: ...


@dataclass
class PreparedModel:
    """A detector ready for inference on one device, with its resolved fast path.

    Call it like the model (a list of image tensors); it applies its own autocast.
    """

    module: Detector
    device: torch.device
    fast_path: str
    autocast_dtype: torch.dtype | None = None

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast for this model's forward pass (a no-op in float32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        with self.autocast():
            return self.module(images)  # type: ignore[no-any-return]


def prepare_model(
    model: nn.Module,
    device: torch.device,
    model_cfg: ModelConfig,
    runtime: RuntimeConfig | None = None,
    tile_size: int = 256,
) -> PreparedModel:
    """Move the model to the device in eval mode with its fast path (``auto`` resolved here, once).

    The box-regression output layers are set to run in float32 whatever autocast is active
    (a no-op for float32 paths). ``runtime`` gives the batch size that ``auto`` measures
    with and, on CUDA, the AMP settings.
    """
    keep_freed_memory()  # batch after batch, the same activations reuse the same pages
    model = model.to(device).eval()
    keep_box_outputs_float32(model)
    batch = runtime.batch_size if runtime is not None else 4
    fast: str = model_cfg.fast_path
    if fast == "auto":
        fast = "channels_last" if device.type != "cpu" else measured_cpu_path(model, model_cfg, tile_size, batch)
    if fast == "onnxruntime":
        return PreparedModel(_onnx_detector(model, device, tile_size), device, fast)
    if fast in ("channels_last", "compile", "bf16") and model_cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fast == "compile":
        backbone = getattr(model, "backbone", None)
        if backbone is not None:
            model.backbone = torch.compile(backbone, dynamic=False)  # type: ignore[assignment]
    return PreparedModel(model, device, fast, _autocast_dtype(device, fast, runtime))


def _onnx_detector(model: nn.Module, device: torch.device, tile_size: int) -> onnx_path.OnnxDetector:
    """The onnxruntime fast path, or a one-line error saying why it cannot run here."""
    if device.type != "cpu":
        raise ModelError(f"model.fast_path=onnxruntime runs on the CPU only (runtime.device is {device.type})")
    if not onnx_path.available():
        raise ModelError("model.fast_path=onnxruntime needs onnxruntime and onnx: pip install onnxruntime onnx")
    if not onnx_path.supported(model):
        raise ModelError(f"model.fast_path=onnxruntime: {type(model).__name__} is not a single-stage detector "
                         "(FCOS, RetinaNet); use none, channels_last or auto")
    return onnx_path.OnnxDetector(model, tile_size)


def _autocast_dtype(device: torch.device, fast: str, runtime: RuntimeConfig | None) -> torch.dtype | None:
    if device.type == "cuda" and runtime is not None and runtime.amp:
        return torch.bfloat16 if runtime.amp_dtype == "bf16" else torch.float16
    if device.type == "cpu" and fast == "bf16":
        return torch.bfloat16
    return None


# ------------------------------------------------------------------------------ float32 box outputs


def keep_box_outputs_float32(model: nn.Module) -> int:
    """Make the box-regression output layers compute in float32 under any autocast; returns how many.

    Their inputs are cast up and autocast is switched off inside them, so regression offsets
    and the box decoding that follows stay float32 while the rest of the network may run in
    bfloat16 or float16. SSD's regression head (only output convolutions) is treated as one
    such layer. Parameters and checkpoint keys are unchanged; calling it twice changes nothing.
    """
    n = 0
    for name, module in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        is_output = leaf in BOX_OUTPUT_LAYERS
        is_ssd_head = leaf == "regression_head" and not any(
            c in BOX_OUTPUT_LAYERS for c, _ in module.named_children()
        ) and hasattr(module, "module_list")
        if (is_output or is_ssd_head) and "forward" not in vars(module):
            module.forward = types.MethodType(_float32_forward, module)  # type: ignore[method-assign]
            n += 1
    return n


def _float32_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """The module's own forward on float32 inputs with autocast off (bound per instance)."""
    with _no_autocast():
        return type(self).forward(self, *_as_float32(args), **_as_float32(kwargs))


@contextlib.contextmanager
def _no_autocast() -> Iterator[None]:
    with torch.autocast("cpu", enabled=False):
        if torch.cuda.is_available():
            with torch.autocast("cuda", enabled=False):
                yield
        else:
            yield


def _as_float32(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() and value.dtype != torch.float32 else value
    if isinstance(value, (list, tuple)):
        return type(value)(_as_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _as_float32(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------------------------ measured auto


def measured_cpu_path(model: nn.Module, model_cfg: ModelConfig, tile_size: int, batch: int) -> str:
    """The fastest CPU path for this model on this machine (see the module docstring); cached.

    Under torchrun rank 0 decides (cache or measurement) and every rank takes its choice, so a
    sharded scan runs one path, and the ranks do not time the model against each other.
    """
    key = _choice_key(model, model_cfg, tile_size, batch)
    if key not in _CHOICES:
        choice = _stored_or_measured(key, model, model_cfg, tile_size, batch) if rank_world()[0] == 0 else None
        _CHOICES[key] = str(broadcast_from_rank0(choice, what="fast path choice"))
    return _CHOICES[key]


def _stored_or_measured(key: str, model: nn.Module, model_cfg: ModelConfig, tile_size: int, batch: int) -> str:
    stored = _read_cache().get(key)
    candidates = ["none", "channels_last"] + (["onnxruntime"] if _onnx_possible(model) else [])
    candidates += ["bf16"] if cpu_has_native_bf16() else []
    if stored in candidates:
        return str(stored)
    seconds = _time_candidates(model, candidates, tile_size, batch, model_cfg.channels_last)
    choice = choose_path(seconds)
    _write_cache(key, choice)
    gains = ", ".join(f"{c} {seconds['none'] / s:.2f}x" for c, s in seconds.items())
    log.info("fast path auto -> %s on %s (measured against eager float32: %s)", choice, cpu_name(), gains)
    return choice


def _onnx_possible(model: nn.Module) -> bool:
    return onnx_path.available() and onnx_path.supported(model)


def choose_path(seconds: dict[str, float]) -> str:
    """The rule of ``auto`` on measured seconds per batch: bf16 needs a clear gain, another float32 path a small one."""
    others = [p for p in FLOAT32_PATHS[1:] if p in seconds]
    fastest = min(others, key=lambda p: seconds[p], default="none")
    best32 = fastest if fastest != "none" and seconds[fastest] * LAYOUT_MIN_GAIN < seconds["none"] else "none"
    if "bf16" in seconds and seconds["bf16"] * BF16_MIN_GAIN <= min(seconds[p] for p in FLOAT32_PATHS if p in seconds):
        return "bf16"
    return best32


def _time_candidates(
    model: nn.Module, candidates: list[str], tile_size: int, batch: int, channels_last: bool
) -> dict[str, float]:
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    images = list(torch.rand(batch, 3, tile_size, tile_size, generator=gen).to(device))
    best = dict.fromkeys(candidates, float("inf"))
    runner: dict[str, Detector] = {c: model for c in candidates}
    if "onnxruntime" in candidates:
        runner["onnxruntime"] = onnx_path.OnnxDetector(model, tile_size)
    with torch.inference_mode():
        for rnd in range(MEASURE_ROUNDS + 1):
            for cand in candidates:
                fmt = torch.channels_last if cand in ("channels_last", "bf16") and channels_last else torch.contiguous_format
                model.to(memory_format=fmt)
                ctx = torch.autocast("cpu", dtype=torch.bfloat16) if cand == "bf16" else contextlib.nullcontext()
                t0 = time.perf_counter()
                with ctx:
                    runner[cand](images)
                if rnd:  # the first round warms up
                    best[cand] = min(best[cand], time.perf_counter() - t0)
    model.to(memory_format=torch.contiguous_format)
    return best


def _choice_key(model: nn.Module, model_cfg: ModelConfig, tile_size: int, batch: int) -> str:
    """What the choice depends on: the CPU and its ISA limits, torch, the model and its settings, tile, batch,
    threads, and whether onnxruntime is a candidate (installing it measures again)."""
    env = ",".join(f"{k}={v}" for k, v in isa_limits().items())
    settings = json.dumps(model_cfg.model_dump(mode="json", exclude={"fast_path", "weights", "backbone_weights"}),
                          sort_keys=True)
    n_params = sum(p.numel() for p in model.parameters())
    parts = (cpu_name(), platform.node(), torch.__version__, model_cfg.arch, str(n_params),
             hashlib.sha256(settings.encode()).hexdigest()[:12], str(tile_size), str(batch),
             str(torch.get_num_threads()), env, "onnxruntime" if _onnx_possible(model) else "")
    return "|".join(parts)


def _cache_file() -> Path:
    return cache_dir() / "fast_path.json"


def _read_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_cache(key: str, choice: str) -> None:
    """Add one choice to the cache file (atomic rename; a read-only home only costs a re-measure)."""
    path = _cache_file()
    data = _read_cache()
    data[key] = choice
    try:
        atomic_write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())
    except OSError as err:
        log.debug("fast path cache not written (%s)", err)
