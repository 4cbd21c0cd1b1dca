"""Pascal VOC folders (``Annotations/*.xml``, ``JPEGImages/``, optionally ``ImageSets/Main/<split>.txt``)
read as COCO instances data. Annotations may be in subfolders (one per camera or batch), which a split
file names as ``cam1/000001``.

- The image of ``Annotations/<id>.xml`` is ``JPEGImages/<id>.jpg``, as the VOC devkit and torchvision
  name it, whatever its ``<filename>`` says: labelling tools write the name the image had then, which
  renaming leaves stale. Another image suffix will do (``.png``, ``.JPG``); only where no image is
  named after the id is ``<filename>`` read, in the id's folder, for images named unlike their XML.
- Boxes: VOC corners are 1-based pixel indices, both inclusive, so pixel ``xmin`` starts at
  ``xmin - 1`` and the box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` in COCO.
- ``difficult`` objects become ``iscrowd=1``: VOC evaluation neither rewards nor penalises
  detections of them, and COCO evaluation treats crowd boxes the same way, while the data set
  leaves crowd boxes out of the training targets, as the VOC protocol leaves difficult ones out.
- Classes are the names found in every annotation file of the folder, sorted, with ids 1..K, so
  that all splits agree (for VOC itself, sorted is :data:`VOC_CLASSES`' order).
- Without ``ImageSets/Main``, every annotation file is one split, ``train``.
"""

from __future__ import annotations

import contextlib
import json
import math
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable, Sequence
from pathlib import Path

from ..files import atomic_write
from .coco import DatasetError, Problem, Split
from .images import IMAGE_SUFFIXES, ImageInfo, inspect_image

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip
# The suffixes of an image named after its annotation, in the order they are looked for: the devkit's first.
_ID_IMAGE_SUFFIXES = tuple(
    variant for suffix in (".jpg", *sorted(IMAGE_SUFFIXES - {".jpg"})) for variant in (suffix, suffix.upper())
)


def _text(element: ElementTree.Element, tag: str, path: Path) -> str:
    found = element.findtext(tag)
    if found is None or not found.strip():
        raise DatasetError(f"{path}: <{element.tag}> has no <{tag}>")
    return found.strip()


def _finite(text: str) -> float:
    """``text`` as a number, which must be finite: float() also reads "nan" and "inf"."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text!r} is not finite")
    return number


def _parse(path: Path) -> ElementTree.Element:
    try:
        return ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise DatasetError(f"{path}: not valid XML ({error})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror})") from None


def _image_file(root: ElementTree.Element, path: Path, identifier: str, image_dir: Path) -> str:
    """The image of the annotation ``path`` of id ``identifier``, relative to ``image_dir``: the one
    named after the id, or else the one its ``<filename>`` names, in the id's folder."""
    candidates = [f"{identifier}{suffix}" for suffix in _ID_IMAGE_SUFFIXES]
    looked_for = f"{image_dir / identifier}.jpg (nor with another image suffix)"
    filename = (root.findtext("filename") or "").strip()
    named = (Path(identifier).parent / filename).as_posix()
    if filename and named not in candidates:
        candidates.append(named)
        looked_for += f", nor {image_dir / named}, its <filename>"
    found = next((name for name in candidates if (image_dir / name).is_file()), None)
    if found is None:
        raise DatasetError(f"{path}: image not found: no {looked_for}")
    return found


def _image_entry(
    root: ElementTree.Element, path: Path, identifier: str, image_dir: Path, probe: Callable[[Path], ImageInfo]
) -> dict:
    """The COCO image entry of the annotation ``path`` of id ``identifier``."""
    file_name = _image_file(root, path, identifier, image_dir)
    try:
        width, height = (int(_finite(root.findtext(f"size/{tag}") or "0")) for tag in ("width", "height"))
    except ValueError:
        raise DatasetError(f"{path}: <size> is not a finite number") from None
    if width <= 0 or height <= 0:
        # Some VOC-style exports leave the size out or at 0; the image header has it.
        info = probe(image_dir / file_name)
        if info.problem is not None:
            raise DatasetError(f"{path}: no image size, and {image_dir / file_name}: {info.problem}")
        width, height = info.width, info.height
    return {"file_name": file_name, "width": width, "height": height, "source": str(path)}


def _objects(root: ElementTree.Element, path: Path) -> list[tuple[str, list[float], bool]]:
    """The ``(class name, COCO box, difficult)`` objects of the annotation ``path``."""
    objects = []
    for element in root.iter("object"):
        name = _text(element, "name", path)
        box = element.find("bndbox")
        if box is None:
            raise DatasetError(f"{path}: object {name!r} has no <bndbox>")
        try:
            x1, y1, x2, y2 = (_finite(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(f"{path}: object {name!r} has a box corner that is not a finite number") from None
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"{path}: object {name!r} has xmax < xmin or ymax < ymin")
        difficult = (element.findtext("difficult") or "0").strip() == "1"
        objects.append((name, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], difficult))
    return objects


def _read_annotation(
    path: Path, annotation_dir: Path, image_dir: Path, probe: Callable[[Path], ImageInfo]
) -> tuple[dict, list[tuple[str, list[float], bool]]]:
    """The image entry and objects of the VOC XML file ``path`` in ``annotation_dir``."""
    root = _parse(path)
    identifier = path.relative_to(annotation_dir).with_suffix("").as_posix()
    return _image_entry(root, path, identifier, image_dir, probe), _objects(root, path)


def voc_splits(voc_root: str | Path) -> list[str]:
    """The split names of a VOC folder: its ``ImageSets/Main/<split>.txt`` files, or ``["train"]``
    (every annotation) without that folder.

    VOC's per-class files are not splits: ``<class>_<split>.txt``, known by their lines (an image and
    1, -1 or 0: whether the class is in it) or, written otherwise, by a name that ends with another
    split's. A split's own name may hold an underscore (``val_2012``)."""
    folder = Path(voc_root) / "ImageSets" / "Main"
    if not folder.is_dir():
        return ["train"]
    stems = {path.stem for path in folder.glob("*.txt") if not _lists_one_class(path)}
    return sorted(stem for stem in stems if not any(stem.endswith(f"_{other}") for other in stems))


def _lists_one_class(path: Path) -> bool:
    """Whether the file's first line reads ``<image> 1`` (or -1, or 0), as VOC's per-class files do."""
    with open(path, "rb") as file:
        for line in file:
            fields = line.split()
            if fields:
                return len(fields) == 2 and fields[1] in (b"1", b"-1", b"0")
    return False


def _why_none_annotated(name: str) -> str:
    """Why a split file's images, the first named ``name``, may all lack annotations: its lines name
    image files (as ``ls JPEGImages`` writes them), where VOC's name ids; or it is a test set, as VOC's own."""
    if Path(name).suffix.lower() in IMAGE_SUFFIXES:
        return f"its lines name image files, such as {name!r}, where VOC's name ids, such as {Path(name).stem!r}"
    return "a test set?"


def read_voc(
    voc_root: str | Path,
    split: str | None = None,
    classes: Sequence[str] | None = None,
    probe: Callable[[Path], ImageInfo] = inspect_image,
) -> Split:
    """The VOC folder's ``split`` (images listed in ``ImageSets/Main/<split>.txt``; None, or ``"train"``
    in a folder without split files: every annotation file) as COCO instances data.

    ``classes`` get ids 1..len(classes) in order (an object of another class is a problem); None takes
    the names found in all of ``Annotations/``, sorted. ``probe`` reads the size of images whose XML
    has none. A file that cannot be read is a problem of the split, as is an unknown class.

    Raises:
        DatasetError: when the split file is missing, or none of its images has an annotation file.
    """
    voc_root = Path(voc_root)
    annotation_dir, image_dir = voc_root / "Annotations", voc_root / "JPEGImages"
    every_file = sorted(annotation_dir.rglob("*.xml"))
    split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
    if split is None or (split == "train" and not split_file.parent.is_dir()):
        if not every_file:
            raise DatasetError(f"{annotation_dir}: no VOC annotation files (*.xml)")
        paths = every_file
    else:
        if not split_file.is_file():
            raise DatasetError(f"{split_file}: split file not found")
        names = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        paths = [annotation_dir / f"{name}.xml" for name in names]
        # As VOC's own test set: one line for the split, not one for each missing file.
        if paths and not any(path.is_file() for path in paths):
            raise DatasetError(
                f"{split_file}: none of its {len(paths):,} images has an annotation in {annotation_dir} "
                f"({_why_none_annotated(names[0])})"
            )

    read, problems = {}, []
    for path in paths:
        try:
            read[path] = _read_annotation(path, annotation_dir, image_dir, probe)
        except DatasetError as error:
            problems.append(Problem(str(error)))
    if classes is None:
        found = set()
        for path in every_file:
            with contextlib.suppress(DatasetError):  # a file outside the split is that split's problem
                objects = read[path][1] if path in read else _objects(_parse(path), path)
                found.update(name for name, _, _ in objects)
        classes = sorted(found)
    category_ids = {name: index + 1 for index, name in enumerate(classes)}

    images, annotations = [], []
    for image_id, path in enumerate((p for p in paths if p in read), start=1):
        image, objects = read[path]
        images.append({"id": image_id, **image})
        for name, box, difficult in objects:
            if name not in category_ids:
                problems.append(Problem(f"{path}: class {name!r} is not one of {', '.join(classes)}"))
                continue
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[name],
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": int(difficult),
                "source": str(path),
            })  # fmt: skip
    categories = [{"id": i, "name": name, "supercategory": "none"} for name, i in category_ids.items()]
    data = {"images": images, "annotations": annotations, "categories": categories}
    return Split(split or "all", image_dir, annotation_dir, data, problems)


def voc_to_coco(
    voc_root: str | Path,
    out_json: str | Path,
    split: str | None = None,
    classes: Sequence[str] | None = VOC_CLASSES,
) -> Path:
    """Write the COCO instances file for ``voc_root``'s ``split`` (see :func:`read_voc`; by default
    with the 20 VOC classes), to read with ``CocoDataset(voc_root / "JPEGImages", out_json)``.
    Returns ``out_json``.

    Raises:
        DatasetError: the first problem found, naming its file.
    """
    split_data = read_voc(voc_root, split, classes)
    if split_data.problems:
        raise DatasetError(str(split_data.problems[0]))
    with atomic_write(out_json) as temporary:
        temporary.write_text(json.dumps(split_data.data))
    return Path(out_json)
