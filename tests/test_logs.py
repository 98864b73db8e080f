"""Logs for batch jobs: progress lines instead of bars when stderr is not a terminal, and a log file."""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path

import pytest
from scenes import loop_config, scene_data

from hem_bootstrap.cli import main
from hem_bootstrap.logs import Progress, configure_logging, track

LINE = re.compile(r"^INFO hem_bootstrap\.progress: (?P<what>[^:]+): (?P<done>\d+)/(?P<total>\d+) (?P<unit>\w+) "
                  r"\((?P<pct>\d+)%\), [\d.]+ \w+/s, ETA (\d+ s|\?)")

pytestmark = pytest.mark.usefixtures("one_thread")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def progress_lines(text: str) -> list[re.Match[str]]:
    return [m for m in map(LINE.match, text.splitlines()) if m]


def test_without_a_terminal_a_step_logs_lines_with_count_rate_eta_and_fields(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.INFO)
    bar = Progress(4, "train", "step", every_s=0)
    for i in range(4):
        bar.update(1, loss=0.5 / (i + 1))
    bar.close()
    err = capsys.readouterr().err
    lines = progress_lines(err)
    assert [m["done"] for m in lines] == ["1", "2", "3", "4", "4"]  # one per update, and the closing one
    assert all(m["what"] == "train" and m["total"] == "4" and m["unit"] == "step" for m in lines)
    assert "loss=0.125" in err.splitlines()[-1] and re.search(r"done in \d+ s$", err.splitlines()[-1])
    assert "\r" not in err


def test_lines_come_at_the_interval_not_at_every_update(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.INFO)
    for _ in track(range(500), "detect", "tile", every_s=3600):
        pass
    lines = progress_lines(capsys.readouterr().err)
    assert [(m["done"], m["pct"]) for m in lines] == [("500", "100")]  # only the closing line within the hour


def test_at_a_terminal_a_bar_and_no_lines(monkeypatch: pytest.MonkeyPatch) -> None:
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    configure_logging(logging.INFO)
    bar = Progress(3, "train", "step", every_s=0)
    for _ in range(3):
        bar.update(1)
    bar.close()
    out = term.getvalue()
    assert "\r" in out and "train" in out and not progress_lines(out)


def test_quiet_and_disabled_show_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging(logging.WARNING)  # hem -q
    for _ in track([1, 2], "train", "step", every_s=0):
        pass
    configure_logging(logging.INFO)
    for _ in track([1, 2], "train", "step", enabled=False, every_s=0):  # another rank
        pass
    assert capsys.readouterr().err == ""


def test_hem_run_in_a_batch_log_and_its_log_file(synth_scenes: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    data = scene_data(synth_scenes)
    (tmp_path / "broken.tif").write_bytes(b"not a GeoTIFF")  # skipped with a warning the log file must keep
    data["pool"][0]["images"].append(str(tmp_path / "broken.tif"))
    cfg = loop_config(tmp_path, "logged", data, steps=8, k=5)
    log_file = tmp_path / "logs" / "hem.log"
    main(["--log-file", str(log_file), "run", str(cfg), "--set", "runtime.log_every_s=0"])
    err = capsys.readouterr().err
    assert "\r" not in err
    steps = {m["what"] for m in progress_lines(err)}
    assert {"train", "detect", "mine (match the pool)", "score (test)"} <= steps
    assert {m["total"] for m in progress_lines(err) if m["what"] == "train"} == {"8", "4"}  # round 0, fine-tune
    assert "round 1: mine done in" in err
    logged = log_file.read_text().splitlines()
    stamp = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} ")
    assert all(stamp.match(line) for line in logged)
    assert [stamp.sub("", line) for line in logged if "progress" in line] == [
        line for line in err.splitlines() if line.startswith("INFO hem_bootstrap.progress")
    ]
    assert any(stamp.sub("", line).startswith("WARNING") and "broken.tif" in line for line in logged)


def test_runtime_log_file_is_relative_to_the_config_and_rank0_only(synth_scenes: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = loop_config(tmp_path, "cfglog", scene_data(synth_scenes))
    monkeypatch.setenv("RANK", "1")
    main(["config", "validate", str(cfg), "--set", "runtime.log_file=batch.log"])
    assert not (tmp_path / "batch.log").exists()
    monkeypatch.setenv("RANK", "0")
    main(["config", "validate", str(cfg), "--set", "runtime.log_file=batch.log"])
    assert (tmp_path / "batch.log").exists()


def test_a_log_file_that_cannot_be_opened_is_a_one_line_error(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ex:
        main(["--log-file", str(tmp_path), "config", "show-defaults"])  # a directory
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: --log-file = {tmp_path}: cannot append to it") and "Traceback" not in "".join(err)


def test_the_final_error_reaches_the_log_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    log_file = tmp_path / "hem.log"
    with pytest.raises(SystemExit):
        main(["--log-file", str(log_file), "run", str(tmp_path / "missing.yaml")])
    assert capsys.readouterr().err.count("missing.yaml") == 1  # printed once on stderr, not twice
    assert re.search(r"ERROR hem_bootstrap: error: .*missing\.yaml", log_file.read_text())
