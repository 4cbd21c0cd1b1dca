"""Hugging Face transformers checkpoints: name conversion, and the same outputs as transformers.

The transformers models are built offline with random weights (no hub access). transformers
follows SPEC.md in every inference computation these tests reach; where it deviates, the deviation
is named where the test works around it:

- With box refinement (no two-stage), a freshly built ``DeformableDetrForObjectDetection`` ties
  ``class_embed.1..5`` to ``class_embed.0`` (``_tied_weights_keys``), and ``save_pretrained`` then
  writes ``class_embed.0`` only; SPEC (the reference) has an independent class head per decoder
  layer. ``untie_class_heads`` gives each layer its own head, as in the reference, so the tests
  check that independent heads convert; the converter fills the heads a file leaves out from
  ``class_embed.0``, which is what transformers does when it loads such a file.
- transformers' initialisation differs from SPEC (class bias 0 instead of -log(99), box heads'
  last layer normal(0, 0.02) instead of 0 with bias[2:] = -2, transformer weights
  normal(0, 0.02) instead of xavier, query embeddings normal(0, 0.02) instead of normal(0, 1)).
  It only matters when training from scratch; ``randomise`` replaces every weight anyway, so that
  zero-initialised sampling offsets, attention weights and box heads do not hide mistakes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable

import pytest
import torch
from PIL import Image
from torch import Tensor, nn

from choices import TopKReplay

transformers = pytest.importorskip("transformers")
pytest.importorskip("timm")

from deformable_detr import ModelConfig, build_model, get_config, load_pretrained  # noqa: E402
from deformable_detr.checkpoints import CheckpointError, convert_checkpoint, read_checkpoint, save_checkpoint  # noqa: E402
from deformable_detr.cli import main  # noqa: E402
from deformable_detr.data import inference_transforms  # noqa: E402
from deformable_detr.huggingface import (  # noqa: E402
    config_from_huggingface,
    save_huggingface,
    state_dict_from_huggingface,
)

# Small transformer (d_model 128, 2 + 3 layers, 30 queries) on a random timm ResNet-50, so a
# forward pass takes well under a second; everything else is the published structure.
SMALL = dict(
    use_timm_backbone=True,
    use_pretrained_backbone=False,
    backbone="resnet50",
    num_labels=7,
    d_model=128,
    encoder_layers=2,
    decoder_layers=3,
    encoder_ffn_dim=256,
    decoder_ffn_dim=256,
    num_queries=30,
    two_stage_num_proposals=30,
)
VARIANTS = {
    "base": {},
    "box_refine": {"with_box_refine": True},  # class heads untied, as in the reference
    "box_refine_tied_class_heads": {"with_box_refine": True},  # as transformers builds it
    "two_stage": {"with_box_refine": True, "two_stage": True},
    "single_scale_dc5": {"num_feature_levels": 1, "dilation": True},
    "learned_position": {"position_embedding_type": "learned"},
}
# Two images of different, odd sizes: the second is padded at the bottom and right.
IMAGE_SIZES = [(123, 157), (97, 110)]


def randomise(model: nn.Module, seed: int = 0) -> None:
    """Replace every weight by a random one of a sensible scale (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)) and ".backbone.model." not in f".{name}.":
                module.weight.normal_(0, 1 / math.sqrt(module.weight[0].numel()), generator=generator)
                if module.bias is not None:
                    module.bias.normal_(0, 0.1, generator=generator)
            elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
                module.weight.normal_(1, 0.1, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
            elif isinstance(module, nn.Embedding):
                module.weight.normal_(0, 1, generator=generator)
            elif isinstance(module, nn.BatchNorm2d) or type(module).__name__.endswith("FrozenBatchNorm2d"):
                # Gains below 1 keep the random ResNet's activations of a moderate size.
                module.weight.uniform_(0.2, 0.6, generator=generator)
                module.bias.normal_(0, 0.1, generator=generator)
                module.running_mean.normal_(0, 0.1, generator=generator)
                module.running_var.uniform_(0.5, 2.0, generator=generator)
        for name, parameter in model.named_parameters():
            if name.endswith("sampling_offsets.bias"):  # keep the direction pattern, jittered
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)


def untie_class_heads(model: nn.Module) -> None:
    """One class head per decoder layer, as in the reference (transformers ties them; see above)."""
    for head in model.class_embed[1:]:
        head.weight = nn.Parameter(head.weight.detach().clone())
        head.bias = nn.Parameter(head.bias.detach().clone())


def build_transformers_model(variant: str) -> nn.Module:
    config = transformers.DeformableDetrConfig(**SMALL, **VARIANTS[variant])
    model = transformers.DeformableDetrForObjectDetection(config)
    if config.with_box_refine and not config.two_stage:
        assert model.class_embed[1].weight is model.class_embed[0].weight  # the deviation named above
    if variant == "box_refine":
        untie_class_heads(model)
    randomise(model)
    return model.eval()


def make_batch() -> tuple[Tensor, Tensor]:
    """pixel_values (N, 3, H, W) zero-padded and pixel_mask (N, H, W), 1 on the image (transformers' form)."""
    generator = torch.Generator().manual_seed(1)
    height, width = (max(size) for size in zip(*IMAGE_SIZES))
    pixel_values = torch.zeros(len(IMAGE_SIZES), 3, height, width)
    pixel_mask = torch.zeros(len(IMAGE_SIZES), height, width, dtype=torch.long)
    for index, (h, w) in enumerate(IMAGE_SIZES):
        pixel_values[index, :, :h, :w] = torch.randn(3, h, w, generator=generator)
        pixel_mask[index, :h, :w] = 1
    return pixel_values, pixel_mask


class Case:
    """A transformers model (in eval mode) and its outputs on the batch."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.pixel_values, self.pixel_mask = make_batch()
        # Ours replays transformers' two-stage proposal selection: a near-tie may round either way.
        self.topk = TopKReplay(tolerance=1e-4)
        with torch.no_grad(), self.topk.recording():
            self.outputs = self.model(pixel_values=self.pixel_values, pixel_mask=self.pixel_mask)
        self.config = config_from_huggingface(self.model.config.to_dict())

    def assert_same_outputs(self, ours: nn.Module) -> None:
        assert not ours.training
        with torch.no_grad(), self.topk.replaying():
            outputs = ours(self.pixel_values, self.pixel_mask == 0)  # ours: True on padding
        close = dict(rtol=0, atol=1e-4)
        torch.testing.assert_close(outputs["pred_logits"], self.outputs.logits, **close)
        torch.testing.assert_close(outputs["pred_boxes"], self.outputs.pred_boxes, **close)
        if self.config.two_stage:
            # transformers returns the proposals' logits (+inf where invalid), ours their sigmoid.
            encoder = outputs["enc_outputs"]
            torch.testing.assert_close(encoder["pred_logits"], self.outputs.enc_outputs_class, **close)
            torch.testing.assert_close(encoder["pred_boxes"], self.outputs.enc_outputs_coord_logits.sigmoid(), **close)


@pytest.fixture(scope="module")
def cases() -> Callable[[str], Case]:
    """Case by variant, each built once for this module."""
    built: dict[str, Case] = {}

    def get(variant: str) -> Case:
        if variant not in built:
            built[variant] = Case(build_transformers_model(variant))
        return built[variant]

    return get


@pytest.fixture(params=list(VARIANTS))
def case(request, cases) -> Case:
    return cases(request.param)


def to_v4_names(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """transformers v5 in-memory names -> v4 names (those of the released hub files), keeping every
    entry, shared ones too, as v4's ``torch.save`` did."""
    renames = [
        (r"^model\.backbone\.model\.", "model.backbone.conv_encoder.model."),
        (r"^model\.position_embedding\.", "model.backbone.position_embedding."),
        (r"\.self_attn\.o_proj\.", ".self_attn.out_proj."),
        (r"\.mlp\.(fc[12])\.", r".\1."),
    ]
    result = {}
    for key, tensor in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        result[key] = tensor
    return result


def to_v4_config(hf_config: dict) -> dict:
    """A v5 config.json with a timm backbone in the v4 form (use_timm_backbone + backbone)."""
    config = dict(hf_config)
    backbone = config.pop("backbone_config")
    assert backbone["model_type"] == "timm_backbone"
    config.update(
        use_timm_backbone=True, backbone=backbone["backbone"], backbone_config=None, use_pretrained_backbone=False
    )
    return config


def assert_identical(first: dict[str, Tensor], second: dict[str, Tensor]) -> None:
    assert list(first) == list(second)
    for name in first:
        assert torch.equal(first[name], second[name]), name


# --------------------------------------------------------------------------- parity


def test_save_pretrained_loads_with_the_same_outputs(case, tmp_path):
    case.model.save_pretrained(tmp_path)  # config.json + model.safetensors, transformers' file names
    ours = load_pretrained(tmp_path)
    assert ours.config == case.config
    case.assert_same_outputs(ours)


def test_convert_to_ours_keeps_weights_and_label_names(cases, tmp_path):
    case = cases("two_stage")
    names = {index: f"thing {index}" for index in range(case.config.num_classes)}
    case.model.save_pretrained(tmp_path / "hf")
    config_file = tmp_path / "hf" / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "id2label": names}))
    assert convert_checkpoint(tmp_path / "hf", tmp_path / "ours.safetensors") == "ours"
    ours = read_checkpoint(tmp_path / "ours.safetensors")
    assert ours.source_format == "deformable-detr" and ours.class_names == names
    case.assert_same_outputs(load_pretrained(tmp_path / "ours.safetensors"))


def test_in_memory_state_dict_converts_with_the_same_outputs(case):
    # transformers v5 names in memory differ from those it writes to files (conversion_mapping.py).
    ours = build_model(case.config)
    ours.load_state_dict(state_dict_from_huggingface(case.model.state_dict(), case.config), strict=True)
    case.assert_same_outputs(ours.eval())


def test_v4_names_and_pytorch_model_bin(case, tmp_path):
    in_memory = case.model.state_dict()
    converted = state_dict_from_huggingface(in_memory, case.config)
    assert_identical(state_dict_from_huggingface(to_v4_names(in_memory), case.config), converted)

    # A v4-style folder: config.json without backbone_config, and pytorch_model.bin.
    torch.save(to_v4_names(in_memory), tmp_path / "pytorch_model.bin")
    v4_config = to_v4_config(case.model.config.to_dict())
    (tmp_path / "config.json").write_text(json.dumps(v4_config))
    assert config_from_huggingface(v4_config) == case.config
    ours = load_pretrained(tmp_path)
    assert_identical(ours.state_dict(), converted)
    case.assert_same_outputs(ours)


def test_list_of_images_is_padded_like_transformers(cases):
    case = cases("base")
    ours = build_model(case.config)
    ours.load_state_dict(state_dict_from_huggingface(case.model.state_dict(), case.config))
    images = [case.pixel_values[i, :, :h, :w] for i, (h, w) in enumerate(IMAGE_SIZES)]
    with torch.no_grad():
        outputs = ours.eval()(images)
    torch.testing.assert_close(outputs["pred_logits"], case.outputs.logits, rtol=0, atol=1e-4)
    torch.testing.assert_close(outputs["pred_boxes"], case.outputs.pred_boxes, rtol=0, atol=1e-4)


@pytest.mark.parametrize("depth", ["resnet18", "resnet50"])
def test_transformers_resnet_backbone(tmp_path, depth):
    """transformers' own ResNet (embedder / encoder.stages names) instead of timm's."""
    sizes = {
        "resnet18": dict(layer_type="basic", depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512]),
        "resnet50": {},  # transformers' default ResNetConfig
    }
    backbone_config = transformers.ResNetConfig(**sizes[depth], out_features=["stage2", "stage3", "stage4"])
    small = {k: v for k, v in SMALL.items() if k not in ("use_timm_backbone", "use_pretrained_backbone", "backbone")}
    config = transformers.DeformableDetrConfig(**small, backbone_config=backbone_config, with_box_refine=True)
    model = transformers.DeformableDetrForObjectDetection(config)
    untie_class_heads(model)
    randomise(model)
    case = Case(model.eval())
    assert case.config.backbone == depth
    model.save_pretrained(tmp_path)
    case.assert_same_outputs(load_pretrained(tmp_path))


# --------------------------------------------------------------------------- names and configs


@pytest.mark.parametrize("preset", ["r50", "r50_single_scale_dc5", "r50_box_refine", "r50_two_stage"])
def test_published_configurations_give_the_reference_names(preset):
    from conftest import reference_state_dict_entries

    ours = get_config(preset)
    hf_config = transformers.DeformableDetrConfig(
        use_timm_backbone=True,
        use_pretrained_backbone=False,
        backbone="resnet50",
        num_labels=91,
        num_feature_levels=ours.num_feature_levels,
        dilation=ours.dilation,
        with_box_refine=ours.with_box_refine,
        two_stage=ours.two_stage,
    )
    with torch.device("meta"):  # names and shapes only
        model = transformers.DeformableDetrForObjectDetection(hf_config)
    config = config_from_huggingface(hf_config.to_dict())
    assert config == ours
    # Shapes only: meta tensors cannot be compared, so hand over one entry per shared tensor.
    state_dict = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    converted = state_dict_from_huggingface(_first_of_tied(state_dict, model), config)
    entries = [f"{name} {tuple(tensor.shape)}" for name, tensor in converted.items()]
    assert entries == reference_state_dict_entries(preset)


def _first_of_tied(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Drop the entries transformers ties to another (the ones save_pretrained leaves out)."""
    tied = set(model.all_tied_weights_keys)
    return {name: tensor for name, tensor in state_dict.items() if name not in tied}


TIMM_DC5 = {"model_type": "timm_backbone", "backbone": "resnet50", "out_indices": [4], "output_stride": 16}
HF_RESNET = {"model_type": "resnet", "out_features": ["stage2", "stage3", "stage4"]}


@pytest.mark.parametrize(
    ("hf_config", "preset"),
    [
        # The released hub configs (SenseTime/deformable-detr*) are in the v4 form.
        ({"use_timm_backbone": True, "backbone": "resnet50"}, "r50"),
        ({"backbone": "resnet50", "num_feature_levels": 1, "dilation": True}, "r50_single_scale_dc5"),
        ({"with_box_refine": True}, "r50_box_refine"),
        # Two-stage: the number of proposals is the number of queries.
        ({"with_box_refine": True, "two_stage": True, "num_queries": 9, "two_stage_num_proposals": 300}, "r50_two_stage"),
        # v5 form.
        ({"backbone_config": TIMM_DC5, "num_feature_levels": 1}, "r50_single_scale_dc5"),
    ],
)
def test_config_from_huggingface(hf_config, preset):
    labels = {"id2label": {str(i): f"class {i}" for i in range(91)}}
    assert config_from_huggingface({"model_type": "deformable_detr", **labels, **hf_config}) == get_config(preset)


def test_config_num_labels_and_sizes():
    hf_config = {
        "num_labels": 3,
        "d_model": 128,
        "encoder_attention_heads": 4,
        "decoder_attention_heads": 4,
        "encoder_ffn_dim": 512,
        "decoder_ffn_dim": 512,
        "encoder_layers": 2,
        "decoder_layers": 5,
        "encoder_n_points": 2,
        "decoder_n_points": 3,
        "backbone": "timm/resnet18.a1_in1k",
        "position_embedding_type": "learned",
        "dropout": 0.0,
    }
    assert config_from_huggingface(hf_config) == ModelConfig(
        backbone="resnet18",
        num_classes=3,
        d_model=128,
        num_heads=4,
        dim_feedforward=512,
        encoder_layers=2,
        decoder_layers=5,
        encoder_points=2,
        decoder_points=3,
        position_embedding="learned",
        dropout=0.0,
    )


@pytest.mark.parametrize(
    ("hf_config", "message"),
    [
        ({"encoder_attention_heads": 8, "decoder_attention_heads": 4}, "decoder_attention_heads"),
        ({"encoder_ffn_dim": 1024, "decoder_ffn_dim": 2048}, "decoder_ffn_dim"),
        ({"activation_function": "gelu"}, "activation_function"),
        ({"position_embedding_type": "rotary"}, "position_embedding_type"),
        ({"model_type": "detr"}, "model_type"),
        ({"backbone": "resnet50d"}, "resnet50d"),
        ({"backbone": "efficientnet_b0"}, "efficientnet_b0"),
        ({"backbone_config": {"model_type": "swin"}}, "swin"),
        ({"use_timm_backbone": False, "backbone": "microsoft/resnet-50"}, "microsoft/resnet-50"),
        ({"backbone_config": {**TIMM_DC5, "out_indices": [1, 2, 3]}}, "out_indices"),
        ({"backbone_config": {"model_type": "resnet", "out_features": ["stage4"]}}, "out_features"),
        ({"backbone_config": {**HF_RESNET, "downsample_in_bottleneck": True}}, "downsample_in_bottleneck"),
        ({"backbone_config": {**HF_RESNET, "depths": [2, 2]}}, "depths"),
        ({"use_timm_backbone": False, "dilation": True, "num_feature_levels": 1}, "dilation"),
        ({"id2label": None}, "num_labels"),
    ],
)
def test_unsupported_configs_are_refused(hf_config, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_huggingface({"id2label": {"0": "a", "1": "b"}, **hf_config})


# --------------------------------------------------------------------------- bad state dicts


@pytest.fixture
def small_base(cases) -> tuple[dict[str, Tensor], ModelConfig]:
    case = cases("base")
    return case.model.state_dict(), case.config


def test_missing_key_is_named(small_base):
    state_dict, config = small_base
    for removed, named in [
        ("model.encoder.layers.1.mlp.fc1.weight", "transformer.encoder.layers.1.linear1.weight"),
        ("model.decoder.layers.2.self_attn.k_proj.bias", "model.decoder.layers.2.self_attn.k_proj.bias"),
        ("model.backbone.model.layer3.2.bn2.running_var", "backbone.0.body.layer3.2.bn2.running_var"),
    ]:
        broken = {k: v for k, v in state_dict.items() if k != removed}
        with pytest.raises(ValueError, match=rf"missing .*{re.escape(named)}"):
            state_dict_from_huggingface(broken, config)


def test_a_checkpoint_path_for_the_model_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(TypeError, match=r"model is a str; .* load_pretrained\(path\) reads a checkpoint file"):
        save_huggingface(tmp_path / "hf", "runs/best.pt")
    assert not (tmp_path / "hf").exists()


def test_unexpected_key_is_named(small_base):
    state_dict, config = small_base
    for extra in ["model.encoder.layers.0.extra.weight", "model.encoder.layers.7.mlp.fc1.weight", "bbox_embed.0.layers.3.bias"]:
        with pytest.raises(ValueError, match=rf"unexpected .*{re.escape(extra)}"):
            state_dict_from_huggingface({**state_dict, extra: torch.zeros(1)}, config)


def test_wrong_shape_and_wrong_config_are_refused(small_base):
    state_dict, config = small_base
    with pytest.raises(ValueError, match=r"class_embed\.0\.weight \(7, 128\) \(expected \(9, 128\)"):
        state_dict_from_huggingface(state_dict, get_config(config, num_classes=9))
    with pytest.raises(ValueError, match=r"unexpected .*model\.reference_points\.weight"):
        state_dict_from_huggingface(state_dict, get_config(config, with_box_refine=True, two_stage=True))


def test_different_shared_heads_are_refused(small_base):
    # Without box refinement our model has one head for all layers, as the reference does.
    state_dict, config = small_base
    state_dict = {**state_dict, "class_embed.2.bias": state_dict["class_embed.2.bias"] + 1}
    with pytest.raises(ValueError, match=r"class_embed\.0\.bias and class_embed\.2\.bias differ"):
        state_dict_from_huggingface(state_dict, config)


def test_num_batches_tracked_is_dropped(small_base):
    state_dict, config = small_base
    extra = {"model.backbone.model.layer2.0.downsample.1.num_batches_tracked": torch.tensor(5)}
    converted = state_dict_from_huggingface({**state_dict, **extra}, config)
    assert_identical(converted, state_dict_from_huggingface(state_dict, config))


# --------------------------------------------------------------------------- writing

# Ours, small, on a full-width ResNet-18 (timm has the same one); the three published architectures.
OURS_SMALL = dict(backbone="resnet18", backbone_width=64, num_classes=5, d_model=64, encoder_layers=2, decoder_layers=2,
                  dim_feedforward=128, num_queries=20, dropout=0.0)  # fmt: skip
ARCHITECTURES = {
    "plain": {"with_box_refine": False},
    "box_refine": {"with_box_refine": True},
    "two_stage": {"with_box_refine": True, "two_stage": True},
}
NAMES = {1: "circle", 2: "square", 4: "triangle"}


def build_ours(architecture: str, **options) -> nn.Module:
    model = build_model("tiny", **OURS_SMALL, **ARCHITECTURES[architecture], **options)
    randomise(model)
    return model.eval()


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def written(request, tmp_path_factory) -> tuple[nn.Module, object]:
    """(ours, its Hugging Face folder)."""
    ours = build_ours(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    save_huggingface(folder, ours, class_names=NAMES, image_size=96)
    return ours, folder


def test_transformers_loads_the_folder_with_the_same_outputs(written):
    ours, folder = written
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
    loaded, info = transformers.DeformableDetrForObjectDetection.from_pretrained(folder, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    case = Case(loaded.eval())
    assert case.config == ours.config  # the config reads back to ours
    case.assert_same_outputs(ours)
    assert loaded.config.id2label == {0: "LABEL_0", 1: "circle", 2: "square", 3: "LABEL_3", 4: "triangle"}


def test_ours_to_transformers_to_ours_is_bit_for_bit(written, tmp_path):
    ours, folder = written
    transformers.DeformableDetrForObjectDetection.from_pretrained(folder).save_pretrained(tmp_path)
    back = read_checkpoint(tmp_path)
    assert back.config == ours.config
    assert_identical(back.state_dict, ours.state_dict())
    assert back.class_names == NAMES, "transformers' LABEL_<id> for the ids without a name are no names"


def test_the_object_detection_pipeline_runs_on_an_image(written):
    ours, folder = written
    detect = transformers.pipeline("object-detection", model=str(folder), device="cpu")
    image = Image.fromarray(torch.randint(0, 256, (90, 120, 3), dtype=torch.uint8).numpy())
    detections = detect(image, threshold=0.0)
    assert detections, "threshold 0 keeps every query's best class"
    labels = transformers.AutoConfig.from_pretrained(folder).id2label.values()
    for detection in detections:  # random weights: boxes anywhere (transformers does not clip them)
        box = detection["box"]
        assert detection["label"] in labels and 0 <= detection["score"] <= 1
        assert box["xmin"] <= box["xmax"] and box["ymin"] <= box["ymax"]


def test_preprocessor_resizes_as_validation_does(written):
    _, folder = written
    processor = transformers.AutoImageProcessor.from_pretrained(folder)
    for width, height in [(300, 150), (150, 200)]:  # the longer side's limit, and the shorter side's size
        pixels = processor(Image.new("RGB", (width, height)), return_tensors="pt")["pixel_values"]
        ours = inference_transforms(96)(torch.zeros(3, height, width, dtype=torch.uint8))
        assert pixels.shape[-2:] == ours.shape[-2:]


@pytest.mark.parametrize("image_size", [None, 0, 96.0])
def test_save_huggingface_refuses_an_image_size_before_writing_anything(tmp_path, image_size):
    with pytest.raises(ValueError, match=rf"^image_size must be a whole number of at least 1, got {image_size}$"):
        save_huggingface(tmp_path / "hf", build_ours("plain"), image_size=image_size)
    assert list(tmp_path.iterdir()) == []


def test_save_huggingface_takes_class_ids_as_json_writes_them_and_refuses_other_keys(tmp_path):
    """{"1": "cat"}, as json.load gives it, was written as LABEL_1."""
    save_huggingface(tmp_path / "hf", build_ours("plain"), class_names={"1": "cat"})
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]["1"] == "cat"
    with pytest.raises(ValueError, match=r"^class_names is \{'cat': 1\}; expected a mapping of category id to name"):
        save_huggingface(tmp_path / "other", build_ours("plain"), class_names={"cat": 1})
    assert not (tmp_path / "other").exists()


def test_convert_command_writes_the_folder_and_refuses_what_transformers_cannot_hold(tmp_path, capsys):
    ours = build_ours("plain")
    save_checkpoint(tmp_path / "ours.pt", ours, class_names=NAMES, image_size=96)
    assert main(["convert", str(tmp_path / "ours.pt"), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    back = read_checkpoint(tmp_path / "hf")
    assert_identical(back.state_dict, ours.state_dict())
    assert back.image_size == 96, "the image size travels in preprocessor_config.json"
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["id2label"]["4"] == "triangle"
    (tmp_path / "hf" / "preprocessor_config.json").write_text('{"size": 640}')  # older processors' bare number
    assert read_checkpoint(tmp_path / "hf").image_size == 640
    (tmp_path / "hf" / "preprocessor_config.json").unlink()
    assert read_checkpoint(tmp_path / "hf").image_size is None, "without a processor, the folder does not say"
    assert main(["inspect", str(tmp_path / "hf")]) == 0
    assert "image size: not recorded (800 is assumed)" in capsys.readouterr().out

    save_checkpoint(tmp_path / "narrow.pt", build_model("tiny", **{**OURS_SMALL, "backbone_width": 32}))
    assert main(["convert", str(tmp_path / "narrow.pt"), str(tmp_path / "narrow"), "--to", "huggingface"]) == 1
    assert capsys.readouterr().err == (
        f"deformable-detr: error: {tmp_path / 'narrow.pt'}: backbone width 32 has no timm equivalent (timm's ResNets "
        "have width 64): transformers holds a model trained at width 64 (every preset but tiny; --model-option "
        "backbone_width=64), and this one can be exported to ONNX instead (deformable-detr export)\n"
    )
    assert not (tmp_path / "narrow").exists()


def test_reading_drops_only_transformers_placeholder_names(tmp_path):
    save_huggingface(tmp_path, build_ours("plain"))  # no class names: LABEL_<id> for every id
    assert read_checkpoint(tmp_path).class_names is None
    config_file = tmp_path / "config.json"
    id2label = {"0": "LABEL_0", "1": "cat", "2": "LABEL_7", "3": "LABEL_3", "4": "dog"}  # LABEL_7: a name, at id 2
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "id2label": id2label}))
    assert read_checkpoint(tmp_path).class_names == {1: "cat", 2: "LABEL_7", 4: "dog"}


def test_a_mixed_query_selection_model_runs_in_transformers_with_the_same_outputs(tmp_path):
    # Its learned content query is pos_trans_norm's bias behind a zero gain (model/transformer.py):
    # the published two-stage forward, which transformers runs as it is.
    ours = build_ours("two_stage", mixed_query_selection=True)
    with torch.no_grad():
        ours.transformer.pos_trans_norm.weight[ours.config.d_model :] = 0  # as training keeps it
    save_checkpoint(tmp_path / "mixed.pt", ours)
    assert main(["convert", str(tmp_path / "mixed.pt"), str(tmp_path / "hf"), "--to", "huggingface"]) == 0
    loaded, info = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    case = Case(loaded.eval())
    assert case.config == dataclasses.replace(ours.config, mixed_query_selection=False)  # a training option
    case.assert_same_outputs(ours)


def test_trainable_batch_norm_is_written_without_its_step_counters(tmp_path):
    # transformers' batch norm is frozen, as the reference's: a counter would be an unexpected weight.
    ours = build_ours("plain", backbone_norm="batch")
    save_huggingface(tmp_path, ours)
    loaded, info = transformers.DeformableDetrForObjectDetection.from_pretrained(tmp_path, output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())
    Case(loaded.eval()).assert_same_outputs(ours)


def test_a_config_json_that_is_not_an_object_is_named(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert str(error.value) == f"{tmp_path / 'config.json'}: expected a JSON object, found list"


def test_a_config_json_value_of_the_wrong_type_is_named(tmp_path):
    config = {"model_type": "deformable_detr", "use_timm_backbone": True, "backbone": "resnet50", "num_labels": 3,
              "d_model": "256"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError) as error:
        read_checkpoint(tmp_path)
    assert str(error.value) == f"{tmp_path}: config field d_model is '256'; expected int"
