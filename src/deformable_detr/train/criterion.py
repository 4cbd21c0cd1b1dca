"""The Deformable DETR training loss: focal class loss, L1 and GIoU box losses over matched pairs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_convert, box_iou, generalized_box_iou, sigmoid_focal_loss

from ..distributed import mean_over_processes
from .matcher import HungarianMatcher


def average_num_boxes(targets: Sequence[dict[str, Tensor]], *, device: torch.device | None = None) -> float:
    """Targets per process (the batch's count averaged over processes when distributed), at least 1.

    Every loss is divided by it, so that each box weighs the same whatever the batch it lands in.
    """
    count = torch.tensor(float(sum(len(t["labels"]) for t in targets)), device=device)
    return mean_over_processes(count).clamp(min=1).item()


ONE_TO_MANY = "_one_to_many"  # suffix of the hybrid-matching group's losses
DENOISING = "_dn"  # suffix of the denoising queries' losses


def repeat_targets(targets: Sequence[dict[str, Tensor]], repeats: int) -> list[dict[str, Tensor]]:
    """Each image's targets ``repeats`` times over: what the one-to-many group is matched against."""
    return [{**t, "labels": t["labels"].repeat(repeats), "boxes": t["boxes"].repeat(repeats, 1)} for t in targets]


class SetCriterion(nn.Module):
    """Matches predictions to targets and scores them, for the final and every auxiliary output.

    ``forward`` returns the unweighted losses: ``loss_ce`` (sigmoid focal loss over every query and
    class), ``loss_bbox`` (L1 of matched boxes) and ``loss_giou`` (1 - GIoU of matched boxes), each
    divided by the number of target boxes; the same with suffix ``_0``, ``_1``, ... for each entry of
    ``aux_outputs`` and ``_enc`` for the two-stage ``enc_outputs``; and ``class_error``, a metric (the
    percentage of matched final queries whose top class is wrong). Outputs of hybrid matching's
    one-to-many group (``one_to_many``) are scored the same way against the targets repeated
    ``one_to_many_repeats`` times, their losses suffixed ``_one_to_many``. :meth:`total_loss` weights
    them with ``weight_dict`` (suffixes share their loss's weight; the one-to-many group's are also
    multiplied by ``one_to_many_weight``) and sums them; that is what to minimise. Denoising
    queries (``denoising``) need no matching: group g's j-th query restores image's j-th target.
    Their losses are suffixed ``_dn``.

    With ``iou_aware``, ``loss_ce`` is the varifocal loss instead (VarifocalNet; as in RT-DETR): a
    matched query's target score for its class is the IoU of its box with the target's (detached)
    rather than 1, and it is weighted by that IoU, so that scores rank boxes by how well they fit.
    Unmatched queries are weighted as in the focal loss, ``(1 - focal_alpha) * p ** focal_gamma``.
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
        one_to_many_repeats: int = 6,
        one_to_many_weight: float = 1.0,
        iou_aware: bool = False,
    ) -> None:
        super().__init__()
        self.matcher = matcher if matcher is not None else HungarianMatcher()
        self.weight_dict = {"loss_ce": class_weight, "loss_bbox": bbox_weight, "loss_giou": giou_weight}
        self.focal_alpha = focal_alpha
        self.focal_gamma = focal_gamma
        self.one_to_many_repeats = one_to_many_repeats
        self.one_to_many_weight = one_to_many_weight
        self.iou_aware = iou_aware

    def forward(
        self, outputs: dict[str, Any], targets: Sequence[dict[str, Tensor]], *, num_boxes: float | None = None
    ) -> dict[str, Tensor]:
        """
        Args:
            outputs: the model's output dict (``pred_logits``, ``pred_boxes``, ``aux_outputs`` and,
                two-stage, ``enc_outputs``).
            targets: per image ``labels`` (T_i,) int64 and ``boxes`` (T_i, 4) normalised (cx, cy, w, h).
            num_boxes: what the losses are divided by; by default :func:`average_num_boxes` of ``targets``.
        """
        if num_boxes is None:
            num_boxes = average_num_boxes(targets, device=outputs["pred_logits"].device)
        matches = self.matcher(outputs, targets)
        losses = self._losses(outputs, targets, matches, num_boxes)
        losses["class_error"] = _class_error(outputs["pred_logits"], targets, matches)
        losses.update(self._layer_losses(outputs.get("aux_outputs", []), targets, num_boxes))
        if "one_to_many" in outputs:
            repeated = repeat_targets(targets, self.one_to_many_repeats)
            group_losses = self._group_losses(outputs["one_to_many"], repeated, num_boxes * self.one_to_many_repeats)
            losses.update({f"{name}{ONE_TO_MANY}": value for name, value in group_losses.items()})
        if "denoising" in outputs:
            group = outputs["denoising"]
            matches = _denoising_matches(targets, group["groups"], group["pred_logits"].shape[1])
            group_losses = self._group_losses(group, targets, num_boxes * group["groups"], matches=matches)
            losses.update({f"{name}{DENOISING}": value for name, value in group_losses.items()})
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
            group_weight = self.one_to_many_weight if name.endswith(ONE_TO_MANY) else 1.0
            name = name.removesuffix(ONE_TO_MANY).removesuffix(DENOISING)
            base = name if name in self.weight_dict else name.rpartition("_")[0]
            if base in self.weight_dict:
                total = total + group_weight * self.weight_dict[base] * value
        return total

    def _group_losses(
        self, group: dict[str, Any], targets: Sequence[dict[str, Tensor]], num_boxes: float,
        *, matches: list[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """The losses of an extra query group's last layer and, suffixed, of its earlier layers."""
        losses = self._losses(group, targets, matches if matches is not None else self.matcher(group, targets), num_boxes)
        return {**losses, **self._layer_losses(group["aux_outputs"], targets, num_boxes, matches=matches)}

    def _layer_losses(
        self, aux_outputs: Sequence[dict[str, Tensor]], targets: Sequence[dict[str, Tensor]], num_boxes: float,
        *, matches: list[tuple[Tensor, Tensor]] | None = None,
    ) -> dict[str, Tensor]:
        """The losses of each earlier decoder layer, suffixed ``_0``, ``_1``, ..., each matched anew
        unless ``matches`` are given."""
        losses = {}
        for index, aux in enumerate(aux_outputs):
            layer_matches = matches if matches is not None else self.matcher(aux, targets)
            aux_losses = self._losses(aux, targets, layer_matches, num_boxes)
            losses.update({f"{name}_{index}": value for name, value in aux_losses.items()})
        return losses

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

        matched = boxes[images, queries]
        # The pairwise IoUs take a singleton batch dimension per pair to give them elementwise.
        matched_xyxy = box_convert(matched, "cxcywh", "xyxy")[:, None]
        target_xyxy = box_convert(target_boxes, "cxcywh", "xyxy")[:, None]
        giou = generalized_box_iou(matched_xyxy, target_xyxy)

        # One-hot over the real classes; unmatched queries are trained towards all-zero scores.
        one_hot = torch.zeros_like(logits)
        one_hot[images, queries, target_labels] = 1
        if self.iou_aware:
            target_scores = torch.zeros_like(logits)
            target_scores[images, queries, target_labels] = box_iou(matched_xyxy, target_xyxy).detach().flatten()
            loss_ce = self._varifocal_loss(logits, target_scores, one_hot.bool())
        else:
            loss_ce = sigmoid_focal_loss(logits, one_hot, alpha=self.focal_alpha, gamma=self.focal_gamma,
                                         reduction="sum")
        return {
            "loss_ce": loss_ce / num_boxes,
            "loss_bbox": F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes,
            "loss_giou": (1 - giou).sum() / num_boxes,
        }

    def _varifocal_loss(self, logits: Tensor, target_scores: Tensor, matched: Tensor) -> Tensor:
        """Binary cross-entropy towards ``target_scores`` (IoUs at the ``matched`` scores, else 0), the
        matched scores weighted by their target and the others by the focal loss's down-weighting of
        easy ones."""
        # Told apart by the match, not by the target score: a matched box that misses its target (IoU
        # 0, as many do early in training) weighs nothing, as in VarifocalNet and RT-DETR; counted as a
        # negative, it would teach its class score that the object is background.
        negative_weight = (1 - self.focal_alpha) * logits.detach().sigmoid().pow(self.focal_gamma)
        weight = torch.where(matched, target_scores, negative_weight)
        return F.binary_cross_entropy_with_logits(logits, target_scores, weight=weight, reduction="sum")


def _denoising_matches(
    targets: Sequence[dict[str, Tensor]], groups: int, num_queries: int
) -> list[tuple[Tensor, Tensor]]:
    """(query indices, target indices) per image: each of ``groups`` groups of ``num_queries / groups``
    queries holds the image's targets in order, then padding."""
    group_size = num_queries // groups
    matches = []
    for target in targets:
        count = len(target["labels"])
        queries = (torch.arange(groups)[:, None] * group_size + torch.arange(count)[None]).flatten()
        matches.append((queries, torch.arange(count).repeat(groups)))
    return matches


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
