"""The training loop: epochs of optimisation, evaluation, checkpoints, logs and resumption."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, SequentialSampler
from tqdm import tqdm

from ..checkpoints import load_pretrained, read_checkpoint, save_checkpoint
from ..config import get_config
from ..data import Loader, SplitReport, collate, detect_format, load_split, recipe, split_names
from ..distributed import is_distributed, is_main_process, rank
from ..evaluation import METRICS, evaluate
from ..files import atomic_write
from ..model import DeformableDETR, build_model
from .criterion import SetCriterion
from .optim import build_lr_scheduler, build_optimizer


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss, a checkpoint that does not fit); the message says why."""


class NonFiniteLossError(TrainingError):
    """The loss of a training step is NaN or infinite; raised before its backward pass."""


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in its checkpoints so that ``resume`` continues it."""

    data: str  # a COCO, Pascal VOC or YOLO data set (see deformable_detr.data.formats)
    output_dir: str
    preset: str = "tiny"
    num_classes: int | None = None  # default: the training annotations' largest category id + 1
    epochs: int = 50
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    weight_decay: float = 1e-4
    lr_drop_epoch: int = 40
    warmup_steps: int = 0  # optimiser updates over which the learning rate rises linearly to lr
    clip_max_norm: float = 0.1
    accumulation_steps: int = 1
    bf16: bool = False
    image_size: int = 800  # the augmentation recipe, scaled so that its largest short side is this
    # Training batches padded to a multiple of this. The recipe makes almost every batch a new
    # shape, and on the CPU the kernels oneDNN builds per shape overflow its cache (README,
    # Performance). The published recipe pads to the largest image only (1).
    pad_to_multiple: int = 1
    workers: int = 2
    seed: int = 42
    train_split: str = "train"
    val_split: str = "val"
    format: str | None = None  # "coco", "voc" or "yolo"; detected from the files when None
    finetune_from: str | None = None  # any checkpoint load_pretrained reads; class heads re-initialised if needed
    backbone_weights: str | None = None
    max_minutes: float | None = None  # stop after the epoch during which this much training time has passed
    resume: bool = False  # continue the run whose checkpoint.pt is in output_dir
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Hybrid matching (with the model option one_to_many_queries): the one-to-many group is matched
    # against every target repeated this many times, and its loss is added with this weight (H-DETR's k, lambda).
    one_to_many_repeats: int = 6
    one_to_many_weight: float = 1.0
    # The class loss's target for a matched query is its box's IoU with the target's (varifocal loss).
    iou_aware_classification: bool = False


# What a resumed run may change: how long it runs, where its files are and how many workers load
# its data, not what it trains. (The optimiser and scheduler states come from the checkpoint, so a
# new lr or lr drop would not even apply.)
RESUMABLE_FIELDS = ("epochs", "max_minutes", "workers", "output_dir")


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


class _Logger:
    """A JSON-lines log and TensorBoard scalars, on the main process only."""

    def __init__(self, output_dir: Path) -> None:
        self.enabled = is_main_process()
        self.path = output_dir / "log.jsonl"
        self.writer = None
        if self.enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def log(self, record: dict[str, Any], step: int) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as file:
            file.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "epoch":
                self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _batches(loader: DataLoader, device: torch.device) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[dict]]]:
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
        outputs = model(images, padding_mask)
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
    loader: DataLoader,
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


def _loader(
    dataset, *, batch_size: int, train: bool, workers: int, seed: int, epoch: int, pad_to_multiple: int = 1
) -> DataLoader:
    if is_distributed():
        sampler = DistributedSampler(dataset, shuffle=train, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
    elif train:
        # Seeded per epoch, so that a resumed run draws the same batches as an uninterrupted one.
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    generator = torch.Generator().manual_seed(seed * 1000 + epoch)  # worker seeds
    return Loader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers,
                  collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                  generator=generator, persistent_workers=False)


def _setup_distributed() -> torch.device:
    """Join the torchrun process group if there is one; the device this process trains on."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def train(config: TrainConfig) -> dict[str, Any]:
    """Train (or resume) as ``config`` says; returns the last epoch's log record.

    ``output_dir`` receives ``checkpoint.pt`` (every epoch, atomically; what ``resume`` reads),
    ``best.pt`` (best validation AP), ``log.jsonl`` and ``tensorboard/``.
    """
    device = _setup_distributed()
    output_dir = Path(config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    last_path, best_path = output_dir / "checkpoint.pt", output_dir / "best.pt"
    _seed_everything(config.seed + rank())

    train_transforms, val_transforms = recipe(config.image_size)
    data_format = config.format or detect_format(config.data)
    train_set, report = load_split(config.data, config.train_split, train_transforms, format=data_format)
    _report_problems(report, config.data)
    val_set = None
    if config.val_split in split_names(config.data, data_format):
        val_set, report = load_split(config.data, config.val_split, val_transforms, format=data_format)
        _report_problems(report, config.data)
    if val_set is not None and len(val_set) == 0:
        val_set = None
    num_classes = config.num_classes or train_set.num_classes

    # From scratch, frozen batch norm would hold random statistics, i.e. no normalisation at all.
    from_scratch = {} if config.backbone_weights or config.finetune_from else {"backbone_norm": "batch"}
    model_config = get_config(config.preset, num_classes=num_classes, backbone_weights=config.backbone_weights,
                              **{**from_scratch, **config.model_overrides})
    model = build_model(model_config).to(device)
    if is_distributed() and device.type == "cuda":
        # Batch norm over the global batch. torch's SyncBatchNorm needs an accelerator (its training
        # forward raises on CPU tensors), so on the CPU each process normalises by its own share of
        # the batch, and the running statistics kept are the main process's (_share_buffers).
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)  # same state-dict names as BatchNorm2d
    criterion = SetCriterion(one_to_many_repeats=config.one_to_many_repeats, one_to_many_weight=config.one_to_many_weight,
                             iou_aware=config.iou_aware_classification)
    optimizer = build_optimizer(model, lr=config.lr, lr_backbone=config.lr_backbone, weight_decay=config.weight_decay)
    first_loader = _loader(train_set, batch_size=config.batch_size, train=True, workers=0, seed=config.seed, epoch=0)
    scheduler = build_lr_scheduler(optimizer, lr_drop_epoch=config.lr_drop_epoch, warmup_updates=config.warmup_steps,
                                   updates_per_epoch=math.ceil(len(first_loader) / config.accumulation_steps))

    start_epoch, best_ap, best, record = 0, -1.0, {}, {}
    if last_path.is_file() and not config.resume:
        raise TrainingError(f"{last_path} exists: pass resume=True (--resume) to continue that run, or use another output directory")
    if config.resume:
        if not last_path.is_file():
            raise TrainingError(f"{last_path}: no checkpoint to resume from")
        checkpoint = read_checkpoint(last_path)
        _check_resumable(last_path, checkpoint.extra["train_config"], config)
        model.load_state_dict(checkpoint.state_dict)
        optimizer.load_state_dict(checkpoint.extra["optimizer"])
        scheduler.load_state_dict(checkpoint.extra["scheduler"])
        _restore_rng_state(checkpoint.extra["rng"])
        start_epoch, best_ap = checkpoint.extra["epoch"] + 1, checkpoint.extra["best_ap"]
        best = checkpoint.extra.get("best", {})
        _print(f"resuming from {last_path} at epoch {start_epoch}")
    elif config.finetune_from:
        _print(_finetune(model, config.finetune_from))

    trained = DistributedDataParallel(model) if is_distributed() else model
    logger = _Logger(output_dir)
    training_seconds = 0.0
    try:
        for epoch in range(start_epoch, config.epochs):
            loader = _loader(train_set, batch_size=config.batch_size, train=True, workers=config.workers,
                             seed=config.seed, epoch=epoch, pad_to_multiple=config.pad_to_multiple)
            epoch_start = time.perf_counter()
            record = {"epoch": epoch, "lr": optimizer.param_groups[0]["lr"],
                      **train_one_epoch(trained, criterion, loader, optimizer, scheduler, device=device, epoch=epoch,
                                        config=config)}
            _share_buffers(model)
            training_seconds += time.perf_counter() - epoch_start
            if val_set is not None:
                val_loader = _loader(val_set, batch_size=config.batch_size, train=False, workers=config.workers,
                                     seed=config.seed, epoch=epoch)
                record.update(evaluate(model, val_loader, device=device, coco=val_set.coco))
            if is_main_process():
                improved = record.get("AP", -1.0) > best_ap
                best_ap = max(best_ap, record.get("AP", -1.0))
                best = record if improved else best
                save_checkpoint(last_path, model, class_names=train_set.category_names, image_size=config.image_size,
                                optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(), epoch=epoch,
                                best_ap=best_ap, best=best, rng=_rng_state(), train_config=dataclasses.asdict(config))
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


def format_metrics(record: dict[str, Any]) -> str:
    """The main COCO metrics of a log record on one line: ``AP 0.512  AP50 0.734 ...``."""
    return "  ".join(f"{key} {record[key]:.3f}" for key in METRICS[:6] if key in record)


def _report_problems(report: SplitReport, data: str) -> None:
    """One line for the problems the data set works around (boxes clipped or left out, stray labels)."""
    if report.problems:
        _print(f"data check: {len(report.problems)} problem(s) in {report.name} that do not stop training, "
               f"the first: {report.problems[0]} (deformable-detr check-data {data} lists them)")


def _check_resumable(path: Path, stored: dict[str, Any], config: TrainConfig) -> None:
    """Refuse to resume the run saved in ``path`` (its ``stored`` TrainConfig) with settings that change
    what it trains; only :data:`RESUMABLE_FIELDS` may differ."""
    differing = [
        f"{name} {stored.get(name)!r} (now {value!r})"
        for name, value in dataclasses.asdict(config).items()
        if name not in (*RESUMABLE_FIELDS, "resume") and stored.get(name) != value
    ]
    if differing:
        raise TrainingError(
            f"{path}: the run was trained with other settings: {', '.join(differing)}; resume with its settings "
            f"(only {', '.join(RESUMABLE_FIELDS)} may change) or start a new run in another output directory"
        )


def _share_buffers(model: nn.Module) -> None:
    """Give every process the main process's buffers (batch-norm running statistics), so that all of them
    evaluate the model it saves: DDP broadcasts buffers before each forward, and each process's last
    batch then left its own."""
    if is_distributed():
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)


def _out_of_time(training_seconds: float, max_minutes: float | None) -> bool:
    """Whether ``max_minutes`` of training have passed, by the main process's clock: all processes
    must stop after the same epoch, or those going on would wait for the others forever."""
    decision = [max_minutes is not None and training_seconds / 60 >= max_minutes]
    if is_distributed():
        dist.broadcast_object_list(decision, src=0)
    return decision[0]


def _copy_atomically(source: Path, destination: Path) -> None:
    with atomic_write(destination) as temporary:
        shutil.copyfile(source, temporary)


def _print(message: str) -> None:
    if is_main_process():
        print(message, flush=True)


def evaluate_checkpoint(
    checkpoint: str | Path, data: str | Path, *, split: str = "val", batch_size: int = 2, image_size: int = 800,
    workers: int = 2, format: str | None = None,
) -> dict[str, float]:
    """COCO metrics of any checkpoint ``load_pretrained`` reads on ``data``'s ``split`` (also under torchrun);
    ``data`` is a COCO, VOC or YOLO data set (``format`` forces one)."""
    device = _setup_distributed()
    model = load_pretrained(checkpoint, device=device)
    dataset, _ = load_split(data, split, recipe(image_size)[1], format=format)
    loader = _loader(dataset, batch_size=batch_size, train=False, workers=workers, seed=0, epoch=0)
    return evaluate(model, loader, device=device, coco=dataset.coco)
