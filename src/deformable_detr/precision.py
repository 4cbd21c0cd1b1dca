"""The precision inference computes in: float32 by default (outputs equal to the reference code's),
or bfloat16 / float16 autocast, asked for by ``dtype`` (the name transformers' ``from_pretrained``
and ``torch.autocast`` use).

Under autocast the convolutions and linear layers run in the low precision, where a CPU with
AVX512-BF16 or AMX, or a recent GPU, computes them about twice as fast, and so does what follows
them inside a layer (layer and group norms accumulate in float32 but return the low precision; the
attention weights; the class scores). The backbone's frozen batch norms are folded into the
convolutions before them (:func:`inference_model`): left in float32 between two low-precision
convolutions, they and autocast's casts around them kept the r50 forward from its 2x. The feature
maps' position embeddings stay float32, and so do the deformable attention's sampling locations and
the reference points and valid ratios they are made from (the op reads the locations beside bfloat16
values): 8 significant bits would misplace the samples by up to a pixel of the largest level. For
the same reason the box heads' last layers and the initial reference points compute in float32
(:func:`~deformable_detr.model.transformer.box_linear`): every box and reference box is float32.
The outputs are handed to post-processing in float32: scores through the sigmoid and the top-k,
boxes scaled to pixels.
bfloat16 keeps 8 significant bits, so what it costs is measured: docs/performance.md#bfloat16-inference.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .environment import native_bf16
from .model.backbone import fold_batch_norms

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def check_dtype(dtype: torch.dtype, device: torch.device | str) -> None:
    """Raise for a ``dtype`` inference cannot run in; warn (one line) where ``device`` only emulates
    bfloat16, which is then slower than float32, not faster."""
    if dtype not in DTYPES:
        raise ValueError(f"unsupported inference dtype {dtype}: choose torch.float32, torch.bfloat16 or torch.float16")
    device = torch.device(device)
    if dtype == torch.bfloat16 and not native_bf16(device):
        hardware = "a CPU with AVX512-BF16 or AMX" if device.type == "cpu" else "an Ampere or later GPU"
        warnings.warn(f"bfloat16 is emulated on this {device.type} (it needs {hardware}): slower than float32",
                      RuntimeWarning, stacklevel=3)  # fmt: skip


def inference_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The model that runs inference in ``dtype``: ``model`` itself in float32 (outputs equal to the
    reference code's); in a low precision an eval-mode copy with its batch norms folded into the
    convolutions before them (:func:`~deformable_detr.model.backbone.fold_batch_norms`), a copy so
    that ``model`` and its state dict stay as they are."""
    if dtype == torch.float32:
        return model
    return fold_batch_norms(copy.deepcopy(model).eval())


@contextlib.contextmanager
def autocast(dtype: torch.dtype, device: torch.device | str) -> Iterator[None]:
    """Autocast to ``dtype`` on ``device``'s type inside the block; float32 is plain float32 (no autocast)."""
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32):
        yield


def forward(model: nn.Module, *inputs: Any, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """``model(*inputs)`` computed in ``dtype``, with its detections (``pred_logits``, ``pred_boxes``)
    in float32 for post-processing."""
    with autocast(dtype, next(model.parameters()).device):
        outputs = model(*inputs)
    return {key: value.float() if isinstance(value, Tensor) else value for key, value in outputs.items()}
