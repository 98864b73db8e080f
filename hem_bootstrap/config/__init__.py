"""Experiment configuration: typed pydantic models, YAML loading, ``--set`` overrides.

A config is validated once, here, and then passed around as typed objects. Errors name
the key, its section, the bad value and what was allowed. The sections live by topic
(``data``, ``model``, ``mining``, ``experiment``); loading and error messages in ``loading``.
"""

from hem_bootstrap.config.data import DataConfig, ImageSet, TilingConfig
from hem_bootstrap.config.experiment import ExperimentConfig, RuntimeConfig
from hem_bootstrap.config.loading import (
    apply_overrides,
    config_from_tree,
    describe_defaults,
    dump_config,
    format_validation_error,
    load_config,
    with_defaults,
)
from hem_bootstrap.config.mining import BankConfig, EvaluateConfig, MiningConfig, RoundsConfig, StrategySpec
from hem_bootstrap.config.model import ModelConfig, TrainConfig

__all__ = [
    "BankConfig", "DataConfig", "EvaluateConfig", "ExperimentConfig", "ImageSet", "MiningConfig", "ModelConfig",
    "RoundsConfig", "RuntimeConfig", "StrategySpec", "TilingConfig", "TrainConfig", "apply_overrides",
    "config_from_tree", "describe_defaults", "dump_config", "format_validation_error", "load_config", "with_defaults",
]
