"""Where the model looks: the sampling points and attention weights of multi-scale deformable
attention drawn over the image, for the top detections and one encoder query (the paper's Fig. 6).

One panel per detection shows the last decoder layer's cross-attention of its query; a last panel
shows the last encoder layer's self-attention of one pixel. Points of every level are drawn
together: colour marks the head, dot area the attention weight, a white cross the reference point.
The picture carries its own legend.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor
from torchvision.ops import nms
from torchvision.transforms.v2 import functional as F

from .checks import check_count, check_fraction, is_whole_number
from .model import AttentionRecord, capture_attention, evaluating, postprocess
from .precision import forward
from .predict import Detector, ImageInput
from .visualize import draw_sampling_points, head_colours, to_uint8

# Small inputs are enlarged to this shorter side, so that dots and text stay legible.
MIN_PANEL_SIDE = 320
GAP = 8  # pixels between panels


@dataclass
class _Panel:
    title: str
    picture: Image.Image


@torch.no_grad()
def explain(
    detector: Detector,
    image: ImageInput,
    *,
    top_k: int = 3,
    threshold: float = 0.0,
    encoder_point: tuple[float, float] | None = None,
    encoder_level: int = 0,
) -> Image.Image:
    """Draw where ``detector``'s model looks in ``image``: panels side by side above a legend of head colours.

    Args:
        detector: the model, with the input size and class names it was trained for. The model
            runs once in eval mode (its mode is restored afterwards).
        image: any one image :meth:`Detector.predict` takes, prepared as it prepares them.
        top_k: detections to explain (distinct objects, best score first), one panel each.
        threshold: the lowest score a detection needs for a panel; where none reaches it, a warning
            says so, with the highest score.
        encoder_point: (x, y) as fractions of the image width and height, the encoder query to show;
            by default the centre of the best detection (the image centre if there is none).
        encoder_level: the feature level whose pixel is the encoder query.

    Returns:
        An RGB image: ``top_k`` (or fewer) detection panels and one encoder panel, each the model
        input enlarged to a shorter side of at least ``MIN_PANEL_SIDE`` under a title line.
    """
    model = detector.model
    if model.config.encoder_layers == 0:
        raise ValueError("explain draws the last encoder layer's attention, and this model has no encoder layers")
    if not is_whole_number(encoder_level) or not 0 <= encoder_level < model.config.num_feature_levels:
        raise ValueError(f"encoder_level must be in [0, {model.config.num_feature_levels}), got {encoder_level!r}")
    check_count("top_k", top_k, at_least=1)
    check_fraction("threshold", threshold)
    if encoder_point is not None:
        if len(encoder_point) != 2:
            raise ValueError(f"encoder_point must be (x, y), got {encoder_point!r}")
        for name, fraction in zip(("encoder_point's x", "encoder_point's y"), encoder_point):
            check_fraction(name, fraction)
    inputs = detector.prepare(image)
    with evaluating(model), capture_attention(model) as records:
        outputs = forward(model, inputs[None], dtype=detector.dtype)
    by_name = {record.name: record for record in records}
    decoder = by_name[f"transformer.decoder.layers.{model.config.decoder_layers - 1}.cross_attn"]
    encoder = by_name[f"transformer.encoder.layers.{model.config.encoder_layers - 1}.self_attn"]

    height, width = inputs.shape[-2:]
    scale = max(1.0, MIN_PANEL_SIDE / min(height, width))
    background = F.resize(to_uint8(inputs.cpu()), [round(height * scale), round(width * scale)], antialias=True)
    # Faded halfway to white, the photo leaves the coloured dots the contrast.
    background = background.div(2).add(128).to(torch.uint8)
    detections = _top_queries(outputs, (height, width), top_k, threshold)
    if not len(detections["queries"]):
        # The picture alone would not tell a threshold set too high from a model that sees nothing.
        highest = float(outputs["pred_logits"].sigmoid().max())
        warnings.warn(f"no detection scores at least {threshold} (the highest scores {highest:.3f}): "
                      "only the encoder query is drawn", stacklevel=2)
    panels = []
    for index, query in enumerate(detections["queries"].tolist()):
        label = int(detections["labels"][index])
        name = detector.class_names.get(label, f"class {label}")
        title = f"query {query}: {name} {float(detections['scores'][index]):.2f}"
        box = detections["boxes"][index] * scale
        panels.append(_Panel(title, _query_picture(background, decoder, query, box=box)))

    if encoder_point is None:
        encoder_point = _centre(detections["boxes"][0], width, height) if len(detections["queries"]) else (0.5, 0.5)
    query, (row, column) = _encoder_query(encoder.spatial_shapes, encoder_level, encoder_point)
    title = f"encoder query: level {encoder_level} pixel ({column}, {row})"
    panels.append(_Panel(title, _query_picture(background, encoder, query, level=encoder_level)))

    config = model.config
    levels = "its one level" if config.num_feature_levels == 1 else f"all {config.num_feature_levels} levels"
    legend = (
        f"+ reference point; dots: sampling points on {levels}, area ~ attention weight. Detections: their "
        f"query's cross-attention in decoder layer {config.decoder_layers} of {config.decoder_layers}; last "
        f"panel: self-attention in encoder layer {config.encoder_layers} of {config.encoder_layers}."
    )
    return _compose(panels, config.num_heads, legend)


def _top_queries(outputs: dict[str, Any], size: tuple[int, int], top_k: int, threshold: float) -> dict[str, Tensor]:
    """:func:`postprocess` results (K rows) for the ``top_k`` best detections that reach
    ``threshold``, one per query and one per object (a box overlapping a better one by IoU > 0.5
    is another query's view of the same object), best first."""
    num_queries, num_classes = outputs["pred_logits"].shape[1:]
    every = postprocess(outputs, [size], top_k=num_queries * num_classes)[0]
    ranked = {key: value.cpu() for key, value in every.items()}
    ranked = {key: value[ranked["scores"] >= threshold] for key, value in ranked.items()}
    best = nms(ranked["boxes"], ranked["scores"], iou_threshold=0.5)  # across classes: one per object
    return {key: value[best[:top_k]] for key, value in ranked.items()}


def _centre(box: Tensor, width: int, height: int) -> tuple[float, float]:
    x1, y1, x2, y2 = box.tolist()
    return (x1 + x2) / 2 / width, (y1 + y2) / 2 / height


def _encoder_query(spatial_shapes: Tensor, level: int, point: tuple[float, float]) -> tuple[int, tuple[int, int]]:
    """The flattened index, and (row, column), of the pixel of ``level`` that holds ``point``."""
    shapes = spatial_shapes.tolist()
    height, width = shapes[level]
    column = min(max(int(point[0] * width), 0), width - 1)
    row = min(max(int(point[1] * height), 0), height - 1)
    start = sum(h * w for h, w in shapes[:level])
    return start + row * width + column, (row, column)


def _query_picture(
    background: Tensor, record: AttentionRecord, query: int, *, level: int = 0, box: Tensor | None = None
) -> Image.Image:
    """``background`` with the sampling points of image 0's ``query`` in ``record`` (and ``box``);
    the reference is the one seen from ``level`` (all levels agree for an image without padding)."""
    picture = Image.fromarray(background.permute(1, 2, 0).numpy())
    # A refining decoder's reference is a box (cx, cy, w, h): its centre is where offsets start.
    reference = record.reference_points[0, query, level, :2]
    return draw_sampling_points(
        picture, record.sampling_locations[0, query], record.attention_weights[0, query], reference, box=box
    )


def _compose(panels: list[_Panel], num_heads: int, legend: str) -> Image.Image:
    """Panels side by side, each under its title, above the head colours and ``legend``."""
    width, height = panels[0].picture.size
    canvas_width = len(panels) * (width + GAP) - GAP
    font = ImageFont.load_default(size=max(14, round(min(width, height) / 30)))
    line = round(font.size * 1.5)
    legend = _wrap(legend, font, canvas_width - 8)
    canvas = Image.new("RGB", (canvas_width, line + height + (1 + len(legend)) * line), "white")
    draw = ImageDraw.Draw(canvas)
    for index, panel in enumerate(panels):
        left = index * (width + GAP)
        draw.text((left + 4, line // 2), panel.title, fill="black", font=font, anchor="lm")
        canvas.paste(panel.picture, (left, line))

    top = line + height + line // 2
    draw.text((4, top), "heads:", fill="black", font=font, anchor="lm")
    left = 4 + draw.textlength("heads: ", font=font)
    radius = font.size // 3
    for head, colour in enumerate(head_colours(num_heads)):
        draw.ellipse((left, top - radius, left + 2 * radius, top + radius), fill=colour, outline="black")
        left += 2 * radius + 3
        draw.text((left, top), str(head), fill="black", font=font, anchor="lm")
        left += draw.textlength(f"{head}  ", font=font)
    for text in legend:
        top += line
        draw.text((4, top), text, fill="black", font=font, anchor="lm")
    return canvas


def _wrap(text: str, font: ImageFont.FreeTypeFont, width: float) -> list[str]:
    """``text`` broken at spaces into lines at most ``width`` pixels long (a longer word stays whole)."""
    lines = [""]
    for word in text.split():
        candidate = f"{lines[-1]} {word}".strip()
        if font.getlength(candidate) <= width or not lines[-1]:
            lines[-1] = candidate
        else:
            lines.append(word)
    return lines
