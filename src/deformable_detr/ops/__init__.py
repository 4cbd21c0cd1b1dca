"""Multi-scale deformable attention, the core op of the model.

Every call in the model goes through :func:`ms_deform_attn`, which dispatches by device: the fused
kernel on the CPU (``cpu.py``, compiled on first use), the reference elsewhere.
:func:`ms_deform_attn_reference` is the specification. ``DEFORMABLE_DETR_OP=reference|cpu|auto``
(or :func:`use_implementation`) forces a path.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

from torch import Tensor

from . import cpu
from .reference import ms_deform_attn_reference

__all__ = ["IMPLEMENTATIONS", "ms_deform_attn", "ms_deform_attn_reference", "use_implementation"]

IMPLEMENTATIONS = ("auto", "reference", "cpu")


def _checked(name: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"unknown ms_deform_attn implementation {name!r}; choose from {', '.join(IMPLEMENTATIONS)}")
    return name


_implementation = _checked(os.environ.get("DEFORMABLE_DETR_OP", "auto"))


@contextlib.contextmanager
def use_implementation(name: str) -> Iterator[None]:
    """Force ``"reference"``, ``"cpu"`` (the fused kernel; an error where it cannot be built) or
    ``"auto"`` inside the block."""
    global _implementation
    previous, _implementation = _implementation, _checked(name)
    try:
        yield
    finally:
        _implementation = previous


def _fused_cpu_wanted(value: Tensor) -> bool:
    if _implementation == "reference" or value.device.type != "cpu":
        return False
    if cpu.load_extension() is None:
        if _implementation == "cpu":
            raise RuntimeError(f"the fused CPU kernel was requested but could not be built: {cpu.build_failure()}")
        return False
    return True


def ms_deform_attn(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Multi-scale deformable attention with the reference CUDA kernel's signature and semantics.

    Shapes: value (N, S, M, D), spatial_shapes (L, 2) as (H, W), level_start_index (L,),
    sampling_locations (N, Lq, M, L, P, 2) normalised (x, y), attention_weights (N, Lq, M, L, P)
    -> (N, Lq, M * D). Differentiable with respect to value, sampling_locations and
    attention_weights; any floating dtype, any device.
    """
    if _fused_cpu_wanted(value):
        return cpu.ms_deform_attn_cpu(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
