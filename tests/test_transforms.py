import pytest
import torch
from torchvision import tv_tensors

from deformable_detr.data.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SCALES,
    RandomSizeCrop,
    inference_transforms,
    model_input,
    recipe,
    train_transforms,
    val_transforms,
)

# Non-overlapping boxes (x1, y1, x2, y2) on a 120 x 160 image, each painted in its own colour.
BOXES = [(10, 10, 50, 40), (90, 20, 150, 100), (20, 70, 60, 110), (70, 105, 80, 115)]
COLOURS = [(250, 0, 0), (0, 250, 0), (0, 0, 250), (250, 250, 0)]


def _painted_sample() -> tuple[tv_tensors.Image, dict]:
    image = torch.zeros(3, 120, 160, dtype=torch.uint8)
    for (x1, y1, x2, y2), colour in zip(BOXES, COLOURS):
        image[:, y1:y2, x1:x2] = torch.tensor(colour, dtype=torch.uint8)[:, None, None]
    target = {
        "boxes": tv_tensors.BoundingBoxes(BOXES, format="XYXY", canvas_size=(120, 160), dtype=torch.float32),
        "labels": torch.arange(len(BOXES)),
    }
    return tv_tensors.Image(image), target


def _pixels(image: torch.Tensor) -> torch.Tensor:
    """Undo the normalisation: (3, H, W) in 0..255."""
    mean, std = torch.tensor(IMAGENET_MEAN)[:, None, None], torch.tensor(IMAGENET_STD)[:, None, None]
    return (image * std + mean) * 255


def _assert_boxes_follow_pixels(image: torch.Tensor, target: dict) -> None:
    """Every box frames the pixels painted in its label's colour, within resampling blur."""
    pixels = _pixels(image)
    height, width = image.shape[-2:]
    assert target["size"].tolist() == [height, width]
    scale = torch.tensor([width, height, width, height])
    for (cx, cy, w, h), label in zip(target["boxes"] * scale, target["labels"]):
        if min(w, h) < 3:
            continue  # a sliver left by a crop, blurred away by the resize
        colour = torch.tensor(COLOURS[label], dtype=torch.float32)[:, None, None]
        ys, xs = torch.nonzero(((pixels - colour).abs() < 60).all(0), as_tuple=True)
        painted = torch.stack([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]).float()
        box = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
        torch.testing.assert_close(box, painted, atol=2.5, rtol=0)
    kept = set(target["labels"].tolist())
    for label, colour in enumerate(COLOURS):
        if label not in kept:  # dropped by a crop: at most a sliver of it is left
            mask = ((pixels - torch.tensor(colour, dtype=torch.float32)[:, None, None]).abs() < 60).all(0)
            assert mask.any(0).sum() <= 2 or mask.any(1).sum() <= 2


@pytest.mark.parametrize("seed", range(25))
def test_train_boxes_follow_flips_resizes_and_crops(seed):
    torch.manual_seed(seed)
    transform = train_transforms(scales=(96, 128, 160), max_size=260, crop_scales=(100, 120), crop_range=(60, 100))
    image, target = transform(*_painted_sample())
    assert image.dtype == torch.float32 and type(image) is torch.Tensor
    _assert_boxes_follow_pixels(image, target)


def test_train_transforms_flip_about_half_the_time():
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        _, target = train_transforms(scales=(120,), max_size=1000, crop_scales=(120,), crop_range=(120, 120))(
            *_painted_sample()
        )
        # The first box sits on the left; flipped, on the right.
        flips += bool(target["boxes"][target["labels"] == 0, 0] > 0.5)
    assert 10 <= flips <= 30


def test_val_boxes_follow_the_resize():
    image, target = val_transforms(size=60, max_size=1000)(*_painted_sample())
    assert image.shape == (3, 60, 80)
    _assert_boxes_follow_pixels(image, target)


def test_boxes_are_normalised_cxcywh():
    _, target = model_input()(*_painted_sample())
    x1, y1, x2, y2 = BOXES[1]
    expected = torch.tensor([(x1 + x2) / 2 / 160, (y1 + y2) / 2 / 120, (x2 - x1) / 160, (y2 - y1) / 120])
    torch.testing.assert_close(target["boxes"][1], expected)
    assert target["boxes"].dtype == torch.float32 and type(target["boxes"]) is torch.Tensor


def test_train_sizes_stay_in_the_published_range():
    image = tv_tensors.Image(torch.zeros(3, 300, 420, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes([(10, 10, 50, 50)], format="XYXY", canvas_size=(300, 420)),
              "labels": torch.tensor([1])}  # fmt: skip
    transform = train_transforms()
    shorter_sides = set()
    for seed in range(20):
        torch.manual_seed(seed)
        output, _ = transform(image, target)
        height, width = output.shape[-2:]
        assert max(height, width) <= 1333
        assert min(height, width) in SCALES or max(height, width) >= 1332
        shorter_sides.add(min(height, width))
    assert len(shorter_sides) > 3


def test_val_size_and_longer_side_cap():
    def blank(height: int, width: int) -> tuple[tv_tensors.Image, dict]:
        boxes = tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(height, width))
        image = tv_tensors.Image(torch.zeros(3, height, width, dtype=torch.uint8))
        return image, {"boxes": boxes, "labels": torch.zeros(0, dtype=torch.int64)}

    output, target = val_transforms()(*blank(300, 1000))
    assert output.shape[-1] == 1333 and output.shape[-2] in (399, 400)
    assert target["boxes"].shape == (0, 4)
    output, _ = val_transforms()(*blank(300, 400))
    assert output.shape[-2:] == (800, 1066)


def test_validation_and_inference_resize_and_normalise_alike():
    # A 300 x 1000 image at size 256: the shorter side would be 256, but the longer is capped at 427.
    image = tv_tensors.Image(torch.randint(0, 256, (3, 300, 1000), dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(300, 1000)),
              "labels": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
    validation, _ = val_transforms(256)(image, target)
    from_recipe, _ = recipe(256)[1](image, target)
    inference = inference_transforms(256)(image)
    assert validation.shape == (3, 128, 427)
    assert torch.equal(validation, from_recipe) and torch.equal(validation, inference)


def test_normalisation_uses_the_imagenet_statistics():
    image = tv_tensors.Image(torch.full((3, 4, 4), 255, dtype=torch.uint8))
    target = {"boxes": tv_tensors.BoundingBoxes(torch.zeros(0, 4), format="XYXY", canvas_size=(4, 4)),
              "labels": torch.zeros(0, dtype=torch.int64)}  # fmt: skip
    output, _ = model_input()(image, target)
    expected = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(output[:, 0, 0], expected)


def test_random_size_crop_stays_in_range_and_clips_boxes():
    image, target = _painted_sample()
    for seed in range(20):
        torch.manual_seed(seed)
        cropped, cropped_target = RandomSizeCrop(50, 130)(image, target)
        height, width = cropped.shape[-2:]
        assert 50 <= height <= 120 and 50 <= width <= 130
        boxes = cropped_target["boxes"]
        assert (boxes >= 0).all() and (boxes[:, 0::2] <= width).all() and (boxes[:, 1::2] <= height).all()


def test_boxes_under_a_pixel_are_dropped_with_their_labels():
    image, target = _painted_sample()
    _, target = val_transforms(size=6, max_size=1000)(image, target)  # 20x downscale: the 10 px box is gone
    assert target["labels"].tolist() == [0, 1, 2]


def test_recipe_scales_every_size():
    train, val = recipe(256)
    choice = train.transforms[1]
    scale_resize, crop_branch = choice.transforms
    assert scale_resize.min_size[0] == 154 and scale_resize.min_size[-1] == 256 and scale_resize.max_size == 427
    assert crop_branch.transforms[0].min_size == [128, 160, 192]
    assert (crop_branch.transforms[1].min_size, crop_branch.transforms[1].max_size) == (123, 192)
    assert val.transforms[0].size == [256] and val.transforms[0].max_size == 427
    published_train, _ = recipe()
    assert published_train.transforms[1].transforms[0].min_size == list(SCALES)
