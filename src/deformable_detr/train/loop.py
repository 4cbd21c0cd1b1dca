"""The training run: data, model and optimiser set up, then epochs of training and evaluation, with
checkpoints, logs and resumption (DETR's ``main.py``; one epoch is :mod:`.engine`'s)."""

from __future__ import annotations

import dataclasses
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..checkpoints import read_checkpoint, save_checkpoint
from ..data import (
    CocoDataset,
    ImageProbe,
    SplitReport,
    batches_per_epoch,
    data_loader,
    detect_format,
    load_split,
    recipe,
    split_names,
)
from ..distributed import (
    is_distributed,
    is_main_process,
    main_process_decides,
    rank,
    setup_distributed,
    share_buffers,
)
from ..evaluation import evaluate, format_metrics
from ..files import atomic_write
from ..model import DeformableDETR, build_model
from .config import RESUMABLE_FIELDS, TrainConfig
from .criterion import SetCriterion
from .engine import TrainingError, train_one_epoch
from .logger import Logger
from .optim import build_lr_scheduler, build_optimizer


def _rng_state() -> dict[str, Any]:
    numpy_kind, numpy_keys, numpy_position, numpy_has_gauss, numpy_gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        # As a tensor and plain values: weights-only loading accepts those, not numpy arrays.
        "numpy": (numpy_kind, torch.from_numpy(numpy_keys.astype(np.int64)), numpy_position, numpy_has_gauss, numpy_gauss),
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, position, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))


def _seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)


def _finetune(model: DeformableDETR, path: str) -> str:
    """Load every weight of ``path`` that fits; class heads of another class count start anew.

    Returns a one-line report of what was re-initialised."""
    checkpoint = read_checkpoint(path)
    own = model.state_dict()
    reinitialised = sorted(
        name for name, tensor in checkpoint.state_dict.items() if name in own and own[name].shape != tensor.shape
    )
    kept = {name: tensor for name, tensor in checkpoint.state_dict.items() if name not in reinitialised}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    if unexpected or set(missing) != set(reinitialised):
        raise TrainingError(
            f"{path}: does not fit the {model.config.backbone} model being trained "
            f"(missing {sorted(set(missing) - set(reinitialised))[:5]}, unexpected {unexpected[:5]})"
        )
    if not reinitialised:
        return f"fine-tuning from {path}: every weight loaded"
    old = checkpoint.config.num_classes
    return f"fine-tuning from {path}: class heads re-initialised for {model.config.num_classes} classes (checkpoint had {old}): {', '.join(reinitialised)}"


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the last epoch's log record.

    ``output_dir`` receives ``checkpoint.pt`` (every epoch, atomically; what ``resume`` reads),
    ``best.pt`` (best validation AP), ``log.jsonl`` and ``tensorboard/``.
    """
    device = setup_distributed()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = output_dir / "checkpoint.pt", output_dir / "best.pt"
    _seed_everything(config.seed + rank())

    train_set, val_set = _datasets(config)
    model = build_model(config.model_config(config.num_classes or train_set.num_classes)).to(device)
    if is_distributed() and device.type == "cuda":
        # Batch norm over the global batch. torch's SyncBatchNorm needs an accelerator (its training
        # forward raises on CPU tensors), so on the CPU each process normalises by its own share of
        # the batch, and the running statistics kept are the main process's (share_buffers).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict names as BatchNorm2d
    criterion = SetCriterion(one_to_many_repeats=config.one_to_many_repeats, one_to_many_weight=config.one_to_many_weight,
                             iou_aware=config.iou_aware_classification)
    optimizer = build_optimizer(model, lr=config.lr, lr_backbone=config.lr_backbone, weight_decay=config.weight_decay)
    updates_per_epoch = math.ceil(batches_per_epoch(len(train_set), config.batch_size) / config.accumulation_steps)
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=config.lr_drop_epoch, warmup_updates=config.warmup_steps,
                                   updates_per_epoch=updates_per_epoch)

    start_epoch, best_ap, best, record = 0, -1.0, {}, {}
    if last_path.is_file() and not config.resume:
        raise TrainingError(f"{last_path} exists: pass resume=True (--resume) to continue that run, or use another output directory")
    if config.resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: no checkpoint to resume from")
        checkpoint = read_checkpoint(last_path)
        check_resumable(last_path, checkpoint.extra["train_config"], config)
        model.load_state_dict(checkpoint.state_dict)
        optimizer.load_state_dict(checkpoint.extra["optimizer"])
        scheduler.load_state_dict(checkpoint.extra["scheduler"])
        _restore_rng_state(checkpoint.extra["rng"])
        start_epoch, best = checkpoint.extra["epoch"] + 1, checkpoint.extra.get("best", {})
        # Runs saved before the best epoch's record was stored kept only its AP.
        best_ap = best.get("AP", checkpoint.extra.get("best_ap", -1.0))
        _print(f"resuming from {last_path} at epoch {start_epoch}")
    elif config.finetune_from:
        _print(_finetune(model, config.finetune_from))

    trained = DistributedDataParallel(model) if is_distributed() else model
    logger = Logger(output_dir)
    training_seconds = 0.0
    try:
        for epoch in range(start_epoch, config.epochs):
            loader = data_loader(train_set, batch_size=config.batch_size, train=True, workers=config.workers,
                                 seed=config.seed, epoch=epoch, pad_to_multiple=config.pad_to_multiple)
            epoch_start = time.perf_counter()
            record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      **train_one_epoch(trained, criterion, loader, optimizer, scheduler, device=device, epoch=epoch,
                                        config=config)}
            share_buffers(model)
            training_seconds += time.perf_counter() - epoch_start
            if val_set is not None:
                val_loader = data_loader(val_set, batch_size=config.batch_size, train=False, workers=config.workers,
                                         seed=config.seed, epoch=epoch)
                record.update(evaluate(model, val_loader, device=device, coco=val_set.coco))
            if is_main_process():
                improved = record.get("AP", -1.0) > best_ap
                best_ap = max(best_ap, record.get("AP", -1.0))
                best = record if improved else best
                save_checkpoint(last_path, model, class_names=train_set.category_names, image_size=config.image_size,
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                                best=best, rng=_rng_state(), train_config=dataclasses.asdict(config))
                if improved:
                    _copy_atomically(last_path, best_path)
            logger.log({**record, "training_minutes": training_seconds / 60}, step=epoch)
            if _out_of_time(training_seconds, config.max_minutes):
                _print(f"stopping after epoch {epoch}: {training_seconds / 60:.1f} training minutes")
                break
    finally:
        logger.close()
    if val_set is None:
        _print(f"no validation split, so no best.pt; the last epoch's model is {last_path}")
    elif best:
        _print(f"best epoch {best['epoch']}: {format_metrics(best)}; {best_path}")
    return record


def _datasets(config: TrainConfig) -> tuple[CocoDataset, CocoDataset | None]:
    """The training split and the validation split (None where there is none, or it is empty),
    checked with one image probe."""
    train_transforms, val_transforms = recipe(config.image_size)
    data_format = config.format or detect_format(config.data)
    probe = ImageProbe.for_data(config.data)
    train_set, report = load_split(config.data, config.train_split, train_transforms, format=data_format, probe=probe)
    _report_problems(report, config.data)
    val_set = None
    if config.val_split in split_names(config.data, data_format):
        val_set, report = load_split(config.data, config.val_split, val_transforms, format=data_format, probe=probe)
        _report_problems(report, config.data)
    probe.save()
    return train_set, val_set if val_set is not None and len(val_set) else None


def _report_problems(report: SplitReport, data: str) -> None:
    """One line for the problems the data set works around (boxes clipped or left out, stray labels)."""
    if report.problems:
        _print(f"data check: {len(report.problems)} problem(s) in {report.name} that do not stop training, "
               f"the first: {report.problems[0]} (deformable-detr check-data {data} lists them)")


def check_resumable(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run saved in ``path`` (its ``stored`` TrainConfig) with settings that change
    what it trains; only :data:`RESUMABLE_FIELDS` may differ. A field the run does not store (added
    to TrainConfig after it was saved) counts as its default, which is how the run trained."""
    defaults = dataclasses.asdict(TrainConfig(data="", output_dir=""))
    differing = [
        f"{name} {stored.get(name, defaults[name])!r} (now {value!r})"
        for name, value in dataclasses.asdict(config).items()
        if name not in (*RESUMABLE_FIELDS, "resume") and stored.get(name, defaults[name]) != value
    ]
    if differing:
        raise TrainingError(
            f"{path}: the run was trained with other settings: {', '.join(differing)}; resume with its settings "
            f"(only {', '.join(RESUMABLE_FIELDS)} may change) or start a new run in another output directory"
        )


def _out_of_time(training_seconds: float, max_minutes: float | None) -> bool:
    """Whether ``max_minutes`` of training have passed, by the main process's clock: all processes
    must stop after the same epoch, or those going on would wait for the others forever."""
    return main_process_decides(max_minutes is not None and training_seconds / 60 >= max_minutes)


def _copy_atomically(source: Path, destination: Path) -> None:
    with atomic_write(destination) as temporary:
        shutil.copyfile(source, temporary)


def _print(message: str) -> None:
    if is_main_process():
        print(message, flush=True)
