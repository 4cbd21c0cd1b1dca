"""The report of an evaluation: its numbers as JSON, its pictures, and ``report.md`` linking them all,
readable on GitHub as it is (docs/report.md says how to read it)."""

from __future__ import annotations

import html
import json
import os
import re
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from faster_coco_eval import COCOeval_faster

from ..evaluation import metrics
from ..files import atomic_write, remove_abandoned_writes
from .confusion import CONFUSION_IOU, confusion_matrix
from .errors import BACKGROUND_IOU, ERROR_KINDS, FOREGROUND_IOU, TRUE_POSITIVE, ErrorBreakdown, error_breakdown
from .figures import LabelledBox, confusion_figure, image_errors_figure, precision_recall_figure, save_figure
from .per_class import PER_CLASS_AP, per_class_metrics, precision_recall

SCORE_THRESHOLD = 0.5  # of the confusion matrix and the pictures: what `detect` draws by default
WORST_IMAGES = 6
BAR_WIDTH = 24  # characters of the error chart's longest bar


def write_report(
    evaluation: COCOeval_faster, out_dir: str | os.PathLike, *, class_names: Mapping[int, str],
    image_path: Callable[[int], str | os.PathLike], title: str, score_threshold: float = SCORE_THRESHOLD,
    worst_images: int = WORST_IMAGES,
) -> Path:
    """Write the report of ``evaluation`` (:meth:`~deformable_detr.evaluation.CocoEvaluator.evaluation`)
    into ``out_dir``; returns the path of its ``report.md``.

    ``class_names`` names the category ids, ``image_path`` gives an image id's file (to draw the
    ``worst_images`` images with the most errors), ``title`` says what was evaluated on what. The
    confusion matrix and the pictures count the detections scoring at least ``score_threshold``.
    """
    out = Path(out_dir)
    if out.is_dir():
        remove_abandoned_writes(out)  # a report killed while writing left them
    # Written last, it says the report is whole: an older one beside the new files would say it falsely.
    (out / "report.md").unlink(missing_ok=True)
    truth, detections = evaluation.cocoGt, evaluation.cocoDt
    image_ids = [int(image_id) for image_id in evaluation.params.imgIds]  # numpy integers after evaluate()
    names = {category: class_names.get(category, str(category)) for category in sorted(truth.cats)}
    headline = metrics(evaluation)
    classes = per_class_metrics(evaluation, names)
    errors = error_breakdown(truth, detections, image_ids)
    confusion = confusion_matrix(truth, detections, image_ids, score_threshold=score_threshold)

    _write_json(out / "per_class.json", {"metrics": headline, "classes": classes})
    _write_json(out / "errors.json", errors.to_json())
    _write_json(out / "confusion_matrix.json", {
        "iou": CONFUSION_IOU, "score_threshold": score_threshold, "rows": "true class", "columns": "predicted class",
        "classes": [*names.values(), "background"], "counts": confusion.tolist(),
    })
    recall, at_50 = precision_recall(evaluation, 0.5)
    _, averaged = precision_recall(evaluation, None)
    save_figure(precision_recall_figure(recall, [at_50, averaged], list(names.values()),
                                        ["IoU 0.5 (AP50)", "IoU 0.5:0.95 averaged (AP)"]), out / "pr_curves.png")
    save_figure(confusion_figure(confusion, list(names.values()),
                                 f"IoU ≥ {CONFUSION_IOU}, score ≥ {score_threshold}"), out / "confusion_matrix.png")
    pictures = _draw_worst_images(errors, evaluation, names, image_path, out / "worst_images", score_threshold,
                                  worst_images)

    text = _markdown(title, headline, classes, errors, len(image_ids), score_threshold, pictures, out)
    with atomic_write(out / "report.md") as temporary:
        temporary.write_text(text)
    return out / "report.md"


def escape(text: str) -> str:
    """``text`` shown literally in Markdown and in the HTML GitHub makes of it, on one line."""
    # Quotes need no escape in Markdown text; as entities, the backslash before their "#" would break them.
    text = html.escape(" ".join(str(text).split()), quote=False)
    return re.sub(r"([\\`*_{}\[\]()#+\-.!|~>])", r"\\\1", text)


def _write_json(path: Path, data: Any) -> None:
    with atomic_write(path) as temporary:
        temporary.write_text(json.dumps(data, indent=1) + "\n")


def _draw_worst_images(
    errors: ErrorBreakdown, evaluation: COCOeval_faster, names: Mapping[int, str],
    image_path: Callable[[int], str | os.PathLike], folder: Path, score_threshold: float, count: int,
) -> list[tuple[Path, int]]:
    """Draw the ``count`` images with the most errors at ``score_threshold`` into ``folder`` (emptied
    first: it holds only a report's pictures); returns each picture and its number of errors."""
    shown = {image_id: _image_boxes(errors, evaluation, names, image_id, score_threshold)
             for image_id in evaluation.params.imgIds}
    ranked = sorted((image_id for image_id in shown if shown[image_id][2]), key=lambda i: (-shown[i][2], i))
    shutil.rmtree(folder, ignore_errors=True)
    pictures = []
    for rank, image_id in enumerate(ranked[:count], start=1):
        objects, detections, error_count = shown[image_id]
        path = Path(image_path(image_id))
        figure = image_errors_figure(
            path, objects, detections, ("ground truth", f"detections scoring ≥ {score_threshold}"),
            f"{path.name}: {error_count} error(s)",
        )
        picture = folder / f"{rank}_{path.stem}.png"
        save_figure(figure, picture)
        pictures.append((picture, error_count))
    return pictures


def _image_boxes(
    errors: ErrorBreakdown, evaluation: COCOeval_faster, names: Mapping[int, str], image_id: int, score_threshold: float
) -> tuple[list[LabelledBox], list[LabelledBox], int]:
    """An image's objects and its detections scoring at least ``score_threshold``, labelled, and its
    errors: those detections' and its objects no true positive among them found."""
    detections = [
        d for d in evaluation.cocoDt.imgToAnns[image_id]
        if d["score"] >= score_threshold and d["id"] in errors.detection_kinds
    ]
    found = {errors.targets[d["id"]] for d in detections if errors.detection_kinds[d["id"]] == TRUE_POSITIVE}
    objects = [o for o in evaluation.cocoGt.imgToAnns[image_id] if not o.get("iscrowd", 0)]
    drawn_objects = [
        LabelledBox(o["bbox"], names[o["category_id"]], "object") if o["id"] in found
        else LabelledBox(o["bbox"], f"not found: {names[o['category_id']]}", "missed")
        for o in objects
    ]
    drawn_detections = []
    for d in detections:
        kind = errors.detection_kinds[d["id"]]
        label = f"{names[d['category_id']]} {d['score']:.2f}"
        drawn_detections.append(LabelledBox(d["bbox"], label if kind == TRUE_POSITIVE else f"{kind}: {label}", kind))
    error_count = sum(box.kind != TRUE_POSITIVE for box in drawn_detections) + len(objects) - len(found)
    return drawn_objects, drawn_detections, error_count


def _markdown(
    title: str, headline: dict[str, float], classes: list[dict[str, Any]], errors: ErrorBreakdown, images: int,
    score_threshold: float, pictures: list[tuple[Path, int]], out: Path,
) -> str:
    def number(value: float | None) -> str:
        return "–" if value is None or value < 0 else f"{value:.3f}"

    columns = [*PER_CLASS_AP, "AR100"]
    objects = sum(row["objects"] for row in classes)
    # Written as the table's "all" row writes them: COCO's -1 for a metric without objects is "–" there too.
    summary = "  ".join(f"{column} {number(headline[column])}" for column in columns)
    lines = [
        f"# Evaluation report: {escape(title)}", "",
        f"{images} images, {objects} objects, {len(classes)} classes. `{summary}`",
        "", "How to read it: docs/report.md in deformable-detr's documentation. The numbers: "
        "[per_class.json](per_class.json), [errors.json](errors.json), [confusion_matrix.json](confusion_matrix.json).",
        "",
        "## Per class", "",
        "From the evaluation that gives the AP above: the mean of the classes' AP, over those with objects, "
        "is the AP. – marks a metric without objects to score it on.", "",
        "| class | objects | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) + 1),
    ]
    for row in classes:
        lines.append(f"| {escape(row['name'])} | {row['objects']} | " + " | ".join(number(row[c]) for c in columns) + " |")
    lines.append(f"| **all** | **{objects}** | " + " | ".join(f"**{number(headline[c])}**" for c in columns) + " |")
    lines += ["", "## Precision and recall", "",
              "Precision at each recall level (COCO's interpolation), per class and over all classes; each curve's "
              "mean is its AP.", "", "![Precision-recall curves](pr_curves.png)", ""]
    lines += ["## Confusion matrix", "",
              f"Detections scoring at least {score_threshold}, matched to objects of any class at IoU >= "
              f"{CONFUSION_IOU}: rows the true class, columns the predicted one. The background row counts "
              "detections on nothing; the background column objects nothing found.", "",
              "![Confusion matrix](confusion_matrix.png)", ""]
    gains = [max(errors.ap_gains[kind], 0.0) for kind in ERROR_KINDS]
    longest = max(max(gains), 1e-12)
    lines += ["## Errors", "",
              f"TIDE's breakdown at AP50 {errors.ap50:.3f} (IoU >= {FOREGROUND_IOU} finds an object, < "
              f"{BACKGROUND_IOU} with every object is background): each kind's count over all detections, and the "
              "AP50 fixing that kind alone would add.", "",
              "| error | count | AP50 gain if fixed | |", "|---|---:|---:|---|"]
    for kind, gain in zip(ERROR_KINDS, gains):
        bar = "█" * round(BAR_WIDTH * gain / longest)
        lines.append(f"| {kind} | {errors.counts[kind]} | {errors.ap_gains[kind]:+.3f} | {bar} |")
    lines += ["", "## Images with the most errors", ""]
    if not pictures:
        lines.append(f"No image has an error among its detections scoring at least {score_threshold}.")
    else:
        lines += [f"Errors among the detections scoring at least {score_threshold}, labelled by kind, and the objects "
                  "no true positive among them found.", ""]
        for picture, error_count in pictures:
            link = quote(picture.relative_to(out).as_posix())  # a space, "#" or ")" in a file name would end it
            errors_found = f"{error_count} error{'' if error_count == 1 else 's'}"
            lines += [f"![{escape(picture.stem)}: {errors_found}]({link})", ""]
    return "\n".join(lines).rstrip() + "\n"
