"""YOLO folders as Ultralytics lays them out, read as COCO instances data.

``data.yaml`` names each split's images (``train: images/train``; also a list of folders, or a
``.txt`` file listing images) relative to ``path`` (itself relative to the yaml's folder, which is
the default; an entry ``../x`` not found there is ``x``, as Ultralytics reads Roboflow's exports),
and the class names (``names``: a list, or a mapping from each index 0..n-1 to its name). An image's
labels are in the file at the same place under ``labels/`` instead of ``images/``, with the suffix
``.txt``: one line ``class cx cy w h`` per object, normalised by the image's width and height; a
polygon ``class x1 y1 x2 y2 x3 y3 ...`` (a segmentation label) is the box around it.

- Class index k becomes category id k + 1, so that ids start at 1 as in COCO and VOC.
- Image sizes come from the image headers, which YOLO labels leave out.
- An image without a label file has no objects: a negative example. A split without any label file
  is a problem: its labels were not found.
- A test split none of whose folders is there is no split (:func:`yolo_splits`).
- Paths stay relative where they were given so, as in the other formats, with ``..`` read in the
  text (``set/../test`` is ``test``).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from ..checks import is_whole_number
from .coco import DatasetError, Problem, Split
from .images import IMAGE_SUFFIXES, ImageInfo, inspect_image

SPLITS = ("train", "val", "test")
# Normalised coordinates this far above 1 are rounding, or a box drawn a hair past the image's edge;
# coordinates in pixels are far above.
NORMALISED_TOLERANCE = 0.01


def data_yaml(root: str | Path) -> Path:
    """The ``data.yaml`` of the YOLO data set ``root`` (a folder, or the yaml file itself)."""
    root = Path(root)
    return root if root.suffix in (".yaml", ".yml") else root / "data.yaml"


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, yaml.YAMLError) as error:
        raise DatasetError(f"{path}: not readable YAML ({' '.join(str(error).split())})") from None
    if not isinstance(config, dict) or not isinstance(config.get("names"), (list, dict)) or not config["names"]:
        raise DatasetError(f"{path}: not a YOLO data file (no 'names' of the classes)")
    return config


def is_data_yaml(path: Path) -> bool:
    """Whether ``path`` is a YOLO data file (one that names classes), of whatever name."""
    try:
        _read_yaml(path)
    except DatasetError:
        return False
    return True


def yolo_splits(root: str | Path) -> list[str]:
    """The splits ``data.yaml`` names, of ``train``, ``val`` and ``test``, but for a test split none of
    whose images are there: Roboflow's exports name ``../test/images`` whether they hold a test split
    or not, and Ultralytics, which checks that train's and val's images are there, ignores it."""
    yaml_path = data_yaml(root)
    config = _read_yaml(yaml_path)
    named = _named_splits(config)
    if "test" in named and not _images_there(config, "test", yaml_path):
        named.remove("test")
    return named


def _images_there(config: dict[str, Any], split: str, yaml_path: Path) -> bool:
    """Whether any of the folders or lists ``split`` names is there."""
    base = _base_folder(config, yaml_path)
    return any(path.exists() for entry in _split_entries(config, split, yaml_path) for path in _entry_paths(entry, base))


def _named_splits(config: dict[str, Any]) -> list[str]:
    return [split for split in SPLITS if config.get(split)]


def _base_folder(config: dict[str, Any], yaml_path: Path) -> Path:
    """The folder the split entries are relative to: ``path``, itself relative to the yaml's folder
    (the default)."""
    folder = config.get("path")
    if folder is not None and not isinstance(folder, str):
        raise DatasetError(f"{yaml_path}: 'path' must be a path, not {folder!r}")
    return _normalised(yaml_path.parent / (folder or ""))


def _normalised(path: Path) -> Path:
    """``path`` with each ``..`` taken off with the folder before it (``set/../test`` is ``test``),
    relative where it was: problems name files as the user writes them, as the other formats' do. It
    is read in the text, as a shell's ``cd`` reads it: where that folder is a link, ``..`` is beside
    the link, not beside its target."""
    return Path(os.path.normpath(path))


def _split_entries(config: dict[str, Any], split: str, yaml_path: Path) -> list[str]:
    """What ``split`` names: image folders and ``.txt`` lists of images."""
    entries = config.get(split)
    if not entries:
        raise DatasetError(f"{yaml_path}: no {split!r} split (it names {', '.join(_named_splits(config)) or 'none'})")
    listed = entries if isinstance(entries, list) else [entries]
    if not all(isinstance(entry, str) for entry in listed):
        raise DatasetError(f"{yaml_path}: {split!r} must be a path or a list of paths, not {entries!r}")
    return listed


def _class_names(config: dict[str, Any], yaml_path: Path) -> list[str]:
    """The class names by index. A mapping's keys are the indices (quoted ones too: "10" comes after
    "9"), and must be 0..n-1 as Ultralytics requires, since a label line names its class by key."""
    names = config["names"]
    if isinstance(names, list):
        return [str(name) for name in names]
    indices = [_class_index(key) for key in names]
    count = len(names)
    missing = [str(index) for index in range(count) if index not in indices]
    if missing:
        unexpected = [repr(key) for key, index in zip(names, indices) if index not in range(count)]
        others = f"; keys not among them: {', '.join(unexpected)}" if unexpected else ""
        raise DatasetError(
            f"{yaml_path}: 'names' must name each class index 0..{count - 1}: no name for {', '.join(missing)}{others}"
        )
    by_index = dict(zip(indices, names.values()))
    return [str(by_index[index]) for index in range(count)]


def _class_index(key: Any) -> int | None:
    if is_whole_number(key) or (isinstance(key, str) and key.isdecimal()):
        return int(key)
    return None


def label_path(image: Path) -> Path:
    """Where the labels of ``image`` are: the last ``images`` folder of its path becomes ``labels``
    (beside the image where there is none)."""
    # On strings: pathlib's parsing took a third of the check's time on 10,000 images. The separator
    # put in front finds a relative path's first folder too ("images/train").
    folder, name = os.path.split(image)
    head, found, tail = f"{os.sep}{folder}{os.sep}".rpartition(f"{os.sep}images{os.sep}")
    if found:
        folder = f"{head}{os.sep}labels{os.sep}{tail}".removeprefix(os.sep)
    return Path(folder, f"{os.path.splitext(name)[0]}.txt")


def _files(folder: Path, suffixes: frozenset[str]) -> list[str]:
    """The files under ``folder`` with one of ``suffixes``, sorted, through links to folders as
    Ultralytics finds them (os.walk: pathlib's rglob took a fifth of the check's time on 10,000 images)."""
    files = []
    # Each folder to walk -> the real paths of it and of the folders above it: a link to one of them is a loop.
    lineage = {os.fspath(folder): frozenset({os.path.realpath(folder)})}
    for parent, subfolders, names in os.walk(folder, followlinks=True):
        files += (os.path.join(parent, name) for name in names if os.path.splitext(name)[1].lower() in suffixes)
        above = lineage.pop(parent)
        walked = []
        for name in subfolders:
            real_path = os.path.realpath(os.path.join(parent, name))
            if real_path not in above:
                walked.append(name)
                lineage[os.path.join(parent, name)] = above | {real_path}
        subfolders[:] = walked
    return sorted(files)


def _entry_paths(entry: str, base: Path) -> list[Path]:
    """Where a split entry may point, in the order looked at: ``base / entry``, and where the entry
    starts with ``../``, ``base`` / the rest, as Ultralytics reads it. Roboflow's exports need it:
    their data.yaml sits at the export's root and names ``../train/images``."""
    paths = [_normalised(base / entry)]
    if entry.startswith("../"):
        paths.append(_normalised(base / entry.removeprefix("../")))
    return paths


def _listed_images(entry: str, base: Path) -> tuple[list[Path], list[Path]]:
    """The images one split entry names, and the folders among them (to look for stray labels in)."""
    candidates = _entry_paths(entry, base)
    path = next((candidate for candidate in candidates if candidate.exists()), candidates[0])
    if path.is_dir():
        return [Path(file) for file in _files(path, IMAGE_SUFFIXES)], [path]
    if path.suffix == ".txt" and path.is_file():
        lines = (line.strip() for line in path.read_text().splitlines())
        return [_normalised(path.parent / line) for line in lines if line], []
    also = "".join(f" (nor {candidate})" for candidate in candidates[1:])
    raise DatasetError(f"{path}: image folder not found{also}")


def _read_labels(
    path: Path, num_classes: int, yaml_name: str
) -> tuple[list[tuple[int, list[float], int]], list[Problem], list[int]]:
    """``(class index, [cx, cy, w, h], line number)`` rows of one label file, its problems, and the
    numbers of its lines with coordinates above 1 (not normalised: in pixels, most likely). A polygon
    (``class x1 y1 x2 y2 x3 y3 ...``, as segmentation labels are) is read as the box around it, as
    Ultralytics trains detection on it."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return [], [], []  # no objects
    except (OSError, UnicodeDecodeError) as error:
        return [], [Problem(f"{path}: cannot read label file ({error})")], []
    rows, problems, unnormalised = [], [], []
    for number, line in enumerate(lines, start=1):
        values = line.split()
        if not values:
            continue
        try:
            index, coordinates = float(values[0]), [float(v) for v in values[1:]]
        except ValueError:
            index, coordinates = -1.0, []
        is_polygon = len(coordinates) >= 6 and len(coordinates) % 2 == 0
        if not index.is_integer() or not (len(coordinates) == 4 or is_polygon):
            expected = "'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...'"
            problems.append(Problem(f"{path}: line {number}: expected {expected}, found {line.strip()!r}"))
        elif not all(math.isfinite(value) for value in coordinates):  # float() reads "nan" and "inf"
            problems.append(Problem(f"{path}: line {number}: expected finite coordinates, found {line.strip()!r}"))
        elif not 0 <= index < num_classes:
            problems.append(Problem(f"{path}: line {number}: unknown class {int(index)} ({yaml_name} names 0..{num_classes - 1})"))
        elif max(coordinates) > 1 + NORMALISED_TOLERANCE:
            unnormalised.append(number)
        elif is_polygon:
            rows.append((int(index), _box_around(coordinates), number))
        elif coordinates[2] < 0 or coordinates[3] < 0:
            problems.append(Problem(f"{path}: line {number}: negative width or height"))
        else:
            rows.append((int(index), coordinates, number))
    return rows, problems, unnormalised


def _box_around(polygon: list[float]) -> list[float]:
    """``[cx, cy, w, h]`` of the box around the polygon ``[x1, y1, x2, y2, ...]``."""
    xs, ys = polygon[0::2], polygon[1::2]
    left, top, right, bottom = min(xs), min(ys), max(xs), max(ys)
    return [(left + right) / 2, (top + bottom) / 2, right - left, bottom - top]


def _unnormalised_problem(lines: list[tuple[Path, int]]) -> Problem:
    """One line for all the label lines with coordinates above 1: a whole export in pixels would
    otherwise fill the report."""
    (path, number), more = lines[0], len(lines) - 1
    others = f" (and {more:,} more such lines)" if more else ""
    return Problem(
        f"{path}: line {number}: coordinates above 1{others}: they must be normalised to 0-1, "
        "divided by the image's width and height"
    )


def _file_name(image: str, base: Path) -> str:
    """The ``file_name`` of ``image`` in the split's COCO data, whose folder is ``base``: its path from
    there, or, for an image outside it, its absolute path (which ``base /`` leaves as it is)."""
    prefix = f"{base}{os.sep}"
    if image.startswith(prefix):  # most images: a string test, where relpath would normalise both paths again
        return image.removeprefix(prefix)
    relative = os.path.relpath(image, base)
    return os.path.abspath(image) if relative.split(os.sep)[0] == os.pardir else relative


def read_yolo(root: str | Path, split: str, probe: Callable[[Path], ImageInfo] = inspect_image) -> Split:
    """The YOLO data set's ``split`` as COCO instances data, image ids 1..N in path order; ``probe``
    reads each image's size. Unusable label lines, coordinates that are not normalised, no label file
    for any image, and label files without an image are problems of the split.

    Raises:
        DatasetError: when ``data.yaml`` is unusable or does not name ``split``.
    """
    yaml_path = data_yaml(root)
    config = _read_yaml(yaml_path)
    base = _base_folder(config, yaml_path)
    images, folders = [], []
    for entry in _split_entries(config, split, yaml_path):
        listed, listed_folders = _listed_images(entry, base)
        images += listed
        folders += listed_folders
    names = _class_names(config, yaml_path)

    problems: list[Problem] = []
    image_entries, annotations = [], []
    unnormalised = []  # (label file, line number) of each line with coordinates above 1
    label_files = [label_path(image) for image in images]
    for image_id, (image, labels) in enumerate(zip(images, label_files), start=1):
        info = probe(image)
        image_entries.append({"id": image_id, "file_name": _file_name(str(image), base),
                              "width": info.width, "height": info.height, "source": str(labels)})  # fmt: skip
        rows, label_problems, unnormalised_lines = _read_labels(labels, len(names), yaml_path.name)
        problems += label_problems
        unnormalised += [(labels, number) for number in unnormalised_lines]
        for index, (cx, cy, w, h), number in rows:
            box = [(cx - w / 2) * info.width, (cy - h / 2) * info.height, w * info.width, h * info.height]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": index + 1, "bbox": box,
                                "area": box[2] * box[3], "iscrowd": 0, "source": f"{labels}, line {number}"})  # fmt: skip

    if unnormalised:
        problems.append(_unnormalised_problem(unnormalised))
    # Each image without a label file is a negative; all of them, labels that were not found.
    if images and not any(path.is_file() for path in label_files):
        problems.append(
            Problem(
                f"{label_files[0].parent}: no label file for any of the {len(images):,} images of the {split} split "
                "(YOLO labels are where the images are, with labels/ for images/ and .txt for the image's suffix)"
            )
        )

    expected = {str(path) for path in label_files}
    for folder in folders:
        stray = [path for path in _files(label_path(folder / "image").parent, frozenset({".txt"})) if path not in expected]
        problems += [Problem(f"{path}: label file without an image (ignored)", fatal=False) for path in stray]

    categories = [{"id": index + 1, "name": name} for index, name in enumerate(names)]
    data = {"images": image_entries, "annotations": annotations, "categories": categories}
    return Split(split, base, yaml_path, data, problems)
