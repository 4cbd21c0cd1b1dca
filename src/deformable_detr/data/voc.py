"""Pascal VOC annotations (one XML file per image) converted to one COCO instances file.

The result is read with ``CocoDataset(voc_root / "JPEGImages", out_json)``.

- Boxes: VOC corners are 1-based pixel indices, both inclusive, so pixel ``xmin`` starts at
  ``xmin - 1`` and the box is ``[xmin - 1, ymin - 1, xmax - xmin + 1, ymax - ymin + 1]`` in COCO.
- ``difficult`` objects become ``iscrowd=1``: VOC evaluation neither rewards nor penalises
  detections of them, and COCO evaluation treats crowd boxes the same way, while the data set
  leaves crowd boxes out of the training targets, as the VOC protocol leaves difficult ones out.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree
from pathlib import Path
from typing import Sequence

from PIL import Image

from .coco import DatasetError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)  # fmt: skip


def _text(element: ElementTree.Element, tag: str, path: Path) -> str:
    found = element.findtext(tag)
    if found is None or not found.strip():
        raise DatasetError(f"{path}: <{element.tag}> has no <{tag}>")
    return found.strip()


def _read_annotation(path: Path, image_dir: Path) -> tuple[dict, list[tuple[str, list[float], bool]]]:
    """The image entry and ``(class name, COCO box, difficult)`` objects of one VOC XML file."""
    try:
        root = ElementTree.parse(path).getroot()
    except ElementTree.ParseError as error:
        raise DatasetError(f"{path}: not valid XML ({error})") from None
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror})") from None
    file_name = (root.findtext("filename") or f"{path.stem}.jpg").strip()
    try:
        width, height = (int(float(root.findtext(f"size/{tag}") or 0)) for tag in ("width", "height"))
    except ValueError:
        raise DatasetError(f"{path}: <size> is not numeric") from None
    if width <= 0 or height <= 0:
        # Some VOC-style exports leave the size out or at 0; the image header has it.
        try:
            with Image.open(image_dir / file_name) as image:
                width, height = image.size
        except OSError:
            raise DatasetError(f"{path}: no image size, and {image_dir / file_name} cannot be read") from None

    objects = []
    for element in root.iter("object"):
        name = _text(element, "name", path)
        box = element.find("bndbox")
        if box is None:
            raise DatasetError(f"{path}: object {name!r} has no <bndbox>")
        try:
            x1, y1, x2, y2 = (float(_text(box, tag, path)) for tag in ("xmin", "ymin", "xmax", "ymax"))
        except ValueError:
            raise DatasetError(f"{path}: object {name!r} has a non-numeric box corner") from None
        if x2 < x1 or y2 < y1:
            raise DatasetError(f"{path}: object {name!r} has xmax < xmin or ymax < ymin")
        difficult = (element.findtext("difficult") or "0").strip() == "1"
        objects.append((name, [x1 - 1, y1 - 1, x2 - x1 + 1, y2 - y1 + 1], difficult))
    return {"file_name": file_name, "width": width, "height": height}, objects


def voc_to_coco(
    voc_root: str | Path,
    out_json: str | Path,
    split: str | None = None,
    classes: Sequence[str] | None = VOC_CLASSES,
) -> Path:
    """Write the COCO instances file for ``voc_root`` (``Annotations/*.xml``, ``JPEGImages/``).

    ``split`` picks the images listed in ``ImageSets/Main/<split>.txt``; None takes every XML file.
    ``classes`` get ids 1..len(classes) in order (the 20 VOC classes by default; an object of
    another class is an error); None takes the class names found, sorted. Returns ``out_json``.
    """
    voc_root, out_json = Path(voc_root), Path(out_json)
    annotation_dir, image_dir = voc_root / "Annotations", voc_root / "JPEGImages"
    if split is None:
        paths = sorted(annotation_dir.glob("*.xml"))
        if not paths:
            raise DatasetError(f"{annotation_dir}: no VOC annotation files (*.xml)")
    else:
        split_file = voc_root / "ImageSets" / "Main" / f"{split}.txt"
        if not split_file.is_file():
            raise DatasetError(f"{split_file}: split file not found")
        names = [line.split()[0] for line in split_file.read_text().splitlines() if line.strip()]
        paths = [annotation_dir / f"{name}.xml" for name in names]

    read = [_read_annotation(path, image_dir) for path in paths]
    if classes is None:
        classes = sorted({name for _, objects in read for name, _, _ in objects})
    category_ids = {name: index + 1 for index, name in enumerate(classes)}

    images, annotations = [], []
    for image_id, (path, (image, objects)) in enumerate(zip(paths, read), start=1):
        images.append({"id": image_id, **image})
        for name, box, difficult in objects:
            if name not in category_ids:
                raise DatasetError(f"{path}: class {name!r} is not one of {', '.join(classes)}")
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image_id,
                "category_id": category_ids[name],
                "bbox": box,
                "area": box[2] * box[3],
                "iscrowd": int(difficult),
            })  # fmt: skip
    categories = [{"id": i, "name": name, "supercategory": "none"} for name, i in category_ids.items()]
    out_json.parent.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return out_json
