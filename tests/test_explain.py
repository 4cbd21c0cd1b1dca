"""Attention capture and the `explain` picture: what is recorded, that capturing changes nothing,
that the records follow the sampling formula, and that the picture shows it."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from deformable_detr import Detector, build_model
from deformable_detr.explain import MIN_PANEL_SIDE, explain
from deformable_detr.model import MSDeformAttn, capture_attention
from deformable_detr.visualize import head_colours

HEIGHT, WIDTH = 96, 128


@pytest.fixture(scope="module")
def model():
    # A random model whose every head has points inside every panel (with seed 0 one head's all
    # fell off the encoder panel), as the panel test needs.
    torch.manual_seed(2)
    return build_model("tiny", num_classes=6).eval()


@pytest.fixture
def detector(model):
    return Detector(model, image_size=HEIGHT)


@pytest.fixture
def images():
    return torch.randn(1, 3, HEIGHT, WIDTH)


def test_capture_records_every_layer_with_their_shapes(model, images):
    config = model.config
    with torch.no_grad(), capture_attention(model) as records:
        model(images)
    assert [record.name for record in records] == [
        *(f"transformer.encoder.layers.{i}.self_attn" for i in range(config.encoder_layers)),
        *(f"transformer.decoder.layers.{i}.cross_attn" for i in range(config.decoder_layers)),
    ]
    # Strides 8, 16, 32 from the backbone, then one extra stride-64 level.
    shapes = [[12, 16], [6, 8], [3, 4], [2, 2]]
    pixels = sum(h * w for h, w in shapes)
    heads, levels, points = config.num_heads, config.num_feature_levels, config.encoder_points
    for record in records:
        queries = pixels if ".encoder." in record.name else config.num_queries
        assert record.sampling_locations.shape == (1, queries, heads, levels, points, 2)
        assert record.attention_weights.shape == (1, queries, heads, levels, points)
        assert record.spatial_shapes.tolist() == shapes
        torch.testing.assert_close(record.attention_weights.sum((-2, -1)), torch.ones(1, queries, heads))
    # With refinement the first decoder layer starts from points, the later ones from boxes.
    expected = [2] * config.encoder_layers + [2] + [4] * (config.decoder_layers - 1)
    assert [record.reference_points.shape[-1] for record in records] == expected


def test_capture_changes_no_output_and_stops_with_the_block(model, images):
    with torch.no_grad():
        before = model(images)
        with capture_attention(model) as records:
            during = model(images)
        count = len(records)
        after = model(images)
    assert len(records) == count == model.config.encoder_layers + model.config.decoder_layers
    assert all(module._capture is None for module in model.modules() if isinstance(module, MSDeformAttn))
    for outputs in (during, after):
        assert torch.equal(outputs["pred_logits"], before["pred_logits"])
        assert torch.equal(outputs["pred_boxes"], before["pred_boxes"])


def test_captured_locations_and_weights_follow_the_sampling_formula(images):
    model = build_model("tiny", num_classes=6).eval()
    inputs = {}
    for name, module in model.named_modules():
        if isinstance(module, MSDeformAttn):
            # Offsets and weights that depend on the query, unlike the initial ones.
            torch.nn.init.normal_(module.sampling_offsets.weight, std=0.5)
            torch.nn.init.normal_(module.attention_weights.weight, std=0.5)
            module.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args))
    with torch.no_grad(), capture_attention(model) as records:
        model(images)

    for record in records:
        module = model.get_submodule(record.name)
        query, reference = inputs[record.name][:2]
        heads, levels, points = module.num_heads, module.num_levels, module.num_points
        offsets = module.sampling_offsets(query).view(*query.shape[:2], heads, levels, points, 2)
        reference = reference[:, :, None, :, None, :]
        if reference.shape[-1] == 2:
            # Paper, Eq. 3: offsets in pixels of each level around the normalised reference point.
            expected = reference + offsets / record.spatial_shapes.flip(-1)[:, None, :]
        else:
            # Box references (refinement): P points span half the box's width and height.
            expected = reference[..., :2] + offsets / points * reference[..., 2:] * 0.5
        weights = F.softmax(module.attention_weights(query).view(*query.shape[:2], heads, -1), -1)
        torch.testing.assert_close(record.sampling_locations, expected)
        torch.testing.assert_close(record.attention_weights, weights.view_as(record.attention_weights))


def _pixels(picture: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(picture))


def _colour_pixels(picture: Image.Image, colour: tuple[int, int, int]) -> torch.Tensor:
    return (_pixels(picture) == torch.tensor(colour, dtype=torch.uint8)).all(-1)


def test_explain_draws_one_panel_per_detection_and_one_for_the_encoder(detector, model):
    grey = torch.full((3, HEIGHT, WIDTH), 100, dtype=torch.uint8)
    model.train()
    picture = explain(detector, grey, top_k=2)
    assert model.training  # mode restored
    assert all(module._capture is None for module in model.modules() if isinstance(module, MSDeformAttn))

    panel_width = round(WIDTH * MIN_PANEL_SIDE / HEIGHT)
    assert picture.mode == "RGB"
    assert picture.width == 3 * panel_width + 2 * 8
    assert picture.height > MIN_PANEL_SIDE
    # The input is uniform: the panels' rows are the ones full of its faded grey (not only
    # anti-aliased text).
    background = (100 // 2 + 128,) * 3
    panel_rows = _colour_pixels(picture, background).sum(1) > 50
    assert panel_rows.sum() == MIN_PANEL_SIDE
    for panel in range(3):
        columns = slice(panel * (panel_width + 8), panel * (panel_width + 8) + panel_width)
        for colour in head_colours(model.config.num_heads):
            assert _colour_pixels(picture, colour)[panel_rows, columns].sum() > 10, (panel, colour)


def test_explain_encoder_point_moves_only_the_encoder_panel(detector):
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8)
    left = _pixels(explain(detector, image, top_k=1, encoder_point=(0.2, 0.5)))
    right = _pixels(explain(detector, image, top_k=1, encoder_point=(0.8, 0.5)))
    panel_width = round(WIDTH * MIN_PANEL_SIDE / HEIGHT)
    assert torch.equal(left[:, :panel_width], right[:, :panel_width])
    assert not torch.equal(left[:, panel_width + 8 :], right[:, panel_width + 8 :])


def test_explain_takes_paths_and_pil_images(detector, tmp_path):
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8)
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    pil.save(tmp_path / "image.png")
    from_tensor = _pixels(explain(detector, image))
    assert torch.equal(_pixels(explain(detector, pil)), from_tensor)
    assert torch.equal(_pixels(explain(detector, tmp_path / "image.png")), from_tensor)


def test_explain_says_that_no_detection_reaches_the_threshold_and_the_highest_score(detector):
    image = torch.randint(0, 256, (3, HEIGHT, WIDTH), dtype=torch.uint8)
    highest = float(detector.predict(image, threshold=0.0).scores.max())
    with pytest.warns(UserWarning) as caught:
        picture = explain(detector, image, threshold=1.0)
    assert [str(warning.message) for warning in caught] == [
        f"no detection scores at least 1.0 (the highest scores {highest:.3f}): only the encoder query is drawn"
    ]
    assert picture.width == round(WIDTH * MIN_PANEL_SIDE / HEIGHT)  # the encoder panel alone
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(detector, image, threshold=0.0)


@pytest.mark.parametrize("option, message", [
    ({"encoder_level": 4}, "encoder_level must be in [0, 4), got 4"),
    ({"encoder_level": 1.5}, "encoder_level must be in [0, 4), got 1.5"),
    ({"top_k": -1}, "top_k must be a whole number of at least 1, got -1"),
    ({"threshold": 2}, "threshold must be in [0, 1], got 2"),
    ({"encoder_point": (0.5,)}, "encoder_point must be (x, y), got (0.5,)"),
    ({"encoder_point": (float("nan"), 0.5)}, "encoder_point's x must be in [0, 1], got nan"),
])
def test_explain_rejects_options_out_of_range(detector, option, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        explain(detector, torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8), **option)


def test_explain_refuses_a_model_without_encoder_layers_in_one_line():
    detector = Detector(build_model("tiny", num_classes=6, encoder_layers=0).eval(), image_size=HEIGHT)
    with pytest.raises(ValueError, match="^explain draws the last encoder layer's attention, and this model has no encoder layers$"):
        explain(detector, torch.zeros(3, HEIGHT, WIDTH, dtype=torch.uint8))
