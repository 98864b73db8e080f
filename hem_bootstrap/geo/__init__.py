"""Geo data layer: tiling math, raster reads, vector labels. Never imports torch."""
