"""The deformable transformer: encoder over all feature levels, decoder over object queries."""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import MSDeformAttn
from .inference import eager_inference
from .position import box_sine_embedding


def inverse_sigmoid(x: Tensor, eps: float = 1e-5) -> Tensor:
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def box_linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` for a layer whose outputs are box coordinates: computed in at least float32 under
    autocast, whose bfloat16 would round them to 8 significant bits, 1/512 of the image for a box
    edge past its middle (docs/performance.md#bfloat16-inference). Without autocast, ``layer(x)``."""
    device_type = x.device.type
    if not (torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)):
        return layer(x)
    dtype = torch.promote_types(layer.weight.dtype, torch.float32)
    with torch.autocast(device_type, enabled=False):
        return F.linear(x.to(dtype), layer.weight.to(dtype), layer.bias.to(dtype))


def refine_boxes(delta: Tensor, reference: Tensor) -> Tensor:
    """Boxes (cx, cy, w, h) in [0, 1]: a box head's ``delta`` applied to ``reference`` in logit space.

    A 4-d reference is a box, refined as a whole; a 2-d reference is a point, and the head predicts
    the size outright."""
    if reference.shape[-1] == 4:
        return (delta + inverse_sigmoid(reference)).sigmoid()
    return torch.cat([delta[..., :2] + inverse_sigmoid(reference), delta[..., 2:]], -1).sigmoid()


def clones(module: nn.Module, count: int) -> nn.ModuleList:
    """``count`` independent deep copies of ``module``."""
    return nn.ModuleList(copy.deepcopy(module) for _ in range(count))


# Rows of a feed-forward block computed at a time in inference on the CPU: at 4096 rows the
# published layer's hidden activations take 16 MB, which stay in cache between its two linear layers.
FEED_FORWARD_ROWS = 4096


def _add_feed_forward(
    x: Tensor, linear1: nn.Linear, dropout: nn.Dropout, linear2: nn.Linear, output_dropout: nn.Dropout
) -> Tensor:
    """``x + output_dropout(linear2(dropout(relu(linear1(x)))))``.

    The ReLU (on a layer's largest tensor) and the sum act in place on the linear layers' outputs,
    computed on rows of ``x`` so that they are tensors of their own: a linear layer's (N, L, C) output
    is a view, and autograd undoes an in-place update of a view by copying the whole tensor, twice,
    in the backward.

    In inference on the CPU the encoder's rows (17,821 an image at COCO size) go through in blocks,
    with the same result to the bit: a block's hidden activations stay in cache from one linear layer
    to the next, and are allocated from memory the process already holds, where the whole layer's
    (73 MB an image) come from the system, page by page, on every call.
    """
    rows = x.reshape(-1, x.shape[-1])

    def add_feed_forward(block: Tensor) -> Tensor:
        hidden = dropout(F.relu(linear1(block), inplace=True))
        return output_dropout(linear2(hidden)).add_(block)

    # eager_inference first: under torch.export len() of a dynamic size would fix it to the traced one.
    if not (eager_inference() and x.device.type == "cpu" and len(rows) > FEED_FORWARD_ROWS):
        return add_feed_forward(rows).view(x.shape)
    return torch.cat([add_feed_forward(block) for block in rows.split(FEED_FORWARD_ROWS)]).view(x.shape)


def _with_position(tensor: Tensor, position: Tensor | None) -> Tensor:
    return tensor if position is None else tensor + position


class DeformableTransformerEncoderLayer(nn.Module):
    """Post-norm: deformable self-attention over all levels, then a ReLU feed-forward block."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: Tensor,
        position: Tensor,
        reference_points: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        padding_mask: Tensor | None,
    ) -> Tensor:
        attended = self.self_attn(
            _with_position(src, position), reference_points, src, spatial_shapes, level_start_index, padding_mask
        )
        src = self.norm1(src + self.dropout1(attended))
        return self.norm2(_add_feed_forward(src, self.linear1, self.dropout2, self.linear2, self.dropout3))


class DeformableTransformerDecoderLayer(nn.Module):
    """Post-norm: query self-attention, deformable cross-attention into the memory, feed-forward."""

    def __init__(self, d_model: int, dim_feedforward: int, dropout: float, num_levels: int, num_heads: int, num_points: int) -> None:
        super().__init__()
        # Registration order fixes the state-dict order of the reference checkpoints.
        self.cross_attn = MSDeformAttn(d_model, num_levels, num_heads, num_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)
        self.self_attn = nn.MultiheadAttention(d_model, num_heads, dropout=dropout, batch_first=True)
        self.dropout2 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout3 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.dropout4 = nn.Dropout(dropout)
        self.norm3 = nn.LayerNorm(d_model)

    def forward(
        self,
        tgt: Tensor,
        query_position: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        memory_padding_mask: Tensor | None,
        self_attention_mask: Tensor | None = None,
    ) -> Tensor:
        query = key = _with_position(tgt, query_position)
        attended = self.self_attn(query, key, tgt, attn_mask=self_attention_mask, need_weights=False)[0]
        tgt = self.norm2(tgt + self.dropout2(attended))
        attended = self.cross_attn(
            _with_position(tgt, query_position), reference_points, memory, spatial_shapes, level_start_index, memory_padding_mask
        )
        tgt = self.norm1(tgt + self.dropout1(attended))
        return self.norm3(_add_feed_forward(tgt, self.linear1, self.dropout3, self.linear2, self.dropout4))


class DeformableTransformerEncoder(nn.Module):
    def __init__(self, layer: DeformableTransformerEncoderLayer, num_layers: int) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)

    @staticmethod
    def reference_points(spatial_shapes: list[tuple[int, int]], valid_ratios: Tensor) -> Tensor:
        """Pixel centres of every level, normalised to the valid area, seen from every level: (N, S, L, 2),
        in the dtype of ``valid_ratios``."""
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes):
            centres = _pixel_centres(height, width, valid_ratios.dtype, valid_ratios.device)
            valid_size = torch.stack((valid_ratios[:, level, 0] * width, valid_ratios[:, level, 1] * height), -1)
            per_level.append(centres[None] / valid_size[:, None])
        return torch.cat(per_level, 1)[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        position: Tensor,
        padding_mask: Tensor | None,
        *,
        shapes: list[tuple[int, int]],
    ) -> Tensor:
        """``shapes`` are the (H, W) of ``spatial_shapes`` as Python ints: reading them off the tensor
        would make a GPU wait for it."""
        reference_points = self.reference_points(shapes, valid_ratios)
        output = src
        for layer in self.layers:
            output = layer(output, position, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class DeformableTransformerDecoder(nn.Module):
    """Returns every layer's output and reference points.

    With iterative box refinement, ``bbox_embed`` (set by the detector, shared with its heads)
    refines the reference boxes after every layer; two-stage also sets ``class_embed``. The next
    layer always starts from the detached refined box. With ``look_forward_twice`` (DINO) the
    references returned keep their gradient, so that the detector's box prediction of layer i, made
    relative to them, also trains layer i-1's box; the values are the same either way.
    """

    def __init__(self, layer: DeformableTransformerDecoderLayer, num_layers: int, *, look_forward_twice: bool = False) -> None:
        super().__init__()
        self.layers = clones(layer, num_layers)
        self.num_layers = num_layers
        self.look_forward_twice = look_forward_twice
        self.bbox_embed: nn.ModuleList | None = None
        self.class_embed: nn.ModuleList | None = None

    def forward(
        self,
        tgt: Tensor,
        reference_points: Tensor,
        memory: Tensor,
        spatial_shapes: Tensor,
        level_start_index: Tensor,
        valid_ratios: Tensor,
        query_position: Tensor,
        memory_padding_mask: Tensor | None,
        self_attention_mask: Tensor | None = None,
    ) -> tuple[Tensor, Tensor]:
        output = tgt
        outputs, references = [], []
        for index, layer in enumerate(self.layers):
            if reference_points.shape[-1] == 4:
                reference_input = reference_points[:, :, None] * torch.cat([valid_ratios, valid_ratios], -1)[:, None]
            else:
                reference_input = reference_points[:, :, None] * valid_ratios[:, None]
            output = layer(
                output, query_position, reference_input, memory, spatial_shapes, level_start_index, memory_padding_mask,
                self_attention_mask,
            )
            refined = reference_points
            if self.bbox_embed is not None:
                refined = refine_boxes(self.bbox_embed[index](output), reference_points)
                reference_points = refined.detach()
            outputs.append(output)
            references.append(refined if self.look_forward_twice else reference_points)
        return torch.stack(outputs), torch.stack(references)


def _pixel_centres(height: int, width: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(H * W, 2) centres (x + 0.5, y + 0.5) of a map's pixels, row after row."""
    y, x = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device) + 0.5,
        torch.arange(width, dtype=dtype, device=device) + 0.5,
        indexing="ij",
    )
    return torch.stack((x, y), -1).view(-1, 2)


def _valid_sizes(padding_mask: Tensor) -> Tensor:
    """(N, H, W) mask -> (N, 2) integer unpadded (width, height), counted on the first row/column."""
    return torch.stack([(~padding_mask[:, 0, :]).sum(1), (~padding_mask[:, :, 0]).sum(1)], -1)


class DenoisingQueries(NamedTuple):
    """Denoising queries (DN-DETR): ``groups`` equal groups of noised ground-truth boxes, one after another."""

    boxes: Tensor  # (N, D, 4) normalised (cx, cy, w, h), the queries' reference boxes
    content: Tensor  # (N, D, C) the queries' content: the embedding of each box's noised class
    groups: int


class QueryGroups(NamedTuple):
    """How many of the decoded queries each group has; the groups follow one another in this order."""

    one_to_one: int
    one_to_many: int
    denoising: int


def group_attention_mask(group_sizes: list[int], device: torch.device | None = None) -> Tensor:
    """(Q, Q) self-attention mask for consecutive query groups: True (blocked) between queries of
    different groups, so that each group attends to its own queries only."""
    # Filled group by group on the device: repeat_interleave of a tensor of sizes would wait for the
    # GPU to learn its output's length.
    groups = torch.cat([torch.full((size,), group, device=device) for group, size in enumerate(group_sizes)])
    return groups[:, None] != groups[None, :]


def _without_content_gain(gradient: Tensor) -> Tensor:
    """The gradient of ``pos_trans_norm.weight`` with its content half zeroed (mixed query selection)."""
    gradient = gradient.clone()
    gradient[gradient.shape[0] // 2 :] = 0
    return gradient


def _spatial_shapes(shapes: list[tuple[int, int]], device: torch.device) -> Tensor:
    """(L, 2) integer (H, W) of each level."""
    # Built from scalars: torch.as_tensor would freeze symbolic sizes to the example input's under
    # torch.export, and an exported model (export.py) would then take one image size only.
    sizes = [torch.scalar_tensor(size, dtype=torch.long, device=device) for shape in shapes for size in shape]
    return torch.stack(sizes).view(-1, 2)


class DeformableTransformer(nn.Module):
    """Flattens the levels, encodes them, picks queries (learned or two-stage) and decodes them."""

    def __init__(
        self,
        *,
        d_model: int = 256,
        num_heads: int = 8,
        encoder_layers: int = 6,
        decoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        num_feature_levels: int = 4,
        encoder_points: int = 4,
        decoder_points: int = 4,
        two_stage: bool = False,
        num_queries: int = 300,
        mixed_query_selection: bool = False,
        look_forward_twice: bool = False,
    ) -> None:
        super().__init__()
        self.d_model = d_model
        self.two_stage = two_stage
        self.num_queries = num_queries  # the one-to-one queries: proposals selected in two-stage mode
        self.mixed_query_selection = mixed_query_selection
        encoder_layer = DeformableTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, num_heads, encoder_points
        )
        self.encoder = DeformableTransformerEncoder(encoder_layer, encoder_layers)
        decoder_layer = DeformableTransformerDecoderLayer(
            d_model, dim_feedforward, dropout, num_feature_levels, num_heads, decoder_points
        )
        self.decoder = DeformableTransformerDecoder(decoder_layer, decoder_layers, look_forward_twice=look_forward_twice)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        if two_stage:
            self.enc_output = nn.Linear(d_model, d_model)
            self.enc_output_norm = nn.LayerNorm(d_model)
            self.pos_trans = nn.Linear(d_model * 2, d_model * 2)
            self.pos_trans_norm = nn.LayerNorm(d_model * 2)
            if mixed_query_selection:
                # Mixed query selection within the published architecture: with a zero gain on its
                # content half, pos_trans_norm gives every query its bias there, one learned content
                # vector whatever the proposal. The gain gets no gradient, so it stays zero.
                self.pos_trans_norm.weight.register_hook(_without_content_gain)
        else:
            self.reference_points = nn.Linear(d_model, 2)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for parameter in self.parameters():
            if parameter.dim() > 1:
                nn.init.xavier_uniform_(parameter)
        for module in self.modules():
            if isinstance(module, MSDeformAttn):
                module.reset_parameters()
        if not self.two_stage:
            nn.init.zeros_(self.reference_points.bias)
        if self.mixed_query_selection:
            with torch.no_grad():
                self.pos_trans_norm.bias[self.d_model :].normal_()  # as DINO's learned content embedding
            self.clear_content_gain()
        nn.init.normal_(self.level_embed)

    @torch.no_grad()
    def clear_content_gain(self) -> None:
        """Zero the content half of ``pos_trans_norm``'s gain, which mixed query selection holds at
        zero (its gradient is zeroed): after loading weights trained without it, whose gain is not."""
        self.pos_trans_norm.weight[self.d_model :].zero_()

    def encoder_proposals(
        self, memory: Tensor, padding_mask: Tensor, spatial_shapes: list[tuple[int, int]], valid_sizes: Tensor
    ) -> tuple[Tensor, Tensor]:
        """One box proposal per memory position (inverse-sigmoid cxcywh, +inf where invalid) and the
        projected memory (zero where invalid). ``valid_sizes``: (N, L, 2) unpadded (width, height)."""
        proposals = []
        for level, (height, width) in enumerate(spatial_shapes):
            centres = _pixel_centres(height, width, torch.float32, memory.device)[None] / valid_sizes[:, level, None]
            sizes = torch.full_like(centres, 0.05 * 2.0**level)
            proposals.append(torch.cat((centres, sizes), -1))
        proposals = torch.cat(proposals, 1)
        valid = ((proposals > 0.01) & (proposals < 0.99)).all(-1, keepdim=True)
        proposals = torch.log(proposals / (1 - proposals))
        invalid = padding_mask[..., None] | ~valid
        proposals = proposals.masked_fill(invalid, float("inf")).to(memory.dtype)
        memory = memory.masked_fill(invalid, 0.0)
        return self.enc_output_norm(self.enc_output(memory)), proposals

    def forward(
        self,
        sources: list[Tensor],
        masks: list[Tensor],
        positions: list[Tensor],
        query_embed: Tensor | None = None,
        *,
        one_to_many_queries: int = 0,
        denoising: DenoisingQueries | None = None,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, QueryGroups]:
        """
        Args:
            sources, positions: per level (N, C, H, W); masks: per level (N, H, W), True = padding.
            query_embed: (Q, 2C) learned queries (position, content), ``num_queries`` of them plus
                ``one_to_many_queries``; None in two-stage mode.
            one_to_many_queries: the size of a second query group (hybrid matching, in training),
                decoded beside the first without attention between them. Two-stage takes its
                queries from the proposals ranked after the first group's (as many as there are);
                otherwise they are the last rows of ``query_embed``.
            denoising: groups of queries made from noised ground truth (denoising, in training,
                two-stage), decoded after the others, each group without attention to any other.

        Returns:
            hs (layers, N, Q, C), initial reference (N, Q, 2 or 4), per-layer references
            (layers, N, Q, 2 or 4), in two-stage mode the encoder class logits (N, S, classes)
            and unactivated box coordinates (N, S, 4), and the sizes of the query groups in Q
            (two-stage fills the one-to-one group first where there are fewer proposals than queries).
        """
        shapes = [tuple(source.shape[-2:]) for source in sources]
        src = torch.cat([source.flatten(2).transpose(1, 2) for source in sources], 1)
        mask = torch.cat([m.flatten(1) for m in masks], 1)
        # In the precision of the parameters, not of autocast's features: float32 under autocast, where
        # rounding them to bfloat16 before adding the float32 level embedding would only lose bits.
        position = torch.cat(
            [
                pos.to(self.level_embed.dtype).flatten(2).transpose(1, 2) + self.level_embed[level].view(1, 1, -1)
                for level, pos in enumerate(positions)
            ],
            1,
        )
        spatial_shapes = _spatial_shapes(shapes, src.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_sizes = torch.stack([_valid_sizes(m) for m in masks], 1)
        # At least float32, as the sampling locations made from them (attention.py): in bfloat16, src's
        # dtype under CPU autocast, the encoder's reference points would move by most of a pixel.
        valid_ratios = valid_sizes.to(torch.promote_types(src.dtype, torch.float32)) / spatial_shapes.flip(-1)
        # Every attention layer zeroes the values at padded positions. Where nothing is padded (one
        # image, or images of one size) CPU inference skips those passes; asking costs a GPU a sync.
        skip_padding = mask.device.type == "cpu" and eager_inference() and not mask.any()
        attention_mask = None if skip_padding else mask

        memory = self.encoder(src, spatial_shapes, level_start_index, valid_ratios, position, attention_mask, shapes=shapes)

        batch, _, channels = memory.shape
        encoder_logits = encoder_coords = None
        if self.two_stage:
            output_memory, proposals = self.encoder_proposals(memory, mask, shapes, valid_sizes)
            encoder_logits = self.decoder.class_embed[self.decoder.num_layers](output_memory)
            encoder_coords = self.decoder.bbox_embed[self.decoder.num_layers](output_memory) + proposals
            # As many as there are: a small image has fewer positions than queries.
            num_proposals = min(self.num_queries + one_to_many_queries, encoder_logits.shape[1])
            top = torch.topk(encoder_logits[..., 0], num_proposals, dim=1).indices
            top_coords = torch.gather(encoder_coords, 1, top[..., None].expand(-1, -1, 4)).detach()
            reference_points = top_coords.sigmoid()
            if denoising is not None:
                reference_points = torch.cat([reference_points, denoising.boxes.to(reference_points.dtype)], 1)
            query_embedding = self.pos_trans_norm(
                self.pos_trans(box_sine_embedding(reference_points, channels // 2))
            )
            query_position, tgt = torch.split(query_embedding, channels, dim=2)
            if denoising is not None:
                # A denoising query's content is its (noised) class, as DN-DETR's label embedding.
                tgt = torch.cat([tgt[:, :num_proposals], denoising.content.to(tgt.dtype)], 1)
        else:
            query_position, tgt = torch.split(query_embed, channels, dim=1)
            query_position = query_position[None].expand(batch, -1, -1)
            tgt = tgt[None].expand(batch, -1, -1)
            reference_points = box_linear(self.reference_points, query_position).sigmoid()

        denoised = denoising.boxes.shape[1] if denoising is not None else 0
        matched = tgt.shape[1] - denoised
        one_to_one = min(self.num_queries, matched)
        query_groups = QueryGroups(one_to_one, matched - one_to_one, denoised)
        group_sizes = [one_to_one, matched - one_to_one] if one_to_many_queries else [matched]
        if denoising is not None:
            group_sizes += [denoised // denoising.groups] * denoising.groups
        self_attention_mask = group_attention_mask(group_sizes, tgt.device) if len(group_sizes) > 1 else None
        hs, references = self.decoder(
            tgt, reference_points, memory, spatial_shapes, level_start_index, valid_ratios, query_position, attention_mask,
            self_attention_mask,
        )
        return hs, reference_points, references, encoder_logits, encoder_coords, query_groups
