"""The runtime section and the whole experiment, made of every section."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hem_bootstrap.config.base import Section
from hem_bootstrap.config.data import DataConfig, TilingConfig
from hem_bootstrap.config.mining import BankConfig, EvaluateConfig, MiningConfig, RoundsConfig
from hem_bootstrap.config.model import ModelConfig, TrainConfig


class RuntimeConfig(Section):
    """Where and how fast things run."""

    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    workers: int = Field(2, ge=0, description="DataLoader workers (training; detection on CUDA).")
    detect_workers: int | None = Field(
        None, ge=0,
        description="DataLoader workers of detection; None: runtime.workers on CUDA, 0 on CPU, where the "
        "model's threads already use every core and tiles read in its own process cost less than worker "
        "processes that compete with it (scripts/bench_inference.py).",
    )
    cpu_replicas: int | None = Field(
        None, ge=0,
        description="Single-threaded model replicas of a scan on a CPU, each reading and running its own "
        "batches (hem_bootstrap/model/replicas.py); None: one per torch thread (at most 8) for scans of 64 "
        "tiles or more per replica, unless detect_workers is set; 0 or 1: the model runs in the scan's "
        "process on every thread. Under torchrun: per rank.",
    )
    batch_size: int = Field(8, gt=0, description="Tiles per inference batch.")
    prefetch: int = Field(4, gt=0, description="Batches prefetched per worker.")
    amp: bool = Field(True, description="Mixed precision on CUDA (ignored on CPU).")
    amp_dtype: Literal["bf16", "fp16"] = Field("bf16", description="AMP dtype on CUDA.")
    threads: int | None = Field(None, gt=0, description="torch CPU threads (None: torch default).")
    seed: int = Field(0, description="Seed for everything random.")
    collective_timeout_s: int = Field(600, gt=0, description="Timeout of torch.distributed collectives.")
    gdal: dict[str, str] = Field(
        default_factory=dict,
        description="GDAL configuration options for every raster read, e.g. {GDAL_HTTP_MULTIPLEX: 'YES', "
        "VSI_CACHE: 'TRUE', GDAL_CACHEMAX: '512', GDAL_DISABLE_READDIR_ON_OPEN: 'EMPTY_DIR'} for rasters "
        "read over HTTP or from object storage (credentials too: AWS_*, GS_*, AZURE_*).",
    )
    log_every_s: float = Field(
        30.0, ge=0,
        description="Seconds between two progress lines of a long step when stderr is not a terminal "
        "(a batch job's log); a terminal shows bars instead.",
    )
    log_file: str | None = Field(
        None, description="Also append every log line (progress, warnings, errors) to this file, relative to the "
        "config file; rank 0 only under torchrun. The --log-file option does the same.",
    )


class ExperimentConfig(Section):
    """A whole experiment."""

    data: DataConfig = Field(default_factory=DataConfig)
    tiling: TilingConfig = Field(default_factory=TilingConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    mining: MiningConfig = Field(default_factory=MiningConfig)
    bank: BankConfig = Field(default_factory=BankConfig)
    rounds: RoundsConfig = Field(default_factory=RoundsConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @property
    def num_classes(self) -> int:
        """Classes plus background (torchvision convention: label 0 is background)."""
        return len(self.data.classes) + 1
