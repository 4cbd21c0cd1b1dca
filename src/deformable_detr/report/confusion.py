"""Which class the detections give each object: a confusion matrix of the classes and background.

faster-coco-eval has one too (``PreviewResults.compute_confusion_matrix``); it counts crowd and
difficult objects as missed and copies both indexes, so this one reads the same matching itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from pycocotools.coco import COCO

from ..evaluation import results_index
from .matching import evaluate_at, matches

CONFUSION_IOU = 0.5


def confusion_matrix(
    ground_truth: COCO, detections: COCO, image_ids: Sequence[int], *, score_threshold: float, iou: float = CONFUSION_IOU
) -> np.ndarray:
    """(K + 1, K + 1) counts over ``image_ids``: row the true class, column the predicted one, in the
    order of the sorted category ids, the last row and column background.

    The detections scoring at least ``score_threshold`` are matched to objects regardless of class
    (COCO's matching at ``iou``, best-scoring first): a matched pair counts at (its object's class,
    its class), a detection on nothing in the background row, an object nothing found in the
    background column. Crowd (and difficult) objects and the detections on them are not counted, nor,
    as in COCO's AP, detections of ids that name no class."""
    kept = results_index(ground_truth, [
        d for d in detections.dataset["annotations"]
        if d["score"] >= score_threshold and d["category_id"] in ground_truth.cats
    ])
    found = matches(evaluate_at(ground_truth, kept, image_ids, iou=iou, by_class=False))
    found_objects = set(found.values())
    index = {category: row for row, category in enumerate(sorted(ground_truth.cats))}
    background = len(index)
    counts = np.zeros((background + 1, background + 1), dtype=np.int64)
    image_ids = set(image_ids)
    for detection in kept.dataset["annotations"]:
        if detection["image_id"] not in image_ids:
            continue
        target = ground_truth.anns.get(found.get(detection["id"]))
        if target is None:
            counts[background, index[detection["category_id"]]] += 1
        elif not target.get("iscrowd", 0):
            counts[index[target["category_id"]], index[detection["category_id"]]] += 1
    for image_id in image_ids:
        for target in ground_truth.imgToAnns[image_id]:
            if not target.get("iscrowd", 0) and target["id"] not in found_objects:
                counts[index[target["category_id"]], background] += 1
    return counts
