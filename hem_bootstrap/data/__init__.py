"""Datasets for inference tiles and training chips, and synthetic ortho-scenes."""
