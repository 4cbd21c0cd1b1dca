"""The optimiser recipe: AdamW with the published three parameter groups, and the learning-rate
schedules (the published step drop, cosine and flat-cosine; by epochs, or by the share of a
training-time budget)."""

from __future__ import annotations

import math

from torch import nn
from torch.optim import AdamW, Optimizer
from torch.optim.lr_scheduler import LambdaLR

# Parameters whose learning rate is scaled: the backbone's, and the layers that place sampling
# points, whose small changes move every sample (the reference's lr_linear_proj_names).
BACKBONE_PREFIX = "backbone.0."
SAMPLING_LAYERS = ("reference_points", "sampling_offsets")


def parameter_groups(
    model: nn.Module, *, lr: float, lr_backbone: float, sampling_lr_multiplier: float
) -> list[dict]:
    """Trainable parameters split into the reference's three groups (rest, backbone, sampling layers)."""
    groups: dict[str, list[nn.Parameter]] = {"rest": [], "backbone": [], "sampling": []}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if name.startswith(BACKBONE_PREFIX):
            groups["backbone"].append(parameter)
        elif any(layer in name for layer in SAMPLING_LAYERS):
            groups["sampling"].append(parameter)
        else:
            groups["rest"].append(parameter)
    learning_rates = {"rest": lr, "backbone": lr_backbone, "sampling": lr * sampling_lr_multiplier}
    return [{"params": groups[key], "lr": learning_rates[key], "name": key} for key in groups if groups[key]]


def build_optimizer(
    model: nn.Module,
    *,
    lr: float = 2e-4,
    lr_backbone: float = 2e-5,
    sampling_lr_multiplier: float = 0.1,
    weight_decay: float = 1e-4,
) -> Optimizer:
    """AdamW over :func:`parameter_groups`; the defaults are the published COCO recipe.

    On CPU and CUDA the update runs as one fused kernel over all parameters: the same arithmetic as
    torch's per-parameter loop, without a kernel launch and a pass over memory per parameter."""
    groups = parameter_groups(model, lr=lr, lr_backbone=lr_backbone, sampling_lr_multiplier=sampling_lr_multiplier)
    fused = all(parameter.device.type in ("cpu", "cuda") for group in groups for parameter in group["params"])
    return AdamW(groups, lr=lr, weight_decay=weight_decay, fused=fused)


# The learning-rate schedules: ``step`` is the published one; the cosine ones are those of later
# DETRs (RT-DETRv2, D-FINE and DEIM train with flat-cosine).
SCHEDULES = ("step", "cosine", "flat-cosine")


class LearningRateSchedule:
    """The learning-rate factor of the ``update``-th optimiser update (``LambdaLR``'s ``lr_lambda``).

    - ``step``: ``gamma`` for each ``lr_drop_epoch`` epochs passed (the published schedule);
    - ``cosine``: half a cosine from 1 down to ``min_lr_factor``, from the end of the warm-up to the
      end of ``epochs``;
    - ``flat-cosine``: 1 until ``lr_drop_epoch``, then that cosine down to ``min_lr_factor``.

    Each is multiplied by a linear warm-up over the first ``warmup_updates`` updates or the first
    ``warmup_epochs`` epochs (fractions allowed: the same share of training on 100 images and on COCO).

    A run with a training-time budget also counts epochs by its clock, ``epochs_by_time`` (the share of
    the budget spent, times the run's epochs), which the training loop sets before each step; the
    schedule follows the further along of the two counts, so that it ends with the budget on any
    machine. ``LambdaLR`` saves this object's attributes with its state, so a resumed run keeps its
    schedule and its clock.
    """

    def __init__(
        self, *, kind: str = "step", epochs: int, lr_drop_epoch: int, gamma: float, updates_per_epoch: int,
        warmup_updates: int = 0, warmup_epochs: float = 0.0, min_lr_factor: float = 0.0,
    ) -> None:
        if kind not in SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(SCHEDULES)}")
        if warmup_updates and warmup_epochs:
            raise ValueError("a warm-up in updates or in epochs, not both")
        if kind == "step" and lr_drop_epoch < 1:
            raise ValueError(f"lr_drop_epoch must be at least 1 for the step schedule, got {lr_drop_epoch}")
        self.kind, self.epochs, self.lr_drop_epoch, self.gamma = kind, epochs, lr_drop_epoch, gamma
        self.updates_per_epoch, self.warmup_updates, self.warmup_epochs = updates_per_epoch, warmup_updates, warmup_epochs
        self.min_lr_factor = min_lr_factor
        self.epochs_by_time = 0.0

    def __call__(self, update: int) -> float:
        if self.kind == "step":
            epochs_passed = max(update // self.updates_per_epoch, math.floor(self.epochs_by_time))
            return self._warmup(update) * self.gamma ** (epochs_passed // self.lr_drop_epoch)
        elapsed = max(update / self.updates_per_epoch, self.epochs_by_time)  # epochs before this update
        warmup_end = self.warmup_epochs or self.warmup_updates / self.updates_per_epoch
        decline_start = warmup_end if self.kind == "cosine" else max(self.lr_drop_epoch, warmup_end)
        if elapsed <= decline_start:
            share = 0.0
        elif elapsed >= self.epochs:  # also past the end of a run resumed with more epochs
            share = 1.0
        else:
            share = (elapsed - decline_start) / (self.epochs - decline_start)
        cosine = (1 + math.cos(math.pi * share)) / 2
        return self._warmup(update) * (self.min_lr_factor + (1 - self.min_lr_factor) * cosine)

    def _warmup(self, update: int) -> float:
        """The linear rise: the share of the warm-up done once ``update`` is."""
        if self.warmup_updates:
            return min(1.0, (update + 1) / self.warmup_updates)
        if self.warmup_epochs:
            done = max((update + 1) / self.updates_per_epoch, self.epochs_by_time)
            return min(1.0, done / self.warmup_epochs)
        return 1.0


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    schedule: str = "step",
    epochs: int = 50,
    lr_drop_epoch: int = 40,
    gamma: float = 0.1,
    updates_per_epoch: int = 1,
    warmup_updates: int = 0,
    warmup_epochs: float = 0.0,
    min_lr_factor: float = 0.0,
) -> LambdaLR:
    """:class:`LearningRateSchedule` over every group's learning rate, stepped after every optimiser update.

    The published recipe is ``step`` without a warm-up; a short warm-up lets a model trained from
    scratch take a higher learning rate.
    """
    return LambdaLR(optimizer, LearningRateSchedule(
        kind=schedule, epochs=epochs, lr_drop_epoch=lr_drop_epoch, gamma=gamma, updates_per_epoch=updates_per_epoch,
        warmup_updates=warmup_updates, warmup_epochs=warmup_epochs, min_lr_factor=min_lr_factor))
