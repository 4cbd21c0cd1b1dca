"""Each class's COCO metrics and precision-recall curves, read from the evaluation that gives the
headline AP: its precision and recall arrays, averaged per class as COCO's summary averages them
over all classes, so the mean of the classes' AP over those with objects is the AP."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
from faster_coco_eval import COCOeval_faster

from .matching import MAX_DETECTIONS

# The per-class table's columns: (IoU threshold or None for 0.5:0.95, area range).
PER_CLASS_AP = {"AP": (None, "all"), "AP50": (0.5, "all"), "AP75": (0.75, "all"),
                "APs": (None, "small"), "APm": (None, "medium"), "APl": (None, "large")}


def per_class_metrics(evaluation: COCOeval_faster, class_names: Mapping[int, str]) -> list[dict[str, Any]]:
    """For each class of the ground truth: its id, name, :data:`PER_CLASS_AP`, ``AR100`` and
    ``objects`` (ground-truth boxes, crowd ones aside), a metric being None where the class has no
    object to score it on (where COCO's summary has -1)."""
    params = evaluation.params
    precision, recall = evaluation.eval["precision"], evaluation.eval["recall"]
    limit = params.maxDets.index(MAX_DETECTIONS)
    objects = Counter(
        annotation["category_id"]
        for image_id in params.imgIds
        for annotation in evaluation.cocoGt.imgToAnns[image_id]
        if not annotation.get("iscrowd", 0)
    )
    rows = []
    for column, category in enumerate(params.catIds):
        row = {"id": int(category), "name": class_names.get(int(category), str(category))}
        for name, (iou, area) in PER_CLASS_AP.items():
            thresholds = slice(None) if iou is None else _iou_index(evaluation, iou)
            row[name] = _mean(precision[thresholds, :, column, params.areaRngLbl.index(area), limit])
        row["AR100"] = _mean(recall[:, column, params.areaRngLbl.index("all"), limit])
        row["objects"] = objects[category]
        rows.append(row)
    return rows


def precision_recall(evaluation: COCOeval_faster, iou: float | None) -> tuple[np.ndarray, np.ndarray]:
    """COCO's interpolated precision at its recall levels: (R,) recall levels and (K, R) precision of
    each class over all areas, at IoU ``iou``, or averaged over the IoU thresholds 0.5:0.95 for
    None (the curve whose area is AP); -1 for a class without objects."""
    params = evaluation.params
    precision = evaluation.eval["precision"][:, :, :, params.areaRngLbl.index("all"), params.maxDets.index(MAX_DETECTIONS)]
    if iou is None:
        curves = np.where((precision > -1).all(axis=0), precision.mean(axis=0), -1.0)
    else:
        curves = precision[_iou_index(evaluation, iou)]
    return np.asarray(params.recThrs), curves.T


def _iou_index(evaluation: COCOeval_faster, iou: float) -> int:
    return int(np.argmin(np.abs(np.asarray(evaluation.params.iouThrs) - iou)))


def _mean(values: np.ndarray) -> float | None:
    """COCO's summary mean: over the defined entries (-1 marks the undefined)."""
    defined = values[values > -1]
    return float(defined.mean()) if defined.size else None
