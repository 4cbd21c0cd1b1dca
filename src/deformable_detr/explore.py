"""The paper's Figure 6 as a page to play with: :func:`explore` runs a detector on images and returns
one self-contained HTML page in which the mouse picks encoder and decoder queries and the page draws
their reference points and sampling points, layer by layer, level by level.

Everything the page draws comes from :func:`capture_attention` (the model's own sampling locations
and attention weights), quantised to what a screen can show and embedded as base64 typed arrays
beside the page's own script and style (``explore_page/``). The page needs no server and makes no
request: a Content-Security-Policy allows none, and nothing from the checkpoint or the data (class
names, file names) is ever read as markup or script.
"""

from __future__ import annotations

import base64
import bisect
import functools
import hashlib
import html
import io
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from .checks import check_count, is_whole_number
from .files import atomic_write
from .model import AttentionRecord, capture_attention, evaluating, pad_images
from .precision import forward
from .predict import Detector, ImageInput, as_image_tensor
from .visualize import head_colours, to_uint8

# The page budget (docs/explore.md#size): above it, encoder queries are subsampled until the page fits.
MAX_BYTES = 15_000_000
# The score slider's starting position.
SCORE_THRESHOLD = 0.3
# The quality of the embedded pictures (the model inputs): JPEG's artefacts stay below what the
# dots and boxes drawn over them let one see.
JPEG_QUALITY = 90


@dataclass(frozen=True)
class _Scale:
    """Values in [low, high] stored as unsigned integers of ``dtype``: ``low + q * step``."""

    low: float
    high: float
    dtype: type[np.unsignedinteger]

    @property
    def step(self) -> float:
        return (self.high - self.low) / np.iinfo(self.dtype).max

    def encode(self, values: Tensor) -> np.ndarray:
        codes = ((values.float().cpu().clamp(self.low, self.high) - self.low) / self.step).round()
        return codes.numpy().astype(np.dtype(self.dtype).newbyteorder("<"))

    def describe(self) -> dict[str, float]:
        return {"low": self.low, "step": self.step}


# Normalised coordinates: 1/32768 of the input's side, 0.04 pixels at 1333 pixels. A bilinear
# sample at -0.5 or 1.5 reads only the zero padding around a level, as any point beyond does:
# clamping there changes nothing the model computed.
COORDINATES = _Scale(-0.5, 1.5, np.uint16)
# Attention weights: a dot's area is proportional to its weight, and 1/255 of the largest dot's
# area is less than a pixel.
WEIGHTS = _Scale(0.0, 1.0, np.uint8)
SCORES = _Scale(0.0, 1.0, np.uint16)

_TYPED_ARRAYS = {np.uint8: "Uint8Array", np.uint16: "Uint16Array"}
_PAGE = resources.files(__package__) / "explore_page"


@dataclass(frozen=True)
class ExplorePage:
    """The page :func:`explore` makes: its HTML, and the warnings made while building it (also shown
    on the page). In a notebook it displays inline."""

    html: str
    warnings: tuple[str, ...] = ()

    @property
    def size(self) -> int:
        """Bytes of the page as saved (UTF-8)."""
        return len(self.html.encode())

    def save(self, path: str | os.PathLike) -> Path:
        """Write the page to ``path`` (whole or not at all); returns the path."""
        path = Path(path)
        with atomic_write(path) as temporary:
            temporary.write_text(self.html, encoding="utf-8")
        return path

    def _repr_html_(self) -> str:
        # In a frame of its own, so that its script and styles stay its own; sandboxed, so that
        # its script cannot reach the notebook.
        return (
            f'<iframe srcdoc="{html.escape(self.html, quote=True)}" sandbox="allow-scripts allow-downloads" '
            'style="width: 100%; height: 860px; border: 0"></iframe>'
        )


@dataclass
class _Observation:
    """One image and everything the model computed on it."""

    name: str
    picture: str  # the model input without its padding, as a JPEG data URL
    original_size: tuple[int, int]  # (H, W) of the image given
    input_size: tuple[int, int]  # (H, W) it is resized to
    frame_size: tuple[int, int]  # (H, W) of the padded model input, what normalised coordinates span
    valid_ratios: Tensor  # (L, 2) the unpadded fraction (width, height) of each level
    records: dict[str, AttentionRecord]
    outputs: dict[str, Any]
    heat: dict[int, Tensor]  # encoder layer -> attention_heat


@torch.no_grad()
def explore(
    detector: Detector,
    images: ImageInput | Sequence[ImageInput],
    *,
    encoder_layers: Literal["last", "all"] | Sequence[int] = "last",
    max_bytes: int = MAX_BYTES,
    pad_to_multiple: int = 1,
) -> ExplorePage:
    """A self-contained interactive page of where ``detector``'s model looks in ``images``.

    Args:
        detector: the model, with the input size and class names it was trained for. The model runs
            once per image, alone, in eval mode (its mode is restored afterwards) and in the
            detector's dtype, as :meth:`Detector.predict` runs it.
        images: one image (any input :meth:`Detector.predict` takes for one) or a list or tuple of
            them; several get a picker, named by their file names.
        encoder_layers: the encoder layers whose attention the page holds: ``"last"``, ``"all"``
            or their indices (0 is the first).
        max_bytes: the page's budget. Above it the encoder queries embedded are subsampled (every
            k-th row and column, and the page says so); the heat maps and the decoder keep them all.
        pad_to_multiple: pad each model input at the bottom and right to a multiple of this, as
            training batches are padded, to see the padded levels' valid regions and what padding
            changes; 1 runs the image as :meth:`Detector.predict` does.

    Returns:
        The page: ``.html``, ``.save(path)``, ``.warnings``; it displays inline in a notebook.
    """
    config = detector.model.config
    layers = _encoder_layers(encoder_layers, config.encoder_layers)
    check_count("max_bytes", max_bytes, at_least=1)
    check_count("pad_to_multiple", pad_to_multiple, at_least=1)
    images = list(images) if isinstance(images, (list, tuple)) else [images]
    if not images:
        raise ValueError("explore needs at least one image")
    observations = [
        _observe(detector, image, _image_name(image, index), layers, pad_to_multiple) for index, image in enumerate(images)
    ]
    # The least subsampling that fits: the page shrinks as the stride grows, so a bisection finds it.
    largest = max(max(observation.records[_encoder_name(0)].spatial_shapes[0].tolist()) for observation in observations)
    strides = range(1, largest + 1)
    build = functools.cache(lambda stride: _page(detector, observations, layers, stride, max_bytes))

    def fits(stride: int) -> bool:
        return len(build(stride)[0].encode()) <= max_bytes

    found = 0 if fits(1) else bisect.bisect_left(strides, True, lo=1, key=fits)
    if found < len(strides):
        page, warnings = build(strides[found])
    else:
        page, warnings = _page(detector, observations, layers, strides[-1], max_bytes, over_budget=True)
    return ExplorePage(page, tuple(warnings))


def _encoder_layers(choice: str | Sequence[int], count: int) -> list[int]:
    if count == 0:
        raise ValueError("explore shows the encoder's attention, and this model has no encoder layers")
    if choice == "last":
        return [count - 1]
    if choice == "all":
        return list(range(count))
    indices = isinstance(choice, Sequence) and not isinstance(choice, str) and all(map(is_whole_number, choice))
    if not indices or not choice or any(not 0 <= layer < count for layer in choice):
        raise ValueError(f"encoder_layers must be 'last', 'all' or indices in [0, {count}), got {choice!r}")
    return sorted(set(choice))


def _image_name(image: ImageInput, index: int) -> str:
    return Path(image).name if isinstance(image, (str, os.PathLike)) else f"image {index + 1}"


def _encoder_name(layer: int) -> str:
    return f"transformer.encoder.layers.{layer}.self_attn"


def _decoder_name(layer: int) -> str:
    return f"transformer.decoder.layers.{layer}.cross_attn"


def _observe(detector: Detector, image: ImageInput, name: str, layers: list[int], pad_to_multiple: int) -> _Observation:
    model = detector.model
    pixels = as_image_tensor(image)
    inputs = detector.prepare(pixels)
    batch, padding_mask = pad_images([inputs], multiple=pad_to_multiple)
    valid_ratios = []
    # The encoder is handed the levels' valid ratios; the attention records hold them only folded
    # into the reference points.
    hook = model.transformer.encoder.register_forward_pre_hook(lambda _, args: valid_ratios.append(args[3]))
    try:
        with evaluating(model), capture_attention(model) as records:
            outputs = forward(model, batch, padding_mask, dtype=detector.dtype)
    finally:
        hook.remove()
    records = {record.name: record for record in records}
    return _Observation(
        name=name,
        picture=_jpeg(to_uint8(inputs.cpu())),
        original_size=tuple(pixels.shape[-2:]),
        input_size=tuple(inputs.shape[-2:]),
        frame_size=tuple(batch.shape[-2:]),
        valid_ratios=valid_ratios[0][0].float().cpu(),
        records=records,
        outputs=outputs,
        heat={layer: attention_heat(records[_encoder_name(layer)]) for layer in layers},
    )


class _Buffer:
    """Arrays laid end to end, each at an offset its typed array can start at."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def add(self, array: np.ndarray) -> dict[str, Any]:
        padding = -self._size % 4
        self._parts.append(bytes(padding) + array.tobytes())
        offset, self._size = self._size + padding, self._size + padding + array.nbytes
        return {"offset": offset, "type": _TYPED_ARRAYS[array.dtype.type], "length": array.size}

    def base64(self) -> str:
        return base64.b64encode(b"".join(self._parts)).decode("ascii")


def _page(
    detector: Detector, observations: list[_Observation], layers: list[int], stride: int, max_bytes: int,
    *, over_budget: bool = False,
) -> tuple[str, list[str]]:  # fmt: skip
    """The page with encoder queries kept every ``stride``-th row and column of the first level (and
    as densely on the coarser ones), and the warnings about what it leaves out."""
    config = detector.model.config
    buffer = _Buffer()
    images = [_image_data(observation, layers, stride, buffer) for observation in observations]
    warnings = []
    if stride > 1:
        strides = ", ".join(str(s) for s in images[0]["strides"])
        warnings.append(f"explore: encoder queries subsampled to keep the page within {max_bytes / 1e6:g} MB "
                        f"(levels 0 to {len(images[0]['strides']) - 1} keep one row and column in {strides})")
    if over_budget:
        warnings.append(f"explore: the page is over its budget of {max_bytes / 1e6:g} MB even at the coarsest "
                        "subsampling")
    meta = {
        "images": images,
        "heads": config.num_heads,
        "levels": config.num_feature_levels,
        "encoderPoints": config.encoder_points,
        "decoderPoints": config.decoder_points,
        "encoderLayers": layers,
        "encoderLayerCount": config.encoder_layers,
        "decoderLayerCount": config.decoder_layers,
        "twoStage": config.two_stage,
        "headColours": ["#{:02x}{:02x}{:02x}".format(*colour) for colour in head_colours(config.num_heads)],
        "classNames": {str(label): name for label, name in detector.class_names.items()},
        "scales": {"coordinate": COORDINATES.describe(), "weight": WEIGHTS.describe(), "score": SCORES.describe()},
        "scoreThreshold": SCORE_THRESHOLD,
        "warnings": warnings,
    }
    return _fill(_script_safe_json(meta), buffer.base64()), warnings


def _level_strides(stride: int, levels: int) -> list[int]:
    # Each level halves the one before: the same stride in image pixels on every level.
    return [max(1, stride >> level) for level in range(levels)]


def _kept_queries(spatial_shapes: Tensor, strides: list[int]) -> Tensor:
    """Flat indices of the encoder queries kept: every stride-th row and column of each level."""
    kept, start = [], 0
    for (height, width), stride in zip(spatial_shapes.tolist(), strides):
        rows, columns = torch.arange(0, height, stride), torch.arange(0, width, stride)
        kept.append((start + rows[:, None] * width + columns[None, :]).flatten())
        start += height * width
    return torch.cat(kept)


def _image_data(observation: _Observation, layers: list[int], stride: int, buffer: _Buffer) -> dict[str, Any]:
    records, outputs = observation.records, observation.outputs
    spatial_shapes = records[_encoder_name(0)].spatial_shapes.cpu()
    strides = _level_strides(stride, len(spatial_shapes))
    kept = _kept_queries(spatial_shapes, strides)
    arrays: dict[str, dict[str, Any]] = {}
    heat_maxima = []
    for layer in layers:
        record = records[_encoder_name(layer)]
        arrays[f"encoder.{layer}.locations"] = buffer.add(COORDINATES.encode(record.sampling_locations[0, kept]))
        arrays[f"encoder.{layer}.weights"] = buffer.add(WEIGHTS.encode(record.attention_weights[0, kept]))
        heat = observation.heat[layer]
        heat_maxima.append(float(heat.max()))
        arrays[f"encoder.{layer}.heat"] = buffer.add(_Scale(0.0, heat_maxima[-1] or 1.0, np.uint16).encode(heat))

    decoder = [records[_decoder_name(layer)] for layer in range(len(outputs["aux_outputs"]) + 1)]
    arrays["decoder.locations"] = buffer.add(COORDINATES.encode(torch.stack([r.sampling_locations[0] for r in decoder])))
    arrays["decoder.weights"] = buffer.add(WEIGHTS.encode(torch.stack([r.attention_weights[0] for r in decoder])))
    # The reference each layer starts from, as seen from the first level: a point (its size left 0)
    # or, with box refinement, a box.
    references = torch.stack([_as_box(r.reference_points[0, :, 0]) for r in decoder])
    arrays["decoder.references"] = buffer.add(COORDINATES.encode(references))
    predictions = [*outputs["aux_outputs"], outputs]
    arrays["decoder.boxes"] = buffer.add(COORDINATES.encode(torch.stack([p["pred_boxes"][0] for p in predictions])))
    scores, labels = torch.stack([p["pred_logits"][0] for p in predictions]).sigmoid().max(-1)
    arrays["decoder.scores"] = buffer.add(SCORES.encode(scores))
    arrays["decoder.labels"] = buffer.add(labels.cpu().numpy().astype("<u2"))
    if "enc_outputs" in outputs:
        # The proposals the decoder starts from: the encoder's best positions, as the transformer ranks them.
        logits = outputs["enc_outputs"]["pred_logits"][0, :, 0]
        top = logits.topk(scores.shape[1]).indices
        arrays["proposals.boxes"] = buffer.add(COORDINATES.encode(outputs["enc_outputs"]["pred_boxes"][0, top]))
        arrays["proposals.scores"] = buffer.add(SCORES.encode(logits[top].sigmoid()))

    return {
        "name": observation.name,
        "picture": observation.picture,
        "size": list(observation.original_size),
        "input": list(observation.input_size),
        "frame": list(observation.frame_size),
        "shapes": spatial_shapes.tolist(),
        "validRatios": observation.valid_ratios.tolist(),
        "strides": strides,
        "queries": scores.shape[1],
        "referenceIsBox": [r.reference_points.shape[-1] == 4 for r in decoder],
        "heatMaxima": heat_maxima,
        "arrays": arrays,
    }


def _as_box(reference: Tensor) -> Tensor:
    return reference if reference.shape[-1] == 4 else torch.cat([reference, torch.zeros_like(reference)], -1)


def attention_heat(record: AttentionRecord) -> Tensor:
    """(M, S) the attention weight all of ``record``'s queries (of image 0) put on each pixel of
    each level, per head: each sampling point's weight shared among the (up to) four pixels it
    interpolates as bilinear sampling shares it (``align_corners=False``, zero outside the level)."""
    locations, weights = record.sampling_locations[0].float().cpu(), record.attention_weights[0].float().cpu()
    heads = weights.shape[1]
    maps = []
    for level, (height, width) in enumerate(record.spatial_shapes.tolist()):
        x = locations[:, :, level, :, 0] * width - 0.5
        y = locations[:, :, level, :, 1] * height - 0.5
        left, top = x.floor(), y.floor()
        heat = torch.zeros(heads, height * width)
        head = torch.arange(heads)[None, :, None].expand_as(x)
        for column, x_share in ((left, left + 1 - x), (left + 1, x - left)):
            for row, y_share in ((top, top + 1 - y), (top + 1, y - top)):
                inside = (column >= 0) & (column < width) & (row >= 0) & (row < height)
                pixel = (row * width + column)[inside].long()
                heat.index_put_((head[inside], pixel), (weights[:, :, level] * x_share * y_share)[inside], accumulate=True)
        maps.append(heat)
    return torch.cat(maps, 1)


def _jpeg(picture: Tensor) -> str:
    stream = io.BytesIO()
    Image.fromarray(picture.permute(1, 2, 0).numpy()).save(stream, format="JPEG", quality=JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(stream.getvalue()).decode("ascii")


def _script_safe_json(value: Any) -> str:
    """JSON that no string inside can end the script element it is embedded in: ``<``, ``>`` and
    ``&`` written as escapes, which JSON.parse reads back as the characters."""
    text = json.dumps(value, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _fill(meta: str, data: str) -> str:
    script = (_PAGE / "explore.js").read_text(encoding="utf-8")
    style = (_PAGE / "explore.css").read_text(encoding="utf-8")
    # Only the page's own script and style run, by their hashes; no request of any kind is allowed.
    policy = (
        f"default-src 'none'; script-src '{_sha256(script)}'; style-src '{_sha256(style)}'; "
        "img-src data:; base-uri 'none'; form-action 'none'"
    )
    values = {"POLICY": policy, "STYLE": style, "SCRIPT": script, "META": meta, "DATA": data}
    template = (_PAGE / "page.html").read_text(encoding="utf-8")
    # One pass: what is filled in is never searched for placeholders itself.
    return re.sub(r"\{\{(\w+)\}\}", lambda match: values[match[1]], template)


def _sha256(text: str) -> str:
    return "sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode("ascii")
