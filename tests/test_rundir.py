"""Run directory: atomic writes, manifest steps, the lock against a second process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hem_bootstrap.config import ExperimentConfig, with_defaults
from hem_bootstrap.errors import RunError
from hem_bootstrap.files import atomic_write_json, atomic_write_text, check_output
from hem_bootstrap.loop import breaking_changes, config_diff, prepare_run
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


def test_an_output_never_replaces_a_file_of_a_run(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "x"
    (run / "round_001").mkdir(parents=True)
    (run / "exports").mkdir()
    for f in ("manifest.json", "bank.gpkg", "round_001/model.pt", "exports/neg.geojson", "mine.geojson"):
        (run / f).write_text("{}")
    for f in ("bank.gpkg", "round_001/model.pt", "manifest.json"):
        with pytest.raises(RunError, match=f"--out {run / f}: a file of the run"):
            check_output(run / f, "--out")
    for f in ("exports/neg.geojson", "mine.geojson", "round_002/model.pt"):  # the user's own exports, new files
        assert check_output(run / f, "--out") == run / f
    (tmp_path / "proj" / "sub").mkdir(parents=True)  # a manifest.json of something else two levels up
    (tmp_path / "proj" / "manifest.json").write_text("{}")
    (tmp_path / "proj" / "sub" / "d.gpkg").write_text("x")
    assert check_output(tmp_path / "proj" / "sub" / "d.gpkg", "--out")
    with pytest.raises(RunError, match="is a directory"):
        check_output(run, "--out")
    with pytest.raises(RunError, match="a file is in the way"):
        check_output(run / "mine.geojson", "synth", folder=True)


def test_a_folder_without_a_manifest_starts_a_run_unless_it_holds_results(tmp_path: Path) -> None:
    cfg = ExperimentConfig.model_validate({"rounds": {"name": "x", "out_dir": str(tmp_path)}})
    folder = tmp_path / "x"
    (folder / "round_000").mkdir(parents=True)
    (folder / "hem.log").write_text("a --log-file inside the run folder\n")
    (folder / "round_000" / "model.pt").write_bytes(b"hem train's model before the run")
    run, manifest = prepare_run(cfg, resume=False, fresh=False, force=False, config_path=None)
    assert run.path == folder and manifest["rounds"] == []
    (folder / "round_000" / "metrics.json").write_text("{}")  # a round's results: another run's leftovers
    for fresh in (False, True):
        with pytest.raises(RunError, match="holds results .* but no manifest.json"):
            prepare_run(cfg, resume=False, fresh=fresh, force=False, config_path=None)
    assert (folder / "round_000" / "model.pt").exists()  # never deleted
