"""Turn raw model outputs into scored, labelled boxes in image pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torchvision.ops import box_convert

from ..checks import check_count


@torch.no_grad()
def postprocess(
    outputs: dict[str, Any], image_sizes: Tensor | Sequence[tuple[int, int]], *, top_k: int = 100
) -> list[dict[str, Tensor]]:
    """The ``top_k`` highest (query, class) scores of each image.

    Args:
        outputs: the model's output dict (``pred_logits``, ``pred_boxes``).
        image_sizes: (N, 2) original (height, width) of each image, one per image of the batch.
        top_k: detections kept per image (at most queries x classes).

    Returns:
        Per image ``scores`` (K,), ``labels`` (K,), ``boxes`` (K, 4) absolute (x1, y1, x2, y2), in
        float32 at least, and ``queries`` (K,): the query each detection comes from.
    """
    check_count("top_k", top_k, at_least=0)
    logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
    # Scaled in float32 at least: in bfloat16 (8 significant bits) 1333 pixels are 1336, 1066 are 1064.
    boxes = boxes.to(torch.promote_types(boxes.dtype, torch.float32))
    batch, _, num_classes = logits.shape
    sizes = torch.as_tensor(image_sizes, dtype=boxes.dtype, device=boxes.device)
    if sizes.shape != (batch, 2):
        raise ValueError(f"image_sizes is of shape {tuple(sizes.shape)}; expected ({batch}, 2): "
                         f"the (height, width) of each of the batch's {batch} images")
    scores, flat_indices = logits.sigmoid().flatten(1).topk(min(top_k, logits.shape[1] * num_classes), dim=1)
    queries = torch.div(flat_indices, num_classes, rounding_mode="floor")
    labels = flat_indices % num_classes
    boxes = torch.gather(box_convert(boxes, "cxcywh", "xyxy"), 1, queries[..., None].expand(-1, -1, 4))
    height, width = sizes.unbind(1)
    boxes = boxes * torch.stack([width, height, width, height], 1)[:, None]
    return [
        {"scores": image_scores, "labels": image_labels, "boxes": image_boxes, "queries": image_queries}
        for image_scores, image_labels, image_boxes, image_queries in zip(scores, labels, boxes, queries)
    ]
