"""Exponential moving average of a model's weights (the weights that get evaluated and saved).

decay(updates) = decay_max * (1 - exp(-updates / tau)): near 0 at first, so the average follows the model
while it changes fast, then approaching ``decay_max``. The reference uses tau = 2000 optimizer updates; small
data sets give few updates per run, so tau is a parameter.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, tau: float = 2000.0, updates: int = 0):
        if not 0.0 <= decay < 1.0 or tau <= 0:
            raise ValueError(f"EMA decay must be in [0, 1) and tau > 0 (got {decay}, {tau})")
        self.ema = copy.deepcopy(model).eval()
        for p in self.ema.parameters():
            p.requires_grad_(False)
        self.decay_max, self.tau, self.updates = decay, tau, updates

    def decay(self) -> float:
        return self.decay_max * (1.0 - math.exp(-self.updates / self.tau))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = self.decay()
        current = model.state_dict()
        for name, value in self.ema.state_dict().items():
            if value.dtype.is_floating_point:
                value.mul_(d).add_(current[name].detach(), alpha=1.0 - d)
            else:  # e.g. BatchNorm's num_batches_tracked
                value.copy_(current[name])
