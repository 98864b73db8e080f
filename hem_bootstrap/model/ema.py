"""An exponential moving average of a model's weights over a round's steps (``train.ema_decay``).

Each round trains for a few hundred steps, and which batches came last moves the final weights
by more than the difference between two mining recipes: the average of the weights over the
last ~``1 / (1 - decay)`` steps is steadier than the last step's weights, and the round's model
is that average. The average is torch's :class:`~torch.optim.swa_utils.AveragedModel`, with the
usual warm-up: update ``n`` uses the decay ``min(decay, (1 + n) / (10 + n))``, so the first
updates follow the live weights closely. BatchNorm statistics are averaged like the weights;
integer buffers (batch counters) take the live value.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def _decay_at(decay: float, n: int) -> float:
    return min(decay, (1 + n) / (10 + n))


class WeightAverage:
    """The moving average of ``model``'s weights, updated after each optimizer step."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = float(decay)
        self._keep = 0.0  # this update's decay, set on the host (reading the count on a GPU would sync)

        def blend(averaged: Tensor, current: Tensor, _n_averaged: Tensor | int) -> Tensor:
            if not averaged.is_floating_point():
                return current
            return torch.lerp(averaged, current.to(averaged.dtype), 1.0 - self._keep)

        self.averaged = AveragedModel(model, avg_fn=blend, use_buffers=True)
        self.averaged.requires_grad_(False)

    def update(self, model: nn.Module) -> None:
        """Fold the model's current weights into the average."""
        self._keep = _decay_at(self.decay, int(self.averaged.n_averaged))  # the count lives on the CPU
        self.averaged.update_parameters(model)

    def copy_to(self, model: nn.Module) -> None:
        """Give ``model`` the averaged weights (and buffers)."""
        model.load_state_dict(self.averaged.module.state_dict())

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps to resume the average exactly."""
        return self.averaged.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the average saved by :meth:`state_dict`."""
        self.averaged.load_state_dict(state)
