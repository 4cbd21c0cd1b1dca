"""The published augmentation recipe, on torchvision transforms v2 and tv_tensors.

Every pipeline takes ``(image, target)`` with a ``tv_tensors.Image`` (uint8) and a target dict
holding ``boxes`` as ``tv_tensors.BoundingBoxes`` in absolute XYXY pixels plus ``labels``, and
ends with :func:`model_input`, which gives the model's format: a float image normalised with the
ImageNet mean and std, boxes as normalised (cx, cy, w, h), and ``size`` (h, w) after transforms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# The published sizes (Deformable DETR, after DETR), for images of COCO's size.
SCALES = tuple(range(480, 801, 32))
MAX_SIZE = 1333
CROP_SCALES = (400, 500, 600)
CROP_RANGE = (384, 600)
VAL_SIZE = 800


class RandomSizeCrop(v2.Transform):
    """Crop a region of random height and width in ``[min_size, max_size]`` (capped by the image)
    at a random place; boxes are clipped to it by torchvision's crop kernel."""

    def __init__(self, min_size: int, max_size: int) -> None:
        super().__init__()
        self.min_size = min_size
        self.max_size = max_size

    def make_params(self, flat_inputs: list[Any]) -> dict[str, Any]:
        image_height, image_width = v2.query_size(flat_inputs)

        def draw(limit: int) -> int:
            high = min(limit, self.max_size)
            return int(torch.randint(min(self.min_size, high), high + 1, ()))

        height, width = draw(image_height), draw(image_width)
        top = int(torch.randint(image_height - height + 1, ()))
        left = int(torch.randint(image_width - width + 1, ()))
        return {"top": top, "left": left, "height": height, "width": width}

    def transform(self, inpt: Any, params: dict[str, Any]) -> Any:
        return F.crop(inpt, **params)


class _ToModelTarget:
    """Plain tensors for the model: image unwrapped, boxes as normalised (cx, cy, w, h)."""

    def __call__(self, image: Tensor, target: dict[str, Any]) -> tuple[Tensor, dict[str, Any]]:
        height, width = image.shape[-2:]
        boxes = F.convert_bounding_box_format(target["boxes"], new_format=tv_tensors.BoundingBoxFormat.CXCYWH)
        scale = torch.tensor([width, height, width, height], dtype=torch.float32)
        target = {
            **target,
            "boxes": boxes.as_subclass(Tensor).float() / scale,
            "size": torch.tensor([height, width], dtype=torch.int64),
        }
        return image.as_subclass(Tensor), target


def model_input() -> v2.Compose:
    """The step that ends every pipeline: float image normalised with the ImageNet mean and std;
    boxes under one pixel (left by crops or downscaling) dropped with their labels; boxes as
    normalised (cx, cy, w, h)."""
    return v2.Compose([
        *_normalise(),
        # Resizes can push a clipped corner a float epsilon past the border, which the
        # sanitizer would treat as out of the image and drop the whole box.
        v2.ClampBoundingBoxes(),
        v2.SanitizeBoundingBoxes(),
        _ToModelTarget(),
    ])  # fmt: skip


def train_transforms(
    scales: Sequence[int] = SCALES,
    max_size: int = MAX_SIZE,
    crop_scales: Sequence[int] = CROP_SCALES,
    crop_range: tuple[int, int] = CROP_RANGE,
) -> v2.Compose:
    """Horizontal flip (p = 0.5), then with equal chance either a resize of the shorter side to
    one of ``scales`` (longer side at most ``max_size``), or a resize of the shorter side to one of
    ``crop_scales``, a random crop with sides in ``crop_range``, and the same scale resize."""
    scale_resize = v2.RandomShortestSize(list(scales), max_size=max_size)
    return v2.Compose([
        v2.RandomHorizontalFlip(0.5),
        v2.RandomChoice([
            scale_resize,
            v2.Compose([v2.RandomShortestSize(list(crop_scales)), RandomSizeCrop(*crop_range), scale_resize]),
        ]),
        model_input(),
    ])  # fmt: skip


def val_transforms(size: int = VAL_SIZE, max_size: int | None = None) -> v2.Compose:
    """Resize of the shorter side to ``size``, longer side at most ``max_size`` (by default
    :func:`max_side` of ``size``, as in :func:`recipe` and :func:`inference_transforms`)."""
    return v2.Compose([_val_resize(size, max_size), model_input()])


def inference_transforms(image_size: int = VAL_SIZE) -> v2.Compose:
    """The validation resize and normalisation of :func:`recipe`, for an image alone (uint8 in,
    normalised float out)."""
    return v2.Compose([_val_resize(image_size), *_normalise()])


def _val_resize(size: int, max_size: int | None = None) -> v2.Resize:
    return v2.Resize(size, max_size=max_side(size) if max_size is None else max_size)


def _normalise() -> list[v2.Transform]:
    """uint8 to float in [0, 1], then normalised with the ImageNet mean and std."""
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]


def max_side(image_size: int) -> int:
    """The longest side the recipe of ``image_size`` resizes images to (1333 for the published 800)."""
    return round(MAX_SIZE * image_size / VAL_SIZE)


def recipe(image_size: int = VAL_SIZE) -> tuple[v2.Compose, v2.Compose]:
    """Train and val transforms with every published size scaled by ``image_size / 800``.

    ``recipe(800)`` is the published recipe; ``recipe(256)`` keeps its proportions for small
    images (shorter sides 154..256 in training, 256 in validation, longer side at most 427).
    """
    factor = image_size / VAL_SIZE

    def scaled(sizes: Sequence[int]) -> list[int]:
        return sorted({round(size * factor) for size in sizes})

    crop_range = (round(CROP_RANGE[0] * factor), round(CROP_RANGE[1] * factor))
    train = train_transforms(scaled(SCALES), max_side(image_size), scaled(CROP_SCALES), crop_range)
    return train, val_transforms(image_size)
