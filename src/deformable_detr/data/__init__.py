"""Data: COCO, Pascal VOC and YOLO data sets read into one dataset type, the data check, the published
augmentations, batching, synthetic shapes."""

from .check import DataReport, SplitReport, check_data, check_same_classes, coco_split, load_split
from .coco import CocoDataset, DatasetError, Problem, Split, read_coco, read_image
from .collate import collate
from .formats import FORMATS, detect_format, read_split, split_names
from .images import IMAGE_SUFFIXES, ImageProbe, as_rgb, inspect_image, turned_upright
from .loader import Loader, batches_per_epoch, data_loader
from .synthetic import CLASSES as SYNTHETIC_CLASSES
from .synthetic import synthesize
from .transforms import inference_transforms, model_input, recipe, train_transforms, val_transforms
from .voc import VOC_CLASSES, read_voc, voc_to_coco
from .yolo import read_yolo

__all__ = [
    "FORMATS",
    "IMAGE_SUFFIXES",
    "SYNTHETIC_CLASSES",
    "VOC_CLASSES",
    "CocoDataset",
    "DataReport",
    "DatasetError",
    "ImageProbe",
    "Loader",
    "Problem",
    "Split",
    "SplitReport",
    "as_rgb",
    "batches_per_epoch",
    "check_data",
    "check_same_classes",
    "coco_split",
    "collate",
    "data_loader",
    "detect_format",
    "inference_transforms",
    "inspect_image",
    "load_split",
    "model_input",
    "read_coco",
    "read_image",
    "read_split",
    "read_voc",
    "read_yolo",
    "recipe",
    "split_names",
    "synthesize",
    "train_transforms",
    "turned_upright",
    "val_transforms",
    "voc_to_coco",
]
