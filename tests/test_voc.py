import json
import shutil

import pytest
from PIL import Image

from deformable_detr.data import (
    VOC_CLASSES,
    CocoDataset,
    DatasetError,
    check_data,
    load_split,
    read_split,
    split_names,
    voc_to_coco,
)

XML = """<annotation>
  <filename>{name}.jpg</filename>
  <size><width>{width}</width><height>{height}</height><depth>3</depth></size>
  {objects}
</annotation>"""
OBJECT = "<object><name>{name}</name><difficult>{difficult}</difficult><bndbox><xmin>{box[0]}</xmin>" \
         "<ymin>{box[1]}</ymin><xmax>{box[2]}</xmax><ymax>{box[3]}</ymax></bndbox></object>"  # fmt: skip


def _voc(root, images, split=None):
    """A VOC folder: ``images`` maps names to lists of (class, (xmin, ymin, xmax, ymax), difficult)."""
    for folder in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for name, objects in images.items():
        Image.new("RGB", (50, 40)).save(root / "JPEGImages" / f"{name}.jpg")
        body = "".join(OBJECT.format(name=c, box=b, difficult=int(d)) for c, b, d in objects)
        (root / "Annotations" / f"{name}.xml").write_text(XML.format(name=name, width=50, height=40, objects=body))
    if split:
        (root / "ImageSets" / "Main" / f"{split[0]}.txt").write_text("\n".join(split[1]) + "\n")
    return root


def test_converts_boxes_classes_and_difficult(tmp_path):
    root = _voc(tmp_path / "voc", {
        "000001": [("dog", (1, 1, 10, 20), False), ("person", (5, 6, 30, 40), True)],
        "000002": [],
    })  # fmt: skip
    data = json.loads(voc_to_coco(root, tmp_path / "voc.json").read_text())
    assert [c["name"] for c in data["categories"]] == list(VOC_CLASSES)
    assert [c["id"] for c in data["categories"]] == list(range(1, 21))
    assert [i["file_name"] for i in data["images"]] == ["000001.jpg", "000002.jpg"]
    dog, person = data["annotations"]
    assert dog["bbox"] == [0, 0, 10, 20] and dog["category_id"] == VOC_CLASSES.index("dog") + 1
    assert dog["iscrowd"] == 0 and person["iscrowd"] == 1

    dataset = CocoDataset(root / "JPEGImages", tmp_path / "voc.json")
    assert len(dataset) == 2 and dataset.num_classes == 21
    _, target = dataset[0]
    assert target["labels"].tolist() == [VOC_CLASSES.index("dog") + 1]  # the difficult person is left out


def test_split_file_and_classes_found(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)], "b": [("zebra", (1, 1, 5, 5), False)],
                           "c": [("ant", (2, 2, 9, 9), False)]}, split=("train", ["a", "b"]))  # fmt: skip
    data = json.loads(voc_to_coco(root, tmp_path / "out.json", split="train", classes=None).read_text())
    assert [i["file_name"] for i in data["images"]] == ["a.jpg", "b.jpg"]
    # Classes come from every annotation file, so that all splits number them alike.
    assert {c["name"]: c["id"] for c in data["categories"]} == {"ant": 1, "cat": 2, "zebra": 3}


@pytest.mark.parametrize("split_file", [True, False])
def test_annotations_in_subfolders_are_read_with_or_without_a_split_file(tmp_path, split_file):
    root = _voc(tmp_path, {"top": [("dog", (1, 1, 5, 5), False)]}, split=("train", ["cam1/a", "top"]))
    for folder in ("Annotations", "JPEGImages"):
        (root / folder / "cam1").mkdir()
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "cam1" / "a.jpg")
    cat = OBJECT.format(name="cat", box=(2, 2, 9, 9), difficult=0)
    xml = XML.format(name="a", width=50, height=40, objects=cat).replace("<filename>a.jpg</filename>", "")
    (root / "Annotations" / "cam1" / "a.xml").write_text(xml)  # without <filename>: the image is named as it is
    if not split_file:
        shutil.rmtree(root / "ImageSets")
    data = read_split(root, "train").data
    assert [image["file_name"] for image in data["images"]] == ["cam1/a.jpg", "top.jpg"]
    assert [(c["id"], c["name"]) for c in data["categories"]] == [(1, "cat"), (2, "dog")]
    assert check_data(root).problems == []


def test_the_image_is_named_after_the_annotation_whatever_its_filename_says(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)], "b": []}, split=("train", ["a", "b"]))
    stale = root / "Annotations" / "a.xml"
    stale.write_text(stale.read_text().replace("<filename>a.jpg", "<filename>IMG_0001.jpg"))  # renamed since
    (root / "JPEGImages" / "b.jpg").unlink()
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "b.png")
    assert [image["file_name"] for image in read_split(root, "train").data["images"]] == ["a.jpg", "b.png"]
    assert check_data(root).problems == []


def test_filename_names_the_image_where_none_is_named_after_the_annotation(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)]}, split=("train", ["a", "cam1/b"]))
    (root / "JPEGImages" / "a.jpg").rename(root / "JPEGImages" / "photo.jpg")
    (root / "Annotations" / "a.xml").write_text(XML.format(name="photo", width=50, height=40, objects=""))
    for folder in ("Annotations", "JPEGImages"):
        (root / folder / "cam1").mkdir()
    Image.new("RGB", (50, 40)).save(root / "JPEGImages" / "cam1" / "IMG_2.jpg")
    (root / "Annotations" / "cam1" / "b.xml").write_text(XML.format(name="IMG_2", width=50, height=40, objects=""))
    assert [image["file_name"] for image in read_split(root, "train").data["images"]] == ["photo.jpg", "cam1/IMG_2.jpg"]
    assert check_data(root).problems == []


def test_an_annotation_without_its_image_names_the_xml_and_what_was_looked_for(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)], "b": [], "c": []}, split=("train", ["a", "b", "c"]))
    images, a, b = root / "JPEGImages", root / "Annotations" / "a.xml", root / "Annotations" / "b.xml"
    (images / "a.jpg").unlink()
    (images / "b.jpg").unlink()
    b.write_text(XML.format(name="IMG_0002", width=50, height=40, objects=""))
    report = check_data(root)
    assert [str(problem) for problem in report.problems] == [
        f"{a}: image not found: no {images / 'a'}.jpg (nor with another image suffix)",
        f"{b}: image not found: no {images / 'b'}.jpg (nor with another image suffix), "
        f"nor {images / 'IMG_0002.jpg'}, its <filename>",
    ]
    assert report.stops_training
    assert read_split(root, "train").data["categories"][0]["name"] == "cat"  # still a class, from a.xml


def test_split_names_hold_underscores_and_leave_out_per_class_files(tmp_path):
    root = _voc(tmp_path, {"2012_000001": [], "2012_000002": []}, split=("train", ["2012_000001"]))
    main = root / "ImageSets" / "Main"
    (main / "val_2012.txt").write_text("2012_000002\n")
    (main / "cat_train.txt").write_text("2012_000001 -1\n")  # as VOC writes them: present 1, absent -1, difficult 0
    (main / "dog_train.txt").write_text("2012_000001  1\n")
    (main / "dog_trainval.txt").write_text("2012_000001  1\n2012_000002 -1\n")  # of a split without its own file
    (main / "dog_val_2012.txt").write_text("2012_000002  0\n")
    (main / "cat_val_2012.txt").write_text("2012_000002\n")  # positives only: known by its name
    assert split_names(root, "voc") == ["train", "val_2012"]


def test_size_read_from_the_image_when_missing(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)]})
    path = root / "Annotations" / "a.xml"
    path.write_text(path.read_text().replace("<width>50</width>", "<width>0</width>"))
    data = json.loads(voc_to_coco(root, tmp_path / "out.json").read_text())
    assert (data["images"][0]["width"], data["images"][0]["height"]) == (50, 40)


def test_unknown_class_names_the_file(tmp_path):
    _voc(tmp_path, {"a": [("zebra", (1, 1, 5, 5), False)]})
    with pytest.raises(DatasetError, match=r"a\.xml: class 'zebra' is not one of aeroplane"):
        voc_to_coco(tmp_path, tmp_path / "out.json")


@pytest.mark.parametrize(
    "text, message",
    [
        ("<annotation><object>", "not valid XML"),
        ("<annotation><object><name>cat</name></object></annotation>", "object 'cat' has no <bndbox>"),
        ("<annotation><object><bndbox/></object></annotation>", "<object> has no <name>"),
        (XML.format(name="a", width=50, height=40, objects=OBJECT.format(name="cat", box=(1, 1, "x", 5), difficult=0)),
         "box corner that is not a finite number"),
        (XML.format(name="a", width=50, height=40, objects=OBJECT.format(name="cat", box=(1, "nan", 5, 5), difficult=0)),
         "object 'cat' has a box corner that is not a finite number"),
        (XML.format(name="a", width="inf", height=40, objects=""), "<size> is not a finite number"),
        (XML.format(name="a", width=50, height=40, objects=OBJECT.format(name="cat", box=(9, 1, 5, 5), difficult=0)),
         "xmax < xmin"),
    ],
)  # fmt: skip
def test_bad_xml_names_the_file(tmp_path, text, message):
    root = _voc(tmp_path, {"a": []})
    (root / "Annotations" / "a.xml").write_text(text)
    with pytest.raises(DatasetError, match=rf"a\.xml: .*{message}"):
        voc_to_coco(root, tmp_path / "out.json")


def test_a_split_without_any_annotation_is_one_line_that_leaves_the_others_alone(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)]}, split=("train", ["a"]))
    test = root / "ImageSets" / "Main" / "test.txt"
    test.write_text("b\nc\n")  # as VOC's test set: its images listed, their annotations not given
    problems = [str(problem) for problem in check_data(root).problems]
    assert problems == [f"{test}: none of its 2 images has an annotation in {root / 'Annotations'} (a test set?)"]
    assert load_split(root, "train")[1].problems == []


def test_a_split_file_naming_image_files_says_it_names_them_where_ids_belong(tmp_path):
    root = _voc(tmp_path, {"a": [("cat", (1, 1, 5, 5), False)], "b": []}, split=("train", ["a"]))
    split_file = root / "ImageSets" / "Main" / "train.txt"
    split_file.write_text("a.jpg\nb.jpg\n")  # as `ls JPEGImages > train.txt` writes it
    with pytest.raises(DatasetError) as error:
        read_split(root, "train")
    assert str(error.value) == (f"{split_file}: none of its 2 images has an annotation in {root / 'Annotations'} "
                                "(its lines name image files, such as 'a.jpg', where VOC's name ids, such as 'a')")  # fmt: skip


def test_missing_split_file_and_annotations(tmp_path):
    root = _voc(tmp_path, {"a": []})
    with pytest.raises(DatasetError, match=r"val\.txt: split file not found"):
        voc_to_coco(root, tmp_path / "out.json", split="val")
    (root / "ImageSets" / "Main" / "val.txt").write_text("a\nmissing\n")
    with pytest.raises(DatasetError, match=r"missing\.xml: cannot read"):
        voc_to_coco(root, tmp_path / "out.json", split="val")
    with pytest.raises(DatasetError, match="no VOC annotation files"):
        voc_to_coco(tmp_path / "empty", tmp_path / "out.json")
