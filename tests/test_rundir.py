"""Run directory: atomic writes, manifest steps, the lock against a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hem_bootstrap.config import ExperimentConfig
from hem_bootstrap.errors import RunError
from hem_bootstrap.files import atomic_write_json, atomic_write_text
from hem_bootstrap.loop import breaking_changes, config_diff, with_defaults
from hem_bootstrap.rundir import RunDir


def test_atomic_write_keeps_old_file_on_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "m.json"
    atomic_write_json(target, {"a": 1})

    def boom(src: str, dst: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(RunError, match="No space left on device.*previous version is intact"):
        atomic_write_text(target, "garbage")
    assert json.loads(target.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["m.json"]  # no temp file left behind


def test_manifest_steps(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    m = run.load_manifest()
    entry = RunDir.round_entry(m, 1)
    entry["steps"]["detect"] = {"tiles": 3}
    RunDir.round_entry(m, 0)["steps"]["train"] = {}
    run.save_manifest(m)
    back = run.load_manifest()
    assert [e["round"] for e in back["rounds"]] == [0, 1]
    assert set(RunDir.round_entry(back, 1)["steps"]) == {"detect"}


def test_lock_names_holder(tmp_path: Path) -> None:
    path = tmp_path / "run"
    code = (
        "import sys, time; from hem_bootstrap.rundir import RunDir; r = RunDir(sys.argv[1]); r.acquire();"
        "print('locked', flush=True); time.sleep(30)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(path)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunError, match=f"in use by pid {proc.pid}"):
            RunDir(path).acquire()
    finally:
        proc.kill()
        proc.wait()
    # a killed holder releases the lock
    run = RunDir(path)
    run.acquire()
    run.release()


def test_a_run_saved_before_newer_settings_existed_resumes() -> None:
    new = ExperimentConfig.model_validate({"data": {"test": [{"images": ["t.tif"]}]}}).model_dump(mode="json")
    old = json.loads(json.dumps(new))
    for key in ("gsd", "resampling"):
        del old["data"][key]  # written by a version without them
    del old["data"]["test"][0]["aoi"], old["data"]["test"][0]["mosaic"], old["runtime"]["gdal"]
    assert breaking_changes(old, new)  # compared raw, the new keys look like changes
    assert breaking_changes(with_defaults(old), new) == []
    assert with_defaults({"data": {"nonsense": 1}}) == {"data": {"nonsense": 1}}
    # model.width's default grew from 1 to 1.5: a run saved without the key was a width-1 model, so resuming it
    # under the new default is a change to refuse, not a silent rebuild that its weights would not fit
    del old["model"]["width"]
    assert breaking_changes(with_defaults(old), new) == ["model.width"]
    assert with_defaults(old)["model"]["width"] == 1.0


def test_config_diff_and_breaking() -> None:
    old = {"data": {"bands": [1, 2, 3]}, "rounds": {"n_rounds": 3}, "runtime": {"workers": 2, "seed": 0}}
    new = {"data": {"bands": [1, 2, 4]}, "rounds": {"n_rounds": 5}, "runtime": {"workers": 0, "seed": 1}}
    assert config_diff(old, new) == ["data.bands", "rounds.n_rounds", "runtime.seed", "runtime.workers"]
    assert breaking_changes(old, new) == ["data.bands", "runtime.seed"]
