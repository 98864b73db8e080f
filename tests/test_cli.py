"""CLI: help texts, one-line errors with exit code 2, no tracebacks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from hem_bootstrap.cli import app, main

runner = CliRunner()

COMMANDS = ["synth", "train", "detect", "evaluate", "run", "round", "status", "report", "compare", "export-model"]


def test_help_lists_commands() -> None:
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in COMMANDS + ["config", "bank", "review"]:
        assert cmd in result.output


@pytest.mark.parametrize("cmd", COMMANDS + ["config validate", "bank stats", "bank export", "review apply"])
def test_each_command_has_help_with_example(cmd: str) -> None:
    result = runner.invoke(app, [*cmd.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "Example" in result.output


def test_bad_config_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling:\n  tile_sise: 128\n")
    with pytest.raises(SystemExit) as exc:
        main(["config", "validate", str(bad)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "unknown key 'tile_sise'" in err and "tile_size" in err


def test_bad_config_via_subprocess_has_no_traceback(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "hem_bootstrap.cli", "config", "validate", str(bad)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "train.lr = -1" in proc.stderr


def test_config_validate_prints_resolved(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("tiling:\n  tile_size: 128\n")
    result = runner.invoke(app, ["config", "validate", str(good), "--set", "train.steps=7"])
    assert result.exit_code == 0, result.output
    assert "tile_size: 128" in result.output and "steps: 7" in result.output


def test_show_defaults() -> None:
    result = runner.invoke(app, ["config", "show-defaults"])
    assert result.exit_code == 0
    assert "tile_size: 256" in result.output


def test_usage_error_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["status"])
    assert exc.value.code == 2
