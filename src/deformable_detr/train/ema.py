"""An exponential moving average of the weights (the EMA that RT-DETR, D-FINE, DEIM, RF-DETR and
Ultralytics train with): a smoother model than the last update's, evaluated and kept in its place."""

from __future__ import annotations

import copy
import itertools
import math
from typing import Any

import torch
from torch import nn

# The global batch at which a decay and a warm-up are stated: the published recipe's (8 GPUs x 4
# images). Other batches scale them as D-FINE's rule does (see WeightAverage.for_batch).
REFERENCE_BATCH = 32
# RT-DETR's, D-FINE's and DEIM's decay, at their global batches of 16-32.
DEFAULT_DECAY = 0.9999


class WeightAverage:
    """The moving average of a model's parameters and buffers, updated after each optimiser update.

    After the ``t``-th update each floating-point tensor ``v`` of the average moves towards the
    model's ``w`` as ``v = d * v + (1 - d) * w`` with ``d = decay * (1 - exp(-t / warmup_updates))``:
    a ramp that lets the average follow the fast early changes and the random initial weights fade
    (RT-DETR's and D-FINE's). Integer buffers (batch norm's count) are copied.
    """

    def __init__(self, model: nn.Module, *, decay: float, warmup_updates: float) -> None:
        if not 0 <= decay < 1 or warmup_updates < 0:
            raise ValueError(f"an EMA decay is in [0, 1) and its warm-up not negative, not {decay} and {warmup_updates}")
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay, self.warmup_updates = decay, warmup_updates
        self.updates = 0

    @classmethod
    def for_batch(cls, model: nn.Module, *, decay: float, warmup_updates: float, batch: int) -> WeightAverage:
        """The average whose ``decay`` and ``warmup_updates``, stated at :data:`REFERENCE_BATCH` images an
        update, are scaled to updates of ``batch`` images: ``1 - (1 - decay) * batch / 32`` and
        ``warmup_updates * 32 / batch`` (D-FINE's rule): the average then spans the same number of images
        whatever the batch (its decay an update is ``decay ** (batch / 32)`` to first order)."""
        scale = batch / REFERENCE_BATCH
        return cls(model, decay=max(0.0, 1 - (1 - decay) * scale), warmup_updates=warmup_updates / scale)

    def decay_at(self, update: int) -> float:
        """``d`` of the ``update``-th update (counted from 1)."""
        if not self.warmup_updates:
            return self.decay
        return self.decay * -math.expm1(-update / self.warmup_updates)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the average towards ``model`` (the trained one, unwrapped from DistributedDataParallel)."""
        self.updates += 1
        weight = 1 - self.decay_at(self.updates)
        for average, current in zip(_tensors(self.model), _tensors(model), strict=True):
            if average.is_floating_point():
                average.lerp_(current, weight)  # exact at weight 1: lerp computes current - (current - average) * 0
            else:
                average.copy_(current)

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps (under ``ema``) to continue the average exactly."""
        return {"model": self.model.state_dict(), "updates": self.updates, "decay": self.decay,
                "warmup_updates": self.warmup_updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.updates, self.decay, self.warmup_updates = state["updates"], state["decay"], state["warmup_updates"]

    def describe(self) -> str:
        """``EMA of the weights: decay 0.9999 an update, warm-up 1000 updates``, for the run's first lines."""
        return f"EMA of the weights: decay {self.decay:.6g} an update, warm-up {self.warmup_updates:.6g} updates"


def _tensors(model: nn.Module) -> itertools.chain[torch.Tensor]:
    # Parameters and buffers each once: heads shared across decoder layers appear once here, twice
    # in a state dict (and would be averaged twice).
    return itertools.chain(model.parameters(), model.buffers())
