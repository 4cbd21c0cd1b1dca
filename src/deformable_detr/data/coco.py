"""COCO-format detection data sets: an image folder plus an instances JSON file.

COCO instances data is also what every format's reader returns (a :class:`Split`, with the
:class:`Problem` s it found), and :class:`CocoDataset` the one dataset type they all become.

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
import dataclasses
import io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image, UnidentifiedImageError
from pycocotools.coco import COCO
from torch import Tensor
from torch.utils.data import Dataset
from torchvision import tv_tensors

from ..checks import is_whole_number
from .images import EXIF_TURNS, SIDEWAYS_TURNS, as_rgb
from .transforms import model_input

Transforms = Callable[[tv_tensors.Image, dict[str, Any]], tuple[Tensor, dict[str, Any]]]


# Roboflow's COCO export: this file in each split's folder, beside its images.
ROBOFLOW_ANNOTATIONS = "_annotations.coco.json"
# The fields training reads of each image and annotation entry (an annotation with only a segmentation
# has no box to train on).
_IMAGE_FIELDS = ("id", "file_name", "width", "height")
_ANNOTATION_FIELDS = ("image_id", "category_id", "bbox")


class DatasetError(ValueError):
    """A data file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class Problem:
    """Something wrong in a data set, found by :func:`~deformable_detr.data.check_data` or a reader."""

    text: str  # one line, starting with the file to fix
    fatal: bool = True  # it would stop training; otherwise the data set works around it

    def __str__(self) -> str:
        return self.text


@dataclass
class Split:
    """One split of a data set, whatever its format, as COCO instances data: what every reader returns.

    Image entries may carry a ``source`` (the annotation file they come from, for VOC and YOLO) and
    annotations a ``source`` naming their file and line; the COCO entries are named by ``annotation_file``.
    """

    name: str
    image_dir: Path  # image "file_name"s are relative to it
    annotation_file: Path  # the instances JSON, the VOC Annotations folder, the YOLO data.yaml
    data: dict[str, Any]  # "images", "annotations", "categories"
    problems: list[Problem] = dataclasses.field(default_factory=list)  # found while reading


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


def coco_problems(data: dict[str, Any], path: Path) -> list[Problem]:
    """Every entry of the instances ``data`` (read from ``path``) that would make training or evaluation
    wrong. The entries at fault are removed from ``data``, so that what is left can be counted."""
    problems = []

    def keep(entries: list, problem_of: Callable[[Any], str | None]) -> list:
        kept = []
        for entry in entries:
            problem = problem_of(entry)
            if problem is None:
                kept.append(entry)
            else:
                problems.append(Problem(f"{path}: {problem}"))
        return kept

    seen_categories: set[int] = set()
    data["categories"] = keep(data["categories"], lambda category: _category_problem(category, seen_categories))
    if not data["categories"]:
        problems.append(Problem(f"{path}: declares no categories"))
    seen_images: set[int] = set()
    data["images"] = keep(data["images"], lambda image: _image_problem(image, seen_images))
    image_ids = {image["id"] for image in data["images"]}
    category_ids = {category["id"] for category in data["categories"]}
    data["annotations"] = keep(data["annotations"], lambda entry: _annotation_problem(entry, image_ids, category_ids))
    return problems


def _category_problem(category: Any, seen: set[int]) -> str | None:
    identifier = category.get("id") if isinstance(category, dict) else None
    if not is_whole_number(identifier) or identifier < 0:
        return f"category {category!r} has no id that is a non-negative integer"
    if identifier in seen:  # the later name would silently replace the earlier one
        return f"category id {identifier} appears twice"
    seen.add(identifier)
    return None


def _image_problem(image: Any, seen: set[int]) -> str | None:
    if not isinstance(image, dict):
        return f"image entry {image!r} is not a JSON object"
    missing = _missing_fields(image, _IMAGE_FIELDS, "an image entry")
    if missing is not None:
        return f"image {image.get('id', '?')} {missing}"
    if not is_whole_number(image["id"]):
        return f"image id {image['id']!r} is not an integer"
    if image["id"] in seen:
        return f"image id {image['id']} appears twice"
    seen.add(image["id"])
    if not isinstance(image["file_name"], str) or not image["file_name"]:
        return f"image {image['id']}: file_name {image['file_name']!r} is not a file name"
    for field in ("width", "height"):
        if not _is_size(image[field]):
            return f"image {image['id']}: {field} {image[field]!r} is not a positive whole number"
    return None


def _missing_fields(entry: dict[str, Any], fields: tuple[str, ...], kind: str) -> str | None:
    """What ``entry`` lacks of the ``fields`` every ``kind`` needs, or None. The entry itself is not
    shown: an annotation's segmentation alone can be thousands of numbers."""
    missing = [field for field in fields if field not in entry]
    if not missing:
        return None
    return f"has no {_quoted(missing, 'or')} ({kind} needs {_quoted(fields, 'and')})"


def _quoted(names: list[str] | tuple[str, ...], conjunction: str) -> str:
    """``'a', 'b' and 'c'``."""
    quoted = [repr(name) for name in names]
    return quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} {conjunction} {quoted[-1]}"


def _is_size(value: Any) -> bool:
    """Whether ``value`` is a size in pixels: a positive whole number, also as a float (some writers
    give every number a decimal point)."""
    if isinstance(value, float):
        return value > 0 and value.is_integer()
    return is_whole_number(value) and value > 0


def _annotation_problem(annotation: Any, image_ids: set[int], category_ids: set[int]) -> str | None:
    if not isinstance(annotation, dict):
        return f"annotation {annotation!r} is not a JSON object"
    name = f"annotation {annotation.get('id', '?')} (image {annotation.get('image_id', '?')})"
    missing = _missing_fields(annotation, _ANNOTATION_FIELDS, "an annotation")
    if missing is not None:
        return f"{name} {missing}"
    box = annotation["bbox"]
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
        return f"{name}: bbox {box!r} is not [x, y, width, height]"
    if not all(math.isfinite(v) for v in box):
        return f"{name}: bbox {box!r} is not finite"
    if box[2] < 0 or box[3] < 0:
        return f"{name}: bbox {box!r} has a negative width or height"
    if not is_whole_number(annotation["image_id"]) or annotation["image_id"] not in image_ids:
        return f"{name}: no image with that id"
    if not is_whole_number(annotation["category_id"]) or annotation["category_id"] not in category_ids:
        return f"{name}: category id {annotation['category_id']!r} is not among the declared categories"
    if not _is_crowd_flag(annotation.get("iscrowd", 0)):
        return f"{name}: iscrowd {annotation['iscrowd']!r} is not 0 or 1"
    return None


def _is_crowd_flag(value: Any) -> bool:
    """Whether ``value`` is an ``iscrowd`` of 0 or 1, also as a float. Readers take anything else by its
    truth, "0" as crowd: an object left out of training and of the scores."""
    return (is_whole_number(value) or isinstance(value, float)) and value in (0, 1)


def read_coco(root: str | Path, split: str) -> Split:
    """The split of a COCO data set: ``root/annotations/instances_<split>.json`` with the images in
    ``root/<split>/`` (COCO's layout) or ``root/images/<split>/`` (CVAT's and Datumaro's), or, where
    there is no such file at all, ``root/<split>/_annotations.coco.json`` with the images beside it
    (Roboflow's, whose ``valid/`` is the split ``val``).

    Raises:
        DatasetError: when the file is missing or not COCO instances JSON at all.
    """
    root = Path(root)
    roboflow = {} if _instances_files(root) else _roboflow_splits(root)
    if roboflow:
        image_dir = roboflow.get(split, root / split)
        path = image_dir / ROBOFLOW_ANNOTATIONS
    else:
        folders = (root / split, root / "images" / split)
        image_dir = next((folder for folder in folders if folder.is_dir()), folders[0])
        path = root / "annotations" / f"instances_{split}.json"
    data = _read_json(path)
    problems = coco_problems(data, path)
    _leave_out_grouping_categories(data)
    return Split(split, image_dir, path, data, problems)


def coco_splits(root: str | Path) -> list[str]:
    """The splits of the COCO data set ``root`` (see :func:`read_coco`); none where it is not one."""
    root = Path(root)
    instances = _instances_files(root)
    if instances:
        return [path.stem.removeprefix("instances_") for path in instances]
    return sorted(_roboflow_splits(root))


def _instances_files(root: Path) -> list[Path]:
    return sorted((root / "annotations").glob("instances_*.json"))


def _roboflow_splits(root: Path) -> dict[str, Path]:
    """The splits of a Roboflow export, each its folder. Its ``valid/`` is the split ``val`` (where it
    has no ``val/``), as its YOLO export's data.yaml names it and ``train`` looks for it by default."""
    folders = {path.parent.name: path.parent for path in root.glob(f"*/{ROBOFLOW_ANNOTATIONS}")}
    if "valid" in folders and "val" not in folders:
        folders["val"] = folders.pop("valid")
    return folders


def _leave_out_grouping_categories(data: dict[str, Any]) -> None:
    """Leave out of the checked ``data`` the categories that only group others: without objects of
    their own, and the supercategory of categories with objects. Roboflow declares one, id 0 (named
    after the data set), which would otherwise be a class in the checkpoint, report and data check."""
    used = {annotation["category_id"] for annotation in data["annotations"]}
    # A list, compared by ==: a name or supercategory may be any JSON value, a list too.
    groups = [category["supercategory"] for category in data["categories"]
              if category["id"] in used and isinstance(category.get("supercategory"), str)]
    data["categories"] = [category for category in data["categories"]
                          if category["id"] in used or category.get("name") not in groups]  # fmt: skip


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

    ``data`` is the instances data when already read and checked (a :class:`Split`'s, from any
    format, as :func:`~deformable_detr.data.load_split` passes it); ``annotation_file`` then only
    names it in errors.

    ``coco`` is the pycocotools index of the annotations, for COCO evaluation.
    """

    def __init__(
        self, image_dir: str | Path, annotation_file: str | Path, transforms: Transforms | None = None,
        *, data: dict[str, Any] | None = None,
    ) -> None:  # fmt: skip
        self.image_dir = Path(image_dir)
        self.annotation_file = Path(annotation_file)
        if data is None:
            data = _read_json(self.annotation_file)
            _check(data, self.image_dir, self.annotation_file)
        # COCO evaluation records a match as the matched annotation's id, and 0 as no match: ids
        # from 0 (as some exporters number them), repeated or left out would lose boxes. Nothing
        # else reads them, so the index numbers the annotations itself.
        # Its size classes read "area", which the evaluator takes for 0 where a file leaves it out.
        annotations = [{**annotation, "id": number, "area": object_area(annotation)}
                       for number, annotation in enumerate(data["annotations"], start=1)]
        self.coco = coco_index({**data, "annotations": annotations})
        self.ids = sorted(self.coco.imgs)
        self.category_names = category_names(data)
        self.num_classes = max(self.category_names) + 1
        self.transforms = transforms if transforms is not None else model_input()

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
        problem = size_problem(path, image.shape[-1], image.shape[-2], self.coco.imgs[image_id], self.annotation_file)
        if problem is not None:
            raise DatasetError(problem)
        return image


def category_names(data: dict[str, Any]) -> dict[int, str]:
    """Each category id of the COCO instances ``data`` with its name (its id, where it has none)."""
    return {category["id"]: category.get("name", str(category["id"])) for category in data["categories"]}


def class_key(name: object) -> str:
    """A class name as classes are told apart by name: whatever its case and the spaces around it."""
    return str(name).strip().lower()


def object_area(annotation: dict[str, Any]) -> float:
    """The area COCO's evaluation sizes an object by (small, medium, large): its mask's, as the file
    gives it, or its box's where the file gives none (or 0)."""
    return annotation.get("area") or annotation["bbox"][2] * annotation["bbox"][3]


def size_problem(
    path: Path, width: int, height: int, image: dict[str, Any], annotation_file: Path, orientation: int = 1
) -> str | None:
    """The problem of an image file whose stored size is not its entry's, or None. The boxes are in
    the annotated size; another size misplaces them. ``orientation`` is the file's EXIF orientation:
    a tag that turns it sideways explains a swapped size."""
    if (width, height) == (image["width"], image["height"]):
        return None
    source = Path(image.get("source", annotation_file)).name
    problem = f"{path}: image is {width}x{height} but {source} says {image['width']}x{image['height']}"
    if orientation in SIDEWAYS_TURNS and (height, width) == (image["width"], image["height"]):
        # Boxes drawn on the picture a viewer shows; training reads the pixels as stored.
        problem += f" (its EXIF orientation shows it {EXIF_TURNS[orientation]}, as annotated: save it upright)"
    return problem


def _check(data: dict[str, Any], image_dir: Path, annotation_file: Path) -> None:
    """Raise on the first problem of the instances ``data`` that would stop training, and on missing images."""
    problems = coco_problems(data, annotation_file)
    if problems:
        raise DatasetError(str(problems[0]))
    missing = [image_dir / image["file_name"] for image in data["images"] if not (image_dir / image["file_name"]).is_file()]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DatasetError(f"{missing[0]}: image file not found{more}, listed in {annotation_file}")


def read_image(path: str | Path, *, upright: bool = False) -> tv_tensors.Image:
    """The image at ``path`` as uint8 RGB (3, H, W): as stored (the frame data sets' boxes are in), or
    ``upright``, turned as its EXIF orientation says, as viewers show it.

    Raises:
        DatasetError: naming the file, when it is missing or not a readable image.
    """
    try:
        with Image.open(path) as file:
            return tv_tensors.Image(as_rgb(file, upright=upright))
    except UnidentifiedImageError:
        raise DatasetError(f"{path}: cannot read image (not an image format Pillow knows)") from None
    except (OSError, Image.DecompressionBombError) as error:  # the bomb: a small file that declares billions of pixels
        raise DatasetError(f"{path}: cannot read image ({error})") from None
    except ValueError as error:  # pixels as_rgb cannot convert
        raise DatasetError(f"{path}: {error}") from None

