"""Batching samples of different sizes for the model."""

from __future__ import annotations

from typing import Any, Sequence

from torch import Tensor

from ..model import pad_images


def collate(batch: Sequence[tuple[Tensor, dict[str, Any]]]) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """``(images (N, 3, H, W), padding_mask (N, H, W), targets)`` from ``(image, target)`` samples:
    images padded at the bottom and right to the largest height and width, the mask True on the
    padding, targets kept as a list since each image has its own number of boxes. For a
    ``DataLoader``'s ``collate_fn``."""
    images, targets = zip(*batch)
    padded, padding_mask = pad_images(images)
    return padded, padding_mask, list(targets)
