"""One training step and one epoch of them: forward, the set loss, backward, the optimiser update."""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm import tqdm

from ..distributed import is_main_process
from .config import TrainConfig
from .criterion import SetCriterion


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


class NonFiniteLossError(TrainingError):
    """The loss of a training step is NaN or infinite; raised before its backward pass."""


def _batches(loader: Iterable, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
    for images, padding_mask, targets in loader:
        targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
        yield images.to(device), padding_mask.to(device), targets


def train_step(
    model: nn.Module,
    criterion: SetCriterion,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    padding_mask: torch.Tensor,
    targets: list[dict[str, torch.Tensor]],
    *,
    bf16: bool = False,
    clip_max_norm: float = 0.1,
    accumulation_steps: int = 1,
    update: bool = True,
) -> dict[str, torch.Tensor]:
    """One training step: forward, the set loss with its auxiliary terms, backward and, if ``update``,
    gradient clipping (``clip_max_norm`` > 0) and the optimiser step.

    The loss is divided by ``accumulation_steps``, so that that many calls, the last one updating,
    step by the mean of their gradients. Returns the losses and their weighted sum ``loss``, detached.
    Raises :class:`NonFiniteLossError` before the backward pass, leaving gradients and weights as they were.
    """
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
        outputs = model(images, padding_mask, targets=targets)  # the targets feed denoising queries, if any
    losses = criterion(_to_float(outputs), targets)
    loss = criterion.total_loss(losses)
    if not math.isfinite(loss.item()):
        raise NonFiniteLossError(f"non-finite loss ({loss.item()})")
    (loss / accumulation_steps).backward()
    if update:
        if clip_max_norm > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {name: value.detach() for name, value in {"loss": loss, **losses}.items()}


def train_one_epoch(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    scheduler: LRScheduler,
    *,
    device: torch.device,
    epoch: int,
    config: TrainConfig,
) -> dict[str, float]:
    """One pass over ``loader``; returns the epoch's mean weighted loss, its parts and images/s."""
    model.train()
    totals: dict[str, float] = {}
    steps = images_seen = 0
    start = time.perf_counter()
    progress = tqdm(_batches(loader, device), total=len(loader), desc=f"epoch {epoch}",
                    disable=not is_main_process(), dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    for step, (images, padding_mask, targets) in enumerate(progress):
        update = (step + 1) % config.accumulation_steps == 0 or step + 1 == len(loader)
        try:
            losses = train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=config.bf16,
                                clip_max_norm=config.clip_max_norm, accumulation_steps=config.accumulation_steps,
                                update=update)
        except NonFiniteLossError as error:
            raise TrainingError(
                f"{error} at epoch {epoch}, step {step}: stopping; the last good checkpoint is kept in "
                f"{config.output_dir}"
            ) from None
        if update:
            scheduler.step()
        steps += 1
        images_seen += len(images)
        for key, value in losses.items():
            totals[key] = totals.get(key, 0.0) + float(value)
        rate = images_seen / (time.perf_counter() - start)
        progress.set_postfix(loss=f"{totals['loss'] / steps:.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}",
                             images_s=f"{rate:.1f}")
    return {**{f"train_{key}": value / max(steps, 1) for key, value in totals.items()},
            "images_per_s": images_seen / (time.perf_counter() - start)}


def _to_float(value: Any) -> Any:
    # Losses in float32 whatever the autocast dtype of the outputs.
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, dict):
        return {key: _to_float(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_float(item) for item in value]
    return value
