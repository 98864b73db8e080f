"""Per-round tables and plots of a run, and side-by-side comparison of several runs.

Everything is read back from the run directory (``manifest.json`` and each round's
``metrics.json``), so a report can be written at any time, also for a run that is still going
or was stopped: a round without metrics shows dashes. Plots use matplotlib's object API
(``Figure`` with the Agg canvas), which needs no display and leaves the global backend alone.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import yaml
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator

from hem_bootstrap.config import DataConfig, with_defaults
from hem_bootstrap.detections import PX_COLUMNS
from hem_bootstrap.errors import HemError, RunError
from hem_bootstrap.files import atomic_path, atomic_write_text
from hem_bootstrap.geo.raster import RasterReader, open_raster
from hem_bootstrap.geo.windows import Window, map_to_pixel_boxes

log = logging.getLogger(__name__)

MAX_MINED_EXAMPLES = 16
"""Mined negatives shown per round (the highest-scoring ones)."""
CROP_MIN_PX = 64
"""Smallest side of an example crop; a crop is at least three boxes wide for context."""

# (row key, report.md header, format_table header or None when only in report.md, number format)
COLUMNS: list[tuple[str, str, str | None, str]] = [
    ("round", "round", "round", "d"),
    ("bank_size", "bank size", "bank", "d"),
    ("new_negatives", "new negatives", "new neg", "d"),
    ("pool_fp", "pool FPs", "pool FP", "d"),
    ("hard_positives", "hard positives", None, "d"),
    ("ap50", "AP@0.5", "AP@0.5", ".3f"),
    ("ap", "AP", None, ".3f"),
    ("precision", "precision", None, ".3f"),
    ("recall", "recall", None, ".3f"),
    ("fp_per_km2", "FP/km²", "FP/km²", ".1f"),
    ("fp_per_km2_r80", "FP/km² @R0.8", "FP/km²@R0.8", ".1f"),
    ("fp_per_km2_r90", "FP/km² @R0.9", None, ".1f"),
    ("fp_away_per_km2_r80", "look-alike FP/km² @R0.8", "look-alike@R0.8", ".1f"),
    ("fp_on_distractors_share", "FP share on distractors", None, ".2f"),
]
PER_CLASS = {"ap50": ("AP@0.5", ".3f"), "fp_per_km2": ("FP/km²", ".1f")}
"""Per-class columns (``metrics.json``'s ``per_class``, several classes only): header prefix and format."""


# ----------------------------------------------------------------------------- reading


def _load_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunError(f"{path}: {what} not found") from None
    except (OSError, json.JSONDecodeError) as err:
        raise RunError(f"{path}: {what} is not readable JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunError(f"{path}: {what} should hold a JSON object, got {type(data).__name__}")
    return data


def _manifest(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / "manifest.json"
    if not path.is_file():
        raise RunError(f"{run_dir}: not a run directory (no manifest.json)")
    manifest = _load_json(path, "manifest")
    rounds = manifest.get("rounds", [])
    if not isinstance(rounds, list):
        raise RunError(f"{path}: 'rounds' should be a list, got {type(rounds).__name__}")
    return manifest


def _entries(run_dir: Path) -> list[dict[str, Any]]:
    """Round entries of the manifest, each with its ``round`` number, in round order."""
    entries = []
    for i, e in enumerate(_manifest(run_dir).get("rounds", [])):
        if isinstance(e, dict):
            entries.append({**e, "round": int(e.get("round", i))})
    return sorted(entries, key=lambda e: e["round"])


def _entry_value(entry: dict[str, Any], key: str) -> Any:
    """A round's value, from the entry itself or from its ``steps.mine`` record."""
    if entry.get(key) is not None:
        return entry[key]
    mine = entry.get("steps", {}).get("mine", {}) if isinstance(entry.get("steps"), dict) else {}
    return mine.get(key) if isinstance(mine, dict) else None


def _metrics(run_dir: Path, entry: dict[str, Any]) -> dict[str, Any] | None:
    """The round's metrics.json, or None while the round has not been evaluated."""
    rel = entry.get("metrics") or f"round_{entry['round']:03d}/metrics.json"
    path = Path(run_dir) / rel
    if not path.is_file():
        return None
    return _load_json(path, "metrics")


def _at_key(table: Any, target: float) -> Any:
    """Value under a float-like key (``"0.8"``, ``"0.80"``) of a metrics sub-dict."""
    if not isinstance(table, dict):
        return None
    for k, v in table.items():
        try:
            if abs(float(k) - target) < 1e-9:
                return v
        except ValueError:
            continue
    return None


def _row(entry: dict[str, Any], m: dict[str, Any] | None) -> dict[str, Any]:
    m = m or {}
    return {
        "round": entry["round"],
        "bank_size": _entry_value(entry, "bank_size"),
        "new_negatives": _entry_value(entry, "new_negatives"),
        "pool_fp": _entry_value(entry, "pool_fp"),
        "hard_positives": _entry_value(entry, "hard_positives"),
        "ap50": m.get("ap50"),
        "ap": m.get("ap"),
        "precision": m.get("precision"),
        "recall": m.get("recall"),
        "fp_per_km2": m.get("fp_per_km2"),
        "fp_per_km2_r80": _at_key(m.get("fp_per_km2_at_recall"), 0.8),
        "fp_per_km2_r90": _at_key(m.get("fp_per_km2_at_recall"), 0.9),
        "fp_away_per_km2_r80": _at_key(m.get("fp_away_per_km2_at_recall"), 0.8),
        "fp_on_distractors_share": m.get("fp_on_distractors_share"),
        **{f"{key}:{name}": c.get(key) for name, c in (m.get("per_class") or {}).items() for key in PER_CLASS},
    }


def round_table(run_dir: Path) -> list[dict[str, Any]]:
    """One row per round of a run: bank counts from the manifest, held-out metrics from metrics.json.

    Raises:
        RunError: ``run_dir`` has no readable manifest, or a metrics file is not JSON.
    """
    run_dir = Path(run_dir)
    return [_row(e, _metrics(run_dir, e)) for e in _entries(run_dir)]


# ------------------------------------------------------------------------------ tables


def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, (int, float, np.number)) and not isinstance(value, bool):
        if spec == "d":
            return str(int(value))
        return format(float(value), spec)
    return str(value)


def _fixed_width(headers: list[str], body: list[list[str]], left: int = 0) -> str:
    """Columns padded to their widest cell; the first ``left`` (text) columns left-aligned."""
    widths = [max([len(h)] + [len(r[i]) for r in body]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    out = [line(headers), "  ".join("-" * w for w in widths)]
    out.extend(line(r) for r in body)
    return "\n".join(out)


def _class_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str, str]]:
    """With several classes, AP@0.5 and FP/km² of each class (``COLUMNS``' layout), in the order met."""
    out = []
    for key in dict.fromkeys(k for r in rows for k in r if ":" in k):
        metric, name = key.split(":", 1)
        head, spec = PER_CLASS[metric]
        out.append((key, f"{head} {name}", f"{head} {name}", spec))
    return out


def format_table(rows: list[dict[str, Any]]) -> str:
    """Plain fixed-width text table printed at the end of a run (round, bank, AP@0.5, FP/km²..., per class)."""
    cols = [(k, short, spec) for k, _, short, spec in COLUMNS + _class_columns(rows) if short is not None]
    body = [[_fmt(r.get(k), spec) for k, _, spec in cols] for r in rows]
    return _fixed_width([short for _, short, _ in cols], body)


def _markdown_table(rows: list[dict[str, Any]]) -> str:
    columns = COLUMNS + _class_columns(rows)
    headers = [long for _, long, _, _ in columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(k), spec) for k, _, _, spec in columns) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> Path:
    """Save a figure as PNG under a temporary name and rename it into place."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    pts = [(r["round"], float(r[key])) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_pr_curves(curves: dict[int, dict[str, Any]], path: Path) -> Path:
    """Precision against recall of every round on one figure."""
    fig = Figure(figsize=(6, 5))
    ax = fig.add_subplot()
    for r, curve in sorted(curves.items()):
        rec, prec = curve.get("recall") or [], curve.get("precision") or []
        if rec:
            ax.plot(rec, prec, label=f"round {r}")
    ax.set(xlabel="recall", ylabel="precision", xlim=(0, 1.02), ylim=(0, 1.02), title="Held-out PR curves")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="lower left")
    else:
        ax.text(0.5, 0.5, "no PR curve yet", ha="center", va="center", transform=ax.transAxes)
    return _save(fig, path)


def plot_fp_ap(rows: list[dict[str, Any]], path: Path) -> Path:
    """AP (left axis) and FP/km² (right axis) against round."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    for key, label, style in (("ap50", "AP@0.5", "o-"), ("ap", "AP", "s--")):
        x, y = _series(rows, key)
        if x:
            ax.plot(x, y, style, color="tab:blue", label=label)
    ax.set(xlabel="round", ylabel="AP", ylim=(0, 1.02))
    ax2 = ax.twinx()
    for key, label, style in (
        ("fp_per_km2", "FP/km² (operating)", "o-"),
        ("fp_per_km2_r80", "FP/km² @R0.8", "^:"),
    ):
        x, y = _series(rows, key)
        if x:
            ax2.plot(x, y, style, color="tab:red", label=label)
    ax2.set_ylabel("FP per km²", color="tab:red")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    if handles:
        ax.legend(handles=handles, loc="upper center", fontsize="small")
    ax.set_title("Held-out AP and false positives by round")
    return _save(fig, path)


def plot_bank(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bank size (bars) and new negatives (line) per round."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    x, y = _series(rows, "bank_size")
    ax.bar(x, y, color="tab:gray", alpha=0.6, label="bank size")
    x2, y2 = _series(rows, "new_negatives")
    ax.plot(x2, y2, "o-", color="tab:green", label="new negatives")
    ax.set(xlabel="round", ylabel="negatives", title="Negative bank by round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left")
    return _save(fig, path)


# ------------------------------------------------------------------------ mined examples


def _data_config(run_dir: Path) -> Any:
    """The run's ``data`` section (bands, scaling), or the defaults when it cannot be read."""
    path = run_dir / "config.resolved.yaml"
    try:
        tree = yaml.safe_load(path.read_text()) if path.is_file() else {}
        return DataConfig.model_validate((tree or {}).get("data", {}))
    except Exception:  # noqa: BLE001 - a report still draws with default scaling
        return DataConfig.model_validate({})


def _resolve_image(run_dir: Path, image: str) -> Path:
    p = Path(image)
    return p if p.is_absolute() or p.exists() else (run_dir / p if (run_dir / p).exists() else p)


def _crop(path: Path, rec: Any, data_cfg: Any) -> tuple[np.ndarray, tuple]:
    """A crop of the raster around a mined box (float RGB or gray) and the box in crop pixels.

    The row's own pixel box is used when it has one (rows of a pool in several CRSs carry their
    geometry in the bank's CRS, not the raster's); else its map box through the raster's transform.
    """
    info = open_raster(path)
    px = np.array([rec.get(c, np.nan) for c in PX_COLUMNS], dtype=np.float64)
    if np.isfinite(px).all():
        x0, y0, x1, y1 = px
    else:
        x0, y0, x1, y1 = map_to_pixel_boxes(np.array([rec.geometry.bounds]), info.transform)[0]
    side = int(max(CROP_MIN_PX, 3 * max(x1 - x0, y1 - y0)))
    col, row = int(round((x0 + x1 - side) / 2)), int(round((y0 + y1 - side) / 2))
    bands = [b for b in data_cfg.bands if b <= info.count] or list(range(1, min(3, info.count) + 1))
    cfg = data_cfg.model_copy(update={"bands": bands[:3] if len(bands) >= 3 else bands[:1]})
    with RasterReader(path, cfg) as reader:
        data, _ = reader.read(Window(col, row, side, side, side, side))
    img = np.moveaxis(data, 0, -1) if data.shape[0] == 3 else data[0]
    return img, (x0 - col, y0 - row, x1 - x0, y1 - y0)


def plot_mined_examples(run_dir: Path, mined_path: Path, out: Path) -> Path | None:
    """Grid of the highest-scoring mined negatives of a round, each box drawn on its crop.

    Returns None when the file holds no mined box. A raster that cannot be read shows a
    note in its cell instead of failing the report.
    """
    frame = gpd.read_file(mined_path)
    if len(frame) == 0:
        return None
    if "score" in frame.columns:
        frame = frame.sort_values("score", ascending=False, kind="mergesort")
    frame = frame.head(MAX_MINED_EXAMPLES)
    n = len(frame)
    cols = int(min(4, n))
    rows = int(np.ceil(n / cols))
    fig = Figure(figsize=(2.6 * cols, 2.8 * rows))
    data_cfg = _data_config(run_dir)
    for i, (_, rec) in enumerate(frame.iterrows()):
        ax = fig.add_subplot(rows, cols, i + 1)
        ax.set_axis_off()
        image = str(rec.get("image", ""))
        score = rec.get("score")
        title = Path(image).stem + (f"  {float(score):.2f}" if score is not None else "")
        ax.set_title(title, fontsize=8)
        try:
            crop, (bx, by, bw, bh) = _crop(_resolve_image(run_dir, image), rec, data_cfg)
        except (HemError, OSError) as err:
            log.warning("report: cannot draw mined example from %s: %s", image, err)
            ax.text(0.5, 0.5, "image not readable", ha="center", va="center", fontsize=8)
            continue
        ax.imshow(crop, cmap=None if crop.ndim == 3 else "gray", vmin=0, vmax=1, interpolation="nearest")
        ax.add_patch(Rectangle((bx, by), bw, bh, fill=False, edgecolor="red", linewidth=1.5))
    fig.suptitle(f"Mined negatives: {mined_path.parent.name} (top {n} by score)", fontsize=10)
    return _save(fig, out)


# ------------------------------------------------------------------------------ report


def write_report(run_dir: Path) -> Path:
    """Write ``report/report.md`` and its PNG plots for a run; returns the report path.

    Raises:
        RunError: ``run_dir`` has no readable manifest, or a metrics file is not JSON.
    """
    run_dir = Path(run_dir)
    entries = _entries(run_dir)
    metrics = {e["round"]: _metrics(run_dir, e) for e in entries}
    rows = [_row(e, metrics[e["round"]]) for e in entries]
    out = run_dir / "report"
    plots = [
        plot_pr_curves(
            {r: (m or {}).get("pr_curve") or {} for r, m in metrics.items()}, out / "pr_curves.png"
        ),
        plot_fp_ap(rows, out / "fp_ap_by_round.png"),
        plot_bank(rows, out / "bank_by_round.png"),
    ]
    for e in entries:
        mined = e.get("mined") or (f"round_{e['round']:03d}/mined.gpkg" if e["round"] > 0 else None)
        if mined and (run_dir / mined).is_file():
            png = plot_mined_examples(
                run_dir, run_dir / mined, out / f"mined_examples_round_{e['round']:03d}.png"
            )
            if png is not None:
                plots.append(png)
    manifest = _manifest(run_dir)
    lines = [
        f"# Run report: {run_dir.name}",
        "",
        f"Run directory: `{run_dir}`"
        + (f"; config: `{manifest['config']}`" if manifest.get("config") else ""),
    ]
    if manifest.get("stopped"):
        lines.append(f"Stopped early: {manifest['stopped']}")
    lines += ["", "## Rounds", "", _markdown_table(rows), ""]
    lines += [
        "FP/km² is at the operating threshold; @R0.8 / @R0.9 at the highest threshold reaching that recall.",
        "",
    ]
    lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(lines))
    return path


# ----------------------------------------------------------------------------- compare


def _run_names(run_dirs: Sequence[Path]) -> list[str]:
    names = [Path(p).name for p in run_dirs]
    if len(set(names)) < len(names):
        names = [f"{Path(p).parent.name}/{Path(p).name}" for p in run_dirs]
    return names


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    scored = [r for r in rows if r.get("ap50") is not None]
    return max(scored, key=lambda r: r["ap50"]) if scored else None


def _last(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    done = [r for r in rows if r.get("ap50") is not None or r.get("fp_per_km2") is not None]
    return done[-1] if done else None


def _summary_table(names: list[str], tables: list[list[dict[str, Any]]]) -> str:
    headers = ["run", "which", "round", "AP@0.5", "AP", "FP/km²", "FP/km²@R0.8", "bank"]
    body = []
    for name, rows in zip(names, tables, strict=True):
        for which, pick in (("last", _last), ("best", _best)):
            r = pick(rows) or {}
            body.append(
                [name, which]
                + [_fmt(r.get(k), s) for k, s in (("round", "d"), ("ap50", ".3f"), ("ap", ".3f"))]
                + [_fmt(r.get(k), s) for k, s in (("fp_per_km2", ".1f"), ("fp_per_km2_r80", ".1f"))]
                + [_fmt(r.get("bank_size"), "d")]
            )
    return _fixed_width(headers, body, left=2)


def _per_round_table(names: list[str], tables: list[list[dict[str, Any]]]) -> str:
    rounds = sorted({r["round"] for rows in tables for r in rows})
    headers = ["round"] + [f"{n} {m}" for n in names for m in ("AP@0.5", "FP/km²")]
    body = []
    for rnd in rounds:
        line = [str(rnd)]
        for rows in tables:
            r = next((x for x in rows if x["round"] == rnd), {})
            line += [_fmt(r.get("ap50"), ".3f"), _fmt(r.get("fp_per_km2"), ".1f")]
        body.append(line)
    return _fixed_width(headers, body)


def plot_compare(names: list[str], tables: list[list[dict[str, Any]]], path: Path) -> Path:
    """AP@0.5 and FP/km² per round, one line per run."""
    fig = Figure(figsize=(11, 4.5))
    panels: list[tuple[str, str, Callable[[Any], None]]] = [
        ("ap50", "held-out AP@0.5", lambda ax: ax.set_ylim(0, 1.02)),
        ("fp_per_km2", "FP per km² (operating threshold)", lambda ax: None),
    ]
    for i, (key, label, extra) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1)
        for name, rows in zip(names, tables, strict=True):
            x, y = _series(rows, key)
            if x:
                ax.plot(x, y, "o-", label=name)
        ax.set(xlabel="round", ylabel=label)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        extra(ax)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    fig.suptitle("Runs compared")
    return _save(fig, path)


#: The settings that define what a run was measured on: runs that differ in one are not comparable.
MEASURED_ON = (("data", "test"), ("data", "val"), ("data", "classes"), ("evaluate", None))


def _not_comparable(dirs: list[Path], names: list[str]) -> list[str]:
    """One line per setting of :data:`MEASURED_ON` in which the runs differ (held-out imagery, classes, metrics)."""
    trees: list[dict[str, Any] | None] = []
    for d in dirs:
        try:
            trees.append(with_defaults(yaml.safe_load((d / "config.resolved.yaml").read_text()) or {}))
        except (OSError, yaml.YAMLError):
            trees.append(None)
    lines = [f"{n}: no readable config.resolved.yaml; cannot tell what it was measured on"
             for n, t in zip(names, trees, strict=True) if t is None]
    known = [(n, t) for n, t in zip(names, trees, strict=True) if t is not None]
    for section, key in MEASURED_ON:
        values = [(n, t.get(section, {}) if key is None else t.get(section, {}).get(key)) for n, t in known]
        if any(v != values[0][1] for _, v in values[1:]):
            what = section if key is None else f"{section}.{key}"
            lines.append(f"{what} differs ({', '.join(n for n, v in values if v != values[0][1])} against "
                         f"{values[0][0]}): their figures were measured on different things")
    return lines


def compare_runs(run_dirs: list[Path], out_dir: Path | None = None) -> str:
    """Side-by-side metrics of several runs: per round, then last and best round of each.

    Runs held out on different imagery, classes or evaluation settings are named in a warning
    (and at the top of the text): their figures do not compare. With ``out_dir`` also writes
    ``compare.png`` (AP@0.5 and FP/km² per round per run) there.

    Raises:
        RunError: fewer than two runs given, or one is not a readable run directory.
    """
    if len(run_dirs) < 2:
        raise RunError(f"compare: {len(run_dirs)} run directory given, expected two or more (one run: hem report RUN)")
    dirs = [Path(p) for p in run_dirs]
    names = _run_names(dirs)
    tables = [round_table(p) for p in dirs]
    differences = _not_comparable(dirs, names) if len(dirs) > 1 else []
    for line in differences:
        log.warning("compare: %s", line)
    text = "\n\n".join(
        [
            *(["NOT COMPARABLE:\n" + "\n".join(f"  {line}" for line in differences)] if differences else []),
            "Per round (held-out):",
            _per_round_table(names, tables),
            "Last and best round (best = highest held-out AP@0.5, picked on the test scenes themselves, so "
            "optimistic; judge recipes by last):",
            _summary_table(names, tables),
        ]
    )
    if out_dir is not None:
        png = plot_compare(names, tables, Path(out_dir) / "compare.png")
        text += f"\n\nplot: {png}"
    return text
