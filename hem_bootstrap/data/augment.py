"""Box-aware augmentation of training chips: flips, quarter turns and mild colour jitter (torchvision v2)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
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
