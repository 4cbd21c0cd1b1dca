"""The data check on a generated data set: the first run (every image probed) and the cached one.

Writes ``--images`` 640 x 480 JPEG files (copies of a few distinct encodings: the check reads headers
and file ends, so the pixels do not change its cost) with about seven boxes each, as COCO has, once
as a COCO folder and once as a YOLO folder (one label file per image), then times
:func:`deformable_detr.data.check_data` on each: first with an empty cache, then again with the
cache the first run wrote. The files were just written, so the operating system has them in memory;
on a cold disk the first run also waits for the disk. Median of ``--repeats``, each with a fresh cache.

    python benchmarks/check_data.py [--images 10000] [--repeats 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from deformable_detr.data import check_data

WIDTH, HEIGHT = 640, 480
CLASSES = [f"class{index}" for index in range(10)]


def encodings(count: int, rng: np.random.Generator) -> list[bytes]:
    """JPEG files of smooth random content, as photographs compress."""
    files = []
    for _ in range(count):
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        buffer = io.BytesIO()
        small.resize((WIDTH, HEIGHT), Image.BICUBIC).save(buffer, "JPEG", quality=90)
        files.append(buffer.getvalue())
    return files


def write_data(root: Path, images: int, rng: np.random.Generator) -> tuple[Path, Path]:
    """The same images and boxes as a COCO folder and as a YOLO folder."""
    coco, yolo = root / "coco", root / "yolo"
    for folder in (coco / "train", coco / "annotations", yolo / "images" / "train", yolo / "labels" / "train"):
        folder.mkdir(parents=True)
    jpegs = encodings(16, rng)
    entries, annotations = [], []
    for image_id in range(1, images + 1):
        name = f"{image_id:06d}.jpg"
        data = jpegs[image_id % len(jpegs)]
        (coco / "train" / name).write_bytes(data)
        (yolo / "images" / "train" / name).write_bytes(data)
        entries.append({"id": image_id, "file_name": name, "width": WIDTH, "height": HEIGHT})
        lines = []
        for _ in range(rng.poisson(7)):
            w, h = rng.uniform(8, 300, 2)
            x, y = rng.uniform(0, WIDTH - w), rng.uniform(0, HEIGHT - h)
            label = int(rng.integers(len(CLASSES)))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": label + 1,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})  # fmt: skip
            lines.append(f"{label} {(x + w / 2) / WIDTH:.6f} {(y + h / 2) / HEIGHT:.6f} {w / WIDTH:.6f} {h / HEIGHT:.6f}\n")
        (yolo / "labels" / "train" / f"{image_id:06d}.txt").write_text("".join(lines))
    categories = [{"id": index + 1, "name": name} for index, name in enumerate(CLASSES)]
    (coco / "annotations" / "instances_train.json").write_text(
        json.dumps({"images": entries, "annotations": annotations, "categories": categories})
    )
    (yolo / "data.yaml").write_text(yaml.safe_dump({"train": "images/train", "names": CLASSES}))
    return coco, yolo


def timed(root: Path) -> float:
    start = time.perf_counter()
    report = check_data(root)
    elapsed = time.perf_counter() - start
    assert not report.problems, report
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        coco, yolo = write_data(Path(folder), args.images, np.random.default_rng(0))
        print(f"{args.images:,} images of {WIDTH} x {HEIGHT}, {os.cpu_count()} CPUs; median of {args.repeats}")
        for name, root in (("COCO", coco), ("YOLO", yolo)):
            first, cached = [], []
            for repeat in range(args.repeats):
                os.environ["DEFORMABLE_DETR_CACHE"] = str(Path(folder) / f"cache-{name}-{repeat}")
                first.append(timed(root))
                cached.append(timed(root))
            print(f"{name}: first run {statistics.median(first):.2f} s, cached {statistics.median(cached):.2f} s")


if __name__ == "__main__":
    main()
