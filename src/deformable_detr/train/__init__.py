"""Training: Hungarian matching, the set-prediction loss and the optimiser recipe."""

from .criterion import SetCriterion, average_num_boxes
from .matcher import HungarianMatcher
from .optim import build_lr_scheduler, build_optimizer, parameter_groups

__all__ = [
    "HungarianMatcher",
    "SetCriterion",
    "average_num_boxes",
    "build_lr_scheduler",
    "build_optimizer",
    "parameter_groups",
]
