"""Batching samples of different sizes for the model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch import Tensor

from ..model import pad_images


def collate(
    batch: Sequence[tuple[Tensor, dict[str, Any]]], *, pad_to_multiple: int = 1
) -> tuple[Tensor, Tensor, list[dict[str, Any]]]:
    """``(images (N, 3, H, W), padding_mask (N, H, W), targets)`` from ``(image, target)`` samples:
    images padded at the bottom and right to the largest height and width (rounded up to
    ``pad_to_multiple``), the mask True on the padding, targets kept as a list since each image
    has its own number of boxes. For a ``DataLoader``'s ``collate_fn`` (through ``functools.partial``
    to set ``pad_to_multiple``)."""
    images, targets = zip(*batch)
    padded, padding_mask = pad_images(images, multiple=pad_to_multiple)
    return padded, padding_mask, list(targets)
