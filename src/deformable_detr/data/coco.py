"""COCO-format detection data sets: an image folder plus an instances JSON file.

Annotations are checked when the data set is built, so a bad file fails before training starts,
with one line naming the file and the problem (:class:`DatasetError`). Only a corrupt image can
fail later, when it is read; that error names the image.

Targets follow the reference: crowd boxes are dropped (COCO evaluation ignores them), boxes are
clipped to the image and dropped when nothing is left, and labels are the category ids themselves,
so ``num_classes`` is the largest id + 1 (91 for COCO). Images with no annotations, or none left,
are kept as negatives: their targets hold no boxes and teach the model to predict "no object".
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from .transforms import model_input

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


class DatasetError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise DatasetError(f"{path}: annotation file not found")
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DatasetError(f"{path}: not valid JSON ({error})") from None
    missing = [key for key in ("images", "annotations", "categories") if not isinstance(data, dict) or key not in data]
    if missing:
        raise DatasetError(f"{path}: not a COCO instances file (no {', '.join(repr(key) for key in missing)})")
    return data


def _validate(data: dict[str, Any], path: Path) -> None:
    """Raise on the first entry that would make training or evaluation wrong."""

    def fail(problem: str) -> None:
        raise DatasetError(f"{path}: {problem}")

    category_ids = set()
    for category in data["categories"]:
        identifier = category.get("id") if isinstance(category, dict) else None
        if not isinstance(identifier, int) or isinstance(identifier, bool) or identifier < 0:
            fail(f"category {category!r} has no id that is a non-negative integer")
        category_ids.add(identifier)
    if not category_ids:
        fail("declares no categories")

    image_ids = set()
    for image in data["images"]:
        if not isinstance(image, dict) or any(key not in image for key in ("id", "file_name", "width", "height")):
            fail(f"image entry {image!r} needs 'id', 'file_name', 'width' and 'height'")
        if image["id"] in image_ids:
            fail(f"image id {image['id']} appears twice")
        image_ids.add(image["id"])

    for annotation in data["annotations"]:
        if not isinstance(annotation, dict) or any(k not in annotation for k in ("image_id", "category_id", "bbox")):
            fail(f"annotation {annotation!r} needs 'image_id', 'category_id' and 'bbox'")
        name = f"annotation {annotation.get('id', '?')} (image {annotation['image_id']})"
        box = annotation["bbox"]
        if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
            fail(f"{name}: bbox {box!r} is not [x, y, width, height]")
        if not all(math.isfinite(v) for v in box):
            fail(f"{name}: bbox {box!r} is not finite")
        if box[2] < 0 or box[3] < 0:
            fail(f"{name}: bbox {box!r} has a negative width or height")
        if annotation["image_id"] not in image_ids:
            fail(f"{name}: no image with that id")
        if annotation["category_id"] not in category_ids:
            fail(f"{name}: category id {annotation['category_id']!r} is not among the declared categories")


def coco_index(data: dict[str, Any]) -> COCO:
    """A pycocotools index over already-loaded data (which it would otherwise print about)."""
    coco = COCO()
    coco.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class CocoDataset(Dataset):
    """Detection samples from ``image_dir`` and the COCO instances file ``annotation_file``.

    Each item is ``(image, target)``: a normalised float (3, H, W) image and a dict with ``boxes``
    (K, 4) normalised (cx, cy, w, h), ``labels`` (K,) int64 category ids, ``image_id`` (0-d
    int64), ``orig_size`` and ``size`` (h, w) int64 before and after the transforms.

    ``transforms`` take and return ``(image, target)`` with tv_tensors and must end with
    :func:`~deformable_detr.data.transforms.model_input`, as ``train_transforms()`` and
    ``val_transforms()`` do; the default is ``model_input()`` alone (no resizing).

    ``coco`` is the pycocotools index of the annotations, for COCO evaluation.
    """

    def __init__(
        self, image_dir: str | Path, annotation_file: str | Path, transforms: Transforms | None = None
    ) -> None:
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        data = _read_json(self.annotation_file)
        _validate(data, self.annotation_file)
        self.coco = coco_index(data)
        self.ids = sorted(self.coco.imgs)
        self.category_names = {c["id"]: c.get("name", str(c["id"])) for c in data["categories"]}
        self.num_classes = max(self.category_names) + 1
        self.transforms = transforms if transforms is not None else model_input()
        missing = [self.image_path(i) for i in self.ids if not self.image_path(i).is_file()]
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise DatasetError(f"{missing[0]}: image file not found{more}, listed in {self.annotation_file}")

    def image_path(self, image_id: int) -> Path:
        return self.image_dir / self.coco.imgs[image_id]["file_name"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Tensor, dict[str, Any]]:
        image_id = self.ids[index]
        info = self.coco.imgs[image_id]
        image = self._read_image(image_id)
        height, width = info["height"], info["width"]

        annotations = [a for a in self.coco.imgToAnns[image_id] if not a.get("iscrowd", 0)]
        boxes = torch.tensor([a["bbox"] for a in annotations], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]  # (x, y, w, h) -> (x1, y1, x2, y2)
        boxes[:, 0::2].clamp_(0, width)
        boxes[:, 1::2].clamp_(0, height)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        target = {
            "boxes": tv_tensors.BoundingBoxes(boxes[keep], format="XYXY", canvas_size=(height, width)),
            "labels": torch.tensor([a["category_id"] for a in annotations], dtype=torch.int64)[keep],
            "image_id": torch.tensor(image_id, dtype=torch.int64),
            "orig_size": torch.tensor([height, width], dtype=torch.int64),
        }
        return self.transforms(image, target)

    def _read_image(self, image_id: int) -> tv_tensors.Image:
        path = self.image_path(image_id)
        image = read_image(path)
        info = self.coco.imgs[image_id]
        if tuple(image.shape[-2:]) != (info["height"], info["width"]):
            # The boxes are in the annotated size; another size (e.g. an EXIF-rotated copy) misplaces them.
            raise DatasetError(
                f"{path}: image is {image.shape[-1]}x{image.shape[-2]} but "
                f"{self.annotation_file.name} says {info['width']}x{info['height']}"
            )
        return image


def read_image(path: str | Path) -> tv_tensors.Image:
    """The image at ``path`` as uint8 RGB (3, H, W), in its stored orientation (as COCO's boxes are).

    Raises:
        DatasetError: naming the file, when it is missing or not a readable image.
    """
    try:
        with Image.open(path) as file:
            return tv_tensors.Image(file.convert("RGB"))
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: cannot read image (not an image format Pillow knows)") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read image ({error})") from None


def coco_split(root: str | Path, split: str, transforms: Transforms | None = None) -> CocoDataset:
    """The split laid out as COCO is: ``root/<split>/`` images and
    ``root/annotations/instances_<split>.json`` (``split="val2017"`` for COCO, ``"val"`` for
    :func:`~deformable_detr.data.synthetic.synthesize`)."""
    root = Path(root)
    return CocoDataset(root / split, root / "annotations" / f"instances_{split}.json", transforms)
