"""Multi-scale deformable attention in plain PyTorch: the readable specification of the op."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def ms_deform_attn_reference(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """Sample every level bilinearly at the given locations and sum with the attention weights.

    Args:
        value: (N, S, M, D), the flattened feature maps of all levels, per head.
        spatial_shapes: (L, 2) integer (H, W) of each level.
        level_start_index: (L,) offset of each level inside S.
        sampling_locations: (N, Lq, M, L, P, 2) normalised (x, y) in [0, 1]; pixel centres lie at
            (i + 0.5) / size and samples falling outside the map read zeros.
        attention_weights: (N, Lq, M, L, P).

    Returns:
        (N, Lq, M * D).
    """
    # Half precisions sample and sum in float32, as the fused kernels do: grid_sample computes the
    # pixel coordinates in its input's dtype (bfloat16 has 1/8 px steps at x = 20), and torch's CPU
    # grid_sample misreads a strided bfloat16 input (NaN, 1e37).
    dtype = value.dtype
    value, sampling_locations, attention_weights = (
        t.to(torch.promote_types(t.dtype, torch.float32)) for t in (value, sampling_locations, attention_weights)
    )
    batch, _, heads, channels = value.shape
    _, num_queries, _, num_levels, num_points, _ = sampling_locations.shape
    # grid_sample with align_corners=False is exactly the pixel-centre convention of the CUDA kernel.
    sampling_grids = 2 * sampling_locations - 1
    sampled_per_level = []
    for level, ((height, width), start) in enumerate(zip(spatial_shapes.tolist(), level_start_index.tolist())):
        # (N, H*W, M, D) -> (N*M, D, H, W)
        value_level = value[:, start : start + height * width].permute(0, 2, 3, 1)
        value_level = value_level.reshape(batch * heads, channels, height, width)
        # (N, Lq, M, P, 2) -> (N*M, Lq, P, 2)
        grid_level = sampling_grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        sampled_per_level.append(
            F.grid_sample(value_level, grid_level, mode="bilinear", padding_mode="zeros", align_corners=False)
        )
    # (N*M, D, Lq, L*P) weighted by (N*M, 1, Lq, L*P), summed over levels and points.
    sampled = torch.stack(sampled_per_level, dim=-2).flatten(-2)
    weights = attention_weights.transpose(1, 2).reshape(batch * heads, 1, num_queries, num_levels * num_points)
    output = (sampled * weights).sum(-1).view(batch, heads * channels, num_queries)
    return output.transpose(1, 2).contiguous().to(dtype)
