"""Shared data contracts between the layers (column names and shapes), kept in one place.

* A tile / chip target is ``{"boxes": float32 (N, 4) xyxy pixels, "labels": int64 (N,)}``;
  a negative or background chip has ``boxes`` of shape ``(0, 4)``. Label ids are 1..K for
  the classes in ``data.classes`` order (0 is background, the torchvision convention).
* A detection frame is a GeoDataFrame in the raster's CRS (``crs=None`` and pixel
  coordinates for plain images) with the columns in :data:`DETECTION_COLUMNS` plus
  ``geometry`` (an axis-aligned box polygon).
"""

from __future__ import annotations

DETECTION_COLUMNS: tuple[str, ...] = ("image", "label", "score", "win_col", "win_row", "win_w", "win_h")
"""``image``: raster path as str; ``label``: int class id (1..K); ``score``: float in [0, 1];
``win_*``: the tile window (pixels) the detection came from."""
