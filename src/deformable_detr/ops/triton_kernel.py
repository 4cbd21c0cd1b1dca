"""Fused Triton kernels for multi-scale deformable attention, forward and backward: the CUDA path.

Registered as the custom operator ``deformable_detr::ms_deform_attn_triton`` (autograd and fake
tensor support included, so it works under ``torch.compile``, ``gradcheck`` and ``opcheck``). Triton
compiles the kernels on first use; nothing is built when the package is installed.

In a process started with ``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter, on
CPU tensors too (Triton reads the variable when it is imported, and its own library functions are
then defined for the interpreter or for compiling; torch imports Triton early).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .registration import register_fused_op

# Queries per program: enough that a block of queries times the head's channels makes a tile of about
# this many elements (64 queries at the usual head width of 32), at least 16 for wide heads.
_TILE = 2048
_MIN_QUERIES, _MAX_QUERIES = 16, 128


@triton.jit
def _corner(x, y, x_floor, y_floor, width, height, start, active, DX: tl.constexpr, DY: tl.constexpr):
    """One of the four bilinear corners of a block of samples: the corner's position in the value
    map, whether it is inside the map, and its weight along x and along y."""
    col = x_floor + DX
    row = y_floor + DY
    inside = active & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    # Outside corners get position 0, so that far-away samples cannot overflow the integer; they are
    # masked. Inside ones are exact integers in float32 up to 16 M pixels a level.
    position = start + tl.where(inside, row * width + col, 0).to(tl.int32)
    return position, inside, 1 - tl.abs(x - col), 1 - tl.abs(y - row)


@triton.jit
def _block(num_positions, num_queries, num_heads, num_channels, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr):
    """The program's block: queries (BLOCK_Q) of one (batch, head), all channels (BLOCK_D).

    Returns the rows (batch, query, head) of the locations, weights and output, the offset of the
    head's first value, and the queries, channels and their masks. Layouts are contiguous: value
    (N, S, M, D), locations (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P), output (N, Lq, M * D).
    """
    batch = (tl.program_id(1) // num_heads).to(tl.int64)
    head = tl.program_id(1) % num_heads
    query = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channel = tl.arange(0, BLOCK_D)
    row = (batch * num_queries + query) * num_heads + head
    head_offset = (batch * num_positions * num_heads + head) * num_channels
    return row, head_offset, query < num_queries, channel, channel < num_channels


@triton.jit
def _sample(locations_ptr, weights_ptr, row, level, index, samples, shapes_ptr, active, COMPUTE: tl.constexpr):
    """One sample of each query in the block: its (x, y) in pixels of the level, where pixel (i, j)
    has its centre at ((j + 0.5) / W, (i + 0.5) / H) (grid_sample's align_corners=False), their
    floors, the level's width and height, and the sample's attention weight."""
    height = tl.load(shapes_ptr + 2 * level).to(COMPUTE)
    width = tl.load(shapes_ptr + 2 * level + 1).to(COMPUTE)
    location = locations_ptr + (row * samples + index) * 2
    x = tl.load(location, mask=active, other=0).to(COMPUTE) * width - 0.5
    y = tl.load(location + 1, mask=active, other=0).to(COMPUTE) * height - 0.5
    attention = tl.load(weights_ptr + row * samples + index, mask=active, other=0).to(COMPUTE)
    return x, y, tl.floor(x), tl.floor(y), width, height, attention


@triton.jit
def _forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, output_ptr,
    num_positions, num_queries, num_heads, num_channels, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    """One program per block of queries of one (batch, head): output rows (BLOCK_Q, BLOCK_D)."""
    row, head_offset, active, channel, channel_active = _block(
        num_positions, num_queries, num_heads, num_channels, BLOCK_Q, BLOCK_D
    )
    samples = num_levels * num_points
    accumulated = tl.zeros((BLOCK_Q, BLOCK_D), COMPUTE)
    for level in range(num_levels):
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            x, y, x_floor, y_floor, width, height, attention = _sample(
                locations_ptr, weights_ptr, row, level, level * num_points + point, samples, shapes_ptr, active, COMPUTE
            )
            for corner in tl.static_range(4):
                position, inside, weight_x, weight_y = _corner(
                    x, y, x_floor, y_floor, width, height, start, active, corner % 2, corner // 2
                )
                mask = inside[:, None] & channel_active[None, :]
                offsets = head_offset + position[:, None] * (num_heads * num_channels) + channel[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=mask, other=0).to(COMPUTE)
                accumulated += (attention * weight_x * weight_y)[:, None] * corner_value
    output = output_ptr + (row * num_channels)[:, None] + channel[None, :]
    tl.store(output, accumulated.to(output_ptr.dtype.element_ty), mask=active[:, None] & channel_active[None, :])


@triton.jit
def _backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr,
    grad_output_ptr, grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_positions, num_queries, num_heads, num_channels, num_levels, num_points,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr,
):
    """The forward's blocks again: each program writes its own samples' location and weight
    gradients, and adds its share of the value gradient into the accumulation buffer atomically
    (many queries sample the same pixels)."""
    row, head_offset, active, channel, channel_active = _block(
        num_positions, num_queries, num_heads, num_channels, BLOCK_Q, BLOCK_D
    )
    samples = num_levels * num_points
    row_mask = active[:, None] & channel_active[None, :]
    grad_output = tl.load(
        grad_output_ptr + (row * num_channels)[:, None] + channel[None, :], mask=row_mask, other=0
    ).to(COMPUTE)
    for level in range(num_levels):
        start = tl.load(starts_ptr + level)
        for point in range(num_points):
            index = level * num_points + point
            x, y, x_floor, y_floor, width, height, attention = _sample(
                locations_ptr, weights_ptr, row, level, index, samples, shapes_ptr, active, COMPUTE
            )
            grad_attention = tl.zeros((BLOCK_Q,), COMPUTE)
            grad_x = tl.zeros((BLOCK_Q,), COMPUTE)
            grad_y = tl.zeros((BLOCK_Q,), COMPUTE)
            for corner in tl.static_range(4):
                dx = corner % 2
                dy = corner // 2
                position, inside, weight_x, weight_y = _corner(
                    x, y, x_floor, y_floor, width, height, start, active, dx, dy
                )
                mask = inside[:, None] & channel_active[None, :]
                offsets = head_offset + position[:, None] * (num_heads * num_channels) + channel[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=mask, other=0).to(COMPUTE)
                # The upstream gradient's dot product with the corner's value, per sample.
                projected = tl.sum(grad_output * corner_value, axis=1)
                grad_attention += weight_x * weight_y * projected
                # A corner's weight along x is 1 - |x - col|: its derivative is -1 left of x, +1 right.
                grad_x += (2 * dx - 1) * weight_y * projected
                grad_y += (2 * dy - 1) * weight_x * projected
                contribution = (attention * weight_x * weight_y)[:, None] * grad_output
                tl.atomic_add(grad_value_ptr + offsets, contribution, mask=mask, sem="relaxed")
            tl.store(grad_weights_ptr + row * samples + index, grad_attention, mask=active)
            grad_location = grad_locations_ptr + (row * samples + index) * 2
            tl.store(grad_location, attention * width * grad_x, mask=active)
            tl.store(grad_location + 1, attention * height * grad_y, mask=active)


INTERPRETED: bool = isinstance(_forward_kernel, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (the process started with TRITON_INTERPRET=1)."""


def _launch(kernel, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, *tensors: Tensor) -> None:
    """Run a kernel over blocks of queries of every (batch, head). ``tensors``: sampling locations,
    attention weights, then the kernel's own."""
    if value.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton kernels run on CUDA tensors, or on CPU tensors in a process started with TRITON_INTERPRET=1"
        )
    batch, positions, heads, channels = value.shape
    _, queries, _, levels, points, _ = tensors[0].shape
    if batch * queries * heads == 0:
        return
    block_d = triton.next_power_of_2(channels)
    block_q = max(_MIN_QUERIES, min(_MAX_QUERIES, _TILE // block_d))
    grid = (triton.cdiv(queries, block_q), batch * heads)
    kernel[grid](
        value, spatial_shapes.to(torch.int32).contiguous(), level_start_index.to(torch.int32).contiguous(), *tensors,
        positions, queries, heads, channels, levels, points,
        BLOCK_Q=block_q, BLOCK_D=block_d, COMPUTE=tl.float64 if value.dtype == torch.float64 else tl.float32,
    )


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton", mutates_args=())
def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The fused Triton forward; same signature and result as ``ms_deform_attn_reference``."""
    batch, _, heads, channels = value.shape
    output = value.new_empty((batch, sampling_locations.shape[1], heads * channels))
    _launch(
        _forward_kernel, value.contiguous(), spatial_shapes, level_start_index,
        sampling_locations.contiguous(), attention_weights.contiguous(), output,
    )
    return output


@torch.library.custom_op("deformable_detr::ms_deform_attn_triton_backward", mutates_args=())
def ms_deform_attn_triton_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to value, sampling_locations and attention_weights."""
    # The value gradient is summed atomically in float32 (float64 for float64 inputs): half-precision
    # atomics would round every one of the many additions into a pixel.
    accumulation = torch.float64 if value.dtype == torch.float64 else torch.float32
    grad_value = torch.zeros(value.shape, dtype=accumulation, device=value.device)
    grad_locations = sampling_locations.new_empty(sampling_locations.shape)
    grad_weights = attention_weights.new_empty(attention_weights.shape)
    _launch(
        _backward_kernel, value.contiguous(), spatial_shapes, level_start_index,
        sampling_locations.contiguous(), attention_weights.contiguous(),
        grad_output.contiguous(), grad_value, grad_locations, grad_weights,
    )
    return grad_value.to(value.dtype), grad_locations, grad_weights


register_fused_op(ms_deform_attn_triton, ms_deform_attn_triton_backward)
