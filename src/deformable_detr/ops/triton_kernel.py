"""Fused Triton kernels for multi-scale deformable attention, forward and backward: the CUDA path.

Registered as the custom operator ``deformable_detr::ms_deform_attn_triton`` (autograd and fake
tensor support included, so it works under ``torch.compile``, ``gradcheck`` and ``opcheck``). Triton
compiles the kernels on first use, and tunes the block of queries a program handles once per
process and shape class; nothing is built when the package is installed.

A program handles a block of queries of one (batch, head) and a block of that head's channels: a
head wider than one channel block is split across programs (the third grid axis), so that any head
width runs in the same registers. ``triton_resources.py`` compiles every configuration ahead of time
for NVIDIA and AMD GPUs and reads what each costs.

In a process started with ``TRITON_INTERPRET=1`` the same kernels run in Triton's interpreter, on
CPU tensors too (Triton reads the variable when it is imported, and its own library functions are
then defined for the interpreter or for compiling; torch imports Triton early).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

from .reference import ms_deform_attn_reference
from .registration import fused_op, register_fused_op
from .shapes import check_output_gradient, check_shapes

MAX_BLOCK_D = 64
"""The widest channel block a program holds; wider heads are split across programs. Half that for
heads whose width is not a multiple of 16 and for 64-bit elements (see ``elements_per_thread``)."""

TUNING_CONFIGS = tuple(
    triton.Config({"BLOCK_Q": queries}, num_warps=warps) for warps in (4, 2, 8) for queries in (32, 16, 64)
)
"""Queries a program x warps: what the autotuner times on first use (the block sizes of roulbac's
msda-triton, and 8 warps for heads of odd widths), less those whose tile would not fit a thread's
registers (``configs_for``). The launcher's default comes first."""


def _aligned(channels: int) -> bool:
    """Whether Triton can prove a head's channel rows aligned: then it gives each thread a vector of
    one query's channels. Otherwise each channel is a load of its own, a thread holds channels of
    several queries, and holds each query's sampling state once for each (in the backward about 16
    registers an element)."""
    return channels % 16 == 0


def _registers(dtype: torch.dtype) -> int:
    """32-bit registers an element takes."""
    return 2 if dtype.itemsize == 8 else 1


def channel_block(channels: int, dtype: torch.dtype) -> int:
    """The channels a program holds: the head's, padded to a power of two, at most ``MAX_BLOCK_D``."""
    limit = MAX_BLOCK_D if _aligned(channels) else MAX_BLOCK_D // 2
    return min(triton.next_power_of_2(channels), limit // _registers(dtype))


def splits_channels(channels: int, dtype: torch.dtype) -> bool:
    """Whether a head's channels span several programs: then each adds its share of the location
    and weight gradients (the backward's ``SUMMED``)."""
    return channels > channel_block(channels, dtype)


def elements_per_thread(channels: int, dtype: torch.dtype) -> int:
    """The largest tile (queries x channels) a thread may hold: what leaves ptxas room to keep
    every configuration free of spills on sm_80, sm_90 and sm_100 (``triton_resources`` checks it)."""
    return (8 if _aligned(channels) else 2) // _registers(dtype)


def configs_for(channels: int, dtype: torch.dtype) -> list[triton.Config]:
    """The configurations the autotuner may pick for heads of ``channels`` channels in ``dtype``,
    the launcher's default first (what an untuned call and the first-use check run)."""
    tile_limit = elements_per_thread(channels, dtype) * 32
    return [
        config for config in TUNING_CONFIGS
        if config.kwargs["BLOCK_Q"] * channel_block(channels, dtype) <= tile_limit * config.num_warps
    ]


def _prune(configs: list[triton.Config], named_arguments: dict, **meta) -> list[triton.Config]:
    allowed = configs_for(named_arguments["num_channels"], named_arguments["value_ptr"].dtype)
    return [config for config in configs if config in allowed]


def sample_dtype(value_dtype: torch.dtype) -> torch.dtype:
    """The dtype of the sampling locations and attention weights the model passes beside values of
    ``value_dtype``: float32 beside half precisions (its locations are at least float32, and CUDA
    autocast's softmax gives float32 weights), what the first-use check and the ahead-of-time
    builds specialise the kernels for."""
    return torch.promote_types(value_dtype, torch.float32)


def offset_dtype(value_shape: torch.Size, locations_shape: torch.Size) -> tl.dtype:
    """The integer type of the kernels' per-element offsets: 32 bits, which cost half the registers
    of 64, unless one image's value, locations or output holds 2**31 elements or more (the offset of
    the image and head is a 64-bit scalar either way)."""
    _, positions, heads, channels = value_shape
    per_image = max(positions * heads * channels, math.prod(locations_shape[1:]), locations_shape[1] * heads * channels)
    return tl.int32 if per_image < 2**31 else tl.int64


@triton.jit
def _block(
    num_positions, num_queries, num_heads, num_channels, BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, INDEX: tl.constexpr
):
    """The program's block: BLOCK_Q queries (grid axis 0) of one (batch, head) (axis 1), BLOCK_D of
    the head's channels (axis 2). Layouts are contiguous: value (N, S, M, D), locations
    (N, Lq, M, L, P, 2), weights (N, Lq, M, L, P), output (N, Lq, M * D).

    Returns the (batch, head)'s first row of the locations, weights and output and the offset of its
    first value (64-bit scalars), each query's row relative to the first (``INDEX``), the channels,
    and the masks of the queries and channels that exist.
    """
    batch = (tl.program_id(1) // num_heads).to(tl.int64)
    head = tl.program_id(1) % num_heads
    first_row = batch * num_queries * num_heads + head
    query = tl.program_id(0) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    channel = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    value_start = (batch * num_positions * num_heads + head) * num_channels
    rows = query.to(INDEX) * num_heads
    return first_row, value_start, rows, query < num_queries, channel, channel < num_channels


@triton.jit
def _sample(locations_ptr, weights_ptr, rows, index, samples, shapes_ptr, level, active, COMPUTE: tl.constexpr):
    """One sample of each query in the block: its (x, y) in pixels of the level, where pixel (i, j)
    has its centre at ((j + 0.5) / W, (i + 0.5) / H) (grid_sample's align_corners=False), their
    floors, the level's width and height, and the sample's attention weight."""
    height = tl.load(shapes_ptr + 2 * level).to(COMPUTE)
    width = tl.load(shapes_ptr + 2 * level + 1).to(COMPUTE)
    location = locations_ptr + (rows * samples + index) * 2
    x = tl.load(location, mask=active, other=0).to(COMPUTE) * width - 0.5
    y = tl.load(location + 1, mask=active, other=0).to(COMPUTE) * height - 0.5
    attention = tl.load(weights_ptr + rows * samples + index, mask=active, other=0).to(COMPUTE)
    return x, y, tl.floor(x), tl.floor(y), width, height, attention


@triton.jit
def _corner(
    x, y, x_floor, y_floor, width, height, start, columns, active, DX: tl.constexpr, DY: tl.constexpr, INDEX: tl.constexpr
):
    """One of the four bilinear corners of a block of samples: the corner's position in the value
    map, whether it is inside the map, and its weight along x and along y. ``columns`` is the
    level's width as an integer (``INDEX``), ``width`` and ``height`` as floats."""
    col = x_floor + DX
    row = y_floor + DY
    inside = active & (col >= 0) & (col < width) & (row >= 0) & (row < height)
    # The position in integers: row * width + col in float32 rounds past 2**24 pixels a level (to a
    # neighbour, and at a level's last pixel to the first one past it). Outside corners are
    # converted as 0, so that far-away samples cannot overflow the integer; they are masked.
    row_index = tl.where(inside, row, 0).to(INDEX)
    col_index = tl.where(inside, col, 0).to(INDEX)
    position = start + row_index * columns + col_index
    return position, inside, 1 - tl.abs(x - col), 1 - tl.abs(y - row)


@triton.jit
def _fits(shapes_ptr, starts_ptr, level, num_positions):
    """Whether a level lies within value's positions, in 64 bits whatever its sizes.

    The op does not check the levels against value on the GPU (reading them would wait for it on
    every call), so the kernels do: a level that does not fit reads as zeros and gets no gradient,
    rather than reaching outside the tensors.
    """
    start = tl.load(starts_ptr + level).to(tl.int64)
    area = tl.load(shapes_ptr + 2 * level).to(tl.int64) * tl.load(shapes_ptr + 2 * level + 1).to(tl.int64)
    return (start >= 0) & (start + area <= num_positions)


@triton.jit(do_not_specialize=["work"])
def _forward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr, output_ptr,
    num_positions, num_queries, num_heads, num_channels, num_levels, num_points, work,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr,
):
    """Output rows (BLOCK_Q, BLOCK_D) of one block. ``work`` only keys the tuning (see below)."""
    samples = num_levels * num_points
    first_row, value_start, rows, active, channel, channel_active = _block(
        num_positions, num_queries, num_heads, num_channels, BLOCK_Q, BLOCK_D, INDEX
    )
    value_ptr += value_start
    locations_ptr += first_row * samples * 2
    weights_ptr += first_row * samples
    row_stride = num_heads * num_channels
    accumulated = tl.zeros((BLOCK_Q, BLOCK_D), COMPUTE)
    for level in range(num_levels):
        start = tl.load(starts_ptr + level).to(INDEX)
        columns = tl.load(shapes_ptr + 2 * level + 1).to(INDEX)
        in_level = active & _fits(shapes_ptr, starts_ptr, level, num_positions)
        for point in range(num_points):
            x, y, x_floor, y_floor, width, height, attention = _sample(
                locations_ptr, weights_ptr, rows, level * num_points + point, samples, shapes_ptr, level, active, COMPUTE
            )
            # Each corner's tile is loaded and folded into the sum before the next is loaded.
            for corner in range(4):
                position, inside, weight_x, weight_y = _corner(
                    x, y, x_floor, y_floor, width, height, start, columns, in_level, corner % 2, corner // 2, INDEX
                )
                offsets = (position * row_stride)[:, None] + channel[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=inside[:, None] & channel_active[None, :], other=0)
                accumulated += (attention * weight_x * weight_y)[:, None] * corner_value.to(COMPUTE)
    output = output_ptr + first_row * num_channels + (rows * num_channels)[:, None] + channel[None, :]
    tl.store(output, accumulated.to(output_ptr.dtype.element_ty), mask=active[:, None] & channel_active[None, :])


@triton.jit
def _write_sample_gradient(pointer, gradient, mask, SUMMED: tl.constexpr):
    """A per-sample gradient: stored, or, where a head's channels are split across programs, this
    program's share added to the others' (the buffer starts at zero)."""
    if SUMMED:
        tl.atomic_add(pointer, gradient, mask=mask, sem="relaxed")
    else:
        tl.store(pointer, gradient, mask=mask)


@triton.jit(do_not_specialize=["work"])
def _backward_kernel(
    value_ptr, shapes_ptr, starts_ptr, locations_ptr, weights_ptr,
    grad_output_ptr, grad_value_ptr, grad_locations_ptr, grad_weights_ptr,
    num_positions, num_queries, num_heads, num_channels, num_levels, num_points, work,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr, COMPUTE: tl.constexpr, INDEX: tl.constexpr, SUMMED: tl.constexpr,
):
    """The forward's blocks again: each program writes (or, with ``SUMMED``, adds) its samples'
    location and weight gradients, and adds its share of the value gradient into the accumulation
    buffer atomically (many queries sample the same pixels)."""
    samples = num_levels * num_points
    first_row, value_start, rows, active, channel, channel_active = _block(
        num_positions, num_queries, num_heads, num_channels, BLOCK_Q, BLOCK_D, INDEX
    )
    value_ptr += value_start
    grad_value_ptr += value_start
    locations_ptr += first_row * samples * 2
    grad_locations_ptr += first_row * samples * 2
    weights_ptr += first_row * samples
    grad_weights_ptr += first_row * samples
    row_stride = num_heads * num_channels
    row_mask = active[:, None] & channel_active[None, :]
    grad_output = tl.load(
        grad_output_ptr + first_row * num_channels + (rows * num_channels)[:, None] + channel[None, :],
        mask=row_mask, other=0,
    ).to(COMPUTE)
    for level in range(num_levels):
        start = tl.load(starts_ptr + level).to(INDEX)
        columns = tl.load(shapes_ptr + 2 * level + 1).to(INDEX)
        in_level = active & _fits(shapes_ptr, starts_ptr, level, num_positions)
        for point in range(num_points):
            index = level * num_points + point
            x, y, x_floor, y_floor, width, height, attention = _sample(
                locations_ptr, weights_ptr, rows, index, samples, shapes_ptr, level, active, COMPUTE
            )
            grad_attention = tl.zeros((BLOCK_Q,), COMPUTE)
            grad_x = tl.zeros((BLOCK_Q,), COMPUTE)
            grad_y = tl.zeros((BLOCK_Q,), COMPUTE)
            for corner in range(4):
                dx = corner % 2
                dy = corner // 2
                position, inside, weight_x, weight_y = _corner(
                    x, y, x_floor, y_floor, width, height, start, columns, in_level, dx, dy, INDEX
                )
                mask = inside[:, None] & channel_active[None, :]
                offsets = (position * row_stride)[:, None] + channel[None, :]
                corner_value = tl.load(value_ptr + offsets, mask=mask, other=0).to(COMPUTE)
                # The upstream gradient's dot product with the corner's value, per sample.
                projected = tl.sum(grad_output * corner_value, axis=1)
                grad_attention += weight_x * weight_y * projected
                # A corner's weight along x is 1 - |x - col|: its derivative is -1 left of x, +1 right.
                grad_x += (2 * dx - 1) * weight_y * projected
                grad_y += (2 * dy - 1) * weight_x * projected
                contribution = (attention * weight_x * weight_y)[:, None] * grad_output
                tl.atomic_add(grad_value_ptr + offsets, contribution, mask=mask, sem="relaxed")
            sample = rows * samples + index
            _write_sample_gradient(grad_weights_ptr + sample, grad_attention, active, SUMMED)
            _write_sample_gradient(grad_locations_ptr + sample * 2, attention * width * grad_x, active, SUMMED)
            _write_sample_gradient(grad_locations_ptr + sample * 2 + 1, attention * height * grad_y, active, SUMMED)


INTERPRETED: bool = isinstance(_forward_kernel, InterpretedFunction)
"""Whether the kernels run in Triton's interpreter (the process started with TRITON_INTERPRET=1)."""

TUNED: bool = not INTERPRETED
"""Whether a launch without a configuration is tuned. The interpreter's timings would mean
nothing: it runs the configuration of the most queries a program, its fastest (it computes a
program's whole tile at once, with numpy)."""

# Tuned once per process and key: the head width, levels and points, the inputs' dtypes (the
# autotuner adds those) and the amount of work (``work``), so that the encoder's tens of thousands
# of queries and the decoder's few hundred get blocks of their own. The backward's tuning runs add
# into the gradient buffers, which are zeroed before each.
_tuned_forward = triton.autotune(
    TUNING_CONFIGS, key=["num_channels", "num_levels", "num_points", "work"], prune_configs_by={"early_config_prune": _prune},
)(_forward_kernel)
_tuned_backward = triton.autotune(
    TUNING_CONFIGS, key=["num_channels", "num_levels", "num_points", "work"], prune_configs_by={"early_config_prune": _prune},
    reset_to_zero=["grad_value_ptr", "grad_locations_ptr", "grad_weights_ptr"],
)(_backward_kernel)


def _launch(
    kernel: triton.runtime.Autotuner, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, *tensors: Tensor,
    config: triton.Config | None = None, **constants,
) -> None:
    """Run a kernel over blocks of queries of every (batch, head) and channel block, with the
    tuned configuration or ``config``. ``tensors``: sampling locations, attention weights, then the
    kernel's own."""
    if value.device.type == "cpu" and not INTERPRETED:
        raise RuntimeError(
            "the Triton kernels run on CUDA tensors, or on CPU tensors in a process started with TRITON_INTERPRET=1"
        )
    batch, positions, heads, channels = value.shape
    locations = tensors[0]
    _, queries, _, levels, points, _ = locations.shape
    if batch * queries * heads * channels == 0:
        return  # nothing to compute (and no channel block to split a head of no channels into)
    block_d = channel_block(channels, value.dtype)
    # Starts past 32 bits are clamped, not wrapped, so that they stay past value (see _fits).
    starts = level_start_index.clamp(-(2**31), 2**31 - 1).to(torch.int32).contiguous()
    arguments = (
        value, spatial_shapes.to(torch.int32).contiguous(), starts, *tensors,
        positions, queries, heads, channels, levels, points, (batch * queries * heads).bit_length(),
    )
    meta = dict(
        BLOCK_D=block_d,
        COMPUTE=tl.float64 if value.dtype == torch.float64 else tl.float32,
        INDEX=offset_dtype(value.shape, locations.shape),
        **constants,
    )

    def grid(meta: dict) -> tuple[int, int, int]:
        return triton.cdiv(queries, meta["BLOCK_Q"]), batch * heads, triton.cdiv(channels, block_d)

    if config is None and not TUNED:
        config = max(configs_for(channels, value.dtype), key=lambda config: config.kwargs["BLOCK_Q"])
    if config is None:
        kernel[grid](*arguments, **meta)
    else:
        kernel.fn[grid](*arguments, **meta, **config.all_kwargs())


def forward(value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor,
            attention_weights: Tensor, config: triton.Config | None = None) -> Tensor:
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    batch, _, heads, channels = value.shape
    output = value.new_empty((batch, sampling_locations.shape[1], heads * channels))
    _launch(
        _tuned_forward, value.contiguous(), spatial_shapes, level_start_index,
        sampling_locations.contiguous(), attention_weights.contiguous(), output, config=config,
    )
    return output


def backward(grad_output: Tensor, value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor,
             sampling_locations: Tensor, attention_weights: Tensor, config: triton.Config | None = None,
             ) -> tuple[Tensor, Tensor, Tensor]:
    check_shapes(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)
    check_output_gradient(grad_output, value, sampling_locations)
    # Gradients summed atomically are summed in float32 (float64 for float64 inputs): half-precision
    # atomics would round every one of the many additions into a pixel.
    accumulation = torch.float64 if value.dtype == torch.float64 else torch.float32
    summed = splits_channels(value.shape[-1], value.dtype)
    grad_value = torch.zeros(value.shape, dtype=accumulation, device=value.device)
    # Zeroed where programs add into them, and for heads of no channels, where no program runs.
    zeroed = summed or value.shape[-1] == 0
    grad_locations, grad_weights = (
        tensor.new_zeros(tensor.shape, dtype=accumulation) if zeroed else tensor.new_empty(tensor.shape)
        for tensor in (sampling_locations, attention_weights)
    )
    _launch(
        _tuned_backward, value.contiguous(), spatial_shapes, level_start_index,
        sampling_locations.contiguous(), attention_weights.contiguous(),
        grad_output.contiguous(), grad_value, grad_locations, grad_weights, config=config, SUMMED=summed,
    )
    return grad_value.to(value.dtype), grad_locations.to(sampling_locations.dtype), grad_weights.to(attention_weights.dtype)


@fused_op("deformable_detr::ms_deform_attn_triton")
def ms_deform_attn_triton(
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> Tensor:
    """The fused Triton forward; same signature and result as ``ms_deform_attn_reference``."""
    return forward(value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


@fused_op("deformable_detr::ms_deform_attn_triton_backward")
def ms_deform_attn_triton_backward(
    grad_output: Tensor,
    value: Tensor,
    spatial_shapes: Tensor,
    level_start_index: Tensor,
    sampling_locations: Tensor,
    attention_weights: Tensor,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients with respect to value, sampling_locations and attention_weights."""
    return backward(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


register_fused_op(ms_deform_attn_triton, ms_deform_attn_triton_backward)


@torch.inference_mode(False)
@torch.enable_grad()
def check(device: torch.device, dtype: torch.dtype) -> None:
    """Compile and run the forward and backward for values of ``dtype`` (beside the model's
    locations and weights, ``sample_dtype``) on ``device`` on a tiny input, at the launcher's
    default configuration, and compare them with the reference; raises where they do not compile,
    do not launch or disagree. Whatever the caller's grad mode or autocast."""
    generator = torch.Generator().manual_seed(0)
    spatial_shapes = torch.tensor([[5, 6], [3, 3]])
    level_start_index = torch.tensor([0, 30])
    value = torch.randn(1, 39, 2, 8, generator=generator)
    # Samples a quarter to three quarters of a pixel from the bilinear kinks, where the location
    # gradient is one-sided; in bfloat16 too. Pixels -1 to the size: some corners fall off the map.
    sizes = spatial_shapes.flip(-1)[:, None, :]  # (W, H)
    pixels = torch.floor(torch.rand(1, 7, 2, 2, 3, 2, generator=generator) * (sizes + 2)) - 1
    locations = (pixels + 0.75 + 0.5 * torch.rand(pixels.shape, generator=generator)) / sizes
    weights = torch.rand(1, 7, 2, 2, 3, generator=generator)
    samples = sample_dtype(dtype)
    inputs = [value.to(dtype), spatial_shapes, level_start_index, locations.to(samples), weights.to(samples)]
    config = configs_for(value.shape[-1], dtype)[0]
    with torch.autocast(device.type, enabled=False):
        on_device = [t.to(device) for t in inputs]
        output = forward(*on_device, config=config)
        results = (output, *backward(torch.ones_like(output), *on_device, config=config))
        # The reference in float64 on the CPU, on the same (rounded) inputs.
        exact = [t.double().requires_grad_() if t.is_floating_point() else t for t in inputs]
        expected = ms_deform_attn_reference(*exact)
        expected = (expected, *torch.autograd.grad(expected.sum(), [exact[0], exact[3], exact[4]]))
    tolerance = 8 * max(torch.finfo(dtype).eps, torch.finfo(torch.float32).eps)
    for name, got, want in zip(("output", "value gradient", "location gradient", "weight gradient"), results, expected):
        allowed = tolerance * max(want.abs().max().item(), 1.0)
        error = (got.cpu().double() - want.detach()).abs().max().item()
        if not error <= allowed:
            raise RuntimeError(f"the {name} differs from the reference's by {error:.3g} (allowed {allowed:.3g})")
