"""Pure tiling math: windows with overlap and pixel <-> map transforms. No I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, order=True)
class Window:
    """A tile of a raster in pixel space.

    ``width``/``height`` are the tile size that goes to the model; ``valid_width`` /
    ``valid_height`` are the part of it that lies inside the raster (smaller only when the
    raster itself is smaller than one tile and the tile is padded).
    """

    col_off: int
    row_off: int
    width: int
    height: int
    valid_width: int
    valid_height: int
