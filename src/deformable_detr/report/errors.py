"""What each kind of error costs in AP50: TIDE's breakdown (Bolya et al., *TIDE: A General Toolbox
for Identifying Object Detection Errors*, ECCV 2020), on COCO's own matching and AP.

Every detection COCO does not match at IoU 0.5 is given the first kind that fits it, and every object
no detection accounts for is missed:

- **duplicate**: IoU >= 0.5 with an object of its class that a higher-scoring detection found;
- **classification**: IoU >= 0.5 with an object of another class;
- **localisation**: 0.1 <= IoU < 0.5 with an object of its class;
- **both**: 0.1 <= IoU < 0.5 with an object of another class;
- **background**: IoU < 0.1 with every object;
- **missed**: an object no detection found, nor tried to (as a classification or localisation error).

The AP gain of a kind is AP50 with that kind alone fixed, less AP50: a classification error takes its
object's class and a localisation error its object's box (each is dropped instead where its object
is found already, by a true positive or an earlier fix); a duplicate, a both and a background error
are dropped; a missed object is taken out of the ground truth. TIDE orders the tests differently
(localisation before classification) and computes its own AP; here an error on another class's
object is a classification error first, and AP is COCO's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pycocotools import mask
from pycocotools.coco import COCO

from ..data.coco import coco_index
from .matching import evaluate_at, matches, mean_precision

FOREGROUND_IOU = 0.5  # a detection this close to an object of its class finds it (AP50's threshold)
BACKGROUND_IOU = 0.1  # below this with every object, a detection is on background (TIDE's)
ERROR_KINDS = ("classification", "localisation", "both", "duplicate", "background", "missed")
TRUE_POSITIVE = "true positive"


@dataclass
class ErrorBreakdown:
    """The errors of an evaluation and the AP50 each kind would add back if it alone were fixed."""

    ap50: float
    counts: dict[str, int]
    ap_gains: dict[str, float]
    detection_kinds: dict[int, str]  # detection id -> TRUE_POSITIVE or a kind; ignored ones left out
    targets: dict[int, int]  # detection id -> the object a true positive or an error is on
    missed: set[int]  # ids of the missed objects

    def to_json(self) -> dict[str, Any]:
        return {
            "ap50": self.ap50, "foreground_iou": FOREGROUND_IOU, "background_iou": BACKGROUND_IOU,
            "errors": {kind: {"count": self.counts[kind], "ap50_gain": self.ap_gains[kind]} for kind in ERROR_KINDS},
        }


def error_breakdown(ground_truth: COCO, detections: COCO, image_ids: Sequence[int]) -> ErrorBreakdown:
    """Every detection in ``detections`` (a results index, as ``COCOeval.cocoDt``) on ``image_ids``
    given its kind, and each kind's AP50 gain. Detections of ids that name no class are left out, as
    COCO leaves them out of AP."""
    evaluation = evaluate_at(ground_truth, detections, image_ids, iou=FOREGROUND_IOU)
    found = matches(evaluation)
    kinds, targets = {}, {}
    for image_id in image_ids:
        unmatched = []
        for detection in detections.imgToAnns[image_id]:
            target = found.get(detection["id"])
            if detection["category_id"] not in ground_truth.cats:
                continue
            if target is None:
                unmatched.append(detection)
            elif not ground_truth.anns[target].get("iscrowd", 0):
                kinds[detection["id"]], targets[detection["id"]] = TRUE_POSITIVE, target
        objects = [a for a in ground_truth.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        for detection, (kind, target) in zip(unmatched, _error_kinds(unmatched, objects)):
            kinds[detection["id"]] = kind
            if target is not None:
                targets[detection["id"]] = target
    tried = {targets[d] for d, kind in kinds.items() if kind in (TRUE_POSITIVE, "classification", "localisation")}
    missed = {a["id"] for i in image_ids for a in ground_truth.imgToAnns[i] if not a.get("iscrowd", 0)} - tried

    ap50 = mean_precision(evaluation)
    gains = {}
    for kind in ERROR_KINDS:
        fixed_truth, fixed_detections = _fixed(ground_truth, detections, kind, kinds, targets, missed)
        gains[kind] = mean_precision(evaluate_at(fixed_truth, fixed_detections, image_ids, iou=FOREGROUND_IOU)) - ap50
    counts = {kind: sum(k == kind for k in kinds.values()) for kind in ERROR_KINDS}
    counts["missed"] = len(missed)
    return ErrorBreakdown(ap50, counts, gains, kinds, targets, missed)


def _error_kinds(detections: list[dict], objects: list[dict]) -> list[tuple[str, int | None]]:
    """Each unmatched detection's kind and the object it is on (None for both and background)."""
    if not detections or not objects:
        return [("background", None)] * len(detections)
    ious = mask.iou([d["bbox"] for d in detections], [o["bbox"] for o in objects], [0] * len(objects))
    ious = np.asarray(ious).reshape(len(detections), len(objects))
    classes = np.array([o["category_id"] for o in objects])
    kinds = []
    for detection, overlaps in zip(detections, ious):
        same = np.where(classes == detection["category_id"], overlaps, -1.0)
        other = np.where(classes != detection["category_id"], overlaps, -1.0)
        if same.max() >= FOREGROUND_IOU:
            kinds.append(("duplicate", objects[same.argmax()]["id"]))
        elif other.max() >= FOREGROUND_IOU:
            kinds.append(("classification", objects[other.argmax()]["id"]))
        elif same.max() >= BACKGROUND_IOU:
            kinds.append(("localisation", objects[same.argmax()]["id"]))
        elif other.max() >= BACKGROUND_IOU:
            kinds.append(("both", None))
        else:
            kinds.append(("background", None))
    return kinds


def _fixed(
    ground_truth: COCO, detections: COCO, kind: str, kinds: dict[int, str], targets: dict[int, int], missed: set[int]
) -> tuple[COCO, COCO]:
    """The ground truth and detections with the errors of ``kind`` fixed, as the module says."""
    if kind == "missed":
        kept = [a for a in ground_truth.dataset["annotations"] if a["id"] not in missed]
        return coco_index({**ground_truth.dataset, "annotations": kept}), detections
    found = {targets[d] for d, k in kinds.items() if k == TRUE_POSITIVE}
    fixed = []
    for detection in sorted(detections.dataset["annotations"], key=lambda d: -d["score"]):
        if kinds.get(detection["id"]) != kind:
            fixed.append(detection)
        elif kind in ("classification", "localisation") and targets[detection["id"]] not in found:
            target = ground_truth.anns[targets[detection["id"]]]
            found.add(target["id"])
            change = ({"category_id": target["category_id"]} if kind == "classification"
                      else {"bbox": target["bbox"], "area": target["bbox"][2] * target["bbox"][3]})
            fixed.append({**detection, **change})
    return ground_truth, coco_index({**detections.dataset, "annotations": fixed})
