"""A detector's float32 arithmetic per tile, and the fastest float32 rate this CPU reaches: the roofline.

The rate is the best of a large matrix product (MKL) and a large channels-last 3x3 convolution
(oneDNN), the two kernels a detector's dense part runs on; no float32 path (the same detections)
can run the model faster than its arithmetic at that rate. ``scripts/bench_inference.py
--fast-paths`` runs this in its own process and sets each path's measured rate against it.

Example:
    python scripts/roofline.py --arch small_fcos --width 1.5 --batch 8 --tile 256
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from hem_bootstrap.config import ModelConfig
from hem_bootstrap.model.detectors import build_detector


def best_seconds(fn: Callable[[], object], rounds: int = 6) -> float:
    """The fastest of ``rounds`` calls after one warm-up."""
    best = float("inf")
    with torch.inference_mode():
        fn()
        for _ in range(rounds):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def roofline(arch: str, width: float | None, batch: int, tile: int) -> dict:
    """GFLOP per tile of ``arch`` (random weights: the arithmetic does not depend on them) and the float32 peaks."""
    model_cfg = ModelConfig(arch=arch) if width is None else ModelConfig(arch=arch, width=width)
    model = build_detector(model_cfg, 2, tile).eval()
    with torch.inference_mode(), FlopCounterMode(display=False) as flops:
        model(list(torch.rand(batch, 3, tile, tile)))
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    x = torch.randn(batch, 128, 64, 64).contiguous(memory_format=torch.channels_last)
    w = torch.randn(256, 128, 3, 3).contiguous(memory_format=torch.channels_last)
    gemm = 2 * 2048**3 / best_seconds(lambda: a @ b)
    conv = 2 * batch * 64 * 64 * 128 * 256 * 9 / best_seconds(lambda: torch.nn.functional.conv2d(x, w, padding=1))
    return {"gflop_per_tile": flops.get_total_flops() / batch / 1e9, "peak_gflops_sgemm": gemm / 1e9,
            "peak_gflops_conv": conv / 1e9, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="small_fcos")
    p.add_argument("--width", type=float, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(json.dumps(roofline(args.arch, args.width, args.batch, args.tile)))


if __name__ == "__main__":
    main()
