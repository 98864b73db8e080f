"""The bad-input matrix (README section "Bad inputs"): every row goes through the CLI.

A bad input must give exit code 2 and ONE line on stderr naming the file, field or value, and
no traceback. Inputs that are fine (16-bit, 4-band, smaller than a tile, all nodata, plain
images) must run, and the row says what happens to them.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import geopandas as gpd
import numpy as np
import pandas as pd
import pytest
import rasterio
import shapely
import yaml

from hem_bootstrap.cli import main
from hem_bootstrap.rundir import RunDir

Hem = Callable[..., tuple[int, str, str]]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Synthetic train/pool/test scenes plus variants of the pool raster (fine and broken)."""
    from hem_bootstrap.data.synth import SceneSpec, write_scene

    root = tmp_path_factory.mktemp("bad_inputs")
    for name, seed in (("train", 101), ("pool", 102), ("test", 103)):
        write_scene(root, SceneSpec(size=512, gsd=0.15, seed=seed), name=name)
    with rasterio.open(root / "pool.tif") as src:
        prof, rgb = src.profile, src.read()
    tr = prof["transform"]

    def write(name: str, data: np.ndarray, **over: Any) -> Path:
        p = dict(prof, count=data.shape[0], dtype=str(data.dtype), width=data.shape[2], height=data.shape[1])
        p.update(over)
        with rasterio.open(root / name, "w", **p) as dst:
            dst.write(data)
        return root / name

    write("pool16.tif", rgb.astype(np.uint16) * 257)
    nir = (rgb.mean(axis=0, keepdims=True)).astype(np.uint8)
    write("pool4.tif", np.concatenate([rgb, nir]))
    write("small.tif", rgb[:, :160, :200].copy())
    write("nodata.tif", np.zeros_like(rgb), nodata=0)
    # a tiled file cut short: the header opens, the later blocks fail mid-scan
    trunc = write("truncated.tif", rgb, tiled=True, blockxsize=128, blockysize=128, compress="deflate")
    with open(trunc, "r+b") as fh:
        fh.truncate(int(trunc.stat().st_size * 0.6))
    (root / "garbage.tif").write_bytes(b"II*\x00 this is not a GeoTIFF" * 20)
    (root / "notes.txt").write_text("not a vector file\n")
    with rasterio.open(root / "plain.png", "w", driver="PNG", width=512, height=512, count=3, dtype="uint8") as d:
        d.write(rgb)
    # pixel-CSV labels for the plain image, from the georeferenced pool labels
    labels = gpd.read_file(root / "pool_labels.gpkg")
    b = labels.geometry.bounds.to_numpy()
    x0, x1 = (b[:, 0] - tr.c) / tr.a, (b[:, 2] - tr.c) / tr.a  # north-up: rows grow southwards
    y0, y1 = (b[:, 3] - tr.f) / tr.e, (b[:, 1] - tr.f) / tr.e
    pd.DataFrame({"image": "plain.png", "xmin": x0, "ymin": y0, "xmax": x1, "ymax": y1, "label": "vehicle"}).to_csv(
        root / "plain.csv", index=False
    )
    return root


@pytest.fixture
def hem(capsys: pytest.CaptureFixture[str]) -> Hem:
    """Run ``hem ARGS`` in-process; return (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main(["-q", *args])
            code = 0
        except SystemExit as ex:
            code = int(ex.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def iset(scenes: Path, name: str, **over: Any) -> dict[str, Any]:
    s = {"images": [str(scenes / f"{name}.tif")], "labels": str(scenes / f"{name}_labels.gpkg")}
    s.update(over)
    return s


def write_config(scenes: Path, folder: Path, name: str = "bad", **sections: dict[str, Any]) -> Path:
    """A tiny one-round config; ``sections`` replace keys section by section."""
    tree: dict[str, Any] = {
        "data": {"train": [iset(scenes, "train")], "pool": [iset(scenes, "pool")], "test": [iset(scenes, "test")]},
        "tiling": {"tile_size": 256, "overlap": 0},
        "train": {"steps": 2, "finetune_steps": 1, "batch_size": 2, "background_chips": 2, "warmup_steps": 0},
        "mining": {"strategies": [{"name": "per_image_cap", "k": 10}], "review_above": 0.99},
        "model": {"score_floor": 0.01},
        "rounds": {"name": name, "out_dir": str(folder / "runs"), "n_rounds": 1, "stop_if_no_new": False},
        "runtime": {"workers": 0, "batch_size": 4, "seed": 1, "threads": 1, "device": "cpu"},
    }
    for section, values in sections.items():
        tree.setdefault(section, {}).update(values)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def one_line_error(result: tuple[int, str, str], *needles: str, warnings_ok: bool = False) -> str:
    """Exit 2, exactly one non-empty stderr line, no traceback, naming every needle.

    ``warnings_ok`` lets logged WARNING lines precede it (a hint the user should see anyway).
    """
    code, _, err = result
    lines = [ln for ln in err.splitlines() if ln.strip() and not (warnings_ok and ln.startswith("WARNING"))]
    assert code == 2, err
    assert "Traceback" not in err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_labels(path: Path, geoms: list[Any], classes: list[str], crs: str | None = "EPSG:32633") -> Path:
    gpd.GeoDataFrame({"class": classes}, geometry=geoms, crs=crs).to_file(path)
    return path


# --------------------------------------------------------------------------- config


CONFIG_CASES = [
    ("typo", "tiling:\n  tile_sise: 128\n", ["unknown key 'tile_sise'", "did you mean 'tile_size'"]),
    ("unknown section", "trian:\n  steps: 3\n", ["unknown key 'trian'", "train"]),
    ("wrong type", "train:\n  steps: many\n", ["train.steps", "'many'"]),
    ("negative", "train:\n  lr: -1\n", ["train.lr = -1", "greater than 0"]),
    ("absurd tile", "tiling:\n  tile_size: 100000\n", ["tiling.tile_size = 100000", "4096"]),
    ("overlap >= tile", "tiling:\n  tile_size: 64\n  overlap: 64\n", ["overlap (64", "tile_size (64)"]),
    ("zero batch", "runtime:\n  batch_size: 0\n", ["runtime.batch_size = 0"]),
    ("fraction > 1", "train:\n  neg_fraction: 1.5\n", ["train.neg_fraction = 1.5"]),
    ("band 0", "data:\n  bands: [0, 1, 2]\n", ["data.bands", "1-based"]),
    ("unknown strategy", "mining:\n  strategies: [{name: best}]\n", ["mining.strategies.0.name", "'best'"]),
    ("strategy missing param", "mining:\n  strategies: [{name: threshold}]\n", ["needs threshold"]),
    ("bad YAML", "train: [steps: 3\n", ["not valid YAML at line"]),
    ("key twice", "train:\n  steps: 3\ntrain:\n  lr: 0.1\n", ["at line 3: key 'train' appears twice"]),
    ("not a mapping", "- train\n- test\n", ["expected a mapping of sections, got list"]),
    ("on_bad_raster value", "data:\n  on_bad_raster: ignore\n", ["data.on_bad_raster", "'ignore'"]),
    # rounds.name is a folder --fresh deletes: never the out_dir itself or somewhere else
    ("empty run name", "rounds:\n  name: ''\n", ["rounds.name = ''", "plain folder name"]),
    ("run name with a path", "rounds:\n  name: ../elsewhere\n", ["rounds.name = '../elsewhere'"]),
    ("a class twice", "data:\n  classes: [car, car]\n", ["data.classes", "distinct"]),
    ("percentiles reversed", "data:\n  percentiles: [98, 2]\n", ["data.percentiles", "low < high"]),
    ("no anchor size", "model:\n  anchor_sizes: []\n", ["model.anchor_sizes", ">= 1 px"]),
    ("recall above 1", "evaluate:\n  fixed_recalls: [2]\n", ["evaluate.fixed_recalls", "(0, 1]"]),
    ("infinite lr", "train:\n  lr: .inf\n", ["train.lr", "finite"]),
]


@pytest.mark.parametrize(("case", "text", "needles"), CONFIG_CASES, ids=[c[0] for c in CONFIG_CASES])
def test_config_errors(case: str, text: str, needles: list[str], tmp_path: Path, hem: Hem) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    line = one_line_error(hem("config", "validate", str(path)), *needles)
    assert str(path) in line


def test_missing_config_file(tmp_path: Path, hem: Hem) -> None:
    one_line_error(hem("run", str(tmp_path / "nope.yaml")), "nope.yaml: config file not found")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00t")
    one_line_error(hem("config", "validate", str(tmp_path / "bin.yaml")), "bin.yaml: not a UTF-8 text file")


def test_bad_override(tmp_path: Path, hem: Hem) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    one_line_error(hem("config", "validate", str(path), "--set", "train.steps"), "--set 'train.steps'", "key=value")
    one_line_error(hem("config", "validate", str(path), "--set", "train.stepz=3"), "unknown key 'stepz'")


# --------------------------------------------------------------------------- data, found before anything runs


def test_image_glob_matches_nothing(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"pool": [{"images": [str(scenes / "nothing_*.tif")]}]})
    one_line_error(hem("run", str(cfg)), "data.pool: no raster matches", "nothing_*.tif")
    assert not (tmp_path / "runs" / "bad").exists()  # nothing was created


def test_missing_image(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "missing")]})
    one_line_error(hem("run", str(cfg)), "missing.tif: raster not found")


def test_missing_label_file(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(scenes / "gone.gpkg"))]})
    one_line_error(hem("run", str(cfg)), "gone.gpkg: label file not found")


def test_missing_distractor_file(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"test": [iset(scenes, "test", distractors=str(scenes / "d.gpkg"))]})
    one_line_error(hem("run", str(cfg)), "d.gpkg: file not found")


def test_label_file_not_a_vector(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(scenes / "notes.txt"))]})
    one_line_error(hem("run", str(cfg)), "notes.txt: not a readable vector file")


def test_duplicate_image_across_sets(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    # twice in one set's list is merged silently (ImageSet.resolved_images); in two sets it is an error
    cfg = write_config(scenes, tmp_path, data={"pool": [iset(scenes, "pool"), iset(scenes, "pool")]})
    one_line_error(hem("run", str(cfg)), "data.pool: image", "pool.tif is listed twice")


def test_held_out_image_also_mined(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"test": [iset(scenes, "pool")]})
    one_line_error(hem("run", str(cfg)), "data.test: image", "pool.tif is also in data.pool")


def test_crs_mismatch_without_crs(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    labels = gpd.read_file(scenes / "train_labels.gpkg")
    path = tmp_path / "nocrs.gpkg"
    write_labels(path, list(labels.geometry), list(labels["class"]), crs=None)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "nocrs.gpkg: label file has no CRS", "train.tif")


def test_geojson_with_projected_coordinates(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    # GeoJSON is lon/lat by definition: UTM metres in it cannot be reprojected
    labels = gpd.read_file(scenes / "train_labels.gpkg")
    path = tmp_path / "utm.geojson"
    write_labels(path, list(labels.geometry), list(labels["class"]), crs=None)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "utm.geojson: coordinates", "are not valid in the file's CRS EPSG:4326")


def test_crs_mixup_labels_elsewhere(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    # UTM numbers written as if they were in another UTM zone land ~600 km away
    labels = gpd.read_file(scenes / "train_labels.gpkg").set_crs("EPSG:32631", allow_override=True)
    path = tmp_path / "zone31.gpkg"
    labels.to_file(path)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "zone31.gpkg: labels do not overlap the raster train.tif")


def test_labels_outside_the_raster(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    far = [shapely.box(600_000 + i * 10, 5_400_000, 600_004 + i * 10, 5_400_004) for i in range(3)]
    path = write_labels(tmp_path / "far.gpkg", far, ["vehicle"] * 3)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "far.gpkg: labels do not overlap", "raster bounds")


def test_unknown_class(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    labels = gpd.read_file(scenes / "train_labels.gpkg")
    labels.loc[0, "class"] = "truck"
    path = tmp_path / "truck.gpkg"
    labels.to_file(path)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "truck.gpkg: unknown class 'truck'", "['vehicle']")


def test_label_without_class_value(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    labels = gpd.read_file(scenes / "train_labels.gpkg")
    labels.loc[[0, 1], "class"] = None
    path = tmp_path / "noclass.gpkg"
    labels.to_file(path)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "noclass.gpkg: 2 label(s) have no value in 'class'", "['vehicle']")


def test_label_variants_that_run(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    """Another CRS, labels partly off the raster, empty/zero-area geometries, an empty test file: all run."""
    labels = gpd.read_file(scenes / "train_labels.gpkg")
    n = len(labels)
    extra = gpd.GeoDataFrame(
        {"class": ["vehicle"] * 3},
        geometry=[shapely.Polygon(), shapely.box(500_010, 5_399_950, 500_010, 5_399_960),  # empty, zero width
                  shapely.box(700_000, 5_000_000, 700_004, 5_000_004)],  # far off the raster
        crs=labels.crs,
    )
    mixed = gpd.GeoDataFrame(pd.concat([labels, extra], ignore_index=True), crs=labels.crs).to_crs("EPSG:3857")
    train_labels = tmp_path / "web_mercator.gpkg"
    mixed.to_file(train_labels)
    empty = write_labels(tmp_path / "empty.gpkg", [], [])
    cfg = write_config(scenes, tmp_path, name="variants", rounds={"n_rounds": 0}, data={
        "train": [iset(scenes, "train", labels=str(train_labels))], "pool": [],
        "test": [iset(scenes, "test", labels=str(empty))]})
    code, _, err = hem("run", str(cfg))
    assert code == 0, err
    assert "label(s) with empty geometry ignored" in err and "without area" in err
    run = tmp_path / "runs" / "variants"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["rounds"][0]["steps"]["train"]["chips"]["pos"] > 0
    metrics = json.loads((run / "round_000" / "metrics.json").read_text())
    assert metrics["n_gt"] == 0  # an empty held-out label file: a scene without objects
    from hem_bootstrap.config import DataConfig
    from hem_bootstrap.geo.labels import load_labels
    from hem_bootstrap.geo.raster import open_raster

    loaded = load_labels(train_labels, open_raster(scenes / "train.tif"), DataConfig())
    assert len(loaded) == n and loaded.crs == labels.crs  # reprojected back; the 3 bad rows dropped


def test_mixed_geometry_types(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    geoms = [shapely.box(500_010, 5_399_950, 500_012, 5_399_952), shapely.LineString([(500_020, 5_399_950),
                                                                                   (500_030, 5_399_960)])]
    path = write_labels(tmp_path / "mixed.gpkg", geoms, ["vehicle"] * 2)
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "mixed.gpkg: unsupported geometry type(s)", "LineString")


def test_band_that_does_not_exist(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"bands": [1, 2, 5]})
    one_line_error(hem("run", str(cfg)), "train.tif: data.bands asks for band 5", "3 band(s)")


def test_corrupt_training_raster(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"train": [{"images": [str(scenes / "garbage.tif")]}]})
    one_line_error(hem("run", str(cfg)), "garbage.tif: not a readable raster")


def test_corrupt_pool_raster_with_fail(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    pool = iset(scenes, "pool")
    pool["images"].append(str(scenes / "garbage.tif"))
    cfg = write_config(scenes, tmp_path, data={"pool": [pool], "on_bad_raster": "fail"})
    one_line_error(hem("run", str(cfg)), "garbage.tif: not a readable raster")


def test_pool_path_typo_is_an_error_even_with_skip(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    """``on_bad_raster: skip`` is for rasters that exist but fail to read; a typo fails before anything runs."""
    pool = iset(scenes, "pool")
    pool["images"].append(str(scenes / "pool_2O24.tif"))
    cfg = write_config(scenes, tmp_path, data={"pool": [pool], "on_bad_raster": "skip"})
    one_line_error(hem("run", str(cfg)), "pool_2O24.tif: raster not found", "data.pool")
    assert not (tmp_path / "runs" / "bad").exists()


def test_pool_set_with_no_readable_raster(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    pool = {"images": [str(scenes / "garbage.tif")], "labels": str(scenes / "pool_labels.gpkg")}
    cfg = write_config(scenes, tmp_path, data={"pool": [iset(scenes, "pool"), pool], "on_bad_raster": "skip"})
    one_line_error(hem("run", str(cfg)), "data.pool[1]: no readable raster", "garbage.tif")
    assert not (tmp_path / "runs" / "bad").exists()
    test = {"images": [str(scenes / "garbage.tif")], "labels": str(scenes / "test_labels.gpkg")}
    cfg = write_config(scenes, tmp_path, name="t", data={"test": [test], "on_bad_raster": "skip"})
    one_line_error(hem("run", str(cfg)), "data.test[0]: no readable raster")


def test_plain_image_with_georeferenced_labels(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, data={"train": [{"images": [str(scenes / "plain.png")],
                                                          "labels": str(scenes / "pool_labels.gpkg")}]})
    code, out, err = hem("run", str(cfg))
    assert "plain.png: no georeferencing; working in pixel space" in err  # the once-per-raster warning
    one_line_error((code, out, err), "pool_labels.gpkg: label file is in EPSG:32633", "plain.png has no georeferencing",
                   warnings_ok=True)


def test_missing_weights_file(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, model={"weights": str(tmp_path / "coco.pth")})
    one_line_error(hem("run", str(cfg)), "model.weights", "coco.pth not found")


def test_wrong_weights_file(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    import torch

    wrong = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3, 3)}, wrong)
    cfg = write_config(scenes, tmp_path, model={"weights": str(wrong)})
    one_line_error(hem("run", str(cfg)), "other.pth")
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a torch file")
    cfg = write_config(scenes, tmp_path, name="junk", model={"weights": str(junk)})
    for _ in range(2):  # the same error again: no half-made run directory hides it behind "a run exists"
        one_line_error(hem("run", str(cfg)), "junk.pth")
    assert not (tmp_path / "runs").exists()  # found before anything was written


def test_option_the_arch_cannot_take(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, model={"arch": "small_frcnn"}, train={"bank_loss_weight": 0.5})
    one_line_error(hem("run", str(cfg)), "train.bank_loss_weight = 0.5", "FasterRCNN")
    assert not (tmp_path / "runs").exists()


def test_empty_training_labels(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    path = write_labels(tmp_path / "empty.gpkg", [], [])
    cfg = write_config(scenes, tmp_path, data={"train": [iset(scenes, "train", labels=str(path))]})
    one_line_error(hem("run", str(cfg)), "empty.gpkg", "no object of data.classes ['vehicle']")
    assert not (tmp_path / "runs").exists()


def test_a_class_without_training_labels_is_a_warning(scenes: Path, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    from hem_bootstrap.config import load_config
    from hem_bootstrap.inputs import check_inputs

    cfg = load_config(write_config(scenes, tmp_path, data={"classes": ["vehicle", "van"]}))
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        check_inputs(cfg, ("train",))
    assert "no training label of class 'van'" in caplog.text


def test_labels_on_no_data_pixels_are_a_warning(scenes: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from hem_bootstrap.config import load_config
    from hem_bootstrap.inputs import check_inputs

    blank = {"images": [str(scenes / "nodata.tif")], "labels": str(scenes / "pool_labels.gpkg")}  # all no-data
    cfg = load_config(write_config(scenes, tmp_path, data={"test": [blank]}))
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        check_inputs(cfg, ("test",))
    assert "nodata.tif: 100 % of the labelled objects (data.test;" in caplog.text and "no-data pixels" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        check_inputs(load_config(write_config(scenes, tmp_path, name="fine")), ("test",))  # labels on data
    assert "no-data pixels" not in caplog.text
    from hem_bootstrap.config import DataConfig
    from hem_bootstrap.geo.raster import open_raster
    from hem_bootstrap.inputs import _warn_labels_on_nodata

    info = open_raster(scenes / "nodata.tif")  # an object cut by the east edge: its centre is off the raster
    x1, y0 = info.bounds[2], info.bounds[1]
    edge = gpd.GeoDataFrame(geometry=[shapely.box(x1 - 0.5, y0 + 10, x1 + 3, y0 + 13)], crs=info.crs)
    with caplog.at_level(logging.WARNING, logger="hem_bootstrap.inputs"):
        _warn_labels_on_nodata(scenes / "nodata.tif", info, edge, "test", DataConfig())
    assert "no-data pixels" not in caplog.text


def test_pixel_csv_without_columns(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("image,x,y\nplain.png,1,2\n")
    cfg = write_config(scenes, tmp_path, data={"train": [{"images": [str(scenes / "plain.png")], "labels": str(bad)}]})
    one_line_error(hem("run", str(cfg)), "bad.csv: pixel CSV lacks column(s)", "xmin")


# --------------------------------------------------------------------------- run directories


@pytest.fixture(scope="module")
def fine_run(scenes: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One finished run whose pool holds every input that is fine or skipped (shared by the tests below)."""
    folder = tmp_path_factory.mktemp("fine_run")
    names = ["pool16", "pool4", "small", "nodata", "truncated", "garbage"]
    pool = iset(scenes, "pool", images=[str(scenes / f"{n}.tif") for n in names])
    # score_floor 0: an untrained model's every output counts, so each raster that runs shows up
    cfg = write_config(scenes, folder, name="fine", data={"pool": [pool]}, model={"score_floor": 0.0})
    proc = subprocess.run([sys.executable, "-m", "hem_bootstrap.cli", "run", str(cfg)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder / "stderr.txt").write_text(proc.stderr)
    return cfg, folder / "runs" / "fine"


def test_fine_inputs_run_and_broken_ones_are_skipped(fine_run: tuple[Path, Path], hem: Hem) -> None:
    cfg, run = fine_run
    manifest = json.loads((run / "manifest.json").read_text())
    detect = next(e for e in manifest["rounds"] if e["round"] == 1)["steps"]["detect"]
    # garbage.tif does not open, truncated.tif fails mid-scan: each logged once, counted in the
    # manifest and shown by `hem status`
    bad = manifest["bad_rasters"]
    assert len(bad) == 2 and "garbage.tif" in bad[0] and "truncated.tif" in bad[1]
    code, out, _ = hem("status", str(run))
    assert code == 0 and "skipped rasters: 2" in out and "garbage.tif" in out
    # 16-bit, 4-band: 4 tiles each; smaller than a tile: 1 padded tile; all-nodata: 4 tiles,
    # skipped; truncated: 4 tiles, the unreadable ones skipped
    assert detect["tiles"] == 4 + 4 + 1 + 4 + 4
    assert detect["tiles_skipped"] == 4 + unreadable_tiles(Path(manifest["bad_rasters"][0].split(":")[0]).parent)
    stderr = (cfg.parent / "stderr.txt").read_text()
    assert "skipping raster" in stderr and "garbage.tif" in stderr
    assert "skipping unreadable tiles" in stderr and "truncated.tif" in stderr
    dets = gpd.read_file(run / "round_001" / "detections.gpkg")
    seen = {Path(p).name for p in dets["image"]}
    assert seen <= {"pool16.tif", "pool4.tif", "small.tif", "truncated.tif"}  # a 2-step model may find nothing
    assert len(dets) > 0
    small = dets[dets["image"].str.endswith("small.tif")]  # its one tile ran (not skipped), padded
    assert (small["px_xmax"] <= 200 + 1e-6).all() and (small["px_ymax"] <= 160 + 1e-6).all()


def unreadable_tiles(folder: Path) -> int:
    """How many 256 px tiles of truncated.tif fail to read (the rest must still be scanned)."""
    from hem_bootstrap.config import DataConfig
    from hem_bootstrap.errors import DataError
    from hem_bootstrap.geo.raster import RasterReader
    from hem_bootstrap.geo.windows import tile_windows

    reader = RasterReader(folder / "truncated.tif", DataConfig())
    failed = 0
    for win in tile_windows(512, 512, 256, 0):
        try:
            reader.read(win)
        except DataError:
            failed += 1
    assert 0 < failed < 4
    return failed


def test_run_exists_without_resume(fine_run: tuple[Path, Path], hem: Hem) -> None:
    cfg, _ = fine_run
    one_line_error(hem("run", str(cfg)), "a run of this name exists", "--resume")


def test_train_refuses_to_replace_a_trained_round(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem) -> None:
    cfg_copy, copy = _copy_run(fine_run, tmp_path)
    before = (copy / "round_001" / "model.pt").read_bytes()
    one_line_error(hem("train", str(cfg_copy), "--round", "1"), "round 1's model is already trained", "--force")
    assert (copy / "round_001" / "model.pt").read_bytes() == before
    code, _, err = hem("train", str(cfg_copy), "--round", "1", "--force")
    assert code == 0 and "replacing round 1's trained model" in err, err
    assert (copy / "round_001" / "model.pt").read_bytes() != before


def _copy_run(fine_run: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the finished run (and its config) to damage."""
    cfg, run = fine_run
    copy = tmp_path / "runs" / "fine"
    shutil.copytree(run, copy)
    tree = yaml.safe_load(cfg.read_text())
    tree["rounds"]["out_dir"] = str(tmp_path / "runs")
    (tmp_path / "fine.yaml").write_text(yaml.safe_dump(tree))
    return tmp_path / "fine.yaml", copy


def test_nothing_of_a_run_is_lost_to_a_stray_option(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem) -> None:
    cfg, run = _copy_run(fine_run, tmp_path)
    files = {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"}
    model = str(run / "round_001" / "model.pt")
    one_line_error(hem("run", str(cfg), "--resume", "--fresh"), "--resume and --fresh: choose one")
    one_line_error(hem("bank", "export", str(run), "--out", str(run / "bank.gpkg")), "a file of the run")
    one_line_error(hem("detect", model, str(tmp_path.parent), "--out", str(run / "bank.gpkg")), "a file of the run")
    one_line_error(hem("export-model", str(run), "--out", model), "a file of the run")
    one_line_error(hem("export-model", str(run), "--out", str(tmp_path)), "is a directory")
    one_line_error(hem("train", str(cfg), "--round", "-1"), "--round -1: expected a round number >= 0")
    one_line_error(hem("round", str(cfg), "--run", str(run), "--force", "--set", "model.arch=small_frcnn"),
                   "model.pt", "do not fit")  # a forced change the trained model cannot take: nothing written
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file() and p.name != ".lock"} == files
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("round_")) == ["round_000", "round_001"]


def test_a_folder_that_holds_no_run_is_never_adopted(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    cfg = write_config(scenes, tmp_path, name="taken")
    (tmp_path / "runs" / "taken").mkdir(parents=True)
    (tmp_path / "runs" / "taken" / "bank.gpkg").write_text("someone's file")
    for extra in ([], ["--fresh"]):
        one_line_error(hem("run", str(cfg), *extra), "holds results", "but no manifest.json")
    assert (tmp_path / "runs" / "taken" / "bank.gpkg").read_text() == "someone's file"


def test_round_of_the_run_in_the_current_folder(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    cfg, run = _copy_run(fine_run, tmp_path)
    monkeypatch.chdir(run)  # --run . names the folder it stands in
    one_line_error(hem("round", str(cfg), "--run", ".", "--set", "train.steps=3"),
                   "config changed since the run started (train.steps)")


def test_a_manifest_of_another_shape(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem) -> None:
    _, run = _copy_run(fine_run, tmp_path)
    for text in ("[]", "{}", '{"rounds": [1]}'):
        (run / "manifest.json").write_text(text)
        one_line_error(hem("status", str(run)), "manifest.json: not a hem manifest")
        one_line_error(hem("export-model", str(run), "--out", str(tmp_path / "m.pth")), "not a hem manifest")


def test_bad_review_decisions(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem) -> None:
    _, run = _copy_run(fine_run, tmp_path)
    (tmp_path / "junk.gpkg").write_bytes(b"not a vector file at all")
    one_line_error(hem("review", "apply", str(run), str(tmp_path / "junk.gpkg")), "junk.gpkg: not a readable vector")
    pd.DataFrame({"review_id": ["zzz"], "decision": ["negative"]}).to_csv(tmp_path / "d.csv", index=False)
    one_line_error(hem("review", "apply", str(run), str(tmp_path / "d.csv")), "review_id = 'zzz'", "expected")


def test_resume_with_changed_config(fine_run: tuple[Path, Path], hem: Hem) -> None:
    cfg, _ = fine_run
    one_line_error(hem("run", str(cfg), "--resume", "--set", "train.steps=5"),
                   "config changed since the run started (train.steps)", "--force")


def test_run_directory_locked(fine_run: tuple[Path, Path], hem: Hem) -> None:
    cfg, run = fine_run
    other = RunDir(run)
    other.acquire()  # a second open file description: flock refuses it like another process
    try:
        line = one_line_error(hem("run", str(cfg), "--resume"), "run directory is in use by pid")
        assert str(run) in line
        code, out, _ = hem("status", str(run))
        assert code == 0 and "in use by pid" in out
    finally:
        other.release()


def test_status_of_a_folder_that_is_no_run(tmp_path: Path, hem: Hem) -> None:
    one_line_error(hem("status", str(tmp_path)), "not a run directory")


def test_detect_with_missing_model_and_unmatched_images(fine_run: tuple[Path, Path], tmp_path: Path,
                                                        hem: Hem) -> None:
    cfg, run = fine_run
    model = run / "round_001" / "model.pt"
    one_line_error(hem("detect", str(cfg), "--model", str(tmp_path / "m.pt"), "--out", str(tmp_path / "d.gpkg")),
                   "m.pt: model checkpoint not found")
    one_line_error(hem("detect", str(cfg), "--model", str(model), "--images", str(tmp_path / "x*.tif"),
                       "--out", str(tmp_path / "d.gpkg")), "x*.tif", "no file matches")
    one_line_error(hem("detect", str(cfg), "--model", str(model), "--out", str(tmp_path / "d.shp")),
                   "unsupported output format '.shp'")


def test_bank_export_format(fine_run: tuple[Path, Path], tmp_path: Path, hem: Hem) -> None:
    _, run = fine_run
    one_line_error(hem("bank", "export", str(run), "--format", "xml", "--out", str(tmp_path / "b.xml")),
                   "--format 'xml'")
    code, _, err = hem("bank", "export", str(run), "--format", "geojson", "--out", str(tmp_path / "b.geojson"))
    assert code == 0, err
    assert set(gpd.read_file(tmp_path / "b.geojson")["predicted_class"]) == {"vehicle"}  # the run's class names


def test_plain_image_runs_in_pixel_space(scenes: Path, tmp_path: Path, hem: Hem) -> None:
    plain = {"images": [str(scenes / "plain.png")], "labels": str(scenes / "plain.csv")}
    cfg = write_config(scenes, tmp_path, name="plain", data={"pool": [], "test": [plain]}, rounds={"n_rounds": 0})
    code, _, err = hem("run", str(cfg))
    assert code == 0, err
    metrics = json.loads((tmp_path / "runs" / "plain" / "round_000" / "metrics.json").read_text())
    assert metrics["n_gt"] > 0  # pixel-CSV labels are matched in pixel space; areas count 1 px as 1 m


# --------------------------------------------------------------------------- disk full


def _enospc_on(monkeypatch: pytest.MonkeyPatch, match: Callable[[str], bool]) -> None:
    real = os.replace

    def replace(src: Any, dst: Any, *a: Any, **k: Any) -> None:
        if match(str(dst)):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(dst))
        real(src, dst, *a, **k)

    monkeypatch.setattr(os, "replace", replace)


def test_disk_full_on_the_manifest(scenes: Path, tmp_path: Path, hem: Hem, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(scenes, tmp_path, name="full")
    _enospc_on(monkeypatch, lambda dst: dst.endswith("manifest.json"))
    one_line_error(hem("run", str(cfg)), "manifest.json: could not write (No space left on device)",
                   "previous version is intact")


def test_disk_full_on_the_bank_keeps_finished_steps(scenes: Path, tmp_path: Path, hem: Hem,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(scenes, tmp_path, name="fullbank")
    run = tmp_path / "runs" / "fullbank"
    _enospc_on(monkeypatch, lambda dst: dst.endswith("round_001/bank.gpkg"))
    one_line_error(hem("run", str(cfg)), "round_001/bank.gpkg: could not write in round 1",
                   "No space left on device", "finished steps are intact", "--resume")
    manifest = json.loads((run / "manifest.json").read_text())
    assert [sorted(e["steps"]) for e in manifest["rounds"]] == [["evaluate", "train"], ["detect"]]
    bank0 = gpd.read_file(run / "round_000" / "bank.gpkg", layer="negatives")
    assert len(bank0) == 0 and bank0.crs is not None  # round 0's bank, intact, and in the pool's CRS though empty
    assert not (run / "round_001" / "bank.gpkg").exists() and not (run / "bank.gpkg").exists()
    assert not [p for p in run.rglob(".*tmp*")]
    monkeypatch.undo()
    code, _, err = hem("run", str(cfg), "--resume")
    assert code == 0, err
    assert len(gpd.read_file(run / "bank.gpkg", layer="negatives")) > 0
