"""Hugging Face ``DeformableDetrForObjectDetection`` checkpoints to our model and back, through one
name table (``_NAMES``) read both ways.

Reading is pure: :func:`config_from_huggingface` reads a parsed ``config.json`` and
:func:`state_dict_from_huggingface` renames a state dict to the reference checkpoint names.
Writing: :func:`config_to_huggingface` and :func:`state_dict_to_huggingface` are their inverses,
and :func:`save_huggingface` writes the folder transformers' ``from_pretrained`` and
``pipeline("object-detection")`` read (``convert --to huggingface``).

Both transformers name layouts are accepted: the one written to files (``save_pretrained`` of
v4 and v5 alike, and the released hub checkpoints) and the v5 in-memory ``model.state_dict()``
names, which differ (``backbone.conv_encoder`` -> ``backbone``, ``self_attn.out_proj`` ->
``self_attn.o_proj``, ``fc1`` -> ``mlp.fc1``; transformers' ``conversion_mapping.py``).
The backbone may be timm's ResNet (the released checkpoints) or transformers' own ResNet.
"""

from __future__ import annotations

import dataclasses
import json
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor

from .checks import check_count, class_names_by_id
from .config import ModelConfig
from .data import inference_transforms
from .data.transforms import IMAGENET_MEAN, IMAGENET_STD
from .files import atomic_write
from .model import DeformableDETR, check_model
from .reference import PUBLISHED_IMAGE_SIZE, without_batch_norm_counters

if TYPE_CHECKING:
    import os

__all__ = [
    "config_from_huggingface",
    "config_to_huggingface",
    "save_huggingface",
    "state_dict_from_huggingface",
    "state_dict_to_huggingface",
]


# --------------------------------------------------------------------------- config

# timm ResNets whose module names and architecture equal torchvision's (same name in both).
_TIMM_RESNETS = {
    "resnet18", "resnet34", "resnet50", "resnet101", "resnet152",
    "resnext50_32x4d", "resnext101_32x8d", "resnext101_64x4d",
    "wide_resnet50_2", "wide_resnet101_2",
}  # fmt: skip

# transformers ResNetConfig (layer_type, depths, hidden_sizes) -> torchvision name.
_HF_RESNETS = {
    ("basic", (2, 2, 2, 2), (64, 128, 256, 512)): "resnet18",
    ("basic", (3, 4, 6, 3), (64, 128, 256, 512)): "resnet34",
    ("bottleneck", (3, 4, 6, 3), (256, 512, 1024, 2048)): "resnet50",
    ("bottleneck", (3, 4, 23, 3), (256, 512, 1024, 2048)): "resnet101",
    ("bottleneck", (3, 8, 36, 3), (256, 512, 1024, 2048)): "resnet152",
}


def config_from_huggingface(hf_config: Mapping[str, Any]) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face Deformable DETR ``config.json`` (parsed).

    Raises ``ValueError`` for anything our model cannot reproduce. Training-only settings
    (losses, matcher costs, layer drop, HF's separate attention/activation dropouts) are ignored;
    ``dropout`` is taken from HF's ``dropout``.
    """
    get = hf_config.get
    if get("model_type", "deformable_detr") != "deformable_detr":
        raise ValueError(f"not a Deformable DETR config: model_type is {get('model_type')!r}")
    _require_equal(hf_config, "encoder_attention_heads", "decoder_attention_heads", 8)
    _require_equal(hf_config, "encoder_ffn_dim", "decoder_ffn_dim", 1024)
    if get("activation_function", "relu") != "relu":
        raise ValueError(f"unsupported activation_function {get('activation_function')!r}: only 'relu'")
    if get("num_channels", 3) != 3:
        raise ValueError(f"unsupported num_channels {get('num_channels')}: only 3 (RGB)")
    position = get("position_embedding_type", "sine")
    if position not in ("sine", "learned"):
        raise ValueError(f"unsupported position_embedding_type {position!r}: 'sine' or 'learned'")

    levels = get("num_feature_levels", 4)
    backbone, dilation = _backbone_from_huggingface(hf_config, multi_scale=levels > 1)
    two_stage = bool(get("two_stage", False))
    # Two-stage takes its queries from the top-k encoder proposals, so their count is the
    # number of queries; num_queries is then unused by transformers.
    num_queries = get("two_stage_num_proposals", 300) if two_stage else get("num_queries", 300)
    return ModelConfig(
        backbone=backbone,
        backbone_weights=None,  # the weights come with the state dict
        dilation=dilation,
        position_embedding=position,
        num_feature_levels=levels,
        d_model=get("d_model", 256),
        num_heads=get("encoder_attention_heads", 8),
        encoder_layers=get("encoder_layers", 6),
        decoder_layers=get("decoder_layers", 6),
        dim_feedforward=get("encoder_ffn_dim", 1024),
        dropout=get("dropout", 0.1),
        encoder_points=get("encoder_n_points", 4),
        decoder_points=get("decoder_n_points", 4),
        num_queries=num_queries,
        with_box_refine=bool(get("with_box_refine", False)),
        two_stage=two_stage,
        num_classes=_num_classes(hf_config),
    )


def _require_equal(hf_config: Mapping[str, Any], encoder_key: str, decoder_key: str, default: int) -> None:
    # Our model, like the reference, has one value for encoder and decoder.
    encoder, decoder = hf_config.get(encoder_key, default), hf_config.get(decoder_key, default)
    if encoder != decoder:
        raise ValueError(f"unsupported: {encoder_key} ({encoder}) differs from {decoder_key} ({decoder})")


def _num_classes(hf_config: Mapping[str, Any]) -> int:
    if "num_labels" in hf_config:
        return int(hf_config["num_labels"])
    if hf_config.get("id2label"):
        return len(hf_config["id2label"])
    raise ValueError("config has neither num_labels nor id2label: the number of classes is unknown")


def _backbone_from_huggingface(hf_config: Mapping[str, Any], *, multi_scale: bool) -> tuple[str, bool]:
    """(torchvision ResNet name, dilation) of the backbone transformers would build."""
    backbone_config = hf_config.get("backbone_config")
    dilation = bool(hf_config.get("dilation", False))
    # transformers v4 wrote use_timm_backbone + backbone (+ backbone_kwargs) and no backbone_config,
    # and turned dilation into timm's output_stride 16; v5 writes that backbone_config out
    # (model_type "timm_backbone" or "resnet") and reads dilation from it alone.
    if backbone_config is None:
        if not hf_config.get("use_timm_backbone", True):
            if hf_config.get("backbone"):
                raise ValueError(
                    f"unsupported backbone {hf_config['backbone']!r} loaded by name through AutoBackbone; "
                    "expected a timm ResNet or a ResNet backbone_config"
                )
            # transformers' default: its own ResNet-50 returning stage4 only.
            backbone_config = {"model_type": "resnet", "out_features": ["stage4"]}
        else:
            backbone_config = {
                "model_type": "timm_backbone",
                "backbone": hf_config.get("backbone") or "resnet50",
                **({"output_stride": 16} if dilation else {}),
                **(hf_config.get("backbone_kwargs") or {}),
            }
    model_type = backbone_config.get("model_type")
    if model_type == "timm_backbone":
        return _timm_backbone(backbone_config, multi_scale=multi_scale)
    if model_type == "resnet":
        if dilation:
            raise ValueError("unsupported: dilation with transformers' own ResNet (transformers ignores it)")
        return _hf_resnet_backbone(backbone_config, multi_scale=multi_scale), False
    raise ValueError(f"unsupported backbone model_type {model_type!r}: expected a ResNet")


def _timm_backbone(backbone_config: Mapping[str, Any], *, multi_scale: bool) -> tuple[str, bool]:
    raw_name = str(backbone_config.get("backbone") or "resnet50")
    # "timm/resnet50.a1_in1k" -> "resnet50"; tv_ models are timm copies of torchvision ResNets.
    name = raw_name.removeprefix("timm/").split(".")[0].removeprefix("tv_")
    if name not in _TIMM_RESNETS:
        raise ValueError(f"unsupported timm backbone {raw_name!r}: expected one of {', '.join(sorted(_TIMM_RESNETS))}")
    if backbone_config.get("num_channels", backbone_config.get("in_chans", 3)) != 3:
        raise ValueError("unsupported: backbone input channels other than 3")
    out_indices = list(backbone_config.get("out_indices") or ([2, 3, 4] if multi_scale else [4]))
    if out_indices != ([2, 3, 4] if multi_scale else [4]):
        raise ValueError(f"unsupported backbone out_indices {out_indices}: the model uses layer2..4, or layer4 alone")
    output_stride = backbone_config.get("output_stride")
    if output_stride not in (None, 32, 16):
        raise ValueError(f"unsupported backbone output_stride {output_stride}: 32, or 16 (DC5)")
    return name, output_stride == 16


def _hf_resnet_backbone(backbone_config: Mapping[str, Any], *, multi_scale: bool) -> str:
    layer_type = backbone_config.get("layer_type", "bottleneck")
    depths = tuple(backbone_config.get("depths") or (3, 4, 6, 3))
    hidden_sizes = tuple(backbone_config.get("hidden_sizes") or (256, 512, 1024, 2048))
    name = _HF_RESNETS.get((layer_type, depths, hidden_sizes))
    if name is None:
        raise ValueError(
            f"unsupported transformers ResNet (layer_type {layer_type!r}, depths {list(depths)}, "
            f"hidden_sizes {list(hidden_sizes)}): no torchvision equivalent"
        )
    unsupported = {
        "embedding_size": 64,
        "hidden_act": "relu",
        "num_channels": 3,
        "downsample_in_first_stage": False,
        "downsample_in_bottleneck": False,  # True puts the stride on the 1x1 conv (ResNet v1)
    }
    for key, value in unsupported.items():
        if backbone_config.get(key, value) != value:
            raise ValueError(f"unsupported transformers ResNet: {key} is {backbone_config[key]!r}, expected {value!r}")
    stage_names = backbone_config.get("stage_names") or ["stem", "stage1", "stage2", "stage3", "stage4"]
    out_features = backbone_config.get("out_features")
    if out_features is None and backbone_config.get("out_indices") is not None:
        out_features = [stage_names[i] for i in backbone_config["out_indices"]]
    expected = ["stage2", "stage3", "stage4"] if multi_scale else ["stage4"]
    if list(out_features or ["stage4"]) != expected:
        raise ValueError(f"unsupported backbone out_features {out_features}: expected {expected}")
    return name


# --------------------------------------------------------------------------- state dict

# transformers' ResNet (backbone_config model_type "resnet"), read only: stages 0..3 are
# torchvision's layer1..4 and ``layer.i`` of a block is conv{i+1}/bn{i+1}.
_HF_RESNET = r"model\.backbone\.(?:conv_encoder\.)?model\."
_BODY = "backbone.0.body."
_BLOCK = rf"{_HF_RESNET}encoder\.stages\.(?P<stage>\d+)\.layers\.(?P<block>\d+)\."


def _stage_block(match: re.Match[str]) -> str:
    return f"{_BODY}layer{int(match['stage']) + 1}.{match['block']}"


_HF_RESNET_NAMES: list[tuple[re.Pattern[str], Callable[[re.Match[str]], str]]] = [
    (re.compile(pattern), target)
    for pattern, target in [
        (rf"{_HF_RESNET}embedder\.embedder\.convolution\.weight", lambda m: f"{_BODY}conv1.weight"),
        (rf"{_HF_RESNET}embedder\.embedder\.normalization\.(?P<p>\w+)", lambda m: f"{_BODY}bn1.{m['p']}"),
        (rf"{_BLOCK}shortcut\.convolution\.weight", lambda m: f"{_stage_block(m)}.downsample.0.weight"),
        (rf"{_BLOCK}shortcut\.normalization\.(?P<p>\w+)", lambda m: f"{_stage_block(m)}.downsample.1.{m['p']}"),
        (rf"{_BLOCK}layer\.(?P<i>\d)\.convolution\.weight", lambda m: f"{_stage_block(m)}.conv{int(m['i']) + 1}.weight"),
        (rf"{_BLOCK}layer\.(?P<i>\d)\.normalization\.(?P<p>\w+)", lambda m: f"{_stage_block(m)}.bn{int(m['i']) + 1}.{m['p']}"),
    ]
]

# What each {placeholder} of the name table matches.
_FIELDS = {
    "body": r"(?:conv1|bn1|layer\d+)\..+",  # timm's ResNet has torchvision's module names
    "own": r"level_embed|(?:reference_points|enc_output(?:_norm)?|pos_trans(?:_norm)?)\..+",
    "head": r"class_embed|bbox_embed",
    "layer": r"\d+",
    "qkv": r"[qkv]",
    "param": r"weight|bias",
    "rest": r".+",
}


@dataclass(frozen=True)
class _Name:
    """One row of the table both ways: transformers' name as ``save_pretrained`` writes it (v4 and
    v5 alike, the released hub files too), the reference name, and other spellings transformers
    uses that are read too (v5's in-memory names). A ":q", ":k" or ":v" suffix marks a third of
    a fused nn.MultiheadAttention in_proj tensor (see _fuse_qkv and _split_qkv)."""

    huggingface: str
    ours: str
    also: tuple[str, ...] = ()


_ENCODER = "model.encoder.layers.{layer}."
_DECODER = "model.decoder.layers.{layer}."
_OUR_ENCODER = "transformer.encoder.layers.{layer}."
_OUR_DECODER = "transformer.decoder.layers.{layer}."
_NAMES = [
    _Name("model.backbone.conv_encoder.model.{body}", _BODY + "{body}", also=("model.backbone.model.{body}",)),
    # Learned position embedding (v4 and files under model.backbone, v5 in memory under model).
    _Name("model.backbone.position_embedding.row_embeddings.weight", "backbone.1.row_embed.weight",
          also=("model.position_embedding.row_embeddings.weight",)),
    _Name("model.backbone.position_embedding.column_embeddings.weight", "backbone.1.col_embed.weight",
          also=("model.position_embedding.column_embeddings.weight",)),
    _Name("model.input_proj.{rest}", "input_proj.{rest}"),
    _Name("model.query_position_embeddings.weight", "query_embed.weight"),
    _Name("model.{own}", "transformer.{own}"),
    _Name(_ENCODER + "self_attn.{rest}", _OUR_ENCODER + "self_attn.{rest}"),
    _Name(_ENCODER + "self_attn_layer_norm.{rest}", _OUR_ENCODER + "norm1.{rest}"),
    _Name(_ENCODER + "fc1.{rest}", _OUR_ENCODER + "linear1.{rest}", also=(_ENCODER + "mlp.fc1.{rest}",)),
    _Name(_ENCODER + "fc2.{rest}", _OUR_ENCODER + "linear2.{rest}", also=(_ENCODER + "mlp.fc2.{rest}",)),
    _Name(_ENCODER + "final_layer_norm.{rest}", _OUR_ENCODER + "norm2.{rest}"),
    _Name(_DECODER + "self_attn.out_proj.{rest}", _OUR_DECODER + "self_attn.out_proj.{rest}",
          also=(_DECODER + "self_attn.o_proj.{rest}",)),
    _Name(_DECODER + "self_attn.{qkv}_proj.{param}", _OUR_DECODER + "self_attn.in_proj_{param}:{qkv}"),
    _Name(_DECODER + "self_attn_layer_norm.{rest}", _OUR_DECODER + "norm2.{rest}"),
    _Name(_DECODER + "encoder_attn.{rest}", _OUR_DECODER + "cross_attn.{rest}"),
    _Name(_DECODER + "encoder_attn_layer_norm.{rest}", _OUR_DECODER + "norm1.{rest}"),
    _Name(_DECODER + "fc1.{rest}", _OUR_DECODER + "linear1.{rest}", also=(_DECODER + "mlp.fc1.{rest}",)),
    _Name(_DECODER + "fc2.{rest}", _OUR_DECODER + "linear2.{rest}", also=(_DECODER + "mlp.fc2.{rest}",)),
    _Name(_DECODER + "final_layer_norm.{rest}", _OUR_DECODER + "norm3.{rest}"),
    # Prediction heads; the decoder's copies exist with box refinement / two-stage.
    _Name("model.decoder.{head}.{rest}", "transformer.decoder.{head}.{rest}"),
    _Name("{head}.{rest}", "{head}.{rest}"),
]  # fmt: skip


def _pattern(template: str) -> re.Pattern[str]:
    """The regex of a name template: literal text, and a named group per {placeholder}."""
    parts = [re.escape(literal) + (f"(?P<{field}>{_FIELDS[field]})" if field else "")
             for literal, field, _, _ in string.Formatter().parse(template)]  # fmt: skip
    return re.compile("".join(parts))


# (pattern, the template a match is written into), each way; first full match wins.
_FROM_HF = [(_pattern(source), name.ours) for name in _NAMES for source in (name.huggingface, *name.also)]
_TO_HF = [(_pattern(name.ours), name.huggingface) for name in _NAMES]
_QKV = "qkv"  # nn.MultiheadAttention's in_proj order


def _translate(key: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    for pattern, template in table:
        match = pattern.fullmatch(key)
        if match:
            return template.format(**match.groupdict())
    return None


def _rename(key: str) -> str | None:
    for pattern, target in _HF_RESNET_NAMES:
        match = pattern.fullmatch(key)
        if match:
            return target(match)
    return _translate(key, _FROM_HF)


def state_dict_from_huggingface(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The Hugging Face state dict under the reference names, ready for ``load_state_dict(strict=True)``.

    ``config`` is the converted config (:func:`config_from_huggingface`). Every entry of our
    model is filled: names our model stores as one tensor (the shared heads without box
    refinement, ``transformer.decoder.*_embed``) from whichever is present. Raises ``ValueError``
    naming the keys when something is missing, left over, of the wrong shape, or inconsistent.
    """
    renamed: dict[str, Tensor] = {}
    source_of: dict[str, str] = {}  # our name -> HF key, for error messages
    qkv: dict[str, dict[str, tuple[str, Tensor]]] = {}
    unexpected: list[str] = []
    for key, tensor in without_batch_norm_counters(state_dict).items():
        name = _rename(key)
        if name is None:
            unexpected.append(key)
        elif ":" in name:
            name, part = name.split(":")
            qkv.setdefault(name, {})[part] = (key, tensor)
        else:
            if name in renamed and not torch.equal(renamed[name], tensor):
                raise ValueError(f"{source_of[name]} and {key} both map to {name} with different values")
            renamed[name], source_of[name] = tensor, key
    missing = _fuse_qkv(qkv, renamed, source_of)

    expected = _reference_layout(config)
    unexpected += [source_of[name] for name in renamed if name not in expected]
    result: dict[str, Tensor] = {}
    for group in _alias_groups(expected):
        present = [name for name in group if name in renamed]
        fallback = _tied_to_first(group[0], config)
        if not present and fallback in result:
            renamed[group[0]], source_of[group[0]] = result[fallback], source_of[fallback]
            present = [group[0]]
        if not present:
            missing.extend(group)
            continue
        value = renamed[present[0]]
        for other in present[1:]:
            if not torch.equal(renamed[other], value):
                raise ValueError(
                    f"{source_of[present[0]]} and {source_of[other]} differ, but our model stores "
                    f"{present[0]} and {other} as one tensor (config: with_box_refine={config.with_box_refine}, "
                    f"two_stage={config.two_stage})"
                )
        result.update(dict.fromkeys(group, value))

    if missing or unexpected:
        parts = [f"missing {_listing(missing)}"] if missing else []
        parts += [f"unexpected {_listing(unexpected)}"] if unexpected else []
        raise ValueError(f"Hugging Face state dict does not fit the model ({_summary(config)}): {'; '.join(parts)}")
    wrong_shapes = [
        f"{source_of.get(name, name)} {tuple(tensor.shape)} (expected {tuple(expected[name].shape)} for {name})"
        for name, tensor in result.items()
        if tensor.shape != expected[name].shape
    ]
    if wrong_shapes:
        listing = _listing(wrong_shapes, "; ")
        raise ValueError(f"Hugging Face state dict has wrong shapes ({_summary(config)}): {listing}")
    return {name: result[name] for name in expected}


def _listing(items: list[str], separator: str = ", ", limit: int = 12) -> str:
    shown = separator.join(items[:limit])
    return shown if len(items) <= limit else f"{shown}{separator}... ({len(items)} in all)"


def _summary(config: ModelConfig) -> str:
    return (
        f"{config.backbone}, {config.num_feature_levels} levels, d_model {config.d_model}, "
        f"{config.num_classes} classes, with_box_refine={config.with_box_refine}, two_stage={config.two_stage}"
    )


def _fuse_qkv(
    parts: dict[str, dict[str, tuple[str, Tensor]]], renamed: dict[str, Tensor], source_of: dict[str, str]
) -> list[str]:
    """Concatenate the separate q/k/v projections into in_proj_*; returns the HF keys missing."""
    missing = []
    for name, by_part in parts.items():
        absent = [p for p in _QKV if p not in by_part]
        if absent:
            any_key = next(iter(by_part.values()))[0]
            missing += [re.sub(r"[qkv]_proj", f"{p}_proj", any_key) for p in absent]
            continue
        renamed[name] = torch.cat([by_part[p][1] for p in _QKV])
        source_of[name] = by_part["q"][0].replace("q_proj", "{q,k,v}_proj")
    return missing


def _reference_layout(config: ModelConfig) -> dict[str, Tensor]:
    """Our model's state dict entries (shape-only tensors, shared ones identical objects)."""
    from .model import build_model  # deferred: keeps this module free of import cycles with checkpoints

    with torch.device("meta"):
        model = build_model(dataclasses.replace(config, backbone_weights=None))
    return model.state_dict(keep_vars=True)


def _alias_groups(expected: Mapping[str, Tensor]) -> list[list[str]]:
    """Names grouped by the tensor they hold, in state-dict order."""
    groups: dict[int, list[str]] = {}
    for name, tensor in expected.items():
        groups.setdefault(id(tensor), []).append(name)
    return list(groups.values())


def _tied_to_first(name: str, config: ModelConfig) -> str | None:
    """The head-0 entry transformers ties ``name`` to when the checkpoint leaves it out.

    transformers ties class_embed.k / bbox_embed.k to index 0 unless the decoder owns copies
    (class heads with two-stage, box heads with box refinement), and ``save_pretrained`` drops
    tied entries. So a box-refine model saved by transformers holds class_embed.0 only, and its
    class heads are one head (the reference has independent ones; see tests/test_huggingface.py).
    """
    match = re.fullmatch(r"(class_embed|bbox_embed)\.([1-9]\d*)\.(.+)", name)
    if match is None:
        return None
    head = match[1]
    owned_by_decoder = config.two_stage if head == "class_embed" else config.with_box_refine
    return None if owned_by_decoder else f"{head}.0.{match[3]}"


# --------------------------------------------------------------------------- writing


def config_to_huggingface(config: ModelConfig, *, class_names: Mapping[int, str] | None = None) -> dict[str, Any]:
    """The ``config.json`` transformers builds ``config``'s model from (:func:`config_from_huggingface`
    reads it back to ``config``, less the training-only settings), ``id2label`` from ``class_names``
    (transformers' ``LABEL_<id>`` for ids without a name)."""
    _require_published(config)
    labels = {index: (class_names or {}).get(index, f"LABEL_{index}") for index in range(config.num_classes)}
    return {
        "architectures": ["DeformableDetrForObjectDetection"],
        "model_type": "deformable_detr",
        # A timm ResNet in the form of transformers v4, which v4 and v5 both read (the released
        # hub configs have it); the weights come with the folder.
        "use_timm_backbone": True,
        "backbone": config.backbone,
        "use_pretrained_backbone": False,
        "dilation": config.dilation,
        "num_channels": 3,
        "num_feature_levels": config.num_feature_levels,
        "position_embedding_type": config.position_embedding,
        "d_model": config.d_model,
        "encoder_layers": config.encoder_layers,
        "decoder_layers": config.decoder_layers,
        "encoder_attention_heads": config.num_heads,
        "decoder_attention_heads": config.num_heads,
        "encoder_ffn_dim": config.dim_feedforward,
        "decoder_ffn_dim": config.dim_feedforward,
        "encoder_n_points": config.encoder_points,
        "decoder_n_points": config.decoder_points,
        "activation_function": "relu",
        "dropout": config.dropout,
        "num_queries": config.num_queries,
        "two_stage_num_proposals": config.num_queries,
        "with_box_refine": config.with_box_refine,
        "two_stage": config.two_stage,
        # Every head keeps its own tensors, as in the reference: transformers would otherwise tie a
        # box-refining model's class heads into one (and save_pretrained would write one).
        "tie_word_embeddings": False,
        "id2label": {str(index): name for index, name in labels.items()},
        "label2id": {name: index for index, name in labels.items()},
    }


def state_dict_to_huggingface(state_dict: Mapping[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """Our inference state dict (reference names, no training-only tensors) in the names and
    layout ``save_pretrained`` writes for :func:`config_to_huggingface`'s config: every tensor its
    own copy, the decoder's self-attention projections split into q, k and v, and without
    trainable batch norm's step counters (transformers' batch norm is frozen).

    Raises ``ValueError`` naming an entry transformers has no place for.
    """
    _require_published(config)
    # transformers' decoder holds copies of the heads only where it uses them itself.
    decoder_owns = {"bbox_embed": config.with_box_refine, "class_embed": config.two_stage}
    result: dict[str, Tensor] = {}
    for name, tensor in without_batch_norm_counters(state_dict).items():
        head = re.match(r"transformer\.decoder\.(class_embed|bbox_embed)\.", name)
        if head and not decoder_owns[head[1]]:
            continue
        parts = _split_qkv(name, tensor) if ".self_attn.in_proj_" in name else {name: tensor}
        for key, part in parts.items():
            huggingface_name = _translate(key, _TO_HF)
            if huggingface_name is None:
                raise ValueError(f"{name} has no place in transformers' DeformableDetrForObjectDetection")
            # safetensors refuses tensors that share memory, or are not contiguous.
            result[huggingface_name] = part.clone(memory_format=torch.contiguous_format)
    return result


def _split_qkv(name: str, tensor: Tensor) -> dict[str, Tensor]:
    """An nn.MultiheadAttention in_proj tensor as its q, k and v thirds (the inverse of _fuse_qkv)."""
    return {f"{name}:{part}": third for part, third in zip(_QKV, tensor.chunk(len(_QKV)))}


def _require_published(config: ModelConfig) -> None:
    if config.backbone not in _TIMM_RESNETS:
        raise ValueError(f"backbone {config.backbone} has no timm equivalent: expected one of {', '.join(sorted(_TIMM_RESNETS))}")
    if config.backbone_width != 64:
        raise ValueError(f"backbone width {config.backbone_width} has no timm equivalent (timm's ResNets have width 64): "
                         "transformers holds a model trained at width 64 (every preset but tiny; --model-option "
                         "backbone_width=64), and this one can be exported to ONNX instead (deformable-detr export)")


def preprocessor_config(image_size: int) -> dict[str, Any]:
    """The ``preprocessor_config.json`` of transformers' image processor that resizes and
    normalises as validation does (:func:`~deformable_detr.data.inference_transforms`)."""
    resize = inference_transforms(image_size).transforms[0]
    return {
        "image_processor_type": "DeformableDetrImageProcessor",
        "format": "coco_detection",
        "do_resize": True,
        "size": {"shortest_edge": image_size, "longest_edge": resize.max_size},
        "resample": 2,  # bilinear
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD),
        "do_convert_annotations": True,
        "do_pad": True,
    }


def save_huggingface(
    folder: str | os.PathLike, model: DeformableDETR, *, class_names: Mapping[int, str] | None = None,
    image_size: int = PUBLISHED_IMAGE_SIZE,
) -> None:
    """Write ``model`` as the folder transformers' ``save_pretrained`` writes (``config.json``,
    ``model.safetensors``) and ``preprocessor_config.json`` for inputs resized to ``image_size``,
    each file atomically, the config last.

    Raises:
        TypeError: ``model`` is not a DeformableDETR.
        ValueError: a model transformers cannot hold (a backbone timm has no equivalent for),
            ``image_size`` is not a whole number of at least 1, or ``class_names`` is not a mapping
            of category id to name; nothing is written.
    """
    check_model(model)
    check_count("image_size", image_size, at_least=1)
    class_names = class_names_by_id(class_names)  # ids as JSON writes them ("1") too, which id2label looks up by number
    folder = Path(folder)
    tensors = state_dict_to_huggingface(model.inference_state_dict(), model.config)
    # Both made before any file is written; int(): JSON cannot write numpy's integers.
    texts = {name: json.dumps(content, indent=2) + "\n" for name, content in [
        ("preprocessor_config.json", preprocessor_config(int(image_size))),
        ("config.json", config_to_huggingface(model.config, class_names=class_names)),
    ]}  # fmt: skip
    with atomic_write(folder / "model.safetensors") as temporary:
        save_file(tensors, temporary, metadata={"format": "pt"})
    for name, text in texts.items():
        with atomic_write(folder / name) as temporary:
            temporary.write_text(text)
