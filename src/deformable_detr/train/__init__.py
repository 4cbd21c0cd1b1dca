"""Training: Hungarian matching, the set-prediction loss, the optimiser recipe, one epoch and the run,
checkpoints within it and a clean stop on a signal."""

from ..environment import native_bf16
from .config import TrainConfig
from .criterion import SetCriterion, average_num_boxes
from .engine import TrainingError, train_step
from .loop import train
from .matcher import HungarianMatcher
from .optim import build_lr_scheduler, build_optimizer, parameter_groups
from .preemption import REQUEUE_STATUS, TrainingStopped

__all__ = [
    "HungarianMatcher",
    "REQUEUE_STATUS",
    "SetCriterion",
    "TrainConfig",
    "TrainingError",
    "TrainingStopped",
    "average_num_boxes",
    "build_lr_scheduler",
    "build_optimizer",
    "native_bf16",
    "parameter_groups",
    "train",
    "train_step",
]
