"""COCO, Pascal VOC and YOLO folders read into one dataset type: the same boxes, classes and image ids."""

from __future__ import annotations

import re
import shutil

import pytest
import torch

from deformable_detr.checkpoints import read_checkpoint
from deformable_detr.cli import main
from deformable_detr.data import DatasetError, check_data, detect_format, load_split, read_split, read_yolo, split_names
from deformable_detr.data.yolo import label_path

from data_writers import CLASSES, IMAGES, WRITERS, write_coco, write_roboflow, write_voc, write_yolo


def targets(dataset):
    """image id -> (labels, boxes as normalised cx, cy, w, h), as the model is trained on them."""
    return {int(target["image_id"]): (target["labels"].tolist(), target["boxes"]) for _, target in dataset}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {name: write(tmp_path_factory.mktemp(name)) for name, write in WRITERS.items()}


def test_every_format_reads_into_the_same_dataset(folders):
    expected = {}
    for image_id, (width, height, objects) in enumerate(IMAGES.values(), start=1):
        kept = [(label, box) for label, box, crowd in objects if not crowd]
        boxes = torch.tensor([[(x + w / 2) / width, (y + h / 2) / height, w / width, h / height]
                              for _, (x, y, w, h) in kept]).reshape(-1, 4)  # fmt: skip
        expected[image_id] = ([CLASSES.index(label) + 1 for label, _ in kept], boxes)
    for name, root in folders.items():
        assert detect_format(root) == name
        dataset, report = load_split(root, "train")
        assert report.problems == [], name
        assert dataset.category_names == {1: "cat", 2: "dog"}, name
        assert dataset.ids == [1, 2, 3], name
        actual = targets(dataset)
        assert actual.keys() == expected.keys()
        for image_id, (labels, boxes) in expected.items():
            assert actual[image_id][0] == labels, (name, image_id)
            torch.testing.assert_close(actual[image_id][1], boxes, msg=f"{name}, image {image_id}")


def test_voc_corners_are_one_based_and_inclusive(folders):
    data = read_split(folders["voc"], "train").data
    # <xmin>1</xmin> ... <xmax>10</xmax>: ten pixel columns starting at the first one.
    assert data["annotations"][0]["bbox"] == [0, 0, 10, 20]
    assert [a["iscrowd"] for a in data["annotations"]] == [0, 0, 1, 0]  # the difficult dog


def test_yolo_centres_are_normalised_and_images_without_labels_are_negatives(folders):
    split = read_yolo(folders["yolo"], "train")
    dog = split.data["annotations"][1]
    assert dog["bbox"] == pytest.approx([30, 10, 34, 38]) and dog["category_id"] == 2
    image_c = next(image for image in split.data["images"] if image["file_name"].endswith("c.jpg"))
    assert (image_c["width"], image_c["height"]) == (50, 30)  # from the image header
    assert not label_path(folders["yolo"] / "images" / "train" / "c.jpg").exists()
    assert not [a for a in split.data["annotations"] if a["image_id"] == image_c["id"]]


def test_yolo_polygons_are_read_as_the_boxes_around_them(tmp_path):
    root = write_yolo(tmp_path)
    # A segmentation export's triangle, beside a box, in the 64x48 image a.
    (root / "labels" / "train" / "a.txt").write_text("1 0.25 0.5 0.75 0.25 0.5 1\n0 0.5 0.5 0.2 0.2\n")
    split = read_yolo(root, "train")
    assert split.problems == []
    in_a = [(a["category_id"], a["bbox"]) for a in split.data["annotations"] if a["image_id"] == 1]
    assert in_a == [(2, pytest.approx([16, 12, 32, 36])), (1, pytest.approx([25.6, 19.2, 12.8, 9.6]))]


def test_yolo_coordinates_above_1_stop_training_beyond_rounding(tmp_path):
    root = write_yolo(tmp_path)
    labels = root / "labels" / "train" / "a.txt"
    labels.write_text("0 0.5 0.5 1.005 0.2\n")  # rounded, or drawn a hair past both edges
    assert read_yolo(root, "train").problems == []
    labels.write_text("0 0.5 0.5 0.2 0.2\n1 0.2 0.2 0.5 0.2 1.02 0.9\n")  # a polygon's point past the edge
    [problem] = read_yolo(root, "train").problems
    assert problem.fatal and str(problem) == (f"{labels}: line 2: coordinates above 1: they must be normalised to 0-1, "
                                              "divided by the image's width and height")  # fmt: skip


def test_crowd_objects_are_kept_for_evaluation_and_left_out_of_training(folders):
    dataset, report = load_split(folders["coco"], "train")
    assert report.crowd == 1 and report.boxes == 4
    assert len(dataset.coco.imgToAnns[2]) == 2 and targets(dataset)[2][0] == [1]


def test_yolo_data_yaml_variants(tmp_path):
    write_yolo(tmp_path / "set")
    (tmp_path / "set" / "data.yaml").write_text(
        "path: .\ntrain: [images/train]\nval: list.txt\nnames: {0: cat, 1: dog}\n"
    )
    (tmp_path / "set" / "list.txt").write_text("./images/train/b.jpg\n")
    assert split_names(tmp_path / "set", "yolo") == ["train", "val"]
    assert len(read_yolo(tmp_path / "set" / "data.yaml", "train").data["images"]) == 3
    val = read_yolo(tmp_path / "set", "val")
    assert [image["file_name"] for image in val.data["images"]] == ["images/train/b.jpg"]
    assert [a["category_id"] for a in val.data["annotations"]] == [1]
    with pytest.raises(DatasetError, match=r"data.yaml: no 'test' split \(it names train, val\)"):
        read_yolo(tmp_path / "set", "test")


def test_yolo_split_entries_from_one_folder_up_are_found_below_as_ultralytics_finds_them(tmp_path):
    # A Roboflow export: data.yaml at the root, train/images and train/labels, "train: ../train/images".
    root = write_yolo(tmp_path)
    (root / "train").mkdir()
    for kind in ("images", "labels"):
        (root / kind / "train").rename(root / "train" / kind)
    (root / "data.yaml").write_text("train: ../train/images\nnames: [cat, dog]\n")
    split = read_yolo(root, "train")
    assert [image["file_name"] for image in split.data["images"]] == [f"train/images/{name}.jpg" for name in IMAGES]
    assert len(split.data["annotations"]) == 3 and split.problems == []


def test_yolo_images_in_linked_folders_are_found_and_a_link_back_up_is_walked_once(tmp_path):
    root = write_yolo(tmp_path / "set")
    images, labels = root / "images" / "train", root / "labels" / "train"
    (tmp_path / "elsewhere").mkdir()
    (images / "b.jpg").rename(tmp_path / "elsewhere" / "b.jpg")
    (images / "batch2").symlink_to(tmp_path / "elsewhere")
    (labels / "batch2").mkdir()
    (labels / "b.txt").rename(labels / "batch2" / "b.txt")
    (images / "again").symlink_to(images)
    split = read_yolo(root, "train")
    assert [image["file_name"] for image in split.data["images"]] == [
        "images/train/a.jpg", "images/train/batch2/b.jpg", "images/train/c.jpg"
    ]  # fmt: skip
    assert split.problems == [] and len(split.data["annotations"]) == 3


def test_yolo_class_names_keyed_by_quoted_indices_go_by_number(tmp_path):
    root = write_yolo(tmp_path)
    names = ", ".join(f"'{index}': class{index}" for index in reversed(range(11)))
    (root / "data.yaml").write_text(f"train: images/train\nnames: {{{names}}}\n")
    categories = read_yolo(root, "train").data["categories"]
    assert [category["name"] for category in categories] == [f"class{index}" for index in range(11)]


@pytest.mark.parametrize("names, message", [
    ("{1: cat, 2: dog}", "no name for 0; keys not among them: 2"),  # label 1 would be named dog
    ("{cat: 0, dog: 1}", "no name for 0, 1; keys not among them: 'cat', 'dog'"),
    ("{0: cat, '0': dog}", "no name for 1"),
])  # fmt: skip
def test_yolo_class_names_not_keyed_by_the_indices_0_to_n_are_refused(tmp_path, names, message):
    root = write_yolo(tmp_path)
    (root / "data.yaml").write_text(f"train: images/train\nnames: {names}\n")
    with pytest.raises(DatasetError) as error:
        read_yolo(root, "train")
    assert str(error.value) == f"{root / 'data.yaml'}: 'names' must name each class index 0..1: {message}"


@pytest.mark.parametrize("lines, message", [
    ("path: 5\ntrain: images/train", "'path' must be a path, not 5"),
    ("train: 5", "'train' must be a path or a list of paths, not 5"),
    ("train: [images/train, {a: 1}]", "'train' must be a path or a list of paths, not ['images/train', {'a': 1}]"),
])  # fmt: skip
def test_yolo_data_yaml_values_that_are_not_paths_name_the_key(tmp_path, lines, message):
    root = write_yolo(tmp_path)
    (root / "data.yaml").write_text(f"names: [cat, dog]\n{lines}\n")
    with pytest.raises(DatasetError) as error:
        read_yolo(root, "train")
    assert str(error.value) == f"{root / 'data.yaml'}: {message}"
    assert [str(problem) for problem in check_data(root).problems] == [str(error.value)]


def empty_split(format, root):
    """The writers' data set in ``format`` with a training split of no images, and the file to name."""
    write = WRITERS[format]
    if format == "coco":
        return write(root, images={}), root / "annotations" / "instances_train.json"
    if format == "voc":
        write(root)
        (root / "ImageSets" / "Main" / "train.txt").write_text("")
        return root, root / "Annotations"
    return write(root, images={}), root / "data.yaml"


@pytest.mark.parametrize("format", WRITERS)
def test_a_split_of_no_images_stops_training_in_every_format(tmp_path, format):
    root, named = empty_split(format, tmp_path)
    line = f"{named}: the train split has no images"
    report = check_data(root)
    assert [str(problem) for problem in report.problems] == [line] and report.stops_training
    with pytest.raises(DatasetError) as error:
        load_split(root, "train")
    assert str(error.value) == line


def test_a_roboflow_coco_export_is_read_with_valid_as_the_val_split(tmp_path):
    root = write_roboflow(tmp_path, folder="train")
    write_roboflow(root, folder="valid")
    write_roboflow(root, {"c": IMAGES["c"]}, folder="test")
    (root / "README.roboflow.txt").write_text("exported from roboflow.com\n")
    assert detect_format(root) == "coco"
    assert split_names(root, "coco") == ["test", "train", "val"]
    dataset, report = load_split(root, "val")
    assert report.problems == [] and dataset.annotation_file == root / "valid" / "_annotations.coco.json"
    # Category 0, only the others' supercategory, is not a class.
    assert dataset.category_names == {1: "cat", 2: "dog"} and dataset.num_classes == 3
    assert check_data(root).problems == []
    with pytest.raises(DatasetError, match=re.escape(f"{root}: no 'other' split (it has 'test', 'train', 'val')")):
        read_split(root, "other")


def test_coco_images_may_be_in_images_split_as_cvat_and_datumaro_export_them(tmp_path):
    root = write_coco(tmp_path)
    (root / "images").mkdir()
    (root / "train").rename(root / "images" / "train")
    assert read_split(root, "train").image_dir == root / "images" / "train"
    assert check_data(root).problems == []


def test_voc_without_split_files_is_one_training_split(tmp_path):
    root = write_voc(tmp_path)
    for path in (root / "ImageSets" / "Main").iterdir():
        path.unlink()
    (root / "ImageSets" / "Main").rmdir()
    assert split_names(root, "voc") == ["train"]
    assert len(read_split(root, "train").data["images"]) == 3


@pytest.mark.parametrize("format", WRITERS)
def test_an_unknown_split_is_one_line_naming_the_splits_there_in_every_format(tmp_path, capsys, format):
    root = WRITERS[format](WRITERS[format](tmp_path), split="val")
    line = f"{root}: no 'valid' split (it has 'train', 'val')"
    with pytest.raises(DatasetError) as error:
        load_split(root, "valid")  # as train and evaluate read a split
    assert str(error.value) == line
    assert main(["check-data", str(root), "--split", "valid"]) == 1
    assert capsys.readouterr() == ("", f"deformable-detr: error: {line}\n")


@pytest.mark.parametrize("case", ["a YOLO set forced to COCO", "a data.yaml naming no split"])
def test_a_data_set_without_splits_in_its_format_is_one_line_not_no_problems(tmp_path, capsys, case):
    root = write_yolo(tmp_path)
    if case == "a YOLO set forced to COCO":
        format, line = "coco", f"{root}: no COCO splits (no annotations/instances_<split>.json or <split>/_annotations.coco.json)"
    else:
        (root / "data.yaml").write_text("names: [cat, dog]\n")
        format, line = "yolo", f"{root}: no YOLO splits (no train, val or test images in data.yaml)"
    assert main(["check-data", str(root), "--format", format]) == 1
    assert capsys.readouterr() == ("", f"deformable-detr: error: {line}\n")
    with pytest.raises(DatasetError) as error:
        load_split(root, "train", format=format)
    assert str(error.value) == line


def roboflow_yolo(root):
    """The writers' YOLO set as Roboflow exports it: train/ and valid/ with images/ and labels/ each, and a
    data.yaml at the root naming ../train/images, ../valid/images and ../test/images, which it has not."""
    write_yolo(root, split="train")
    write_yolo(root, {"b": IMAGES["b"]}, split="val")
    for split, folder in (("train", "train"), ("val", "valid")):
        (root / folder).mkdir()
        for kind in ("images", "labels"):
            (root / kind / split).rename(root / folder / kind)
    (root / "data.yaml").write_text("train: ../train/images\nval: ../valid/images\ntest: ../test/images\n"
                                    "nc: 2\nnames: [cat, dog]\n")
    return root


def test_a_yolo_test_split_whose_images_are_not_there_is_left_out_as_ultralytics_leaves_it(tmp_path, capsys):
    root = roboflow_yolo(tmp_path / "set")
    assert split_names(root, "yolo") == ["train", "val"]
    assert main(["check-data", str(root)]) == 0
    out = capsys.readouterr().out
    assert [line.split(":")[0] for line in out.splitlines() if not line.startswith(" ")] == [str(root), "train", "val", "no problems"]
    # A missing train or val split is not left out, and the paths tried are named as a path is written.
    shutil.rmtree(root / "valid")
    with pytest.raises(DatasetError) as error:
        load_split(root, "val")
    assert str(error.value) == f"{tmp_path / 'valid' / 'images'}: image folder not found (nor {root / 'valid' / 'images'})"


def test_yolo_problems_name_files_by_the_path_given_as_the_other_formats_do(tmp_path, monkeypatch):
    root = write_yolo(tmp_path / "set")
    (root / "labels" / "train" / "a.txt").write_text("0 0.5 0.5 0.2 0.2\n5 0.5 0.5 0.2 0.2\n")
    (root / "images" / "train" / "b.jpg").write_bytes(b"not a picture")
    monkeypatch.chdir(tmp_path)
    problems = [str(problem) for problem in check_data("set").problems]
    assert [problem.split(":")[0] for problem in problems] == ["set/labels/train/a.txt", "set/images/train/b.jpg"]
    # From inside the data set, its labels/ folder is still where the images/ folder is.
    monkeypatch.chdir(root)
    assert [str(problem).split(":")[0] for problem in check_data(".").problems] == ["labels/train/a.txt", "images/train/b.jpg"]


def test_format_detection_and_forcing(tmp_path, folders):
    with pytest.raises(DatasetError, match="not a COCO, VOC or YOLO data set"):
        detect_format(tmp_path)
    with pytest.raises(DatasetError, match="no such data folder"):
        detect_format(tmp_path / "nowhere")
    both = write_voc(write_coco(tmp_path / "both"))  # a COCO file beside a VOC folder
    assert detect_format(both) == "voc"
    assert read_split(both, "train", "coco").annotation_file.name == "instances_train.json"


def test_a_folder_whose_yolo_data_file_has_another_name_is_refused_naming_the_file_to_give(tmp_path, capsys):
    root = write_yolo(tmp_path / "coco8")
    (root / "data.yaml").rename(root / "coco8.yaml")  # as Ultralytics names its data files
    (root / "args.yaml").write_text("epochs: 100\n")  # beside a run's settings, first by name
    assert main(["check-data", str(root)]) == 1
    assert capsys.readouterr().err.strip().endswith(f"for a YOLO data file of another name, give the file: {root / 'coco8.yaml'}")
    assert detect_format(root / "coco8.yaml") == "yolo"


def test_cli_trains_on_yolo_with_model_flags_and_names_the_best_epoch(tmp_path, capsys):
    root = tmp_path / "yolo"
    write_yolo(root, split="train")
    write_yolo(root, split="val")
    run = tmp_path / "run"
    code = main(["train", "--data", str(root), "--output-dir", str(run), "--epochs", "2", "--batch-size", "3",
                 "--image-size", "64", "--workers", "0", "--two-stage", "--num-queries", "7", "--dropout", "0",
                 "--num-feature-levels", "1", "--model-option", "position_embedding=learned",
                 "--model-option", "decoder_points=2"])  # fmt: skip
    assert code == 0
    out = capsys.readouterr().out
    assert "best epoch " in out and out.rstrip().endswith(f"{run / 'best.pt'}")
    assert "  AP50 " in out.splitlines()[-1]
    checkpoint = read_checkpoint(run / "best.pt")
    config = checkpoint.config
    assert (config.two_stage, config.num_queries, config.dropout, config.num_feature_levels) == (True, 7, 0.0, 1)
    assert (config.position_embedding, config.decoder_points) == ("learned", 2)
    assert checkpoint.class_names == {1: "cat", 2: "dog"}
    best_epoch = int(out.splitlines()[-1].split()[2].rstrip(":"))
    assert checkpoint.extra["epoch"] == best_epoch


@pytest.mark.parametrize("option, message", [
    ("two_stage=maybe", "two_stage takes true or false, not 'maybe'"),
    ("num_queries=many", "num_queries takes a int, not 'many'"),
    ("no_such_field=1", "'no_such_field=1' is not KEY=VALUE with KEY one of backbone, "),
])  # fmt: skip
def test_cli_model_option_is_parsed_by_the_field_type(tmp_path, capsys, option, message):
    with pytest.raises(SystemExit):
        main(["train", "--data", str(tmp_path), "--output-dir", str(tmp_path / "run"), "--model-option", option])
    assert message in capsys.readouterr().err


def test_cli_evaluate_takes_any_format(tmp_path, folders, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(folders["voc"]), "--output-dir", str(run), "--epochs", "1", "--batch-size", "3",
                 "--image-size", "64", "--workers", "0", "--val-split", "train"]) == 0  # fmt: skip
    capsys.readouterr()
    for name, root in folders.items():
        assert main(["evaluate", str(run / "best.pt"), "--data", str(root), "--split", "train", "--image-size", "64",
                     "--workers", "0", "--format", name]) == 0  # fmt: skip
        assert capsys.readouterr().out.startswith("AP ")
    empty, named = empty_split("coco", tmp_path / "empty")
    assert main(["evaluate", str(run / "best.pt"), "--data", str(empty), "--split", "train", "--workers", "0"]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {named}: the train split has no images\n"
