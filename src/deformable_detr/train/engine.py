"""One training step and an epoch of them: forward, the set loss, backward, the optimiser update."""

from __future__ import annotations

import contextlib
import itertools
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
from .criterion import SetCriterion, average_num_boxes


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


class NonFiniteLossError(TrainingError):
    """The loss of a training step is NaN or infinite; raised before its backward pass."""


Batch = tuple[torch.Tensor, torch.Tensor, list[dict[str, torch.Tensor]]]  # images, padding mask, targets


def _on(device: torch.device, batch: Batch) -> Batch:
    images, padding_mask, targets = batch
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    return images.to(device), padding_mask.to(device), targets


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
    update_boxes: float | None = None,
    update: bool = True,
) -> dict[str, torch.Tensor]:
    """One training step: forward, the set loss with its auxiliary terms, backward and, if ``update``,
    gradient clipping (``clip_max_norm`` > 0) and the optimiser step.

    Several calls, all but the last with ``update`` False, accumulate their gradients into one update;
    under DistributedDataParallel the processes average their gradients once, in the updating call.
    ``update_boxes`` is then the target boxes per process of all those batches
    (:func:`~.criterion.average_num_boxes` of their targets): each batch's gradient is scaled so that
    every box of the update weighs the same, as in one batch of them all. By default, this batch's.

    Returns this batch's losses, each divided by its own box count (as logged), and their weighted
    sum ``loss``, detached. Raises :class:`NonFiniteLossError` before the backward pass, leaving
    gradients and weights as they were.
    """
    # DDP reduces the gradients in every backward it sees, unless forward and backward run in no_sync.
    accumulating = not update and isinstance(model, DistributedDataParallel)
    with model.no_sync() if accumulating else contextlib.nullcontext():
        with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=bf16):
            outputs = _to_float(model(images, padding_mask, targets=targets))  # the targets feed denoising queries, if any
        # Checked before the loss: the matcher's assignment refuses a NaN cost with an error of its own.
        if not _all_finite(outputs):
            raise NonFiniteLossError("non-finite model outputs (NaN or infinity)")
        batch_boxes = average_num_boxes(targets, device=images.device)
        losses = criterion(outputs, targets, num_boxes=batch_boxes)
        loss = criterion.total_loss(losses)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"non-finite loss ({loss.item()})")
        (loss * (batch_boxes / (update_boxes or batch_boxes))).backward()
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

    def add(self, images: int, seconds: float, losses: dict[str, float]) -> None:
        """Count one batch trained: its ``images``, the ``seconds`` it took and its ``losses``."""
        self.batches += 1
        self.images += images
        self.seconds += seconds
        for key, value in losses.items():
            self.totals[key] = self.totals.get(key, 0.0) + value

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
    the learning-rate schedule). Each update accumulates ``accumulation_steps`` batches, or the fewer
    that end the epoch, every box of them weighing the same (:func:`train_step`).

    A batch's random draws in the model (dropout, denoising noise) come from torch's generator
    seeded by (seed, epoch, batch, process), so that a resumed run draws what an uninterrupted one does.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    last = time.perf_counter()
    with tqdm(initial=progress.batches, total=batches, desc=f"epoch {epoch}", disable=not is_main_process(),
              dynamic_ncols=True) as bar:  # fmt: skip
        for group in _update_groups(loader, progress.batches, batches, config.accumulation_steps):
            # An update's box count is known before its first backward: its batches are read first. A
            # single batch's is its own, which train_step counts anyway (a sync across processes).
            update_boxes = None
            if len(group) > 1:
                update_boxes = average_num_boxes([target for _, _, targets in group for target in targets], device=device)
            lr = optimizer.param_groups[0]["lr"]
            if progress.lr is None:
                progress.lr = lr
            update_totals: dict[str, float] = {}
            for position, batch in enumerate(group):
                index = progress.batches
                images, padding_mask, targets = _on(device, batch)
                _seed_draws(derived_seed(TRAINING_STEP, config.seed, epoch, index, rank()), device)
                try:
                    losses = train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=config.bf16,
                                        clip_max_norm=config.clip_max_norm, update_boxes=update_boxes,
                                        update=position == len(group) - 1)
                except NonFiniteLossError as error:
                    raise TrainingError(
                        f"{error} at epoch {epoch}, step {index}: stopping; the last good checkpoint is kept in "
                        f"{config.output_dir}"
                    ) from None
                now = time.perf_counter()
                progress.add(len(images), now - last, {key: float(value) for key, value in losses.items()})
                last = now
                for key in UPDATE_LOSSES:
                    if key in losses:
                        update_totals[key] = update_totals.get(key, 0.0) + float(losses[key])
                bar.update()
                bar.set_postfix(loss=f"{progress.totals['loss'] / progress.batches:.3f}", lr=f"{lr:.1e}",
                                images_s=f"{progress.images / progress.seconds:.1f}")
            yield {"lr": lr, **{key: total / len(group) for key, total in update_totals.items()}}


def _update_groups(loader: Iterable, first: int, batches: int, accumulation_steps: int) -> Iterator[list[Batch]]:
    """The batches of ``loader`` (batch ``first`` on, of ``batches``), in the groups that make one
    optimiser update each: ``accumulation_steps`` at a time from the epoch's start, fewer at its end."""
    iterator = iter(loader)
    index = first
    while index < batches:
        group = list(itertools.islice(iterator, min(accumulation_steps - index % accumulation_steps, batches - index)))
        if not group:
            return
        yield group
        index += len(group)


def _all_finite(outputs: Any) -> bool:
    """Whether every floating tensor of the model's ``outputs`` (nested in dicts and lists) is finite."""
    tensors = []
    pending = [outputs]
    while pending:
        value = pending.pop()
        if isinstance(value, dict):
            pending += value.values()
        elif isinstance(value, list):
            pending += value
        elif isinstance(value, torch.Tensor) and value.is_floating_point():
            tensors.append(value.isfinite().all())
    return bool(torch.stack(tensors).all())


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
