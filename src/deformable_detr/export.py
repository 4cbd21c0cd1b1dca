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
import importlib.util
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor, nn

from .files import atomic_write
from .model import DeformableDETR, check_model, evaluating
from .ops import use_implementation

FORMATS = ("onnx",)
# The opsets torch's exporter writes this model in: it translates to 18, then converts with onnxscript's
# version converter, which goes up to 25. For any other it falls back to onnx's converter, which fails
# on this graph (LayerNormalization below 18, no adapter for Attention above 25), logs the traceback
# and leaves opset 18.
MIN_OPSET = 18
MAX_OPSET = 25
# What torch's exporter imports, which the package does not require: the `onnx` extra installs them.
EXPORTER_PACKAGES = ("onnx", "onnxscript")


class ExportError(ValueError):
    """An export that cannot be done as asked (unknown format, an opset the exporter cannot write, a
    failed write)."""


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
    all three sizes dynamic; ``opset`` (``MIN_OPSET`` to ``MAX_OPSET``) defaults to the exporter's own.
    The file is written atomically and holds the weights (no external data file). The model is
    exported in eval mode and left in the mode it was in. A line naming each of the export's long
    steps (tracing and translating the model, optimising the graph) is printed as it starts.

    Raises:
        TypeError: ``model`` is not a DeformableDETR.
        ExportError: an unknown format, an opset the exporter cannot write, the exporter's packages
            missing, or a failure writing the file (a full disk, say).
        OSError: ``path`` cannot be written (a folder in its place, say), found before exporting.
    """
    check_model(model)
    if format not in FORMATS:
        raise ExportError(f"unsupported export format {format!r}; choose from {', '.join(FORMATS)}")
    if opset is not None and not MIN_OPSET <= opset <= MAX_OPSET:
        raise ExportError(f"ONNX opset {opset} is not supported: the exporter writes opsets {MIN_OPSET} to {MAX_OPSET}")
    _check_exporter_installed()
    path = Path(path)
    # The temporary file is created before the (long) export, so an unwritable path fails at once.
    with atomic_write(path) as temporary:
        try:
            written = _export_onnx(model, temporary, opset=opset, destination=path)
        except OSError as error:  # writing the temporary file, which the user never named
            raise ExportError(f"{path}: cannot write the ONNX file: {error.strerror or error}") from error
        # The exporter logs a failed conversion and writes the graph in the opset it has instead.
        if opset is not None and written != opset:
            raise ExportError(f"{path}: the exporter could not convert the graph to ONNX opset {opset} (it wrote {written})")
    return path


def _check_exporter_installed() -> None:
    # Said before the model is traced: torch's exporter would fail with a traceback from its import.
    missing = [name for name in EXPORTER_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {' and '.join(missing)}, not installed: install the package's onnx extra "
                          "(pip install -e '.[onnx]' in its clone)")


def _export_onnx(model: DeformableDETR, temporary: Path, *, opset: int | None, destination: Path) -> int:
    """Write the ONNX file for ``destination`` into ``temporary``, with a line naming each long step
    as it starts; returns the opset it was written in."""
    # Batch 2 and every feature map at least 2 x 2 (the coarsest one is 4 x 5 at stride 64): the
    # trace would assume a size of 1 stays 1. The values are never read (fake tensors).
    device = next(model.parameters()).device
    example = torch.zeros(2, 3, 256, 320, device=device)
    # The fused CPU kernel is an opaque custom op with no ONNX counterpart; the reference
    # implementation is made of grid_sample and tensor arithmetic, which ONNX has.
    with evaluating(model), use_implementation("reference"), torch.no_grad():
        print(f"{destination}: tracing the model (torch.export) and translating it to ONNX", flush=True)
        program = torch.onnx.export(
            _Predictions(model).eval(),
            (example,),
            dynamo=True,  # the TorchScript exporter freezes the level sizes to the example's
            input_names=["images"],
            output_names=["pred_logits", "pred_boxes"],
            # Named dimensions become Dim.DYNAMIC: an error if the trace fixed them to the example's.
            dynamic_shapes={"images": {0: "batch", 2: "height", 3: "width"}},
            opset_version=opset,
            optimize=False,  # run below, as a step of its own
            verbose=False,
        )
    print(f"{destination}: optimising the graph (onnxscript)", flush=True)
    with _quiet_onnx_optimizer():
        program.optimize()
    program.save(temporary, external_data=False)
    return program.model.opset_imports[""]


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
