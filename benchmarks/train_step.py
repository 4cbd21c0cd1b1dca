"""Training throughput as the trainer runs it: the demo's model with the fused CPU kernel vs the
reference op, in float32, and under bfloat16 autocast where the CPU computes bfloat16 in hardware;
beside them, the demo's model before it was sized for its task (a full-width ResNet-18).
``--device cuda``: the r50 preset on 2 images at 800 px (the published training scale), the
fused Triton kernels against the reference op, each in float32 and under bfloat16 autocast.

One step is :func:`deformable_detr.train.engine.train_step`, the function the training loop calls:
forward, Hungarian matching and the set loss with every auxiliary term, backward, gradient clipping
and the AdamW step. The settings are the demo's (:func:`deformable_detr.demo.demo_config`): the tiny
preset with two-stage queries, mixed query selection, five denoising groups, IoU-aware
classification and no dropout, trained from scratch (trainable batch norm), lr 5e-4, one batch of 8
synthetic shape images at 192 px (the shorter side; the validation resize, i.e. the demo's largest
training scale), padded to a multiple of 32. All contenders step, interleaved, median of the repeats.

    python benchmarks/train_step.py [--repeats 5] [--threads N] [--device cpu|cuda] [--tiny]

``--tiny`` (the tiny preset, one 64 px image) only checks the script, as on CPU tensors under
``TRITON_INTERPRET=1``, where the fused op is the Triton kernels run by Triton's interpreter.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from typing import Any

import torch

from deformable_detr import build_model
from deformable_detr.data import coco_split, collate, recipe, synthesize
from deformable_detr.demo import demo_config
from deformable_detr.environment import machine_summary
from deformable_detr.train import SetCriterion, build_optimizer, native_bf16, train_step

from model import median_times, ours_with, report  # benchmarks/model.py, beside this script

# The tiny preset's model before it was sized for the demo (docs/performance.md#the-demos-model).
PREVIOUS_TINY = {"backbone_width": 64, "encoder_layers": 3, "dim_feedforward": 512}
DEMO_RECIPE = demo_config("data", "run")
# The demo's model options, as its run builds the model: from scratch, with trainable batch norm.
DEMO = {**DEMO_RECIPE.model_overrides, "backbone_norm": "batch"}
# (preset, batch size, image size, overrides): the demo's on the CPU, the published training on CUDA.
SETTINGS = {"cpu": ("tiny", 8, 192, DEMO), "cuda": ("r50", 2, 800, {}), "tiny": ("tiny", 1, 64, DEMO)}


def demo_batch(batch_size: int, image_size: int) -> tuple[torch.Tensor, torch.Tensor, list[dict], int]:
    """One batch of synthetic shapes as the demo's data pipeline makes it, and the data set's class count."""
    with tempfile.TemporaryDirectory() as folder:
        dataset = coco_split(synthesize(folder, train=batch_size, val=0, image_size=image_size), "train",
                             recipe(image_size)[1])
        images, padding_mask, targets = collate([dataset[index] for index in range(batch_size)],
                                                pad_to_multiple=DEMO_RECIPE.pad_to_multiple)
        return images, padding_mask, targets, dataset.num_classes


def synchronized(function: Callable[[], None]) -> Callable[[], None]:
    """``function`` that returns only once the GPU has finished its work, so that it can be timed."""
    def run() -> None:
        function()
        torch.cuda.synchronize()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny preset on one 64 px image, to check the script")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    preset, batch_size, image_size, overrides = SETTINGS["tiny" if args.tiny else args.device]
    # The fused op: the CPU kernel on the CPU; the Triton kernels on CUDA and in Triton's interpreter.
    fused = "triton" if device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" else "auto"

    images, padding_mask, targets, num_classes = demo_batch(batch_size, image_size)
    images, padding_mask = images.to(device), padding_mask.to(device)
    targets = [{key: value.to(device) for key, value in target.items()} for target in targets]
    demo = overrides is DEMO
    criterion = SetCriterion(iou_aware=demo and DEMO_RECIPE.iou_aware_classification)

    def stepper(**changes: Any) -> Callable[[bool], None]:
        """A training step of the setting's model with ``changes``."""
        torch.manual_seed(0)
        model = build_model(preset, num_classes=num_classes, **overrides, **changes).to(device).train()
        optimizer = build_optimizer(model, lr=5e-4, lr_backbone=5e-4)
        return lambda bf16: train_step(model, criterion, optimizer, images, padding_mask, targets, bf16=bf16)

    step = stepper()
    gpu = f"{torch.cuda.get_device_name()}; " if device.type == "cuda" else ""
    print(f"{gpu}{machine_summary()}; median of {args.repeats}; "
          f"{sum(len(t['labels']) for t in targets)} objects in the batch")
    contenders = {"ours (fused op)": ours_with(fused, lambda: step(False)),
                  "ours (reference op)": ours_with("reference", lambda: step(False))}
    if demo:
        previous = stepper(**PREVIOUS_TINY)
        contenders["previous demo model (fused op)"] = ours_with(fused, lambda: previous(False))
    if native_bf16(device):
        contenders["ours (fused op, bf16)"] = ours_with(fused, lambda: step(True))
        if device.type == "cuda":
            contenders["ours (reference op, bf16)"] = ours_with("reference", lambda: step(True))
        elif demo:
            contenders["previous demo model (fused op, bf16)"] = ours_with(fused, lambda: previous(True))
    if device.type == "cuda":
        contenders = {name: synchronized(function) for name, function in contenders.items()}
    times = median_times(contenders, args.repeats)
    report(f"{preset} training step with the set loss on {device.type}, {batch_size} x {tuple(images.shape[1:])}",
           times, "step", images_per_step=batch_size)


if __name__ == "__main__":
    main()
