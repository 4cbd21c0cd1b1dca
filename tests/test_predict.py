"""Detector.predict on every kind of input, batched and not; the detect command end to end."""

from __future__ import annotations

import importlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REFERENCE_BACKBONE
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d, box_convert, box_iou

from deformable_detr import evaluation, precision
from deformable_detr.checkpoints import read_checkpoint, save_checkpoint, save_reference_checkpoint
from deformable_detr.cli import main
from deformable_detr.data import SYNTHETIC_CLASSES, read_image, synthesize
from deformable_detr.files import exclusive_lock
from deformable_detr.model import build_model
from deformable_detr.precision import forward
from deformable_detr.predict import Detector, detect_files
from deformable_detr.train import TrainConfig, train

from data_writers import write_decompression_bomb
from test_check_data import save_with_orientation, truncate

IMAGE_SIZE = 96


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny model trained for one epoch on synthetic shapes: (checkpoint, data folder)."""
    data = synthesize(tmp_path_factory.mktemp("shapes"), train=8, val=4, image_size=IMAGE_SIZE, seed=1)
    run = tmp_path_factory.mktemp("run")
    train(TrainConfig(data=str(data), output_dir=str(run), preset="tiny", epochs=1, batch_size=4,
                      image_size=IMAGE_SIZE, workers=0, seed=3))  # fmt: skip
    return run / "checkpoint.pt", data


@pytest.fixture(scope="module")
def detector(trained):
    return Detector.from_checkpoint(trained[0], device="cpu")


def val_images(data):
    return sorted((data / "val").iterdir())


def assert_same(actual, expected, *, score_tolerance=1e-5, box_tolerance=1e-3):
    assert actual.labels.tolist() == expected.labels.tolist() and actual.names == expected.names
    torch.testing.assert_close(actual.scores, expected.scores, rtol=0, atol=score_tolerance)
    torch.testing.assert_close(actual.boxes, expected.boxes, rtol=0, atol=box_tolerance)


def test_checkpoint_carries_class_names_and_image_size(detector):
    assert detector.image_size == IMAGE_SIZE
    assert [detector.class_names[i] for i in sorted(detector.class_names)] == list(SYNTHETIC_CLASSES)


def test_every_input_kind_gives_the_same_detections(detector, trained):
    path = val_images(trained[1])[0]
    expected = detector.predict(path, threshold=0.0)
    assert len(expected.scores) == 100 and expected.scores.diff().le(0).all()
    pil = Image.open(path)
    array = np.array(pil.convert("RGB"))
    uint8 = torch.from_numpy(array).permute(2, 0, 1)
    for image in (pil, array, uint8, uint8.float() / 255, str(path)):
        assert_same(detector.predict(image, threshold=0.0), expected)
    assert_same(detector.predict(uint8[None], threshold=0.0)[0], expected)


def test_grey_and_rgba_arrays_and_tensors_read_as_their_files_do(detector, trained):
    """imageio and matplotlib read a PNG as (H, W, 4) RGBA, torchvision's decode_image as (4, H, W):
    their alpha is dropped and grey repeated, as PIL's convert("RGB") reads the files."""
    rgb = np.array(Image.open(val_images(trained[1])[0]).convert("RGB"))
    rgba = np.concatenate([rgb, np.full(rgb.shape[:2] + (1,), 7, dtype=np.uint8)], axis=2)
    grey = rgb[..., 1]
    for image, same_as in ((rgba, rgb), (torch.from_numpy(rgba).permute(2, 0, 1), rgb), (grey[..., None], grey),
                           (torch.from_numpy(grey)[None], grey)):
        assert_same(detector.predict(image, threshold=0.0), detector.predict(Image.fromarray(same_as), threshold=0.0))


def test_a_photo_that_viewers_show_turned_is_read_upright_as_they_show_it(detector, trained, tmp_path):
    upright = Image.open(val_images(trained[1])[0]).convert("RGB").crop((0, 0, IMAGE_SIZE, 64))
    photo = tmp_path / "photo.png"  # lossless, so that the pixels read back are the upright ones exactly
    save_with_orientation(upright.transpose(Image.Transpose.ROTATE_90), photo, 6)  # 6: turn clockwise to show
    assert read_image(photo).shape == (3, IMAGE_SIZE, 64)  # data sets read it as stored
    expected = detector.predict(upright, threshold=0.0)
    for image in (photo, Image.open(photo)):
        assert_same(detector.predict(image, threshold=0.0), expected)
    assert torch.equal(expected.draw(photo), expected.draw(upright))
    detect_files(detector, [photo], tmp_path / "out", threshold=0.0, progress=False)
    assert Image.open(tmp_path / "out" / "photo.png").size == upright.size
    boxes = [result["bbox"] for result in json.loads((tmp_path / "out" / "detections.json").read_text())]
    torch.testing.assert_close(torch.tensor(boxes[:5]), box_convert(expected.boxes[:5], "xyxy", "xywh"), rtol=0, atol=1e-3)


def test_threshold_keeps_only_confident_detections(detector, trained):
    path = val_images(trained[1])[0]
    everything = detector.predict(path, threshold=0.0)
    threshold = float(everything.scores[4])
    kept = detector.predict(path, threshold=threshold)
    assert kept.scores.min() >= threshold and len(kept.scores) == int((everything.scores >= threshold).sum())


def test_boxes_are_in_the_input_images_pixels(detector, trained):
    image = torch.from_numpy(np.array(Image.open(val_images(trained[1])[0]).convert("RGB"))).permute(2, 0, 1)
    doubled = image.repeat_interleave(2, 1).repeat_interleave(2, 2)
    small, large = detector.predict([image, doubled], threshold=0.0, batch_size=1)
    # The doubled image is resized back to nearly the same model input, so its boxes are twice as
    # large. Nearly: scores differ a little and close ones may swap ranks, so each of the best boxes
    # is matched to the nearest of the doubled image's.
    distances = torch.cdist(small.boxes[:5] * 2, large.boxes[:20], p=float("inf"))
    assert distances.min(1).values.max() <= 1.0
    assert large.boxes.min() >= 0 and large.boxes[:, 2].max() <= 192 and large.boxes[:, 3].max() <= 192


def test_a_batch_of_equal_sizes_equals_one_by_one(detector, trained):
    image = Image.open(val_images(trained[1])[0]).convert("RGB")
    images = [image, image.transpose(Image.Transpose.FLIP_TOP_BOTTOM), image.rotate(180)]
    for image, together in zip(images, detector.predict(images, threshold=0.0, batch_size=3)):
        assert_same(together, detector.predict(image, threshold=0.0), score_tolerance=1e-4, box_tolerance=1e-2)


def test_equal_sizes_are_batched_together_and_results_keep_the_input_order(detector, trained):
    image = Image.open(val_images(trained[1])[0]).convert("RGB")
    crop = image.crop((0, 0, 80, 90))
    flip = Image.Transpose.FLIP_LEFT_RIGHT
    images = [image, crop, image.transpose(flip), crop.transpose(flip)]
    for image, together in zip(images, detector.predict(images, threshold=0.0, batch_size=2)):
        assert_same(together, detector.predict(image, threshold=0.0), score_tolerance=1e-4, box_tolerance=1e-2)


def test_a_padded_batch_stays_close_to_one_by_one(detector, trained):
    # Padding changes the backbone's borders and the input projections' GroupNorm statistics, as in
    # the reference implementation, so padded images score a little differently (docs/detect.md#batches-and-padding).
    images = [Image.open(path).convert("RGB") for path in val_images(trained[1])]
    images[1] = images[1].crop((0, 0, 80, 96))
    images[2] = images[2].crop((0, 0, 96, 60))
    batched = detector.predict(images, threshold=0.0, batch_size=4)
    for image, together in zip(images, batched):
        alone = detector.predict(image, threshold=0.0)
        torch.testing.assert_close(together.scores[:20], alone.scores[:20], rtol=0, atol=0.03)


def test_released_checkpoints_are_labelled_with_coco_names(tmp_path):
    save_reference_checkpoint(tmp_path / "released.pth", build_model("tiny", **REFERENCE_BACKBONE))
    detector = Detector.from_checkpoint(tmp_path / "released.pth", device="cpu")
    assert detector.image_size == 800
    assert len(detector.class_names) == 80 and detector.class_names[1] == "person" and detector.class_names[90] == "toothbrush"


def test_detect_writes_pictures_and_coco_results_and_reports_a_corrupt_file(trained, tmp_path, capsys):
    checkpoint, data = trained
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"not a picture")
    out = tmp_path / "out"
    code = main(["detect", str(checkpoint), str(data / "val"), str(corrupt), "--out", str(out), "--threshold", "0.05",
                 "--batch-size", "3"])  # fmt: skip
    assert code == 1
    error = capsys.readouterr().err
    assert f"{corrupt}: cannot read image" in error
    good = val_images(data)
    assert sorted(p.name for p in out.glob("*.png")) == sorted(f"{p.stem}.png" for p in good)
    drawn = Image.open(out / f"{good[0].stem}.png")
    assert drawn.size == Image.open(good[0]).size

    results = json.loads((out / "detections.json").read_text())
    assert results, "a threshold of 0.05 keeps some detections of a trained model"
    assert {r["file_name"] for r in results} <= {str(p) for p in good}
    for result in results:
        width, height = Image.open(result["file_name"]).size
        x, y, w, h = result["bbox"]
        assert -0.5 <= x and -0.5 <= y and w >= 0 and h >= 0 and x + w <= width + 0.5 and y + h <= height + 0.5
        assert result["category_id"] in range(1, len(SYNTHETIC_CLASSES) + 1) and result["score"] >= 0.05
    # Files are read and predicted three at a time, in order; the corrupt one leaves the last batch.
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    expected = [detector.predict(chunk, threshold=0.05, batch_size=3) for chunk in (good[:3], good[3:])]
    expected = expected[0] + expected[1]
    for path, detections in zip(good, expected):
        scores = [r["score"] for r in results if r["file_name"] == str(path)]
        assert scores == pytest.approx(detections.scores.tolist(), abs=1e-4)


@pytest.mark.parametrize("arguments, expected", [
    (["detect", "--batch-size", "0"], "batch_size must be a whole number of at least 1, got 0"),
    (["detect", "--threshold", "1.5"], "threshold must be in [0, 1], got 1.5"),
    (["detect", "--image-size", "-5"], "image_size must be a whole number of at least 1, got -5"),
    (["explain", "--top-k", "-1"], "top_k must be a whole number of at least 1, got -1"),
    (["explain", "--encoder-point", "1.5", "-0.2"], "encoder_point's x must be in [0, 1], got 1.5"),
    (["explore", "--max-bytes", "-1"], "max_bytes must be a whole number of at least 1, got -1"),
    (["evaluate", "--image-size", "0"], "image_size must be a whole number of at least 1, got 0"),
    (["synthesize", "--train", "-1"], "train and val must be counts of images, 0 or more, got -1 and 100"),
    (["demo", "--minutes", "-1"], "minutes must be above 0, got -1.0"),
    (["demo", "--epochs", "0"], "epochs must be a whole number of at least 1, got 0"),
])
def test_out_of_range_options_are_refused_by_name_before_anything_is_written(trained, tmp_path, monkeypatch, capsys,
                                                                               arguments, expected):
    checkpoint, data = trained
    image, out = str(val_images(data)[0]), tmp_path / "out"
    command, *options = arguments
    inputs = {"detect": [str(checkpoint), image, "--out", str(out)], "explain": [str(checkpoint), image, "--out", f"{out}.png"],
              "explore": [str(checkpoint), image, "--out", str(out)], "evaluate": [str(checkpoint), "--data", str(data)],
              "synthesize": [str(out)], "demo": []}[command]
    monkeypatch.chdir(tmp_path)  # where the demo would write runs/demo
    assert main([command, *inputs, *options]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {expected}\n"
    assert sorted(tmp_path.iterdir()) == []


@pytest.mark.parametrize("device, expected", [("foo", "unknown device 'foo': expected cpu, cuda, cuda:1, ..."),
                                              ("cuda:99", "device 'cuda:99': ")])
def test_a_device_that_is_not_there_is_refused_in_one_line(trained, tmp_path, capsys, device, expected):
    checkpoint, data = trained
    code = main(["detect", str(checkpoint), str(val_images(data)[0]), "--out", str(tmp_path / "out"), "--device", device])
    assert code == 1
    assert capsys.readouterr().err.startswith(f"deformable-detr: error: {expected}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("image, error, message", [
    (np.zeros((64, 64, 3), dtype=np.int64), TypeError, "an image is uint8 (0 to 255) or float (0 to 1), not int64"),
    (torch.full((3, 64, 64), 255.0), ValueError, "a float image holds values in [0, 1], got 255 to 255"),
    (torch.full((3, 8, 8), float("nan")), ValueError, "a float image holds values in [0, 1], got nan to nan"),
    (torch.zeros(3, 0, 64, dtype=torch.uint8), ValueError, "an image has no pixels: 64 x 0"),
    (torch.zeros(3, 2, 400, dtype=torch.uint8), ValueError, "the image: 400 x 2 pixels is too elongated to detect in"),
    (torch.zeros(64, 64), ValueError, "an image tensor is (3, H, W), or (N, 3, H, W) for N images, not (64, 64)"),
    (torch.zeros(2, 64, 64), ValueError, "an image tensor must be (C, H, W) with C 1 (grey), 3 (RGB) or 4 (RGBA), got "
                                         "shape (2, 64, 64)"),
    (np.zeros((64, 64, 2)), ValueError, "a numpy image must be (H, W) grey, or (H, W, C) with C 1, 3 (RGB) or 4 "
                                        "(RGBA), got shape (64, 64, 2)"),
    (5, TypeError, "not an image: int"),
], ids=["int64", "float-255", "nan", "empty", "elongated", "2-d", "2-channel-tensor", "2-channel-array", "int"])
def test_images_the_model_cannot_take_are_refused_before_it_runs(detector, image, error, message):
    with pytest.raises(error, match=re.escape(message)):
        detector.predict(image)


@pytest.mark.parametrize("model, message", [
    ("runs/best.pt", "model is a str; expected a DeformableDETR (from build_model or load_pretrained); "
                     "Detector.from_checkpoint(path) reads a checkpoint file"),
    (torch.nn.Linear(2, 2), "model is a Linear; expected a DeformableDETR (from build_model or load_pretrained)"),
], ids=["path", "module"])
def test_a_detector_of_something_other_than_a_model_is_refused_in_one_line(model, message):
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        Detector(model)


@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float64])
def test_a_model_cast_to_another_precision_is_refused_in_one_line_before_it_runs(weights):
    message = (f"the model's weights are {weights}, which dtype=torch.float32 does not compute with: "
               "pass the float32 model (model.float()) and the precision to compute in as dtype")
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        Detector(build_model("tiny").to(weights))


def test_a_float_image_a_little_outside_its_range_is_clamped_as_a_resize_leaves_it(detector):
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    overshot = image.clone()
    overshot[0, 0, 0], overshot[1, 0, 0] = -0.1, 1.08  # what bicubic resizing does at sharp edges
    assert_same(detector.predict(overshot, threshold=0.0), detector.predict(overshot.clamp(0, 1), threshold=0.0))


def test_numpy_numbers_are_numbers(detector):
    detector.predict(torch.zeros(3, 64, 64, dtype=torch.uint8), threshold=np.float32(0.5), batch_size=np.int64(2))


@pytest.mark.parametrize("option, message", [({"threshold": 1.5}, "threshold must be in [0, 1], got 1.5"),
                                             ({"batch_size": 0}, "batch_size must be a whole number of at least 1, got 0")])
def test_predict_options_out_of_range_are_refused(detector, option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        detector.predict(torch.zeros(3, 64, 64, dtype=torch.uint8), **option)


def test_detect_skips_an_image_too_elongated_to_detect_in_and_says_so(trained, tmp_path, capsys):
    checkpoint, data = trained
    strip = tmp_path / "strip.png"
    Image.new("RGB", (400, 2)).save(strip)  # the tiny model sees at most 160 pixels along a side
    assert main(["detect", str(checkpoint), str(val_images(data)[0]), str(strip), "--out", str(tmp_path / "out")]) == 1
    assert f"skipped: {strip}: 400 x 2 pixels is too elongated to detect in" in capsys.readouterr().err
    assert (tmp_path / "out" / f"{val_images(data)[0].stem}.png").is_file()


def test_a_folder_without_images_is_refused_by_name(trained, tmp_path, capsys):
    checkpoint, data = trained
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no pictures here")
    assert main(["detect", str(checkpoint), str(val_images(data)[0]), str(empty), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err.startswith(f"deformable-detr: error: {empty}: no image files in this folder (.bmp, ")
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="image_size must be a whole number of at least 1, got 0"):
        Detector.from_checkpoint(checkpoint, device="cpu", image_size=0)


def test_an_input_that_is_not_there_is_refused_by_name_before_anything_is_written(trained, tmp_path, capsys):
    # A mistyped path, unlike an unreadable image among good ones, is not skipped.
    checkpoint, data = trained
    missing = tmp_path / "nothere"
    assert main(["detect", str(checkpoint), str(val_images(data)[0]), str(missing), "--out", str(tmp_path / "out")]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {missing}: no such file or folder\n"
    assert not (tmp_path / "out").exists()


def test_detect_refuses_to_write_over_its_inputs_before_anything_is_written(trained, tmp_path, capsys):
    checkpoint, data = trained
    photos = tmp_path / "photos"
    shutil.copytree(data / "val", photos)
    screenshot = photos / "screenshot.png"
    Image.open(val_images(data)[0]).save(screenshot)
    before = {path.name: path.read_bytes() for path in photos.iterdir()}

    assert main(["detect", str(checkpoint), str(photos), "--out", str(photos)]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: {photos}: the output folder is an input folder, "
                                       f"where the annotated copies would be taken for images; choose another\n")
    # The folder by another path: screenshot.png's annotated copy would be screenshot.png itself.
    link = tmp_path / "link"
    link.symlink_to(photos)
    assert main(["detect", str(checkpoint), str(screenshot), "--out", str(link)]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: {screenshot}: an annotated copy would be written "
                                       f"over this input image; choose another output folder\n")
    assert {path.name: path.read_bytes() for path in photos.iterdir()} == before

    # A .jpg file given by itself may have its copy beside it, as `detect photo.jpg --out .` does.
    photo = photos / val_images(data)[0].name
    assert main(["detect", str(checkpoint), str(photo), "--out", str(photos)]) == 0
    assert (photos / f"{photo.stem}.png").is_file() and photo.read_bytes() == before[photo.name]


def test_detect_refuses_a_folder_another_run_is_writing_and_a_file_for_a_folder(trained, tmp_path, capsys):
    """The second run cleared the first's progress and wrote over its pictures; the last merge won."""
    checkpoint, data = trained
    out = tmp_path / "out"
    out.mkdir()
    with exclusive_lock(out / ".lock") as holder:  # as the other run's main process holds it
        assert main(["detect", str(checkpoint), str(data / "val"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == (f"deformable-detr: error: {out}: another run is writing there ({holder} holds "
                                       f"{out / '.lock'}): let it end, or use another output directory\n")
    assert sorted(path.name for path in out.iterdir()) == [".lock"]  # the other run's, untouched
    assert main(["detect", str(checkpoint), str(data / "val"), "--out", str(out)]) == 0  # once it has ended
    assert (out / "detections.json").is_file()

    (tmp_path / "file").write_text("")
    assert main(["detect", str(checkpoint), str(data / "val"), "--out", str(tmp_path / "file")]) == 1
    assert capsys.readouterr().err.endswith(f"deformable-detr: error: {tmp_path / 'file'}: a file, not a folder for "
                                            f"the annotated copies and detections.json\n")


def test_explain_command_draws_the_sampling_points(trained, tmp_path, capsys):
    checkpoint, data = trained
    image = val_images(data)[0]
    assert main(["explain", str(checkpoint), str(image), "--out", str(tmp_path / "explain.png"), "--top-k", "2",
                 "--threshold", "0"]) == 0  # fmt: skip
    assert capsys.readouterr().out == (f"{tmp_path / 'explain.png'}: sampling points of up to 2 detections scoring "
                                       "at least 0.0, and of one encoder query\n")
    picture = Image.open(tmp_path / "explain.png")
    assert picture.width > 3 * picture.height  # two detection panels and the encoder panel, side by side


@pytest.mark.parametrize("name, problem", [
    ("explain", "no suffix to name the image format"),
    ("explain.xyz", "unknown image format '.xyz'"),
    ("explain.psd", "PSD images can be read but not written"),
])
def test_explain_refuses_a_picture_it_cannot_write_before_the_model_loads(tmp_path, capsys, name, problem):
    out = tmp_path / name
    # Neither the checkpoint nor the image is there: the error is the picture's, so it came first.
    assert main(["explain", str(tmp_path / "missing.pt"), str(tmp_path / "missing.jpg"), "--out", str(out)]) == 1
    assert capsys.readouterr().err == f"deformable-detr: error: {out}: {problem}; use e.g. .png or .jpg\n"


def test_evaluate_resizes_to_the_checkpoints_image_size_unless_told(trained, monkeypatch, capsys):
    from deformable_detr import evaluation

    sizes = []
    recipe = evaluation.recipe
    monkeypatch.setattr(evaluation, "recipe", lambda size: sizes.append(size) or recipe(size))
    checkpoint, data = trained
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0"]) == 0
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0", "--image-size", "128"]) == 0
    assert sizes == [IMAGE_SIZE, 128]
    assert capsys.readouterr().out.count("AP50") == 2


def test_evaluate_batches_as_the_checkpoints_training_did_so_its_ap_is_trainings_unless_told(trained, tmp_path,
                                                                                             monkeypatch, capsys):
    # A batch is padded to its largest image, and padding moves scores: training evaluated in batches of 4.
    checkpoint, data = trained
    batch_sizes = []
    data_loader = evaluation.data_loader
    monkeypatch.setattr(evaluation, "data_loader",
                        lambda dataset, **options: batch_sizes.append(options["batch_size"]) or data_loader(dataset, **options))
    logged = json.loads((checkpoint.parent / "log.jsonl").read_text().splitlines()[-1])
    assert evaluation.evaluate_checkpoint(checkpoint, data, workers=0)["AP"] == logged["AP"]
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0", "--batch-size", "3"]) == 0
    # A checkpoint that does not record its training: the reference code's batch of 2.
    read = read_checkpoint(checkpoint)
    weights = tmp_path / "weights.pt"
    save_checkpoint(weights, read.build_model(), class_names=read.class_names, image_size=read.image_size)
    assert main(["evaluate", str(weights), "--data", str(data), "--workers", "0"]) == 0
    assert batch_sizes == [4, 3, 2]


@pytest.mark.parametrize("option, message", [({"image_size": 0}, "image_size must be a whole number of at least 1, got 0"),
                                             ({"batch_size": "2"}, "batch_size must be a whole number of at least 1, got '2'")])
def test_evaluate_refuses_options_out_of_range_before_loading_anything(trained, option, message):
    checkpoint, data = trained
    with pytest.raises(ValueError, match=re.escape(message)):
        evaluation.evaluate_checkpoint(checkpoint, data, workers=0, **option)



def _with_val_instances(data, tmp_path, edit):
    """A copy of the data set ``data`` whose validation instances ``edit`` has changed."""
    other = tmp_path / "other"
    shutil.copytree(data, other)
    path = other / "annotations" / "instances_val.json"
    instances = json.loads(path.read_text())
    edit(instances)
    path.write_text(json.dumps(instances))
    return other


def _objects_of_a_class_it_does_not_name(instances):
    # Id 0 is within the model's 6 classes, but the checkpoint names no class 0: it never learnt one.
    instances["categories"].append({"id": 0, "name": "zebra"})
    instances["annotations"][0]["category_id"] = 0


@pytest.mark.parametrize("edit, message", [
    (lambda instances: instances["categories"][0].update(name="zebra"), "class 1 is 'ellipse' there but 'zebra' in"),
    (lambda instances: instances["categories"].append({"id": 9, "name": "zebra"}), "the model has 6 classes, but"),
    (_objects_of_a_class_it_does_not_name, "the model has no class 0, but"),
], ids=["another name", "more classes", "a class it does not name"])
def test_evaluate_refuses_a_data_set_of_other_classes_in_one_line(trained, tmp_path, capsys, edit, message):
    # COCO evaluation pairs classes by id: the model would be scored against classes it never learnt.
    checkpoint, data = trained
    other = _with_val_instances(data, tmp_path, edit)
    assert main(["evaluate", str(checkpoint), "--data", str(other), "--workers", "0"]) == 1
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"deformable-detr: error: {checkpoint}: ") and message in error and "\n" not in error


def test_evaluate_scores_classes_named_in_another_case_beside_one_it_does_not_name_without_objects(trained, tmp_path):
    # Names are told apart whatever their case; a class without objects scores nothing, so it cannot mislead.
    def edit(instances):
        for category in instances["categories"]:
            category["name"] = category["name"].upper()
        instances["categories"].append({"id": 0, "name": "zebra"})

    checkpoint, data = trained
    other = _with_val_instances(data, tmp_path, edit)
    assert main(["evaluate", str(checkpoint), "--data", str(other), "--workers", "0"]) == 0

# --------------------------------------------------------------------------- precision

# bfloat16 keeps 8 significant bits: a logit near -2.6 moves by up to 2^-7, its score by about 1e-3,
# and boxes by a fraction of a pixel of the 96-pixel images. Bounds with a few times that margin.
BF16_SCORE_TOLERANCE = 5e-3
BF16_MIN_IOU = 0.85
BEST = 10  # the float32 detections compared, per image
# Where bfloat16 is emulated the Detector warns that it is slow; these tests check its numbers.
SPEED_WARNING_IGNORED = pytest.mark.filterwarnings("ignore:bfloat16 is emulated:RuntimeWarning")


@SPEED_WARNING_IGNORED
def test_bf16_detections_match_float32_ones_by_iou(detector, trained):
    bf16 = Detector(detector.model, class_names=detector.class_names, image_size=detector.image_size, dtype=torch.bfloat16)
    images = val_images(trained[1])
    for reference, detections in zip(detector.predict(images, threshold=0.0), bf16.predict(images, threshold=0.0)):
        assert detections.boxes.dtype == detections.scores.dtype == torch.float32  # post-processed in float32
        # Near-equal scores may swap ranks in bfloat16, so each of the best float32 detections is
        # matched to the bfloat16 detection of its class that overlaps it most, wherever it ranks.
        overlaps = box_iou(reference.boxes[:BEST], detections.boxes)
        overlaps[reference.labels[:BEST, None] != detections.labels[None]] = 0
        best_overlap, match = overlaps.max(1)
        assert best_overlap.min() >= BF16_MIN_IOU
        torch.testing.assert_close(detections.scores[match], reference.scores[:BEST], rtol=0, atol=BF16_SCORE_TOLERANCE)
        assert not torch.equal(detections.scores[match], reference.scores[:BEST]), "bfloat16 ran: scores differ a little"


@SPEED_WARNING_IGNORED
def test_bf16_runs_a_copy_with_folded_batch_norms_and_leaves_the_model_as_it_was(detector):
    before = {key: value.clone() for key, value in detector.model.state_dict().items()}
    bf16 = Detector(detector.model, dtype=torch.bfloat16)
    assert bf16.model is not detector.model
    assert not any(isinstance(module, FrozenBatchNorm2d) for module in bf16.model.modules())
    after = detector.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[key], after[key]) for key in before)


def test_float32_is_the_default_and_the_plain_forward(detector, trained):
    assert detector.dtype == torch.float32
    assert Detector(detector.model).model is detector.model
    inputs = [detector.prepare(path) for path in val_images(trained[1])[:2]]
    with torch.no_grad():
        plain = detector.model(inputs)
        through = forward(detector.model, inputs)
    for key in ("pred_logits", "pred_boxes"):
        assert torch.equal(through[key], plain[key])


def test_emulated_bf16_is_said_in_one_line_and_other_dtypes_are_refused(detector, trained, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    with pytest.warns(RuntimeWarning, match=r"^bfloat16 is emulated on this cpu \(it needs a CPU with AVX512-BF16 or AMX\)"):
        Detector(detector.model, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="unsupported inference dtype torch.float64"):
        Detector(detector.model, dtype=torch.float64)

    # The command prints it as one line of its own and runs on, in bfloat16.
    def show(message, category, filename, lineno, file=None, line=None):
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    monkeypatch.setattr(warnings, "showwarning", show)
    image = val_images(trained[1])[0]
    assert main(["detect", str(trained[0]), str(image), "--out", str(tmp_path / "out"), "--bf16"]) == 0
    warning_lines = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warning_lines == ["deformable-detr: warning: bfloat16 is emulated on this cpu (it needs a CPU with "
                             "AVX512-BF16 or AMX): slower than float32"]  # fmt: skip


@SPEED_WARNING_IGNORED
def test_evaluate_and_explain_take_bf16(trained, tmp_path, monkeypatch):
    dtypes = []
    for name in ("deformable_detr.evaluation", "deformable_detr.explain"):  # the package exports explain(), a function
        module = importlib.import_module(name)
        monkeypatch.setattr(module, "forward", lambda *args, dtype, run=module.forward: dtypes.append(dtype) or run(*args, dtype=dtype))
    checkpoint, data = trained
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0", "--bf16"]) == 0
    assert main(["explain", str(checkpoint), str(val_images(data)[0]), "--out", str(tmp_path / "x.png"), "--bf16"]) == 0
    assert main(["evaluate", str(checkpoint), "--data", str(data), "--workers", "0"]) == 0
    # evaluate: one batch of four images, as training evaluated; explain: one forward.
    assert dtypes == [torch.bfloat16] * 2 + [torch.float32]


@pytest.fixture(scope="module")
def image_folder(trained, tmp_path_factory):
    """Twelve images of several sizes, and among them a decompression bomb, a JPEG cut short and an
    empty file: (folder, the bad files)."""
    _, data = trained
    folder = tmp_path_factory.mktemp("images")
    for path in [*val_images(data), *sorted((data / "train").iterdir())]:
        shutil.copyfile(path, folder / f"{path.parent.name}-{path.name}")
    bad = [write_decompression_bomb(folder / "train-000003x.png"), folder / "val-000002x.jpg", folder / "zz-empty.jpg"]
    shutil.copyfile(folder / "val-000002.jpg", bad[1])
    truncate(bad[1])
    bad[2].touch()
    return folder, bad


def detect_command(checkpoint, folder, out) -> list[str]:
    return ["detect", str(checkpoint), str(folder), "--out", str(out), "--threshold", "0.05", "--batch-size", "2",
            "--device", "cpu"]


def assert_one_line_each(error: str, bad_files) -> None:
    # (Anywhere in a line: under torchrun one process's line may follow the other's progress bar.)
    assert error.count("skipped: ") == len(bad_files), error
    for path in bad_files:
        assert error.count(f"skipped: {path}: cannot read image (") == 1, error


def test_detect_under_torchrun_shares_the_images_and_writes_what_one_process_writes(trained, image_folder, tmp_path,
                                                                                     capsys):
    checkpoint, _ = trained
    folder, bad = image_folder
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "deformable_detr.cli", *detect_command(checkpoint, folder, tmp_path / "two")]
    two = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 1 and "ChildFailedError" in two.stderr  # the bad files: status 1, from every process
    assert two.stdout.count("annotated images and detections.json; 3 file(s) failed") == 1
    assert_one_line_each(two.stderr, bad)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each torchrun process
    try:
        assert main(detect_command(checkpoint, folder, tmp_path / "one")) == 1
    finally:
        torch.set_num_threads(threads)
    assert_one_line_each(capsys.readouterr().err, bad)
    one = json.loads((tmp_path / "one" / "detections.json").read_text())
    assert len({result["image_id"] for result in one}) == 12
    assert json.loads((tmp_path / "two" / "detections.json").read_text()) == one
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(p.name for p in (tmp_path / "one").iterdir())


def count_predictions(monkeypatch, interrupt_at: int | None = None) -> list[int]:
    """The size of each batch Detector.predict gets from now on; a KeyboardInterrupt at call ``interrupt_at``."""
    predicted = []
    predict = Detector.predict

    def counted(self, images, **options):
        if len(predicted) == interrupt_at:
            raise KeyboardInterrupt
        predicted.append(len(images))
        return predict(self, images, **options)

    monkeypatch.setattr(Detector, "predict", counted)
    return predicted


def test_an_interrupted_detect_run_again_detects_only_the_batches_not_done(trained, image_folder, tmp_path,
                                                                           monkeypatch, capsys):
    checkpoint, _ = trained
    folder, _ = image_folder
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    expected, out = tmp_path / "expected", tmp_path / "out"
    assert len(detect_files(detector, [folder], expected, threshold=0.05, batch_size=2, progress=False)) == 3

    with monkeypatch.context() as interrupted:
        count_predictions(interrupted, interrupt_at=3)
        with pytest.raises(KeyboardInterrupt):
            detect_files(detector, [folder], out, threshold=0.05, batch_size=2, progress=False)
    assert not (out / "detections.json").exists()
    drawn = {path.name: path.stat().st_mtime_ns for path in out.glob("*.png")}
    assert len(drawn) == 5  # batches 0 to 2 (the bomb is batch 1's other file)
    # What a kill -9 while writing leaves (atomic_write's temporary names), and a file of the user's.
    abandoned = [out / ".train-000007.png.k9x2ab.tmp", out / ".detections.json.q1w2e3.tmp"]
    for path in abandoned:
        path.write_bytes(b"half")
    unrelated = out / ".notes.md.a1b2c3.tmp"
    unrelated.write_text("mine")

    predicted = count_predictions(monkeypatch)
    capsys.readouterr()
    failures = detect_files(detector, [folder], out, threshold=0.05, batch_size=2, progress=False)
    assert f"{out}: 3 of 8 batches done by an earlier run; detecting the rest" in capsys.readouterr().out
    assert not [path for path in abandoned if path.exists()] and unrelated.read_text() == "mine"
    unrelated.unlink()
    assert len(failures) == 3 and len(predicted) == 4  # batches 3 to 6; batch 7 is the empty file alone
    assert {path.name: path.stat().st_mtime_ns for path in out.glob("*.png") if path.name in drawn} == drawn
    assert json.loads((out / "detections.json").read_text()) == json.loads((expected / "detections.json").read_text())
    assert sorted(path.name for path in out.iterdir()) == sorted(path.name for path in expected.iterdir())


def test_a_terminated_detect_leaves_no_half_written_file(trained, image_folder, tmp_path, monkeypatch, capsys):
    # SIGTERM (kill, scancel) while a picture is being written: the command abandons the picture,
    # removes its temporary file and exits as a process the signal ended. Without the command's
    # handler, the guard below would see the signal.
    checkpoint, _ = trained
    folder, _ = image_folder
    out = tmp_path / "out"
    saves = []

    def save_then_terminate(picture, target, *args, **kwargs):
        saves.append(target)
        original_save(picture, target, *args, **kwargs)
        if len(saves) == 3:
            os.kill(os.getpid(), signal.SIGTERM)

    def guard(*_):
        raise AssertionError("SIGTERM reached the process's own handler")

    original_save = Image.Image.save
    monkeypatch.setattr(Image.Image, "save", save_then_terminate)
    previous = signal.signal(signal.SIGTERM, guard)
    try:
        code = main(["detect", str(checkpoint), str(folder), "--out", str(out), "--batch-size", "2"])
        assert signal.getsignal(signal.SIGTERM) is guard  # put back
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert code == 128 + signal.SIGTERM
    assert "deformable-detr: terminated" in capsys.readouterr().err
    assert Path(saves[-1]).name.endswith(".tmp") and not Path(saves[-1]).exists()
    assert not [path for path in out.rglob("*") if path.name.endswith(".tmp")]
    assert len(list(out.glob("*.png"))) == 2  # the pictures written before the signal


def test_batches_done_by_a_run_with_other_settings_are_not_taken(trained, image_folder, tmp_path, monkeypatch, capsys):
    checkpoint, _ = trained
    folder, _ = image_folder
    detector = Detector.from_checkpoint(checkpoint, device="cpu")
    with monkeypatch.context() as interrupted:
        count_predictions(interrupted, interrupt_at=2)
        with pytest.raises(KeyboardInterrupt):
            detect_files(detector, [folder], tmp_path, threshold=0.05, batch_size=2, progress=False)
    predicted = count_predictions(monkeypatch)
    capsys.readouterr()
    detect_files(detector, [folder], tmp_path, threshold=0.3, batch_size=2, progress=False)
    assert "done by an earlier run" not in capsys.readouterr().out and len(predicted) == 7
