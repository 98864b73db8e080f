"""The ``hem`` command line: thin typer commands that parse, load config and call one library function.

Library errors (:class:`~hem_bootstrap.errors.HemError`) become one line on stderr and exit
code 2; ``--debug`` shows the traceback instead. Each command imports the library module it
calls inside its function, on purpose: ``hem --help``, ``hem config ...`` and a bad-input error
must not pay for importing torch, torchvision and GDAL (seconds) before they answer.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

from hem_bootstrap.config import ExperimentConfig, describe_defaults, dump_config, load_config
from hem_bootstrap.errors import ConfigError, HemError
from hem_bootstrap.files import check_output
from hem_bootstrap.logs import attach_log_file, configure_logging, log_to_files_only

app = typer.Typer(
    name="hem",
    help="Offline hard-negative mining (bootstrapping) for torchvision detectors on ortho-imagery.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
config_app = typer.Typer(help="Validate configs and list every key.", no_args_is_help=True)
bank_app = typer.Typer(help="Inspect and export a run's negative bank.", no_args_is_help=True)
review_app = typer.Typer(help="Resolve suspected missing labels held for review.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(bank_app, name="bank")
app.add_typer(review_app, name="review")

_STATE = {"debug": False}

ConfigArg = Annotated[Path, typer.Argument(help="Experiment config (YAML).", show_default=False)]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a config key: section.key=value (repeatable)."),
]
RunArg = Annotated[Path, typer.Argument(help="Run directory (runs/<name>).", show_default=False)]


@app.callback()
def _main(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="More log output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    log_file: Annotated[
        Path | None,
        typer.Option("--log-file", help="Also append the log (progress lines, warnings, errors) to this file; "
                     "rank 0 only under torchrun.", show_default=False),
    ] = None,
) -> None:
    """Offline hard-negative mining for detectors on ortho-imagery.

    Example: hem run configs/demo.yaml
    """
    level = logging.DEBUG if verbose else (logging.WARNING if quiet else logging.INFO)
    configure_logging(level, log_file)
    _STATE["debug"] = debug
    _STATE["quiet"] = quiet


def _load(config: Path, overrides: list[str] | None) -> ExperimentConfig:
    cfg = load_config(config, overrides)
    if cfg.runtime.log_file is not None:
        attach_log_file(Path(cfg.runtime.log_file), "runtime.log_file")
    return cfg


def _echo(text: str) -> None:
    """Print a command's result once: under torchrun only rank 0 prints."""
    if os.environ.get("RANK", "0") == "0":
        typer.echo(text)


# ------------------------------------------------------------------------- config


@config_app.command("validate")
def config_validate(config: ConfigArg, set_: SetOpt = None) -> None:
    """Validate a config and print it resolved (defaults filled in, paths absolute).

    Example: hem config validate configs/demo.yaml --set train.steps=100
    """
    cfg = _load(config, set_)
    _echo(dump_config(cfg).rstrip())


@config_app.command("show-defaults")
def config_show_defaults() -> None:
    """Print every config key with its default and help.

    Example: hem config show-defaults > my_experiment.yaml
    """
    _echo(describe_defaults().rstrip())


# -------------------------------------------------------------------------- synth


@app.command()
def synth(
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the scene into.")],
    size: Annotated[int, typer.Option(help="Raster width and height in pixels.", min=64, max=8192)] = 4096,
    gsd: Annotated[float, typer.Option(help="Ground sample distance, metres per pixel.", min=0.01)] = 0.125,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same scene).")] = 7,
    name: Annotated[str, typer.Option(help="Base name of the written files.")] = "scene",
    vehicles: Annotated[int | None, typer.Option(help="Number of vehicles (default: by density).")] = None,
    distractors: Annotated[int | None, typer.Option(help="Number of look-alikes (default: by density).")] = None,
    similarity: Annotated[float, typer.Option(help="How closely look-alikes resemble vehicles, 0..1.")] = 0.7,
    lookalike_share: Annotated[
        float | None, typer.Option(help="Share of 256 px windows holding look-alikes, 0..1 (default: by layout).")
    ] = None,
    epsg: Annotated[int, typer.Option(help="Projected CRS of the scene.")] = 32633,
    vehicle_classes: Annotated[bool, typer.Option(help="Label cars and vans as two classes (car, van).")] = False,
    compress: Annotated[str, typer.Option(help="GeoTIFF compression: deflate (lossless) or jpeg.")] = "deflate",
) -> None:
    """Write a synthetic ortho-scene: a GeoTIFF, vehicle labels and look-alike distractors.

    Example: hem synth scenes/ --size 4096 --gsd 0.125 --seed 7
    """
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    if not 0.0 <= similarity <= 1.0:
        raise HemError(f"--similarity {similarity}: expected a value in [0, 1]")
    spec = SceneSpec(
        size=size,
        gsd=gsd,
        seed=seed,
        n_vehicles=vehicles,
        n_distractors=distractors,
        distractor_similarity=similarity,
        lookalike_share=lookalike_share,
        epsg=epsg,
        vehicle_classes=vehicle_classes,
    )
    paths = write_scene(check_output(out_dir, "synth", folder=True), spec, name=name, compress=compress)
    for key, p in paths.items():
        _echo(f"{key}: {p}")


# ---------------------------------------------------------------------- pipeline


@app.command()
def train(
    config: ConfigArg,
    round_: Annotated[int, typer.Option("--round", help="Round whose training set to use (bank as of then).")] = 0,
    resume: Annotated[bool, typer.Option(help="Resume from the round's checkpoint.")] = False,
    force: Annotated[bool, typer.Option(help="Train a round again whose model the run already trained.")] = False,
    set_: SetOpt = None,
) -> None:
    """Train one round's detector on positives plus the run's bank negatives as of that round.

    Example: hem train configs/demo.yaml --round 1
    """
    from hem_bootstrap.commands import train_round_cli

    cfg = _load(config, set_)
    path = train_round_cli(cfg, round_idx=round_, resume=resume, force=force)
    _echo(f"model: {path}")


@app.command()
def detect(
    source: Annotated[Path, typer.Argument(
        help="A model file (a run's model.pt, or weights from `hem export-model` with their card), or an experiment "
        "config (YAML) used with --model.", show_default=False)],
    out: Annotated[Path, typer.Option(help="Output GeoPackage (.gpkg), GeoJSON (.geojson) or COCO (.json).")],
    images: Annotated[list[str] | None, typer.Argument(
        help="Rasters or glob patterns (with a config: default its pool).", show_default=False)] = None,
    model: Annotated[Path | None, typer.Option(help="With a config: the model checkpoint (model.pt).")] = None,
    images_opt: Annotated[
        list[str] | None, typer.Option("--images", help="Rasters or glob patterns, as the arguments.")
    ] = None,
    score_floor: Annotated[float | None, typer.Option(help="Drop detections below this score (model.score_floor).")] = None,
    aoi: Annotated[Path | None, typer.Option(help="Polygon file: scan only the ground it covers.")] = None,
    set_: SetOpt = None,
) -> None:
    """Run the detector over large rasters, merged across tile seams, streamed to a file.

    Examples: hem detect model.pt 'tiles/*.tif' --out d.gpkg (settings from the model's card);
    hem detect configs/demo.yaml --model runs/demo/round_001/model.pt --images 'tiles/*.tif' --out d.gpkg
    """
    from hem_bootstrap.commands import detect_cli, detect_model_cli

    rasters = [*(images or []), *(images_opt or [])] or None
    overrides = [*(set_ or []), *([f"model.score_floor={score_floor}"] if score_floor is not None else [])]
    if source.suffix.lower() in (".yaml", ".yml"):
        if model is None:
            raise ConfigError(f"hem detect {source}: a config needs --model CHECKPOINT")
        _echo(detect_cli(_load(source, overrides), model, rasters, out, aoi))
    else:
        if model is not None:
            raise ConfigError(f"hem detect {source}: --model goes with a config; {source} is the model already")
        _echo(detect_model_cli(source, rasters or [], out, overrides, aoi))


@app.command()
def evaluate(
    config: ConfigArg,
    model: Annotated[Path, typer.Option(help="Model checkpoint (model.pt).")],
    out: Annotated[Path | None, typer.Option(help="Write metrics JSON here.")] = None,
    set_: SetOpt = None,
) -> None:
    """Evaluate a model on the held-out imagery: AP, precision/recall, FP per km².

    Example: hem evaluate configs/demo.yaml --model runs/demo/round_003/model.pt
    """
    from hem_bootstrap.commands import evaluate_cli

    cfg = _load(config, set_)
    _echo(evaluate_cli(cfg, model, out))


@app.command()
def run(
    config: ConfigArg,
    resume: Annotated[bool, typer.Option(help="Continue the run from its last finished step.")] = False,
    fresh: Annotated[bool, typer.Option(help="Delete an existing run directory of this name first.")] = False,
    force: Annotated[bool, typer.Option(help="Resume even if the config changed in incompatible ways.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run the whole loop: round 0, then mine / retrain / evaluate for each round.

    Example: hem run configs/demo.yaml --set rounds.n_rounds=3
    """
    from hem_bootstrap.loop import run_experiment

    cfg = _load(config, set_)
    run_experiment(cfg, resume=resume, fresh=fresh, force=force, config_path=config)


@app.command("round")
def round_(
    config: ConfigArg,
    run_dir: Annotated[Path, typer.Option("--run", help="Run directory to add one round to.")],
    force: Annotated[bool, typer.Option(help="Continue even if the config changed in incompatible ways.")] = False,
    set_: SetOpt = None,
) -> None:
    """Run exactly one more round of an existing run.

    Example: hem round configs/demo.yaml --run runs/demo
    """
    from hem_bootstrap.loop import run_one_more_round

    cfg = _load(config, set_)
    run_one_more_round(cfg, run_dir, force=force, config_path=config)


@app.command()
def status(run_dir: RunArg) -> None:
    """Print where a run stands: rounds, steps done, bank size, skipped rasters.

    Example: hem status runs/demo
    """
    from hem_bootstrap.commands import run_status

    _echo(run_status(run_dir))


@app.command()
def report(run_dir: RunArg) -> None:
    """Write report/report.md and plots for a run.

    Example: hem report runs/demo
    """
    from hem_bootstrap.report import write_report

    path = write_report(run_dir)
    _echo(f"report: {path}")


@app.command()
def compare(
    run_dirs: Annotated[list[Path], typer.Argument(help="Two or more run directories.")],
    out: Annotated[Path | None, typer.Option(help="Folder for the comparison plot.")] = None,
) -> None:
    """Compare runs side by side (e.g. threshold vs cap vs random vs no mining).

    Example: hem compare runs/threshold runs/random --out compare/
    """
    from hem_bootstrap.report import compare_runs

    _echo(compare_runs(run_dirs, None if out is None else check_output(out, "--out", folder=True)))


@app.command("export-model")
def export_model_cmd(
    run_dir: RunArg,
    out: Annotated[Path, typer.Option(help="Weights file to write (.pth); a .json model card goes beside it.")],
    round_idx: Annotated[int | None, typer.Option("--round", help="Round (default: the last finished).")] = None,
    fmt: Annotated[str, typer.Option("--format", help="pth: weights and card; onnx: also NAME.onnx, the "
                                              "backbone and heads that model.fast_path=onnxruntime runs.")] = "pth",
) -> None:
    """Export a round's weights plus a JSON model card (and, with --format onnx, the dense part as ONNX).

    Example: hem export-model runs/demo --out vehicle_detector.pth --format onnx
    """
    from hem_bootstrap.commands import export_model_cli

    _echo(export_model_cli(run_dir, out, round_idx, fmt))


# --------------------------------------------------------------------------- bank


@bank_app.command("stats")
def bank_stats(run_dir: RunArg) -> None:
    """Counts by round and strategy, active/retired, score histogram.

    Example: hem bank stats runs/demo
    """
    from hem_bootstrap.commands import bank_stats_text

    _echo(bank_stats_text(run_dir))


@bank_app.command("export")
def bank_export(
    run_dir: RunArg,
    out: Annotated[Path, typer.Option(help="File to write.")],
    format_: Annotated[str, typer.Option("--format", help="geojson or coco.")] = "geojson",
) -> None:
    """Export the bank as GeoJSON or COCO JSON.

    Example: hem bank export runs/demo --format coco --out negatives.json
    """
    from hem_bootstrap.commands import bank_export_cli

    if format_ not in ("geojson", "coco"):
        raise HemError(f"--format {format_!r}: expected 'geojson' or 'coco'")
    _echo(bank_export_cli(run_dir, out, format_))


@review_app.command("apply")
def review_apply(
    run_dir: RunArg,
    decisions: Annotated[Path, typer.Argument(help="GeoPackage with review_id and decision (positive|negative).")],
) -> None:
    """Apply review decisions: new positives join the labels, true negatives join the bank.

    Example: hem review apply runs/demo decisions.gpkg
    """
    from hem_bootstrap.commands import review_apply_cli

    _echo(review_apply_cli(run_dir, decisions))


# --------------------------------------------------------------------------- entry


class _Terminated:
    """Set when SIGTERM (Slurm's scancel or time limit, ``kill``) stopped the command."""

    received = False


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM unwinds like Ctrl-C: ``finally`` blocks run, so no scratch file (``.OUT.PID.tmp.gpkg``) is left."""
    _Terminated.received = True
    raise KeyboardInterrupt


@contextlib.contextmanager
def _unwind_on_sigterm() -> Iterator[None]:
    """Take SIGTERM where nobody else has (``hem run`` sets its own graceful stop inside); put it back after."""
    _Terminated.received = False
    try:
        old = signal.signal(signal.SIGTERM, _on_sigterm) if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL else None
    except ValueError:  # not the main thread (main() called from a thread)
        old = None
    try:
        yield
    finally:
        if old is not None:
            signal.signal(signal.SIGTERM, old)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: run the app, turning library errors into one line and exit code 2;
    SIGTERM stops it like Ctrl-C (exit 143), removing its scratch files."""
    with _unwind_on_sigterm():
        _run_app(sys.argv[1:] if argv is None else argv)


def _run_app(args: list[str]) -> None:
    debug = "--debug" in args
    try:
        code = app(args=args, standalone_mode=False)
    except HemError as err:
        if debug:
            raise
        typer.echo(f"error: {err}", err=True)
        log_to_files_only(f"error: {err}")
        sys.exit(2)
    except KeyboardInterrupt:
        _interrupted(args)
    except typer.Exit as ex:
        sys.exit(ex.exit_code)
    except typer.Abort:
        typer.echo("aborted", err=True)
        sys.exit(1)
    except Exception as err:  # usage errors from typer's click layer: one line, as every other error
        message = getattr(err, "format_message", None)
        if callable(message) and hasattr(err, "exit_code"):
            ctx = getattr(err, "ctx", None)
            where = ctx.command_path if ctx is not None else "hem"
            typer.echo(f"error: {where}: {message()} (see '{where} --help')", err=True)
            sys.exit(2)
        raise
    # without standalone mode, typer turns Ctrl-C (KeyboardInterrupt) and typer.Exit into a return value
    if code == 130:
        _interrupted(args)
    if isinstance(code, int) and code:
        sys.exit(code)
    from hem_bootstrap.distributed import shutdown_distributed

    shutdown_distributed()  # under torchrun: leave the process group before the interpreter tears down


def _interrupted(args: list[str]) -> None:
    what = "terminated (SIGTERM)" if _Terminated.received else "interrupted"
    hint = "; a run continues from its last finished step with: hem run CONFIG --resume" if "run" in args else ""
    typer.echo(what + hint, err=True)
    sys.exit(143 if _Terminated.received else 130)


if __name__ == "__main__":
    main()
