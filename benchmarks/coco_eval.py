"""The COCO evaluator at COCO val2017's size: faster-coco-eval (what evaluation.py runs) against
pycocotools, on the same synthetic ground truth and detections, with their numbers compared.

Writes nothing: makes ``--images`` 640 x 480 images with about seven objects each in 80 classes (as
val2017 has, 1% of them crowds), up to three noisy detections of each object (one in five with a
wrong class) and up to 60 low-scoring boxes on nothing per image, then times evaluate + accumulate +
summarize of each evaluator, median of ``--repeats``.

    python benchmarks/coco_eval.py [--images 5000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import time

import numpy as np
from faster_coco_eval import COCOeval_faster
from pycocotools.cocoeval import COCOeval

from deformable_detr.data.coco import coco_index
from deformable_detr.evaluation import results_index

WIDTH, HEIGHT, CLASSES = 640, 480, 80


def synthetic_set(images: int, rng: np.random.Generator) -> tuple[dict, list[dict]]:
    entries, objects, detections = [], [], []
    for image_id in range(1, images + 1):
        entries.append({"id": image_id, "width": WIDTH, "height": HEIGHT, "file_name": f"{image_id}.jpg"})
        for _ in range(rng.poisson(7)):
            w, h = rng.uniform(5, 300, 2)
            box = [rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h), w, h]
            category = int(rng.integers(1, CLASSES + 1))
            objects.append({"id": len(objects) + 1, "image_id": image_id, "category_id": category, "bbox": box,
                            "area": w * h, "iscrowd": int(rng.random() < 0.01)})
            for _ in range(rng.integers(0, 4)):
                noisy = np.maximum(np.add(box, rng.normal(0, 0.1, 4) * [w, h, w, h]), [0, 0, 1, 1]).tolist()
                label = category if rng.random() < 0.8 else int(rng.integers(1, CLASSES + 1))
                detections.append({"image_id": image_id, "category_id": label, "bbox": noisy, "score": rng.random()})
        for _ in range(rng.integers(0, 60)):
            w, h = rng.uniform(5, 300, 2)
            detections.append({"image_id": image_id, "category_id": int(rng.integers(1, CLASSES + 1)),
                               "bbox": [rng.uniform(0, 600), rng.uniform(0, 400), w, h], "score": rng.random() / 2})
    categories = [{"id": c, "name": f"class{c}"} for c in range(1, CLASSES + 1)]
    return {"images": entries, "annotations": objects, "categories": categories}, detections


def timed(evaluator: type, data: dict, detections: list[dict]) -> tuple[float, object]:
    truth = coco_index(data)
    results = results_index(truth, detections)
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluation = evaluator(truth, results, "bbox")
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
    return time.perf_counter() - start, evaluation


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    data, detections = synthetic_set(args.images, np.random.default_rng(0))
    print(f"{args.images} images, {len(data['annotations'])} objects, {len(detections)} detections")
    measured = {}
    for name, evaluator in (("pycocotools", COCOeval), ("faster-coco-eval", COCOeval_faster)):
        runs = [timed(evaluator, data, detections) for _ in range(args.repeats)]
        measured[name] = statistics.median(seconds for seconds, _ in runs), runs[0][1]
        print(f"{name:17s} {measured[name][0]:6.2f} s")
    (slow, reference), (fast, ours) = measured["pycocotools"], measured["faster-coco-eval"]
    for array in ("precision", "recall", "scores"):
        print(f"largest difference in {array}: {np.abs(ours.eval[array] - reference.eval[array]).max():.1e}")
    print(f"largest difference in the 12 metrics: {np.abs(np.subtract(ours.stats, reference.stats)).max():.1e}")
    print(f"speed-up {slow / fast:.1f}x")

if __name__ == "__main__":
    main()
