"""The data check: every problem it knows, each one line naming its file, from `check-data` and from
`train` (which checks before its first epoch), with and without loader processes; a bad image that only
a full decode finds still stops a run with one line; files that are not checkpoints say so."""

from __future__ import annotations

import io
import json
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import ExifTags, Image

from deformable_detr.cli import main
from deformable_detr.data import ImageProbe, check_data, read_image, synthesize
from deformable_detr.data import images as images_module

from data_writers import WRITERS, write_coco, write_decompression_bomb, write_voc, write_yolo


def run(capsys, *argv):
    code = main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    # Progress bars share stderr (each redraw after a carriage return); what is left is what was said.
    said = [line for line in err.splitlines() if line.strip() and not line.startswith(("epoch ", "evaluate"))]
    return code, out, said


def train(capsys, data, tmp_path, workers, *extra):
    return run(capsys, "train", "--data", data, "--output-dir", tmp_path / f"run{workers}", "--epochs", "1",
               "--batch-size", "2", "--image-size", "64", "--workers", workers, *extra)  # fmt: skip


def truncate(path):
    """Cut the file short, as an interrupted copy does: the header is intact, the end is missing."""
    path.write_bytes(path.read_bytes()[:-8])


def corrupt_png(path, size=(64, 48)):
    """A PNG whose chunks all pass their checksums but whose pixel data does not decompress: a cheap
    check passes it, only decoding finds it."""
    buffer = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buffer, "PNG")
    data, out, position = buffer.getvalue(), buffer.getvalue()[:8], 8
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position : position + 8])
        body = data[position + 8 : position + 8 + length]
        if kind == b"IDAT":
            body = bytes(byte ^ 0x5A for byte in body)
        out += struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        position += 12 + length
    path.write_bytes(out)


def save_with_orientation(image, path, orientation):
    """``image`` saved at ``path`` with an EXIF orientation tag, as a phone saves a photo."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    image.save(path, exif=exif)


def coco_with(tmp_path, edit):
    """The writers' COCO set, its JSON changed by ``edit(data)``."""
    root = write_coco(tmp_path / "coco")
    path = root / "annotations" / "instances_train.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return root


def duplicate_image_id(data):
    data["images"][2]["id"] = 1  # image c, which has no objects


def unknown_category(data):
    data["annotations"][0]["category_id"] = 7


def no_images(data):
    data["images"], data["annotations"] = [], []


def duplicate_category_id(data):
    data["categories"].append({"id": 1, "name": "bird"})


def width_as_text(data):
    data["images"][2]["width"] = "50"  # image c, which has no objects


def crowd_as_text(data):
    data["annotations"][0]["iscrowd"] = "0"  # which reads as true


def fatal_cases(tmp_path):
    """(data set, the line) for every problem that stops training."""
    corrupt = write_coco(tmp_path / "corrupt")
    truncate(corrupt / "train" / "b.jpg")
    unreadable = write_coco(tmp_path / "unreadable")
    (unreadable / "train" / "c.jpg").write_text("not an image")
    missing = write_coco(tmp_path / "missing")
    (missing / "train" / "a.jpg").unlink()
    missing_voc = write_voc(tmp_path / "missing-voc")
    (missing_voc / "JPEGImages" / "a.jpg").unlink()
    resized = write_voc(tmp_path / "resized")
    Image.new("RGB", (48, 64)).save(resized / "JPEGImages" / "a.jpg")
    annotated_upright = write_voc(tmp_path / "annotated-upright")  # a.xml says 64x48: the picture a viewer shows
    save_with_orientation(Image.new("RGB", (48, 64)), annotated_upright / "JPEGImages" / "a.jpg", 6)
    unknown_class = write_yolo(tmp_path / "unknown-class")
    (unknown_class / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    not_json = write_coco(tmp_path / "not-json")
    (not_json / "annotations" / "instances_train.json").write_text("[1, 2")
    bomb = write_coco(tmp_path / "bomb")
    write_decompression_bomb(bomb / "train" / "a.jpg")
    bad_line = write_yolo(tmp_path / "bad-line")
    (bad_line / "labels" / "train" / "b.txt").write_text("1 0.5 0.5\n")
    empty_yolo = write_yolo(tmp_path / "empty-yolo")
    for folder in ("images", "labels"):
        shutil.rmtree(empty_yolo / folder / "train")
        (empty_yolo / folder / "train").mkdir()
    nan_yolo = write_yolo(tmp_path / "nan-yolo")
    (nan_yolo / "labels" / "train" / "a.txt").write_text("0 nan 0.5 0.2 0.2\n")
    float_pixels = write_yolo(tmp_path / "float-pixels")
    Image.fromarray(np.ones((30, 50), dtype=np.float32)).save(float_pixels / "images" / "train" / "d.tif")
    names_from_one = write_yolo(tmp_path / "names-from-one")
    (names_from_one / "data.yaml").write_text("train: images/train\nnames: {1: cat, 2: dog}\n")
    labels_elsewhere = write_yolo(tmp_path / "labels-elsewhere")
    (labels_elsewhere / "labels").rename(labels_elsewhere / "annotations")
    in_pixels = write_yolo(tmp_path / "in-pixels")
    (in_pixels / "labels" / "train" / "a.txt").write_text("0 5 10 10 20\n1 47 29 34 38\n")
    (in_pixels / "labels" / "train" / "b.txt").write_text("0 15.5 7.5 7 9\n")
    nan_voc = write_voc(tmp_path / "nan-voc")
    xml = nan_voc / "Annotations" / "a.xml"
    xml.write_text(xml.read_text().replace("<xmin>1</xmin>", "<xmin>nan</xmin>"))
    return {
        "corrupt image": (corrupt, f"{corrupt / 'train' / 'b.jpg'}: cannot read image (JPEG cut short: no end-of-image marker)"),
        "decompression bomb": (bomb, f"{bomb / 'train' / 'a.jpg'}: cannot read image (Image size (400000000 pixels) "
                                     "exceeds limit of 178956970 pixels, could be decompression bomb DOS attack.)"),
        "unreadable image": (unreadable, f"{unreadable / 'train' / 'c.jpg'}: cannot read image (not an image format Pillow knows)"),
        "missing image": (missing, f"{missing / 'train' / 'a.jpg'}: image file not found"),
        "missing image (VOC)": (missing_voc, f"{missing_voc / 'Annotations' / 'a.xml'}: image not found: no "
                                f"{missing_voc / 'JPEGImages' / 'a'}.jpg (nor with another image suffix)"),
        "image of another size": (resized, f"{resized / 'JPEGImages' / 'a.jpg'}: image is 48x64 but a.xml says 64x48"),
        "image annotated as viewers show it": (annotated_upright, f"{annotated_upright / 'JPEGImages' / 'a.jpg'}: image is 48x64 "
                                               "but a.xml says 64x48 (its EXIF orientation shows it turned 90° clockwise, as "
                                               "annotated: save it upright)"),
        "unknown class (YOLO)": (unknown_class, f"{unknown_class / 'labels' / 'train' / 'a.txt'}: line 2: unknown class 5 (data.yaml names 0..1)"),
        "unknown class (COCO)": (coco_with(tmp_path / "category", unknown_category),
                                 "instances_train.json: annotation 1 (image 1): category id 7 is not among the declared categories"),
        "duplicate image ids": (coco_with(tmp_path / "duplicate", duplicate_image_id), "instances_train.json: image id 1 appears twice"),
        "annotation file": (not_json, "instances_train.json: not valid JSON (Expecting ',' delimiter: line 1 column 6 (char 5))"),
        "label line": (bad_line, f"{bad_line / 'labels' / 'train' / 'b.txt'}: line 1: expected 'class cx cy w h' or 'class x1 y1 x2 y2 x3 y3 ...', found '1 0.5 0.5'"),
        "no images (COCO)": (coco_with(tmp_path / "empty-coco", no_images), "instances_train.json: the train split has no images"),
        "no images (YOLO)": (empty_yolo, f"{empty_yolo / 'data.yaml'}: the train split has no images"),
        "NaN box (YOLO)": (nan_yolo, f"{nan_yolo / 'labels' / 'train' / 'a.txt'}: line 1: expected finite coordinates, found '0 nan 0.5 0.2 0.2'"),
        "labels not found (YOLO)": (labels_elsewhere, f"{labels_elsewhere / 'labels' / 'train'}: no label file for any of the 3 "
                                    "images of the train split (YOLO labels are where the images are, with labels/ for "
                                    "images/ and .txt for the image's suffix)"),
        "labels in pixels (YOLO)": (in_pixels, f"{in_pixels / 'labels' / 'train' / 'a.txt'}: line 1: coordinates above 1 (and 2 "
                                    "more such lines): they must be normalised to 0-1, divided by the image's width and height"),
        "32-bit pixels": (float_pixels, f"{float_pixels / 'images' / 'train' / 'd.tif'}: cannot read image (32-bit float pixels: save it with 8 or 16 bits a channel)"),
        "NaN box (VOC)": (nan_voc, f"{xml}: object 'cat' has a box corner that is not a finite number"),
        "duplicate category ids": (coco_with(tmp_path / "categories", duplicate_category_id), "instances_train.json: category id 1 appears twice"),
        "width as text": (coco_with(tmp_path / "width", width_as_text), "instances_train.json: image 3: width '50' is not a positive whole number"),
        "iscrowd as text": (coco_with(tmp_path / "crowd", crowd_as_text), "instances_train.json: annotation 1 (image 1): iscrowd '0' is not 0 or 1"),
        "class names not keyed 0..n-1 (YOLO)": (names_from_one, f"{names_from_one / 'data.yaml'}: 'names' must name each class index 0..1: "
                                                               "no name for 0; keys not among them: 2"),
    }  # fmt: skip


FATAL = ["corrupt image", "decompression bomb", "unreadable image", "missing image", "missing image (VOC)", "image of another size",
         "image annotated as viewers show it", "unknown class (YOLO)",
         "unknown class (COCO)", "duplicate image ids", "annotation file", "label line", "no images (COCO)", "no images (YOLO)",
         "labels not found (YOLO)", "labels in pixels (YOLO)", "32-bit pixels", "NaN box (YOLO)", "NaN box (VOC)", "duplicate category ids", "width as text", "iscrowd as text",
         "class names not keyed 0..n-1 (YOLO)"]  # fmt: skip


@pytest.mark.parametrize("case", FATAL)
def test_check_data_reports_what_stops_training(tmp_path, capsys, case):
    root, line = fatal_cases(tmp_path)[case]
    code, out, said = run(capsys, "check-data", root)
    assert code == 1 and said == []
    problems = [text for text in out.splitlines() if line in text]
    assert len(problems) == 1 and problems[0].strip().endswith(line)
    assert out.rstrip().endswith("1 problem(s), 1 of which stop training or evaluation on train")


def test_the_summary_names_the_splits_a_problem_stops(tmp_path, capsys):
    # A broken test split stops evaluating on it, not training, which reads train and val.
    root = write_yolo(write_yolo(tmp_path), split="test")
    (root / "labels" / "test" / "a.txt").write_text("5 0.5 0.5 0.2 0.2\n")
    code, out, _ = run(capsys, "check-data", root)
    assert code == 1 and out.rstrip().endswith("1 problem(s), 1 of which stop training or evaluation on test")


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", FATAL)
def test_train_stops_before_the_first_epoch_with_one_line(tmp_path, capsys, case, workers):
    root, line = fatal_cases(tmp_path)[case]
    code, _, said = train(capsys, root, tmp_path, workers)
    assert code == 1 and len(said) == 1
    assert said[0].startswith("deformable-detr: error: ") and said[0].endswith(line)
    assert not (tmp_path / f"run{workers}" / "checkpoint.pt").exists()


def tolerated_problems(tmp_path):
    """A YOLO set with every problem the data set works around, and their lines."""
    root = write_yolo(tmp_path / "yolo")
    labels = root / "labels" / "train"
    # cx 0.9, w 0.4: from 0.7 to 1.1 of the width; a zero-width box; a box wholly left of the image.
    (labels / "a.txt").write_text("0 0.9 0.5 0.4 0.2\n1 0.5 0.5 0 0.2\n1 -0.5 0.5 0.2 0.2\n")
    (labels / "stray.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    return root, [
        f"{labels / 'a.txt'}, line 1: box [44.8, 19.2, 25.6, 9.6] reaches outside the 64x48 image (clipped)",
        f"{labels / 'a.txt'}, line 2: box [32, 19.2, 0, 9.6] has zero area (left out)",
        f"{labels / 'a.txt'}, line 3: box [-38.4, 19.2, 12.8, 9.6] lies outside the 64x48 image (left out)",
        f"{labels / 'stray.txt'}: label file without an image (ignored)",
    ]


@pytest.mark.parametrize("name", ["cat", "Cat"])  # as evaluation compares names: whatever the case
def test_categories_that_share_a_name_are_counted_apart_and_named_in_a_line_that_does_not_stop_training(
    tmp_path, capsys, name
):
    def another_cat(data):  # as merging two data sets leaves it
        data["categories"].append({"id": 7, "name": name})
        data["annotations"].append({**data["annotations"][0], "id": 99, "category_id": 7})

    root = coco_with(tmp_path, another_cat)
    code, out, _ = run(capsys, "check-data", root)
    assert code == 0
    assert f"  classes: cat (id 1) 2, dog 1, {name} (id 7) 1\n" in out
    line = (f"{root / 'annotations' / 'instances_train.json'}: categories 1 and 7 share the name 'cat': trained and "
            "scored as separate classes, their detections named alike (merged data sets? give them one id)")
    assert f"  {line}\n" in out and out.rstrip().endswith("1 problem(s), 0 of which stop training")


def test_check_data_reports_what_training_works_around(tmp_path, capsys):
    root, lines = tolerated_problems(tmp_path)
    code, out, _ = run(capsys, "check-data", root)
    assert code == 0
    reported = [text.strip() for text in out.splitlines() if text.startswith(f"  {root}")]
    assert sorted(reported) == sorted(lines)
    assert out.rstrip().endswith("4 problem(s), 0 of which stop training")


@pytest.mark.parametrize("workers", [0, 2])
def test_train_goes_on_past_what_it_works_around_and_says_so(tmp_path, capsys, workers):
    root, lines = tolerated_problems(tmp_path)
    code, out, said = train(capsys, root, tmp_path, workers)
    assert code == 0 and said == []
    notes = [text for text in out.splitlines() if text.startswith("data check: ")]
    assert len(notes) == 1 and "4 problem(s) in train that do not stop training" in notes[0]
    assert f"the first: {lines[3]} (deformable-detr check-data {root} lists them)" in notes[0]
    assert "no validation split, so no best.pt" in out


def test_a_validation_split_without_objects_is_refused_before_training_and_by_evaluate(tmp_path, capsys):
    data = synthesize(tmp_path / "shapes", train=2, val=2, image_size=64, seed=1)
    checkpoint = tmp_path / "run0" / "checkpoint.pt"
    assert train(capsys, data, tmp_path, 0, "--val-split", "train")[0] == 0
    path = data / "annotations" / "instances_val.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "annotations": []}))
    line = f"deformable-detr: error: {data}: the 'val' split has no objects to score (crowd and difficult ones are not), so its COCO AP is not defined"
    code, _, said = train(capsys, data, tmp_path / "again", 0)
    assert code == 1 and said == [line]
    code, _, said = run(capsys, "evaluate", checkpoint, "--data", data, "--workers", "0")
    assert code == 1 and said == [line]


def test_splits_numbering_their_classes_apart_are_refused_by_the_check_and_before_training(tmp_path, capsys):
    # Two COCO files exported apart: val's ids 1 and 2 are train's classes swapped.
    data = write_coco(write_coco(tmp_path / "pets"), split="val")
    path = data / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 1, "name": "dog"}, {"id": 2, "name": "cat"}]
    for annotation in coco["annotations"]:
        annotation["category_id"] = 3 - annotation["category_id"]
    path.write_text(json.dumps(coco))
    train_file = data / "annotations" / "instances_train.json"
    line = (f"{path}: category 1 is 'dog', but 'cat' in {train_file} "
            "(classes are learnt and scored by id: number this split's as training's are)")  # fmt: skip
    report = check_data(data)
    assert [str(problem) for problem in report.splits[1].problems][0] == line and report.stops_training
    assert train(capsys, data, tmp_path, 0)[::2] == (1, [f"deformable-detr: error: {line}"])


def test_objects_of_a_class_the_training_split_lacks_are_refused_by_the_check_and_before_training(tmp_path, capsys):
    """Such a model cannot name them: evaluation would score it on a class it never learnt, and
    refuse its best.pt. A class training declares but has no objects of is said, and evaluates."""
    data = write_coco(write_coco(write_coco(tmp_path / "pets"), split="val"), split="test")
    train_file, val_file, test_file = (data / "annotations" / f"instances_{split}.json" for split in ("train", "val", "test"))
    training = json.loads(train_file.read_text())
    training["categories"].append({"id": 5, "name": "horse"})
    train_file.write_text(json.dumps(training))
    for path in (val_file, test_file):
        coco = json.loads(path.read_text())
        coco["categories"] += [{"id": 3, "name": "bird"}, {"id": 4, "name": "fish"}, {"id": 5, "name": "horse"}]
        coco["annotations"][0]["category_id"], coco["annotations"][1]["category_id"] = 3, 5  # fish: no objects
        coco["categories"] = [category for category in coco["categories"] if category["id"] != 2]  # dog: train's alone
        coco["annotations"] = [box for box in coco["annotations"] if box["category_id"] != 2]
        path.write_text(json.dumps(coco))
    line = (f"{val_file}: category 3 ('bird') has 1 object, but {train_file} has no such category, so the model "
            "cannot learn it (give the training split objects of it, or leave them out of this split)")
    report = check_data(data)
    [test, train_report, val] = report.splits
    assert [(str(problem), problem.fatal) for problem in val.problems] == [
        (line, True),
        (f"{val_file}: category 5 ('horse') has 1 object, but {train_file} has none, so the model cannot learn it "
         "(give the training split objects of it, or leave them out of this split)", False),
    ]
    assert not train_report.problems  # checked against the training split, not the first by name
    assert [problem.fatal for problem in test.problems] == [False, False]  # a split training does not evaluate
    assert report.stops_training
    assert train(capsys, data, tmp_path, 0)[::2] == (1, [f"deformable-detr: error: {line}"])


def test_splits_numbering_their_classes_alike_whatever_the_case_are_fine(tmp_path):
    data = write_coco(write_coco(tmp_path / "pets"), split="val")
    path = data / "annotations" / "instances_val.json"
    coco = json.loads(path.read_text())
    coco["categories"] = [{"id": 1, "name": "Cat"}, {"id": 2, "name": "dog"}]  # evaluation compares names so too
    path.write_text(json.dumps(coco))
    assert not check_data(data).problems


@pytest.mark.parametrize("workers", [0, 2])
def test_an_image_only_decoding_finds_stops_the_run_with_one_line(tmp_path, capsys, workers):
    data = synthesize(tmp_path / "shapes", train=4, val=2, image_size=64, seed=1)
    path = data / "annotations" / "instances_train.json"
    coco = json.loads(path.read_text())
    image = coco["images"][2]
    corrupt_png(data / "train" / "bad.png", (image["width"], image["height"]))
    image["file_name"] = "bad.png"
    path.write_text(json.dumps(coco))
    assert not check_data(data).problems  # the check cannot see it
    code, _, said = train(capsys, data, tmp_path, workers)
    assert code == 1
    assert said == [f"deformable-detr: error: {data / 'train' / 'bad.png'}: cannot read image (broken data stream when reading image file)"]


@pytest.mark.parametrize("workers", [0, 2])
def test_evaluate_stops_on_a_bad_image_with_one_line(tmp_path, capsys, workers):
    data = synthesize(tmp_path / "shapes", train=2, val=2, image_size=64, seed=1)
    assert train(capsys, data, tmp_path, 0, "--val-split", "train")[0] == 0
    corrupt_png(data / "val" / "000002.jpg", (64, 64))  # a PNG under a .jpg name reads all the same
    image = json.loads((data / "annotations" / "instances_val.json").read_text())["images"][1]
    corrupt_png(data / "val" / "000002.jpg", (image["width"], image["height"]))
    code, _, said = run(capsys, "evaluate", tmp_path / "run0" / "best.pt", "--data", data, "--image-size", "64",
                        "--workers", workers)  # fmt: skip
    assert code == 1 and len(said) == 1 and said[0].endswith("000002.jpg: cannot read image (broken data stream when reading image file)")


@pytest.mark.parametrize("format", sorted(WRITERS))
def test_images_that_viewers_show_turned_are_named_in_one_line_that_does_not_stop_training(tmp_path, capsys, format):
    root = WRITERS[format](tmp_path / format)
    paths = sorted(path for path in root.rglob("*.jpg"))
    for path, orientation in zip(paths, (3, 6)):  # a and b; c stays as stored
        save_with_orientation(Image.open(path), path, orientation)
    code, out, _ = run(capsys, "check-data", root)
    assert code == 0
    line = (f"{paths[0]}: its EXIF orientation shows it turned 180° in viewers (and 1 more such images); training "
            "reads the pixels as stored, so boxes drawn on the turned picture are misplaced: if they were, save the images upright")
    assert f"  {line}\n" in out and out.rstrip().endswith("1 problem(s), 0 of which stop training")


def test_a_malformed_exif_block_says_nothing_about_orientation_and_stops_nothing(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (20, 10)).save(path, exif=b"garbage")  # not the TIFF structure EXIF is
    assert images_module.inspect_image(path) == images_module.ImageInfo(20, 10)
    assert read_image(path, upright=True).shape == (3, 10, 20)


def test_a_tiff_is_read_and_checked_upright_as_pillow_reads_it(tmp_path):
    path = tmp_path / "scan.tif"
    save_with_orientation(Image.new("RGB", (30, 20)), path, 6)
    assert images_module.inspect_image(path) == images_module.ImageInfo(20, 30)  # nothing left to turn
    assert read_image(path).shape == read_image(path, upright=True).shape == (3, 30, 20)


def test_the_check_is_cached_by_file_size_and_time(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path / "cache"))
    root = write_coco(tmp_path / "coco")
    opened = []
    inspect = images_module.inspect_image
    monkeypatch.setattr(images_module, "inspect_image", lambda path: opened.append(path.name) or inspect(path))
    first = str(check_data(root))
    assert sorted(opened) == ["a.jpg", "b.jpg", "c.jpg"]
    opened.clear()
    assert str(check_data(root)) == first and opened == []
    truncate(root / "train" / "b.jpg")  # a new size
    assert check_data(root).stops_training and opened == ["b.jpg"]
    opened.clear()
    stat = (root / "train" / "a.jpg").stat()
    os.utime(root / "train" / "a.jpg", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # same size, a new time
    assert check_data(root).stops_training and opened == ["a.jpg"]  # b.jpg's problem is remembered too
    assert ImageProbe.for_data(root).cache_file.parent == tmp_path / "cache" / "data-check"


def test_a_cache_written_by_a_check_that_found_less_is_read_again(tmp_path, monkeypatch):
    monkeypatch.setenv("DEFORMABLE_DETR_CACHE", str(tmp_path / "cache"))
    root = write_coco(tmp_path / "coco")
    path = root / "train" / "a.jpg"
    Image.open(path).save(path, "GIF")  # a GIF under a .jpg name reads all the same
    truncate(path)
    check_data(root)
    cache = ImageProbe.for_data(root).cache_file
    written = json.loads(cache.read_text())
    # Before the check looked for a GIF's trailer or read orientations, it kept a plain mapping of paths.
    for found in ([64, 48, None, 1], [64, 48, None]):
        cache.write_text(json.dumps({**written["images"], str(path): [*written["images"][str(path)][:2], *found]}))
        problems = check_data(root).problems
        assert [str(problem) for problem in problems] == [f"{path}: cannot read image (GIF cut short: no trailer)"]
        assert json.loads(cache.read_text()) == written


def jpeg_with_thumbnail():
    """A 64x48 JPEG whose EXIF holds a thumbnail: a whole JPEG, end-of-image marker included, before the
    image's own scan."""
    thumbnail = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 40, 40)).save(thumbnail, "JPEG")
    thumbnail = thumbnail.getvalue()
    # TIFF: an empty IFD0, then IFD1 giving the offset (44, right after it) and length of the thumbnail.
    tiff = b"II*\x00" + struct.pack("<IHIH", 8, 0, 14, 2) + struct.pack("<HHII", 0x201, 4, 1, 44)
    tiff += struct.pack("<HHIII", 0x202, 4, 1, len(thumbnail), 0)
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)  # a scan of some kilobytes
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "JPEG", exif=b"Exif\x00\x00" + tiff + thumbnail)
    return buffer.getvalue()


def plain_jpeg():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "JPEG")
    return buffer.getvalue()


@pytest.mark.parametrize("jpeg", [plain_jpeg, jpeg_with_thumbnail])
def test_a_jpeg_with_data_after_its_end_passes_the_check(tmp_path, jpeg):
    path = tmp_path / "phone.jpg"
    path.write_bytes(jpeg() + b"\x00" * 296 + b"SEFT")  # as Samsung's trailer ends; motion photos append a video
    assert images_module.inspect_image(path) == images_module.ImageInfo(64, 48)


@pytest.mark.parametrize("cut", ["end", "scan"])
def test_a_jpeg_cut_short_fails_the_check_whatever_its_thumbnail_holds(tmp_path, cut):
    image = jpeg_with_thumbnail()
    scan = image.rfind(b"\xff\xda")  # the main image's scan: the thumbnail's comes first
    path = tmp_path / "cut.jpg"
    path.write_bytes(image[:-8] if cut == "end" else image[: (scan + len(image)) // 2])
    assert images_module.inspect_image(path).problem == "cannot read image (JPEG cut short: no end-of-image marker)"


def test_a_multi_picture_jpeg_cut_short_fails_the_check(tmp_path):
    # Phones save MPO: a JPEG, then more pictures. Cut in half, its first picture lacks its end.
    noise = np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "MPO", save_all=True, append_images=[Image.new("RGB", (16, 12))])
    path = tmp_path / "phone.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with Image.open(path) as image:
        assert image.format == "MPO"
    assert images_module.inspect_image(path).problem == "cannot read image (JPEG cut short: no end-of-image marker)"


def pillow_bmp():
    buffer = io.BytesIO()
    Image.new("RGB", (5, 3), (90, 120, 150)).save(buffer, "BMP")  # rows of 15 bytes, padded to 16
    return buffer.getvalue()


def run_length_bmp(width=8, height=4):
    """An 8-bit BMP whose pixels are run-length encoded (RLE8), which Pillow reads but does not write:
    each row one run of colour 1, then the end of the row, the last row the end of the bitmap."""
    palette = bytes([0, 0, 0, 0, 200, 100, 50, 0])  # black and a blue, as BGR and a zero
    pixels = bytes([width, 1, 0, 0]) * (height - 1) + bytes([width, 1, 0, 1])
    offset = 14 + 40 + len(palette)
    header = b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset)
    # The info header: its size, width, height, planes, bits, compression (1: RLE8), the pixel data's size,
    # resolution, colours used and important.
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 0, 0, 2, 0)
    return header + info + palette + pixels


def pillow_tiff():
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (90, 120, 150)).save(buffer, "TIFF")  # uncompressed: the header, then the pixels
    return buffer.getvalue()


def grayscale_tiff(pixels, width, height, compression, tiled=False):
    """An 8-bit grayscale TIFF of one strip or tile: the header, its directory, then the pixel data, as
    many writers lay it out (libtiff, which Pillow compresses with, writes the directory last)."""
    offsets, counts = (324, 325) if tiled else (273, 279)
    layout = {322: width, 323: height} if tiled else {278: height}  # the tile's size, or rows per strip
    tags = {256: width, 257: height, 258: 8, 259: compression, 262: 1, 277: 1, **layout, offsets: 0, counts: len(pixels)}
    tags[offsets] = 8 + 2 + 12 * len(tags) + 4  # right after the directory
    short = {258, 259, 262, 277}
    entries = b"".join(struct.pack("<HHII", tag, 3 if tag in short else 4, 1, value) for tag, value in sorted(tags.items()))
    return b"II*\x00" + struct.pack("<IH", 8, len(tags)) + entries + b"\x00" * 4 + pixels


def packbits_tiff():
    rows = [bytes(range(row * 8, row * 8 + 8)) for row in range(4)]
    return grayscale_tiff(b"".join(b"\x07" + row for row in rows), 8, 4, compression=32773)  # each row a literal run of 8


def tiled_tiff():
    return grayscale_tiff(bytes(range(256)), 16, 16, compression=1, tiled=True)


@pytest.mark.parametrize("write", [pillow_bmp, run_length_bmp, pillow_tiff, packbits_tiff, tiled_tiff])
def test_a_bmp_or_tiff_shorter_than_its_header_says_fails_the_check(tmp_path, write):
    path = tmp_path / "image"
    path.write_bytes(write())
    with Image.open(path) as image:
        image.load()  # a whole, good file
        size, image_format = image.size, image.format
    assert images_module.inspect_image(path) == images_module.ImageInfo(*size)
    end = path.stat().st_size  # each of them ends with its pixel data
    truncate(path)
    line = f"cannot read image ({image_format} cut short: {end - 8} bytes, its pixel data ends at byte {end})"
    assert images_module.inspect_image(path).problem == line


@pytest.mark.parametrize("frames", [1, 3])
def test_a_gif_cut_short_fails_the_check(tmp_path, frames):
    path = tmp_path / "a.gif"
    noise = np.random.default_rng(0).integers(0, 256, (frames, 48, 64, 3), dtype=np.uint8)
    first, *rest = (Image.fromarray(frame) for frame in noise)
    first.save(path, save_all=True, append_images=rest, loop=0, duration=100)
    assert images_module.inspect_image(path) == images_module.ImageInfo(64, 48)
    truncate(path)
    assert images_module.inspect_image(path).problem == "cannot read image (GIF cut short: no trailer)"


@pytest.mark.parametrize("command", [["inspect"], ["detect", "{image}", "--out", "{out}"], ["export", "--out", "{out}/m.onnx"],
                                     ["evaluate", "--data", "{data}"], ["explain", "{image}", "--out", "{out}/e.png"]])  # fmt: skip
def test_a_file_that_is_not_a_checkpoint_says_so(tmp_path, capsys, command):
    notes = tmp_path / "notes.txt"
    notes.write_text("remember the milk\n")
    image = tmp_path / "image.jpg"
    Image.new("RGB", (32, 32)).save(image)
    data = write_coco(tmp_path / "coco")
    name, *rest = command
    argv = [name, notes, *(arg.format(image=image, out=tmp_path / "out", data=data) for arg in rest)]
    code, _, said = run(capsys, *argv)
    message = f"{notes}: not a checkpoint (not a PyTorch file, nor .safetensors, nor a Hugging Face folder)"
    assert code == 1 and said == [f"deformable-detr: error: {message}"]


def test_an_unknown_format_or_a_split_name_for_a_list_is_refused(tmp_path):
    data = synthesize(tmp_path / "shapes", train=2, val=1, image_size=64)
    with pytest.raises(ValueError, match="unknown data format 'bogus'; choose from coco, voc, yolo"):
        check_data(data, format="bogus")
    with pytest.raises(TypeError, match=r"splits is a list of split names, such as \['val'\], not a str"):
        check_data(data, splits="val")
