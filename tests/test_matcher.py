"""Hungarian matcher: optimal against brute force, cost terms as SPEC, empty targets."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from deformable_detr.train import HungarianMatcher


def _random_boxes(count: int) -> torch.Tensor:
    centres = 0.2 + 0.6 * torch.rand(count, 2)
    sizes = 0.05 + 0.3 * torch.rand(count, 2)
    return torch.cat([centres, sizes], 1)


def _giou(a: list[float], b: list[float]) -> float:
    """GIoU of two (cx, cy, w, h) boxes, from the definition."""
    ax1, ay1, ax2, ay2 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx1, by1, bx2, by2 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    inter = max(0.0, min(ax2, bx2) - max(ax1, bx1)) * max(0.0, min(ay2, by2) - max(ay1, by1))
    union = a[2] * a[3] + b[2] * b[3] - inter
    hull = (max(ax2, bx2) - min(ax1, bx1)) * (max(ay2, by2) - min(ay1, by1))
    return inter / union - (hull - union) / hull


def _pair_cost(logits: list[float], box: list[float], label: int, target: list[float]) -> float:
    p = 1 / (1 + math.exp(-logits[label]))
    focal = 0.25 * (1 - p) ** 2 * -math.log(p + 1e-8) - 0.75 * p**2 * -math.log(1 - p + 1e-8)
    l1 = sum(abs(x - y) for x, y in zip(box, target))
    return 2 * focal + 5 * l1 - 2 * _giou(box, target)


@pytest.mark.parametrize("num_queries, sizes", [(4, [3, 2]), (5, [5, 1]), (6, [4, 0]), (7, [1, 6])])
def test_matches_brute_force_optimum(num_queries, sizes):
    num_classes = 3
    outputs = {
        "pred_logits": 2 * torch.randn(len(sizes), num_queries, num_classes),
        "pred_boxes": _random_boxes(len(sizes) * num_queries).view(len(sizes), num_queries, 4),
    }
    targets = [{"labels": torch.randint(num_classes, (n,)), "boxes": _random_boxes(n)} for n in sizes]

    matches = HungarianMatcher()(outputs, targets)

    for image, (target, (queries, target_indices)) in enumerate(zip(targets, matches)):
        assert queries.dtype == target_indices.dtype == torch.int64
        logits, boxes = outputs["pred_logits"][image].tolist(), outputs["pred_boxes"][image].tolist()
        labels, target_boxes = target["labels"].tolist(), target["boxes"].tolist()
        pairs = list(zip(labels, target_boxes))
        cost = [[_pair_cost(logits[q], boxes[q], label, box) for label, box in pairs] for q in range(num_queries)]
        # Brute force over every injective assignment: entry t is the query given target t.
        assignments = itertools.permutations(range(num_queries), len(labels))
        best = min(assignments, key=lambda chosen: sum(cost[q][t] for t, q in enumerate(chosen)))
        assert sorted(target_indices.tolist()) == list(range(len(labels)))
        assigned = dict(zip(target_indices.tolist(), queries.tolist()))
        assert tuple(assigned[t] for t in range(len(labels))) == best


def test_one_target_takes_the_cheapest_query():
    outputs = {"pred_logits": torch.randn(1, 6, 2), "pred_boxes": _random_boxes(6)[None]}
    targets = [{"labels": torch.tensor([1]), "boxes": _random_boxes(1)}]
    matcher = HungarianMatcher()
    (queries, target_indices), = matcher(outputs, targets)
    assert target_indices.tolist() == [0]
    assert queries.tolist() == [matcher.cost_matrix(outputs, targets)[0, :, 0].argmin().item()]


def test_zero_targets():
    outputs = {"pred_logits": torch.randn(2, 5, 3), "pred_boxes": _random_boxes(10).view(2, 5, 4)}
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    for targets in ([empty, empty], [empty, {"labels": torch.tensor([2]), "boxes": _random_boxes(1)}]):
        matches = HungarianMatcher()(outputs, targets)
        counts = [len(t["labels"]) for t in targets]
        assert [len(q) for q, _ in matches] == [len(j) for _, j in matches] == counts


def test_cost_terms_by_hand():
    # One query, p = (0.5, 0.75), box (0.5, 0.5, 0.2, 0.2); targets of class 0 and 1.
    outputs = {
        "pred_logits": torch.tensor([[[0.0, math.log(3)]]]),
        "pred_boxes": torch.tensor([[[0.5, 0.5, 0.2, 0.2]]]),
    }
    target_boxes = torch.tensor([[0.6, 0.5, 0.2, 0.2], [0.2, 0.2, 0.1, 0.1]])
    targets = [{"labels": torch.tensor([0, 1]), "boxes": target_boxes}]

    def cost(**weights: float) -> list[float]:
        matcher = HungarianMatcher(**{"class_weight": 0.0, "bbox_weight": 0.0, "giou_weight": 0.0, **weights})
        return matcher.cost_matrix(outputs, targets)[0, 0].tolist()

    # Class: alpha (1-p)^2 (-log p) - (1-alpha) p^2 (-log(1-p)).
    class_0 = 0.25 * 0.25 * -math.log(0.5 + 1e-8) - 0.75 * 0.25 * -math.log(0.5 + 1e-8)
    class_1 = 0.25 * 0.0625 * -math.log(0.75 + 1e-8) - 0.75 * 0.5625 * -math.log(0.25 + 1e-8)
    assert cost(class_weight=1.0) == pytest.approx([class_0, class_1], rel=1e-6)
    # L1 of (cx, cy, w, h): |0.5-0.6| and |0.5-0.2| + |0.5-0.2| + |0.2-0.1| + |0.2-0.1|.
    assert cost(bbox_weight=1.0) == pytest.approx([0.1, 0.8], rel=1e-6)
    # GIoU: overlap 0.02 of union 0.06 filling its hull; disjoint, union 0.05 in a 0.45 x 0.45 hull.
    giou_0, giou_1 = 1 / 3, -(0.2025 - 0.05) / 0.2025
    assert cost(giou_weight=1.0) == pytest.approx([-giou_0, -giou_1], rel=1e-5)
    default = HungarianMatcher().cost_matrix(outputs, targets)[0, 0].tolist()
    assert default == pytest.approx([2 * class_0 + 0.5 - 2 * giou_0, 2 * class_1 + 4.0 - 2 * giou_1], rel=1e-5)
