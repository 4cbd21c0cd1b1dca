"""One small data set written in each of the three formats, for the data tests."""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from PIL import Image

CLASSES = ("cat", "dog")  # sorted, so that VOC (sorted names) numbers them as COCO and YOLO do
# name: (width, height, objects as (class, (x, y, w, h) in pixels, crowd or difficult))
IMAGES = {
    "a": (64, 48, [("cat", (0, 0, 10, 20), False), ("dog", (30, 10, 34, 38), False)]),  # the dog reaches both far edges
    "b": (40, 40, [("dog", (5, 5, 10, 10), True), ("cat", (12, 3, 7, 9), False)]),
    "c": (50, 30, []),  # no objects: YOLO has no label file for it
}


def write_coco(root: Path, images: dict = IMAGES, split: str = "train") -> Path:
    (root / split).mkdir(parents=True, exist_ok=True)
    entries, annotations = [], []
    for image_id, (name, (width, height, objects)) in enumerate(images.items(), start=1):
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / split / f"{name}.jpg")
        entries.append({"id": image_id, "file_name": f"{name}.jpg", "width": width, "height": height})
        for label, box, crowd in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": CLASSES.index(label) + 1,
                                "bbox": list(box), "area": box[2] * box[3], "iscrowd": int(crowd)})  # fmt: skip
    categories = [{"id": i + 1, "name": name} for i, name in enumerate(CLASSES)]
    (root / "annotations").mkdir(exist_ok=True)
    path = root / "annotations" / f"instances_{split}.json"
    path.write_text(json.dumps({"images": entries, "annotations": annotations, "categories": categories}))
    return root


def write_roboflow(root: Path, images: dict = IMAGES, folder: str = "train") -> Path:
    """The COCO set as Roboflow exports it: ``<folder>/_annotations.coco.json`` beside the images (``valid``
    for validation), with a category 0 named after the data set, the others' supercategory, without objects."""
    annotations = write_coco(root, images, folder) / "annotations" / f"instances_{folder}.json"
    data = json.loads(annotations.read_text())
    pets = [{**category, "supercategory": "pets"} for category in data["categories"]]
    data["categories"] = [{"id": 0, "name": "pets", "supercategory": "none"}, *pets]
    (root / folder / "_annotations.coco.json").write_text(json.dumps(data))
    annotations.unlink()
    annotations.parent.rmdir()
    return root


def write_voc(root: Path, images: dict = IMAGES, split: str = "train") -> Path:
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, (width, height, objects) in images.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "JPEGImages" / f"{name}.jpg")
        body = "".join(
            f"<object><name>{label}</name><difficult>{int(difficult)}</difficult><bndbox>"
            # 1-based inclusive corners: pixel column x is x + 1, and the last one is x + w.
            f"<xmin>{x + 1}</xmin><ymin>{y + 1}</ymin><xmax>{x + w}</xmax><ymax>{y + h}</ymax></bndbox></object>"
            for label, (x, y, w, h), difficult in objects
        )
        (root / "Annotations" / f"{name}.xml").write_text(
            f"<annotation><filename>{name}.jpg</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{body}</annotation>"
        )
    (root / "ImageSets" / "Main" / f"{split}.txt").write_text("".join(f"{name}\n" for name in images))
    return root


def write_yolo(root: Path, images: dict = IMAGES, split: str = "train") -> Path:
    """Crowd objects are left out: YOLO has no such thing, and the data set leaves them out of training anyway."""
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for name, (width, height, objects) in images.items():
        Image.new("RGB", (width, height), (90, 120, 150)).save(root / "images" / split / f"{name}.jpg")
        if objects:
            lines = [f"{CLASSES.index(label)} {(x + w / 2) / width} {(y + h / 2) / height} {w / width} {h / height}"
                     for label, (x, y, w, h), crowd in objects if not crowd]  # fmt: skip
            (root / "labels" / split / f"{name}.txt").write_text("\n".join(lines) + "\n")
    config_path = root / "data.yaml"
    config = yaml.safe_load(config_path.read_text()) if config_path.is_file() else {"names": list(CLASSES)}
    config[split] = f"images/{split}"
    config_path.write_text(yaml.safe_dump(config))
    return root


WRITERS = {"coco": write_coco, "voc": write_voc, "yolo": write_yolo}


def write_decompression_bomb(path: Path) -> Path:
    """A valid PNG of 20000 x 20000 pixels in a few kilobytes: above Pillow's limit, which refuses it
    as a decompression bomb (one in a folder of millions would take 400 MB to decode)."""
    Image.new("1", (20000, 20000)).save(path)
    return path
