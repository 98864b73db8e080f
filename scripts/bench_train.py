"""Benchmark the training engine against a bare loop, and measure what the small detector learns.

Synthetic chips: a textured, noisy background with rotated car-like rectangles (12-36 px long,
a windscreen and a cast shadow) that are labelled, plus look-alike rectangles (square-ish or
thin, no shadow) that are not. Chips come either from memory or, with ``--source tif``, from a
GeoTIFF written once and read back with rasterio windowed reads (the realistic data path).

Reports chips/s of ``train()`` with DataLoader workers against a bare loop over the same model
on pre-loaded tensors (same batch size and steps), their ratio, and AP@0.5 on held-out chips.

    python scripts/bench_train.py --steps 60 --batch-size 8 --tile 256 --workers 2 \
        --out bench_out/bench_train.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hem_bootstrap.config import ModelConfig, RuntimeConfig, TrainConfig  # noqa: E402
from hem_bootstrap.model.detectors import build_detector  # noqa: E402
from hem_bootstrap.model.train import collate_detection, train, train_one_step  # noqa: E402

Target = dict[str, torch.Tensor]

# ------------------------------------------------------------------------------ synthetic chips


@dataclass
class Shape:
    """A rotated rectangle: centre, length, width (pixels) and angle (radians)."""

    cx: float
    cy: float
    length: float
    width: float
    angle: float

    def corners(self) -> np.ndarray:
        """The four corners, (4, 2) as x, y."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        hl, hw = self.length / 2, self.width / 2
        local = np.array([[-hl, -hw], [hl, -hw], [hl, hw], [-hl, hw]])
        rot = np.array([[c, -s], [s, c]])
        return local @ rot.T + np.array([self.cx, self.cy])

    def mask(
        self, tile: int, dx: float = 0.0, dy: float = 0.0, along: tuple[float, float] = (-0.5, 0.5)
    ) -> np.ndarray:
        """Boolean (tile, tile) mask of the rectangle shifted by (dx, dy); ``along`` cuts a slice of its length."""
        yy, xx = np.mgrid[0:tile, 0:tile].astype(np.float32) + 0.5
        c, s = math.cos(self.angle), math.sin(self.angle)
        px, py = xx - self.cx - dx, yy - self.cy - dy
        u = px * c + py * s
        v = -px * s + py * c
        return (u >= along[0] * self.length) & (u <= along[1] * self.length) & (np.abs(v) <= self.width / 2)

    def box(self, tile: int) -> tuple[np.ndarray, float]:
        """Axis-aligned xyxy box clipped to the tile, and the visible share of the unclipped box."""
        pts = self.corners()
        x0, y0 = pts.min(axis=0)
        x1, y1 = pts.max(axis=0)
        full = max((x1 - x0) * (y1 - y0), 1e-6)
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, tile), min(y1, tile)
        vis = max(cx1 - cx0, 0) * max(cy1 - cy0, 0) / full
        return np.array([cx0, cy0, cx1, cy1], dtype=np.float32), vis


def _background(rng: np.random.Generator, tile: int) -> np.ndarray:
    """Smooth ground texture (grass/soil/asphalt tones), a road band sometimes, pixel noise."""
    base = rng.uniform(0.2, 0.6, size=3).astype(np.float32)
    coarse = torch.from_numpy(rng.normal(0, 1, size=(1, 4, 6, 6)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(tile, tile), mode="bicubic", align_corners=False)[0].numpy()
    img = base[:, None, None] + 0.08 * smooth[:1] + 0.03 * smooth[1:]
    if rng.random() < 0.5:  # a road: grey band with a dashed centre line
        road = Shape(
            rng.uniform(0, tile), rng.uniform(0, tile), 3 * tile, rng.uniform(30, 60), rng.uniform(0, math.pi)
        )
        m = road.mask(tile)
        img[:, m] = rng.uniform(0.3, 0.45)
        line = Shape(road.cx, road.cy, 3 * tile, 1.5, road.angle).mask(tile)
        img[:, line & (np.indices((tile, tile)).sum(0) // 6 % 2 == 0)] = 0.85
    img += rng.normal(0, 0.03, size=img.shape).astype(np.float32)
    return img


def _paint_car(img: np.ndarray, rng: np.random.Generator, shape: Shape, sun: tuple[float, float]) -> None:
    tile = img.shape[-1]
    shadow = shape.mask(tile, dx=sun[0], dy=sun[1])
    img[:, shadow] *= 0.45
    body = shape.mask(tile)
    colour = rng.uniform(0.0, 1.0, size=3) if rng.random() < 0.5 else np.full(3, rng.choice([0.08, 0.9]))
    img[:, body] = colour[:, None].astype(np.float32)
    glass = shape.mask(tile, along=(0.12, 0.3))
    img[:, glass] = 0.12


def _paint_distractor(img: np.ndarray, rng: np.random.Generator, shape: Shape) -> None:
    tile = img.shape[-1]
    m = shape.mask(tile)
    img[:, m] = rng.uniform(0.0, 1.0, size=3)[:, None].astype(np.float32)


def synthetic_chip(
    rng: np.random.Generator, tile: int = 256, mean_cars: float = 4.0, mean_distractors: float = 3.0
) -> tuple[np.ndarray, np.ndarray]:
    """One chip: float32 (3, tile, tile) in [0, 1] and its car boxes float32 (N, 4) xyxy.

    Cars (labelled) have a shadow and a windscreen, aspect 0.4-0.5; distractors (unlabelled)
    have similar sizes but are square-ish or thin and cast no shadow.
    """
    img = _background(rng, tile)
    sun_angle = rng.uniform(0, 2 * math.pi)
    sun = (3.0 * math.cos(sun_angle), 3.0 * math.sin(sun_angle))
    boxes: list[np.ndarray] = []
    for _ in range(rng.poisson(mean_distractors)):
        length = rng.uniform(12, 36)
        aspect = rng.uniform(0.8, 1.0) if rng.random() < 0.5 else rng.uniform(0.12, 0.22)
        shape = Shape(
            rng.uniform(0, tile), rng.uniform(0, tile), length, length * aspect, rng.uniform(0, math.pi)
        )
        _paint_distractor(img, rng, shape)
    for _ in range(rng.poisson(mean_cars)):
        length = rng.uniform(12, 36)
        shape = Shape(
            rng.uniform(0, tile),
            rng.uniform(0, tile),
            length,
            length * rng.uniform(0.4, 0.5),
            rng.uniform(0, 2 * math.pi),
        )
        _paint_car(img, rng, shape, sun)
        box, vis = shape.box(tile)
        if vis >= 0.5 and box[2] - box[0] >= 2 and box[3] - box[1] >= 2:
            boxes.append(box)
    img = np.clip(img, 0.0, 1.0)
    out = np.stack(boxes).astype(np.float32) if boxes else np.zeros((0, 4), np.float32)
    return img.astype(np.float32), out


def _target(boxes: np.ndarray) -> Target:
    b = torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)).reshape(-1, 4)
    return {"boxes": b, "labels": torch.ones(len(b), dtype=torch.int64)}


class SyntheticChips(Dataset):
    """``n`` synthetic chips, chip ``i`` generated from ``(seed, i)`` (on the fly, or cached in memory)."""

    def __init__(self, n: int, tile: int = 256, seed: int = 0, in_memory: bool = False) -> None:
        self.n, self.tile, self.seed = int(n), int(tile), int(seed)
        self._cache: list[tuple[torch.Tensor, Target]] | None = None
        if in_memory:
            self._cache = [self._make(i) for i in range(self.n)]

    def _make(self, i: int) -> tuple[torch.Tensor, Target]:
        img, boxes = synthetic_chip(np.random.default_rng([self.seed, i]), self.tile)
        return torch.from_numpy(img), _target(boxes)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        return self._cache[i] if self._cache is not None else self._make(i)


def write_chip_mosaic(path: Path, n: int, tile: int, seed: int) -> tuple[int, list[np.ndarray]]:
    """Write ``n`` synthetic chips side by side into a uint8 GeoTIFF; return columns and boxes per chip."""
    import rasterio
    from affine import Affine

    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    data = np.zeros((3, rows * tile, cols * tile), np.uint8)
    all_boxes = []
    for i in range(n):
        img, boxes = synthetic_chip(np.random.default_rng([seed, i]), tile)
        r, c = divmod(i, cols)
        data[:, r * tile : (r + 1) * tile, c * tile : (c + 1) * tile] = np.round(img * 255).astype(np.uint8)
        all_boxes.append(boxes)
    profile = {
        "driver": "GTiff",
        "width": cols * tile,
        "height": rows * tile,
        "count": 3,
        "dtype": "uint8",
        "crs": "EPSG:32633",
        "transform": Affine(0.15, 0, 500000.0, 0, -0.15, 5000000.0),
        "tiled": True,
        "blockxsize": 256,
        "blockysize": 256,
    }
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return cols, all_boxes


class TifChips(Dataset):
    """Chips read with rasterio windowed reads from a mosaic GeoTIFF; each worker opens its own handle."""

    def __init__(self, path: Path, cols: int, boxes: list[np.ndarray], tile: int) -> None:
        self.path, self.cols, self.boxes, self.tile = Path(path), cols, boxes, tile
        self._src: Any = None

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, Target]:
        import rasterio
        from rasterio.windows import Window

        if self._src is None:
            self._src = rasterio.open(self.path)
        r, c = divmod(i, self.cols)
        arr = self._src.read(window=Window(c * self.tile, r * self.tile, self.tile, self.tile))
        img = torch.from_numpy(arr).float().div_(255.0)
        return img, _target(self.boxes[i])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_src"] = None
        return state


# ------------------------------------------------------------------------------ evaluation


def ap50(model: torch.nn.Module, dataset: Dataset, batch_size: int = 8) -> float:
    """COCO AP at IoU 0.5 (pycocotools) of ``model`` on ``dataset``."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    model.eval()
    images, annotations, results = [], [], []
    ann_id = 1
    with torch.inference_mode():
        for start in range(0, len(dataset), batch_size):  # type: ignore[arg-type]
            items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]  # type: ignore[arg-type]
            outs = model([im for im, _ in items])
            for k, ((im, tgt), out) in enumerate(zip(items, outs, strict=True)):
                img_id = start + k + 1
                images.append({"id": img_id, "width": im.shape[-1], "height": im.shape[-2]})
                for b in tgt["boxes"].tolist():
                    w, h = b[2] - b[0], b[3] - b[1]
                    annotations.append(
                        {
                            "id": ann_id,
                            "image_id": img_id,
                            "category_id": 1,
                            "bbox": [b[0], b[1], w, h],
                            "area": w * h,
                            "iscrowd": 0,
                        }
                    )
                    ann_id += 1
                for b, s in zip(out["boxes"].tolist(), out["scores"].tolist(), strict=True):
                    results.append(
                        {
                            "image_id": img_id,
                            "category_id": 1,
                            "bbox": [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            "score": s,
                        }
                    )
    if not annotations:
        return float("nan")
    if not results:
        return 0.0
    gt = COCO()
    gt.dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "car"}]}
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
        dt = gt.loadRes(results)
        ev = COCOeval(gt, dt, "bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return float(ev.stats[1])


# ------------------------------------------------------------------------------ benchmark


def bare_loop(
    model: torch.nn.Module, batches: list[tuple[list[torch.Tensor], list[Target]]], train_cfg: TrainConfig
) -> float:
    """Seconds for the same optimizer steps on pre-loaded batches: the ceiling for the engine."""
    from hem_bootstrap.model.train import make_optimizer

    model.train()
    opt = make_optimizer(model, train_cfg)
    t0 = time.perf_counter()
    for batch in batches:
        train_one_step(model, batch, opt, grad_clip=train_cfg.grad_clip)
    return time.perf_counter() - t0


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Engine vs bare loop on the same model, data and steps; then AP@0.5 of the engine's model."""
    torch.manual_seed(args.seed)
    model_cfg = ModelConfig(arch=args.arch)
    train_cfg = TrainConfig(
        batch_size=args.batch_size,
        lr=args.lr,
        warmup_steps=min(20, args.steps // 5),
        steps=args.steps,
        checkpoint_every=max(args.steps, 1),
    )
    runtime = RuntimeConfig(device="cpu", workers=args.workers, seed=args.seed)
    n_train = args.steps * args.batch_size
    with tempfile.TemporaryDirectory() as tmp:
        if args.source == "tif":
            cols, boxes = write_chip_mosaic(Path(tmp) / "chips.tif", n_train, args.tile, args.seed)
            data: Dataset = TifChips(Path(tmp) / "chips.tif", cols, boxes, args.tile)
        else:
            data = SyntheticChips(n_train, args.tile, args.seed, in_memory=True)
        # the bare loop sees the very batches the engine draws, already collated in memory
        from hem_bootstrap.model.train import StepBatchSampler

        sampler = StepBatchSampler(len(data), args.batch_size, args.steps, args.seed)  # type: ignore[arg-type]
        batches = [collate_detection([data[i] for i in idx]) for idx in sampler]
        torch.manual_seed(args.seed)
        bare_model = build_detector(model_cfg, 2, args.tile)
        bare_s = bare_loop(bare_model, batches, train_cfg)
        del batches
        torch.manual_seed(args.seed)
        model = build_detector(model_cfg, 2, args.tile)
        result = train(model, data, train_cfg, runtime, args.steps, progress=False)
    held_out = SyntheticChips(args.eval_chips, args.tile, seed=args.seed + 10_000)
    ap = ap50(model, held_out)
    chips = args.steps * args.batch_size
    bare_rate = chips / bare_s
    out = {
        "arch": args.arch,
        "source": args.source,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "tile": args.tile,
        "workers": args.workers,
        "threads": torch.get_num_threads(),
        "engine_chips_per_s": round(result.chips_per_s, 2),
        "bare_chips_per_s": round(bare_rate, 2),
        "ratio": round(result.chips_per_s / bare_rate, 3),
        "engine_steps_per_s": round(result.chips_per_s / args.batch_size, 3),
        "final_loss": round(result.final_loss, 4),
        "ap50_held_out": round(ap, 4),
        "eval_chips": args.eval_chips,
    }
    return out


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run the benchmark, print a table and write JSON."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--arch", default="small_fcos")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--source", choices=["memory", "tif"], default="tif")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--eval-chips", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)"
    )
    p.add_argument("--out", type=Path, default=Path("bench_out/bench_train.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    res = run(args)
    width = max(len(k) for k in res)
    for k, v in res.items():
        print(f"{k:<{width}}  {v}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
