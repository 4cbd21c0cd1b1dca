"""Training throughput over a stream of the augmentation recipe's batches, as the demo trains.

``train_step.py`` times one batch over and over; a real run never sees the same batch twice, and the
multi-scale recipe gives almost every batch its own height and width. Under bfloat16 on the CPU,
oneDNN builds its kernels for every new input shape and keeps the last 1024 of them, so a stream of
new shapes also evicts the kernels of the layers whose shapes never change. This compares, on the
demo's settings (tiny preset, two-stage, no dropout, batch 8, recipe at 192 px, bf16 where the CPU
computes it), batches padded to their largest image (the reference) with batches padded to a
multiple of 32, loading in 2 worker processes with loading in the training process, and oneDNN's
default kernel cache with a larger one.

Every pass runs in a fresh process, as a training run does: it trains one warm-up epoch of
``--steps`` batches, then times a second epoch from a fresh loader. The contenders' processes
alternate; the figures are the medians of the repeats.

    python benchmarks/train_batches.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch
from torch.utils.data import DataLoader

from deformable_detr import build_model
from deformable_detr.data import coco_split, collate, recipe, synthesize
from deformable_detr.environment import machine_summary
from deformable_detr.train import SetCriterion, build_optimizer, native_bf16, train_step

from model import report  # benchmarks/model.py, beside this script

BATCH_SIZE = 8
IMAGE_SIZE = 192
# name: (pad_to_multiple, loader workers, extra environment of the process)
CONTENDERS = {
    "largest image, 2 workers": (1, 2, {}),
    "largest image, in-process": (1, 0, {}),
    "largest image, in-process, oneDNN cache 16384": (1, 0, {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16384"}),
    "multiple of 32, in-process": (32, 0, {}),
}


def time_epoch(data: str, pad_to_multiple: int, workers: int) -> float:
    """Seconds of a second training epoch over ``data``, after a first one in the same process."""
    torch.manual_seed(0)
    dataset = coco_split(data, "train", recipe(IMAGE_SIZE)[0])
    model = build_model("tiny", num_classes=dataset.num_classes, backbone_norm="batch", two_stage=True,
                        dropout=0.0).train()
    criterion = SetCriterion()
    optimizer = build_optimizer(model, lr=5e-4, lr_backbone=5e-4)
    bf16 = native_bf16(torch.device("cpu"))
    seconds = 0.0
    for epoch in range(2):
        loader = DataLoader(dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=workers,
                            collate_fn=functools.partial(collate, pad_to_multiple=pad_to_multiple),
                            generator=torch.Generator().manual_seed(epoch))
        start = time.perf_counter()
        for images, padding_mask, targets in loader:
            train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=bf16)
        seconds = time.perf_counter() - start
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="training steps per epoch")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--time-epoch", nargs=3, metavar=("DATA", "PAD", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.time_epoch:  # one pass, in the process the parent started for it
        data, pad_to_multiple, workers = args.time_epoch
        print(time_epoch(data, int(pad_to_multiple), int(workers)))
        return

    print(f"{machine_summary()}; bf16 {native_bf16(torch.device('cpu'))}, "
          f"{args.steps} steps an epoch, median of {args.repeats}")
    times: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    with tempfile.TemporaryDirectory() as folder:
        data = str(synthesize(folder, train=args.steps * BATCH_SIZE, val=0, image_size=IMAGE_SIZE))
        for _ in range(args.repeats):
            for name, (pad_to_multiple, workers, environment) in CONTENDERS.items():
                command = [sys.executable, __file__, "--time-epoch", data, str(pad_to_multiple), str(workers)]
                result = subprocess.run(command, env={**os.environ, **environment}, capture_output=True, text=True,
                                        check=True)
                times[name].append(float(result.stdout.split()[-1]))
    report(f"tiny training, an epoch of {args.steps} recipe batches of {BATCH_SIZE} at {IMAGE_SIZE} px",
           {name: statistics.median(values) for name, values in times.items()}, "epoch",
           images_per_step=BATCH_SIZE * args.steps, baseline="largest image, 2 workers")


if __name__ == "__main__":
    main()
