"""The Deformable DETR training loss: focal class loss, L1 and GIoU box losses over matched pairs."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, generalized_box_iou, sigmoid_focal_loss

from ..distributed import is_distributed
from .matcher import HungarianMatcher


def average_num_boxes(targets: Sequence[dict[str, Tensor]], *, device: torch.device | None = None) -> float:
    """Targets per process (the batch's count averaged over processes when distributed), at least 1.

    Every loss is divided by it, so that each box weighs the same whatever the batch it lands in.
    """
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    if is_distributed():
        dist.all_reduce(count)
        count = count / dist.get_world_size()
    return count.clamp(min=1).item()


class SetCriterion(nn.Module):
    """Matches predictions to targets and scores them, for the final and every auxiliary output.

    ``forward`` returns the unweighted losses: ``loss_ce`` (sigmoid focal loss over every query and
    class), ``loss_bbox`` (L1 of matched boxes) and ``loss_giou`` (1 - GIoU of matched boxes), each
    divided by the number of target boxes; the same with suffix ``_0``, ``_1``, ... for each entry of
    ``aux_outputs`` and ``_enc`` for the two-stage ``enc_outputs``; and ``class_error``, a metric (the
    percentage of matched final queries whose top class is wrong). :meth:`total_loss` weights them
    with ``weight_dict`` (suffixes share their loss's weight) and sums them; that is what to minimise.
    """

    def __init__(
        self,
        *,
        matcher: HungarianMatcher | None = None,
        class_weight: float = 2.0,
        bbox_weight: float = 5.0,
        giou_weight: float = 2.0,
        focal_alpha: float = 0.25,
        focal_gamma: float = 2.0,
    ) -> None:
        super().__init__()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma

    def forward(self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs`` and,
                two-stage, ``enc_outputs``).
            targets: per image ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) normalised (cx, cy, w, h).
        """
        num_boxes = average_num_boxes(targets, device=outputs["pred_logits"].device)
        matches = self.matcher(outputs, targets)
        losses = self._losses(outputs, targets, matches, num_boxes)
        losses["class_error"] = _class_error(outputs["pred_logits"], targets, matches)
        for index, aux in enumerate(outputs.get("aux_outputs", [])):
            aux_losses = self._losses(aux, targets, self.matcher(aux, targets), num_boxes)
            losses.update({f"{name}_{index}": value for name, value in aux_losses.items()})
        if "enc_outputs" in outputs:
            # The encoder proposes class-agnostic boxes: every target counts as class 0.
            binary = [{**t, "labels": torch.zeros_like(t["labels"])} for t in targets]
            enc = outputs["enc_outputs"]
            enc_losses = self._losses(enc, binary, self.matcher(enc, binary), num_boxes)
            losses.update({f"{name}_enc": value for name, value in enc_losses.items()})
        return losses

    def total_loss(self, losses: dict[str, Tensor]) -> Tensor:
        """The weighted sum of the losses returned by ``forward`` (metrics such as ``class_error`` excluded)."""
        total = 0
        for name, value in losses.items():
            base = name if name in self.weight_dict else name.rpartition("_")[0]
            if base in self.weight_dict:
                total = total + self.weight_dict[base] * value
        return total

    def _losses(
        self,
        outputs: dict[str, Tensor],
        targets: Sequence[dict[str, Tensor]],
        matches: list[tuple[Tensor, Tensor]],
        num_boxes: float,
    ) -> dict[str, Tensor]:
        logits, boxes = outputs["pred_logits"], outputs["pred_boxes"]
        images, queries = _matched_positions(matches, logits.device)
        target_labels = _matched_targets(targets, matches, "labels")
        target_boxes = _matched_targets(targets, matches, "boxes").to(boxes)

        # One-hot over the real classes; unmatched queries are trained towards all-zero scores.
        one_hot = torch.zeros_like(logits)
        one_hot[images, queries, target_labels] = 1
        loss_ce = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma, reduction="sum")

        matched = boxes[images, queries]
        # generalized_box_iou is pairwise; a singleton batch dimension per pair gives it elementwise.
        giou = generalized_box_iou(
            box_convert(matched, "cxcywh", "xyxy")[:, None], box_convert(target_boxes, "cxcywh", "xyxy")[:, None]
        )
        return {
            "loss_ce": loss_ce / num_boxes,
            "loss_bbox": F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }


def _matched_positions(matches: list[tuple[Tensor, Tensor]], device: torch.device) -> tuple[Tensor, Tensor]:
    """(image index, query index) of every matched query in the batch."""
    images = torch.cat([torch.full_like(queries, image) for image, (queries, _) in enumerate(matches)])
    queries = torch.cat([queries for queries, _ in matches])
    return images.to(device), queries.to(device)


def _matched_targets(targets: Sequence[dict[str, Tensor]], matches: list[tuple[Tensor, Tensor]], key: str) -> Tensor:
    """``key`` of every matched target, in the order of :func:`_matched_positions`."""
    return torch.cat([target[key][indices] for target, (_, indices) in zip(targets, matches)])


@torch.no_grad()
def _class_error(logits: Tensor, targets: Sequence[dict[str, Tensor]], matches: list[tuple[Tensor, Tensor]]) -> Tensor:
    """Percentage of matched queries whose highest-scoring class is not their target's (0 with no targets)."""
    images, queries = _matched_positions(matches, logits.device)
    if len(queries) == 0:
        return logits.new_zeros(())
    correct = logits[images, queries].argmax(-1) == _matched_targets(targets, matches, "labels")
    return 100 - 100 * correct.float().mean()
