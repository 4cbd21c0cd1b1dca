"""A synthetic detection data set of coloured shapes on noisy backgrounds, written in COCO format.

Layout (the one :func:`deformable_detr.data.coco_split` reads)::

    out_dir/train/000001.jpg ...
    out_dir/val/000001.jpg ...
    out_dir/annotations/instances_train.json
    out_dir/annotations/instances_val.json

Every image is drawn from its own random stream, so a given ``seed`` always gives the same files,
and the validation images do not depend on how many training images were asked for.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

# Category ids are 1..5, as in COCO where id 0 is unused; shapes differ in outline, not only in
# aspect ratio, so every class stays recognisable however it is stretched or rotated.
CLASSES = ("ellipse", "rectangle", "triangle", "star", "cross")

# An object's size (the side of its square before stretching) as fractions of the image's shorter
# side. From 15 %, about half of the objects are small by COCO's measure (area under 32^2 pixels) in
# the demo's 192-pixel images (41 % in COCO; a fifth in 256-pixel ones, synthesize's default); below
# about 10 % (19 pixels at 192), a star, a cross and an ellipse are a few blurred pixels apart.
OBJECT_SIZES = (0.15, 0.6)
# The side of the square a shape is drawn in, at least, in pixels (its box is about that, more once rotated).
MIN_OBJECT_SIDE = 6.0
# An image's shorter side may be three quarters of its longer one: at 32 pixels (24 across) the
# smallest objects fit four to a side, and in smaller images hardly any would.
MIN_IMAGE_SIZE = 32

# The hidden folder a data set is drawn in before it moves into place.
_DRAFTS_PREFIX = ".drafts-"
# Draws an image and its objects' annotations from a random stream.
Draw = Callable[[np.random.Generator], tuple[Image.Image, list[dict]]]


def _unit_polygons() -> dict[str, np.ndarray]:
    """Each shape as polygon vertices in [-1, 1]^2."""
    angles = np.linspace(0, 2 * math.pi, 48, endpoint=False)
    star_angles = np.linspace(0, 2 * math.pi, 10, endpoint=False) - math.pi / 2
    star_radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    arm = 0.33
    cross = [(-arm, -1), (arm, -1), (arm, -arm), (1, -arm), (1, arm), (arm, arm),
             (arm, 1), (-arm, 1), (-arm, arm), (-1, arm), (-1, -arm), (-arm, -arm)]  # fmt: skip
    return {
        "ellipse": np.stack([np.cos(angles), np.sin(angles)], 1),
        "rectangle": np.array([(-1, -1), (1, -1), (1, 1), (-1, 1)], dtype=float),
        "triangle": np.array([(0, -1), (1, 1), (-1, 1)], dtype=float),
        "star": np.stack([star_radii * np.cos(star_angles), star_radii * np.sin(star_angles)], 1),
        "cross": np.array(cross, dtype=float),
    }


_POLYGONS = _unit_polygons()


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Smooth colour blobs plus finer texture: float (H, W, 3) in [0, 255]."""

    def noise_field(cells: int, amplitude: float) -> np.ndarray:
        grid = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
        field = np.asarray(Image.fromarray(grid).resize((width, height), Image.BICUBIC), dtype=np.float32)
        return (field - 127.5) * (amplitude / 127.5)

    base = rng.uniform(40, 215, 3).astype(np.float32)
    return np.clip(base + noise_field(3, 70) + noise_field(int(rng.integers(8, 24)), 25), 0, 255)


def _overlaps_too_much(box: np.ndarray, boxes: list[np.ndarray], limit: float = 0.3) -> bool:
    """Whether ``box`` meets another box over more than ``limit`` of the smaller one's area: objects
    may overlap, but none may hide another."""
    for other in boxes:
        width = min(box[2], other[2]) - max(box[0], other[0])
        height = min(box[3], other[3]) - max(box[1], other[1])
        if width <= 0 or height <= 0:
            continue
        intersection = width * height
        smaller = min((box[2] - box[0]) * (box[3] - box[1]), (other[2] - other[0]) * (other[3] - other[1]))
        if intersection > limit * smaller:
            return True
    return False


def _contrasting_colour(rng: np.random.Generator, under: np.ndarray) -> tuple[int, int, int]:
    """A random colour far from the mean colour it is drawn on, so every object is visible."""
    mean = under.reshape(-1, 3).mean(0)
    for _ in range(20):
        colour = rng.integers(0, 256, 3)
        if np.linalg.norm(colour - mean) > 110:
            return tuple(int(c) for c in colour)
    return tuple(int(c) for c in np.where(mean > 127, 0, 255))


def _shoelace_area(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return float(abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))) / 2)


def _draw_image(
    rng: np.random.Generator, image_size: int, max_objects: int, object_sizes: tuple[float, float]
) -> tuple[Image.Image, list[dict]]:
    # Sizes vary (shorter side 75-100 % of the longer) so batches exercise padding.
    long_side, short_side = image_size, int(image_size * rng.uniform(0.75, 1.0))
    height, width = (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)
    pixels = _background(rng, height, width)
    image = Image.fromarray(pixels.astype(np.uint8))
    draw = ImageDraw.Draw(image)

    # One image in twenty has no objects: negatives are part of real data sets too.
    count = 0 if rng.random() < 0.05 else int(rng.integers(1, max_objects + 1))
    boxes: list[np.ndarray] = []
    objects = []
    for _ in range(count):
        for _attempt in range(20):
            category = int(rng.integers(len(CLASSES)))
            # Log-uniform: every doubling of size is equally common.
            size = min(height, width) * math.exp(rng.uniform(*np.log(object_sizes)))
            aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
            sides = np.array([size * math.sqrt(aspect), size / math.sqrt(aspect)])
            half = np.maximum(sides, MIN_OBJECT_SIDE) / 2
            angle = rng.uniform(0, 2 * math.pi)
            rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
            points = (_POLYGONS[CLASSES[category]] * half) @ rotation.T
            points -= points.min(0)
            extent = points.max(0)
            if extent[0] >= width or extent[1] >= height:
                continue
            points += rng.uniform(0, 1, 2) * (np.array([width, height]) - extent)
            box = np.concatenate([points.min(0), points.max(0)])
            if _overlaps_too_much(box, boxes):
                continue
            x0, y0, x1, y1 = box.astype(int)
            colour = _contrasting_colour(rng, pixels[y0 : y1 + 1, x0 : x1 + 1])
            draw.polygon([tuple(p) for p in points], fill=colour)
            boxes.append(box)
            objects.append({
                "category_id": category + 1,
                "bbox": [round(float(v), 2) for v in (box[0], box[1], box[2] - box[0], box[3] - box[1])],
                "area": round(_shoelace_area(points), 2),
                "iscrowd": 0,
            })  # fmt: skip
            break

    # Sensor-like noise over everything, objects included, so flat fills are not a shortcut.
    noisy = np.asarray(image, dtype=np.float32) + 8 * rng.standard_normal((height, width, 3), dtype=np.float32)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)), objects


def synthesize(
    out_dir: str | Path,
    *,
    train: int,
    val: int,
    image_size: int = 256,
    max_objects: int = 6,
    object_sizes: tuple[float, float] = OBJECT_SIZES,
    seed: int = 0,
) -> Path:
    """Write ``train`` and ``val`` JPEG images of shapes with COCO instances files into ``out_dir``, a
    new or empty folder; returns ``out_dir``.

    ``image_size`` is the longer side of every image. Objects are the shapes in :data:`CLASSES`
    (category ids 1..5), in random colours contrasting with their background, aspect ratios and
    rotations, overlapping a little at most, with sizes log-uniform in ``object_sizes`` (fractions
    of the shorter image side). A count of 0 writes no such split: an empty split stops training,
    where a data set without ``val`` trains without validation.

    A folder that holds anything is refused rather than written into: its annotation files would be
    replaced, and its other images left among the new ones. The data set is drawn in a hidden folder
    in ``out_dir`` and moved into place when complete, so an interrupted run leaves ``out_dir``
    empty (or, killed, with the hidden folder, which the next run removes), to be run again.

    Raises:
        ValueError: a count, size or fraction out of range (before anything is written).
        FileExistsError: ``out_dir`` is a file, or a folder that is not empty.
    """
    _check_settings(train=train, val=val, image_size=image_size, max_objects=max_objects, object_sizes=object_sizes)
    out_dir = Path(out_dir)
    for abandoned in out_dir.glob(f"{_DRAFTS_PREFIX}*"):  # a run killed before it could clean up
        shutil.rmtree(abandoned)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(f"{out_dir}: not an empty folder; synthesize writes a data set into a new or empty one")
    out_dir.mkdir(parents=True, exist_ok=True)
    draw = functools.partial(_draw_image, image_size=image_size, max_objects=max_objects, object_sizes=object_sizes)
    # Inside out_dir, not beside it: on the same file system (a mounted folder too), a move is a rename.
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=_DRAFTS_PREFIX) as drafts:
        written = _draw_data_set(Path(drafts), {"train": train, "val": val}, seed, draw)
        # The annotations last: they are what makes the folder a data set (``make demo`` looks for them).
        for name in [*written, "annotations"]:
            (Path(drafts) / name).rename(out_dir / name)
    return out_dir


def _check_settings(
    *, train: int, val: int, image_size: int, max_objects: int, object_sizes: tuple[float, float]
) -> None:
    """Raise ValueError on settings that make no data set."""
    if train < 0 or val < 0:
        raise ValueError(f"train and val must be counts of images, 0 or more, got {train} and {val}")
    if train == val == 0:
        raise ValueError("train and val are both 0: no images to write")
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image size must be at least {MIN_IMAGE_SIZE} pixels, got {image_size}")
    if max_objects < 1:
        raise ValueError(f"max objects must be at least 1, got {max_objects}")
    smallest, largest = object_sizes
    if not 0 < smallest <= largest <= 1:
        raise ValueError(f"object sizes must be fractions 0 < min <= max <= 1 of the shorter side, got {object_sizes}")


def _draw_data_set(folder: Path, counts: dict[str, int], seed: int, draw: Draw) -> list[str]:
    """Draw ``counts[split]`` images of each split with ``draw`` into ``folder/<split>/``, with their
    instances files in ``folder/annotations/``; returns the splits written (those of a count above 0)."""
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASSES)]
    info = {"description": f"deformable-detr synthetic shapes, seed {seed}"}
    (folder / "annotations").mkdir()
    written = []
    for split_index, (split, count) in enumerate(counts.items()):
        if count:
            seeds = np.random.SeedSequence([seed, split_index]).spawn(count)
            images, annotations = _draw_split(folder / split, seeds, draw)
            coco = {"info": info, "images": images, "annotations": annotations, "categories": categories}
            (folder / "annotations" / f"instances_{split}.json").write_text(json.dumps(coco))
            written.append(split)
    return written


def _draw_split(folder: Path, seeds: list[np.random.SeedSequence], draw: Draw) -> tuple[list[dict], list[dict]]:
    """Draw an image from each of ``seeds`` into ``folder``; returns their COCO image and annotation entries."""
    folder.mkdir()
    images, annotations = [], []
    for image_id, image_seed in enumerate(seeds, start=1):
        image, objects = draw(np.random.default_rng(image_seed))
        file_name = f"{image_id:06d}.jpg"
        image.save(folder / file_name, format="JPEG", quality=90)
        images.append({"id": image_id, "file_name": file_name, "width": image.width, "height": image.height})
        for annotation in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, **annotation})
    return images, annotations
