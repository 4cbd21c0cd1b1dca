import json

import numpy as np
import pytest
from PIL import Image

from deformable_detr.data import SYNTHETIC_CLASSES, check_data, synthesize, synthetic


def _load(root, split):
    return json.loads((root / "annotations" / f"instances_{split}.json").read_text())


def test_layout_and_coco_fields(tmp_path):
    synthesize(tmp_path, train=6, val=3, image_size=96)
    for split, count in [("train", 6), ("val", 3)]:
        data = _load(tmp_path, split)
        assert len(data["images"]) == count
        assert [c["id"] for c in data["categories"]] == list(range(1, len(SYNTHETIC_CLASSES) + 1))
        images = {image["id"]: image for image in data["images"]}
        for image in data["images"]:
            with Image.open(tmp_path / split / image["file_name"]) as file:
                assert file.format == "JPEG"
                assert file.size == (image["width"], image["height"])
                assert max(file.size) == 96
        for annotation in data["annotations"]:
            x, y, w, h = annotation["bbox"]
            image = images[annotation["image_id"]]
            assert 0 <= x and 0 <= y and x + w <= image["width"] and y + h <= image["height"]
            assert w > 0 and h > 0 and annotation["iscrowd"] == 0
            assert 0 < annotation["area"] <= w * h


def test_deterministic_given_the_seed(tmp_path):
    first = synthesize(tmp_path / "a", train=4, val=2, image_size=64, seed=3)
    second = synthesize(tmp_path / "b", train=4, val=2, image_size=64, seed=3)
    other = synthesize(tmp_path / "c", train=4, val=2, image_size=64, seed=4)
    assert _load(first, "train") == _load(second, "train")
    assert (first / "train" / "000002.jpg").read_bytes() == (second / "train" / "000002.jpg").read_bytes()
    assert (first / "train" / "000002.jpg").read_bytes() != (other / "train" / "000002.jpg").read_bytes()


def test_val_does_not_depend_on_the_train_count(tmp_path):
    small = synthesize(tmp_path / "a", train=1, val=3, image_size=64)
    large = synthesize(tmp_path / "b", train=5, val=3, image_size=64)
    assert _load(small, "val") == _load(large, "val")


def test_objects_vary_in_class_size_and_shape(tmp_path):
    synthesize(tmp_path, train=60, val=0, image_size=128)
    annotations = _load(tmp_path, "train")["annotations"]
    assert {a["category_id"] for a in annotations} == set(range(1, len(SYNTHETIC_CLASSES) + 1))
    sides = np.array([a["bbox"][2:] for a in annotations])
    assert sides.min() < 0.2 * 128 and sides.max() > 0.5 * 128  # small and large objects
    aspect = sides[:, 0] / sides[:, 1]
    assert aspect.min() < 0.75 and aspect.max() > 1.33
    per_image = np.bincount([a["image_id"] for a in annotations], minlength=61)[1:]
    assert per_image.max() > 3


def test_objects_stand_out_from_the_background(tmp_path):
    synthesize(tmp_path, train=10, val=0, image_size=128)
    data = _load(tmp_path, "train")
    files = {image["id"]: image["file_name"] for image in data["images"]}
    for annotation in data["annotations"]:
        if SYNTHETIC_CLASSES[annotation["category_id"] - 1] not in ("ellipse", "rectangle"):
            continue  # their centre is always inside the shape
        x, y, w, h = annotation["bbox"]
        if min(w, h) < 12:
            continue
        pixels = np.asarray(Image.open(tmp_path / "train" / files[annotation["image_id"]]), dtype=float)
        centre = pixels[int(y + h / 2) - 1 : int(y + h / 2) + 2, int(x + w / 2) - 1 : int(x + w / 2) + 2].mean((0, 1))
        above = pixels[max(int(y) - 3, 0) : int(y), int(x) : int(x + w)]
        below = pixels[int(y + h) + 1 : int(y + h) + 4, int(x) : int(x + w)]
        ring = np.concatenate([above.reshape(-1, 3), below.reshape(-1, 3)])
        if len(ring):
            assert np.linalg.norm(centre - ring.mean(0)) > 40


def _relative_sides(root):
    """Each object's larger box side as a fraction of its image's shorter side."""
    data = _load(root, "train")
    shorter = {image["id"]: min(image["width"], image["height"]) for image in data["images"]}
    return np.array([max(a["bbox"][2:]) / shorter[a["image_id"]] for a in data["annotations"]])


def test_object_sizes_set_the_size_range(tmp_path):
    small = _relative_sides(synthesize(tmp_path / "small", train=20, val=0, image_size=128, object_sizes=(0.1, 0.15)))
    large = _relative_sides(synthesize(tmp_path / "large", train=20, val=0, image_size=128, object_sizes=(0.4, 0.5)))
    # Stretched (aspect 0.6-1.6) and rotated, a shape of size s has a box side between ~0.77 s and ~1.5 s.
    assert small.max() < large.min()
    assert small.max() < 0.25 and large.min() > 0.3


def test_objects_smaller_than_the_minimum_side_are_drawn_at_it(tmp_path):
    root = synthesize(tmp_path, train=20, val=0, image_size=64, object_sizes=(0.01, 0.02))  # under a pixel
    sides = np.array([annotation["bbox"][2:] for annotation in _load(root, "train")["annotations"]])
    # A rotated star's box is the narrowest, its longer side at least nine tenths of its square's.
    assert sides.max(1).min() >= 0.9 * synthetic.MIN_OBJECT_SIDE and sides.max() <= 1.5 * synthetic.MIN_OBJECT_SIDE


def test_about_half_the_objects_are_small_by_coco_measure(tmp_path):
    synthesize(tmp_path, train=0, val=100, image_size=192)
    areas = np.array([a["area"] for a in _load(tmp_path, "val")["annotations"]])
    assert 0.3 < (areas < 32**2).mean() < 0.7


@pytest.mark.parametrize("sizes", [(0.0, 0.5), (0.5, 0.2), (0.3, 1.5)])
def test_object_sizes_out_of_range_are_refused(tmp_path, sizes):
    with pytest.raises(ValueError, match="object sizes must be fractions"):
        synthesize(tmp_path, train=1, val=0, object_sizes=sizes)


@pytest.mark.parametrize("settings, message", [
    ({"train": -1}, "train and val must be counts of images, 0 or more, got -1 and 1"),
    ({"train": 0, "val": 0}, "train and val are both 0: no images to write"),
    ({"image_size": 0}, "image size must be at least 32 pixels, got 0"),
    ({"max_objects": 0}, "max objects must be at least 1, got 0"),
])  # fmt: skip
def test_settings_out_of_range_are_refused_before_anything_is_written(tmp_path, settings, message):
    with pytest.raises(ValueError, match=f"^{message}$"):
        synthesize(tmp_path / "shapes", **{"train": 1, "val": 1, **settings})
    assert list(tmp_path.iterdir()) == []


def test_a_split_of_no_images_is_not_written(tmp_path):
    synthesize(tmp_path, train=2, val=0, image_size=64)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["annotations", "train"]
    assert [path.name for path in (tmp_path / "annotations").iterdir()] == ["instances_train.json"]
    assert not check_data(tmp_path).problems


def test_a_folder_that_is_not_empty_is_left_as_it_was(tmp_path):
    data = synthesize(tmp_path / "shapes", train=2, val=1, image_size=64, seed=1)
    before = {path: path.read_bytes() for path in data.rglob("*") if path.is_file()}
    with pytest.raises(FileExistsError, match=f"^{data}: not an empty folder; synthesize writes a data set into"):
        synthesize(data, train=3, val=1, image_size=64, seed=2)
    assert {path: path.read_bytes() for path in data.rglob("*") if path.is_file()} == before
    (tmp_path / "file").write_text("notes")
    with pytest.raises(FileExistsError, match="file: not an empty folder"):
        synthesize(tmp_path / "file", train=1, val=1, image_size=64)
    assert (tmp_path / "file").read_text() == "notes"


def test_an_interrupted_run_leaves_nothing_behind_and_runs_again(tmp_path, monkeypatch):
    draw = synthetic._draw_image
    drawn = []

    def draw_then_fail(*args, **kwargs):
        if len(drawn) == 3:
            raise RuntimeError("interrupted")
        drawn.append(None)
        return draw(*args, **kwargs)

    monkeypatch.setattr(synthetic, "_draw_image", draw_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        synthesize(tmp_path / "shapes", train=2, val=2, image_size=64)
    assert list((tmp_path / "shapes").iterdir()) == []
    monkeypatch.setattr(synthetic, "_draw_image", draw)
    data = synthesize(tmp_path / "shapes", train=2, val=2, image_size=64)
    assert sorted(path.name for path in data.iterdir()) == ["annotations", "train", "val"]
    assert [len(_load(data, split)["images"]) for split in ("train", "val")] == [2, 2]
