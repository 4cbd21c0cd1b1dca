"""Detections, reference points and sampling points drawn on images."""

from __future__ import annotations

import colorsys
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.transforms.v2 import functional as F

from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .files import atomic_write

# A box's line and its label's text, as fractions of the image's shorter side.
LINE_FRACTION = 1 / 300
TEXT_FRACTION = 1 / 40


def draw_detections(
    image: Tensor, detections: Mapping[str, Tensor], names: Mapping[int, str], *, threshold: float = 0.5
) -> Tensor:
    """``image`` (3, H, W) uint8 with the boxes scoring at least ``threshold`` drawn and labelled,
    lines and text in proportion to the image (:func:`label_sizes`)."""
    keep = detections["scores"] >= threshold
    if not keep.any():
        return image.clone()
    picture = F.to_pil_image(image.cpu())
    line, text = label_sizes(picture.size)
    font = ImageFont.load_default(size=text)
    draw = ImageDraw.Draw(picture)
    for box, label, score in zip(detections["boxes"][keep].tolist(), detections["labels"][keep].tolist(),
                                 detections["scores"][keep].tolist()):  # fmt: skip
        draw.rectangle(box, outline="yellow", width=line)
        # Black text on a filled yellow label, inside the box's top left corner (legible on any
        # background), moved onto the picture where the box runs past its edge.
        caption = f"{names.get(int(label), str(int(label)))} {score:.2f}"
        left, top, right, bottom = draw.textbbox((0, 0), caption, font=font)
        width, height = right - left + 2 * line, bottom - top + 2 * line
        x = min(max(box[0] + line, 0), picture.width - width)
        y = min(max(box[1] + line, 0), picture.height - height)
        draw.rectangle((x, y, x + width, y + height), fill="yellow")
        draw.text((x + line - left, y + line - top), caption, fill="black", font=font)
    return F.pil_to_tensor(picture)


def label_sizes(size: tuple[int, int]) -> tuple[int, int]:
    """Pixels of a box's line and of its label's text on a picture of ``size`` (width, height): in
    proportion to its shorter side, as a viewer shows a photo whole, so that a label is as legible
    on a 4000-pixel photo as on a 400-pixel one; never under 2 and 10 pixels."""
    shorter = min(size)
    return max(2, round(shorter * LINE_FRACTION)), max(10, round(shorter * TEXT_FRACTION))


def to_uint8(image: Tensor, mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD) -> Tensor:
    """Undo ImageNet normalisation: a float (3, H, W) model input back to uint8 pixels."""
    pixels = image * torch.tensor(std)[:, None, None] + torch.tensor(mean)[:, None, None]
    return (pixels.clamp(0, 1) * 255).round().to(torch.uint8)


def head_colours(num_heads: int) -> list[tuple[int, int, int]]:
    """One saturated colour per attention head, evenly spaced around the hue circle."""
    return [
        tuple(round(255 * channel) for channel in colorsys.hsv_to_rgb(head / num_heads, 0.85, 1.0))
        for head in range(num_heads)
    ]


def draw_sampling_points(
    picture: Image.Image, locations: Tensor, weights: Tensor, reference: Tensor, *, box: Tensor | None = None
) -> Image.Image:
    """A copy of ``picture`` with one query's deformable attention drawn on it; the tensors may be
    on any device.

    Args:
        locations: (M, L, P, 2) normalised (x, y) sampling locations of every head, level and point.
        weights: (M, L, P) their attention weights. Dot area is proportional to the weight (the
            query's heaviest point gets the largest dot); the colour is the head's
            (:func:`head_colours`).
        reference: (2,) normalised (x, y) reference point, drawn as a white cross.
        box: (4,) absolute (x1, y1, x2, y2) pixels, drawn in yellow under the points.
    """
    # The picture is drawn on the CPU, and a model on a GPU records its attention there.
    locations, weights, reference = (tensor.float().cpu() for tensor in (locations, weights, reference))
    picture = picture.copy()
    draw = ImageDraw.Draw(picture)
    if box is not None:
        draw.rectangle(box.tolist(), outline="yellow", width=2)
    width, height = picture.size
    largest = max(3.0, min(width, height) / 40)
    heads = weights.shape[0]
    colours = head_colours(heads)
    head_of_point = torch.arange(heads)[:, None, None].expand_as(weights).flatten()
    # Heaviest first, so that the smaller dots of lighter points stay visible on top.
    order = weights.flatten().argsort(descending=True)
    centres = locations.reshape(-1, 2)[order] * torch.tensor([width, height])
    radii = (weights.flatten()[order] / weights.max()).sqrt().mul(largest).clamp(min=1.5)
    for (x, y), radius, head in zip(centres.tolist(), radii.tolist(), head_of_point[order].tolist()):
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colours[head], outline="black")
    x, y = (reference * torch.tensor([width, height])).tolist()
    arm = largest * 1.5
    for colour, line_width in (("black", 5), ("white", 2)):  # outlined, to show on any background
        draw.line((x - arm, y, x + arm, y), fill=colour, width=line_width)
        draw.line((x, y - arm, x, y + arm), fill=colour, width=line_width)
    return picture


def writable_image_format(path: str | os.PathLike) -> str:
    """The image format ``path``'s suffix names (``.png``, ``.jpg``, ...); ValueError, naming the
    file, where it names none that Pillow writes."""
    path = Path(path)
    image_format = Image.registered_extensions().get(path.suffix.lower())
    if image_format is None:
        problem = f"unknown image format {path.suffix!r}" if path.suffix else "no suffix to name the image format"
    elif image_format not in Image.SAVE:
        problem = f"{image_format} images can be read but not written"
    else:
        return image_format
    raise ValueError(f"{path}: {problem}; use e.g. .png or .jpg")


def save_image(picture: Image.Image | Tensor, path: str | os.PathLike) -> None:
    """Write a PIL image or a (3, H, W) uint8 tensor, whole or not at all, in the format its
    suffix names (:func:`writable_image_format`)."""
    image_format = writable_image_format(path)
    if isinstance(picture, Tensor):
        picture = Image.fromarray(picture.permute(1, 2, 0).cpu().numpy())
    with atomic_write(path) as temporary:
        picture.save(temporary, format=image_format)
