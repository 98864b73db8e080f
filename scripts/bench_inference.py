"""Benchmark the inference hot path against its model-only ceiling (and SAHI when installed).

For each raster size it generates a large RGB GeoTIFF (tiled, compressed; a synthetic scene
repeated block by block, so the file is realistic but cheap to make) and measures, each in a
fresh subprocess so peak RSS is the run's own:

* end-to-end tiles/s of ``hem_bootstrap.model.infer.detect`` (reading windows: in the model's
  process on CPU, by DataLoader workers on CUDA or with ``--workers``; uint8 hand-over, batching,
  seam NMS, streaming GeoPackage output);
* model-only tiles/s on pre-loaded tensors with the same model, batch and tile size: the ceiling
  (measured before and after the scan, mean of the two);
* their ratio, and peak RSS (the process and its DataLoader workers); ``wall_ratio`` also
  counts what follows the last tile (the R-tree and the rows still to write);
* when the scan ran CPU model replicas (``runtime.cpu_replicas``, :mod:`hem_bootstrap.model.replicas`;
  ``--replicas``, default ``auto``): the same scan with the model in the scan's process
  (``end_to_end_in_process``, ``replicas_speedup``), and a second ceiling, the replicas' own:
  as many single-threaded model-only runs at once, their rates summed (``ratio_vs_replica_ceiling``);
* with ``--fast-paths``, the model-only ceiling of eager float32, channels_last, bf16,
  torch.compile and onnxruntime, and how far their detections differ; and a roofline: the model's
  float32 arithmetic per tile, each path's GFLOP/s as a share of this CPU's float32 peak (the
  best of a large matrix product and a large 3x3 convolution; ``scripts/roofline.py``), and ``float32_ceiling_vs_eager``,
  the most any float32 path could gain over eager float32 on this CPU;
* with ``--compare-sahi`` (when ``sahi`` is importable), SAHI's sliced prediction with the same
  torchvision model, tile and overlap;
* with ``--over-http``, the raster as a Cloud-Optimized GeoTIFF scanned twice more, side by side:
  from the local disk and over HTTP from a range-request server on 127.0.0.1
  (``scripts/range_server.py``), with the GDAL settings of ``HTTP_GDAL``; their ratio is what
  reading through ``/vsicurl/`` costs (a local server: no network latency, so a floor).

Example:
    python scripts/bench_inference.py --sizes 8192 20000 --arch small_fcos --out bench_out/bench_inference.json
    python scripts/bench_inference.py --sizes 8192 --over-http
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from hem_bootstrap.model.precision import cpu_has_native_bf16, cpu_name, isa_limits


def make_big_raster(path: Path, size: int, seed: int = 11) -> None:
    """Write a size x size RGB GeoTIFF by repeating a 1024 px synthetic scene, block by block."""
    import rasterio
    from rasterio.transform import from_origin
    from rasterio.windows import Window

    from hem_bootstrap.data.synth import SceneSpec, make_scene

    if path.exists():
        return
    block = 1024
    rgb, _, _, _ = make_scene(SceneSpec(size=block, gsd=0.15, seed=seed))
    profile = {
        "driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8",
        "crs": "EPSG:32633", "transform": from_origin(500000.0, 5400000.0, 0.15, 0.15),
        "tiled": True, "blockxsize": 256, "blockysize": 256, "compress": "deflate", "predictor": 2,
        "BIGTIFF": "IF_SAFER",
    }
    tmp = path.with_suffix(".tmp.tif")
    with rasterio.open(tmp, "w", **profile) as dst:
        for row in range(0, size, block):
            for col in range(0, size, block):
                h, w = min(block, size - row), min(block, size - col)
                k = (row // block + col // block) % 4
                dst.write(np.rot90(rgb, k=k, axes=(1, 2))[:, :h, :w], window=Window(col, row, w, h))
    tmp.replace(path)


SCORE_FLOOR = 0.05
"""Detections below this score are dropped by the model (both engines); ``--score-floor`` sets it."""


HTTP_GDAL = {"GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR", "VSI_CACHE": "TRUE", "GDAL_HTTP_MULTIPLEX": "YES",
             "GDAL_HTTP_VERSION": "2", "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif"}
"""GDAL settings of the HTTP scan (the README's advice for COGs over HTTP)."""


def _over_http(args: argparse.Namespace, raster: Path) -> dict:
    """The raster as a COG, scanned from the local disk and over HTTP (127.0.0.1), in the same way."""
    import rasterio.shutil
    from range_server import serve

    cog = raster.with_name(raster.stem + "_cog.tif")
    if not cog.exists():
        rasterio.shutil.copy(raster, cog, driver="COG", blocksize=256, compress="deflate", predictor=2,
                             BIGTIFF="IF_SAFER")
    args.raster = cog
    local = _run_child("e2e", args)
    with serve(cog.parent) as (base, seen):
        args.raster = f"/vsicurl/{base}/{cog.name}"
        remote = _run_child("e2e", args, env=HTTP_GDAL)
    args.raster = raster
    row = {"cog_local": local, "cog_http": remote, "gdal": HTTP_GDAL,
           "http_requests": sum(1 for r in seen if r[1].endswith(cog.name)),
           "http_bytes_ranges": sum(1 for r in seen if r[2])}
    if "tiles_per_s" in local and "tiles_per_s" in remote:
        row["http_over_local"] = remote["tiles_per_s"] / local["tiles_per_s"]
        row["same_detections"] = local["detections"] == remote["detections"]
    return row


def _cfg(arch: str, batch: int, workers: int | None, tile: int, overlap: int, fast_path: str, threads: int | None,
         amp: bool = True, width: float | None = None):
    from hem_bootstrap.config import ExperimentConfig

    cfg = ExperimentConfig()
    cfg.model.arch = arch
    if width is not None:
        cfg.model.width = width
    cfg.model.score_floor = SCORE_FLOOR
    cfg.model.fast_path = fast_path  # type: ignore[assignment]
    cfg.runtime.batch_size = batch
    cfg.runtime.detect_workers = workers  # None: the engine's default (0 on CPU, runtime.workers on CUDA)
    cfg.runtime.threads = threads
    cfg.runtime.device = "cpu" if not _cuda() else "cuda"
    cfg.runtime.amp = amp  # CUDA only
    cfg.tiling.tile_size = tile
    cfg.tiling.overlap = overlap
    return cfg


def _card_width(weights: Path) -> float | None:
    """The width a model file was trained at, from its card (a file from before widths: 1)."""
    from hem_bootstrap.model.card import read_card

    return read_card(weights)["model"].get("width")


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def _peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024.0


def child_end_to_end(args: argparse.Namespace) -> dict:
    """One end-to-end scan of the raster (runs in its own process)."""
    import torch

    from hem_bootstrap.detections import write_detections
    from hem_bootstrap.model.detectors import build_detector
    from hem_bootstrap.model.infer import DetectStats, detect, detect_workers

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _cfg(args.arch, args.batch, args.workers, args.tile, args.overlap, args.fast_path, args.threads,
               args.amp == "on", args.width)
    torch.manual_seed(0)
    model = build_detector(cfg.model, 2, args.tile)
    if args.weights:
        from hem_bootstrap.model.checkpoints import load_checkpoint

        load_checkpoint(Path(args.weights), model)
    device = torch.device(cfg.runtime.device)
    cfg.runtime.cpu_replicas = args.replicas
    stats = DetectStats()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        frames = detect(model, [Path(args.raster)], cfg.data, cfg.tiling, cfg.model, cfg.runtime, device,
                        stats=stats, progress=False)
        n, _ = write_detections(frames, Path(args.dump) if args.dump else Path(tmp) / "d.gpkg")
        wall = time.perf_counter() - t0
    return {
        "tiles": stats.tiles_total, "tiles_run": stats.tiles_run, "seconds": stats.seconds,
        "wall_seconds": wall, "wall_tiles_per_s": stats.tiles_total / wall,
        "tiles_per_s": stats.tiles_per_s, "detections": n, "model_seconds": stats.model_seconds,
        "wait_for_reads_seconds": stats.wait_seconds, "merge_seconds": stats.merge_seconds,
        "peak_rss_mb": _peak_rss_mb(), "reader_workers": detect_workers(cfg.runtime, device),
        "fast_path_used": stats.fast_path, "replicas": stats.replicas,
    }


def child_model_only(args: argparse.Namespace) -> dict:
    """The ceiling: the same model on pre-loaded tensors, same batch and tile size."""
    import torch

    from hem_bootstrap.model.detectors import build_detector
    from hem_bootstrap.model.precision import prepare_model

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _cfg(args.arch, args.batch, 0, args.tile, args.overlap, args.fast_path, args.threads,
               args.amp == "on", args.width)
    torch.manual_seed(0)
    model = build_detector(cfg.model, 2, args.tile)
    if args.weights:
        from hem_bootstrap.model.checkpoints import load_checkpoint

        load_checkpoint(Path(args.weights), model)
    device = torch.device(cfg.runtime.device)
    run = prepare_model(model, device, cfg.model, cfg.runtime, args.tile)  # calls apply its autocast
    # the same kind of tiles the scan sees: 128 windows spread evenly over the whole raster
    from hem_bootstrap.data.tiles import plan_tiles
    from hem_bootstrap.geo.raster import RasterReader

    refs = plan_tiles([Path(args.raster)], cfg.tiling)
    pick = np.linspace(0, len(refs) - 1, num=min(128, len(refs))).round().astype(int)
    tr = time.perf_counter()
    with RasterReader(args.raster, cfg.data) as reader:
        tiles = [torch.from_numpy(np.ascontiguousarray(reader.read(refs[i].window)[0])) for i in pick]
    read_ms = (time.perf_counter() - tr) / len(pick) * 1000
    batches = [torch.stack(tiles[i:i + args.batch]).to(device) for i in range(0, len(tiles) - args.batch + 1, args.batch)]
    n_tiles = 0
    outs: list[list[dict]] = []
    with torch.inference_mode():
        run(list(batches[0]))  # warm-up (and compile)
        t0 = time.perf_counter()
        deadline = t0 + args.model_seconds
        while time.perf_counter() < deadline:
            for b in batches:
                out = run(list(b))
                if len(outs) < 4:
                    outs.append([{k: v.float().cpu() for k, v in o.items()} for o in out])
                n_tiles += len(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
        secs = time.perf_counter() - t0
    torch.save(outs, args.dump) if args.dump else None
    return {"tiles": n_tiles, "seconds": secs, "tiles_per_s": n_tiles / secs, "peak_rss_mb": _peak_rss_mb(),
            "read_ms_per_tile": read_ms, "fast_path_used": run.fast_path}


def _roofline_rows(args: argparse.Namespace, fp: dict) -> dict:
    """Each path's achieved GFLOP/s against this CPU's float32 peak; ``float32_ceiling_vs_eager`` is the most
    any float32 path (the same detections) could gain over eager float32 here."""
    cmd = [sys.executable, str(Path(__file__).with_name("roofline.py")), "--arch", args.arch, "--batch", str(args.batch),
           "--tile", str(args.tile)]
    cmd += ["--width", str(args.width)] if args.width is not None else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    roof = _child_result(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    if "gflop_per_tile" not in roof:
        return roof
    peak = max(roof["peak_gflops_sgemm"], roof["peak_gflops_conv"])
    for row in fp.values():
        if "tiles_per_s" in row:
            row["gflops"] = row["tiles_per_s"] * roof["gflop_per_tile"]
            row["share_of_float32_peak"] = row["gflops"] / peak
    if "gflops" in fp.get("none", {}):
        roof["float32_ceiling_vs_eager"] = peak / fp["none"]["gflops"]
    return roof


def child_sahi(args: argparse.Namespace) -> dict:
    """SAHI's sliced prediction with the same torchvision model, tile and overlap (``scripts/sahi_compare.py``)."""
    import torch
    from sahi_compare import sahi_child

    from hem_bootstrap.model.detectors import build_detector

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = _cfg(args.arch, args.batch, 0, args.tile, args.overlap, "none", args.threads, width=args.width)
    torch.manual_seed(0)
    model = build_detector(cfg.model, 2, args.tile)
    if args.weights:
        from hem_bootstrap.model.checkpoints import load_checkpoint

        load_checkpoint(Path(args.weights), model)
    return sahi_child(model.eval(), cfg.model.score_floor, "cuda" if _cuda() else "cpu", Path(args.raster), args.tile,
                      args.overlap, Path(args.dump) if args.dump else None, _peak_rss_mb)


def _run_child(kind: str, args: argparse.Namespace, **extra: object) -> dict:
    return _child_result(subprocess.Popen(_child_cmd(kind, args, **extra), stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True, env=_child_env(extra)))


def _child_env(extra: dict) -> dict | None:
    return {**os.environ, **extra["env"]} if extra.get("env") else None


def _child_cmd(kind: str, args: argparse.Namespace, **extra: object) -> list[str]:
    cmd = [sys.executable, __file__, "--child", kind, "--raster", str(args.raster), "--arch", args.arch,
           "--batch", str(args.batch), "--tile", str(args.tile),
           "--overlap", str(args.overlap), "--fast-path", str(extra.get("fast_path", args.fast_path)),
           "--model-seconds", str(args.model_seconds), "--score-floor", str(args.score_floor), "--amp", args.amp]
    threads = extra.get("threads", args.threads)
    if threads:
        cmd += ["--threads", str(threads)]
    replicas = extra.get("replicas", args.replicas)
    if replicas is not None:
        cmd += ["--replicas", str(replicas)]
    if args.workers is not None:
        cmd += ["--workers", str(args.workers)]
    if args.weights:
        cmd += ["--weights", args.weights]
    if args.width is not None:
        cmd += ["--width", str(args.width)]
    if extra.get("dump"):
        cmd += ["--dump", str(extra["dump"])]
    return cmd


def _child_result(proc: subprocess.Popen) -> dict:
    """A child's JSON line, or its error."""
    stdout, stderr = proc.communicate()
    if proc.returncode < 0:
        return {"error": f"killed by signal {-proc.returncode} (SIGKILL: likely out of memory)"}
    if proc.returncode != 0:
        lines = [ln for ln in stderr.strip().splitlines() if "WARNING" not in ln]
        return {"error": lines[-1] if lines else f"exit {proc.returncode}"}
    return json.loads(stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def _replica_ceiling(args: argparse.Namespace, replicas: int, fast_path: str) -> dict:
    """The replicas' own ceiling: ``replicas`` single-threaded (or thread-sharing) model-only runs at once,
    on the fast path the scan ran."""
    threads = max(1, (args.threads or _torch_threads()) // replicas)
    procs = [subprocess.Popen(_child_cmd("model", args, threads=threads, fast_path=fast_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(replicas)]
    runs = [_child_result(p) for p in procs]
    bad = [r for r in runs if "tiles_per_s" not in r]
    if bad:
        return bad[0]
    return {"replicas": replicas, "threads_each": threads, "tiles_per_s": sum(r["tiles_per_s"] for r in runs),
            "runs_tiles_per_s": [r["tiles_per_s"] for r in runs]}


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _replica_rows(args: argparse.Namespace, e2e: dict) -> dict:
    """With replicas: the scan in one process beside it, and the replicas' own ceiling."""
    replicas = e2e.get("replicas") or 0
    if not replicas:
        return {}
    row: dict = {"end_to_end_in_process": _run_child("e2e", args, replicas=0),
                 "model_only_replicas": _replica_ceiling(args, replicas, e2e["fast_path_used"])}
    if "tiles_per_s" in row["end_to_end_in_process"]:
        row["replicas_speedup"] = e2e["tiles_per_s"] / row["end_to_end_in_process"]["tiles_per_s"]
    if "tiles_per_s" in row["model_only_replicas"]:
        row["ratio_vs_replica_ceiling"] = e2e["tiles_per_s"] / row["model_only_replicas"]["tiles_per_s"]
    return row


def _compare_outputs(a: Path, b: Path) -> dict:
    import torch
    from torchvision.ops import box_iou

    oa, ob = torch.load(a), torch.load(b)
    matched = total = 0
    max_score_diff = 0.0
    for ba, bb in zip(oa, ob, strict=False):
        for da, db in zip(ba, bb, strict=False):
            keep_a = da["scores"] >= 0.3
            keep_b = db["scores"] >= 0.3
            total += int(keep_a.sum())
            if keep_a.any() and keep_b.any():
                iou = box_iou(da["boxes"][keep_a], db["boxes"][keep_b])
                best, j = iou.max(dim=1)
                ok = best >= 0.9
                matched += int(ok.sum())
                if ok.any():
                    diff = (da["scores"][keep_a][ok] - db["scores"][keep_b][j[ok]]).abs().max()
                    max_score_diff = max(max_score_diff, float(diff))
    return {"detections_ref": total, "matched_iou0.9": matched, "max_score_diff": max_score_diff}


def _mean_ceiling(before: dict, after: dict) -> dict:
    """The two model-only runs bracketing a scan, as one ceiling (mean rate) with both kept."""
    if "tiles_per_s" not in before or "tiles_per_s" not in after:
        return before if "tiles_per_s" in before else after
    out = dict(before)
    out["tiles_per_s"] = (before["tiles_per_s"] + after["tiles_per_s"]) / 2
    out["peak_rss_mb"] = max(before["peak_rss_mb"], after["peak_rss_mb"])
    out["runs_tiles_per_s"] = [before["tiles_per_s"], after["tiles_per_s"]]
    return out


def _sahi_row(args: argparse.Namespace, data_dir: Path, size: int, e2e: dict, ours_dump: Path) -> dict:
    """SAHI on the same raster and weights: its time, memory and agreement with our scan (when installed)."""
    row: dict = {}
    try:
        import sahi  # type: ignore[import-not-found]  # noqa: F401

        sahi_dump = data_dir / f"sahi_{size}.npy"
        sahi_res = _run_child("sahi", args, dump=sahi_dump)
        row["sahi"] = sahi_res
        if "seconds" in sahi_res and "seconds" in e2e:
            row["sahi_wall_ratio"] = sahi_res["seconds"] / e2e["seconds"]
            row["rss_ratio_ours_over_sahi"] = e2e["peak_rss_mb"] / sahi_res["peak_rss_mb"]
            from sahi_compare import agreement

            row["agreement"] = agreement(ours_dump, sahi_dump)
    except ImportError:
        row["sahi"] = "not installed"
    return row


def _fast_paths(args: argparse.Namespace, data_dir: Path) -> dict:
    """Model-only rate of every fast path on the first size's raster, with each one's agreement with eager float32."""
    args.raster = data_dir / f"big_{args.sizes[0]}.tif"
    fp: dict = {}
    dumps = {}
    modes = ("none", "channels_last", "compile", "bf16", "onnxruntime")
    for mode in modes:
        dumps[mode] = data_dir / f"out_{mode}.pt"
        fp[mode] = _run_child("model", args, fast_path=mode, dump=dumps[mode])
    base = fp["none"].get("tiles_per_s")
    for mode in modes[1:]:
        if base and "tiles_per_s" in fp[mode]:
            fp[mode]["speedup_vs_eager"] = fp[mode]["tiles_per_s"] / base
            fp[mode]["agreement"] = _compare_outputs(dumps["none"], dumps[mode])
    fp["roofline"] = _roofline_rows(args, fp)
    print(json.dumps({"fast_paths": fp}, indent=1))
    return fp


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[8192, 20000])
    p.add_argument("--arch", default="small_fcos")
    p.add_argument("--weights", default=None, help="checkpoint to load (e.g. a demo round's model.pt)")
    p.add_argument("--width", type=float, default=None,
                   help="model.width of small_fcos / small_frcnn (default: the --weights file's card, else the config default)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", type=int, default=None,
                   help="reader processes of the scan (runtime.detect_workers; default: 0 on CPU, 2 on CUDA)")
    p.add_argument("--tile", type=int, default=256)
    p.add_argument("--overlap", type=int, default=32)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--replicas", type=int, default=None,
                   help="runtime.cpu_replicas of the scan (default: auto; 0: the model in the scan's process)")
    p.add_argument("--fast-path", default="auto", choices=["auto", "none", "channels_last", "compile", "bf16", "onnxruntime"])
    p.add_argument("--fast-paths", action="store_true",
                   help="also compare eager / channels_last / compile / bf16 / onnxruntime")
    p.add_argument("--amp", choices=["on", "off"], default="on", help="runtime.amp (mixed precision on CUDA)")
    p.add_argument("--compare-sahi", action="store_true")
    p.add_argument("--over-http", action="store_true", help="also scan the raster as a COG, locally and over HTTP")
    p.add_argument("--model-seconds", type=float, default=20.0)
    p.add_argument("--score-floor", type=float, default=0.05,
                   help="model.score_floor for every engine (SAHI keeps every prediction in Python objects)")
    p.add_argument("--data-dir", default="bench_out/rasters")
    p.add_argument("--out", default="bench_out/bench_inference.json")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--raster", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dump", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    global SCORE_FLOOR
    SCORE_FLOOR = args.score_floor

    if args.child:
        fn = {"e2e": child_end_to_end, "model": child_model_only, "sahi": child_sahi}[args.child]
        print(json.dumps(fn(args)))
        return

    if args.width is None and args.weights:
        args.width = _card_width(Path(args.weights))
    data_dir = Path(args.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    results: dict = {"score_floor": args.score_floor, "arch": args.arch, "width": args.width, "batch": args.batch, "workers": args.workers,
                     "replicas": args.replicas, "tile": args.tile,
                     "overlap": args.overlap, "fast_path": args.fast_path, "amp": args.amp == "on", "cpu_count": os.cpu_count(),
                     "cuda": _cuda(), "gpu": _gpu_name(), "cpu": cpu_name(), "cpu_native_bf16": cpu_has_native_bf16(),
                     "cpu_isa_limits": isa_limits(),
                     "sizes": {}}
    limits = "".join(f", {k}={v}" for k, v in results["cpu_isa_limits"].items())
    print(f"CPU: {results['cpu']} (native bf16: {results['cpu_native_bf16']}{limits})")
    for size in args.sizes:
        raster = data_dir / f"big_{size}.tif"
        t0 = time.perf_counter()
        make_big_raster(raster, size)
        print(f"raster {size}x{size}: {raster} ({raster.stat().st_size / 1e6:.0f} MB, {time.perf_counter() - t0:.0f}s)")
        args.raster = raster
        ours_dump = data_dir / f"ours_{size}.gpkg"
        # the ceiling is measured before and after the scan and averaged: on a shared machine the
        # model-only rate drifts by ~10% between runs, which would swing the ratio as much
        before = _run_child("model", args)
        e2e = _run_child("e2e", args, dump=ours_dump if args.compare_sahi else None)
        after = _run_child("model", args)
        model = _mean_ceiling(before, after)
        row = {"end_to_end": e2e, "model_only": model}
        if "tiles_per_s" in e2e and "tiles_per_s" in model:
            row["ratio"] = e2e["tiles_per_s"] / model["tiles_per_s"]
            # the scan's clock stops at its last tile; this one also counts the R-tree and the
            # rows still being written to the GeoPackage
            row["wall_ratio"] = e2e["wall_tiles_per_s"] / model["tiles_per_s"]
        if "tiles_per_s" in e2e:
            row.update(_replica_rows(args, e2e))
        if args.compare_sahi:
            row.update(_sahi_row(args, data_dir, size, e2e, ours_dump))
        if args.over_http:
            row["over_http"] = _over_http(args, raster)
        results["sizes"][str(size)] = row
        print(json.dumps({size: row}, indent=1))
    if args.fast_paths:
        results["fast_paths"] = _fast_paths(args, data_dir)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
