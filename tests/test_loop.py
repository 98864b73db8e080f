"""The multi-round loop end to end on small synthetic scenes: run, table, status, resume, lock."""

from __future__ import annotations

import json
from pathlib import Path

import geopandas as gpd
import pandas as pd
import pytest
import yaml
from scenes import scene_data

from hem_bootstrap.commands import run_status
from hem_bootstrap.config import load_config
from hem_bootstrap.errors import RunError
from hem_bootstrap.loop import run_experiment
from hem_bootstrap.report import COLUMNS


@pytest.fixture(scope="module")
def scenes(synth_scenes: Path) -> Path:
    return synth_scenes


def small_config(scenes: Path, tmp_path: Path, name: str = "t", **over: object) -> Path:
    tree = {
        "data": scene_data(scenes),
        "tiling": {"tile_size": 256, "overlap": 32},
        "train": {"steps": 12, "finetune_steps": 6, "batch_size": 4, "background_chips": 4, "warmup_steps": 2,
                  "checkpoint_every": 4},
        "mining": {"strategies": [{"name": "per_image_cap", "k": 20}], "review_above": 0.99},
        "model": {"score_floor": 0.01},
        "rounds": {"name": name, "out_dir": str(tmp_path / "runs"), "n_rounds": 2, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": 3},
    }
    for key, value in over.items():
        section, field = key.split("__")
        tree.setdefault(section, {})[field] = value
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def _bank(run: Path) -> pd.DataFrame:
    frame = gpd.read_file(run / "bank.gpkg", layer="negatives")
    return pd.DataFrame(frame.drop(columns="geometry")).reset_index(drop=True)


def _printed_table(out: str) -> tuple[list[str], list[dict[str, str]]]:
    """The round table in printed output: its lines, and its body rows keyed by report column."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["round", "bank"])
    assert set(lines[start + 1].replace(" ", "")) == {"-"}
    end = next((i for i in range(start + 2, len(lines)) if not lines[i].strip()), len(lines))
    keys = [key for key, _, short, _ in COLUMNS if short is not None]
    rows = [dict(zip(keys, line.split(), strict=True)) for line in lines[start + 2 : end]]
    return lines[start:end], rows


def test_two_round_run_resume_and_lock(scenes: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = small_config(scenes, tmp_path, name="full")
    cfg = load_config(cfg_path)
    run = run_experiment(cfg, config_path=cfg_path)
    out = capsys.readouterr().out
    manifest = json.loads((run / "manifest.json").read_text())
    entries = {e["round"]: e for e in manifest["rounds"]}
    lines, rows = _printed_table(out)
    assert "\n".join(lines) == (run / "table.txt").read_text().rstrip("\n")
    assert [row["round"] for row in rows] == ["0", "1", "2"]  # one line per round, in order
    for row in rows:
        r = int(row["round"])
        assert row["bank_size"] == str(entries[r]["bank_size"])
        assert row["new_negatives"] == str(entries[r]["new_negatives"])
        ap50 = json.loads((run / f"round_{r:03d}" / "metrics.json").read_text())["ap50"]
        assert row["ap50"] == ("-" if ap50 is None else f"{ap50:.3f}")
    assert rows[0]["bank_size"] == "0" and int(rows[1]["bank_size"]) > 0
    for r in (0, 1, 2):
        assert (run / f"round_{r:03d}" / "model.pt").is_file()
        assert (run / f"round_{r:03d}" / "metrics.json").is_file()
    assert (run / "round_001" / "mined.gpkg").is_file()
    bank = _bank(run)
    assert len(bank) > 0
    assert bank["neg_id"].is_unique
    assert "round 2: done detect,mine,train,evaluate" in run_status(run)

    # the same run again without --resume is refused, naming the way out
    with pytest.raises(RunError, match="--resume"):
        run_experiment(load_config(cfg_path), config_path=cfg_path)

    # an interrupted run (stopped after round 1's mining) resumes to the same bank, row for row
    import hem_bootstrap.loop as loop

    cfg2_path = small_config(scenes, tmp_path, name="cut")
    real_train = loop.step_train

    def crash(ctx, r, resume=False):  # noqa: ANN001, ANN202
        if r == 1:
            raise KeyboardInterrupt
        return real_train(ctx, r, resume)

    monkeypatch.setattr(loop, "step_train", crash)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(load_config(cfg2_path), config_path=cfg2_path)
    monkeypatch.setattr(loop, "step_train", real_train)
    cut_run = tmp_path / "runs" / "cut"
    assert "pending train,evaluate" in run_status(cut_run)

    # a changed config that matters is refused on resume unless forced
    with pytest.raises(RunError, match="train.steps"):
        run_experiment(load_config(cfg2_path, ["train.steps=13"]), resume=True)
    run_experiment(load_config(cfg2_path), resume=True, config_path=cfg2_path)
    pd.testing.assert_frame_equal(_bank(run), _bank(cut_run))


@pytest.mark.slow  # a whole loop, 20-30 s on a slow CPU: run by .ci/run's second stage
def test_random_baseline_adds_as_many_as_the_strategy_would_newly_bank(scenes: Path, tmp_path: Path) -> None:
    """A random run mines one random window per FP that a mining run would add as a *new* row.

    Its shadow bank holds the strategy's own selections; FPs found again in round 2 only update
    shadow rows, so they do not buy random windows (the budget is new rows, not selections).
    """
    import json

    cfg_path = small_config(scenes, tmp_path, name="rnd",
                            mining__strategies=[{"name": "per_image_cap", "k": 20}, {"name": "random"}])
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    manifest = json.loads((run / "manifest.json").read_text())
    mine = {e["round"]: e["steps"]["mine"] for e in manifest["rounds"] if e["round"] > 0}
    shadow = {r: gpd.read_file(run / f"round_{r:03d}" / "shadow_bank.gpkg", layer="negatives") for r in (1, 2)}
    assert mine[1]["shadow_new"] == len(shadow[1]) > 0
    assert len(shadow[2]) == len(shadow[1]) + mine[2]["shadow_new"]
    assert mine[2]["shadow_new"] <= mine[2]["strategy_selected"]
    for r in (1, 2):
        mined = gpd.read_file(run / f"round_{r:03d}" / "mined.gpkg")
        assert len(mined) == mine[r]["shadow_new"] == mine[r]["selected"]
    # the random bank never holds the strategy's FPs: none of its boxes is a shadow box
    bank = _bank(run)
    assert len(bank) <= mine[1]["shadow_new"] + mine[2]["shadow_new"]
    shadow_boxes = set(map(tuple, shadow[2][["image", "px_xmin", "px_ymin"]].to_numpy().tolist()))
    assert not shadow_boxes & set(map(tuple, bank[["image", "px_xmin", "px_ymin"]].to_numpy().tolist()))


@pytest.mark.slow  # a whole loop, about 20 s: run by .ci/run's second stage
def test_training_switches_reach_the_batches(scenes: Path, tmp_path: Path) -> None:
    """Bank chips on top of the batch, background from the pool, the fine-tuning learning rate, a bank loss weight."""
    cfg_path = small_config(scenes, tmp_path, name="mix", rounds__n_rounds=1, train__bank_chips=2,
                            train__pool_background_chips=3, train__finetune_lr=0.0002, train__bank_loss_weight=0.5)
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    manifest = json.loads((run / "manifest.json").read_text())
    train0, train1 = (e["steps"]["train"] for e in manifest["rounds"])
    n_pool = len(scene_data(scenes)["pool"])
    assert train0["chips"]["bg"] == train1["chips"]["bg"] == 4 * len(scene_data(scenes)["train"]) + 3 * n_pool
    assert train0["batch"] == {"positives": 2, "background": 2, "bank": 0} and train0["lr"] == 0.001
    assert train1["chips"]["neg"] > 0 and train1["lr"] == 0.0002
    assert train1["batch"] == {"positives": 2, "background": 2, "bank": 2}  # the bank on top of batch_size 4


@pytest.mark.slow  # about 1 minute on an AVX2-only 2-core CPU: pytest -m slow
def test_fixed_random_count_and_no_mining_skips_the_pool_scan(scenes: Path, tmp_path: Path) -> None:
    """``random`` with ``k`` adds exactly k random windows a round; a no-mining control scans no pool."""
    cfg_path = small_config(scenes, tmp_path, name="dense", mining__strategies=[{"name": "random", "k": 7}],
                            bank__refresh=False)
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    manifest = json.loads((run / "manifest.json").read_text())
    mine = {e["round"]: e["steps"]["mine"] for e in manifest["rounds"] if e["round"] > 0}
    assert [mine[r]["new_negatives"] for r in (1, 2)] == [7, 7] and mine[1]["random_k"] == 7
    assert len(_bank(run)) == 14 and _bank(run)["score"].isna().all()

    cfg_path = small_config(scenes, tmp_path, name="none", mining__strategies=[{"name": "none"}])
    run = run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)
    manifest = json.loads((run / "manifest.json").read_text())
    for e in manifest["rounds"][1:]:
        assert e["steps"]["detect"]["tiles"] == 0 and "skipped" in e["steps"]["detect"]
        assert e["steps"]["mine"]["new_negatives"] == 0
    assert "evaluate" in manifest["rounds"][-1]["steps"]


@pytest.mark.slow  # a whole loop, 20-30 s on a slow CPU: run by .ci/run's second stage
def test_each_raster_header_is_read_and_labels_parsed_once_per_run(
    scenes: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Preflight opens every header and parses every label file once; all rounds' steps reuse them."""
    from collections import Counter

    import hem_bootstrap.geo.raster as raster
    import hem_bootstrap.inputs as inputs

    headers: Counter[str] = Counter()
    labels: Counter[str] = Counter()
    real_describe, real_load = raster._describe, inputs.load_labels

    def describe(p, src):  # noqa: ANN001, ANN202
        headers[Path(p).name] += 1
        return real_describe(p, src)

    def load(path, info, *a, **k):  # noqa: ANN001, ANN002, ANN003, ANN202
        labels[Path(path).name] += 1
        return real_load(path, info, *a, **k)

    monkeypatch.setattr(raster, "_describe", describe)
    monkeypatch.setattr(inputs, "load_labels", load)
    cfg_path = small_config(scenes, tmp_path, name="once")
    run_experiment(load_config(cfg_path), config_path=cfg_path, print_table=False)  # rounds 0, 1, 2
    assert headers == {"train.tif": 1, "pool.tif": 1, "test.tif": 1}, headers
    assert labels == {"train_labels.gpkg": 1, "pool_labels.gpkg": 1, "test_labels.gpkg": 1}, labels
