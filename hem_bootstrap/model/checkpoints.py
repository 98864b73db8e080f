"""Weights and checkpoints: local weight files loaded with clear errors, atomic checkpoints, model hashes.

Nothing is ever downloaded: pretrained weights come from local files named in the config
(torchvision's own files, copied from ``~/.cache/torch/hub/checkpoints/``, work as they are).
A checkpoint holds model, optimizer, scheduler and AMP scaler states with step, round, config
and the weights' hash, written under a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from hem_bootstrap.errors import ModelError
from hem_bootstrap.files import atomic_write_bytes

#: Where torchvision keeps downloaded weights; users copy files from there (we never download).
TORCH_HUB_CACHE = "~/.cache/torch/hub/checkpoints/"


#: How many missing / unexpected / mismatched keys an error message names.
_SHOWN_KEYS = 5


def read_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` a local file with clear errors; never downloads."""
    if not path.is_file():
        found = "is a directory, expected a file" if path.is_dir() else "file not found"
        if what == "checkpoint":  # a run's own model.pt: the round was not trained (or the file was moved)
            raise ModelError(f"{what} {path}: {found}")
        raise ModelError(
            f"{what} {path}: {found}; nothing is downloaded, put the file there "
            f"(torchvision's pretrained weights live in {TORCH_HUB_CACHE} once fetched elsewhere)"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as err:  # noqa: BLE001 - any unpickling failure means a corrupt file
        raise ModelError(f"{what} {path}: not a readable torch file ({type(err).__name__}: {err})") from None


def state_dict_of(obj: Any, path: Path, what: str) -> dict[str, Tensor]:
    """The state_dict inside a raw state_dict, a torchvision weights file or one of our checkpoints."""
    if isinstance(obj, Mapping) and "model" in obj and isinstance(obj["model"], Mapping):
        obj = obj["model"]
    elif isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if isinstance(obj, nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ModelError(
            f"{what} {path}: expected a state_dict (name -> tensor) or a checkpoint with key 'model'"
        )
    return {str(k).removeprefix("module."): v for k, v in obj.items()}


def is_bookkeeping(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def check_state_dict(
    expected: Mapping[str, Tensor], got: Mapping[str, Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """Missing keys, unexpected keys and ``key: expected shape vs got`` lines (BN counters ignored)."""
    missing = [k for k in expected if k not in got and not is_bookkeeping(k)]
    unexpected = [k for k in got if k not in expected and not is_bookkeeping(k)]
    shapes = [
        f"{k} expected {tuple(expected[k].shape)} got {tuple(got[k].shape)}"
        for k in expected
        if k in got and tuple(expected[k].shape) != tuple(got[k].shape)
    ]
    return missing, unexpected, shapes


def mismatch_message(
    path: Path, what: str, missing: list[str], unexpected: list[str], shapes: list[str]
) -> str:
    def part(label: str, items: list[str]) -> str:
        more = f" (+{len(items) - _SHOWN_KEYS} more)" if len(items) > _SHOWN_KEYS else ""
        return f"{len(items)} {label}: {', '.join(items[:_SHOWN_KEYS])}{more}"

    parts = [
        part(lbl, items)
        for lbl, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes))
        if items
    ]
    hint = ""
    if shapes and not missing and not unexpected and any(k.startswith("backbone.") for k in shapes):
        hint = ("; the same layers with other channel counts: a small_fcos / small_frcnn of another model.width? "
                "(the default is 1.5 since it was measured; models made before are 1: set model.width)")
    return f"{what} {path} do not fit the model; " + "; ".join(parts) + hint


def _load_strict(module: nn.Module, state: Mapping[str, Tensor], path: Path, what: str) -> None:
    missing, unexpected, shapes = check_state_dict(module.state_dict(), state)
    if missing or unexpected or shapes:
        raise ModelError(mismatch_message(path, what, missing, unexpected, shapes))
    module.load_state_dict(state, strict=False)


def model_hash(model: nn.Module) -> str:
    """Short SHA-256 of the state_dict (names, dtypes, shapes, bytes): which weights made a result.

    BatchNorm's step counters are left out: freezing BatchNorm (which drops them) does not
    change which weights a model has.
    """
    return state_hash(model.state_dict())


def checkpoint_hash(path: Path) -> str:
    """The model hash a checkpoint records (computed from its weights when it records none).

    Raises:
        ModelError: the file is missing or not a torch file.
    """
    obj = read_torch_file(Path(path), "checkpoint")
    if isinstance(obj, Mapping) and isinstance(obj.get("model_hash"), str):
        return str(obj["model_hash"])
    return state_hash(state_dict_of(obj, Path(path), "checkpoint"))


def state_hash(state: Mapping[str, Tensor]) -> str:
    """:func:`model_hash` of a state_dict."""
    h = hashlib.sha256()
    for key, value in state.items():
        if is_bookkeeping(key):
            continue
        t = value.detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:12]


def _unwrap(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP / DataParallel wrapper."""
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def save_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
    step: int = 0,
    round_idx: int = 0,
    config: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    card: dict[str, Any] | None = None,
) -> None:
    """Atomically save model (+ optimizer, scheduler, AMP scaler) state with step, round and config.

    A crash mid-write leaves the previous checkpoint intact, never a truncated file. ``card``:
    what running the model on new rasters needs (:mod:`hem_bootstrap.model.card`).
    """
    plain = _unwrap(model)
    payload: dict[str, Any] = {
        "model": plain.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": int(step),
        "round": int(round_idx),
        "config": config,
        "extra": extra or {},
        "card": card,
        "model_class": type(plain).__name__,
        "model_hash": model_hash(plain),
        "torch": torch.__version__,
    }
    buf = io.BytesIO()
    torch.save(payload, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(
    path: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: Any = None,
    scaler: Any = None,
) -> dict[str, Any]:
    """Restore a checkpoint into ``model`` (and the optional training states); return its metadata.

    Returns:
        ``{"step", "round", "config", "extra"}``.

    Raises:
        ModelError: missing or corrupt file, or a model state that does not fit (keys named).
    """
    path = Path(path)
    what = "checkpoint"
    obj = read_torch_file(path, what)
    state = state_dict_of(obj, path, what)
    _load_strict(_unwrap(model), state, path, what)
    meta = obj if isinstance(obj, Mapping) and "model" in obj else {}
    for name, target in (("optimizer", optimizer), ("scheduler", scheduler), ("scaler", scaler)):
        if target is None or meta.get(name) is None:
            continue
        try:
            target.load_state_dict(meta[name])
        except (ValueError, KeyError, RuntimeError) as err:
            raise ModelError(f"{what} {path}: {name} state does not fit ({err})") from None
    return {
        "step": int(meta.get("step", 0)),
        "round": int(meta.get("round", 0)),
        "config": meta.get("config"),
        "extra": dict(meta.get("extra") or {}),
    }


def export_model(ckpt_path: Path, out_path: Path, card: dict[str, Any]) -> None:
    """Write the checkpoint's weights alone to ``out_path`` and a JSON model card beside it.

    The card (``out_path.with_suffix('.json')``) gets the given fields (architecture, classes,
    tile size, GSD, training data, metrics) plus the weights' hash and the source checkpoint.

    Raises:
        ModelError: the checkpoint is missing or corrupt.
    """
    ckpt_path, out_path = Path(ckpt_path), Path(out_path)
    obj = read_torch_file(ckpt_path, "checkpoint")
    state = state_dict_of(obj, ckpt_path, "checkpoint")
    buf = io.BytesIO()
    torch.save(dict(state), buf)
    data = buf.getvalue()
    atomic_write_bytes(out_path, data)
    full = dict(card)
    full.setdefault("weights_file", out_path.name)
    full["weights_sha256"] = hashlib.sha256(data).hexdigest()
    full["source_checkpoint"] = str(ckpt_path)
    if isinstance(obj, Mapping):
        full.setdefault("trained_steps", obj.get("step"))
        full.setdefault("model_hash", obj.get("model_hash"))
    text = json.dumps(full, indent=2, default=str) + "\n"
    atomic_write_bytes(out_path.with_suffix(".json"), text.encode())
