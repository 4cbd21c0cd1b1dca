"""What a training run depends on: the one place its settings and their defaults are written."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from ..config import PRESETS, TRAINING_OPTIONS, ModelConfig, check_field_types, get_config
from ..distributed import RENDEZVOUS_TIMEOUT
from .optim import SCHEDULES

VAL_SPLIT = "val"
DEFAULT_PRESET = "tiny"  # the model of a run that starts from no checkpoint


@dataclass
class TrainConfig:
    """Everything a training run depends on; stored in its checkpoints so that ``resume`` continues it."""

    data: str  # a COCO, Pascal VOC or YOLO data set (see deformable_detr.data.formats)
    output_dir: str
    # The model (config.PRESETS), with model_overrides. None: the architecture of the finetune_from
    # checkpoint, as Hugging Face's from_pretrained and Ultralytics build a checkpoint's model, and
    # DEFAULT_PRESET without one.
    preset: str | None = None
    num_classes: int | None = None  # default: the training annotations' largest category id + 1
    epochs: int = 50
    batch_size: int = 2
    lr: float = 2e-4
    lr_backbone: float = 2e-5
    weight_decay: float = 1e-4
    # The learning-rate schedule (train.optim.SCHEDULES): "step" (the published one) drops it tenfold every
    # lr_drop_epoch epochs; "cosine" lowers it along half a cosine to min_lr_factor * lr at the last epoch;
    # "flat-cosine" holds it until lr_drop_epoch, then lowers it so.
    lr_schedule: str = "step"
    lr_drop_epoch: int = 40
    min_lr_factor: float = 0.0
    # A linear rise of the learning rate to lr over the first optimiser updates, or epochs (fractions
    # allowed): one or the other.
    warmup_steps: int = 0
    warmup_epochs: float = 0.0
    # An exponential moving average of the weights (None: none), evaluated and kept as best.pt: its
    # decay an update and its warm-up in updates, both stated for a global batch of 32 images and
    # scaled to the run's (train.ema.WeightAverage.for_batch).
    ema: float | None = None
    ema_warmup: float = 1000.0
    clip_max_norm: float = 0.1
    accumulation_steps: int = 1
    bf16: bool = False
    image_size: int = 800  # the augmentation recipe, scaled so that its largest short side is this
    # Training batches padded to a multiple of this. The recipe makes almost every batch a new
    # shape, and on the CPU the kernels oneDNN builds per shape overflow its cache
    # (docs/performance.md#training-batches). The published recipe pads to the largest image only (1).
    pad_to_multiple: int = 1
    workers: int = 2
    seed: int = 42
    train_split: str = "train"
    # The split evaluated after every epoch, which the data set must have; where it has no split of the
    # default's name, or with None, there is no validation.
    val_split: str | None = VAL_SPLIT
    format: str | None = None  # "coco", "voc" or "yolo"; detected from the files when None
    finetune_from: str | None = None  # any checkpoint load_pretrained reads; class heads follow the classes by name
    backbone_weights: str | None = None
    # A training-time budget: the run stops at the first update past it (evaluated and checkpointed
    # there), and the learning-rate schedule counts the share of it spent as that share of the epochs.
    max_minutes: float | None = None
    # Stop after this many evaluations in a row without an AP better by more than min_improvement (None: never).
    patience: int | None = None
    min_improvement: float = 0.0
    # At the end, the evaluation report of best.pt in output_dir/report (docs/report.md).
    report: bool = True
    # Continue the run whose checkpoint.pt is in output_dir: True, False (start one) or "auto" (continue
    # it if there is one, else start it: what a requeued job or a torchrun restart wants).
    resume: bool | str = False
    # checkpoint.pt is also written within epochs: every this many optimiser updates of the run,
    # and once this many minutes have passed since the last one (either, both or neither).
    checkpoint_every: int | None = None
    checkpoint_minutes: float | None = None
    # Under torchrun: how long the processes wait for each other to join before giving up, in seconds.
    rendezvous_timeout: float = RENDEZVOUS_TIMEOUT
    model_overrides: dict[str, Any] = dataclasses.field(default_factory=dict)
    # Hybrid matching (with the model option one_to_many_queries): the one-to-many group is matched
    # against every target repeated this many times, and its loss is added with this weight (H-DETR's k, lambda).
    one_to_many_repeats: int = 6
    one_to_many_weight: float = 1.0
    # The class loss's target for a matched query is its box's IoU with the target's (varifocal loss).
    iou_aware_classification: bool = False

    def __post_init__(self) -> None:
        # Caught here, before anything is written: further in, each would fail obscurely (a division
        # by zero, an empty tensor) or, worse, train something else than asked without a word.
        check_field_types(self)
        if self.preset is None and not self.finetune_from:
            self.preset = DEFAULT_PRESET
        self._check_model_overrides()
        bounds = {**dict.fromkeys(_AT_LEAST_ONE, 1), **dict.fromkeys(_NOT_NEGATIVE, 0)}
        for name, low in bounds.items():
            value = getattr(self, name)
            if value is not None and not value >= low:  # NaN fails too
                raise ValueError(f"{setting(name)} must be at least {low}, got {value}")
        for name in _ABOVE_ZERO:
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{setting(name)} must be above 0, got {value}")
        if not 0 <= self.min_lr_factor <= 1:
            raise ValueError(f"{setting('min_lr_factor')} must be within [0, 1], got {self.min_lr_factor}")
        if self.ema is not None and not 0 <= self.ema < 1:
            raise ValueError(f"{setting('ema')} is a decay in [0, 1), got {self.ema}")
        for name, choices in (("preset", tuple(PRESETS)), ("lr_schedule", SCHEDULES), ("resume", (True, False, "auto"))):
            if getattr(self, name) not in choices and not (name == "preset" and self.preset is None):  # the checkpoint's
                raise ValueError(f"{setting(name)} must be one of {', '.join(map(repr, choices))}, "
                                 f"got {getattr(self, name)!r}")
        if self.lr_schedule == "step" and self.lr_drop_epoch < 1:  # it drops every lr_drop_epoch epochs
            raise ValueError(f"{setting('lr_drop_epoch')} must be at least 1 with the step schedule, "
                             f"got {self.lr_drop_epoch}")
        if self.warmup_steps and self.warmup_epochs:
            raise ValueError(f"{setting('warmup_steps')} and {setting('warmup_epochs')} are one or the other, "
                             f"got {self.warmup_steps} and {self.warmup_epochs}")

    def _check_model_overrides(self) -> None:
        for key, value in self.model_overrides.items():
            if key in _SET_BY_THE_RUN:
                raise ValueError(f"{setting('model_overrides')} {key}={setting_value(value)}: pass "
                                 f"{setting(key, value)} instead (the run sets the model's {key})")
            if key not in MODEL_OPTIONS:
                raise ValueError(f"{setting('model_overrides')} {key}: not a model option; they are "
                                 f"{', '.join(MODEL_OPTIONS)}")

    def model_config(self, num_classes: int, checkpoint_architecture: ModelConfig | None = None) -> ModelConfig:
        """The config of the model this run trains, for ``num_classes``: the preset, or without one
        ``checkpoint_architecture`` (the finetune_from checkpoint's config, or a resumed run's own)
        without its training-only options, with ``model_overrides``, which hold this run's.

        As torchvision's builders choose the batch norm from whether weights are given, so does this:
        a backbone that starts from no weights (neither ``backbone_weights`` nor ``finetune_from``)
        gets trainable batch norm, since frozen batch norm would hold random statistics, i.e. no
        normalisation at all. ``build_model`` cannot choose so itself, because a checkpoint's model
        is built without weights and only then loaded.
        """
        if self.preset is not None:
            base = PRESETS[self.preset]
        elif checkpoint_architecture is not None:
            # Its training-only options were its run's choices, as this run's are its own.
            base = dataclasses.replace(checkpoint_architecture, **{name: getattr(ModelConfig, name) for name in TRAINING_OPTIONS})
        else:
            raise ValueError("a run without a preset trains its finetune_from checkpoint's architecture, which is needed")
        from_scratch = {} if self.backbone_weights or self.finetune_from else {"backbone_norm": "batch"}
        return get_config(base, num_classes=num_classes, backbone_weights=self.backbone_weights,
                          **{**from_scratch, **self.model_overrides})


# ModelConfig fields the run sets from settings of its own, and those model_overrides may set.
_SET_BY_THE_RUN = ("num_classes", "backbone_weights")
MODEL_OPTIONS = tuple(field.name for field in dataclasses.fields(ModelConfig) if field.name not in _SET_BY_THE_RUN)


# How messages name a setting: as the TrainConfig field, for the Python API, or as the train command's
# flag while the command runs, so that each reader is told what to type.
_NAMED_AS_FLAGS: ContextVar[bool] = ContextVar("named_as_flags", default=False)
_NO_VALUE = object()
# The flags not named after their field.
_FLAGS = {"report": "--no-report", "model_overrides": "--model-option"}


@contextlib.contextmanager
def settings_named_as_flags() -> Iterator[None]:
    """Within the block, messages name settings by the train command's flags (``--batch-size 4``)."""
    token = _NAMED_AS_FLAGS.set(True)
    try:
        yield
    finally:
        _NAMED_AS_FLAGS.reset(token)


def setting(name: str, value: Any = _NO_VALUE) -> str:
    """The TrainConfig field ``name``, with ``value`` where given, as messages name it: ``batch_size=4``,
    or while the train command runs (:func:`settings_named_as_flags`) ``--batch-size 4`` (``--resume``
    for a switch's True)."""
    if not _NAMED_AS_FLAGS.get():
        return name if value is _NO_VALUE else f"{name}={setting_value(value)}"
    flag = _FLAGS.get(name, f"--{name.replace('_', '-')}")
    return flag if value is _NO_VALUE or value is True else f"{flag} {setting_value(value)}"


def setting_value(value: Any) -> str:
    """A setting's value as messages show it: as Python writes it, or as the train command's flags take it."""
    if not _NAMED_AS_FLAGS.get():
        return repr(value)
    if value is None:
        return "none"
    if isinstance(value, dict):  # model options
        return " ".join(f"{key}={option}" for key, option in value.items()) or "none"
    return str(value)


# The settings' ranges (None, where a setting allows it, is always valid).
_AT_LEAST_ONE = ("num_classes", "epochs", "batch_size", "accumulation_steps", "image_size", "pad_to_multiple",
                 "patience", "checkpoint_every", "one_to_many_repeats")
_NOT_NEGATIVE = ("seed", "lr", "lr_backbone", "weight_decay", "lr_drop_epoch", "warmup_steps", "warmup_epochs", "ema_warmup",
                 "clip_max_norm", "workers", "min_improvement", "one_to_many_weight")
_ABOVE_ZERO = ("max_minutes", "checkpoint_minutes", "rendezvous_timeout")


# What a resumed run may change: how long it runs (and when it gives up), where its files are (its
# output directory; its data, however spelt, from any working directory, or copied to another node,
# as the data must hold what it held: checkpointing.data_identity), how often it writes a checkpoint
# and how many workers load its data (each sample's augmentation follows from its index, whichever
# worker reads it), not what it trains. (The optimiser and scheduler states come from the
# checkpoint, so a new lr or lr drop would not even apply.)
RESUMABLE_FIELDS = ("epochs", "max_minutes", "patience", "min_improvement", "report", "workers", "output_dir", "data",
                    "checkpoint_every", "checkpoint_minutes", "rendezvous_timeout")
# The weights a run started from: their values are in its checkpoint, so a resumed run may find them
# elsewhere or not at all; only whether it started from any changes what it trains (TrainConfig.model_config).
STARTING_WEIGHTS = ("finetune_from", "backbone_weights")
