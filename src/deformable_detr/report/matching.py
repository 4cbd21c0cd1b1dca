"""COCO's own matching of detections to objects, at one IoU threshold, for the analyses that need to
know which detection found which object (the error breakdown, the confusion matrix) and the AP they
compare against."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO

# COCO's detection limit per image, and an area range that holds every box.
MAX_DETECTIONS = 100
ALL_AREAS = [0.0, 1e10]


def evaluate_at(
    ground_truth: COCO, detections: COCO, image_ids: Sequence[int], *, iou: float, by_class: bool = True
) -> COCOeval_faster:
    """COCO's evaluation of ``detections`` on ``image_ids`` at the one IoU threshold ``iou``, over
    all areas and at most :data:`MAX_DETECTIONS` a class and image, as COCO matches them for AP50
    at ``iou`` 0.5. ``by_class`` False matches a detection to an object of any class."""
    evaluation = COCOeval_faster(ground_truth, detections, "bbox")
    params = evaluation.params
    params.imgIds = list(image_ids)
    params.iouThrs = np.array([iou])
    params.areaRng, params.areaRngLbl = [ALL_AREAS], ["all"]
    params.maxDets = [MAX_DETECTIONS]
    params.useCats = int(by_class)
    evaluation.evaluate()
    evaluation.accumulate()
    return evaluation


def matches(evaluation: COCOeval_faster) -> dict[int, int]:
    """Detection id -> id of the object it was matched to, of an :func:`evaluate_at` evaluation.

    A detection matched to a crowd object (or a difficult one) is neither right nor wrong: COCO
    ignores it, and so do the analyses."""
    pairs = (key.split("_") for key in evaluation.eval["matched"])
    return {int(detection): int(target) for detection, target in pairs}


def mean_precision(evaluation: COCOeval_faster) -> float:
    """AP of an :func:`evaluate_at` evaluation: its precision averaged over recall levels and the
    classes with objects, as COCO's summary averages it (0 where no class has one)."""
    precision = evaluation.eval["precision"]
    defined = precision[precision > -1]
    return float(defined.mean()) if defined.size else 0.0
