"""Training throughput over a stream of the augmentation recipe's batches, as the demo trains.

``train_step.py`` times one batch over and over; a real run never sees the same batch twice, and the
multi-scale recipe gives almost every batch its own height and width. Under bfloat16 on the CPU,
oneDNN builds its kernels for every new input shape, so the shapes cost time of their own. This
compares, on the demo's settings (tiny preset, two-stage, no dropout, batch 8, recipe at 192 px,
bf16 where the CPU computes it), batches padded to their largest image (the reference) with batches
padded to a multiple of 32, and loading in 2 worker processes with loading in the training process.
Each timed pass takes ``--steps`` new batches from a fresh loader; passes interleave, median of the
repeats.

    python benchmarks/train_batches.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from typing import Callable

# The contenders share one process: with oneDNN's default cache (1024 kernels) the batches of
# every-new shapes would evict the kernels the padded batches reuse, which a real run, padding all
# its batches alike, keeps. Read when oneDNN starts, so set before torch is imported.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16384")

import torch
from torch.utils.data import DataLoader

from deformable_detr import build_model
from deformable_detr.data import coco_split, collate, recipe, synthesize
from deformable_detr.train import SetCriterion, build_optimizer, native_bf16, train_step

from model import median_times, report  # benchmarks/model.py, beside this script

BATCH_SIZE = 8
IMAGE_SIZE = 192


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed pass")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    bf16 = native_bf16(torch.device("cpu"))

    with tempfile.TemporaryDirectory() as folder:
        dataset = coco_split(synthesize(folder, train=200, val=0, image_size=IMAGE_SIZE), "train",
                             recipe(IMAGE_SIZE)[0])
        model = build_model("tiny", num_classes=dataset.num_classes, backbone_norm="batch", two_stage=True,
                            dropout=0.0).train()
        criterion = SetCriterion()
        optimizer = build_optimizer(model, lr=5e-4, lr_backbone=5e-4)
        passes = iter(range(1_000_000))  # every pass draws other images and augmentations

        def stream(pad_to_multiple: int, workers: int) -> Callable[[], None]:
            def run() -> None:
                loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                                    collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                                    generator=torch.Generator().manual_seed(next(passes)))
                for _, (images, padding_mask, targets) in zip(range(args.steps), loader):
                    train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=bf16)

            return run

        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, bf16 {bf16}, "
              f"{args.steps} steps a pass, median of {args.repeats}")
        contenders = {
            "largest image, 2 workers": stream(1, 2),
            "largest image, in-process": stream(1, 0),
            "multiple of 32, in-process": stream(32, 0),
        }
        times = median_times(contenders, args.repeats)
    report(f"tiny training, {args.steps} recipe batches of {BATCH_SIZE} at {IMAGE_SIZE} px", times, "pass",
           images_per_step=BATCH_SIZE * args.steps, baseline="largest image, 2 workers")


if __name__ == "__main__":
    main()
