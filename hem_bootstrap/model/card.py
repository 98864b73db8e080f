"""A model's card: everything needed to run it on new rasters without the experiment that trained it.

The card holds the detector's settings (the whole ``model`` section but the weight paths),
class names, tile size and overlap, the bands read and how they are scaled, and the ground
resolution it was trained at. Checkpoints (``model.pt``) carry it in their metadata and
``hem export-model`` writes it beside the weights (``NAME.json``), so ``hem detect MODEL
IMAGES...`` needs no config: :func:`config_for_model` rebuilds one from it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from hem_bootstrap.config import ExperimentConfig, apply_overrides, config_from_tree
from hem_bootstrap.config.model import with_legacy_width
from hem_bootstrap.errors import ModelError
from hem_bootstrap.geo.raster import RasterInfo
from hem_bootstrap.model.checkpoints import read_torch_file
from hem_bootstrap.model.pretrained import resolve_freezing

log = logging.getLogger(__name__)

SCALING_KEYS = ("scale", "scale_min", "scale_max", "percentiles")
GSD_TOLERANCE = 0.25
"""A raster whose ground resolution differs from the training one by more than this share gets a warning."""


def gsd_of(info: RasterInfo) -> float | None:
    """A raster's metres per pixel (x), or None for a plain image (its pixels have no ground size)."""
    if not info.georeferenced or info.crs is None:
        return None
    return round(float(info.pixel_size_m()[0]), 6)


def model_card(cfg: ExperimentConfig, gsd_m: float | None) -> dict[str, Any]:
    """The card of a model trained with ``cfg`` on imagery of ``gsd_m`` metres per pixel.

    The trunk's frozen stages and BatchNorm are recorded as resolved, so the model is rebuilt
    exactly without the pretrained files it started from.
    """
    trainable, frozen = resolve_freezing(cfg.model)
    model = cfg.model.model_dump(mode="json", exclude={"weights", "backbone_weights"})
    model.update(trainable_layers=trainable, frozen_bn=frozen)
    return {
        "architecture": cfg.model.arch,
        "classes": list(cfg.data.classes),
        "tile_size": cfg.tiling.tile_size,
        "overlap": cfg.tiling.overlap,
        "bands": list(cfg.data.bands),
        "scaling": {k: getattr(cfg.data, k) for k in SCALING_KEYS},
        "gsd_m": gsd_m,
        "model": model,
    }


def read_card(path: Path) -> dict[str, Any]:
    """The card of a model file: ``NAME.json`` beside it (``hem export-model``) or the checkpoint's own metadata.

    Raises:
        ModelError: the file is missing or unreadable, or carries no card and has none beside it.
    """
    path = Path(path)
    beside = path.with_suffix(".json")
    if beside.is_file():
        try:
            card = json.loads(beside.read_text())
        except json.JSONDecodeError as err:
            raise ModelError(f"{beside}: model card is not valid JSON ({err.msg} at line {err.lineno})") from None
        if not isinstance(card, Mapping) or "model" not in card:
            raise ModelError(f"{beside}: a model card from an older hem-bootstrap (no 'model' section); export the "
                             "model again with `hem export-model RUN --out FILE`")
        return _with_width(dict(card))
    obj = read_torch_file(path, "model")
    card = obj.get("card") if isinstance(obj, Mapping) else None
    if isinstance(card, Mapping):
        return _with_width(dict(card))
    config = obj.get("config") if isinstance(obj, Mapping) else None
    if isinstance(config, Mapping):  # a checkpoint from before cards: its config has all but the GSD
        tree = dict(config)
        tree["model"] = with_legacy_width(tree.get("model") or {})
        return model_card(config_from_tree(tree, path.parent, str(path)), None)
    raise ModelError(f"{path}: no model card (neither {beside.name} beside it nor one inside); "
                     "export it with `hem export-model RUN --out FILE` or pass an experiment config")


def _with_width(card: dict[str, Any]) -> dict[str, Any]:
    """A card written before ``model.width`` existed describes a model of width 1, whatever the default is now."""
    if isinstance(card.get("model"), Mapping):
        card["model"] = with_legacy_width(card["model"])
    return card


def config_for_model(path: Path, images: list[str], overrides: list[str] | None = None) -> tuple[ExperimentConfig, dict]:
    """An experiment config that scans ``images`` with the model in ``path`` as its card describes it.

    ``overrides`` (``section.key=value``) apply on top, as ``--set`` does for a config file.
    """
    card = read_card(path)
    try:
        tree: dict[str, Any] = {
            "model": dict(card["model"]),
            "tiling": {"tile_size": card["tile_size"], "overlap": card["overlap"]},
            "data": {"classes": card["classes"], "bands": card["bands"], **card["scaling"],
                     "pool": [{"images": images}]},
        }
    except (KeyError, TypeError) as err:
        raise ModelError(f"{path}: model card lacks {err}; export it again with `hem export-model`") from None
    tree = apply_overrides(tree, overrides)
    return config_from_tree(tree, Path.cwd(), f"model card of {path}"), card


def check_gsd(raster: str, raster_gsd: float | None, model_gsd: float | None) -> None:
    """Warn in one line when a raster's ground resolution is off the model's by more than :data:`GSD_TOLERANCE`."""
    if model_gsd is None or raster_gsd is None or not model_gsd > 0 or not math.isfinite(raster_gsd):
        return
    off = raster_gsd / model_gsd - 1
    if abs(off) > GSD_TOLERANCE:
        log.warning("%s: ground resolution %.3g m, the model was trained at %.3g m (%+.0f %%); objects appear at "
                    "another size than it learned; --set data.gsd=%.3g resamples it to the model's resolution", raster, raster_gsd,
                    model_gsd, 100 * off, model_gsd)
