"""Export of the detector's inference forward to ONNX.

The exported graph takes ``images`` (N, 3, H, W), float32, normalised as for ``forward``, with N, H
and W dynamic, and returns the final ``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4)
(normalised cx, cy, w, h), without auxiliary outputs.

It takes no padding mask: every image fills its input, so differently sized images are run one at a
time (padding would be read as image content). A mask input would not give PyTorch's results: ONNX
Resize rounds the nearest-neighbour source index differently, so a mask resized to a feature map
can lose or gain a column of padding.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .files import atomic_write
from .model import DeformableDETR, evaluating
from .ops import use_implementation

FORMATS = ("onnx",)
# The oldest opset torch's exporter translates to: it would write an older one only by converting
# down, which fails on this model (LayerNormalization, opset 17) and falls back to 18 anyway.
MIN_OPSET = 18


class ExportError(ValueError):
    """An export that cannot be done as asked (unknown format, opset too old, unwritable file)."""


class _Predictions(nn.Module):
    """The detector's final predictions as a tuple: an ONNX graph has flat, named outputs."""

    def __init__(self, model: DeformableDETR) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        outputs = self.model(images)
        return outputs["pred_logits"], outputs["pred_boxes"]


def export_model(
    model: DeformableDETR,
    path: str | os.PathLike,
    *,
    format: str = "onnx",
    opset: int | None = None,
) -> Path:
    """Write the inference forward of ``model`` to ``path`` in ``format`` (``FORMATS``); returns the path.

    ONNX: input ``images`` (batch, 3, height, width), outputs ``pred_logits`` and ``pred_boxes``,
    all three sizes dynamic; ``opset`` defaults to the exporter's own (at least ``MIN_OPSET``).
    The file is written atomically and holds the weights (no external data file). The model is
    exported in eval mode and left in the mode it was in.

    Raises:
        ExportError: an unknown format, an opset older than ``MIN_OPSET`` or a path that cannot be
            written.
    """
    if format not in FORMATS:
        raise ExportError(f"unsupported export format {format!r}; choose from {', '.join(FORMATS)}")
    if opset is not None and opset < MIN_OPSET:
        raise ExportError(f"ONNX opset {opset} is not supported: the exporter writes opset {MIN_OPSET} or newer")
    path = Path(path)
    try:
        # The temporary file is created before the (long) export, so an unwritable path fails at once.
        with atomic_write(path) as temporary:
            _export_onnx(model, temporary, opset=opset)
    except OSError as error:
        raise ExportError(f"{path}: cannot write the ONNX file: {error.strerror or error}") from error
    return path


def _export_onnx(model: DeformableDETR, path: Path, *, opset: int | None) -> None:
    # Batch 2 and every feature map at least 2 x 2 (the coarsest one is 4 x 5 at stride 64): the
    # trace would assume a size of 1 stays 1. The values are never read (fake tensors).
    device = next(model.parameters()).device
    example = torch.zeros(2, 3, 256, 320, device=device)
    # The fused CPU kernel is an opaque custom op with no ONNX counterpart; the reference
    # implementation is made of grid_sample and tensor arithmetic, which ONNX has.
    with evaluating(model), use_implementation("reference"), torch.no_grad(), _quiet_onnx_optimizer():
        torch.onnx.export(
            _Predictions(model).eval(),
            (example,),
            path,
            dynamo=True,  # the TorchScript exporter freezes the level sizes to the example's
            input_names=["images"],
            output_names=["pred_logits", "pred_boxes"],
            # Named dimensions become Dim.DYNAMIC: an error if the trace fixed them to the example's.
            dynamic_shapes={"images": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            external_data=False,
            verbose=False,
        )


@contextlib.contextmanager
def _quiet_onnx_optimizer() -> Iterator[None]:
    # The optimiser warns about every node it leaves unfolded (torch.split's outputs), which is
    # nothing a user can act on.
    logger = logging.getLogger("onnxscript.optimizer")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(previous)
