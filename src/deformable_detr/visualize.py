"""Detections drawn on images."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from torchvision.utils import draw_bounding_boxes


def draw_detections(
    image: Tensor, detections: Mapping[str, Tensor], names: Mapping[int, str], *, threshold: float = 0.5
) -> Tensor:
    """``image`` (3, H, W) uint8 with the boxes scoring at least ``threshold`` drawn and labelled."""
    keep = detections["scores"] >= threshold
    labels = [
        f"{names.get(int(label), str(int(label)))} {float(score):.2f}"
        for label, score in zip(detections["labels"][keep], detections["scores"][keep])
    ]
    boxes = detections["boxes"][keep].clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=image.shape[-1] - 1)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=image.shape[-2] - 1)
    # Black text on a filled yellow label stays legible on any background.
    return draw_bounding_boxes(image, boxes, labels, colors="yellow", width=2, fill_labels=True, label_colors="black")


def to_uint8(image: Tensor, mean: tuple[float, ...] = (0.485, 0.456, 0.406), std: tuple[float, ...] = (0.229, 0.224, 0.225)) -> Tensor:
    """Undo ImageNet normalisation: a float (3, H, W) model input back to uint8 pixels."""
    pixels = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)
