"""Training throughput as the trainer runs it: the fused CPU kernel vs the reference op, in float32,
and the fused kernel under bfloat16 autocast where the CPU computes bfloat16 in hardware.

One step is :func:`deformable_detr.train.engine.train_step`, the function the training loop calls:
forward, Hungarian matching and the set loss with every auxiliary term, backward, gradient clipping
and the AdamW step. The settings are the demo's: the tiny preset with two-stage queries and no
dropout, trained from scratch (trainable batch norm), lr 5e-4, one batch of 8 synthetic shape images
at 192 px (the shorter side; the validation resize, i.e. the demo's largest training scale). All
paths step the same model, interleaved, median of the repeats.

    python benchmarks/train_step.py [--repeats 5] [--threads N]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from deformable_detr import build_model
from deformable_detr.data import coco_split, collate, recipe, synthesize
from deformable_detr.train import SetCriterion, build_optimizer, native_bf16, train_step

from model import median_times, ours_with, report  # benchmarks/model.py, beside this script

BATCH_SIZE = 8
IMAGE_SIZE = 192


def demo_batch() -> tuple[torch.Tensor, torch.Tensor, list[dict], int]:
    """One batch of synthetic shapes as the demo's data pipeline makes it, and the data set's class count."""
    with tempfile.TemporaryDirectory() as folder:
        dataset = coco_split(synthesize(folder, train=BATCH_SIZE, val=0, image_size=IMAGE_SIZE), "train",
                             recipe(IMAGE_SIZE)[1])
        images, padding_mask, targets = collate([dataset[index] for index in range(BATCH_SIZE)])
        return images, padding_mask, targets, dataset.num_classes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    images, padding_mask, targets, num_classes = demo_batch()
    model = build_model("tiny", num_classes=num_classes, backbone_norm="batch", two_stage=True, dropout=0.0).train()
    criterion = SetCriterion()
    optimizer = build_optimizer(model, lr=5e-4, lr_backbone=5e-4)

    def step(bf16: bool = False) -> None:
        train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=bf16)

    print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats}; "
          f"{sum(len(t['labels']) for t in targets)} objects in the batch")
    contenders = {"ours (fused op)": ours_with("auto", step), "ours (reference op)": ours_with("reference", step)}
    if native_bf16(torch.device("cpu")):
        contenders["ours (fused op, bf16)"] = ours_with("auto", lambda: step(bf16=True))
    times = median_times(contenders, args.repeats)
    report(f"tiny training step with the set loss, {BATCH_SIZE} x {tuple(images.shape[1:])}", times, "step",
           images_per_step=BATCH_SIZE)


if __name__ == "__main__":
    main()
