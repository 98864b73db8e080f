"""Config sections for imagery: the image sets and their labels, and how rasters are tiled."""

from __future__ import annotations

import glob
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from hem_bootstrap.config.base import Section
from hem_bootstrap.remote import gdal_path, is_remote


class ImageSet(Section):
    """A group of rasters with their (optional) vector labels."""

    images: list[str] = Field(default_factory=list, description="Raster paths or glob patterns.")
    labels: str | None = Field(None, description="Vector labels (any OGR format) or pixel CSV.")
    distractors: str | None = Field(
        None, description="Look-alike objects (synthetic scenes); only used to analyse false positives."
    )
    ignore_zones: str | None = Field(None, description="Polygons where labels are incomplete.")
    mosaic: Literal["auto", "off"] = Field(
        "auto", description="auto: rasters that are adjacent tiles of one mosaic (same CRS, resolution and pixel "
        "grid, no overlap) are read as one through a VRT, so an object on a file boundary is one object; off: "
        "always file by file.",
    )
    aoi: str | None = Field(
        None, description="Area of interest: polygons (any OGR format and CRS). Only tiles that touch them are read, "
        "detections outside are dropped, objects outside are not counted, FP/km² divides by the valid ground inside, "
        "and training background chips are drawn inside.",
    )

    def resolved_images(self) -> list[Path]:
        """Expand glob patterns into a sorted, de-duplicated list of paths (URLs and GDAL /vsi paths as they are)."""
        out: list[Path] = []
        for pattern in self.images:
            if is_remote(pattern):  # a URL's "?" is a query, not a glob
                out.append(Path(gdal_path(pattern)))
            elif any(ch in pattern for ch in "*?["):
                out.extend(Path(p) for p in sorted(glob.glob(pattern)))
            else:
                out.append(Path(pattern))
        seen: set[Path] = set()
        unique = []
        for p in out:
            if p not in seen:
                seen.add(p)
                unique.append(p)
        return unique


class DataConfig(Section):
    """Imagery and labels for training, the background pool and held-out evaluation."""

    train: list[ImageSet] = Field(default_factory=list, description="Labelled training imagery.")
    pool: list[ImageSet] = Field(
        default_factory=list, description="Imagery scanned for hard negatives (labels needed to tell FPs)."
    )
    test: list[ImageSet] = Field(default_factory=list, description="Held-out imagery, never mined.")
    val: list[ImageSet] = Field(
        default_factory=list,
        description="Validation imagery, never trained on or mined: each round's operating threshold is chosen "
        "here (evaluate.calibrate_recall) and applied to data.test, never chosen on the test scenes.",
    )
    classes: list[str] = Field(default_factory=lambda: ["vehicle"], description="Class names, in id order.")
    class_field: str = Field("class", description="Label attribute holding the class name.")
    geometry: Literal["auto", "polygon", "point"] = Field(
        "auto", description="How to read label geometries: bounding box of polygons, or box around points."
    )
    point_box_m: float = Field(4.5, gt=0, description="Side in metres of the box put around point labels.")
    bands: list[int] = Field(default_factory=lambda: [1, 2, 3], description="1-based band indexes to read.")
    scale: Literal["auto", "fixed", "percentile"] = Field(
        "auto", description="Scaling to [0,1]: auto (by dtype), fixed (scale_min/max), percentile."
    )
    scale_min: float = Field(0.0, description="Value mapped to 0 with scale=fixed.")
    scale_max: float = Field(255.0, description="Value mapped to 1 with scale=fixed.")
    percentiles: tuple[float, float] = Field((2.0, 98.0), description="Percentiles with scale=percentile.")
    gsd: float | None = Field(
        None, gt=0,
        description="Ground sample distance (metres per pixel) to read every raster at: a raster of another GSD is "
        "resampled through a VRT, so the model sees objects at the size it learnt. None: each at its own (a set of "
        "mixed GSDs is named in a warning).",
    )
    resampling: Literal["auto", "nearest", "bilinear", "cubic", "average", "lanczos"] = Field(
        "auto", description="Resampling for data.gsd; auto: average when shrinking, bilinear when enlarging.")
    min_valid_fraction: float = Field(0.5, ge=0, le=1, description="Skip windows with less valid data.")
    min_visible_fraction: float = Field(
        0.5, ge=0, le=1, description="Keep a clipped box as a target if this share of it is inside the tile."
    )
    on_bad_raster: Literal["skip", "fail"] = Field("skip", description="A broken raster in the pool.")
    gdal_cache_mb: int = Field(
        128, ge=8, description="GDAL block cache per reading process (GDAL's default, 5% of RAM, grows with the raster)."
    )

    @field_validator("bands")
    @classmethod
    def _bands_positive(cls, v: list[int]) -> list[int]:
        if not v or any(b < 1 for b in v):
            raise ValueError(f"bands must be 1-based indexes >= 1, got {v}")
        return v

    @field_validator("classes")
    @classmethod
    def _classes_distinct(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) < len(v) or any(not c.strip() for c in v):
            raise ValueError(f"expected distinct, non-empty class names, got {v}")
        return v

    @field_validator("percentiles")
    @classmethod
    def _percentiles_rise(cls, v: tuple[float, float]) -> tuple[float, float]:
        if not 0 <= v[0] < v[1] <= 100:
            raise ValueError(f"expected [low, high] with 0 <= low < high <= 100, got {list(v)}")
        return v


class TilingConfig(Section):
    """How large rasters are cut into tiles."""

    tile_size: int = Field(256, gt=0, le=4096, description="Tile side in pixels.")
    overlap: float = Field(32, ge=0, description="Overlap in pixels (>= 1) or as a fraction of the tile (< 1).")

    def overlap_px(self) -> int:
        """Overlap in pixels, whichever way it was given."""
        px = int(round(self.overlap * self.tile_size)) if self.overlap < 1 else int(self.overlap)
        return px

    @model_validator(mode="after")
    def _check_overlap(self) -> TilingConfig:
        if self.overlap_px() >= self.tile_size:
            raise ValueError(f"overlap ({self.overlap}) must be smaller than tile_size ({self.tile_size})")
        return self
