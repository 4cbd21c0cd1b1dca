"""Multi-scale deformable attention, the core op of the model.

Every call in the model goes through :func:`ms_deform_attn`, so a faster implementation can be
dispatched here without touching the model. :func:`ms_deform_attn_reference` is the specification.
"""

from __future__ import annotations

from torch import Tensor

from .reference import ms_deform_attn_reference

__all__ = ["ms_deform_attn", "ms_deform_attn_reference"]


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
    return ms_deform_attn_reference(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
