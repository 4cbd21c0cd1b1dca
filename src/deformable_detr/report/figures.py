"""The report's pictures, drawn with matplotlib's object-oriented API on its Agg canvas: no display,
no pyplot state shared between calls."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from ..data import as_rgb
from ..files import atomic_write

# A legend with more classes than this would hide the curves: the curves are drawn without names.
MOST_NAMED_CURVES = 12
# Above this many classes (Pascal VOC's 20), a confusion matrix's cells are too small for their counts
# (and its labels are set small); it grows with the classes up to LARGEST_MATRIX inches (COCO's 80
# fit at 1,500 pixels).
MOST_COUNTED_CLASSES = 20
LARGEST_MATRIX = 15.0
# The longest class name a confusion matrix's ticks show whole (per_class.json has them all).
LONGEST_LABEL = 32
KIND_COLOURS = {
    "true positive": "#2ca02c", "classification": "#d62728", "localisation": "#ff7f0e", "both": "#9467bd",
    "duplicate": "#e377c2", "background": "#8c564b", "missed": "#d62728", "object": "#ffffff",
}


@dataclass
class LabelledBox:
    """A box to draw: absolute (x, y, w, h) pixels, its text and its kind (:data:`KIND_COLOURS`)."""

    bbox: Sequence[float]
    text: str
    kind: str


def new_figure(width: float, height: float, *, constrained: bool = True) -> Figure:
    """A figure of ``width`` x ``height`` inches at 100 pixels an inch, on an Agg canvas. Constrained
    layout fits the panels around their labels; it costs about as much as drawing them, so a figure
    drawn often (the training curves) sets its margins itself."""
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained" if constrained else None)
    FigureCanvasAgg(figure)
    return figure


def save_figure(figure: Figure, path: str | os.PathLike) -> None:
    """Write ``figure`` as a PNG, whole or not at all."""
    with atomic_write(path) as temporary:
        figure.savefig(temporary, format="png")


def plain(text: str) -> str:
    """``text`` as matplotlib shows it literally: ``$`` would start mathematics."""
    return text.replace("$", r"\$")


def _shortened(name: str) -> str:
    """``name`` cut to LONGEST_LABEL characters: longer tick labels leave the matrix no room."""
    return name if len(name) <= LONGEST_LABEL else name[: LONGEST_LABEL - 1] + "…"


def precision_recall_figure(
    recall: np.ndarray, curves: Sequence[np.ndarray], names: Sequence[str], titles: Sequence[str]
) -> Figure:
    """One panel per entry of ``curves`` ((K, R) precision of each class at the recall levels
    ``recall``, -1 for a class without objects, titled by ``titles``): a line per class, named with
    its area where there are few, and the mean over the classes with objects in black."""
    figure = new_figure(6 * len(curves), 5)
    for axes, precision, title in zip(figure.subplots(1, len(curves), squeeze=False)[0], curves, titles):
        defined = (precision > -1).all(axis=1)
        named = defined.sum() <= MOST_NAMED_CURVES
        for curve, name in zip(precision[defined], np.asarray(names, dtype=object)[defined]):
            label = f"{plain(name)} ({curve.mean():.3f})" if named else None
            axes.plot(recall, curve, linewidth=1.2, alpha=0.9 if named else 0.35, label=label)
        if defined.any():
            mean = precision[defined].mean(axis=0)
            axes.plot(recall, mean, color="black", linewidth=2.5, label=f"all classes ({mean.mean():.3f})")
        axes.set(title=title, xlabel="recall", ylabel="precision", xlim=(0, 1), ylim=(0, 1.02))
        axes.grid(alpha=0.3)
        axes.legend(loc="best", fontsize="small", title="class (AP)", title_fontsize="small")
    return figure


def confusion_figure(counts: np.ndarray, names: Sequence[str], title: str) -> Figure:
    """``counts`` ((K + 1)², rows true, columns predicted, background last) coloured by the share of
    each row, with the counts written in the cells where they fit."""
    labels = [plain(_shortened(name)) for name in names] + ["background"]
    size = min(max(5.0, 0.45 * len(labels) + 2.5), LARGEST_MATRIX)
    figure = new_figure(size + 1, size)
    axes = figure.subplots()
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    image = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the row")
    counted = len(names) <= MOST_COUNTED_CLASSES
    if counted:
        for (row, column), count in np.ndenumerate(counts):
            if count:
                colour = "white" if shares[row, column] > 0.5 else "black"
                axes.text(column, row, str(count), ha="center", va="center", color=colour, fontsize="small")
    ticks, fontsize = np.arange(len(labels)), "medium" if counted else "xx-small"
    axes.set_xticks(ticks, labels, rotation=45 if counted else 90, ha="right", rotation_mode="anchor",
                    fontsize=fontsize)
    axes.set_yticks(ticks, labels, fontsize=fontsize)
    axes.set(xlabel="predicted class", ylabel="true class", title=title)
    return figure


def image_errors_figure(
    image_path: str | os.PathLike, objects: Sequence[LabelledBox], detections: Sequence[LabelledBox],
    titles: tuple[str, str], suptitle: str,
) -> Figure:
    """The image twice, side by side: its objects on the left, the detections on the right, each box
    in its kind's colour with its text on a label."""
    with Image.open(image_path) as opened:
        picture = np.asarray(as_rgb(opened))
    height, width = picture.shape[:2]
    panel = 5.0  # inches of the longer side
    scale = panel / max(height, width)
    figure = new_figure(2 * width * scale + 0.4, height * scale + 0.7)
    for axes, boxes, title in zip(figure.subplots(1, 2), (objects, detections), titles):
        axes.imshow(picture)
        axes.set_title(title, fontsize="medium")
        axes.set_axis_off()
        for box in boxes:
            x, y, w, h = box.bbox
            colour = KIND_COLOURS[box.kind]
            axes.add_patch(Rectangle((x, y), w, h, fill=False, edgecolor=colour, linewidth=2))
            # Inside the box's top and cut at the panel's edge, as detect draws them: above it, a
            # label on an object at the image's top or right ran over the title and the next panel.
            axes.text(x, y, plain(box.text), fontsize=7, color="black", va="top", clip_on=True,
                      bbox={"facecolor": colour, "edgecolor": "none", "pad": 1, "alpha": 0.85})
    figure.suptitle(plain(suptitle), fontsize="medium")
    return figure
