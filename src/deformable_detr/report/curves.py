"""Training curves: every loss term and AP / AP50 of a run's ``log.jsonl``, against epochs and
against training minutes, the best epoch marked."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from .figures import new_figure, save_figure

# Loss terms by their base name: the last decoder layer's is ``train_<base>``; the other decoder
# layers', the encoder's proposals' and the denoising queries' add a suffix (``train_<base>_0``).
LOSS_TERMS = {"loss_ce": "classification", "loss_bbox": "box L1", "loss_giou": "box GIoU"}
X_AXES = {"epochs": "epochs trained", "minutes": "training minutes"}
X_TICKS = 7  # intervals at most on each x axis, of 1, 2 or 5 times a power of ten


def write_training_curves(log_path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Draw the curves of the run logged in ``log_path`` (``log.jsonl``) into the PNG ``out``: a
    column against epochs and one against training minutes, a row per loss and one of the validation
    AP, the best epoch (``best.pt``'s) marked by a dashed line."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    if not records:
        raise ValueError(f"{log_path}: no epoch logged yet")
    evaluated = [record for record in records if "AP" in record]
    panels = [("total loss (weighted)", "train_loss", [])]
    for base, title in LOSS_TERMS.items():
        key = f"train_{base}"
        panels.append((title, key, sorted(name for name in records[-1] if name.startswith(key + "_"))))
    rows = len(panels) + bool(evaluated)
    height = 2.3 * rows + 0.6
    figure = new_figure(11, height, constrained=False)
    # The right margin holds half the widest tick label: a tick at the axis' end is centred on it.
    figure.subplots_adjust(left=0.06, right=0.97, top=1 - 0.35 / height, bottom=0.55 / height, hspace=0.38, wspace=0.12)
    grid = figure.subplots(rows, 2, sharex="col", squeeze=False)
    for column, axis in zip(grid.T, X_AXES):
        for axes, (title, key, others) in zip(column, panels):
            _draw_loss(axes, records, axis, title, key, others)
        if evaluated:
            _draw_ap(column, evaluated, axis)
        column[-1].set_xlabel(X_AXES[axis])
        # Few ticks: a short run's minutes (0.0225, 0.0250, ...) would run into each other at the default ten.
        column[-1].xaxis.set_major_locator(MaxNLocator(nbins=X_TICKS, steps=[1, 2, 5, 10], integer=axis == "epochs"))
        for axes in column:
            axes.grid(alpha=0.3)
    save_figure(figure, out)


def _draw_loss(axes: Axes, records: list[dict[str, Any]], axis: str, title: str, key: str, others: list[str]) -> None:
    x = [_position(record, axis) for record in records]
    for other in others:  # earlier layers, encoder proposals, denoising queries: thin, behind
        axes.plot(x, [record.get(other) for record in records], color="0.75", linewidth=0.8)
    axes.plot(x, [record.get(key) for record in records], marker="o", markersize=3, color="C0")
    axes.set_title(title + (f": last layer, {len(others)} other terms in grey" if others else ""), fontsize="medium")


def _draw_ap(column: Sequence[Axes], evaluated: list[dict[str, Any]], axis: str) -> None:
    """AP and AP50 in the column's last panel (with --ema the average's, and the raw weights' AP
    beside), the best epoch marked in all of them."""
    x = [_position(record, axis) for record in evaluated]
    for key, colour in (("AP", "C3"), ("AP50", "C1")):
        column[-1].plot(x, [record[key] for record in evaluated], marker="o", markersize=3, color=colour, label=key)
    if "raw_AP" in evaluated[0]:
        column[-1].plot(x, [record["raw_AP"] for record in evaluated], linestyle=":", marker="o", markersize=2,
                        color="C3", label="AP of the raw weights")
    column[-1].set_ylim(0, 1)
    column[-1].set_title("validation COCO AP", fontsize="medium")  # as the loss panels above it
    best = max(evaluated, key=lambda record: record["AP"])
    epochs = _position(best, "epochs")
    trained = f"{epochs:.3g} epoch{'' if epochs == 1 else 's'}"
    for axes in column:
        axes.axvline(_position(best, axis), color="C3", linestyle="--", linewidth=1,
                     label=f"best: after {trained}, AP {best['AP']:.3f}")
    column[-1].legend(loc="upper left", fontsize="small")


def _position(record: dict[str, Any], axis: str) -> float:
    """Where ``record`` goes on the axis of epochs trained or of training minutes."""
    if axis == "minutes":
        return record["training_minutes"]
    # An epoch the time budget cut short counts its share of batches trained.
    return record["epoch"] + (record["batches"] / record["epoch_batches"] if "batches" in record else 1)
