"""ONNX Runtime as a CPU fast path: the detector's dense part runs in onnxruntime, the rest stays torchvision's.

The dense part is the backbone (trunk and pyramid) and the heads: on ``small_fcos`` 82 % of a
CPU forward pass is convolution. On a 2-core AVX2 EPYC onnxruntime ran the dense part of the
width-1 model alone 1.5-1.8x faster than eager PyTorch, and the whole model, torchvision's
post-processing included, 1.26x (the README's "hot path per CPU" table), level with channels_last;
at width 1.5 eager float32 already runs at ~0.8 of an AVX2 CPU's float32 peak, so no float32 path
can gain more than ~1.3x there (``scripts/roofline.py``); ``auto`` measures which wins on each machine. Normalisation and batching (``model.transform``), anchors, box
decoding, score floor and NMS (``model.postprocess_detections``) run exactly as in torchvision,
on the outputs onnxruntime returns, so the detections equal eager float32's to float rounding
(head outputs within about 1e-4).

Single-stage detectors whose heads return a dict of per-location outputs (FCOS, RetinaNet:
``small_fcos``, ``fcos_resnet50_fpn``, ``retinanet_resnet50_fpn_v2``) are supported; for the
others :func:`supported` is False and ``auto`` never offers this path. The ONNX graph (dynamic
batch, height and width) is exported once per set of weights into ``$HEM_CACHE_DIR/onnx`` and
reused by every later process; ``hem export-model RUN --format onnx`` writes the same graph.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hem_bootstrap.errors import ModelError
from hem_bootstrap.files import atomic_write_bytes, cache_dir

log = logging.getLogger(__name__)

OPSET = 17
"""ONNX opset of the exported graph (onnxruntime >= 1.14 runs it)."""


def available() -> bool:
    """True when onnxruntime and onnx (which the exporter needs) can be imported here."""
    return all(importlib.util.find_spec(name) is not None for name in ("onnxruntime", "onnx"))


def supported(model: nn.Module) -> bool:
    """True for single-stage torchvision detectors (FCOS, RetinaNet): the dense part ends in the heads."""
    return all(hasattr(model, a) for a in ("backbone", "head", "anchor_generator", "postprocess_detections",
                                           "transform")) and not hasattr(model, "roi_heads")


class DensePart(nn.Module):
    """Backbone plus heads on normalised, batched images; returns the head outputs in :attr:`keys` order."""

    def __init__(self, model: nn.Module, keys: list[str]) -> None:
        super().__init__()
        self.backbone: Any = model.backbone
        self.head: Any = model.head
        self.keys = keys

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Head outputs, each ``(B, locations x anchors, C)``."""
        out = self.head(list(self.backbone(x).values()))
        return tuple(out[k] for k in self.keys)

    @staticmethod
    def output_names(detector: nn.Module, size: int = 64) -> list[str]:
        """The names of the head's outputs, in the order the ONNX graph returns them."""
        model: Any = detector
        with torch.inference_mode():
            out = model.head(list(model.backbone(torch.zeros(1, 3, size, size)).values()))
        return list(out.keys())


def onnx_bytes(model: nn.Module, tile_size: int) -> bytes:
    """The model's dense part as an ONNX graph (dynamic batch, height and width), float32.

    Raises:
        ModelError: the model is not a single-stage detector, or the export fails.
    """
    if not supported(model):
        raise ModelError(f"{type(model).__name__}: only single-stage detectors (FCOS, RetinaNet) export to ONNX")
    model = model.cpu().eval()
    keys = DensePart.output_names(model)
    dense = DensePart(model, keys).eval()
    example = torch.zeros(1, 3, tile_size, tile_size)
    buf = io.BytesIO()
    axes = {"images": {0: "batch", 2: "height", 3: "width"}, **{k: {0: "batch", 1: "locations"} for k in keys}}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(dense, (example,), buf, input_names=["images"], output_names=keys,  # type: ignore[arg-type]
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False)
    except Exception as err:  # the exporter raises many kinds for unsupported layers
        raise ModelError(f"{type(model).__name__}: ONNX export failed: {err}") from err
    return buf.getvalue()


def weights_digest(model: nn.Module) -> str:
    """A digest of the model's class and every parameter and buffer (the ONNX cache key)."""
    h = hashlib.sha256(type(model).__name__.encode())
    h.update(torch.__version__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(tensor.shape)).encode())
        h.update(tensor.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def cached_onnx(model: nn.Module, tile_size: int) -> Path:
    """The ONNX file of this model's dense part, exported on first use into ``$HEM_CACHE_DIR/onnx``."""
    path = cache_dir() / "onnx" / f"{weights_digest(model)}.onnx"
    if not path.is_file():
        atomic_write_bytes(path, onnx_bytes(model, tile_size))
        log.debug("exported the dense part to %s", path)
    return path


class OnnxDetector:
    """A torchvision single-stage detector whose backbone and heads run in onnxruntime (inference only).

    Called like the model in eval mode: a list of float image tensors ``(C, H, W)`` in
    [0, 1], on the CPU; returns torchvision's list of ``{"boxes", "scores", "labels"}``.
    """

    def __init__(self, model: nn.Module, tile_size: int, threads: int | None = None) -> None:
        self.model: Any = model.cpu().eval()
        self._onnx = cached_onnx(self.model, tile_size)
        self._threads = threads
        self._session, self._pid = self._open(), os.getpid()
        self._inherited: list[Any] = []
        self.keys = [o.name for o in self._session.get_outputs()]
        self._grids: dict[tuple[int, int], list[tuple[int, int]]] = {}

    def _open(self) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = self._threads or torch.get_num_threads()
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        return ort.InferenceSession(str(self._onnx), opts, providers=["CPUExecutionProvider"])

    @property
    def session(self) -> Any:
        """This process's onnxruntime session.

        A forked process (a CPU scan's model replica, :mod:`hem_bootstrap.model.replicas`)
        opens its own, with its own thread count: a fork does not carry the parent's thread
        pool. The inherited session is kept, never used nor freed, since freeing it would
        wait for threads that do not exist in the child.
        """
        if self._pid != os.getpid():
            self._inherited.append(self._session)
            self._session, self._pid = self._open(), os.getpid()
        return self._session

    def _grid(self, height: int, width: int) -> list[tuple[int, int]]:
        """The pyramid's feature-map sizes for a padded input size (one backbone run per new size)."""
        if (height, width) not in self._grids:
            with torch.inference_mode():
                feats = self.model.backbone(torch.zeros(1, 3, height, width))
            self._grids[(height, width)] = [tuple(f.shape[-2:]) for f in feats.values()]  # type: ignore[misc]
        return self._grids[(height, width)]

    def __call__(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        m = self.model
        original = [tuple(img.shape[-2:]) for img in images]
        batch, _ = m.transform([img.float() for img in images])
        x = batch.tensors.contiguous()
        outputs = self.session.run(self.keys, {"images": x.numpy()})
        head = {k: torch.from_numpy(v) for k, v in zip(self.keys, outputs, strict=True)}
        grid = self._grid(int(x.shape[-2]), int(x.shape[-1]))
        shapes = [torch.empty((1, 0, h, w)) for h, w in grid]  # what the anchor generator reads: sizes
        anchors = m.anchor_generator(batch, shapes)
        per_level = [h * w for h, w in grid]
        per_anchor = head[self.keys[0]].shape[1] // sum(per_level)  # RetinaNet: several anchors per location
        split = [n * per_anchor for n in per_level]
        split_head = {k: list(v.split(split, dim=1)) for k, v in head.items()}
        split_anchors = [list(a.split(split)) for a in anchors]
        detections = m.postprocess_detections(split_head, split_anchors, batch.image_sizes)
        return m.transform.postprocess(detections, batch.image_sizes, original)  # type: ignore[no-any-return]
