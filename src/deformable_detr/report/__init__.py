"""What an evaluation shows a person: the per-class table, precision-recall curves, the confusion
matrix, the error breakdown and the images with the most errors (:func:`write_report`), and a
run's training curves (:func:`write_training_curves`). Every number is read from COCO's evaluation
and matching (faster-coco-eval's); the pictures are matplotlib's."""

from .curves import write_training_curves
from .document import write_report

__all__ = ["write_report", "write_training_curves"]
