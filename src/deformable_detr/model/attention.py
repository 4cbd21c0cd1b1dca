"""The multi-scale deformable attention module (MSDeformAttn)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..ops import ms_deform_attn


@dataclass
class AttentionRecord:
    """What one MSDeformAttn call computed, as :func:`capture_attention` stores it (detached)."""

    name: str  # the module's name in the model, e.g. "transformer.decoder.layers.5.cross_attn"
    sampling_locations: Tensor  # (N, Lq, M, L, P, 2) normalised (x, y) in the padded input
    attention_weights: Tensor  # (N, Lq, M, L, P), summing to 1 over levels and points per head
    reference_points: Tensor  # (N, Lq, L, 2) points or (N, Lq, L, 4) boxes, as the module got them
    spatial_shapes: Tensor  # (L, 2) (H, W) per level


class MSDeformAttn(nn.Module):
    """Each query attends to ``num_points`` learned locations around its reference point on every level.

    Args:
        d_model: channels of queries and values.
        num_levels: feature levels L.
        num_heads: attention heads M (d_model / M channels each).
        num_points: sampling points P per head and level.
    """

    def __init__(self, d_model: int = 256, num_levels: int = 4, num_heads: int = 8, num_points: int = 4) -> None:
        super().__init__()
        if d_model % num_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_heads ({num_heads})")
        self.d_model = d_model
        self.num_levels = num_levels
        self.num_heads = num_heads
        self.num_points = num_points
        self.sampling_offsets = nn.Linear(d_model, num_heads * num_levels * num_points * 2)
        self.attention_weights = nn.Linear(d_model, num_heads * num_levels * num_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        # Set only inside capture_attention: the normal forward pays one `is None` check.
        self._capture: Callable[..., None] | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Head m starts looking along direction 2*pi*m/M, scaled to the unit square's border
        # ((1,0), (1,1), (0,1), ...); point i sits i+1 pixels out.
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.num_heads, dtype=torch.float32) * (2.0 * math.pi / self.num_heads)
        directions = torch.stack([thetas.cos(), thetas.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        grid = directions.view(self.num_heads, 1, 1, 2).repeat(1, self.num_levels, self.num_points, 1)
        grid *= torch.arange(1, self.num_points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(grid.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self,
        query: Tensor,
        reference_points: Tensor,
        value: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None = None,
    ) -> Tensor:
        """
        Args:
            query: (N, Lq, C).
            reference_points: (N, Lq, L, 2) normalised (x, y), or (N, Lq, L, 4) boxes (cx, cy, w, h)
                whose size scales the offsets.
            value: (N, S, C), all levels flattened.
            spatial_shapes: (L, 2) integer (H, W) per level.
            level_start_index: (L,).
            padding_mask: (N, S) bool, True where ``value`` is padding.

        Returns:
            (N, Lq, C).
        """
        batch, num_queries, _ = query.shape
        heads, levels, points = self.num_heads, self.num_levels, self.num_points
        # In-place updates below act on fresh outputs of linear layers, whose backward does not
        # need them: at COCO size each spares a pass over, and an allocation of, a large tensor.
        # The layers run on rows (N * S, C): their output is then no view, whose in-place update
        # autograd would undo by copying the whole tensor twice in the backward.
        value = self.value_proj(value.reshape(-1, value.shape[-1]))
        if padding_mask is not None:
            value.masked_fill_(padding_mask.reshape(-1, 1), 0.0)
        value = value.view(batch, -1, heads, self.d_model // heads)

        weights = self.attention_weights(query).view(batch, num_queries, heads, levels * points)
        weights = F.softmax(weights, -1).view(batch, num_queries, heads, levels, points)

        # The sampling locations are at least float32 in every precision: in bfloat16's 8
        # significant bits a location near the far side of a map moves in steps of 1/256 of it (half
        # a pixel of COCO's largest level), which costs AP (docs/performance.md#bfloat16-inference).
        # The op reads them so beside values and weights in the low precision.
        location_shape = (batch, num_queries, heads, levels, points, 2)
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divided by (W, H), which is folded into the
            # layer's (small) weights rather than applied to its (large) output.
            normaliser = spatial_shapes.flip(-1).to(query.dtype)[None, :, None, :].expand(heads, -1, points, -1).reshape(-1)
            offsets = _at_least_float32(F.linear(query.reshape(-1, query.shape[-1]),
                                                 self.sampling_offsets.weight / normaliser[:, None],
                                                 self.sampling_offsets.bias / normaliser))
            # Every head's and point's offset starts from the query's reference point on its level.
            # Broadcast, that addition is a slow loop over rows two wide on the CPU (a third of the
            # module's forward); as a product with the 0/1 matrix that places each (level, x | y)
            # coordinate, it is one matrix multiply-add into the offsets.
            placement = torch.eye(levels * 2, dtype=offsets.dtype, device=offsets.device).view(1, levels, 1, 2, -1)
            placement = placement.expand(heads, -1, points, -1, -1).reshape(-1, levels * 2)
            reference_xy = reference_points.reshape(-1, levels * 2).to(offsets.dtype)
            locations = offsets.addmm_(reference_xy, placement.T).view(location_shape)
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box: P points span half its width and height.
            centre, size = reference_points[:, :, None, :, None, :2], reference_points[:, :, None, :, None, 2:]
            # Out of place: the offsets are a view, and these tensors are small (decoder queries).
            locations = _at_least_float32(self.sampling_offsets(query).view(location_shape)) * (size * (0.5 / points)) + centre
        else:
            raise ValueError(f"reference_points must end in 2 or 4 coordinates, got {reference_points.shape[-1]}")

        if self._capture is not None:
            self._capture(locations, weights, reference_points, spatial_shapes)
        output = ms_deform_attn(value, spatial_shapes, level_start_index, locations, weights)
        return self.output_proj(output)


def _at_least_float32(tensor: Tensor) -> Tensor:
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


@contextmanager
def capture_attention(model: nn.Module) -> Iterator[list[AttentionRecord]]:
    """Record every MSDeformAttn call of ``model`` made inside the block, in call order.

    Example::

        with capture_attention(model) as records:
            model(images)
        decoder = [r for r in records if r.name.startswith("transformer.decoder.")]

    Raises:
        TypeError: ``model`` is not a module (a Detector's is its ``.model``).
        ValueError: ``model`` holds no MSDeformAttn, so nothing would be recorded.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model is a {type(model).__name__}; expected the model, an nn.Module (a Detector's is its .model)")
    records: list[AttentionRecord] = []
    modules = [(name, module) for name, module in model.named_modules() if isinstance(module, MSDeformAttn)]
    if not modules:
        raise ValueError(f"model is a {type(model).__name__} without MSDeformAttn modules: there is no attention to record")
    for name, module in modules:
        module._capture = partial(_record, records, name)
    try:
        yield records
    finally:
        for _, module in modules:
            module._capture = None


def _record(
    records: list[AttentionRecord],
    name: str,
    locations: Tensor,
    weights: Tensor,
    reference_points: Tensor,
    spatial_shapes: Tensor,
) -> None:
    records.append(
        AttentionRecord(name, locations.detach(), weights.detach(), reference_points.detach(), spatial_shapes)
    )
