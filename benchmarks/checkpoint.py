"""What preemptible training costs: a training checkpoint's size, write and read times (the model
with its AdamW state and schedule, as ``train`` writes ``checkpoint.pt``), for the demo's model and
for r50, beside a training step of the demo's model, and the share of training time that
``--checkpoint-every N`` and ``--checkpoint-minutes M`` take at the values docs/preemption.md
recommends. Also the bookkeeping every update now does (its log line, the seed of its random draws).

The checkpoint goes to ``--folder`` (default: a temporary folder) through the page cache, as
``train`` writes it (atomically, not synced to the disk). Median of the repeats.

    python benchmarks/checkpoint.py [--repeats 3] [--threads N] [--folder DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from train_step import DEMO, demo_batch  # benchmarks/train_step.py, beside this script

from deformable_detr import build_model
from deformable_detr.checkpoints import read_checkpoint
from deformable_detr.data.loader import TRAINING_STEP, derived_seed
from deformable_detr.environment import machine_summary
from deformable_detr.train import SetCriterion, TrainConfig, build_lr_scheduler, build_optimizer, train_step
from deformable_detr.train.checkpointing import save_training_checkpoint
from deformable_detr.train.engine import EpochProgress
from deformable_detr.train.logger import Logger

# (preset, overrides, classes): the demo's model, and r50 as fine-tuned from ImageNet weights on COCO
# (frozen batch norm, the stem and layer1 frozen: they have no optimiser state).
MODELS = {"demo (tiny)": ("tiny", {**DEMO, "denoising_groups": 5, "mixed_query_selection": True}, 6),
          "r50": ("r50", {}, 91)}
EVERY = (100, 500)  # --checkpoint-every values reported
MINUTES = (10, 30)  # --checkpoint-minutes values reported


def median_time(function: Callable[[], None], repeats: int) -> float:
    function()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def trained_state(preset: str, overrides: dict, classes: int):
    """The model, an AdamW holding its moments and a schedule, as after a training step."""
    model = build_model(preset, num_classes=classes, **overrides)
    if preset == "r50":  # as built with ImageNet weights: the stem and layer1 stay frozen
        for name, parameter in model.named_parameters():
            if name.startswith("backbone.0.body.") and not name.startswith(("backbone.0.body.layer2", "backbone.0.body.layer3",
                                                                             "backbone.0.body.layer4")):
                parameter.requires_grad_(False)
    optimizer = build_optimizer(model)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.grad = torch.zeros_like(parameter)
    optimizer.step()
    return model, optimizer, build_lr_scheduler(optimizer, updates_per_epoch=1000)


def checkpoint_costs(name: str, folder: Path, repeats: int) -> tuple[float, float, float]:
    """(megabytes, write seconds, read seconds) of the checkpoint of model ``name``."""
    preset, overrides, classes = MODELS[name]
    model, optimizer, scheduler = trained_state(preset, overrides, classes)
    path = folder / "checkpoint.pt"
    config = TrainConfig(data="data", output_dir=str(folder), preset=preset, model_overrides=overrides)

    def write() -> None:
        save_training_checkpoint(path, model, config=config, class_names={i: str(i) for i in range(classes)},
                                 optimizer=optimizer, scheduler=scheduler, epoch=3,
                                 progress=EpochProgress(batches=100, images=200, seconds=60.0, lr=2e-4), best={})

    write_seconds = median_time(write, repeats)
    read_seconds = median_time(lambda: read_checkpoint(path), repeats)
    return path.stat().st_size / 1e6, write_seconds, read_seconds


def demo_step_seconds(repeats: int) -> float:
    preset, overrides, _ = MODELS["demo (tiny)"]
    images, padding_mask, targets, classes = demo_batch(8, 192)
    model = build_model(preset, num_classes=classes, **overrides).train()
    criterion, optimizer = SetCriterion(iou_aware=True), build_optimizer(model, lr=5e-4, lr_backbone=5e-4)
    return median_time(lambda: train_step(model, criterion, optimizer, images, padding_mask, targets), repeats)


def bookkeeping_seconds(folder: Path, repeats: int) -> float:
    """An update's log line (steps.jsonl and TensorBoard) and the seeding of its random draws."""
    logger = Logger(folder)
    record = {"epoch": 0, "batch": 1, "lr": 2e-4, "loss": 20.0, "loss_ce": 1.0, "loss_bbox": 0.5, "loss_giou": 0.5}

    def update() -> None:
        torch.manual_seed(derived_seed(TRAINING_STEP, 42, 3, 100, 0))
        logger.log_update(record, 1)

    try:
        return median_time(lambda: [update() for _ in range(100)], repeats) / 100
    finally:
        logger.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--folder", type=Path, help="where to write (default: a temporary folder)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(dir=args.folder) as folder:
        folder = Path(folder)
        print(f"{machine_summary()}; median of {args.repeats}; written to {folder}")
        step = demo_step_seconds(args.repeats)
        print(f"\ndemo training step (8 x 192 px, float32): {step:.3f} s; the bookkeeping of an update: "
              f"{bookkeeping_seconds(folder, args.repeats) * 1e6:.0f} us")
        print(f"\n{'model':12s} {'checkpoint':>10s} {'write':>8s} {'read':>8s}   share of training time")
        for name in MODELS:
            megabytes, write, read = checkpoint_costs(name, folder, args.repeats)
            shares = [f"every {minutes} min: {write / (minutes * 60):.2%}" for minutes in MINUTES]
            if name.startswith("demo"):
                shares += [f"every {every} demo steps: {write / (every * step):.2%}" for every in EVERY]
            print(f"{name:12s} {megabytes:7.0f} MB {write:6.2f} s {read:6.2f} s   {'; '.join(shares)}")


if __name__ == "__main__":
    main()
