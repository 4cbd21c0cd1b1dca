"""Drawing: sampling points (colour per head, area by weight, reference cross, box) and saving."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from deformable_detr.visualize import draw_detections, draw_sampling_points, head_colours, save_image


def _count(picture: Image.Image, colour: tuple[int, int, int]) -> int:
    return int((np.array(picture) == colour).all(-1).sum())


def test_sampling_points_have_their_head_colour_and_an_area_by_weight():
    picture = Image.new("RGB", (800, 800), "grey")
    # Two heads, one level, one point each: head 0 at the left with weight 1, head 1 at the right
    # with weight 1/4, so half the radius and a quarter of the area.
    locations = torch.tensor([[[[0.25, 0.5]]], [[[0.75, 0.5]]]])
    weights = torch.tensor([[[1.0]], [[0.25]]])
    box = torch.tensor([100.0, 100.0, 300.0, 700.0])
    drawn = draw_sampling_points(picture, locations, weights, torch.tensor([0.5, 0.5]), box=box)
    first, second = head_colours(2)
    pixels = np.array(drawn)
    assert pixels[400, 200].tolist() == list(first)
    assert pixels[400, 600].tolist() == list(second)
    assert 3 < _count(drawn, first) / _count(drawn, second) < 6  # less the dots' outlines
    assert pixels[400, 400].tolist() == [255, 255, 255]  # the reference cross
    assert _count(drawn, (255, 255, 0)) > 0  # the box
    assert _count(picture, first) == 0  # drawn on a copy


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sampling_points_recorded_on_a_gpu_are_drawn_as_on_the_cpu():
    # What explain hands over from a model on a GPU: capture_attention keeps the records there.
    generator = torch.Generator().manual_seed(0)
    locations = torch.rand(8, 4, 4, 2, generator=generator)
    weights = torch.rand(8, 4, 4, generator=generator)
    reference = torch.rand(2, generator=generator)
    picture = Image.new("RGB", (200, 100), "grey")
    on_gpu = draw_sampling_points(picture, locations.cuda(), weights.cuda(), reference.cuda())
    assert np.array_equal(np.array(on_gpu), np.array(draw_sampling_points(picture, locations, weights, reference)))


def test_save_image_writes_the_format_its_suffix_names(tmp_path):
    image = torch.randint(0, 256, (3, 8, 12), dtype=torch.uint8)
    save_image(image, tmp_path / "picture.png")
    with Image.open(tmp_path / "picture.png") as file:
        assert file.format == "PNG"
        assert torch.equal(torch.from_numpy(np.array(file)).permute(2, 0, 1), image)
    with pytest.raises(ValueError, match="unknown image format"):
        save_image(image, tmp_path / "picture.unknown")
    assert [path.name for path in tmp_path.iterdir()] == ["picture.png"]


def test_an_image_without_detections_is_returned_unchanged_and_silently(recwarn):
    image = torch.randint(0, 256, (3, 20, 30), dtype=torch.uint8)
    detections = {"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "scores": torch.tensor([0.1]), "labels": torch.tensor([1])}
    assert torch.equal(draw_detections(image, detections, {}, threshold=0.5), image)
    assert not recwarn.list


@pytest.mark.parametrize("side", [96, 3000])
def test_a_detections_line_and_label_grow_with_the_picture_as_a_viewer_shrinks_it(side):
    """Shown whole, a 3000-pixel photo is shrunk about tenfold: a line and text of fixed pixels would be specks."""
    image = torch.zeros(3, side, side, dtype=torch.uint8)
    left, top, right, bottom = side // 10, side // 5, side - side // 10, side - side // 5
    detections = {"boxes": torch.tensor([[left, top, right, bottom]]), "scores": torch.tensor([0.9]),
                  "labels": torch.tensor([1])}
    yellow = (draw_detections(image, detections, {1: "cat"}).permute(1, 2, 0).numpy() == (255, 255, 0)).all(-1)
    line = int(yellow[side // 2, left:].argmin())  # across the box's left side
    assert line >= max(2, side // 300)
    inside = yellow[top + line : bottom - line, left + line + 1]  # down the box's inside, by its left side
    label = int(inside.sum())
    assert inside[: label].all()  # the label, in the box's top left corner
    assert label >= max(10, side // 40) / 2  # the height of "cat 0.90" in text of that many pixels


@pytest.mark.parametrize("box", [[-40.0, -30.0, 60.0, 80.0], [270.0, 50.0, 330.0, 120.0], [200.0, 150.0, 320.0, 230.0]],
                         ids=["past-top-left", "past-right", "past-bottom-right"])
def test_a_label_of_a_box_past_the_pictures_edge_is_drawn_whole_on_the_picture(box):
    """Detections often reach past the image's border: their labels were drawn off the picture, or cut."""
    image = torch.zeros(3, 200, 300, dtype=torch.uint8)
    image[2] = 255  # blue: the text's pixels, black blended into the yellow label, are the ones without blue

    def text_pixels(boxes):
        detections = {"boxes": torch.tensor([boxes]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
        drawn = draw_detections(image, detections, {1: "person"}).permute(1, 2, 0).int()
        return int(((drawn[..., 2] == 0) & (drawn[..., 0] < 160)).sum())

    assert text_pixels(box) >= 0.9 * text_pixels([100.0, 60.0, 200.0, 140.0]) > 0  # as whole as in the middle
