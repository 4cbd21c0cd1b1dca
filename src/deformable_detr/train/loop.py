"""The training run: data, model and optimiser set up, then epochs of training and evaluation, with
checkpoints, logs and resumption (DETR's ``main.py``; one epoch is :mod:`.engine`'s)."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import random
import shutil
import statistics
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LambdaLR

from ..checkpoints import Checkpoint, read_checkpoint
from ..config import TRAINING_OPTIONS, ModelConfig, preset_of
from ..data import (
    CocoDataset,
    ImageProbe,
    SplitReport,
    batches_per_epoch,
    check_same_classes,
    data_loader,
    detect_format,
    load_split,
    recipe,
    split_names,
)
from ..distributed import (
    any_process,
    describe_world,
    folder_held,
    is_distributed,
    is_main_process,
    main_process_decides,
    rank,
    setup_distributed,
    share_buffers,
    wait_for_all,
    world_size,
)
from ..evaluation import CocoEvaluator, checkpoint_evaluation, detect_all, format_metrics, write_evaluation_report
from ..files import atomic_write, remove_abandoned_writes
from ..model import DeformableDETR, build_model
from ..model.detector import TRAINING_ONLY
from .checkpointing import (
    CheckpointSchedule,
    ResumePoint,
    data_identity,
    forget_run_checkpoint,
    found_by_every_process,
    resume_from,
    run_checkpoint,
    save_training_checkpoint,
)
from .config import MODEL_OPTIONS, VAL_SPLIT, TrainConfig, setting
from .criterion import SetCriterion
from .early_stopping import EarlyStopping
from .ema import WeightAverage
from .engine import EpochProgress, TrainingError, train_updates
from .logger import Logger
from .optim import build_lr_scheduler, build_optimizer
from .preemption import REQUEUE_STATUS, StopSignals, TrainingStopped


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


# The tensors with a row per class id, of another shape in a checkpoint of another class count.
_CLASS_TENSORS = ("class_embed", "denoising_label_embed")


def _finetune(model: DeformableDETR, checkpoint: Checkpoint, class_names: dict[int, str]) -> str:
    """Load every weight of ``checkpoint``, its training-only tensors where the run's options have
    them (:func:`_without_unfit_training_tensors`). The class heads' rows follow the data's classes
    (``class_names``) by name where the checkpoint records its classes' names, the rows of classes it
    lacks starting anew; otherwise they are kept where the class count is the same, and start anew
    where not.

    Returns a one-line report of the class heads and of training-only tensors started anew. Raises
    :class:`TrainingError` where any other weight differs (another ``num_queries`` or ``d_model``
    would otherwise train from scratch unnoticed)."""
    path, own = checkpoint.path, model.state_dict()
    weights = _without_unfit_training_tensors(checkpoint.state_dict, own)
    for name, tensor in weights.items():
        if name in own and own[name].shape != tensor.shape and not _is_class_tensor(name):
            raise TrainingError(f"{path}: {name} is {tuple(tensor.shape)} there but {tuple(own[name].shape)} in the "
                                f"model being trained: only the class heads may differ: "
                                f"{_how_models_differ(checkpoint.config, model.config)}")
    heads = {name: tensor for name, tensor in weights.items() if name in own and _is_class_tensor(name)}
    if checkpoint.class_names is None:
        fitted, report = _heads_by_id(heads, own, checkpoint.config.num_classes, model.config.num_classes)
    else:
        fitted, report = _heads_by_name(heads, own, _rows_by_name(checkpoint.class_names, class_names), class_names)
    missing, unexpected = model.load_state_dict({**weights, **fitted}, strict=False)
    started = [name for name in missing if name.startswith(TRAINING_ONLY)]
    missing = [name for name in missing if name not in started]
    if missing or unexpected:
        raise TrainingError(f"{path}: does not fit the {model.config.backbone} model being trained "
                            f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    if model.config.mixed_query_selection:
        model.transformer.clear_content_gain()
    preset = preset_of(model.config)  # which a run without a preset takes from the checkpoint
    trained = f" as {setting('preset', preset)}" if preset else ""
    started_anew = f"; training-only {', '.join(started)} started anew" if started else ""
    return f"fine-tuning from {path}{trained}: {report}{started_anew}"


def _how_models_differ(checkpoint: ModelConfig, trained: ModelConfig) -> str:
    """How the model trained, as the run's preset and options make it, differs from the checkpoint's:
    the options whose values differ, and what trains the checkpoint's instead."""
    differing = [name for name in MODEL_OPTIONS
                 if name not in TRAINING_OPTIONS and getattr(checkpoint, name) != getattr(trained, name)]
    if not differing:
        return "its config is the run's model's, but its weights do not fit it"
    more = f" and {len(differing) - 3} more" if len(differing) > 3 else ""
    theirs = ", ".join(f"{name} {getattr(checkpoint, name)}" for name in differing[:3])
    ours = ", ".join(str(getattr(trained, name)) for name in differing[:3])
    preset = preset_of(checkpoint)
    named = f" ({setting('preset', preset)})" if preset else ""
    return (f"the checkpoint's model{named} has {theirs}{more} where the run's has {ours}; without {setting('preset')} "
            "and those options a run trains the checkpoint's")


def _without_unfit_training_tensors(weights: dict[str, Tensor], own: dict[str, Tensor]) -> dict[str, Tensor]:
    """``weights`` without the training-only tensors (denoising, hybrid matching) that the model being
    trained (``own``) lacks or has in another shape (another number of one-to-many queries). They
    belong to a run's options, not to the published model, so that a checkpoint trained with other
    options (a released one, the demo's) fine-tunes into any: the run's own start anew."""
    def fits(name: str, tensor: Tensor) -> bool:
        # A class tensor of another class count is fitted to the data's classes as the heads are.
        return name in own and (own[name].shape == tensor.shape or _is_class_tensor(name))

    return {name: tensor for name, tensor in weights.items() if not name.startswith(TRAINING_ONLY) or fits(name, tensor)}


def _checkpoint_architecture(config: TrainConfig, starting_point: Checkpoint | None, last_path: Path) -> ModelConfig | None:
    """The model a run without a preset trains (:meth:`TrainConfig.model_config`): its
    ``starting_point``'s, or resumed, the one its own checkpoint records, as the weights it started
    from may have moved since. None for a run of a preset."""
    if config.preset is not None:
        return None
    return starting_point.config if starting_point is not None else run_checkpoint(last_path).config


def _build(model_config: ModelConfig, *, resuming: bool) -> DeformableDETR:
    """The model of ``model_config``. A resumed run's weights all come from its checkpoint, so its
    backbone's starting weights are not read, nor downloaded (a cluster node may have no internet)
    only to be replaced; its config still names them, for the checkpoints it writes."""
    if not resuming:
        return build_model(model_config)
    model = build_model(dataclasses.replace(model_config, backbone_weights=None))
    model.config = model_config
    return model


def _is_class_tensor(name: str) -> bool:
    return any(part in _CLASS_TENSORS for part in name.split("."))


def _heads_by_id(heads: dict[str, Tensor], own: dict[str, Tensor], old_count: int,
                 new_count: int) -> tuple[dict[str, Tensor], str]:
    """The class heads where the checkpoint does not name its classes: ``heads`` as they are, or
    ``own`` (new ones) where the class count differs; and the report."""
    if old_count == new_count:
        return heads, "every weight loaded"
    return ({name: own[name] for name in heads}, f"class heads re-initialised for {new_count} classes (checkpoint "
                                                  f"had {old_count}): {', '.join(sorted(heads))}")


def _rows_by_name(old_names: dict[int, str], new_names: dict[int, str]) -> dict[int, int]:
    """For each class id of ``new_names`` whose name is that of one class of ``old_names``, that
    class's id. (A name several classes share, which the data check allows, tells none of them.)"""
    old_ids, new_ids = _ids_by_name(old_names), _ids_by_name(new_names)
    return {new_ids[name]: old_ids[name] for name in new_ids.keys() & old_ids.keys()}


def _ids_by_name(names: dict[int, str]) -> dict[str, int]:
    """The id of each name that only one class has."""
    ids: dict[str, list[int]] = {}
    for class_id, name in names.items():
        ids.setdefault(name, []).append(class_id)
    return {name: found[0] for name, found in ids.items() if len(found) == 1}


def _heads_by_name(heads: dict[str, Tensor], own: dict[str, Tensor], rows: dict[int, int],
                   class_names: dict[int, str]) -> tuple[dict[str, Tensor], str]:
    """The class heads with each of the data's classes (``class_names``) in the checkpoint's row of
    its name (``rows``: new id -> checkpoint id), and ``own`` (new) rows for the others; and the report."""
    same_ids = all(old == new for new, old in rows.items()) and len(rows) == len(class_names)
    if same_ids and all(tensor.shape == own[name].shape for name, tensor in heads.items()):
        return heads, "every weight loaded"
    new_ids, old_ids = list(rows), list(rows.values())
    fitted = {}
    for name, tensor in heads.items():
        fitted[name] = own[name].clone()
        fitted[name][new_ids] = tensor[old_ids]
    moved = sum(new != old for new, old in rows.items())
    started = [name for class_id, name in sorted(class_names.items()) if class_id not in rows]
    more = f" and {len(started) - 5} more" if len(started) > 5 else ""
    return fitted, (f"class heads taken by class name for {len(rows)} of the data's {len(class_names)} classes"
                    + (f" ({moved} at another id)" if moved else "")
                    + (f"; started anew for {', '.join(started[:5])}{more}" if started else ""))


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the last epoch's log record.

    ``output_dir`` receives ``checkpoint.pt`` (atomically, after every epoch and, as
    ``checkpoint_every`` and ``checkpoint_minutes`` say, within epochs; what ``resume`` reads),
    ``best.pt`` (best validation AP), ``log.jsonl`` (a record per epoch), ``steps.jsonl`` (one per
    optimiser update), ``tensorboard/``, ``curves.png`` (the losses and AP so far, after every epoch)
    and, at the end, ``report/``: the evaluation report of ``best.pt`` (docs/report.md). SIGTERM, SIGUSR1 or SIGINT stops it after the current
    update with the checkpoint written, raising :class:`TrainingStopped` (docs/preemption.md), unless
    the run ends there anyway. A run resumed once complete trains nothing and returns ``{}``, having
    written the report where a stop or a kill came before it.

    The main process locks ``output_dir`` (``.lock``) for the run: another run there is refused, a
    resumed one after waiting :data:`OUTPUT_LOCK_WAIT_SECONDS` for its predecessor to end. A run
    that made ``output_dir`` and fails before it writes there (bad data, weights it cannot read)
    removes it.
    """
    device = setup_distributed(config.rendezvous_timeout)
    if is_distributed():
        _print(describe_world())
    output_dir = Path(config.output_dir)
    made = _make_folder(output_dir)
    try:
        with folder_held(output_dir, wait=OUTPUT_LOCK_WAIT_SECONDS if config.resume else 0.0, error=TrainingError):
            return _train(config, device, output_dir)
    except BaseException:
        if made is not None and is_main_process():
            _remove_if_unused(output_dir, made)
        raise
    finally:
        forget_run_checkpoint()  # where a resumed run stopped before it took its state


def _make_folder(folder: Path) -> Path | None:
    """Make ``folder`` and its missing parents; the first of them this made, None where it was there."""
    missing = [path for path in (folder, *folder.parents) if not path.exists()]
    folder.mkdir(parents=True, exist_ok=True)
    return missing[-1] if missing else None


def _remove_if_unused(folder: Path, made: Path) -> None:
    """Remove ``folder`` and its parents up to ``made`` where it holds nothing but its lock: a run
    that failed before it began leaves no empty folder behind. (Whatever cannot be removed stays:
    the failure is what the run reports.)"""
    if any(path.name != ".lock" for path in folder.iterdir()):
        return
    with contextlib.suppress(OSError):
        (folder / ".lock").unlink(missing_ok=True)
        for empty in (folder, *folder.parents):
            empty.rmdir()
            if empty == made:
                return


def _train(config: TrainConfig, device: torch.device, output_dir: Path) -> dict[str, Any]:
    """:func:`train`'s run, on ``device``, once this run holds ``output_dir``."""
    last_path, best_path = output_dir / "checkpoint.pt", output_dir / "best.pt"
    schedule = CheckpointSchedule(every=config.checkpoint_every, minutes=config.checkpoint_minutes)
    resuming = _resuming(config, last_path)
    _seed_everything(config.seed + rank())

    train_set, val_set = _datasets(config)
    hint = None if resuming else _image_size_hint(train_set, config)
    if hint is not None:
        _print(hint)
    training_data = data_identity(train_set)
    if val_set is None and config.patience is not None:
        raise TrainingError(f"{config.data}: no validation split, so nothing for {setting('patience')} to count")
    if config.num_classes is not None and config.num_classes < train_set.num_classes:
        raise TrainingError(f"{config.data}: category ids go up to {train_set.num_classes - 1}, so {setting('num_classes')} "
                            f"must be at least {train_set.num_classes}, not {config.num_classes}")
    starting_point = None if resuming or not config.finetune_from else read_checkpoint(config.finetune_from)
    architecture = _checkpoint_architecture(config, starting_point, last_path)
    model_config = config.model_config(config.num_classes or train_set.num_classes, architecture)
    model = _build(model_config, resuming=resuming).to(device)
    if is_distributed() and device.type == "cuda":
        # Batch norm over the global batch. torch's SyncBatchNorm needs an accelerator (its training
        # forward raises on CPU tensors), so on the CPU each process normalises by its own share of
        # the batch, and the running statistics kept are the main process's (share_buffers).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict names as BatchNorm2d
    criterion = SetCriterion(one_to_many_repeats=config.one_to_many_repeats, one_to_many_weight=config.one_to_many_weight,
                             iou_aware=config.iou_aware_classification)
    optimizer = build_optimizer(model, lr=config.lr, lr_backbone=config.lr_backbone, weight_decay=config.weight_decay)
    batches = batches_per_epoch(len(train_set), config.batch_size)
    updates_per_epoch = math.ceil(batches / config.accumulation_steps)
    scheduler = build_lr_scheduler(optimizer, schedule=config.lr_schedule, epochs=config.epochs,
                                   lr_drop_epoch=config.lr_drop_epoch, updates_per_epoch=updates_per_epoch,
                                   warmup_updates=config.warmup_steps, warmup_epochs=config.warmup_epochs,
                                   min_lr_factor=config.min_lr_factor)
    stopping = EarlyStopping(config.patience, config.min_improvement)

    def updates_before(epoch: int, progress: EpochProgress) -> int:
        """The run's optimiser updates before ``progress`` into ``epoch``: the step of its logs."""
        return epoch * updates_per_epoch + math.ceil(progress.batches / config.accumulation_steps)

    def save(epoch: int, progress: EpochProgress | None, *, improved: bool = False) -> None:
        """Write checkpoint.pt, and where the epoch ``improved`` best.pt first: a kill between the
        two then leaves a checkpoint.pt from before the epoch, whose resumed run makes the same best.pt
        again, never one that names an epoch best.pt does not hold."""
        if is_main_process():
            path = best_path if improved else last_path
            save_training_checkpoint(path, model, config=config, class_names=train_set.category_names,
                                     training_data=training_data, optimizer=optimizer, scheduler=scheduler, ema=ema,
                                     early_stopping=stopping, epoch=epoch, progress=progress, best=best,
                                     training_seconds=training_seconds)
            if improved:
                _copy_atomically(best_path, last_path)
        schedule.written()

    if is_main_process():
        remove_abandoned_writes(output_dir, ["checkpoint.pt", "best.pt", "log.jsonl", "steps.jsonl", "curves.png"])
    start = ResumePoint()
    if resuming:
        start = resume_from(last_path, config, training_data=training_data, model=model, optimizer=optimizer,
                            scheduler=scheduler, early_stopping=stopping)
        complete = _why_complete(start, stopping, config, batches)
        if complete is not None:
            _print(f"{last_path}: the run is already complete: {complete}")
            # A stop or a kill in its last epoch may have come before its report was written.
            _conclude(start.best, None, val_set, config, keep_report=True)
            return {}
        if config.max_minutes is not None:
            # The learning rate of the next update as this budget has it (a resumed run may change it).
            _follow_the_clock(scheduler, start.minutes_trained, config)
            for group, base_lr, factor in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
                group["lr"] = base_lr * factor(scheduler.last_epoch)
        _print(f"resuming from {last_path} at {start.describe(batches)}")
    elif starting_point is not None:
        _print(_finetune(model, starting_point, train_set.category_names))

    trained = DistributedDataParallel(model) if is_distributed() else model
    ema = None
    if config.ema is not None:
        # From the weights the run starts with (once the wrap has given every process the main one's,
        # so that all average the same weights), or as it stopped.
        ema = WeightAverage.for_batch(model, decay=config.ema, warmup_updates=config.ema_warmup,
                                      batch=config.batch_size * world_size() * config.accumulation_steps)
        if start.ema is not None:
            ema.load_state_dict(start.ema)
        _print(ema.describe())
    logger = Logger(output_dir, since_update=updates_before(start.epoch, start.progress))
    best, best_ap, record = start.best, start.best_ap, {}
    best_detections = None  # of the best epoch, where this process trained it
    # The training time of the epochs finished; the current one's is its progress.seconds.
    training_seconds = start.training_seconds
    try:
        with StopSignals(last_path) as signals:
            for epoch in range(start.epoch, config.epochs):
                progress = start.progress if epoch == start.epoch else EpochProgress()
                loader = data_loader(train_set, batch_size=config.batch_size, train=True, workers=config.workers,
                                     seed=config.seed, epoch=epoch, pad_to_multiple=config.pad_to_multiple,
                                     skip_batches=progress.batches)
                out_of_time = False
                for update in train_updates(trained, criterion, loader, optimizer, device=device,
                                            epoch=epoch, batches=batches, config=config, progress=progress):
                    count = updates_before(epoch, progress)
                    if ema is not None:
                        ema.update(model)
                    if config.max_minutes is not None:
                        # The main process's clock, so that every process steps the same schedule.
                        minutes = main_process_decides((training_seconds + progress.seconds) / 60)
                        _follow_the_clock(scheduler, minutes, config)
                        out_of_time = minutes >= config.max_minutes
                    scheduler.step()
                    logger.log_update({"epoch": epoch, "batch": progress.batches, **update}, count)
                    if progress.batches == batches or out_of_time:
                        break  # the epoch's (or the budget's) last checkpoint follows its evaluation
                    stop, due = any_process(signals.received is not None, schedule.due(count))
                    if stop or due:
                        save(epoch, progress)
                    if stop:
                        raise _stopped(signals, f"epoch {epoch}, batch {progress.batches} of {batches}", last_path)
                share_buffers(model)
                finished = progress.batches == batches
                minutes_trained = (training_seconds + progress.seconds) / 60
                if finished:
                    training_seconds += progress.seconds
                cut_short = {} if finished else {"batches": progress.batches, "epoch_batches": batches}
                record = {"epoch": epoch, **cut_short, **progress.record()}
                if val_set is not None:
                    val_loader = data_loader(val_set, batch_size=config.batch_size, train=False,
                                             workers=config.workers, seed=config.seed, epoch=epoch)
                    detections, metrics = _evaluate(model, ema, val_loader, device=device, coco=val_set.coco)
                    record.update(metrics)
                    if stopping.observe(record["AP"]):
                        record["stopped_early"] = True
                improved = record.get("AP", -1.0) > best_ap
                if improved:
                    best_ap, best, best_detections = record["AP"], record, detections
                # Logged before the checkpoint is written: a run resumed from an earlier one drops it.
                logger.log_epoch({**record, "training_minutes": minutes_trained},
                                 updates_before(epoch, progress))
                # Where the budget ran out, a resumed run with a larger one goes on from within the epoch.
                save(epoch, None if finished else progress, improved=improved)
                if is_main_process():
                    _draw_curves(logger.epochs_path, output_dir / "curves.png")
                (stop,) = any_process(signals.received is not None)
                # Where the run ends here anyway, there would be nothing to resume: it ends as it would have.
                ends = epoch + 1 == config.epochs or record.get("stopped_early") or out_of_time
                if stop and not ends:
                    raise _stopped(signals, f"the end of epoch {epoch}", last_path)
                if record.get("stopped_early"):
                    _print(f"stopping early after epoch {epoch}: {stopping.describe()}; best.pt is the best")
                    break
                if out_of_time:
                    _print(f"stopping at epoch {epoch}, batch {progress.batches} of {batches}: the "
                           f"run's {config.max_minutes:g} training minutes have passed")
                    break
    except TrainingStopped as stopped:
        _print(str(stopped))
        raise
    finally:
        logger.close()
    _conclude(best, best_detections, val_set, config, keep_report=False)
    return record


# How long a resumed run waits for the lock of its output folder: the run before it (a requeued job's,
# a restarted group's) may still be ending. A process killed while writing lives until the write is
# done, and its loader workers, which share its lock, until they notice it is gone (about 5 s after
# a kill -9: a torchrun group restarted at once meets them).
OUTPUT_LOCK_WAIT_SECONDS = 60.0


def _why_complete(start: ResumePoint, stopping: EarlyStopping, config: TrainConfig, batches: int) -> str | None:
    """Why a run resumed at ``start`` has nothing left to train, for its message; None where it has."""
    if start.epoch >= config.epochs:
        return (f"it is at {start.describe(batches)} and {setting('epochs')} is {config.epochs} (a larger "
                f"{setting('epochs')} trains on)")
    if stopping.stops():
        return f"it stopped early: {stopping.describe()} (a larger {setting('patience')} trains on)"
    if config.max_minutes is not None and start.minutes_trained >= config.max_minutes:
        return (f"it has trained {start.minutes_trained:.1f} minutes and {setting('max_minutes')} is "
                f"{config.max_minutes:g} (a larger {setting('max_minutes')} trains on)")
    return None


def _conclude(best: dict[str, Any], detections: CocoEvaluator | None, val_set: CocoDataset | None,
              config: TrainConfig, *, keep_report: bool) -> None:
    """The end of a run: the report of best.pt, where ``config.report`` asks for it (unless
    ``keep_report`` and one is written already), and the best epoch's line. ``detections`` are the best
    epoch's, where this process trained it."""
    output_dir = Path(config.output_dir)
    best_path, folder = output_dir / "best.pt", output_dir / "report"
    if val_set is None:
        _print(f"no validation split, so no best.pt; the last epoch's model is {output_dir / 'checkpoint.pt'}")
        return
    if not best:
        return
    if config.report:
        if not (keep_report and main_process_decides((folder / "report.md").is_file())):  # written last
            _report(detections, val_set, config, best_path, folder)
        _print(f"report of best.pt: {folder / 'report.md'}; training curves: {output_dir / 'curves.png'}")
    _print(f"best epoch {best['epoch']}: {format_metrics(best)}; {best_path}")


def _resuming(config: TrainConfig, last_path: Path) -> bool:
    """Whether the run goes on from ``last_path``, as ``config.resume`` says: True (it must exist),
    False (it must not) or ``"auto"`` (if it exists, as a requeued or restarted job wants). Every
    process must find the same file there (:func:`~.checkpointing.found_by_every_process`)."""
    saved = found_by_every_process(last_path)
    if config.resume is True and not saved:
        raise TrainingError(f"{last_path}: no checkpoint to resume from")
    if config.resume is False and saved:
        raise TrainingError(f"{last_path} exists: pass {setting('resume', True)} to continue that run, or use "
                            f"another output directory")
    return saved


def _stopped(signals: StopSignals, where: str, last_path: Path) -> TrainingStopped:
    """The clean stop after a signal, once every process is past the checkpoint's writing."""
    wait_for_all()
    return TrainingStopped(
        f"stopped by {signals.received or 'a signal to another process'} at {where}: {last_path} is written; the "
        f"same command with --resume (or --resume auto) goes on from there; exit status {REQUEUE_STATUS}: requeue",
        REQUEUE_STATUS,
    )


def _datasets(config: TrainConfig) -> tuple[CocoDataset, CocoDataset | None]:
    """The training split and the validation split (None where there is none), checked with one
    image probe."""
    train_transforms, val_transforms = recipe(config.image_size)
    data_format = config.format or detect_format(config.data)
    splits = split_names(config.data, data_format)
    _check_split_exists(config, "train_split", splits)
    validated = _validated(config, splits)
    probe = ImageProbe.for_data(config.data)
    train_set, train_report = load_split(config.data, config.train_split, train_transforms, format=data_format, probe=probe)
    _report_problems(train_report, config.data)
    val_set = None
    if validated:
        val_set, report = load_split(config.data, config.val_split, val_transforms, format=data_format, probe=probe)
        _report_problems(report, config.data)
        report.check_scorable(config.data)
        check_same_classes(report, val_set.annotation_file, train_report, train_set.annotation_file)
    probe.save()
    return train_set, val_set


def _validated(config: TrainConfig, splits: list[str]) -> bool:
    """Whether the run evaluates ``config.val_split``: a split it names must be one of ``splits``, but
    the default's name may be missing (a data set without a validation split), which is said."""
    if config.val_split is None:
        return False
    if config.val_split == VAL_SPLIT and VAL_SPLIT not in splits:
        _print(f"{config.data}: no {VAL_SPLIT!r} split (it has {', '.join(map(repr, splits))}), so no validation")
        return False
    _check_split_exists(config, "val_split", splits)
    return True


def _check_split_exists(config: TrainConfig, field: str, splits: list[str]) -> None:
    """Refuse, before any split is read, the setting ``field`` where it names none of ``splits``, with
    their names: a misspelt one would otherwise fail later as a file not found."""
    name = getattr(config, field)
    if name not in splits:
        raise TrainingError(f"{setting(field, name)}: {config.data} has no such split (it has "
                            f"{', '.join(map(repr, splits))})")


def _image_size_hint(train_set: CocoDataset, config: TrainConfig) -> str | None:
    """A line where the training images are much smaller than ``config.image_size`` (their median
    shorter side under half of it, from the sizes the split records), to which the recipe scales
    them up: every step then computes on pixels the images do not hold."""
    shorter = statistics.median(min(image["width"], image["height"]) for image in train_set.coco.imgs.values())
    if shorter >= config.image_size / 2:
        return None
    return (f"{config.data}: its training images' median shorter side is {shorter:g} px, which "
            f"{setting('image_size', config.image_size)} scales up {config.image_size / shorter:.1f}x, making every "
            f"step slower for no detail they hold; {setting('image_size', round(shorter))} trains at their size")


def _report_problems(report: SplitReport, data: str) -> None:
    """One line for the problems the data set works around (boxes clipped or left out, stray labels)."""
    if report.problems:
        _print(f"data check: {len(report.problems)} problem(s) in {report.name} that do not stop training, "
               f"the first: {report.problems[0]} (deformable-detr check-data {data} lists them)")


def _draw_curves(log_path: Path, out: Path) -> None:
    """Draw the curves of ``log_path`` into ``out``, or warn in one line where they cannot be: a
    picture is not worth a run of days, whatever stops it (matplotlib, a full disk)."""
    try:
        from ..report import write_training_curves  # matplotlib is loaded only to draw

        write_training_curves(log_path, out)
    except Exception as error:
        reason = (str(error).splitlines() or [type(error).__name__])[0]
        warnings.warn(f"{out}: not drawn ({reason}); training goes on", stacklevel=2)


def _evaluate(model: DeformableDETR, ema: WeightAverage | None, loader: Any, *, device: torch.device,
              coco: Any) -> tuple[CocoEvaluator, dict[str, float]]:
    """The detections of the model the run keeps (with an average of the weights, the average) and their
    COCO metrics, with the raw weights' AP beside the average's (``raw_AP``)."""
    detections = detect_all(model, loader, device=device, coco=coco)
    if ema is None:
        return detections, detections.summarize()
    raw_ap = detections.summarize()["AP"]
    share_buffers(ema.model)  # as the model's: each process evaluates the average the main one saves
    detections = detect_all(ema.model, loader, device=device, coco=coco)
    return detections, {**detections.summarize(), "raw_AP": raw_ap}


def _report(detections: CocoEvaluator | None, val_set: CocoDataset, config: TrainConfig, best_path: Path,
            folder: Path) -> None:
    """The evaluation report of ``best_path`` into ``folder`` (what ``evaluate --report`` writes), from the
    best epoch's ``detections``, or where a resumed run trained that epoch before, evaluated anew."""
    if detections is not None:
        evaluation = detections.evaluation()
    else:  # on the split as every epoch was: evaluate_checkpoint's class check is for data of other classes
        evaluation = checkpoint_evaluation(read_checkpoint(best_path), val_set, batch_size=config.batch_size,
                                           workers=config.workers)
    write_evaluation_report(evaluation, folder, val_set, checkpoint=best_path, data=config.data, split=config.val_split)


def _follow_the_clock(scheduler: LambdaLR, minutes: float, config: TrainConfig) -> None:
    """Tell a time-budgeted run's :class:`~.optim.LearningRateSchedule` how far along its budget it is,
    in the epochs of the schedule (as saved, where the run was resumed)."""
    schedule = scheduler.lr_lambdas[0]
    schedule.epochs_by_time = minutes / config.max_minutes * schedule.epochs


def _copy_atomically(source: Path, destination: Path) -> None:
    with atomic_write(destination) as temporary:
        shutil.copyfile(source, temporary)


def _print(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
