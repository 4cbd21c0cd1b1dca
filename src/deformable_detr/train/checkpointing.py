"""The training checkpoint: what it holds beyond the model, when one is due within an epoch, and
continuing a run from it exactly."""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..checkpoints import read_checkpoint, save_checkpoint
from ..distributed import hosts_by_value, is_main_process, world_size
from ..model import DeformableDETR
from .config import RESUMABLE_FIELDS, TrainConfig, setting, setting_value
from .early_stopping import EarlyStopping
from .ema import WeightAverage
from .engine import EpochProgress, TrainingError


def save_training_checkpoint(
    path: Path,
    model: DeformableDETR,
    *,
    config: TrainConfig,
    class_names: dict[int, str],
    optimizer: Optimizer,
    scheduler: LRScheduler,
    ema: WeightAverage | None,
    early_stopping: EarlyStopping,
    epoch: int,
    progress: EpochProgress | None,
    best: dict[str, Any],
    training_seconds: float,
) -> None:
    """Write ``model`` and all a resumed run needs to go on as if never stopped, atomically: the
    optimiser and learning-rate schedule, the average of the weights (``ema``, whose weights are then
    those the checkpoint is used with: :func:`~deformable_detr.checkpoints.read_checkpoint`), where the
    run is (``epoch``, and ``progress`` into it, or None once it has ended), the training time of the
    epochs finished (``progress`` has the rest), the best epoch's record, what early stopping has
    seen, the config and the number of processes.

    Nothing random is saved: the order of an epoch's samples, their augmentation and a step's draws
    in the model all follow from the seed and the position.
    """
    save_checkpoint(path, model, class_names=class_names, image_size=config.image_size,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    epoch=epoch if progress is None else epoch - 1,  # the last epoch finished
                    epoch_progress=None if progress is None else dataclasses.asdict(progress),
                    best=best, training_seconds=training_seconds, world_size=world_size(),
                    train_config=dataclasses.asdict(config), early_stopping=early_stopping.state(),
                    **({} if ema is None else {"ema": ema.state_dict()}))


@dataclass
class ResumePoint:
    """Where a run goes on: ``epoch`` (the first not finished) after ``progress`` into it."""

    epoch: int = 0
    progress: EpochProgress = dataclasses.field(default_factory=EpochProgress)
    best: dict[str, Any] = dataclasses.field(default_factory=dict)  # the best epoch's log record
    best_ap: float = -1.0
    training_seconds: float = 0.0  # of the epochs finished
    ema: dict[str, Any] | None = None  # the state of the weights' average (WeightAverage.load_state_dict)

    @property
    def minutes_trained(self) -> float:
        """The run's training time up to here."""
        return (self.training_seconds + self.progress.seconds) / 60

    def describe(self, batches: int) -> str:
        """``epoch 3`` or ``epoch 3, batch 40 of 100``, for messages."""
        within = f", batch {self.progress.batches} of {batches}" if self.progress.batches else ""
        return f"epoch {self.epoch}{within}"


# What save_training_checkpoint writes beyond the model, and a resumed run reads (the average of the
# weights, "ema", only where the run keeps one).
_RESUMED = ("train_config", "world_size", "optimizer", "scheduler", "early_stopping", "epoch", "epoch_progress",
            "best", "training_seconds")


def found_by_every_process(path: Path) -> bool:
    """Whether the checkpoint ``path`` exists, every process finding the same file there (by its size
    and modification time, which tell one write from another).

    Raises:
        TrainingError: the processes find different files there, or some find none: the nodes'
            own disks rather than one folder they share, where each would go on from another point.
    """
    found = hosts_by_value(_identity(path))
    if len(found) > 1:
        views = "; ".join(f"{_describe(identity)} on {', '.join(hosts)}" for identity, hosts in found.items())
        raise TrainingError(f"{path}: the processes find different files there ({views}): the output directory "
                            f"must be one folder that every node shares, as the main process alone writes it")
    return next(iter(found)) is not None


def _identity(path: Path) -> tuple[int, int] | None:
    """``path``'s size and modification time; None where there is no such file."""
    try:
        # Opened, not only looked up: NFS asks its server for an opened file's attributes
        # (close-to-open), where a lookup may answer from a cache older than the last checkpoint.
        with path.open("rb") as file:
            status = os.fstat(file.fileno())
    except FileNotFoundError:
        return None
    return status.st_size, status.st_mtime_ns


def _describe(identity: tuple[int, int] | None) -> str:
    if identity is None:
        return "none"
    size, modified = identity
    return f"{size / 1e6:.1f} MB written {datetime.fromtimestamp(modified / 1e9):%Y-%m-%d %H:%M:%S}"


def resume_from(
    path: Path, config: TrainConfig, *, model: DeformableDETR, optimizer: Optimizer, scheduler: LRScheduler,
    early_stopping: EarlyStopping,
) -> ResumePoint:
    """Load the run saved in ``path`` into ``model`` (the weights as trained, not their average),
    ``optimizer``, ``scheduler`` (the schedule as saved, never overridden) and ``early_stopping``;
    where it goes on, with the state of the weights' average.

    Raises:
        TrainingError: ``config`` changes what the run trains (see :func:`check_resumable`), or the
            number of processes is not the run's.
    """
    checkpoint = read_checkpoint(path)
    extra = checkpoint.extra
    missing = [key for key in _RESUMED if key not in extra]
    if missing:
        raise TrainingError(f"{path}: not a training checkpoint this version resumes (no {', '.join(missing)}); "
                            f"start a new run from its weights with {setting('finetune_from', str(path))}")
    check_resumable(path, extra["train_config"], config)
    # The global batch, the learning-rate schedule's updates per epoch and each process's share of
    # an epoch's samples all follow from it: a run on another number would be no continuation.
    processes = extra["world_size"]
    if processes != world_size():
        raise TrainingError(
            f"{path}: the run was trained by {processes} process(es), now {world_size()}: resume it with "
            f"{processes} (torchrun --nproc-per-node {processes}), as its batches, learning-rate schedule and "
            f"order depend on it; or start a new run from its weights ({setting('finetune_from', str(path))})"
        )
    model.load_state_dict(extra.get("model", checkpoint.state_dict))  # as trained, not the average
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    early_stopping.restore(extra["early_stopping"])
    best, progress = extra["best"], extra["epoch_progress"]
    return ResumePoint(extra["epoch"] + 1, EpochProgress(**progress) if progress else EpochProgress(), best,
                       best.get("AP", -1.0), extra["training_seconds"], extra.get("ema"))


def check_resumable(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run saved in ``path`` (its ``stored`` TrainConfig) with settings that change
    what it trains; only :data:`RESUMABLE_FIELDS` may differ. A field the run does not store (added
    to TrainConfig after it was saved) counts as its default, which is how the run trained."""
    defaults = dataclasses.asdict(TrainConfig(data="", output_dir=""))
    differing = [
        f"{setting(name, stored.get(name, defaults[name]))} (now {setting_value(value)})"
        for name, value in dataclasses.asdict(config).items()
        if name not in (*RESUMABLE_FIELDS, "resume") and stored.get(name, defaults[name]) != value
    ]
    if differing:
        raise TrainingError(
            f"{path}: the run was trained with other settings: {', '.join(differing)}; resume with its settings "
            f"(only {', '.join(map(setting, RESUMABLE_FIELDS))} may change) or start a new run in another output directory"
        )


class CheckpointSchedule:
    """When a checkpoint within an epoch is due: every ``every`` optimiser updates of the run, and
    once ``minutes`` have passed since the last checkpoint by the main process's clock (either, both
    or neither)."""

    def __init__(self, *, every: int | None, minutes: float | None) -> None:
        self.every = every  # both checked by TrainConfig
        self.minutes = minutes
        self.written()

    def due(self, update: int) -> bool:
        """Whether a checkpoint is due after the run's ``update``-th update (on this process: the
        main process's answer is the one all must follow)."""
        by_count = self.every is not None and update % self.every == 0
        by_time = self.minutes is not None and is_main_process() and time.monotonic() - self._last >= self.minutes * 60
        return by_count or by_time

    def written(self) -> None:
        """A checkpoint has just been written."""
        self._last = time.monotonic()
