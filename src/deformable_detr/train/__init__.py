"""Training: Hungarian matching, the set-prediction loss, the optimiser recipe, one epoch and the run."""

from ..environment import native_bf16
from .config import TrainConfig
from .criterion import SetCriterion, average_num_boxes
from .engine import TrainingError, train_step
from .loop import train
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
    "native_bf16",
    "parameter_groups",
    "train",
    "train_step",
]
