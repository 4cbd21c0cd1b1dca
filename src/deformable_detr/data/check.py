"""The data check: what a data set holds and everything wrong with it, before any training.

``deformable-detr check-data`` prints :func:`check_data`'s report; ``train`` and ``evaluate`` read
their splits through :func:`load_split`, which runs the same check and stops on a problem that
would stop training later. Images are probed, not decoded (:mod:`.images`), and what the probe
learns is cached by file size and modification time, so an unchanged data set is checked again
without opening its images.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .coco import (
    CocoDataset,
    DatasetError,
    Problem,
    Split,
    Transforms,
    category_names,
    class_key,
    object_area,
    size_problem,
)
from .formats import detect_format, read_split, require_split, split_names
from .images import EXIF_TURNS, ImageProbe

# COCO's object size classes, by area in pixels: small below 32^2, large above 96^2 (as its APs, APm, APl).
SMALL_AREA, LARGE_AREA = 32**2, 96**2
# Exported coordinates are rounded; a box this far past the image's edge is rounding, not a wrong box.
EDGE_TOLERANCE = 0.5


@dataclass
class SplitReport:
    """What one split holds, and its problems."""

    name: str
    images: int = 0
    without_objects: int = 0
    boxes: int = 0
    crowd: int = 0  # COCO crowd boxes and VOC difficult objects: neither trained on nor scored
    classes: dict[int, int] = dataclasses.field(default_factory=dict)  # category id -> boxes, in the file's order
    class_names: dict[int, str] = dataclasses.field(default_factory=dict)  # category id -> name
    sizes: dict[str, int] = dataclasses.field(default_factory=lambda: dict.fromkeys(("small", "medium", "large"), 0))
    smallest: tuple[float, float, str] | None = None  # width and height in pixels, and the image
    problems: list[Problem] = dataclasses.field(default_factory=list)
    unreadable: bool = False  # the split could not be read at all: its problem is all there is to say

    def check_scorable(self, data: str | Path) -> None:
        """Raise DatasetError where the split has no object that COCO evaluation scores (crowd and
        difficult ones are not): its AP is then not defined."""
        if self.boxes == self.crowd:
            raise DatasetError(f"{data}: the {self.name!r} split has no objects to score (crowd and difficult ones "
                               "are not), so its COCO AP is not defined")

    def lines(self) -> list[str]:
        if self.unreadable:
            return [f"{self.name}: cannot be read", *(f"  {problem}" for problem in self.problems)]
        counts = f"{self.images:,} images ({self.without_objects:,} without objects), {self.boxes:,} boxes"
        lines = [f"{self.name}: {counts} ({self.crowd:,} crowd or difficult)"]
        labels = _class_labels(self.class_names)
        lines.append("  classes: " + ", ".join(f"{labels[category]} {count:,}" for category, count in self.classes.items()))
        sizes = ", ".join(f"{count:,} {size}" for size, count in self.sizes.items())
        if self.smallest is not None:
            width, height, image = self.smallest
            sizes += f"; smallest box {width:.1f} x {height:.1f} px ({image})"
        lines.append(f"  object sizes: {sizes}")
        lines += [f"  {problem}" for problem in self.problems]
        return lines


def _class_labels(names: dict[int, str]) -> dict[int, str]:
    """Each category's name, with its id where other categories share the name."""
    shared = {category for ids in _ids_by_name(names).values() if len(ids) > 1 for category in ids}
    return {category: f"{name} (id {category})" if category in shared else name for category, name in names.items()}


def _ids_by_name(names: dict[int, str]) -> dict[str, list[int]]:
    """The category ids of each name, compared as evaluation compares them (:func:`~.coco.class_key`)."""
    ids: dict[str, list[int]] = defaultdict(list)
    for category, name in names.items():
        ids[class_key(name)].append(category)
    return ids


@dataclass
class DataReport:
    """:func:`check_data`'s findings for every split of one data set."""

    root: Path
    format: str
    splits: list[SplitReport]

    @property
    def problems(self) -> list[Problem]:
        return [problem for split in self.splits for problem in split.problems]

    @property
    def stops_training(self) -> bool:
        return any(problem.fatal for problem in self.problems)

    def __str__(self) -> str:
        lines = [f"{self.root}: {self.format.upper()} data set"]
        for split in self.splits:
            lines += split.lines()
        return "\n".join([*lines, self._summary()])

    def _summary(self) -> str:
        """How many problems, and the splits some of them stop training or evaluation on: a broken test
        split stops nothing that reads only train and val."""
        if not self.problems:
            return "no problems"
        fatal = sum(problem.fatal for problem in self.problems)
        stopped = [split.name for split in self.splits if any(problem.fatal for problem in split.problems)]
        where = f" or evaluation on {', '.join(stopped)}" if stopped else ""
        return f"{len(self.problems)} problem(s), {fatal} of which stop training{where}"


def check_split(split: Split, probe: ImageProbe) -> SplitReport:
    """Count ``split``'s images, boxes, classes and object sizes, and find its problems: no images at
    all, unreadable, missing or differently sized images, and boxes of zero area or outside their image."""
    report = SplitReport(split.name, problems=list(split.problems))
    data = split.data
    if not data["images"]:
        # Nothing to train on or evaluate. An empty folder or list is a mistake, not a choice: a data
        # set without validation has no validation split at all.
        report.problems.append(Problem(f"{split.annotation_file}: the {split.name} split has no images"))
    report.class_names = category_names(data)
    report.classes = dict.fromkeys(report.class_names, 0)
    report.problems += _shared_names(report.class_names, split.annotation_file)
    images = {}
    turned = []  # (path, EXIF orientation) of usable images that viewers show turned
    for image in data["images"]:
        path = split.image_dir / image["file_name"]
        info = probe(path)
        if info.problem is not None:
            problem = f"{path}: {info.problem}"
        else:
            problem = size_problem(path, info.width, info.height, image, split.annotation_file, info.orientation)
        if problem is not None:
            report.problems.append(Problem(problem))
            continue
        images[image["id"]] = image
        if info.orientation != 1:
            turned.append((path, info.orientation))
    report.images = len(data["images"])
    if turned:
        report.problems.append(_turned_problem(turned))

    with_objects = set()
    for annotation in data["annotations"]:
        image = images.get(annotation["image_id"])
        if image is None:
            continue  # its image is a problem already
        box = _clipped_box(annotation, image, split, report.problems)
        if box is None:
            continue
        report.boxes += 1
        if annotation.get("iscrowd", 0):
            report.crowd += 1
            continue
        with_objects.add(image["id"])
        report.classes[annotation["category_id"]] += 1
        width, height = box
        area = object_area(annotation)
        report.sizes["small" if area < SMALL_AREA else "medium" if area <= LARGE_AREA else "large"] += 1
        if report.smallest is None or width * height < report.smallest[0] * report.smallest[1]:
            report.smallest = (width, height, image["file_name"])
    report.without_objects = len(images) - len(with_objects)
    return report


def _shared_names(names: dict[int, str], annotation_file: Path) -> list[Problem]:
    """One problem for each name that several categories share, most often left by merging data sets.
    It does not stop training: the ids stay apart, counted, trained and scored as classes of their own,
    and some data sets give two classes one name under different supercategories; but the model's
    detections of either are named alike, and a merge's duplicates split one class in two."""
    return [
        Problem(f"{annotation_file}: categories {', '.join(map(str, ids[:-1]))} and {ids[-1]} share the name "
                f"{names[ids[0]]!r}: trained and scored as separate classes, their detections named alike "
                "(merged data sets? give them one id)", fatal=False)
        for ids in _ids_by_name(names).values() if len(ids) > 1
    ]  # fmt: skip


def _class_problems(split: SplitReport, source: Path, training: SplitReport, training_source: Path, *,
                    stops_training: bool) -> list[Problem]:
    """The problems of ``split``'s classes (read from ``source``) against those of the ``training``
    split (read from ``training_source``), which stop training where ``stops_training`` (the split
    it evaluates): a category id that names another class there, compared as evaluation compares
    names, and objects of a class training has none of. COCO files exported apart can number their
    classes apart, and training, evaluation and checkpoints go by id: a validation split numbered
    otherwise, or with objects of a class training does not know, scores the model on classes it did
    not learn, and evaluate refuses the checkpoint."""
    names, known, learnt = split.class_names, training.class_names, training.classes
    renumbered = [
        Problem(f"{source}: category {category} is {name!r}, but {known[category]!r} in {training_source} "
                "(classes are learnt and scored by id: number this split's as training's are)", stops_training)
        for category, name in names.items() if category in known and class_key(known[category]) != class_key(name)
    ]  # fmt: skip
    unknown = [
        Problem(f"{source}: category {category} ({names[category]!r}) has {_objects(count)}, but {training_source} "
                f"{'has none' if category in known else 'has no such category'}, so the model cannot learn it (give "
                "the training split objects of it, or leave them out of this split)", stops_training and category not in known)
        for category, count in split.classes.items() if count and not learnt.get(category)
    ]  # fmt: skip
    return renumbered + unknown


def _objects(count: int) -> str:
    return f"{count:,} object{'' if count == 1 else 's'}"


def check_same_classes(split: SplitReport, source: Path, training: SplitReport, training_source: Path) -> None:
    """Raise DatasetError on the first class problem of the validation ``split`` against the
    ``training`` split that stops training (:func:`_class_problems`)."""
    problems = _class_problems(split, source, training, training_source, stops_training=True)
    fatal = [problem for problem in problems if problem.fatal]
    if fatal:
        raise DatasetError(str(fatal[0]))


def _turned_problem(turned: list[tuple[Path, int]]) -> Problem:
    """One line for all the images whose EXIF orientation turns them in viewers: training reads
    the stored pixels, so boxes drawn on what a viewer showed would be misplaced, and nothing in the
    files says which was annotated (a swapped size, where the format records one, is caught above)."""
    path, orientation = turned[0]
    more = f" (and {len(turned) - 1} more such images)" if len(turned) > 1 else ""
    return Problem(
        f"{path}: its EXIF orientation shows it {EXIF_TURNS[orientation]} in viewers{more}; training reads "
        "the pixels as stored, so boxes drawn on the turned picture are misplaced: if they were, save the images upright",
        fatal=False,
    )


def _clipped_box(
    annotation: dict[str, Any], image: dict[str, Any], split: Split, problems: list[Problem]
) -> tuple[float, float] | None:
    """The box's width and height once clipped to its image, as the data set uses it; None if the
    data set leaves it out. A box it has to clip or leave out is a problem that does not stop training."""
    x, y, width, height = annotation["bbox"]
    image_width, image_height = image["width"], image["height"]
    name = annotation.get("source") or f"{split.annotation_file}: annotation {annotation.get('id', '?')} (image {image['file_name']})"
    shown = "[" + ", ".join(f"{value:g}" for value in annotation["bbox"]) + "]"
    if width <= 0 or height <= 0:
        problems.append(Problem(f"{name}: box {shown} has zero area (left out)", fatal=False))
        return None
    x1, y1 = max(x, 0), max(y, 0)
    x2, y2 = min(x + width, image_width), min(y + height, image_height)
    if x2 <= x1 or y2 <= y1:
        problems.append(Problem(f"{name}: box {shown} lies outside the {image_width}x{image_height} image (left out)", fatal=False))
        return None
    if min(x, y) < -EDGE_TOLERANCE or x + width > image_width + EDGE_TOLERANCE or y + height > image_height + EDGE_TOLERANCE:
        problems.append(Problem(f"{name}: box {shown} reaches outside the {image_width}x{image_height} image (clipped)", fatal=False))
    return x2 - x1, y2 - y1


def check_data(root: str | Path, *, format: str | None = None, splits: list[str] | None = None) -> DataReport:
    """Check every split of the data set ``root`` (or those in ``splits``), in ``format`` (detected
    when None). A split that cannot be read at all is reported with that one problem.

    Raises:
        DatasetError: the data set has no splits in ``format``, or not one of ``splits`` (the line
            names those it has).
    """
    if isinstance(splits, str):  # it would be read as one split a letter
        raise TypeError(f"splits is a list of split names, such as [{splits!r}], not a str")
    root = Path(root)
    format = format or detect_format(root)
    for name in splits or []:
        require_split(root, name, format)
    probe = ImageProbe.for_data(root)
    reports, sources = [], {}
    # Where there are none, split_names raises: no split checked is not "no problems".
    for name in splits or split_names(root, format):
        try:
            split = read_split(root, name, format, probe)
            report = check_split(split, probe)
        except DatasetError as error:
            reports.append(SplitReport(name, problems=[Problem(str(error))], unreadable=True))
            continue
        reports.append(report)
        sources[name] = split.annotation_file
    probe.save()
    _check_classes_against_training(reports, sources)
    return DataReport(root, format, reports)


def _check_classes_against_training(reports: list[SplitReport], sources: dict[str, Path]) -> None:
    """Add to each split's problems those of its classes against the training split's: the first
    split named train... (train, train2017, trainval), where there is one. Those of a split named
    val... stop training, as train refuses the split it evaluates so; of another, they do not."""
    training = next((report for report in reports if report.name.startswith("train") and not report.unreadable), None)
    if training is None:
        return
    for report in reports:
        if report is not training and not report.unreadable:
            report.problems += _class_problems(report, sources[report.name], training, sources[training.name],
                                               stops_training=report.name.startswith("val"))


def load_split(
    root: str | Path, split: str, transforms: Transforms | None = None, *, format: str | None = None,
    probe: ImageProbe | None = None,
) -> tuple[CocoDataset, SplitReport]:
    """The data set of ``split`` of ``root`` (any format, detected when ``format`` is None), checked
    first, with the check's report.

    ``probe`` is the image probe to check with; by default the data set's own, whose cache is read
    and written here. Loading several splits, pass one (``ImageProbe.for_data(root)``) and save it
    after the last.

    Raises:
        DatasetError: the first problem that would stop training, naming its file.
    """
    own_probe = probe is None
    probe = ImageProbe.for_data(root) if own_probe else probe
    read = read_split(root, split, format, probe)
    report = check_split(read, probe)
    if own_probe:
        probe.save()
    fatal = [problem for problem in report.problems if problem.fatal]
    if fatal:
        more = f" (and {len(fatal) - 1} more problem(s): deformable-detr check-data {root})" if len(fatal) > 1 else ""
        raise DatasetError(f"{fatal[0]}{more}")
    return CocoDataset(read.image_dir, read.annotation_file, transforms, data=read.data), report


def coco_split(root: str | Path, split: str, transforms: Transforms | None = None) -> CocoDataset:
    """:func:`load_split` of a split laid out as COCO is: ``root/<split>/`` images and
    ``root/annotations/instances_<split>.json`` (``split="val2017"`` for COCO, ``"val"`` for
    :func:`~deformable_detr.data.synthetic.synthesize`)."""
    return load_split(root, split, transforms, format="coco")[0]
