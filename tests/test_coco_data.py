import json
import re

import numpy as np
import pytest
import torch
from PIL import Image

from deformable_detr.data import CocoDataset, DatasetError, coco_split, inspect_image, read_coco, read_image, synthesize
from deformable_detr.predict import as_image_tensor

from data_writers import write_coco

CATEGORIES = [{"id": 1, "name": "a"}, {"id": 3, "name": "b"}]


def _write(tmp_path, annotations, images=None, categories=CATEGORIES, sizes=((40, 60),)):
    """A COCO file over real images of (height, width) ``sizes``; returns the data set's arguments."""
    image_dir = tmp_path / "images"
    image_dir.mkdir(exist_ok=True)
    if images is None:
        images = [{"id": i + 1, "file_name": f"{i + 1}.jpg", "height": h, "width": w} for i, (h, w) in enumerate(sizes)]
        for image, (h, w) in zip(images, sizes):
            Image.new("RGB", (w, h), (120, 60, 30)).save(image_dir / image["file_name"])
    for index, annotation in enumerate(annotations, start=1):
        annotation.setdefault("id", index)
        annotation.setdefault("image_id", 1)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return image_dir, path


def test_reads_synthetic_data_in_the_model_format(tmp_path):
    synthesize(tmp_path, train=4, val=2, image_size=64)
    dataset = coco_split(tmp_path, "train")
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert len(dataset) == 4 and dataset.num_classes == 6
    assert dataset.category_names[1] == "ellipse"
    for index in range(len(dataset)):
        image, target = dataset[index]
        image_id = int(target["image_id"])
        info = next(i for i in data["images"] if i["id"] == image_id)
        expected = [a for a in data["annotations"] if a["image_id"] == image_id]
        assert image.dtype == torch.float32 and image.shape == (3, info["height"], info["width"])
        assert target["orig_size"].tolist() == target["size"].tolist() == [info["height"], info["width"]]
        assert target["labels"].dtype == torch.int64
        assert target["labels"].tolist() == [a["category_id"] for a in expected]
        scale = torch.tensor([info["width"], info["height"]] * 2)
        boxes = torch.tensor([a["bbox"] for a in expected]).reshape(-1, 4)
        cxcywh = torch.cat([boxes[:, :2] + boxes[:, 2:] / 2, boxes[:, 2:]], 1) / scale
        torch.testing.assert_close(target["boxes"], cxcywh)


def test_crowd_and_empty_boxes_are_dropped_and_boxes_clipped(tmp_path):
    image_dir, path = _write(tmp_path, [
        {"category_id": 1, "bbox": [10, 10, 20, 10]},
        {"category_id": 3, "bbox": [5, 5, 10, 10], "iscrowd": 1},
        {"category_id": 1, "bbox": [10, 10, 0, 5]},  # zero width
        {"category_id": 1, "bbox": [70, 10, 5, 5]},  # outside the 60-pixel-wide image: empty once clipped
        {"category_id": 3, "bbox": [50, 30, 20, 20]},  # clipped to (50, 30)-(60, 40)
    ])  # fmt: skip
    _, target = CocoDataset(image_dir, path)[0]
    assert target["labels"].tolist() == [1, 3]
    torch.testing.assert_close(target["boxes"], torch.tensor([[20 / 60, 15 / 40, 20 / 60, 10 / 40],
                                                              [55 / 60, 35 / 40, 10 / 60, 10 / 40]]))  # fmt: skip


def test_evaluation_sizes_an_object_without_an_area_by_its_box(tmp_path):
    """COCO evaluation reads a missing area as 0, which would score every such object as small."""
    image_dir, path = _write(tmp_path, [
        {"category_id": 1, "bbox": [0, 0, 50, 30]},
        {"category_id": 1, "bbox": [0, 0, 10, 10], "area": 0},
        {"category_id": 3, "bbox": [0, 0, 10, 10], "area": 42.5},  # a mask's area, as the file gives it
    ], sizes=((300, 300),))  # fmt: skip
    areas = [annotation["area"] for annotation in CocoDataset(image_dir, path).coco.dataset["annotations"]]
    assert areas == [1500, 100, 42.5]


def test_images_without_annotations_are_kept_as_negatives(tmp_path):
    image_dir, path = _write(tmp_path, [{"category_id": 1, "bbox": [1, 1, 5, 5]}], sizes=((40, 60), (30, 30)))
    dataset = CocoDataset(image_dir, path)
    assert len(dataset) == 2
    _, target = dataset[1]
    assert target["boxes"].shape == (0, 4) and target["labels"].shape == (0,)


def test_a_category_without_objects_that_only_groups_others_is_left_out(tmp_path):
    root = write_coco(tmp_path)  # cat (1) and dog (2) have objects
    path = root / "annotations" / "instances_train.json"
    categories = [{"id": 0, "name": "pets", "supercategory": "none"}, {"id": 1, "name": "cat", "supercategory": "pets"},
                  {"id": 2, "name": "dog", "supercategory": "pets"}, {"id": 3, "name": "bird", "supercategory": "pets"}]
    path.write_text(json.dumps({**json.loads(path.read_text()), "categories": categories}))
    assert [category["id"] for category in read_coco(root, "train").data["categories"]] == [1, 2, 3]


def test_num_classes_is_the_largest_category_id_plus_one(tmp_path):
    image_dir, path = _write(tmp_path, [], categories=[{"id": 1, "name": "a"}, {"id": 90, "name": "z"}])
    assert CocoDataset(image_dir, path).num_classes == 91


@pytest.mark.parametrize(
    "annotations, categories, message",
    [
        ([{"category_id": 1, "bbox": [1, 1, -2, 3]}], CATEGORIES, "negative width or height"),
        ([{"category_id": 2, "bbox": [1, 1, 2, 3]}], CATEGORIES, "category id 2 is not among the declared"),
        ([{"category_id": 1, "bbox": [1, 1, 2]}], CATEGORIES, "is not [x, y, width, height]"),
        ([{"category_id": 1, "bbox": [1, 1, 2, 2], "image_id": 7}], CATEGORIES, "no image with that id"),
        ([{"category_id": 1}], CATEGORIES, "needs 'image_id', 'category_id' and 'bbox'"),
        ([], [{"id": -1, "name": "a"}], "non-negative integer"),
        ([], [], "declares no categories"),
        ([], [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}], "category id 1 appears twice"),
    ],
)
def test_bad_annotations_fail_at_construction(tmp_path, annotations, categories, message):
    image_dir, path = _write(tmp_path, annotations, categories=categories)
    with pytest.raises(DatasetError, match=f"^{path}: .*" + message.replace("[", r"\[")):
        CocoDataset(image_dir, path)


@pytest.mark.parametrize("field, value, message", [
    ("width", "60", "image 1: width '60' is not a positive whole number"),
    ("height", 0, "image 1: height 0 is not a positive whole number"),
    ("height", 40.5, "image 1: height 40.5 is not a positive whole number"),
    ("file_name", 5, "image 1: file_name 5 is not a file name"),
    ("id", "1", "image id '1' is not an integer"),
])  # fmt: skip
def test_image_fields_of_the_wrong_type_name_the_image_and_field(tmp_path, field, value, message):
    image_dir, path = _write(tmp_path, [], images=[{"id": 1, "file_name": "1.jpg", "width": 60, "height": 40, field: value}])
    with pytest.raises(DatasetError, match=f"^{re.escape(f'{path}: {message}')}$"):
        CocoDataset(image_dir, path)


def test_sizes_written_as_whole_floats_are_sizes(tmp_path):
    image_dir, path = _write(tmp_path, [{"category_id": 1, "bbox": [1, 1, 5, 5]}])
    data = json.loads(path.read_text())
    data["images"][0].update(width=60.0, height=40.0)
    path.write_text(json.dumps(data))
    _, target = CocoDataset(image_dir, path)[0]
    assert target["orig_size"].tolist() == [40, 60] and len(target["boxes"]) == 1


def test_missing_json(tmp_path):
    with pytest.raises(DatasetError, match="instances.json: annotation file not found"):
        CocoDataset(tmp_path, tmp_path / "instances.json")


def test_invalid_json(tmp_path):
    (tmp_path / "instances.json").write_text("{not json")
    with pytest.raises(DatasetError, match="instances.json: not valid JSON"):
        CocoDataset(tmp_path, tmp_path / "instances.json")


def test_json_that_is_not_coco(tmp_path):
    (tmp_path / "instances.json").write_text(json.dumps({"images": [], "annotations": []}))
    with pytest.raises(DatasetError, match="instances.json: not a COCO instances file \\(no 'categories'\\)"):
        CocoDataset(tmp_path, tmp_path / "instances.json")
    (tmp_path / "instances.json").write_text("[1, 2]")
    with pytest.raises(DatasetError, match="not a COCO instances file"):
        CocoDataset(tmp_path, tmp_path / "instances.json")


def test_image_entry_without_size_names_the_fields_it_lacks(tmp_path):
    image_dir, path = _write(tmp_path, [], images=[{"id": 1, "file_name": "1.jpg"}])
    expected = f"{path}: image 1 has no 'width' or 'height' (an image entry needs 'id', 'file_name', 'width' and 'height')"
    with pytest.raises(DatasetError, match=f"^{re.escape(expected)}$"):
        CocoDataset(image_dir, path)


def test_a_segmentation_without_a_box_is_named_without_its_points(tmp_path):
    polygon = [float(value) for value in range(2000)]  # a traced outline: the line must not carry it
    image_dir, path = _write(tmp_path, [{"id": 7, "category_id": 1, "segmentation": [polygon], "iscrowd": 0}])
    expected = f"{path}: annotation 7 (image 1) has no 'bbox' (an annotation needs 'image_id', 'category_id' and 'bbox')"
    with pytest.raises(DatasetError, match=f"^{re.escape(expected)}$"):
        CocoDataset(image_dir, path)


def test_missing_image_files_fail_at_construction(tmp_path):
    image_dir, path = _write(tmp_path, [], sizes=((10, 10), (10, 10), (10, 10)))
    (image_dir / "1.jpg").unlink()
    (image_dir / "3.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1\.jpg: image file not found \(and 1 more\), listed in .*instances\.json"):
        CocoDataset(image_dir, path)


def test_corrupt_image_fails_when_read_naming_the_file(tmp_path):
    image_dir, path = _write(tmp_path, [], sizes=((20, 20), (20, 20)))
    good = (image_dir / "2.jpg").read_bytes()
    (image_dir / "2.jpg").write_bytes(good[: len(good) // 2])
    (image_dir / "1.jpg").write_bytes(b"not an image")
    dataset = CocoDataset(image_dir, path)
    with pytest.raises(DatasetError, match=r"1\.jpg: cannot read image \(not an image format"):
        dataset[0]
    with pytest.raises(DatasetError, match=r"2\.jpg: cannot read image \(.*[Tt]runcated"):
        dataset[1]



def test_sixteen_bit_grayscale_is_scaled_from_its_whole_range(tmp_path):
    # Pillow's own conversion to RGB clips 16-bit values at 255: nearly every pixel would be white.
    Image.fromarray(np.array([[0, 257, 32896, 65535]], dtype=np.uint16)).save(tmp_path / "gray16.png")
    from_file = read_image(tmp_path / "gray16.png")
    assert from_file.dtype == torch.uint8 and from_file.tolist() == [[[0, 1, 128, 255]]] * 3
    with Image.open(tmp_path / "gray16.png") as opened:
        assert opened.mode == "I;16"
        assert torch.equal(as_image_tensor(opened), from_file)


def test_an_image_of_32_bit_pixels_is_refused_naming_the_file(tmp_path):
    Image.fromarray(np.ones((4, 5), dtype=np.float32)).save(tmp_path / "float.tif")
    with pytest.raises(DatasetError, match=r"float\.tif: cannot read image \(32-bit float pixels: save it with 8 or 16 bits"):
        read_image(tmp_path / "float.tif")

def test_an_image_of_signed_16_bit_pixels_is_refused_as_such(tmp_path):
    # Pillow reads them as 32-bit integers; the file's tags say what they are.
    path = tmp_path / "depth.tif"
    Image.fromarray(np.array([[-32768, -1, 0, 32767]], dtype=np.int16).view(np.uint16)).save(path, tiffinfo={339: 2})
    line = "cannot read image (signed 16-bit pixels: save it unsigned, with 8 or 16 bits a channel)"
    assert inspect_image(path).problem == line
    for upright in (False, True):  # training reads images as stored, detect upright
        with pytest.raises(DatasetError) as raised:
            read_image(path, upright=upright)
        assert str(raised.value) == f"{path}: {line}"
    with Image.open(path) as opened, pytest.raises(ValueError) as raised:
        as_image_tensor(opened)
    assert str(raised.value) == line


def test_image_of_another_size_than_annotated(tmp_path):
    image_dir, path = _write(tmp_path, [], sizes=((20, 30),))
    Image.new("RGB", (20, 30)).save(image_dir / "1.jpg")  # rotated
    with pytest.raises(DatasetError, match=r"1\.jpg: image is 20x30 but instances\.json says 30x20"):
        CocoDataset(image_dir, path)[0]


def test_pycocotools_index_for_evaluation(tmp_path):
    synthesize(tmp_path, train=3, val=0, image_size=64)
    dataset = coco_split(tmp_path, "train")
    assert sorted(dataset.coco.getImgIds()) == dataset.ids
    assert dataset.coco.getCatIds() == [1, 2, 3, 4, 5]
