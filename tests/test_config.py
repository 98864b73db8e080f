"""Config validation: valid files, unknown keys, bad values, overrides, relative paths."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from hem_bootstrap.config import ExperimentConfig, ImageSet, describe_defaults, load_config
from hem_bootstrap.errors import ConfigError


def _write(tmp_path: Path, tree: dict, name: str = "exp.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tree))
    return path


def test_valid_file_and_defaults(tmp_path: Path) -> None:
    path = _write(tmp_path, {"tiling": {"tile_size": 128, "overlap": 16}, "rounds": {"n_rounds": 2}})
    cfg = load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.tiling.tile_size == 128 and cfg.tiling.overlap_px() == 16
    assert cfg.rounds.n_rounds == 2
    assert cfg.train.optimizer == "adamw"  # default filled in
    assert cfg.num_classes == 2


def test_unknown_key_names_key_section_and_closest(tmp_path: Path) -> None:
    path = _write(tmp_path, {"tiling": {"tile_sise": 128}})
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert "tile_sise" in msg and "'tiling'" in msg and "tile_size" in msg
    assert "\n" not in msg


def test_unknown_key_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    # found by the fuzz test: YAML allows any string as a key
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, {"data": {"\n": None}}))
    msg = str(exc.value)
    assert "\n" not in msg and "unknown key '\\n' in section 'data'" in msg


def test_unknown_section_suggests_closest(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="did you mean 'mining'"):
        load_config(_write(tmp_path, {"minning": {}}))


def test_unknown_key_inside_list_item(tmp_path: Path) -> None:
    tree = {"mining": {"strategies": [{"name": "threshold", "treshold": 0.5}]}}
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        load_config(_write(tmp_path, tree))


@pytest.mark.parametrize(
    ("tree", "needle"),
    [
        ({"tiling": {"tile_size": 0}}, "tiling.tile_size = 0"),
        ({"tiling": {"tile_size": "big"}}, "tiling.tile_size = 'big'"),
        ({"mining": {"strategies": [{"name": "threshold", "threshold": 1.5}]}}, "less than or equal to 1"),
        ({"mining": {"strategies": [{"name": "per_image_cap", "k": 0}]}}, "greater than 0"),
        ({"mining": {"strategies": [{"name": "per_image_cap"}]}}, "needs k"),
        ({"tiling": {"tile_size": 64, "overlap": 64}}, "overlap"),
        ({"data": {"bands": [0, 1]}}, "1-based"),
        ({"train": {"rotate_any": 1.5}}, "train.rotate_any = 1.5"),
    ],
)
def test_bad_values_name_field_value_constraint(tmp_path: Path, tree: dict, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(_write(tmp_path, tree))
    assert needle in str(exc.value)
    assert str(tmp_path) in str(exc.value)


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    path = _write(tmp_path, {"train": {"steps": 10}})
    cfg = load_config(path, ["train.steps=42", "runtime.amp=false", "evaluate.fixed_recalls=[0.5, 0.7]"])
    assert cfg.train.steps == 42
    assert cfg.runtime.amp is False
    assert cfg.evaluate.fixed_recalls == [0.5, 0.7]


def test_override_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, {})
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(path, ["train.steps"])
    with pytest.raises(ConfigError, match="unknown key 'stepz'"):
        load_config(path, ["train.stepz=3"])


def test_relative_paths_resolve_against_config_folder(tmp_path: Path) -> None:
    sub = tmp_path / "exp"
    sub.mkdir()
    tree = {
        "data": {"train": [{"images": ["imgs/*.tif", "a.tif"], "labels": "labels.gpkg", "aoi": "aoi.gpkg"}],
                 "val": [{"images": ["v.tif"], "labels": "v.gpkg", "ignore_zones": "z.gpkg"}]},
        "model": {"weights": "w.pth"},
        "rounds": {"out_dir": "runs"},
        "runtime": {"log_file": "logs/hem.log"},
    }
    cfg = load_config(_write(sub, tree))
    s = cfg.data.train[0]
    assert s.images == [str(sub / "imgs/*.tif"), str(sub / "a.tif")]
    assert s.labels == str(sub / "labels.gpkg") and s.aoi == str(sub / "aoi.gpkg")
    v = cfg.data.val[0]  # validation sets too (they were once left relative to the working directory)
    assert (v.images, v.labels, v.ignore_zones) == ([str(sub / "v.tif")], str(sub / "v.gpkg"), str(sub / "z.gpkg"))
    assert cfg.model.weights == str(sub / "w.pth")
    assert cfg.rounds.out_dir == str(sub / "runs")
    assert cfg.runtime.log_file == str(sub / "logs/hem.log")


def test_missing_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tiling: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst)


def test_describe_defaults_lists_every_section() -> None:
    text = describe_defaults()
    for section in ExperimentConfig.model_fields:
        assert f"\n{section}:" in "\n" + text
    assert "tile_size: 256" in text
    for key in ImageSet.model_fields:  # the keys of an image set entry, spelled out once
        assert f"#   {key}:" in text or f"# - {key}:" in text, key
    assert "# each entry as in data.train" in text and "# - name:  # (required)" in text
    assert ExperimentConfig(**yaml.safe_load(text)) == ExperimentConfig()  # still a config that loads


def test_demo_config_validates() -> None:
    cfg = load_config(Path(__file__).parent.parent / "configs" / "demo.yaml")
    assert cfg.data.train and cfg.data.pool and cfg.data.test


def test_every_bundled_config_validates_and_builds_its_model() -> None:
    from hem_bootstrap.model.detectors import build_detector

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 2
    for path in configs:
        cfg = load_config(path, ["model.weights=null", "model.backbone_weights=null"])  # weights are the user's
        assert all(p.exists() for s in cfg.data.train for p in s.resolved_images()), path
        build_detector(cfg.model, cfg.num_classes, cfg.tiling.tile_size)
