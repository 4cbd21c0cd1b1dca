"""Position embeddings of feature maps (sine or learned) and of boxes (two-stage queries)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def _sine_frequencies(num_features: int, temperature: float, device: torch.device) -> Tensor:
    index = torch.arange(num_features, dtype=torch.float32, device=device)
    return temperature ** (2 * torch.div(index, 2, rounding_mode="floor") / num_features)


def _interleave_sin_cos(angles: Tensor) -> Tensor:
    """(..., F) angles -> (..., F): sin on even channels, cos on odd channels."""
    return torch.stack((angles[..., 0::2].sin(), angles[..., 1::2].cos()), dim=-1).flatten(-2)


class PositionEmbeddingSine(nn.Module):
    """Sine embedding of normalised (y, x) positions inside the unpadded image: (N, 2F, H, W), y first."""

    def __init__(self, num_features: int = 128, temperature: float = 10000.0, scale: float = 2 * math.pi) -> None:
        super().__init__()
        self.num_features = num_features
        self.temperature = temperature
        self.scale = scale

    def forward(self, padding_mask: Tensor) -> Tensor:
        not_mask = (~padding_mask).to(torch.float32)
        y = not_mask.cumsum(1)
        x = not_mask.cumsum(2)
        eps = 1e-6
        y = (y - 0.5) / (y[:, -1:, :] + eps) * self.scale
        x = (x - 0.5) / (x[:, :, -1:] + eps) * self.scale
        frequencies = _sine_frequencies(self.num_features, self.temperature, padding_mask.device)
        pos_y = _interleave_sin_cos(y[..., None] / frequencies)
        pos_x = _interleave_sin_cos(x[..., None] / frequencies)
        return torch.cat((pos_y, pos_x), dim=-1).permute(0, 3, 1, 2)


class PositionEmbeddingLearned(nn.Module):
    """Learned absolute embedding of column and row index (maps up to 50 x 50): (N, 2F, H, W), x first."""

    def __init__(self, num_features: int = 128, max_size: int = 50) -> None:
        super().__init__()
        self.row_embed = nn.Embedding(max_size, num_features)
        self.col_embed = nn.Embedding(max_size, num_features)
        nn.init.uniform_(self.row_embed.weight)
        nn.init.uniform_(self.col_embed.weight)

    def forward(self, padding_mask: Tensor) -> Tensor:
        batch, height, width = padding_mask.shape
        max_height, max_width = self.row_embed.num_embeddings, self.col_embed.num_embeddings
        if height > max_height or width > max_width:
            raise ValueError(
                f"learned position embeddings cover feature maps up to {max_height} x {max_width}, got {height} x {width}: "
                "use smaller images or position_embedding='sine'"
            )
        device = padding_mask.device
        x_embedding = self.col_embed(torch.arange(width, device=device))
        y_embedding = self.row_embed(torch.arange(height, device=device))
        position = torch.cat(
            [x_embedding[None].expand(height, -1, -1), y_embedding[:, None].expand(-1, width, -1)], dim=-1
        )
        return position.permute(2, 0, 1)[None].expand(batch, -1, -1, -1)


def build_position_embedding(kind: str, d_model: int) -> nn.Module:
    if kind == "sine":
        return PositionEmbeddingSine(d_model // 2)
    if kind == "learned":
        return PositionEmbeddingLearned(d_model // 2)
    raise ValueError(f"unknown position embedding {kind!r}: expected 'sine' or 'learned'")


def box_sine_embedding(boxes: Tensor, num_features: int, temperature: float = 10000.0) -> Tensor:
    """Sine embedding of normalised boxes (..., 4) -> (..., 4 * num_features), coordinates in order."""
    frequencies = _sine_frequencies(num_features, temperature, boxes.device)
    angles = boxes[..., None] * (2 * math.pi) / frequencies
    return _interleave_sin_cos(angles).flatten(-2)
