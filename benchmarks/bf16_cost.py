"""What bfloat16 inference costs a trained model: COCO AP in float32 and in bfloat16 on a
validation set, and the largest score and box differences between the two runs' detections.

Detections are matched one to one, each float32 detection to the bfloat16 one of its class nearest
in box (1 - IoU) and score, wherever it ranks, never by index: near-equal scores may swap ranks,
and where a two-stage model's proposal selection flips on a near-tie a query changes altogether
(the worst cases). The demo model on its data:

    python benchmarks/bf16_cost.py runs/demo/train/best.pt runs/demo/data [--threshold 0.25]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor
from torchvision.ops import box_iou

from deformable_detr.environment import machine_summary
from deformable_detr.evaluation import evaluate_checkpoint, format_metrics
from deformable_detr.predict import Detector


def differences(checkpoint: Path, images: list[Path], threshold: float) -> dict[str, Tensor]:
    """Per float32 detection scoring at least ``threshold``: its bfloat16 match's score difference,
    largest box coordinate difference (pixels) and IoU."""
    reference = Detector.from_checkpoint(checkpoint, device="cpu")
    bf16 = Detector(reference.model, class_names=reference.class_names, image_size=reference.image_size,
                    dtype=torch.bfloat16)  # fmt: skip
    rows = []
    for path in images:
        expected, actual = reference.predict(path, threshold=threshold), bf16.predict(path, threshold=0.0)
        overlaps = box_iou(expected.boxes, actual.boxes)
        # One to one, each to the nearest in box and score: a box alone may pick a near-duplicate
        # from another query, which DETR models give lower scores; another class is never a match.
        cost = 1 - overlaps + (expected.scores[:, None] - actual.scores[None]).abs()
        cost[expected.labels[:, None] != actual.labels[None]] = 1e3
        expected_order, match = linear_sum_assignment(cost.numpy())
        match = torch.as_tensor(match)[torch.as_tensor(expected_order).argsort()]
        iou = overlaps[torch.arange(len(match)), match]
        score = (actual.scores[match] - expected.scores).abs()
        box = (actual.boxes[match] - expected.boxes).abs().amax(1) if len(match) else torch.zeros(0)
        rows.append(torch.stack([score, box, iou], 1))
    score, box, iou = torch.cat(rows).unbind(1)
    return {"score": score, "box_pixels": box, "iou": iou}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("data", type=Path, help="a COCO data set with a val split")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threshold", type=float, default=0.25, help="lowest float32 score compared (the demo draws 0.25)")
    args = parser.parse_args()
    print(machine_summary())
    metrics = {}
    for dtype in (torch.float32, torch.bfloat16):
        metrics[dtype] = evaluate_checkpoint(args.checkpoint, args.data, split=args.split, workers=0, dtype=dtype)
        print(f"{str(dtype).removeprefix('torch.'):9s} {format_metrics(metrics[dtype])}")
    print(f"AP bfloat16 - float32: {metrics[torch.bfloat16]['AP'] - metrics[torch.float32]['AP']:+.4f}")
    images = sorted((args.data / args.split).iterdir())
    found = differences(args.checkpoint, images, args.threshold)
    print(f"{len(found['score'])} float32 detections scoring >= {args.threshold} on {len(images)} images, "
          "each against its bfloat16 match (median / 99th percentile / worst):")
    for name, values in found.items():
        worst = values.min() if name == "iou" else values.max()
        print(f"  {name:10s} {values.median():.4f} / {values.quantile(0.01 if name == 'iou' else 0.99):.4f} / {worst:.4f}")

if __name__ == "__main__":
    main()
