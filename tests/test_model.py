"""The model: init per SPEC, shapes, reference state-dict layout, backbone options, post-processing."""

from __future__ import annotations

import math
import re
import socket
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import R50_PRESETS, reference_state_dict_entries

from deformable_detr import PRESETS, Detector, ModelConfig, build_model, postprocess
from deformable_detr.model import MSDeformAttn, attention, backbone, capture_attention, pad_images, transformer
from deformable_detr.model.backbone import fold_batch_norms


def _entry(name: str, tensor: torch.Tensor) -> str:
    dims = ", ".join(str(d) for d in tensor.shape)
    return f"{name} ({dims}{',' if tensor.dim() == 1 else ''})"


# Trainable / all parameters of the reference implementation's models (91 classes).
REFERENCE_PARAMETER_COUNTS = {
    "r50": (39_847_265, 40_069_665),
    "r50_single_scale": (33_844_193, 34_066_593),
    "r50_single_scale_dc5": (33_844_193, 34_066_593),
    "r50_box_refine": (40_627_260, 40_849_660),
    "r50_two_stage": (40_959_129, 41_181_529),
}


@pytest.mark.parametrize("preset", R50_PRESETS)
def test_state_dict_matches_reference_names_shapes_and_counts(preset):
    model = build_model(preset)
    assert [_entry(k, v) for k, v in model.state_dict().items()] == reference_state_dict_entries(preset)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    assert (trainable, total) == REFERENCE_PARAMETER_COUNTS[preset]


def test_deformable_attention_init():
    attention = MSDeformAttn(d_model=256, num_levels=4, num_heads=8, num_points=4)
    assert torch.count_nonzero(attention.sampling_offsets.weight) == 0
    bias = attention.sampling_offsets.bias.view(8, 4, 4, 2)
    directions = [(1, 0), (1, 1), (0, 1), (-1, 1), (-1, 0), (-1, -1), (0, -1), (1, -1)]
    for head, direction in enumerate(directions):
        for point in range(4):
            expected = torch.tensor(direction, dtype=torch.float32) * (point + 1)
            for level in range(4):
                torch.testing.assert_close(bias[head, level, point], expected, atol=1e-6, rtol=1e-6)
    for tensor in (attention.attention_weights.weight, attention.attention_weights.bias,
                   attention.value_proj.bias, attention.output_proj.bias):
        assert torch.count_nonzero(tensor) == 0
    # Xavier-uniform bound for a square 256 x 256 matrix.
    bound = math.sqrt(6 / 512)
    assert attention.value_proj.weight.abs().max() <= bound and attention.value_proj.weight.std() > bound / 3


@pytest.mark.parametrize(
    "preset, expected_size_bias",
    # bias[2:] of each box head's last layer: -2 for the shared head, only the first refined head,
    # and 0 everywhere in two-stage mode.
    [("r50", [-2.0] * 6), ("r50_box_refine", [-2.0] + [0.0] * 5), ("r50_two_stage", [0.0] * 7)],
)
def test_head_init(preset, expected_size_bias):
    model = build_model(preset)
    prior = -math.log((1 - 0.01) / 0.01)
    assert len(model.class_embed) == len(model.bbox_embed) == len(expected_size_bias)
    for class_head, box_head, size_bias in zip(model.class_embed, model.bbox_embed, expected_size_bias):
        torch.testing.assert_close(class_head.bias, torch.full((91,), prior))
        last = box_head.layers[-1]
        assert torch.count_nonzero(last.weight) == 0
        torch.testing.assert_close(last.bias, torch.tensor([0.0, 0.0, size_bias, size_bias]))
    shared = preset == "r50"
    assert (model.bbox_embed[0] is model.bbox_embed[-1]) == shared
    assert (model.class_embed[0] is model.class_embed[-1]) == shared
    transformer = model.transformer
    assert transformer.level_embed.std() > 0.5  # normal(0, 1)
    if not transformer.two_stage:
        assert torch.count_nonzero(transformer.reference_points.bias) == 0
    for layer in transformer.encoder.layers:
        torch.testing.assert_close(layer.self_attn.sampling_offsets.bias, model.transformer.decoder.layers[0].cross_attn.sampling_offsets.bias)


@pytest.mark.parametrize("preset", [*R50_PRESETS, "tiny"])
def test_output_shapes(preset):
    model = build_model(preset, num_classes=7).eval()
    config = model.config
    with torch.no_grad():
        outputs = model(torch.randn(2, 3, 128, 160))
    queries = config.num_queries
    assert outputs["pred_logits"].shape == (2, queries, 7)
    assert outputs["pred_boxes"].shape == (2, queries, 4)
    assert ((outputs["pred_boxes"] >= 0) & (outputs["pred_boxes"] <= 1)).all()
    assert len(outputs["aux_outputs"]) == config.decoder_layers - 1
    for aux in outputs["aux_outputs"]:
        assert aux["pred_logits"].shape == (2, queries, 7) and aux["pred_boxes"].shape == (2, queries, 4)
    if config.two_stage:
        positions = 16 * 20 + 8 * 10 + 4 * 5 + 2 * 3
        assert outputs["enc_outputs"]["pred_logits"].shape == (2, positions, 7)
        assert outputs["enc_outputs"]["pred_boxes"].shape == (2, positions, 4)
    else:
        assert "enc_outputs" not in outputs


@pytest.mark.parametrize("autocast", [False, True], ids=["float32", "bfloat16 autocast"])
def test_inference_equals_the_recorded_forward_to_the_bit(monkeypatch, autocast):
    """Without a gradient the encoder's feed-forward runs in blocks of rows, frozen batch norm writes
    over its convolution's output, and where no image is padded the attention layers do not mask
    values: the same arithmetic as the forward autograd records."""
    monkeypatch.setattr(transformer, "FEED_FORWARD_ROWS", 50)  # the 2 x 108 rows of these images: 5 blocks
    torch.manual_seed(0)
    model = build_model("tiny", backbone_norm="frozen").eval()
    with torch.no_grad():  # initialised to zero, where the queries would not move the sampling at all
        for name, parameter in model.named_parameters():
            if name.endswith(("sampling_offsets.weight", "attention_weights.weight")):
                parameter.normal_(std=0.1)
    one_size, padded = torch.randn(2, 3, 64, 80), [torch.randn(3, 64, 80), torch.randn(3, 40, 80)]
    for images in (one_size, padded):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                inference = model(images)
            recorded = model(images)
        assert recorded["pred_logits"].requires_grad
        for key in ("pred_logits", "pred_boxes"):
            assert torch.equal(inference[key], recorded[key].detach())

    norm = model.backbone[0].body.bn1
    convolved = torch.randn(1, norm.weight.numel(), 4, 4)
    with torch.no_grad():
        normalised = norm(convolved)
    assert normalised.data_ptr() == convolved.data_ptr()


@pytest.mark.parametrize("overrides", [{}, {"two_stage": True}, {"one_to_many_queries": 20}],
                         ids=["one_stage", "two_stage", "query_groups"])
def test_the_forward_reads_no_tensor_values_on_the_host(monkeypatch, overrides):
    """On a GPU, reading a tensor's values (spatial_shapes', say) makes the host wait for the device.
    On the meta device, which has no values, such a read fails. The attention op, which reads values
    of CPU tensors only, is left out: the model's arguments to it are what this checks."""

    def output_of_the_right_shape(value, spatial_shapes, level_start_index, locations, weights):
        return value.new_empty(*locations.shape[:2], value.shape[2] * value.shape[3])

    monkeypatch.setattr(attention, "ms_deform_attn", output_of_the_right_shape)
    model = build_model("tiny", **overrides).to("meta")
    for training in (True, False):
        with torch.set_grad_enabled(training):
            outputs = model.train(training)(torch.empty(2, 3, 64, 80, device="meta"))
        assert outputs["pred_boxes"].shape == (2, model.config.num_queries, 4)


def _encoder_reference_points(model, images):
    with torch.no_grad(), capture_attention(model) as records:
        model(images)
    return [record.reference_points for record in records if record.name.startswith("transformer.encoder.")]


def test_encoder_reference_points_stay_float32_under_bfloat16_autocast():
    """Pixel centres over the valid size: in bfloat16, which autocast's group norm returns on the
    CPU, they would move by most of a pixel on a large level."""
    model = build_model("tiny").eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 72, 100)]
    expected = _encoder_reference_points(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _encoder_reference_points(model, images)
    assert {points.dtype for points in got} == {torch.float32}
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("make, error, message", [
    (lambda: Detector(build_model("tiny")), TypeError,
     "model is a Detector; expected the model, an nn.Module (a Detector's is its .model)"),
    (lambda: torch.nn.Linear(2, 2), ValueError,
     "model is a Linear without MSDeformAttn modules: there is no attention to record"),
], ids=["detector", "module without attention"])
def test_capturing_the_attention_of_what_has_none_is_refused_in_one_line(make, error, message):
    with pytest.raises(error, match=f"^{re.escape(message)}$"), capture_attention(make()):
        pass


def _transformer_positions(model, images):
    positions = []
    hook = model.transformer.register_forward_pre_hook(lambda module, args: positions.extend(args[2]))
    with torch.no_grad():
        model(images)
    hook.remove()
    return positions


@pytest.mark.parametrize("overrides", [{}, {"with_box_refine": False}, {"two_stage": True}],
                         ids=["refinement", "one_head", "two_stage"])
def test_boxes_and_reference_boxes_are_float32_under_bfloat16_autocast(overrides):
    """In bfloat16's 8 significant bits a box edge past the image's middle moves in steps of 1/512 of
    it: the box heads' last layers and the initial reference points compute in float32."""
    model = build_model("tiny", **overrides).eval()
    references = []
    hook = model.transformer.register_forward_hook(lambda module, args, output: references.extend(output[1:3]))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model([torch.randn(3, 96, 128)])
    hook.remove()
    boxes = [outputs["pred_boxes"], *(aux["pred_boxes"] for aux in outputs["aux_outputs"])]
    if "enc_outputs" in outputs:
        boxes.append(outputs["enc_outputs"]["pred_boxes"])
    assert {tensor.dtype for tensor in boxes + references} == {torch.float32}

    head, features = model.bbox_embed[0], torch.randn(5, model.config.d_model)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        hidden = F.relu(head.layers[1](F.relu(head.layers[0](features))))
        got = head(features)
    assert hidden.dtype == torch.bfloat16
    last = head.layers[-1]
    assert torch.equal(got, F.linear(hidden.float(), last.weight, last.bias))  # not a float32 copy of bfloat16


def test_position_embeddings_stay_float32_under_bfloat16_autocast():
    """They are added to the float32 level embeddings: rounded to the features' bfloat16 first, they
    would only lose bits."""
    model = build_model("tiny").eval()
    images = [torch.randn(3, 96, 128), torch.randn(3, 72, 100)]
    expected = _transformer_positions(model, images)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _transformer_positions(model, images)
    assert len(got) == model.config.num_feature_levels
    assert {position.dtype for position in got} == {torch.float32}
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_a_model_converted_to_another_dtype_computes_in_it(dtype):
    model = build_model("tiny").to(dtype).eval()
    with torch.no_grad():
        outputs = model(torch.randn(1, 3, 64, 64, dtype=dtype))
    assert outputs["pred_logits"].dtype == outputs["pred_boxes"].dtype == dtype


def test_list_of_images_is_padded_with_a_mask():
    model = build_model("tiny").eval()
    images = [torch.randn(3, 96, 130), torch.randn(3, 120, 80)]
    batch, mask = pad_images(images)
    assert batch.shape == (2, 3, 120, 130)
    assert mask[0, :96, :130].logical_not().all() and mask[0, 96:].all()
    assert mask[1, :, 80:].all() and not mask[1, :120, :80].any()
    torch.testing.assert_close(batch[1, :, :120, :80], images[1])
    with torch.no_grad():
        from_list = model(images)
        from_batch = model(batch, mask)
    torch.testing.assert_close(from_list["pred_logits"], from_batch["pred_logits"])
    torch.testing.assert_close(from_list["pred_boxes"], from_batch["pred_boxes"])


def perturbed(model):
    """The model with every parameter nudged: at init, zero-initialised layers hide whole paths
    (e.g. positions do not reach the sampling offsets yet)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model


def test_padding_mask_changes_the_result():
    model = perturbed(build_model("tiny")).eval()
    images = torch.randn(1, 3, 128, 128)
    mask = torch.zeros(1, 128, 128, dtype=torch.bool)
    mask[:, :, 96:] = True
    with torch.no_grad():
        assert not torch.allclose(model(images)["pred_boxes"], model(images, mask)["pred_boxes"])


def test_tiny_forward_backward_reaches_every_trainable_parameter():
    model = perturbed(build_model("tiny")).train()
    outputs = model([torch.randn(3, 128, 96), torch.randn(3, 96, 128)])
    loss = outputs["pred_logits"].sigmoid().mean() + outputs["pred_boxes"].mean()
    loss = loss + sum(aux["pred_logits"].sigmoid().mean() + aux["pred_boxes"].mean() for aux in outputs["aux_outputs"])
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert missing == []


def _autograd_nodes(root: torch.autograd.graph.Node) -> set[str]:
    seen, stack, names = set(), [root], set()
    while stack:
        node = stack.pop()
        if node is not None and node not in seen:
            seen.add(node)
            names.add(type(node).__name__)
            stack.extend(next_node for next_node, _ in node.next_functions)
    return names


@pytest.mark.parametrize("preset_overrides", [{}, {"two_stage": True}], ids=["tiny", "tiny_two_stage"])
def test_training_graph_updates_no_view_in_place(preset_overrides):
    # An in-place update of a view makes autograd copy the whole base tensor twice in the backward.
    model = build_model("tiny", **preset_overrides).train()
    outputs = model([torch.randn(3, 128, 96), torch.randn(3, 96, 128)])
    nodes = _autograd_nodes(outputs["pred_boxes"].grad_fn) | _autograd_nodes(outputs["pred_logits"].grad_fn)
    assert "AddmmBackward0" in nodes  # the walk reaches the linear layers
    assert "CopySlices" not in nodes


def test_backbone_frozen_stages():
    model = build_model("tiny")
    trainable = {n.split(".")[2] for n, p in model.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer2", "layer3", "layer4"}
    frozen = build_model("tiny", train_backbone=False)
    assert not any(p.requires_grad for p in frozen.backbone.parameters())


@pytest.mark.parametrize("name, width, channels", [("resnet18", 64, [128, 256, 512]), ("resnet18", 32, [64, 128, 256]),
                                                  ("resnet34", 64, [128, 256, 512]), ("resnet101", 64, [512, 1024, 2048]),
                                                  ("resnet50", 16, [128, 256, 512])])
def test_backbone_channels_come_from_the_network(name, width, channels):
    model = build_model("tiny", backbone=name, backbone_width=width)
    assert model.backbone.num_channels == channels
    assert [p[0].in_channels for p in model.input_proj] == [*channels, channels[-1]]


def test_a_narrow_resnet_is_torchvisions_with_fewer_channels():
    torch.manual_seed(0)
    narrow = build_model("tiny", backbone_width=32, backbone_norm="batch").backbone[0].body
    full = torchvision.models.resnet18()
    # The same blocks, each convolution with half the channels, initialised as torchvision does
    # (He, fan out), its norms at weight 1 and bias 0.
    narrow_convs = [m for m in narrow.modules() if isinstance(m, torch.nn.Conv2d)]
    full_convs = [m for m in full.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(narrow_convs) == len(full_convs) == 20
    for mine, theirs in zip(narrow_convs, full_convs):
        assert mine.out_channels * 2 == theirs.out_channels and mine.kernel_size == theirs.kernel_size
        assert mine.stride == theirs.stride and mine.bias is None
        fan_out = mine.out_channels * mine.kernel_size[0] * mine.kernel_size[1]
        assert mine.weight.std().item() == pytest.approx((2 / fan_out) ** 0.5, rel=0.2)
    norms = [m for m in narrow.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all((m.weight == 1).all() and (m.bias == 0).all() for m in norms)


def test_a_narrow_resnet_refuses_pretrained_weights():
    with pytest.raises(ValueError, match="weights 'IMAGENET1K_V1' are for width 64, not 32"):
        build_model("tiny", backbone_width=32, backbone_weights="IMAGENET1K_V1")


@pytest.mark.parametrize("overrides, message", [
    ({"backbone": "resnet5"}, "unsupported backbone 'resnet5': expected a torchvision ResNet: resnet101, resnet152, "),
    ({"backbone_weights": "IMAGENET"}, "backbone weights 'IMAGENET': no such file, nor a torchvision name of "
                                       "resnet18's weights: DEFAULT, IMAGENET1K_V1"),
], ids=["backbone", "weights"])
def test_a_mistyped_backbone_or_weights_name_is_refused_in_one_line_with_the_names(overrides, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        build_model("tiny", backbone_width=64, **overrides)


@pytest.mark.parametrize("weights", ["DEFAULT", "IMAGENET1K_V1", "ResNet18_Weights.IMAGENET1K_V1"])
def test_every_name_torchvision_gives_a_backbones_weights_passes_the_check(weights):
    backbone._check_weights_name("resnet18", weights)


def test_dc5_halves_the_last_stride():
    image = torch.randn(1, 3, 128, 128)
    with torch.no_grad():
        plain = build_model("r50_single_scale").backbone(image, torch.zeros(1, 128, 128, dtype=torch.bool))[0]
        dilated = build_model("r50_single_scale_dc5").backbone(image, torch.zeros(1, 128, 128, dtype=torch.bool))[0]
    assert plain[0][0].shape[-2:] == (4, 4) and dilated[0][0].shape[-2:] == (8, 8)


def test_learned_position_embedding():
    model = build_model("tiny", position_embedding="learned").eval()
    assert model.state_dict()["backbone.1.row_embed.weight"].shape == (50, 64)
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64))["pred_boxes"].isfinite().all()


def test_learned_position_embedding_refuses_maps_larger_than_its_table():
    model = build_model("tiny", position_embedding="learned").eval()
    embedding = model.backbone[1]
    rows, columns = embedding.row_embed.num_embeddings, embedding.col_embed.num_embeddings
    assert embedding(torch.zeros(1, rows, columns, dtype=torch.bool)).shape[-2:] == (rows, columns)
    for height, width in ((rows + 1, columns), (rows, columns + 1)):
        with pytest.raises(ValueError, match=f"up to {rows} x {columns}, got {height} x {width}:"):
            embedding(torch.zeros(1, height, width, dtype=torch.bool))
    stride = 8  # of the first level
    with torch.no_grad(), pytest.raises(ValueError, match=f"got {rows + 1} x 8:"):
        model(torch.randn(1, 3, stride * (rows + 1), stride * 8))


def test_backbone_weights_from_a_local_file(tmp_path):
    resnet = torchvision.models.resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(resnet.state_dict(), path)
    model = build_model("tiny", backbone_width=64, backbone_weights=str(path))
    torch.testing.assert_close(model.backbone[0].body.conv1.weight, resnet.conv1.weight)
    torch.testing.assert_close(model.backbone[0].body.layer1[0].bn1.running_var, resnet.layer1[0].bn1.running_var)


def test_backbone_weights_through_torchvision_weights_api(monkeypatch):
    expected = torchvision.models.resnet18().state_dict()
    requested = []

    def fake_download(weights, *args, **kwargs):  # stands in for the network fetch only
        requested.append(weights)
        return expected

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", fake_download)
    model = build_model("tiny", backbone_width=64, backbone_weights="IMAGENET1K_V1")
    assert requested == [torchvision.models.ResNet18_Weights.IMAGENET1K_V1]
    torch.testing.assert_close(model.backbone[0].body.conv1.weight, expected["conv1.weight"])


@pytest.mark.parametrize("weights", ["DEFAULT", "ResNet18_Weights.IMAGENET1K_V1"])  # every name the check passes
def test_backbone_weights_that_cannot_be_downloaded_are_one_line_naming_the_file_to_fetch(monkeypatch, weights):
    def no_internet(weights, *args, **kwargs):
        raise URLError(socket.gaierror(-2, "Name or service not known"))

    monkeypatch.setattr(torchvision.models.ResNet18_Weights, "get_state_dict", no_internet)
    with pytest.raises(OSError) as failed:
        build_model("tiny", backbone_width=64, backbone_weights=weights)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    assert str(failed.value) == (
        f"resnet18 weights {weights}: the download of {url} failed ([Errno -2] Name or service not known); without "
        f"internet, fetch that file elsewhere and give its path as the backbone weights (--backbone-weights "
        f"{url.rsplit('/', 1)[1]}), or put it in {torch.hub.get_dir()}/checkpoints")


@pytest.mark.parametrize("width", [64, 24])  # the missing file comes first, before the width it is for
def test_missing_backbone_weights_file_is_reported(width):
    with pytest.raises(FileNotFoundError, match="missing.pth: backbone weights file not found"):
        build_model("tiny", backbone_width=width, backbone_weights="missing.pth")


def test_postprocess_top_k_labels_and_absolute_boxes():
    logits = torch.full((2, 3, 4), -10.0)
    logits[0, 1, 2] = 3.0  # best: query 1, class 2
    logits[0, 2, 0] = 1.0
    logits[1, 0, 3] = 2.0
    boxes = torch.tensor([[0.5, 0.5, 0.2, 0.4]]).repeat(2, 3, 1)
    boxes[0, 1] = torch.tensor([0.25, 0.5, 0.5, 1.0])
    results = postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(100, 200), (50, 60)], top_k=2)
    first, second = results
    assert first["labels"].tolist() == [2, 0]
    assert first["queries"].tolist() == [1, 2]
    torch.testing.assert_close(first["scores"], torch.tensor([3.0, 1.0]).sigmoid())
    torch.testing.assert_close(first["boxes"][0], torch.tensor([0.0, 0.0, 100.0, 100.0]))
    torch.testing.assert_close(second["boxes"][0], torch.tensor([24.0, 15.0, 36.0, 35.0]))
    assert second["labels"][0] == 3
    assert len(postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(1, 1)] * 2)[0]["scores"]) == 12
    assert [len(r["scores"]) for r in postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(1, 1)] * 2, top_k=0)] == [0, 0]
    with pytest.raises(ValueError, match="top_k must be a whole number of at least 0, got -1"):
        postprocess({"pred_logits": logits, "pred_boxes": boxes}, [(1, 1)] * 2, top_k=-1)


def test_postprocess_takes_one_size_per_image_and_top_k_by_name():
    outputs = {"pred_logits": torch.zeros(2, 3, 4), "pred_boxes": torch.full((2, 3, 4), 0.5)}
    message = "image_sizes is of shape (1, 2); expected (2, 2): the (height, width) of each of the batch's 2 images"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        postprocess(outputs, [(100, 200)])
    three = {"pred_logits": torch.zeros(3, 3, 4), "pred_boxes": torch.full((3, 3, 4), 0.5)}
    heights_then_widths = [(100, 300, 500), (200, 400, 600)]  # six numbers, as three sizes have, but not one per image
    with pytest.raises(ValueError, match=re.escape("image_sizes is of shape (2, 3); expected (3, 2)")):
        postprocess(three, heights_then_widths)
    with pytest.raises(TypeError):  # an option, as every caller and docs/api.md name it
        postprocess(outputs, [(100, 200)] * 2, 5)


def test_postprocess_scales_bfloat16_boxes_to_the_exact_image_size():
    outputs = {"pred_logits": torch.zeros(1, 1, 2, dtype=torch.bfloat16),
               "pred_boxes": torch.tensor([[[0.5, 0.5, 1.0, 1.0]]], dtype=torch.bfloat16)}  # the whole image
    boxes = postprocess(outputs, [(1066, 1333)], top_k=1)[0]["boxes"]
    assert boxes.dtype == torch.float32 and boxes.tolist() == [[0.0, 0.0, 1333.0, 1066.0]]



BATCH_MISTAKES = {
    "uint8 images": (dict(images=torch.zeros(1, 3, 32, 32, dtype=torch.uint8)), "images must be a float (N, 3, H, W) batch"),
    "one channel": (dict(images=torch.zeros(1, 1, 32, 32)), "got float32 of shape (1, 1, 32, 32)"),
    "one image without its batch axis": (dict(images=torch.zeros(3, 32, 32)), "got float32 of shape (3, 32, 32)"),
    "a mask of another size": (dict(padding_mask=torch.zeros(1, 16, 32, dtype=torch.bool)),
                               "padding_mask must be bool (N, H, W) = (1, 32, 32) for images of shape (1, 3, 32, 32), "
                               "got bool of shape (1, 16, 32)"),
    "a float mask": (dict(padding_mask=torch.zeros(1, 32, 32)), "got float32 of shape (1, 32, 32)"),
    "a mask beside a list": (dict(images=[torch.zeros(3, 32, 32)], padding_mask=torch.zeros(1, 32, 32, dtype=torch.bool)),
                             "padding_mask must be None when images is a list; the list is padded here"),
}


@pytest.mark.parametrize("arguments, message", BATCH_MISTAKES.values(), ids=BATCH_MISTAKES.keys())
def test_a_batch_the_model_cannot_take_is_refused_in_one_line(arguments, message):
    model = build_model("tiny").eval()
    arguments = {"images": torch.zeros(1, 3, 32, 32), **arguments}
    with pytest.raises(ValueError, match=re.escape(message)):
        model(**arguments)


@pytest.mark.parametrize("images, found", [([], "empty list"), (np.zeros((3, 32, 32), np.float32), "ndarray"),
                                           ([np.zeros((3, 32, 32), np.float32)], "list of ndarray")],
                         ids=["empty list", "numpy array", "list of numpy arrays"])
def test_images_that_are_not_tensors_are_refused_in_one_line(images, found):
    message = f"images must be an (N, 3, H, W) tensor or a list of (3, H, W) tensors, got {found}"
    with pytest.raises(TypeError, match=f"^{re.escape(message)}$"):
        build_model("tiny").eval()(images)


def test_presets_are_the_published_configurations():
    assert PRESETS["r50_two_stage"].with_box_refine and PRESETS["r50_two_stage"].two_stage
    assert PRESETS["r50_single_scale_dc5"].dilation and PRESETS["r50_single_scale_dc5"].num_feature_levels == 1
    tiny = build_model("tiny")
    assert sum(p.numel() for p in tiny.parameters()) < 20_000_000


def test_unknown_preset_and_bad_config_are_rejected():
    with pytest.raises(ValueError, match="unknown preset"):
        build_model("r51")
    with pytest.raises(ValueError, match="divisible"):
        build_model("tiny", num_heads=7)
    with pytest.raises(ValueError, match="two_stage requires with_box_refine"):
        build_model("r50", two_stage=True)
    with pytest.raises(ValueError, match="num_feature_levels must be 1 .* or at least 3"):
        build_model("tiny", num_feature_levels=2)


@pytest.mark.parametrize("field, value, message", [
    ("num_heads", 0, "num_heads must be at least 1, got 0"),
    ("d_model", 0, "d_model (0) must be a multiple of 32"),
    ("decoder_layers", 0, "decoder_layers must be at least 1, got 0"),
    ("encoder_layers", -1, "encoder_layers must be 0 or more, got -1"),
    ("decoder_points", -1, "decoder_points must be at least 1, got -1"),
    ("dropout", 1.5, "dropout must be in [0, 1), got 1.5"),
    ("num_queries", "300", "config field num_queries is '300'; expected int"),
    ("two_stage", 1, "config field two_stage is 1; expected bool"),
])
def test_config_values_out_of_range_or_of_the_wrong_type_are_named(field, value, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        ModelConfig(**{field: value})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["r50_two_stage", "r50_single_scale_dc5"])
def test_cuda_forward_matches_cpu(preset, monkeypatch):
    # TF32 convolutions (on by default) change the encoder scores enough to reorder two-stage's
    # top-k proposals; the comparison is of the model's float32 numerics.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    model = build_model(preset).eval()
    images = [torch.randn(3, 128, 160), torch.randn(3, 112, 144)]
    with torch.no_grad():
        expected = model(images)
        actual = model.cuda()([image.cuda() for image in images])
    torch.testing.assert_close(actual["pred_logits"].cpu(), expected["pred_logits"], rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(actual["pred_boxes"].cpu(), expected["pred_boxes"], rtol=1e-3, atol=1e-3)


def test_from_scratch_backbone_has_trainable_batch_norm_in_every_stage():
    model = build_model("tiny", backbone_norm="batch")
    body = model.backbone[0].body
    assert isinstance(body.bn1, torch.nn.BatchNorm2d) and not isinstance(body.bn1, torchvision.ops.FrozenBatchNorm2d)
    assert all(p.requires_grad for p in model.backbone.parameters())
    model.train()
    before = body.bn1.running_mean.clone()
    model([torch.randn(3, 64, 64), torch.randn(3, 64, 80)])
    assert not torch.equal(body.bn1.running_mean, before)  # statistics are learned


@pytest.mark.parametrize("norm", ["frozen", "batch"])
def test_folding_the_batch_norms_keeps_the_outputs_and_leaves_no_norm(norm):
    torch.manual_seed(0)
    model = build_model("tiny", backbone_norm=norm).eval()
    norms = [m for m in model.backbone.modules() if isinstance(m, (torchvision.ops.FrozenBatchNorm2d, torch.nn.BatchNorm2d))]
    for module in norms:  # statistics far from the identity, so that a norm left out shows
        for buffer in (module.weight, module.bias, module.running_mean):
            buffer.data.uniform_(-0.5, 1.5)
        module.running_var.data.uniform_(0.5, 2.0)
    images = [torch.randn(3, 64, 80), torch.randn(3, 72, 64)]
    with torch.no_grad():
        expected = model(images)
        folded = fold_batch_norms(model)
        actual = folded(images)
    assert folded is model and norms
    assert not any(isinstance(m, (torchvision.ops.FrozenBatchNorm2d, torch.nn.BatchNorm2d)) for m in model.modules())
    body = model.backbone[0].body
    assert body.conv1.bias is not None and body.layer2[0].downsample[0].bias is not None
    for key in ("pred_logits", "pred_boxes"):
        torch.testing.assert_close(actual[key], expected[key], rtol=1e-4, atol=1e-5)
