"""One training step and an epoch of them: forward, the set loss, backward, the optimiser update."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..data.loader import TRAINING_STEP, derived_seed
from ..distributed import is_main_process, rank
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
    step by the mean of their gradients; under DistributedDataParallel the processes average their
    gradients once, in the updating call. Returns the losses and their weighted sum ``loss``,
    detached. Raises :class:`NonFiniteLossError` before the backward pass, leaving gradients and
    weights as they were.
    """
    # DDP reduces the gradients in every backward it sees, unless forward and backward run in no_sync.
    accumulating = not update and isinstance(model, DistributedDataParallel)
    with model.no_sync() if accumulating else contextlib.nullcontext():
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


@dataclass
class EpochProgress:
    """How far an epoch has gone, as a checkpoint within it saves it: the batches trained (those a
    resumed run skips) and what the epoch's log record averages."""

    batches: int = 0
    images: int = 0
    seconds: float = 0.0
    lr: float | None = None  # the learning rate of the epoch's first update
    totals: dict[str, float] = field(default_factory=dict)  # each loss summed over the batches trained

    def record(self) -> dict[str, float]:
        """The epoch's learning rate, mean losses (``train_*``) and images/s."""
        means = {f"train_{key}": value / max(self.batches, 1) for key, value in self.totals.items()}
        return {"lr": self.lr, **means, "images_per_s": self.images / max(self.seconds, 1e-9)}


# The losses logged for every optimiser update (the epoch's record has them all).
UPDATE_LOSSES = ("loss", "loss_ce", "loss_bbox", "loss_giou")


def train_updates(
    model: nn.Module,
    criterion: SetCriterion,
    loader: Iterable,
    optimizer: torch.optim.Optimizer,
    *,
    device: torch.device,
    epoch: int,
    batches: int,
    config: TrainConfig,
    progress: EpochProgress,
) -> Iterator[dict[str, float]]:
    """Train on ``loader``, the batches of epoch ``epoch`` (``batches`` in all) after the
    ``progress.batches`` already trained; after each optimiser update, with ``progress`` counting it,
    yield its learning rate and its :data:`UPDATE_LOSSES` averaged over its batches (the caller steps
    the learning-rate schedule). Each update steps by the mean gradient of its ``accumulation_steps``
    batches, or of the fewer that end the epoch.

    A batch's random draws in the model (dropout, denoising noise) come from torch's generator
    seeded by (seed, epoch, batch, process), so that a resumed run draws what an uninterrupted one does.
    """
    model.train()
    bar = tqdm(_batches(loader, device), initial=progress.batches, total=batches, desc=f"epoch {epoch}",
               disable=not is_main_process(), dynamic_ncols=True)
    optimizer.zero_grad(set_to_none=True)
    update_totals: dict[str, float] = {}
    update_batches = 0
    last = time.perf_counter()
    for images, padding_mask, targets in bar:
        index = progress.batches
        update = (index + 1) % config.accumulation_steps == 0 or index + 1 == batches
        group_start = index - index % config.accumulation_steps
        group_size = min(config.accumulation_steps, batches - group_start)
        lr = optimizer.param_groups[0]["lr"]
        _seed_draws(derived_seed(TRAINING_STEP, config.seed, epoch, index, rank()), device)
        try:
            losses = train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=config.bf16,
                                clip_max_norm=config.clip_max_norm, accumulation_steps=group_size,
                                update=update)
        except NonFiniteLossError as error:
            raise TrainingError(
                f"{error} at epoch {epoch}, step {index}: stopping; the last good checkpoint is kept in "
                f"{config.output_dir}"
            ) from None
        if progress.lr is None:
            progress.lr = lr
        now = time.perf_counter()
        progress.batches += 1
        progress.images += len(images)
        progress.seconds += now - last
        last = now
        for key, value in losses.items():
            progress.totals[key] = progress.totals.get(key, 0.0) + float(value)
            if key in UPDATE_LOSSES:
                update_totals[key] = update_totals.get(key, 0.0) + float(value)
        update_batches += 1
        bar.set_postfix(loss=f"{progress.totals['loss'] / progress.batches:.3f}", lr=f"{lr:.1e}",
                        images_s=f"{progress.images / progress.seconds:.1f}")
        if update:
            yield {"lr": lr, **{key: value / update_batches for key, value in update_totals.items()}}
            update_totals, update_batches = {}, 0


def _seed_draws(seed: int, device: torch.device) -> None:
    """Seed the generators of the CPU and of ``device``: what the model draws from. (torch.manual_seed
    seeds every kind of device there might be, at a hundred times the cost.)"""
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)


def _to_float(value: Any) -> Any:
    # Losses in float32 whatever the autocast dtype of the outputs.
    if isinstance(value, torch.Tensor):
        return value.float()
    if isinstance(value, dict):
        return {key: _to_float(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_float(item) for item in value]
    return value
