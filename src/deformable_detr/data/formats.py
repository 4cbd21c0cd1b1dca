"""The three data set layouts, told apart by their files, each read by its own reader into a :class:`Split`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from .coco import ROBOFLOW_ANNOTATIONS, DatasetError, Split, coco_splits, read_coco
from .images import ImageInfo, inspect_image
from .voc import read_voc, voc_splits
from .yolo import data_yaml, is_data_yaml, read_yolo, yolo_splits

FORMATS = ("coco", "voc", "yolo")
_SPLITS_OF = {"coco": coco_splits, "voc": voc_splits, "yolo": yolo_splits}  # each format's splits of a data set
# Where each format names its splits, for the line that says a data set has none.
_WHERE_SPLITS_ARE = {
    "coco": f"annotations/instances_<split>.json or <split>/{ROBOFLOW_ANNOTATIONS}",
    "voc": "ImageSets/Main/<split>.txt",
    "yolo": "train, val or test images in data.yaml",
}


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
        f"<split>/{ROBOFLOW_ANNOTATIONS}, Annotations/ or data.yaml){_other_yaml_hint(root)}"
    )


def _other_yaml_hint(root: Path) -> str:
    """Where the folder ``root`` holds a YOLO data file of another name, how to give it: Ultralytics
    names them after the data set (``coco8.yaml``), beside others (``args.yaml``), and only
    ``data.yaml`` is looked for in a folder."""
    found = sorted(path for pattern in ("*.yaml", "*.yml") for path in root.glob(pattern) if is_data_yaml(path))
    return f"; for a YOLO data file of another name, give the file: {found[0]}" if found else ""


def split_names(root: str | Path, format: str) -> list[str]:
    """The splits the data set ``root`` in ``format`` has.

    Raises:
        DatasetError: it has none in that format (a data set of another format, most often).
    """
    check_format(format)
    names = _SPLITS_OF[format](root)
    if not names:
        raise DatasetError(f"{root}: no {format.upper()} splits (no {_WHERE_SPLITS_ARE[format]})")
    return names


def read_split(
    root: str | Path, split: str, format: str | None = None, probe: Callable[[Path], ImageInfo] = inspect_image
) -> Split:
    """The split ``split`` of the data set ``root``, in ``format`` (detected when None). ``probe``
    gives image sizes to the formats whose annotations lack them.

    Raises:
        DatasetError: the data set has no such split (the line names those it has), or it cannot be read.
    """
    format = format or detect_format(root)
    require_split(root, split, format)
    if format == "coco":
        return read_coco(root, split)
    if format == "voc":
        return read_voc(root, split, probe=probe)
    return read_yolo(root, split, probe)


def require_split(root: str | Path, split: str, format: str) -> None:
    """Raise DatasetError, naming the splits the data set ``root`` in ``format`` has, where ``split``
    is not one of them."""
    names = split_names(root, format)
    if split not in names:
        raise DatasetError(f"{root}: no {split!r} split (it has {', '.join(map(repr, names))})")


def check_format(format: str) -> None:
    if format not in FORMATS:
        raise ValueError(f"unknown data format {format!r}; choose from {', '.join(FORMATS)}")
