"""The three data set layouts, told apart by their files, each read by its own reader into a :class:`Split`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .coco import ROBOFLOW_ANNOTATIONS, DatasetError, Split, coco_splits, read_coco
from .images import ImageInfo, inspect_image
from .voc import read_voc, voc_splits
from .yolo import data_yaml, read_yolo, yolo_splits

FORMATS = ("coco", "voc", "yolo")


def detect_format(root: str | Path) -> str:
    """``"yolo"`` for a ``data.yaml`` (or a folder with one), ``"voc"`` for a folder with ``Annotations/``,
    ``"coco"`` for one with ``annotations/instances_<split>.json`` or ``<split>/_annotations.coco.json``."""
    root = Path(root)
    if data_yaml(root).is_file():
        return "yolo"
    if (root / "Annotations").is_dir():
        return "voc"
    if coco_splits(root):
        return "coco"
    if not root.exists():
        raise DatasetError(f"{root}: no such data folder")
    raise DatasetError(
        f"{root}: not a COCO, VOC or YOLO data set (no annotations/instances_<split>.json, "
        f"<split>/{ROBOFLOW_ANNOTATIONS}, Annotations/ or data.yaml)"
    )


def split_names(root: str | Path, format: str) -> list[str]:
    """The splits the data set ``root`` in ``format`` has."""
    check_format(format)
    if format == "coco":
        return coco_splits(root)
    if format == "voc":
        return voc_splits(root)
    return yolo_splits(root)


def read_split(
    root: str | Path, split: str, format: str | None = None, probe: Callable[[Path], ImageInfo] = inspect_image
) -> Split:
    """The split ``split`` of the data set ``root``, in ``format`` (detected when None). ``probe``
    gives image sizes to the formats whose annotations lack them."""
    format = format or detect_format(root)
    if format == "coco":
        return read_coco(root, split)
    if format == "voc":
        return read_voc(root, split, probe=probe)
    check_format(format)
    return read_yolo(root, split, probe)


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose from {', '.join(FORMATS)}")
