"""`make demo`: synthesise data, train the tiny model on the CPU for ten training minutes, evaluate,
draw, report, and write the page that shows where the model looks (`explore`)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from torchvision.transforms.v2.functional import pad, resize
from torchvision.utils import make_grid

from .checks import check_count
from .data import read_image, synthesize
from .environment import native_bf16
from .explore import explore
from .predict import Detector
from .train import TrainConfig, train
from .visualize import save_image

IMAGE_SIZE = 192
# The demo trains for a budget of training minutes, so that it ends on time on any machine; a fast
# one reaches EPOCHS first. The learning rate is flat for COSINE_SHARE of the budget (or of the
# epochs), then falls along half a cosine to a twentieth.
MINUTES = 10.0
EPOCHS = 20
COSINE_SHARE = 0.75
# The detections picture enlarges the 192-pixel images this many times.
DRAWING_SCALE = 3


def run_demo(
    output_dir: str | Path = "runs/demo", *, minutes: float | None = MINUTES, epochs: int = EPOCHS,
    train_images: int = 800, val_images: int = 100, data_options: dict[str, Any] | None = None,
    model_options: dict[str, Any] | None = None, **train_options: Any,
) -> dict:
    """Train from scratch for ``minutes`` of training (None: no budget) or ``epochs``, whichever ends
    first; returns the final COCO metrics.

    ``data_options`` (:func:`~deformable_detr.data.synthesize`'s ``max_objects``, ``object_sizes``)
    make another task of shapes; ``model_options`` (``ModelConfig`` fields) and ``train_options``
    (``TrainConfig`` fields) change the demo's recipe, to measure other options on the same data and seed.
    """
    # Checked before the data are drawn; the training config checks the rest.
    if minutes is not None and not minutes > 0:
        raise ValueError(f"minutes must be above 0, got {minutes}")
    check_count("epochs", epochs, at_least=1)
    output_dir = Path(output_dir)
    data = output_dir / "data"
    if not (data / "annotations" / "instances_val.json").is_file():
        synthesize(data, train=train_images, val=val_images, image_size=IMAGE_SIZE, seed=0, **(data_options or {}))
    run = output_dir / "train"
    shutil.rmtree(run, ignore_errors=True)  # the demo always starts afresh
    config = demo_config(data, run, minutes=minutes, epochs=epochs)
    model_overrides = {**config.model_overrides, **(model_options or {})}
    record = train(dataclasses.replace(config, model_overrides=model_overrides, **train_options))
    detector = Detector.from_checkpoint(run / "best.pt", device="cpu")
    examples = sorted((data / "val").iterdir())[:4]
    _draw_examples(detector, examples, output_dir / "detections.png")
    page = explore(detector, examples).save(output_dir / "explore.html")
    print(f"detections drawn in {output_dir / 'detections.png'}; where the model looks: {page} (open it in a "
          f"browser); training curves in {run / 'curves.png'}, the evaluation report in {run / 'report' / 'report.md'}")
    return record


def demo_config(data: str | Path, output_dir: str | Path, *, minutes: float | None = MINUTES,
                epochs: int = EPOCHS) -> TrainConfig:
    """The demo's training recipe on ``data``: ``minutes`` of training (None: no budget) or ``epochs``."""
    # Each choice is measured in docs/demo.md#how-it-was-tuned. The model is the tiny preset, whose
    # narrow ResNet-18 (three eighths of the channels) and small transformer train from scratch at 2.7
    # times the speed of the full-width model before them. From scratch the published lr (2e-4,
    # backbone 2e-5) is too timid for minutes of training, and a flat-cosine schedule ends better
    # than the published step drop, on harder data by far. Two-stage queries (from the encoder's
    # proposals) learn faster than learned ones, and three training-only options faster still:
    # denoising queries (five groups of noised targets to restore), mixed query selection (one
    # learned content query) and IoU-aware classification (scores that rank boxes by fit).
    # Dropout's random masks only cost time in a run this short; bfloat16 autocast is faster where
    # the hardware has it.
    # Batches padded to a multiple of 32 come in a few shapes instead of one new shape a step, whose
    # kernels would overflow oneDNN's cache. Loading in the training process leaves both cores of a
    # small machine to the training threads.
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return TrainConfig(
        data=str(data), output_dir=str(output_dir), preset="tiny", epochs=epochs, max_minutes=minutes, batch_size=8,
        lr=5e-4, lr_backbone=5e-4, lr_schedule="flat-cosine", lr_drop_epoch=math.floor(epochs * COSINE_SHARE),
        warmup_epochs=0.5, min_lr_factor=0.05, image_size=IMAGE_SIZE,
        pad_to_multiple=32, workers=0, bf16=native_bf16(device),
        model_overrides={"two_stage": True, "mixed_query_selection": True, "denoising_groups": 5, "dropout": 0.0},
        iou_aware_classification=True,
    )


def _draw_examples(detector: Detector, paths: list[Path], out: Path) -> None:
    """The detections on ``paths`` in a two-column grid, each image enlarged so that the labels, at
    least 10 pixels high (:func:`~deformable_detr.visualize.label_sizes`), leave its small objects seen."""
    images = [read_image(path).as_subclass(torch.Tensor) for path in paths]
    drawn = []
    # A few minutes of training gives modest scores: a low threshold still shows what it finds.
    for image, detections in zip(images, detector.predict(images, threshold=0.25)):
        enlarged = resize(image, [DRAWING_SCALE * side for side in image.shape[-2:]], antialias=True)
        drawn.append(dataclasses.replace(detections, boxes=detections.boxes * DRAWING_SCALE).draw(enlarged))
    height, width = (max(picture.shape[axis] for picture in drawn) for axis in (-2, -1))
    drawn = [pad(picture, [0, 0, width - picture.shape[-1], height - picture.shape[-2]]) for picture in drawn]
    save_image(make_grid(drawn, nrow=2, padding=8), out)
