"""The reference implementation's checkpoint layout, both ways: ``{"model": state dict, "args": argparse.Namespace}``.

Pure functions, no I/O (:mod:`~deformable_detr.checkpoints` reads and writes the files):
:func:`reference_payload` is what a released file holds for a model, and
:func:`config_from_reference` reads a released file's config back. Its state-dict names are ours,
so only the config needs translating, through one table of the reference's training flags.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor
from torchvision.models.detection import FasterRCNN_ResNet50_FPN_Weights

from .config import PRESETS, ModelConfig
from .model import DeformableDETR
from .model.backbone import RESNETS, load_resnet

__all__ = [
    "PUBLISHED_IMAGE_SIZE", "coco_category_names", "config_from_reference", "reference_payload", "released_class_names",
    "without_batch_norm_counters",
]

PUBLISHED_IMAGE_SIZE = 800  # the shorter side of the published recipe's validation images

_BACKBONE_WEIGHTS = "backbone.0.body."  # the prefix of the ResNet's own state-dict names

# The reference's backbone hard-codes a bottleneck ResNet's channels (512, 1024 and 2048 out of
# layer2-4) at torchvision's width, and asserts that it is not one of these two basic-block ResNets.
_BASIC_BLOCK_RESNETS = ("resnet18", "resnet34")

# Index = COCO category id, with placeholders at the ids COCO does not use.
_COCO_CATEGORIES: list[str] = FasterRCNN_ResNet50_FPN_Weights.COCO_V1.meta["categories"]

# The reference's training flags, each the ModelConfig field it sets.
_FLAGS = {
    "backbone": "backbone",
    "dilation": "dilation",
    "position_embedding": "position_embedding",
    "hidden_dim": "d_model",
    "nheads": "num_heads",
    "enc_layers": "encoder_layers",
    "dec_layers": "decoder_layers",
    "dim_feedforward": "dim_feedforward",
    "dropout": "dropout",
    "num_feature_levels": "num_feature_levels",
    "enc_n_points": "encoder_points",
    "dec_n_points": "decoder_points",
    "num_queries": "num_queries",
    "with_box_refine": "with_box_refine",
    "two_stage": "two_stage",
}


def reference_payload(model: DeformableDETR, *, image_size: int | None = None) -> dict[str, Any]:
    """What the reference implementation saves for ``model``: its weights and its training flags.

    The file loads into the reference code, which builds only bottleneck ResNets (ResNet-50 and
    larger, ResNeXt, wide ResNet) at torchvision's width: another model is refused. Trainable batch
    norm (a backbone trained from scratch) becomes the reference's frozen batch norm, which computes
    the same in evaluation. Training-only options (hybrid matching's extra queries, ...) have no place
    in the reference: their tensors are left out, and the payload holds the published architecture.
    ``image_size``, the shorter side the model was trained for, is kept as the flag ``image_size``
    (our ``--image-size``), where given: the reference has no such flag and never reads ``args``
    back, so the file still loads there, and reading it here gives the size back.

    Raises:
        ValueError: a backbone the reference code cannot build (``tiny``'s, say).
    """
    _require_reference_backbone(model.config)
    flags = {flag: getattr(model.config, field) for flag, field in _FLAGS.items()}
    if image_size is not None:
        flags["image_size"] = image_size
    args = argparse.Namespace(**flags, masks=False)
    return {"model": without_batch_norm_counters(model.inference_state_dict()), "args": args}


def _require_reference_backbone(config: ModelConfig) -> None:
    instead = "keep it in our layout (.pt or .safetensors), or export it to ONNX (deformable-detr export)"
    if config.backbone in _BASIC_BLOCK_RESNETS:
        raise ValueError(f"backbone {config.backbone} has no place in the reference layout: the reference code "
                         f"builds bottleneck ResNets only (resnet50 and larger, ResNeXt, wide ResNet); {instead}")
    if config.backbone_width != 64:
        raise ValueError(f"backbone width {config.backbone_width} has no place in the reference layout: the "
                         f"reference code builds torchvision's ResNets, of width 64; {instead}")


def without_batch_norm_counters(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` without trainable batch norm's step counters (``num_batches_tracked``), which
    evaluation never reads and the frozen batch norm of the reference and of transformers has no place for."""
    return {name: tensor for name, tensor in state_dict.items() if not name.endswith("num_batches_tracked")}


def config_from_reference(state_dict: Mapping[str, Tensor], args: Mapping[str, Any]) -> ModelConfig:
    """The config of a reference checkpoint: its ``args`` (the training flags, where the file has
    them), overridden by what its weights' names and shapes say."""

    def count(prefix: str) -> int:
        return len({name[len(prefix) :].split(".")[0] for name in state_dict if name.startswith(prefix)})

    values = {field: args[flag] for flag, field in _FLAGS.items() if flag in args}
    # The reference accepts "v2"/"v3" as aliases of "sine"/"learned".
    position_embedding = values.get("position_embedding", "sine")
    values["position_embedding"] = {"v2": "sine", "v3": "learned"}.get(position_embedding, position_embedding)
    num_levels, d_model = state_dict["transformer.level_embed"].shape
    two_stage = "transformer.enc_output.weight" in state_dict
    width = state_dict[f"{_BACKBONE_WEIGHTS}conv1.weight"].shape[0]
    backbone_shapes = {name.removeprefix(_BACKBONE_WEIGHTS): tensor.shape for name, tensor in state_dict.items()
                       if name.startswith(_BACKBONE_WEIGHTS)}
    # Only trainable batch norm counts its steps; the reference's frozen one has no such buffer.
    trainable_norm = any(name.endswith("num_batches_tracked") for name in backbone_shapes)
    resnet = _resnet_of(backbone_shapes, width=width, frozen_norm=not trainable_norm, first=values.get("backbone"))
    values.update(
        backbone=resnet or values.get("backbone", "resnet50"),  # none: building it says what differs
        backbone_norm="batch" if trainable_norm else "frozen",
        num_feature_levels=num_levels,
        d_model=d_model,
        encoder_layers=count("transformer.encoder.layers."),
        decoder_layers=count("transformer.decoder.layers."),
        dim_feedforward=state_dict["transformer.encoder.layers.0.linear1.weight"].shape[0],
        with_box_refine="transformer.decoder.bbox_embed.0.layers.0.weight" in state_dict,
        two_stage=two_stage,
        num_classes=state_dict["class_embed.0.weight"].shape[0],
        backbone_width=width,
        # Two-stage queries come from proposals: only the flag says how many.
        num_queries=values.get("num_queries", 300) if two_stage else state_dict["query_embed.weight"].shape[0],
    )
    return ModelConfig(**values)


def _resnet_of(shapes: Mapping[str, torch.Size], *, width: int, frozen_norm: bool, first: str | None) -> str | None:
    """The torchvision ResNet whose state dict at ``width`` has the names and ``shapes`` of a
    checkpoint's backbone; None where none has. A file without flags (a bare state dict) tells its
    backbone this way alone: its depth and block type are in its names, ResNeXt's groups and a wide
    ResNet's width in its shapes. ``first`` (the file's flag) and the presets' backbones are tried
    before the others, the deepest of which take longest to build."""
    likely = [first, *(preset.backbone for preset in PRESETS.values())]
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        for name in dict.fromkeys(name for name in [*likely, *RESNETS] if name in RESNETS):
            resnet = load_resnet(name, frozen_norm=frozen_norm, width=width)
            if shapes == {key: tensor.shape for key, tensor in resnet.state_dict().items() if not key.startswith("fc.")}:
                return name
    return None


def coco_category_names() -> dict[int, str]:
    """COCO's 80 category names by their ids (1..90, with gaps)."""
    return {identifier: name for identifier, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A")}


def released_class_names(config: ModelConfig) -> dict[int, str] | None:
    """The released models are COCO's, with its 91 category ids: their names; None for other class counts."""
    return coco_category_names() if config.num_classes == len(_COCO_CATEGORIES) else None
