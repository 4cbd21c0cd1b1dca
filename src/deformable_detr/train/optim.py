"""The published optimiser recipe: AdamW with three parameter groups, and a step learning-rate drop
(by epochs, or by the share of a training-time budget)."""

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


class StepSchedule:
    """The learning-rate factor of the ``update``-th optimiser update (``LambdaLR``'s ``lr_lambda``):
    a linear rise over the first ``warmup_updates`` updates, then ``gamma`` for each ``lr_drop_epoch``
    epochs passed.

    A run with a training-time budget also counts epochs by its clock, ``epochs_by_time`` (the share of
    the budget spent, times the run's epochs), which the training loop sets before each step; the
    further along of the two counts: the drop then falls at the same share of the budget on any
    machine. ``LambdaLR`` saves ``epochs_by_time`` with its state, so a resumed run keeps its clock.
    """

    def __init__(self, *, lr_drop_epoch: int, gamma: float, updates_per_epoch: int, warmup_updates: int) -> None:
        self.lr_drop_epoch, self.gamma, self.updates_per_epoch = lr_drop_epoch, gamma, updates_per_epoch
        self.warmup_updates = warmup_updates
        self.epochs_by_time = 0.0

    def __call__(self, update: int) -> float:
        warmup = min(1.0, (update + 1) / self.warmup_updates) if self.warmup_updates else 1.0
        epochs_passed = max(update // self.updates_per_epoch, math.floor(self.epochs_by_time))
        return warmup * self.gamma ** (epochs_passed // self.lr_drop_epoch)


def build_lr_scheduler(
    optimizer: Optimizer,
    *,
    lr_drop_epoch: int = 40,
    gamma: float = 0.1,
    updates_per_epoch: int = 1,
    warmup_updates: int = 0,
) -> LambdaLR:
    """:class:`StepSchedule` over every group's learning rate, stepped after every optimiser update.

    The published recipe has no warm-up; a short one lets a model trained from scratch take a
    higher learning rate.
    """
    return LambdaLR(optimizer, StepSchedule(lr_drop_epoch=lr_drop_epoch, gamma=gamma, updates_per_epoch=updates_per_epoch,
                                            warmup_updates=warmup_updates))
