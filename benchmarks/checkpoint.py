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
import os
import tempfile
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
from deformable_detr.train.early_stopping import EarlyStopping
from deformable_detr.train.engine import EpochProgress
from deformable_detr.train.logger import Logger

from model import median_times  # benchmarks/model.py

# (preset, overrides, classes): the demo's model, and r50 as fine-tuned from ImageNet weights on COCO
# (frozen batch norm, the stem and layer1 frozen: they have no optimiser state).
MODELS = {"demo (tiny)": ("tiny", DEMO, 6),
          "r50": ("r50", {}, 91)}
EVERY = (100, 500)  # --checkpoint-every values reported
MINUTES = (10, 30)  # --checkpoint-minutes values reported


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


def checkpoint_costs(name: str, folder: Path, repeats: int, **contenders: Callable[[], None]) -> dict[str, float]:
    """Seconds to write and to read the checkpoint of model ``name``, and of ``contenders``, interleaved
    (so that all see the same machine), and the checkpoint's megabytes."""
    preset, overrides, classes = MODELS[name]
    model, optimizer, scheduler = trained_state(preset, overrides, classes)
    path = folder / "checkpoint.pt"
    config = TrainConfig(data="data", output_dir=str(folder), preset=preset, model_overrides=overrides)

    def write() -> None:
        save_training_checkpoint(path, model, config=config, class_names={i: str(i) for i in range(classes)},
                                 training_data={"images": 200, "boxes": 1000, "sha256": "0" * 64}, optimizer=optimizer, scheduler=scheduler, ema=None,
                                 early_stopping=EarlyStopping(config.patience, config.min_improvement), epoch=3,
                                 progress=EpochProgress(batches=100, images=200, seconds=60.0, lr=2e-4), best={},
                                 training_seconds=180.0)

    write()
    times = median_times({"write": write, "read": lambda: read_checkpoint(path), **contenders}, repeats)
    return {**times, "megabytes": path.stat().st_size / 1e6}


def demo_step() -> Callable[[], None]:
    """One training step of the demo's model on a batch of the demo's data, in float32."""
    preset, overrides, _ = MODELS["demo (tiny)"]
    images, padding_mask, targets, classes = demo_batch(8, 192)
    model = build_model(preset, num_classes=classes, **overrides).train()
    criterion, optimizer = SetCriterion(iou_aware=True), build_optimizer(model, lr=5e-4, lr_backbone=5e-4)
    return lambda: train_step(model, criterion, optimizer, images, padding_mask, targets)


def bookkeeping(folder: Path) -> tuple[Callable[[], None], Logger]:
    """100 updates' log lines (steps.jsonl and TensorBoard) and seedings of their random draws."""
    logger = Logger(folder)
    record = {"epoch": 0, "batch": 1, "lr": 2e-4, "loss": 20.0, "loss_ce": 1.0, "loss_bbox": 0.5, "loss_giou": 0.5}

    def updates() -> None:
        for update in range(100):
            torch.default_generator.manual_seed(derived_seed(TRAINING_STEP, 42, 3, update, 0))  # as engine does
            logger.log_update(record, update)

    return updates, logger


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
        print(f"{machine_summary()}; median of {args.repeats}; written to {folder}; "
              f"load average {os.getloadavg()[0]:.1f}")
        updates, logger = bookkeeping(folder)
        demo = checkpoint_costs("demo (tiny)", folder, args.repeats, step=demo_step(), updates=updates)
        logger.close()
        step = demo["step"]
        print(f"\ndemo training step (8 x 192 px, float32): {step:.3f} s; "
              f"the bookkeeping of an update: {demo['updates'] * 1e4:.0f} us ({demo['updates'] / 100 / step:.3%})")
        print(f"\n{'model':12s} {'checkpoint':>10s} {'write':>8s} {'read':>8s}   share of training time")
        for name, costs in (("demo (tiny)", demo), ("r50", checkpoint_costs("r50", folder, args.repeats))):
            write = costs["write"]
            shares = [f"every {minutes} min: {write / (minutes * 60):.2%}" for minutes in MINUTES]
            if name.startswith("demo"):
                shares += [f"every {every} steps: {write / (every * step):.2%}" for every in EVERY]
            print(f"{name:12s} {costs['megabytes']:7.0f} MB {write:6.2f} s {costs['read']:6.2f} s   {'; '.join(shares)}")
        print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
