"""How the arguments of ``ms_deform_attn`` must be laid out, checked from their shapes and dtypes
alone: no device sync, and it holds under tracing. ``ms_deform_attn`` checks every call, and the
Triton launcher checks again, for calls of its operator that come past ``ms_deform_attn``."""

from __future__ import annotations

import torch
from torch import Tensor

# Each argument's dimensions, as the errors name them: a letter is a size the arguments share.
_LAYOUTS: dict[str, tuple[str, ...]] = {
    "value": ("N", "S", "M", "D"),
    "spatial_shapes": ("L", "2"),
    "level_start_index": ("L",),
    "sampling_locations": ("N", "Lq", "M", "L", "P", "2"),
    "attention_weights": ("N", "Lq", "M", "L", "P"),
}
# The argument each shared size is read from; the others must agree with it.
_SIZE_SOURCES = {"N": "value", "M": "value", "Lq": "sampling_locations", "L": "sampling_locations", "P": "sampling_locations"}
_SIZE_NAMES = {"N": "images", "M": "heads", "Lq": "queries", "L": "levels", "P": "points"}


def check_shapes(
    value: Tensor, spatial_shapes: Tensor, level_start_index: Tensor, sampling_locations: Tensor, attention_weights: Tensor
) -> None:
    """Raise ValueError where an argument of :func:`ms_deform_attn` is not laid out as ``_LAYOUTS``
    says, with value's numbers of images and heads and sampling_locations' of queries, levels and
    points, or where spatial_shapes or level_start_index does not hold integers.

    Reads shapes and dtypes only: no device sync, and it holds under tracing.
    """
    for name, tensor in (("value", value), ("sampling_locations", sampling_locations)):
        if tensor.dim() != len(_LAYOUTS[name]):
            raise _layout_error(name, tensor.shape)
    batch, _, heads, _ = value.shape
    _, queries, _, levels, points, _ = sampling_locations.shape
    expected_shapes = {
        "spatial_shapes": (spatial_shapes, (levels, 2)),
        "level_start_index": (level_start_index, (levels,)),
        "sampling_locations": (sampling_locations, (batch, queries, heads, levels, points, 2)),
        "attention_weights": (attention_weights, (batch, queries, heads, levels, points)),
    }
    for name, (tensor, expected) in expected_shapes.items():
        if tensor.shape != expected:
            raise _shape_error(name, tensor.shape, expected)
    for name, tensor in (("spatial_shapes", spatial_shapes), ("level_start_index", level_start_index)):
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            raise ValueError(f"ms_deform_attn: {name} must hold integers, got {tensor.dtype}")


def _layout_error(name: str, shape: torch.Size) -> ValueError:
    return ValueError(f"ms_deform_attn: {name} must be ({', '.join(_LAYOUTS[name])}), got shape {tuple(shape)}")


def _shape_error(name: str, shape: torch.Size, expected: tuple[int, ...]) -> ValueError:
    """The error naming the first size of ``name`` that differs from the argument it is read from."""
    if len(shape) == len(expected):
        for letter, size, wanted in zip(_LAYOUTS[name], shape, expected):
            if size != wanted and letter in _SIZE_SOURCES:
                return ValueError(
                    f"ms_deform_attn: {name} has {letter} = {size} but {_SIZE_SOURCES[letter]} has {letter} = {wanted} "
                    f"(the number of {_SIZE_NAMES[letter]})"
                )
    return _layout_error(name, shape)


def check_output_gradient(grad_output: Tensor, value: Tensor, sampling_locations: Tensor) -> None:
    """Raise ValueError unless ``grad_output`` has the output's shape, (N, Lq, M * D)."""
    batch, _, heads, channels = value.shape
    expected = (batch, sampling_locations.shape[1], heads * channels)
    if grad_output.shape != expected:
        raise ValueError(
            f"ms_deform_attn: grad_output must be the output's (N, Lq, M * D) = {expected}, got {tuple(grad_output.shape)}"
        )
