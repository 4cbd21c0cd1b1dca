"""The training checkpoint: what it holds beyond the model, when one is due within an epoch, and
continuing a run from it exactly."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from ..checkpoints import Checkpoint, read_checkpoint, save_checkpoint
from ..distributed import ONE_SHARED_FOLDER, hosts_by_value, is_main_process, world_size
from ..model import DeformableDETR
from .config import RESUMABLE_FIELDS, STARTING_WEIGHTS, TrainConfig, setting, setting_value
from .early_stopping import EarlyStopping
from .ema import WeightAverage
from .engine import EpochProgress, TrainingError

if TYPE_CHECKING:
    from ..data import CocoDataset


def save_training_checkpoint(
    path: Path,
    model: DeformableDETR,
    *,
    config: TrainConfig,
    class_names: dict[int, str],
    training_data: dict[str, Any],
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
    seen, the config (its data as an absolute path, which a resume without one finds from any working
    directory), the number of processes and what identifies the ``training_data`` (:func:`data_identity`).

    Nothing random is saved: the order of an epoch's samples, their augmentation and a step's draws
    in the model all follow from the seed and the position.
    """
    save_checkpoint(path, model, class_names=class_names, image_size=config.image_size,
                    optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                    epoch=epoch if progress is None else epoch - 1,  # the last epoch finished
                    epoch_progress=None if progress is None else dataclasses.asdict(progress),
                    best=best, training_seconds=training_seconds, world_size=world_size(),
                    train_config={**dataclasses.asdict(config), "data": os.path.abspath(config.data)},
                    training_data=training_data,
                    early_stopping=early_stopping.state(),
                    **({} if ema is None else {"ema": ema.state_dict()}))


def data_identity(dataset: CocoDataset) -> dict[str, Any]:
    """What identifies the data ``dataset`` holds, wherever it lies: its image and box counts, and a
    digest of its classes and of every image's file name, size and objects (class, box, crowd), in
    the order training reads them. The file names are as the split records them, relative to the data
    set's folder (but where a YOLO list names images by absolute paths)."""
    coco = dataset.coco
    images = [coco.imgs[image_id] for image_id in dataset.ids]
    content = [
        sorted(dataset.category_names.items()),
        [[image["file_name"], image["width"], image["height"],
          [[box["category_id"], box["bbox"], box.get("iscrowd", 0)] for box in coco.imgToAnns[image["id"]]]]
         for image in images],
    ]
    digest = hashlib.sha256(json.dumps(content).encode()).hexdigest()
    return {"images": len(images), "boxes": len(coco.anns), "sha256": digest}


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
# weights, "ema", only where the run keeps one; "training_data" where a version that records it wrote it).
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
        raise TrainingError(f"{path}: the processes find different files there ({views}): {ONE_SHARED_FOLDER}")
    return next(iter(found)) is not None


def _identity(path: Path) -> tuple[int, int] | None:
    """``path``'s size and modification time; None where there is no such file."""
    status = _status(path)
    return None if status is None else (status.st_size, status.st_mtime_ns)


def _version(path: Path) -> tuple[int, int, int] | None:
    """What tells one write of ``path`` from another to this process: its file (each atomic write
    renames a new one into place), size and modification time; None where there is no such file."""
    status = _status(path)
    return None if status is None else (status.st_ino, status.st_size, status.st_mtime_ns)


def _status(path: Path) -> os.stat_result | None:
    try:
        # Opened, not only looked up: NFS asks its server for an opened file's attributes
        # (close-to-open), where a lookup may answer from a cache older than the last checkpoint.
        with path.open("rb") as file:
            return os.fstat(file.fileno())
    except FileNotFoundError:
        return None


def _describe(identity: tuple[int, int] | None) -> str:
    if identity is None:
        return "none"
    size, modified = identity
    return f"{size / 1e6:.1f} MB written {datetime.fromtimestamp(modified / 1e9):%Y-%m-%d %H:%M:%S}"


def resume_from(
    path: Path, config: TrainConfig, *, training_data: dict[str, Any], model: DeformableDETR, optimizer: Optimizer,
    scheduler: LRScheduler, early_stopping: EarlyStopping,
) -> ResumePoint:
    """Load the run saved in ``path`` into ``model`` (the weights as trained, not their average),
    ``optimizer``, ``scheduler`` (the schedule as saved, never overridden) and ``early_stopping``;
    where it goes on, with the state of the weights' average.

    Raises:
        TrainingError: ``config`` changes what the run trains (see :func:`check_resumable`), its
            ``training_data`` (:func:`data_identity`) are not the run's, or the number of processes
            is not the run's.
    """
    checkpoint = run_checkpoint(path)
    forget_run_checkpoint()  # the model and optimiser hold what the run needs of it
    extra = checkpoint.extra
    missing = [key for key in _RESUMED if key not in extra]
    if missing:
        raise TrainingError(f"{path}: not a training checkpoint this version resumes (no {', '.join(missing)}); "
                            f"start a new run from its weights with {setting('finetune_from', str(path))}")
    check_resumable(path, extra["train_config"], config)
    _check_same_data(path, extra.get("training_data"), training_data, config)
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


# Settings of which a run has one at most (the command takes one of their flags): the one given is
# the run's whole choice, not one that the run's other would meet as if both had been given.
_ONE_OR_THE_OTHER = ({"warmup_steps", "warmup_epochs"},)


def with_recorded_settings(settings: dict[str, Any]) -> TrainConfig:
    """The TrainConfig of ``settings`` (those a command line gives): where they resume (``resume``) a
    run that their ``output_dir`` holds, its recorded settings stand for those not given, so that a
    resume names only what it changes, and given ones that change what it trains are refused as it
    resumes (:func:`check_resumable`). Model options given join the run's, and a warm-up given in
    one unit replaces the run's in the other."""
    path = Path(settings["output_dir"]) / "checkpoint.pt"
    recorded = _recorded_settings(path) if settings.get("resume") else {}
    for pair in _ONE_OR_THE_OTHER:
        if settings.keys() & pair:
            recorded = {name: value for name, value in recorded.items() if name not in pair}
    model_overrides = {**recorded.get("model_overrides", {}), **settings.get("model_overrides", {})}
    combined = {**recorded, **settings, "model_overrides": model_overrides}
    if "data" not in combined:
        there = f" ({path}: no run to resume)" if settings.get("resume") else ""
        raise ValueError(f"{setting('data')} is needed to start a run{there}")
    return TrainConfig(**combined)


def _recorded_settings(path: Path) -> dict[str, Any]:
    """The settings the run saved in ``path`` was started with, of those this version has, but where
    its files go and whether it resumes; none where there is no such file."""
    if not path.is_file():
        return {}
    recorded = run_checkpoint(path).extra.get("train_config", {})  # none: resume_from says what it is
    wanted = {field.name for field in dataclasses.fields(TrainConfig)} - {"output_dir", "resume"}
    return {name: value for name, value in recorded.items() if name in wanted}


# The checkpoint of the run being resumed, by its resolved path and the version (_version) of the file
# read: its settings, its model and its state are each taken from one read of the file, all of its
# weights and optimiser state.
_kept: dict[Path, tuple[tuple[int, int, int] | None, Checkpoint]] = {}


def run_checkpoint(path: Path) -> Checkpoint:
    """The run's checkpoint ``path``: as last read, where the file is still the one read then (a
    resumed run may wait for its predecessor to end, which writes on), else read now and kept."""
    version = _version(path)  # before reading: a write in between is then taken for a change
    kept_version, checkpoint = _kept.get(path.resolve(), (None, None))
    if checkpoint is None or kept_version != version:
        checkpoint = read_checkpoint(path)
        _kept.clear()
        _kept[path.resolve()] = version, checkpoint
    return checkpoint


def forget_run_checkpoint() -> None:
    """Let go of the checkpoint :func:`run_checkpoint` keeps, once the run has what it needs of it (or
    has stopped): a process that goes on, in Python, would hold it."""
    _kept.clear()


def check_resumable(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run saved in ``path`` (its ``stored`` TrainConfig) with settings that change
    what it trains; only :data:`RESUMABLE_FIELDS` may differ. A field the run does not store (added
    to TrainConfig after it was saved) counts as its default, which is how the run trained."""
    defaults = dataclasses.asdict(TrainConfig(data="", output_dir=""))
    differing = []
    for name, value in dataclasses.asdict(config).items():
        was = stored.get(name, defaults[name])
        if name not in (*RESUMABLE_FIELDS, "resume") and _as_trained(name, was) != _as_trained(name, value):
            differing.append(f"{setting(name, was)} (now {setting_value(value)})")
    if differing:
        raise TrainingError(
            f"{path}: the run was trained with other settings: {', '.join(differing)}; resume with its settings "
            f"(only {', '.join(map(setting, RESUMABLE_FIELDS))} may change) or start a new run in another output "
            f"directory"
        )


def _as_trained(name: str, value: Any) -> Any:
    """What of the setting ``name``'s ``value`` changes what a run trains: of the weights it started
    from, whether there were any (:data:`STARTING_WEIGHTS`); of any other setting, the value."""
    return value is not None if name in STARTING_WEIGHTS else value


def _check_same_data(path: Path, recorded: dict[str, Any] | None, now: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run saved in ``path`` on training data other than those it ``recorded``
    (:func:`data_identity`; a run saved before this version recorded none, and is not checked)."""
    if recorded is None or recorded["sha256"] == now["sha256"]:
        return
    then, counts = (f"{data['images']} images and {data['boxes']} boxes" for data in (recorded, now))
    differ = f"{then} then, {counts} now" if then != counts else f"{counts} as then, but other objects"
    raise TrainingError(
        f"{config.data}: its {config.train_split!r} split is not the one the run in {path} trained on ({differ}): "
        f"resume it on that data, or start a new run from its weights ({setting('finetune_from', str(path))})"
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
