"""Model configuration: one plain dataclass and the published presets."""

from __future__ import annotations

import dataclasses
import numbers
import os
import reprlib
import types
import typing
from dataclasses import dataclass
from typing import Any

from .checks import is_whole_number


@dataclass
class ModelConfig:
    """Every hyper-parameter that shapes a Deformable DETR model.

    The defaults are the published ResNet-50 multi-scale model. A config is stored inside every
    checkpoint (``to_dict``), so a checkpoint alone rebuilds its model.
    """

    # Backbone: any torchvision ResNet ("resnet18" .. "resnet101", "resnext50_32x4d", ...).
    backbone: str = "resnet50"
    # None (random init), a torchvision weights name ("IMAGENET1K_V1", "DEFAULT") or a local file.
    backbone_weights: str | None = None
    dilation: bool = False  # DC5: the last stage uses dilation 2 instead of stride 2
    train_backbone: bool = True  # with "frozen" norm: layer2..layer4 trainable, stem and layer1 frozen
    # "frozen": FrozenBatchNorm2d, the rule for pretrained backbones (and the released models);
    # "batch": trainable BatchNorm2d and every stage trained, for backbones trained from scratch,
    # where frozen statistics would be no normalisation at all.
    backbone_norm: str = "frozen"
    # Channels of the ResNet's stem and first stage, each later stage doubling them: torchvision's
    # (and every pretrained) ResNet has 64; a narrower one trains from scratch in a fraction of the time.
    backbone_width: int = 64
    position_embedding: str = "sine"  # "sine" or "learned"
    num_feature_levels: int = 4
    d_model: int = 256
    num_heads: int = 8
    encoder_layers: int = 6
    decoder_layers: int = 6
    dim_feedforward: int = 1024
    dropout: float = 0.1
    encoder_points: int = 4
    decoder_points: int = 4
    num_queries: int = 300
    with_box_refine: bool = False
    two_stage: bool = False
    num_classes: int = 91
    # Training-only improvements from later DETRs, off in the published models. None of them
    # changes the inference forward or the checkpoint (docs/design.md#training-only-options-leave-the-published-model).
    # Look forward twice (DINO): layer i's box loss also trains layer i-1's box (refinement only).
    look_forward_twice: bool = False
    # Mixed query selection (DINO, two-stage only): proposals give the queries' positions, the content
    # query is learned rather than derived from them.
    mixed_query_selection: bool = False
    # Hybrid matching (H-DETR): this many extra queries, matched one-to-many in training only.
    one_to_many_queries: int = 0
    # Denoising (DN-DETR, two-stage only): this many groups of noised ground-truth boxes, decoded in
    # training only; each query learns to restore its box and class.
    denoising_groups: int = 0
    # DN-DETR's noise: box centres move by up to half this fraction of the box's size and sides scale
    # by up to 1 +- it; this fraction of the classes is redrawn at random.
    denoising_box_noise: float = 0.4
    denoising_label_noise: float = 0.2

    def __post_init__(self) -> None:
        check_field_types(self)
        for name in ("num_feature_levels", "num_heads", "decoder_layers", "dim_feedforward", "encoder_points",
                     "decoder_points", "num_queries", "num_classes", "backbone_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("encoder_layers", "denoising_groups", "one_to_many_queries"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be 0 or more, got {getattr(self, name)}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.position_embedding not in ("sine", "learned"):
            raise ValueError(f"position_embedding must be 'sine' or 'learned', got {self.position_embedding!r}")
        if self.backbone_norm not in ("frozen", "batch"):
            raise ValueError(f"backbone_norm must be 'frozen' or 'batch', got {self.backbone_norm!r}")
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.d_model < 32 or self.d_model % 32:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of 32 (GroupNorm(32) in the input projections)")
        if self.two_stage and not self.with_box_refine:
            # The encoder's proposal heads are the refinement heads' extra entry; the reference
            # implementation cannot run this combination either.
            raise ValueError("two_stage requires with_box_refine (as in the released two-stage model)")
        if self.num_feature_levels == 2:
            # Multi-scale takes layer2-4 (three levels) and adds strided levels beyond them.
            raise ValueError("num_feature_levels must be 1 (layer4 only) or at least 3 (layer2-4, then extra levels)")
        if self.look_forward_twice and not self.with_box_refine:
            raise ValueError("look_forward_twice requires with_box_refine (it trains the refinement of earlier layers)")
        if self.mixed_query_selection and not self.two_stage:
            raise ValueError("mixed_query_selection requires two_stage (it selects positions from the proposals)")
        if not 0 <= self.denoising_box_noise < 1:  # at 1 a side could shrink to nothing
            raise ValueError(f"denoising_box_noise must be in [0, 1), got {self.denoising_box_noise}")
        if not 0 <= self.denoising_label_noise <= 1:
            raise ValueError(f"denoising_label_noise must be in [0, 1], got {self.denoising_label_noise}")
        if self.denoising_groups and not self.two_stage:
            raise ValueError("denoising_groups requires two_stage (its queries' positions come from boxes, as proposals' do)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields: {', '.join(unknown)}")
        return cls(**values)


def check_field_types(config: Any) -> None:
    """Give each field of the dataclass ``config`` its declared type, or raise ValueError naming the
    first that cannot have it. A config read from a file (a checkpoint, a transformers config.json)
    may hold anything, and a wrong type would fail deep in the code that uses it (a string compared
    with a number). A path becomes its str and a numpy number a Python one: what checkpoints store
    stays plain."""
    for field, expected in typing.get_type_hints(type(config)).items():
        value = _as_type(getattr(config, field), expected)
        if value is _MISMATCH:
            # A union's str is its name ("str | None"); a class's would be "<class 'int'>".
            raise ValueError(f"config field {field} is {reprlib.repr(getattr(config, field))}; expected "
                             f"{getattr(expected, '__name__', expected)}")
        setattr(config, field, value)


_MISMATCH = object()


def _as_type(value: Any, annotation: Any) -> Any:
    """``value`` as ``annotation``'s type, or ``_MISMATCH``."""
    if isinstance(annotation, types.UnionType):
        converted = (_as_type(value, member) for member in typing.get_args(annotation))
        return next((member for member in converted if member is not _MISMATCH), _MISMATCH)
    if annotation is Any or (annotation is type(None) and value is None):
        return value
    if isinstance(value, bool):  # a bool is an int to Python, not to a config
        return value if annotation is bool else _MISMATCH
    if annotation is int:
        return int(value) if is_whole_number(value) else _MISMATCH
    if annotation is float:  # a whole number will do, as in type hints
        return float(value) if isinstance(value, numbers.Real) else _MISMATCH
    if annotation is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    return value if isinstance(value, typing.get_origin(annotation) or annotation) else _MISMATCH


# The ModelConfig fields of the training-only options (ModelConfig's comments): a run's choices, which
# leave the published model as it is.
TRAINING_OPTIONS = ("look_forward_twice", "mixed_query_selection", "one_to_many_queries", "denoising_groups",
                    "denoising_box_noise", "denoising_label_noise")


PRESETS: dict[str, ModelConfig] = {
    "r50": ModelConfig(),
    "r50_single_scale": ModelConfig(num_feature_levels=1),
    "r50_single_scale_dc5": ModelConfig(num_feature_levels=1, dilation=True),
    "r50_box_refine": ModelConfig(with_box_refine=True),
    # Released as "++ two-stage": iterative box refinement plus two-stage.
    "r50_two_stage": ModelConfig(with_box_refine=True, two_stage=True),
    # Small enough to train on a laptop CPU; used by the tests and the demo.
    # Sized for the demo (docs/performance.md#the-demos-model): three eighths of ResNet-18's channels,
    # trained from scratch, learn about as much per epoch as half of them in 14 % less time a step;
    # two encoder layers with narrow feed-forward layers, as the encoder's work grows with the pixels.
    "tiny": ModelConfig(
        backbone="resnet18",
        backbone_width=24,
        d_model=128,
        encoder_layers=2,
        decoder_layers=3,
        dim_feedforward=256,
        num_queries=50,
        with_box_refine=True,
    ),
}


def get_config(preset_or_config: str | ModelConfig, **overrides: Any) -> ModelConfig:
    """A copy of a preset (by name) or of a config, with ``overrides`` applied."""
    if isinstance(preset_or_config, ModelConfig):
        base = preset_or_config
    elif preset_or_config in PRESETS:
        base = PRESETS[preset_or_config]
    else:
        raise ValueError(f"unknown preset {preset_or_config!r}; choose from {', '.join(PRESETS)}")
    return dataclasses.replace(base, **overrides)


def preset_of(config: ModelConfig) -> str | None:
    """The preset whose architecture ``config`` has (in every field in which the presets differ), or
    None where it has none of theirs."""
    fields = [field.name for field in dataclasses.fields(ModelConfig)
              if len({getattr(preset, field.name) for preset in PRESETS.values()}) > 1]
    return next((name for name, preset in PRESETS.items()
                 if all(getattr(preset, field) == getattr(config, field) for field in fields)), None)
