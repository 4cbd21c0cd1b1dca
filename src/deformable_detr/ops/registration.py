"""What the fused kernels share as custom operators: a record of each call in torch's profiler,
shape-only (fake) implementations, for ``torch.compile`` and meta tensors, and autograd through
their backward operator."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor
from torch.library import CustomOpDef


def fused_op(name: str, *, device_types: str | None = None) -> Callable[[Callable], CustomOpDef]:
    """``torch.library.custom_op(name)`` for a kernel that mutates none of its inputs, with each
    call recorded under ``name`` in torch's profiler, which does not record operators defined in
    Python (torch 2.14): without it a profile of the model leaves the attention's time out."""

    def decorate(kernel: Callable) -> CustomOpDef:
        @functools.wraps(kernel)
        def recorded(*args, **kwargs):
            with torch.profiler.record_function(name):
                return kernel(*args, **kwargs)

        return torch.library.custom_op(name, mutates_args=(), device_types=device_types)(recorded)

    return decorate


def register_fused_op(forward: CustomOpDef, backward: CustomOpDef) -> None:
    """Give the fused op ``forward`` (``ms_deform_attn``'s signature) and ``backward`` (gradients
    with respect to value, sampling locations and attention weights) fake implementations, and make
    ``backward`` the gradient of ``forward``."""

    @forward.register_fake
    def _(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        batch, _, heads, channels = value.shape
        return value.new_empty((batch, sampling_locations.shape[1], heads * channels))

    @backward.register_fake
    def _(grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        return (
            value.new_empty(value.shape),
            sampling_locations.new_empty(sampling_locations.shape),
            attention_weights.new_empty(attention_weights.shape),
        )

    def setup_context(ctx, inputs, output) -> None:
        ctx.save_for_backward(*inputs)

    def gradients(ctx, grad_output: Tensor):
        value, spatial_shapes, level_start_index, sampling_locations, attention_weights = ctx.saved_tensors
        grad_value, grad_locations, grad_weights = backward(
            grad_output, value, spatial_shapes, level_start_index, sampling_locations, attention_weights
        )
        return grad_value, None, None, grad_locations, grad_weights

    forward.register_autograd(gradients, setup_context=setup_context)
