"""Box-aware augmentation of training chips: flips, quarter turns and mild colour jitter (torchvision v2),
and turns by any angle that take their boxes from the labels' turned outlines.

A box turned by an angle that is not a quarter turn can only grow to the envelope of its
corners, far looser than the object it held; the turn by any angle therefore turns each
label's oriented outline (see :data:`hem_bootstrap.geo.labels.OUTLINE`) and takes the
envelope of that, which is what a person labelling the turned chip would draw.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF


class ChipAugment:
    """Flips, 90-degree rotations and mild colour jitter, boxes kept on their pixels.

    Parameters are drawn from a numpy generator handed in per call (so they follow the
    chip's seed) and applied with ``torchvision.transforms.v2.functional`` on a
    ``tv_tensors.Image`` and ``tv_tensors.BoundingBoxes`` pair.
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, saturation: float = 0.1) -> None:
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation

    def geometric(
        self, image: torch.Tensor, boxes: torch.Tensor, hflip: bool, vflip: bool, quarter_turns: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply the chosen flips and counter-clockwise quarter turns (square chips)."""
        h, w = image.shape[-2:]
        img: Any = tv_tensors.Image(image)
        bb: Any = tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=(h, w))
        if hflip:
            img, bb = TF.horizontal_flip(img), TF.horizontal_flip(bb)
        if vflip:
            img, bb = TF.vertical_flip(img), TF.vertical_flip(bb)
        if quarter_turns % 4:
            angle = 90.0 * (quarter_turns % 4)
            img, bb = TF.rotate(img, angle), TF.rotate(bb, angle)
        return img.as_subclass(torch.Tensor), bb.as_subclass(torch.Tensor).round()

    def colour(self, image: torch.Tensor, factors: np.ndarray) -> torch.Tensor:
        """Mild brightness / contrast (/ saturation for 3-band) changes, staying in [0, 1]."""
        img = TF.adjust_brightness(image, float(factors[0]))
        img = TF.adjust_contrast(img, float(factors[1])) if img.shape[0] in (1, 3) else img
        if img.shape[0] == 3:
            img = TF.adjust_saturation(img, float(factors[2]))
        return img.clamp_(0.0, 1.0)

    def __call__(
        self, image: torch.Tensor, boxes: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hflip, vflip = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
        turns = int(rng.integers(0, 4)) if image.shape[-1] == image.shape[-2] else 0
        spread = np.array([self.brightness, self.contrast, self.saturation])
        factors = 1.0 + rng.uniform(-1.0, 1.0, size=3) * spread
        image, boxes = self.geometric(image, boxes, hflip, vflip, turns)
        return self.colour(image, factors), boxes


def turned_side(tile: int, angle: float) -> int:
    """Side of the square window that holds a ``tile`` chip turned by ``angle`` degrees (2 px to spare)."""
    a = math.radians(angle)
    return int(math.ceil(tile * (abs(math.cos(a)) + abs(math.sin(a))))) + 2


def turn_chip(image: torch.Tensor, centre: tuple[float, float], angle: float, tile: int) -> torch.Tensor:
    """The ``tile`` x ``tile`` chip centred on ``centre`` (pixels of ``image``) after turning ``image`` about it.

    ``angle``: degrees, counter-clockwise as the image is shown (torchvision's sense); bilinear
    resampling. ``centre`` minus half a tile must be whole pixels.
    """
    cx, cy = centre
    turned = TF.rotate(image, angle, interpolation=InterpolationMode.BILINEAR, center=[float(cx), float(cy)])
    return TF.crop(turned, int(round(cy - tile / 2)), int(round(cx - tile / 2)), tile, tile)


def turn_outlines(outlines: np.ndarray, centre: tuple[float, float], angle: float, tile: int) -> np.ndarray:
    """Envelopes (M, 4) xyxy in chip pixels of outlines (M, 4, 2) turned as :func:`turn_chip` turns the image."""
    a = math.radians(angle)
    d = np.asarray(outlines, dtype=np.float64).reshape(-1, 4, 2) - np.asarray(centre, dtype=np.float64)
    x = d[..., 0] * math.cos(a) + d[..., 1] * math.sin(a) + tile / 2
    y = -d[..., 0] * math.sin(a) + d[..., 1] * math.cos(a) + tile / 2
    return np.stack([x.min(axis=1), y.min(axis=1), x.max(axis=1), y.max(axis=1)], axis=1)
