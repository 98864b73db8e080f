"""Effectiveness benchmark: does hard-negative mining beat random negatives where it should?

The regime where mining pays (Dalal & Triggs, DPM): a background pool far larger than what a
round can add, with look-alikes in few of its windows, so that a random draw is almost always
easy. For each look-alike density (share of 256 px windows holding a look-alike, in every
scene: training, pool, validation and test) and each seed it builds

* a labelled training scene, a background pool of several rasters without vehicles (>= 50x
  the negatives a round adds), a validation scene (each round's operating threshold is chosen
  there, ``data.val``) and >= 3 disjoint held-out test scenes of >= 1 km² together;

and trains arms that differ only in which windows they add to the bank (same steps, schedule,
batch mix and bank handling; round 0 is one shared model per seed):

* ``none``: nothing added (the extra rounds are more training only);
* ``random``: random pool windows, as many as ``topk`` would add as new bank rows;
* ``threshold``: false positives scoring > 0.5, at most K per pool raster;
* ``topk``: the K highest-scoring false positives per pool raster;
* ``dense``: the upper bound, a dense random sample of the whole pool (``random`` with
  ``k`` = the pool's tile windows) every round.

For each arm against ``random`` and against ``none`` it reports the paired difference of the
per-scene log-average FP/km² (recall 0.5-0.9) and of FP/km² at recall 0.8 and 0.9, with a 95 %
hierarchical bootstrap interval over seeds and scenes, plus AP@0.5, and per round: FPs by kind
(look-alike, background, duplicate, localisation), TP score quantiles, and how many mined
windows hold a look-alike against the random arm's windows.

Every run is kept under ``--work``; a finished run is never redone, so the sweep can be run in
parts (one density or a few seeds at a time) and tabulated with ``--collect-only``. ``--set``
applies a config change to every arm (the recipe under test) and ``--tag`` names it;
``--against TAG`` also compares each arm with the same arm of another recipe's finished runs
(same seeds and scenes), which tells whether a recipe that widens the gap between arms does so
by helping the mined arm or by hurting its control.

Example (the lowest density, 5 seeds; about 1 hour on 2 CPU cores):
    python scripts/bench_mining.py --densities 0.01 --seeds 31 32 33 34 35
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ARMS: dict[str, list[dict[str, Any]]] = {
    "none": [{"name": "none"}],
    "random": [{"name": "per_image_cap", "k": 0}, {"name": "random"}],
    "threshold": [{"name": "threshold", "threshold": 0.5}, {"name": "per_image_cap", "k": 0}],
    "topk": [{"name": "per_image_cap", "k": 0}],
    "dense": [{"name": "random", "k": 0}],
}
"""Mining strategies of each arm; ``k: 0`` is filled in with ``--k`` (per raster) or the dense count."""
METRICS = ("log_avg", "away", "r0.8", "r0.9")
SCENE_KEYS = ("train_size", "val_size", "pool_size", "pool_rasters", "test_size", "test_scenes", "gsd")
RUN_KEYS = (*SCENE_KEYS, "rounds", "k", "steps", "finetune_steps", "train_seed", "set")
"""Arguments a finished scene folder / run was made with: reusing one made otherwise is refused."""


def check_made_with(folder: Path, a: argparse.Namespace, keys: tuple[str, ...]) -> None:
    """Record the arguments ``folder`` is made with, or refuse to reuse it when they differ."""
    made = {k: getattr(a, k) for k in keys}
    record = folder / "bench_args.json"
    if record.exists():
        old = json.loads(record.read_text())
        diff = [f"--{k.replace('_', '-')} {old.get(k)!r} (now {v!r})" for k, v in made.items() if old.get(k) != v]
        if diff:
            raise SystemExit(f"{folder} was made with {', '.join(diff)}; use another --work or --tag")
    else:
        folder.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(made))


# ------------------------------------------------------------------------------------ scenes


def make_scenes(root: Path, density: float, seed: int, a: argparse.Namespace) -> Path:
    """The scenes of one (density, seed): train, pool_0.., val, test_0.. (seeds the tests never use)."""
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    out = root / "scenes" / f"d{density:g}_s{seed}"
    done = out / "done.json"
    if done.exists():
        check_made_with(out, a, SCENE_KEYS)
        return out
    shutil.rmtree(out, ignore_errors=True)
    check_made_with(out, a, SCENE_KEYS)

    def spec(size: int, k: int, **kw: Any) -> SceneSpec:
        return SceneSpec(size=size, gsd=a.gsd, seed=seed * 100 + k, lookalike_share=density, **kw)

    if a.pool_rasters > 10 or a.test_scenes > 10:
        raise SystemExit("--pool-rasters and --test-scenes: at most 10 each (their scene seeds must not collide)")
    write_scene(out, spec(a.train_size, 1), name="train", compress="jpeg")
    write_scene(out, spec(a.val_size, 2), name="val", compress="jpeg")
    for i in range(a.pool_rasters):
        write_scene(out, spec(a.pool_size, 10 + i, n_vehicles=0), name=f"pool_{i}", compress="jpeg")
    for i in range(a.test_scenes):
        write_scene(out, spec(a.test_size, 20 + i), name=f"test_{i}", compress="jpeg")
    done.write_text(json.dumps({"density": density, "seed": seed}))
    return out


def pool_windows(a: argparse.Namespace) -> int:
    """Tile windows (256 px) in the pool."""
    return a.pool_rasters * math.ceil(a.pool_size / 256) ** 2


# ------------------------------------------------------------------------------------ configs


def config_tree(scenes: Path, runs: Path, name: str, arm: str, a: argparse.Namespace) -> dict[str, Any]:
    def iset(n: str) -> dict[str, Any]:
        return {"images": [str(scenes / f"{n}.tif")], "labels": str(scenes / f"{n}_labels.gpkg"),
                "distractors": str(scenes / f"{n}_distractors.gpkg")}

    strategies = [dict(s) for s in ARMS[arm]]
    for s in strategies:
        if s.get("k") == 0:
            s["k"] = pool_windows(a) if arm == "dense" else a.k
    tree: dict[str, Any] = {
        "data": {"train": [iset("train")], "pool": [iset(f"pool_{i}") for i in range(a.pool_rasters)],
                 "val": [iset("val")], "test": [iset(f"test_{i}") for i in range(a.test_scenes)]},
        "train": {"steps": a.steps, "finetune_steps": a.finetune_steps, "batch_size": 8},
        # the pool has no vehicles, so a reviewer would confirm every suspect as a negative: bank them
        # (the default, hold, waits for a person and would keep the most confident look-alikes out)
        "mining": {"strategies": strategies, "review_mode": "bank"},
        "rounds": {"name": name, "out_dir": str(runs), "n_rounds": a.rounds, "stop_if_no_new": False},
        "runtime": {"workers": a.workers, "seed": a.train_seed, "threads": a.threads},
    }
    for item in a.set:
        key, _, raw = item.partition("=")
        section, _, field = key.partition(".")
        tree.setdefault(section, {})[field] = yaml.safe_load(raw)
    return tree


def run_arm(scenes: Path, runs: Path, seed: int, arm: str, a: argparse.Namespace) -> Path:
    """One arm's run, from the seed's shared round 0 (trained first if missing); finished runs are kept."""
    from hem_bootstrap.config import config_from_tree
    from hem_bootstrap.loop import run_experiment

    base = (a.round0_runs or runs) / f"s{seed}_round0"
    finished = (base / "round_000" / "metrics.json").exists()
    if a.round0_runs is not None and not finished:
        raise SystemExit(f"--round0-from: {base} has no finished round 0; run that tag first")
    if not finished:
        tree = config_tree(scenes, base.parent, base.name, "topk", a)
        tree["rounds"]["n_rounds"] = 0
        shutil.rmtree(base, ignore_errors=True)
        run_experiment(config_from_tree(tree, scenes), print_table=False)
    run = runs / f"s{seed}_{arm}"
    if (run / "table.txt").exists():
        check_made_with(run, a, RUN_KEYS)
        return run
    cfg = config_from_tree(config_tree(scenes, runs, run.name, arm, a), scenes)
    _same_model(base, cfg.model.model_dump(mode="json"))
    shutil.rmtree(run, ignore_errors=True)
    check_made_with(run, a, RUN_KEYS)
    shutil.copytree(base / "round_000", run / "round_000")
    manifest = json.loads((base / "manifest.json").read_text())
    manifest["name"] = run.name
    manifest["rounds"] = [e for e in manifest["rounds"] if e["round"] == 0]
    (run / "manifest.json").write_text(json.dumps(manifest))
    shutil.copyfile(base / "config.resolved.yaml", run / "config.resolved.yaml")
    run_experiment(cfg, resume=True, force=True, print_table=False)
    return run


def _same_model(base: Path, model: dict[str, Any]) -> None:
    """Refuse to fine-tune a round-0 model built otherwise (``--round0-from`` a tag run under other defaults)."""
    from hem_bootstrap.loop import with_defaults

    made = with_defaults(yaml.safe_load((base / "config.resolved.yaml").read_text()))["model"]
    diff = [f"model.{k}: {made.get(k)!r} there, {v!r} here" for k, v in model.items() if made.get(k) != v]
    if diff:
        raise SystemExit(f"{base}: round 0 was built with another model ({'; '.join(diff)}); "
                         "add --set for those keys or drop --round0-from")


# ------------------------------------------------------------------------------------ collect


def collect(run: Path, scenes: Path) -> list[dict[str, Any]]:
    """Per round: pooled and per-scene metrics, FP kinds, TP scores, bank counts, mined-window diagnostics."""
    manifest = json.loads((run / "manifest.json").read_text())
    rows = []
    last = max(e["round"] for e in manifest["rounds"])
    for e in manifest["rounds"]:
        r = e["round"]
        m = json.loads((run / f"round_{r:03d}" / "metrics.json").read_text())
        if _older(m) and (r == last or (run / f"round_{r:03d}" / "near_floor.json").exists()):
            m = {**m, **near_floor(run, r)}  # older rounds: re-scored for the final round the tables compare
        scenes_m = [m["per_image"].get(k, {}) for k in sorted(m["per_image"])]
        rows.append({
            "round": r,
            "ap50": m.get("ap50"),
            "log_avg": m.get("log_avg_fp_per_km2"),
            "r0.8": m["fp_per_km2_at_recall"].get("0.8"),
            "r0.9": m["fp_per_km2_at_recall"].get("0.9"),
            "floor": m.get("log_avg_fp_near_per_km2"),
            "away": m.get("log_avg_fp_away_per_km2"),
            "scenes": {"log_avg": [s.get("log_avg_fp_per_km2") for s in scenes_m],
                       "floor": [s.get("log_avg_fp_near_per_km2") for s in scenes_m],
                       "away": [s.get("log_avg_fp_away_per_km2") for s in scenes_m],
                       "r0.8": [s.get("fp_per_km2_at_recall", {}).get("0.8") for s in scenes_m],
                       "r0.9": [s.get("fp_per_km2_at_recall", {}).get("0.9") for s in scenes_m]},
            "area_km2": m.get("area_km2"),
            "fp_kinds_r0.8": m.get("fp_kinds_at_recall", {}).get("0.8"),
            "tp_scores": m.get("tp_score_quantiles"),
            "val_threshold": (m.get("calibration") or {}).get("threshold"),
            "op_recall": m.get("recall"),
            "op_fp_km2": m.get("fp_per_km2"),
            "bank": e.get("bank_size", 0),
            "new": e.get("new_negatives", 0),
            **(mined_on_lookalikes(run / f"round_{r:03d}" / "mined.gpkg", scenes) if r > 0 else {}),
        })
    return rows


def tag_results(work: Path, tag: str, dens: float, a: argparse.Namespace) -> dict[str, dict[int, list[dict[str, Any]]]]:
    """Another tag's finished runs of ``a.seeds`` and ``a.arms`` at ``dens`` (``--against``), per arm and seed."""
    runs = work / "runs" / tag / f"d{dens:g}"
    if not runs.is_dir():
        raise SystemExit(f"--against {tag}: no runs at density {dens:g} under {runs}")
    out: dict[str, dict[int, list[dict[str, Any]]]] = {}
    for arm in a.arms:
        for seed in a.seeds:
            if (runs / f"s{seed}_{arm}" / "table.txt").exists():
                out.setdefault(arm, {})[seed] = collect(runs / f"s{seed}_{arm}", work / "scenes" / f"d{dens:g}_s{seed}")
    return out


def _older(m: dict[str, Any]) -> bool:
    """Were these metrics written before the away-from-objects log-average or the enclosing localisation count?"""
    if "log_avg_fp_away_per_km2" not in m or "fp_kinds_at_recall" not in m:
        return True
    kinds = m["fp_kinds_at_recall"].get("0.8")
    return kinds is not None and "localisation_enclosing" not in kinds


def near_floor(run: Path, r: int) -> dict[str, Any]:
    """The near-object floor, away-from-objects log-average and FP kinds of a round evaluated before metrics had them.

    Re-scored from its saved test detections.

    Cached in ``round_NNN/near_floor.json``; the model is not run again.
    """
    from hem_bootstrap.config import load_config
    from hem_bootstrap.inputs import check_inputs
    from hem_bootstrap.loop import make_context
    from hem_bootstrap.rundir import RunDir
    from hem_bootstrap.steps import score_detections

    cache = run / f"round_{r:03d}" / "near_floor.json"
    if not cache.exists() or _older(json.loads(cache.read_text())):
        cfg = load_config(run / "config.resolved.yaml")
        ctx = make_context(cfg, RunDir(run), check_inputs(cfg, ("test",)))
        m = score_detections(ctx, "test", run / f"round_{r:03d}" / "test_detections.gpkg", cfg.evaluate)
        cache.write_text(json.dumps({"log_avg_fp_near_per_km2": m["log_avg_fp_near_per_km2"],
                                     "log_avg_fp_away_per_km2": m["log_avg_fp_away_per_km2"],
                                     "fp_kinds_at_recall": m["fp_kinds_at_recall"],
                                     "per_image": m["per_image"]}))
    return json.loads(cache.read_text())


def mined_on_lookalikes(path: Path, scenes: Path) -> dict[str, float | None]:
    """Of a round's added bank rows: the share whose box lies on a labelled look-alike, and whose chip window holds one.

    The box test is evaluation's (IoU > 0.1 or centre inside); random rows are boxes drawn at
    random, so their box share is the chance a random draw lands on a look-alike, and their
    window share the chance a random chip shows one at all.
    """
    import geopandas as gpd
    import rasterio
    import shapely

    from hem_bootstrap.evaluate import distractor_hits

    if not path.exists() or len(mined := gpd.read_file(path)) == 0:
        return {"box_on_lookalike": None, "window_with_lookalike": None}
    on_box = in_window = 0
    for image, rows in mined.groupby("image"):
        dis = gpd.read_file(scenes / f"{Path(str(image)).stem}_distractors.gpkg")
        with rasterio.open(image) as ds:
            t = ds.transform
        boxes = rows[["px_xmin", "px_ymin", "px_xmax", "px_ymax"]].to_numpy(dtype=float)
        x0, y0 = t * (boxes[:, 0], boxes[:, 1])
        x1, y1 = t * (boxes[:, 2], boxes[:, 3])
        map_boxes = np.stack([np.minimum(x0, x1), np.minimum(y0, y1), np.maximum(x0, x1), np.maximum(y0, y1)], 1)
        on_box += sum(h is not None for h in distractor_hits(map_boxes, dis))
        if len(dis):
            tree = shapely.STRtree(dis.geometry.values)
            for w in rows.itertuples():
                wx0, wy0 = t * (w.win_col, w.win_row)
                wx1, wy1 = t * (w.win_col + w.win_w, w.win_row + w.win_h)
                win = shapely.box(min(wx0, wx1), min(wy0, wy1), max(wx0, wx1), max(wy0, wy1))
                in_window += int(len(tree.query(win, predicate="intersects")) > 0)
    return {"box_on_lookalike": on_box / len(mined), "window_with_lookalike": in_window / len(mined)}


# ------------------------------------------------------------------------------------ tables


def comparisons(results: dict[str, dict[int, list[dict[str, Any]]]], r: int,
                against: tuple[str, dict[str, dict[int, list[dict[str, Any]]]]] | None = None) -> list[dict[str, Any]]:
    """Each arm against ``random`` and ``none`` at round ``r``, and against the same arm of ``against``'s recipe."""
    out = []
    for arm in results:
        for ctl in ("random", "none"):
            if ctl in results and ctl != arm:
                out.append({"arm": arm, "control": ctl, **compare(results[arm], results[ctl], r)})
        if against is not None and arm in against[1]:
            out.append({"arm": arm, "control": f"{arm} ({against[0]})", **compare(results[arm], against[1][arm], r)})
    return out


def compare(a: dict[int, list[dict[str, Any]]], b: dict[int, list[dict[str, Any]]], r: int) -> dict[str, Any]:
    """Paired differences ``a - b`` at round ``r`` (same seeds, same scenes) with bootstrap intervals."""
    from hem_bootstrap.scoring.paired import paired_bootstrap

    row: dict[str, Any] = {}
    for metric in METRICS:
        d = paired_bootstrap(_per_seed(a, r, metric), _per_seed(b, r, metric))
        row[metric] = None if d is None else d.__dict__
    # the same as a ratio: FP counts are heavy-tailed (one hard scene can hold most of them), so the
    # mean of per-scene log ratios is read beside the raw difference (same sign per pair)
    d = paired_bootstrap(_per_seed(a, r, "log_avg", log=True), _per_seed(b, r, "log_avg", log=True))
    row["log_avg_ratio"] = None if d is None else _as_ratio(d)
    for key in ("ap50", "op_recall", "op_fp_km2"):  # one pooled value per seed
        d = paired_bootstrap({s: [_at(x, r)[key]] for s, x in a.items() if _at(x, r)},
                             {s: [_at(x, r)[key]] for s, x in b.items() if _at(x, r)})
        row[key] = None if d is None else d.__dict__
    return row


def headroom(results: dict[str, dict[int, list[dict[str, Any]]]], r: int) -> dict[str, Any]:
    """Per arm at round ``r``: near-object floor / log-average, the ratio removing every FP away from objects would give.

    Mean per-scene log ratio, exponentiated, with the bootstrap interval over seeds and scenes:
    no negative, mined or random, can lower an arm's log-average below its floor unless it also
    changes how the true positives and the boxes on them score.
    """
    from hem_bootstrap.scoring.paired import paired_bootstrap

    out = {}
    for arm, by_seed in results.items():
        d = paired_bootstrap(_per_seed(by_seed, r, "floor", log=True), _per_seed(by_seed, r, "log_avg", log=True))
        out[arm] = None if d is None else _as_ratio(d)
    return out


def _as_ratio(d: Any) -> dict[str, Any]:
    """A paired difference of logs as a ratio: mean and both intervals exponentiated (counts stay)."""
    return {**d.__dict__, **{k: math.exp(getattr(d, k)) for k in ("mean", "lo", "hi", "t_lo", "t_hi")
                             if getattr(d, k) is not None}}


def _per_seed(by_seed: dict[int, list[dict[str, Any]]], r: int, metric: str,
              log: bool = False) -> dict[int, list[float | None]]:
    """Per seed, the per-scene values of ``metric`` at round ``r`` (natural log with ``log``; a zero stays out)."""
    out = {}
    for s, rows in by_seed.items():
        x = _at(rows, r)
        if x is not None:
            vals = x["scenes"][metric]
            out[s] = [math.log(v) if v else None for v in vals] if log else list(vals)
    return out


def _at(rows: list[dict[str, Any]], r: int) -> dict[str, Any] | None:
    return next((x for x in rows if x["round"] == r), None)


def _mean(vals: list[Any]) -> str:
    v = [x for x in vals if x is not None]
    return "n/a" if not v else f"{sum(v) / len(v):.3g}" + ("" if len(v) == len(vals) else "*")


def _ci(d: dict[str, Any] | None, fmt: str = ".3g", one: float = 0.0) -> str:
    """``mean [lo, hi]``, marked when the interval lies below (or above) ``one``; with the seed count that favours the arm."""
    if d is None:
        return "n/a"
    mark = " **below**" if d["hi"] < one else (" (above)" if d["lo"] > one else "")
    return f"{d['mean']:{fmt}} [{d['lo']:{fmt}}, {d['hi']:{fmt}}]{mark} {d['seeds_lower']}/{d['n_seeds']}"


def _seed_level(d: dict[str, Any] | None, fmt: str = ".3g") -> str:
    """The seed-level readings beside the bootstrap: Student t interval of the seed means, exact sign-test p."""
    if d is None or d.get("t_lo") is None:
        return "n/a"
    p = "n/a (no seed differs)" if d.get("sign_p") is None else f"{d['sign_p']:.3g}"
    return f"[{d['t_lo']:{fmt}}, {d['t_hi']:{fmt}}], p = {p}"


def markdown(by_density: dict[str, dict[str, dict[int, list[dict[str, Any]]]]], rounds: int,
             against: dict[str, tuple[str, dict[str, dict[int, list[dict[str, Any]]]]]] | None = None
             ) -> tuple[str, dict]:
    lines, stats, rooms = [], {}, {}
    for dens, results in by_density.items():
        lines += [f"### look-alikes in {float(dens):.0%} of windows", "",
                  "| arm | round | AP@0.5 | log-avg FP/km² (R 0.5-0.9) | near-object floor | FP/km² @R0.8 | FP/km² @R0.9 "
                  "| FP kinds @R0.8 (look-alike/background/dup/loc (loc enclosing its object)) | TP score median | val thr "
                  "| recall / FP/km² at val thr | added | added boxes on / chips with a look-alike |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm, by_seed in results.items():
            for r in range(rounds + 1):
                xs = [x for x in (_at(rows, r) for rows in by_seed.values()) if x is not None]
                if not xs:
                    continue
                kinds = [x["fp_kinds_r0.8"] for x in xs if x["fp_kinds_r0.8"]]
                k = "/".join(_mean([kk[n] for kk in kinds]) for n in ("look-alike", "background", "duplicate",
                                                                        "localisation")) if kinds else "n/a"
                if kinds:
                    k += f" ({_mean([kk.get('localisation_enclosing') for kk in kinds])})"
                lines.append(f"| {arm} | {r} | {_mean([x['ap50'] for x in xs])} | {_mean([x['log_avg'] for x in xs])} | "
                             f"{_mean([x.get('floor') for x in xs])} | "
                             f"{_mean([x['r0.8'] for x in xs])} | {_mean([x['r0.9'] for x in xs])} | {k} | "
                             f"{_mean([(x['tp_scores'] or {}).get('0.5') for x in xs])} | "
                             f"{_mean([x['val_threshold'] for x in xs])} | "
                             f"{_mean([x.get('op_recall') for x in xs])} / {_mean([x.get('op_fp_km2') for x in xs])} | "
                             f"{_mean([x['new'] for x in xs])} | "
                             f"{_mean([x.get('box_on_lookalike') for x in xs])} / "
                             f"{_mean([x.get('window_with_lookalike') for x in xs])} |")
        comp = comparisons(results, rounds, (against or {}).get(dens))
        room = headroom(results, rounds)
        stats[dens], rooms[dens] = comp, room
        lines += ["", f"Round {rounds}, near-object floor / log-avg FP/km² (what removing every FP away from objects "
                  "would give; geometric mean over scenes [95 % interval]): "
                  + "; ".join(f"{arm} {_ci(d, '.2f', 1.0).rsplit(' ', 1)[0]}" for arm, d in room.items())]
        lines += ["", f"Round {rounds}, paired difference arm - control: mean [95 % bootstrap interval over seeds "
                  "and scenes], then the seeds on which the arm is lower (for FP measures they favour the arm, for "
                  "recall and AP the control); **below**: the interval lies below zero "
                  "(for the ratio: below 1). Beside the log-average, the seed-level readings (a percentile bootstrap "
                  "over few seeds is narrow): the Student t 95 % interval of the seed means and the exact sign-test p. "
                  "'at val thr': recall and FP/km² on the test scenes at the threshold chosen on validation (the "
                  "operating point a user deploys; the recall-matched columns choose theirs on the test scenes):", "",
                  "| arm | control | log-avg FP/km² | seed-level t interval, sign p | ratio of log-avg FP/km² "
                  "| log-avg FP/km² away from objects | FP/km² @R0.8 | FP/km² @R0.9 | recall at val thr "
                  "| FP/km² at val thr | AP@0.5 |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {c['arm']} | {c['control']} | {_ci(c['log_avg'])} | {_seed_level(c['log_avg'])} | "
                  f"{_ci(c['log_avg_ratio'], '.2f', 1.0)} | {_ci(c['away'])} | {_ci(c['r0.8'])} | {_ci(c['r0.9'])} | "
                  f"{_ci(c.get('op_recall'), '.3f')} | {_ci(c.get('op_fp_km2'))} | {_ci(c['ap50'], '.3f')} |"
                  for c in comp]
        lines.append("")
    lines.append("Means over seeds (* = some seeds never reached that recall); FP/km² over the test scenes "
                 "together; intervals over per-scene values.")
    return "\n".join(lines), {"comparisons": stats, "headroom": rooms}


# ------------------------------------------------------------------------------------ main


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--densities", type=float, nargs="+", default=[0.01, 0.05, 0.2])
    p.add_argument("--seeds", type=int, nargs="+", default=[31, 32, 33, 34, 35])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--k", type=int, default=8, help="negatives a round adds per pool raster (topk, threshold, random)")
    p.add_argument("--train-size", type=int, default=2560)
    p.add_argument("--val-size", type=int, default=2560)
    p.add_argument("--pool-size", type=int, default=5120, help="side of each pool raster (px)")
    p.add_argument("--pool-rasters", type=int, default=4)
    p.add_argument("--test-size", type=int, default=3900, help="side of each test scene: 0.34 km² at 0.15 m")
    p.add_argument("--test-scenes", type=int, default=3)
    p.add_argument("--gsd", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--finetune-steps", type=int, default=120)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--train-seed", type=int, default=0)
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="config change for every arm (the recipe under test); repeatable")
    p.add_argument("--tag", default="default", help="name of the recipe (runs under WORK/runs/TAG)")
    p.add_argument("--round0-from", default=None, metavar="TAG",
                   help="reuse another tag's round-0 models (for changes that only act after round 0)")
    p.add_argument("--against", default=None, metavar="TAG",
                   help="also compare each arm with the same arm of another tag's finished runs (same seeds)")
    p.add_argument("--collect-only", action="store_true", help="tabulate finished runs, train nothing")
    p.add_argument("--work", default="bench_out/mining")
    p.add_argument("--out", default=None, help="JSON output (default: WORK/TAG.json; a .md beside it)")
    return p.parse_args()


def main() -> None:
    a = parse_args()
    work = Path(a.work).resolve()
    out = Path(a.out) if a.out else work / f"{a.tag}.json"
    ratio = pool_windows(a) / max(1, a.k * a.pool_rasters)
    print(f"pool: {pool_windows(a)} windows = {ratio:.0f}x the {a.k * a.pool_rasters} negatives a round adds; "
          f"held-out: {a.test_scenes} scenes, {a.test_scenes * (a.test_size * a.gsd) ** 2 / 1e6:.2f} km²", flush=True)
    t0 = time.perf_counter()
    by_density: dict[str, dict[str, dict[int, list[dict[str, Any]]]]] = {}
    against = {}
    for dens in a.densities:
        runs = work / "runs" / a.tag / f"d{dens:g}"
        a.round0_runs = work / "runs" / a.round0_from / f"d{dens:g}" if a.round0_from else None
        results: dict[str, dict[int, list[dict[str, Any]]]] = {arm: {} for arm in a.arms}
        for seed in a.seeds:
            scenes = work / "scenes" / f"d{dens:g}_s{seed}"
            if not a.collect_only:
                make_scenes(work, dens, seed, a)
            for arm in a.arms:
                run = runs / f"s{seed}_{arm}"
                if not a.collect_only:
                    t = time.perf_counter()
                    run = run_arm(scenes, runs, seed, arm, a)
                    print(f"density {dens:g} seed {seed} {arm}: {time.perf_counter() - t:.0f} s", flush=True)
                if (run / "table.txt").exists():
                    results[arm][seed] = collect(run, scenes)
        by_density[f"{dens:g}"] = {arm: rows for arm, rows in results.items() if rows}
        if a.against:
            against[f"{dens:g}"] = (a.against, tag_results(work, a.against, dens, a))
    table, stats = markdown(by_density, a.rounds, against)
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    args = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}
    out.write_text(json.dumps({"args": args, "seconds": round(time.perf_counter() - t0, 1),
                               "results": by_density, **stats}, indent=1, default=str))
    out.with_suffix(".md").write_text(table + "\n")
    print(f"wrote {out} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
