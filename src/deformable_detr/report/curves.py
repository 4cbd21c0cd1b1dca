"""Training curves: every loss term and AP / AP50 of a run's ``log.jsonl``, against epochs and
against training minutes, the best epoch marked."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from matplotlib.ticker import MaxNLocator

from .figures import new_figure, save_figure

# Loss terms by their base name: the last decoder layer's is ``train_<base>``; the other decoder
# layers', the encoder's proposals' and the denoising queries' add a suffix (``train_<base>_0``).
LOSS_TERMS = {"loss_ce": "classification", "loss_bbox": "box L1", "loss_giou": "box GIoU"}


def write_training_curves(log_path: str | os.PathLike, out: str | os.PathLike) -> None:
    """Draw the curves of the run logged in ``log_path`` (``log.jsonl``) into the PNG ``out``."""
    records = [json.loads(line) for line in Path(log_path).read_text().splitlines()]
    if not records:
        raise ValueError(f"{log_path}: no epoch logged yet")
    evaluated = [record for record in records if "AP" in record]
    best = max(evaluated, key=lambda record: record["AP"]) if evaluated else None
    panels = [("total loss (weighted)", "train_loss", [])]
    for base, title in LOSS_TERMS.items():
        key = f"train_{base}"
        panels.append((title, key, sorted(name for name in records[-1] if name.startswith(key + "_"))))
    figure = new_figure(11, 2.3 * (len(panels) + bool(evaluated)) + 0.6)
    grid = figure.subplots(len(panels) + bool(evaluated), 2, sharex="col", squeeze=False)
    for column, (axis, label) in enumerate((("epochs", "epochs trained"), ("minutes", "training minutes"))):
        x = [_position(record, axis) for record in records]
        for axes, (title, key, others) in zip(grid[:, column], panels):
            for other in others:  # earlier layers, encoder proposals, denoising queries: thin, behind
                axes.plot(x, [record.get(other) for record in records], color="0.75", linewidth=0.8)
            axes.plot(x, [record.get(key) for record in records], marker="o", markersize=3, color="C0")
            axes.set_title(title + (f": last layer, {len(others)} other terms in grey" if others else ""),
                           fontsize="medium")
        if best is not None:
            axes = grid[-1, column]
            x = [_position(record, axis) for record in evaluated]
            for key, colour in (("AP", "C3"), ("AP50", "C1")):
                axes.plot(x, [record[key] for record in evaluated], marker="o", markersize=3, color=colour, label=key)
            axes.set(title="validation COCO AP", ylim=(0, 1))
            for axes in grid[:, column]:
                axes.axvline(_position(best, axis), color="C3", linestyle="--", linewidth=1,
                             label=f"best: after {best['epoch'] + 1} epochs, AP {best['AP']:.3f}")
            grid[-1, column].legend(loc="upper left", fontsize="small")
        grid[-1, column].set_xlabel(label)
        if axis == "epochs":
            grid[-1, column].xaxis.set_major_locator(MaxNLocator(integer=True))
        for axes in grid[:, column]:
            axes.grid(alpha=0.3)
    save_figure(figure, out)


def _position(record: dict[str, Any], axis: str) -> float:
    """Where ``record`` goes on the axis of epochs trained or of training minutes."""
    return record["training_minutes"] if axis == "minutes" else record["epoch"] + 1
