"""Hungarian matching of predicted queries to ground-truth boxes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou


class HungarianMatcher(nn.Module):
    """One-to-one assignment of queries to targets with the lowest total cost, per image.

    The cost of a (query, target) pair is ``class_weight`` x focal class cost + ``bbox_weight`` x
    L1 distance of the (cx, cy, w, h) boxes - ``giou_weight`` x GIoU.
    """

    def __init__(
        self,
        *,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.class_weight = class_weight
        self.bbox_weight = bbox_weight
        self.giou_weight = giou_weight
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    @torch.no_grad()
    def cost_matrix(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> Tensor:
        """(N, Q, T) cost of every query of every image against all T targets of the batch."""
        batch, num_queries, _ = outputs["pred_logits"].shape
        # Float32 whatever the autocast dtype: half-precision logs and GIoU are too coarse to rank.
        prob = outputs["pred_logits"].flatten(0, 1).float().sigmoid()
        boxes = outputs["pred_boxes"].flatten(0, 1).float()
        target_labels = torch.cat([t["labels"] for t in targets])
        target_boxes = torch.cat([t["boxes"] for t in targets]).to(boxes)

        # Focal loss of the target's class score as a positive minus as a negative: low where it is already high.
        alpha, gamma = self.focal_alpha, self.focal_gamma
        prob = prob[:, target_labels]
        positive = alpha * (1 - prob) ** gamma * -(prob + 1e-8).log()
        negative = (1 - alpha) * prob**gamma * -(1 - prob + 1e-8).log()
        giou = generalized_box_iou(box_convert(boxes, "cxcywh", "xyxy"), box_convert(target_boxes, "cxcywh", "xyxy"))
        cost = (
            self.class_weight * (positive - negative)
            + self.bbox_weight * torch.cdist(boxes, target_boxes, p=1)
            - self.giou_weight * giou
        )
        # The target count spelt out: a query group may be empty (hybrid matching's, where an image
        # has fewer encoder positions than queries), and an empty tensor leaves -1 undetermined.
        return cost.view(batch, num_queries, len(target_labels))

    @torch.no_grad()
    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> list[tuple[Tensor, Tensor]]:
        """
        Args:
            outputs: ``pred_logits`` (N, Q, C) and ``pred_boxes`` (N, Q, 4) normalised (cx, cy, w, h).
            targets: per image ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) normalised (cx, cy, w, h).

        Returns:
            Per image (query indices, target indices), two int64 CPU tensors of length min(T_i, Q)
            (hybrid matching's repeated targets may outnumber its queries), the query indices ascending.
        """
        # One cost matrix for the whole batch, moved to the CPU once; each image keeps its own columns.
        costs = self.cost_matrix(outputs, targets).cpu()
        sizes = [len(t["boxes"]) for t in targets]
        matches = []
        for image, cost in enumerate(costs.split(sizes, -1)):
            queries, target_indices = linear_sum_assignment(cost[image])
            matches.append((torch.from_numpy(queries).long(), torch.from_numpy(target_indices).long()))
        return matches
