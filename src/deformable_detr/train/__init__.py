"""Training: Hungarian matching, the set-prediction loss, the optimiser recipe and the loop."""

from ..environment import native_bf16
from .criterion import SetCriterion, average_num_boxes
from .engine import TrainConfig, TrainingError, evaluate_checkpoint, train, train_step
from .matcher import HungarianMatcher
from .optim import build_lr_scheduler, build_optimizer, parameter_groups

__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "TrainConfig",
    "TrainingError",
    "average_num_boxes",
    "build_lr_scheduler",
    "build_optimizer",
    "evaluate_checkpoint",
    "native_bf16",
    "parameter_groups",
    "train",
    "train_step",
]
