"""COCO box AP of detections, over one process or all of them: of a model on a data loader
(:func:`detect_all`, after every training epoch) or of a checkpoint on a data set
(:func:`evaluate_checkpoint`, the ``evaluate`` command, which can also write a report).

The evaluation is faster-coco-eval's: pycocotools' algorithm with its per-image matching and
accumulation in C++, several times faster, and held to pycocotools' numbers by the tests
(docs/report.md#the-evaluator).

Only the images given to :meth:`CocoEvaluator.update` are evaluated, so a partial pass is scored on
what it saw. Metrics keep pycocotools' convention of -1 where the ground truth has no object to
score (``APs`` on images without small objects), so they compare line for line with published logs.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from faster_coco_eval import COCOeval_faster
from pycocotools.coco import COCO
from torch import Tensor, nn
from torchvision.ops import box_convert
from tqdm import tqdm

from .checkpoints import Checkpoint, read_checkpoint
from .checks import check_count
from .data import CocoDataset, SplitReport, data_loader, load_split, recipe
from .data.coco import class_key, coco_index
from .distributed import gather_objects, is_main_process, setup_distributed
from .files import atomic_write
from .model import evaluating, postprocess
from .precision import check_dtype, forward, inference_model

# Names of COCOeval.stats, in its order.
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
# The batch evaluate_checkpoint runs where the checkpoint records no training batch (the reference code's).
DEFAULT_BATCH_SIZE = 2


class CocoEvaluator:
    """Collects detections image by image and scores them against the ground truth ``coco``."""

    def __init__(self, coco: COCO) -> None:
        self.coco = coco
        # image id -> (K, 6) float64 rows [x1, y1, x2, y2, score, category id]: compact to gather, and
        # an image seen with no detections still counts (its objects are all missed).
        self._detections: dict[int, Tensor] = {}

    def update(self, results: Sequence[dict[str, Tensor]], image_ids: Iterable[int] | Tensor) -> None:
        """Add :func:`~deformable_detr.postprocess` results (boxes in the original image size,
        labels being category ids) for the images ``image_ids``."""
        image_ids = [int(i) for i in image_ids]
        if len(image_ids) != len(results):
            raise ValueError(f"{len(results)} results for {len(image_ids)} image ids")
        for image_id, result in zip(image_ids, results):
            if image_id not in self.coco.imgs:
                raise ValueError(f"image id {image_id} is not in the ground truth")
            boxes = result["boxes"].detach().to("cpu", torch.float64).reshape(-1, 4)
            scores = result["scores"].detach().to("cpu", torch.float64).reshape(-1, 1)
            labels = result["labels"].detach().to("cpu", torch.float64).reshape(-1, 1)
            self._detections[image_id] = torch.cat([boxes, scores, labels], 1)

    def _gather(self) -> dict[int, Tensor]:
        """Every process's detections; collective when distributed."""
        merged: dict[int, Tensor] = {}
        for part in gather_objects(self._detections):
            # An image on two processes (a sampler padding to equal shares) has the same detections on
            # both, so keeping either one counts it once.
            merged.update(part)
        return merged

    def results(self) -> list[dict[str, Any]]:
        """All detections in the COCO results format; collective when distributed."""
        return _coco_results(self._gather())

    def evaluation(self) -> COCOeval_faster:
        """The COCO evaluation over the images seen by every process, accumulated and summarised: its
        ``stats`` are :data:`METRICS`, its ``eval`` arrays (precision by IoU threshold, recall level,
        class, area and detection limit) what the report draws; ``cocoDt`` indexes the detections.
        Collective when distributed."""
        detections = self._gather()
        if not detections:
            raise ValueError("no images to evaluate: update() was never called")
        evaluation = COCOeval_faster(self.coco, results_index(self.coco, _coco_results(detections)), "bbox")
        evaluation.params.imgIds = sorted(detections)
        evaluation.evaluate()
        evaluation.accumulate()
        evaluation.summarize()
        return evaluation

    def summarize(self) -> dict[str, float]:
        """COCO box metrics (:data:`METRICS`) over the images seen by every process; collective when
        distributed, and every process returns the same numbers."""
        return metrics(self.evaluation())


def metrics(evaluation: COCOeval_faster) -> dict[str, float]:
    """A summarised evaluation's :data:`METRICS`."""
    return dict(zip(METRICS, (float(value) for value in evaluation.stats)))


def coco_results(image_id: int, boxes: Tensor, scores: Tensor, labels: Tensor) -> list[dict[str, Any]]:
    """One image's detections, boxes (K, 4) as absolute (x1, y1, x2, y2), in the COCO results format."""
    xywh = box_convert(boxes.reshape(-1, 4), "xyxy", "xywh")
    return [
        {"image_id": image_id, "category_id": int(label), "bbox": box, "score": score}
        for box, score, label in zip(xywh.tolist(), scores.tolist(), labels.tolist())
    ]


def _coco_results(detections: dict[int, Tensor]) -> list[dict[str, Any]]:
    return [
        result
        for image_id, rows in sorted(detections.items())
        for result in coco_results(image_id, rows[:, :4], rows[:, 4], rows[:, 5])
    ]


def results_index(coco: COCO, results: list[dict[str, Any]]) -> COCO:
    """The index ``coco.loadRes(results)`` builds for boxes, without its prints and its failure on an
    empty list (a model that detects nothing scores 0, not an error)."""
    annotations = [
        dict(result, id=number, area=result["bbox"][2] * result["bbox"][3], iscrowd=0)
        for number, result in enumerate(results, start=1)
    ]
    return coco_index({"images": coco.dataset["images"], "categories": coco.dataset["categories"], "annotations": annotations})


@torch.no_grad()
def detect_all(
    model: nn.Module,
    data_loader: Iterable[tuple[Tensor, Tensor, list[dict[str, Any]]]],
    *,
    device: torch.device | str,
    coco: COCO,
    top_k: int = 100,
    progress: bool = True,
    dtype: torch.dtype = torch.float32,
) -> CocoEvaluator:
    """The detections of ``model`` over ``data_loader`` (batches as :func:`~deformable_detr.data.collate`
    makes them), in the evaluator that scores them against the ground truth ``coco``
    (:meth:`CocoEvaluator.summarize`: the COCO metrics), the model computing in ``dtype``
    (:mod:`deformable_detr.precision`).

    When distributed, each process runs its share of the loader, and the evaluator's results are
    every process's. The model is left in the mode it was in.
    """
    evaluator = CocoEvaluator(coco)
    show = progress and is_main_process()
    with evaluating(model):
        for images, padding_mask, targets in tqdm(data_loader, desc="evaluate", disable=not show):
            outputs = forward(model, images.to(device), padding_mask.to(device), dtype=dtype)
            # Boxes are relative to the image, so scaling by its original size undoes any resizing.
            original_sizes = torch.stack([target["orig_size"] for target in targets])
            detections = postprocess(outputs, original_sizes, top_k=top_k)
            evaluator.update(detections, [target["image_id"] for target in targets])
    return evaluator


def write_results_json(path: str | os.PathLike, results: list[dict[str, Any]]) -> None:
    """Write ``results`` (e.g. :meth:`CocoEvaluator.results`) as a COCO results file, whole or not
    at all."""
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(results))


def evaluate_checkpoint(
    checkpoint: str | os.PathLike, data: str | os.PathLike, *, split: str = "val", batch_size: int | None = None,
    image_size: int | None = None, workers: int = 2, format: str | None = None, dtype: torch.dtype = torch.float32,
    report: str | os.PathLike | None = None,
) -> dict[str, float]:
    """COCO metrics of any checkpoint :func:`~deformable_detr.load_pretrained` reads on ``data``'s
    ``split`` (also under torchrun). ``data`` is a COCO, VOC or YOLO data set (``format`` forces one);
    images are resized as in validation to ``image_size``, by default the size the checkpoint was
    trained for. The model computes in ``dtype`` (:mod:`deformable_detr.precision`).

    Each batch of ``batch_size`` images is padded to its largest, and padding moves scores a little
    (docs/detect.md#batches-and-padding): by default the batch is the one the checkpoint's training
    evaluated with, per process (:data:`DEFAULT_BATCH_SIZE` where the file records no training), so
    that, run with as many processes, it gives the AP training reported.

    ``report`` is a folder to write the evaluation's report into (:func:`~deformable_detr.report.write_report`)."""
    if report is not None and Path(report).exists() and not Path(report).is_dir():
        raise ValueError(f"{report}: not a folder, so the report cannot go there")
    if batch_size is not None:
        check_count("batch_size", batch_size, at_least=1)
    check_count("workers", workers, at_least=0)
    if image_size is not None:
        check_count("image_size", image_size, at_least=1)
    check_dtype(dtype, setup_distributed())
    read = read_checkpoint(checkpoint)
    batch_size = _training_batch_size(read) if batch_size is None else batch_size
    dataset, checked = load_split(data, split, recipe(read.input_size if image_size is None else image_size)[1],
                                  format=format)
    checked.check_scorable(data)
    _check_classes(read.class_names, read.config.num_classes, checked, where=f"{data} ({split})", checkpoint=checkpoint)
    evaluation = checkpoint_evaluation(read, dataset, batch_size=batch_size, workers=workers, dtype=dtype)
    if report is not None:
        write_evaluation_report(evaluation, report, dataset, checkpoint=checkpoint, data=data, split=split)
    return metrics(evaluation)


def checkpoint_evaluation(
    checkpoint: Checkpoint, dataset: CocoDataset, *, batch_size: int, workers: int, dtype: torch.dtype = torch.float32,
) -> COCOeval_faster:
    """The COCO evaluation (:meth:`CocoEvaluator.evaluation`) of ``checkpoint`` on ``dataset`` as it is
    loaded, its category ids taken as the model's classes: :func:`evaluate_checkpoint`'s, once it has
    checked them, and that of a training run's ``best.pt`` on the split it evaluated every epoch."""
    device = setup_distributed()
    model = inference_model(checkpoint.build_model(device=device), dtype)
    loader = data_loader(dataset, batch_size=batch_size, train=False, workers=workers, seed=0, epoch=0)
    return detect_all(model, loader, device=device, coco=dataset.coco, dtype=dtype).evaluation()


def _training_batch_size(checkpoint: Checkpoint) -> int:
    """The batch per process that ``checkpoint``'s training evaluated with, where it records its
    training; else :data:`DEFAULT_BATCH_SIZE`."""
    return checkpoint.extra.get("train_config", {}).get("batch_size", DEFAULT_BATCH_SIZE)


def _check_classes(
    class_names: dict[int, str] | None, num_classes: int, split: SplitReport, *, where: str, checkpoint: str | os.PathLike,
) -> None:
    """Raise ValueError where the checkpoint's classes cannot be the data set's: COCO evaluation
    pairs them by id, so another numbering, or objects of a class the checkpoint does not name,
    score the model against classes it never learnt. (A class without objects scores nothing.)"""
    largest = max(split.class_names)
    if largest >= num_classes:
        raise ValueError(f"{checkpoint}: the model has {num_classes} classes, but {where}'s category ids go up to {largest}")
    if not class_names:  # a checkpoint that does not name its classes: only their number can be checked
        return
    for identifier, name in sorted(split.class_names.items()):
        known = class_names.get(identifier)
        if known is not None and class_key(known) != class_key(name):
            raise ValueError(f"{checkpoint}: class {identifier} is {known!r} there but {name!r} in {where}")
        objects = split.classes[identifier]
        if known is None and objects:
            raise ValueError(f"{checkpoint}: the model has no class {identifier}, but {where} has {objects} "
                             f"{name!r} object{'' if objects == 1 else 's'}")


def write_evaluation_report(
    evaluation: COCOeval_faster, folder: str | os.PathLike, dataset: CocoDataset, *, checkpoint: str | os.PathLike,
    data: str | os.PathLike, split: str,
) -> None:
    """Write the report of ``checkpoint``'s ``evaluation`` (:meth:`CocoEvaluator.evaluation`) on
    ``dataset``, ``data``'s ``split``, into ``folder`` (:func:`~deformable_detr.report.write_report`),
    from the main process alone."""
    if is_main_process():
        from .report import write_report  # matplotlib is loaded only to draw

        write_report(evaluation, folder, class_names=dataset.category_names, image_path=dataset.image_path,
                     title=f"{checkpoint} on {data} ({split})")


def format_metrics(record: dict[str, Any]) -> str:
    """The main COCO metrics of a log record on one line: ``AP 0.512  AP50 0.734 ...``."""
    return "  ".join(f"{key} {record[key]:.3f}" for key in METRICS[:6] if key in record)
