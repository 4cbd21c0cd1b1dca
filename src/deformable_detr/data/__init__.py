"""Data: COCO-format data sets, the published augmentations, batching, synthetic shapes, VOC."""

from .coco import CocoDataset, DatasetError, coco_split, read_image
from .collate import collate
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import synthesize
from .transforms import inference_transforms, model_input, recipe, train_transforms, val_transforms
from .voc import VOC_CLASSES, voc_to_coco

__all__ = [
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "CocoDataset",
    "DatasetError",
    "coco_split",
    "collate",
    "inference_transforms",
    "model_input",
    "read_image",
    "recipe",
    "synthesize",
    "train_transforms",
    "val_transforms",
    "voc_to_coco",
]
