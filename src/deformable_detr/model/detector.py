"""The Deformable DETR detector: backbone, input projections, transformer and prediction heads."""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, get_config
from .backbone import Joiner, build_backbone, resize_padding_mask
from .transformer import DeformableTransformer, DenoisingQueries, box_linear, clones, refine_boxes

# Prefixes of the training-only parameters: the published architecture has none of them.
TRAINING_ONLY = ("one_to_many_", "denoising_")


class MLP(nn.Module):
    """Linear layers with ReLU between them."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int) -> None:
        super().__init__()
        dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Linear(n, k) for n, k in zip(dims, dims[1:] + [output_dim]))

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers[:-1]:
            x = F.relu(layer(x))
        return self.output(x)

    def output(self, x: Tensor) -> Tensor:
        """The last layer, without an activation."""
        return self.layers[-1](x)


class BoxHead(MLP):
    """The box head: an MLP whose last layer, which gives the box coordinates, computes in at least
    float32 under autocast (:func:`~.transformer.box_linear`)."""

    def output(self, x: Tensor) -> Tensor:
        return box_linear(self.layers[-1], x)


def pad_images(images: Sequence[Tensor], *, multiple: int = 1) -> tuple[Tensor, Tensor]:
    """Pad (3, H, W) images at the bottom and right to one batch, its height and width rounded up to
    ``multiple``; mask True on the padding."""
    if multiple < 1:
        raise ValueError(f"multiple must be a positive integer, got {multiple}")
    height = math.ceil(max(image.shape[-2] for image in images) / multiple) * multiple
    width = math.ceil(max(image.shape[-1] for image in images) / multiple) * multiple
    first = images[0]
    batch = first.new_zeros((len(images), first.shape[0], height, width))
    padding_mask = torch.ones((len(images), height, width), dtype=torch.bool, device=first.device)
    for index, image in enumerate(images):
        batch[index, :, : image.shape[-2], : image.shape[-1]].copy_(image)
        padding_mask[index, : image.shape[-2], : image.shape[-1]] = False
    return batch, padding_mask


@contextlib.contextmanager
def evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block, back in the mode it was in afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _check_image_list(images: object) -> None:
    """Raise TypeError unless ``images`` is a non-empty sequence of tensors: padding fails on
    anything else (a numpy array, an empty list) on what it lacks."""
    if isinstance(images, Sequence) and images:
        not_tensor = next((type(image).__name__ for image in images if not isinstance(image, Tensor)), None)
        if not_tensor is None:
            return
        found = f"{type(images).__name__} of {not_tensor}"
    else:
        found = f"empty {type(images).__name__}" if isinstance(images, Sequence) else type(images).__name__
    raise TypeError(f"images must be an (N, 3, H, W) tensor or a list of (3, H, W) tensors, got {found}")


def _check_batch(images: Tensor, padding_mask: Tensor) -> None:
    """Raise ValueError unless ``images`` is a float (N, 3, H, W) batch and ``padding_mask`` its
    (N, H, W) bool mask. Reads shapes and dtypes only, so it holds under tracing and export."""
    if images.dim() != 4 or images.shape[1] != 3 or not images.is_floating_point():
        raise ValueError(
            f"images must be a float (N, 3, H, W) batch normalised with the ImageNet mean and standard deviation, "
            f"got {str(images.dtype).removeprefix('torch.')} of shape {tuple(images.shape)} "
            "(Detector.predict takes images as they are read)"
        )
    if padding_mask.dtype != torch.bool or padding_mask.shape != (images.shape[0], *images.shape[-2:]):
        raise ValueError(
            f"padding_mask must be bool (N, H, W) = {(images.shape[0], *images.shape[-2:])} for images of shape "
            f"{tuple(images.shape)}, got {str(padding_mask.dtype).removeprefix('torch.')} of shape {tuple(padding_mask.shape)}"
        )


def check_model(model: object, *, file_reader: str = "load_pretrained") -> None:
    """Raise TypeError unless ``model`` is a DeformableDETR; for a path, the message names
    ``file_reader``, the function that reads a checkpoint file into what was expected."""
    # Anything else fails deep inside, on the config or the weights' names it lacks.
    if isinstance(model, DeformableDETR):
        return
    hint = f"; {file_reader}(path) reads a checkpoint file" if isinstance(model, (str, os.PathLike)) else ""
    raise TypeError(f"model is a {type(model).__name__}; expected a DeformableDETR (from build_model or load_pretrained){hint}")


def _input_projection(in_channels: int, d_model: int, *, kernel_size: int = 1, stride: int = 1) -> nn.Sequential:
    conv = nn.Conv2d(in_channels, d_model, kernel_size, stride=stride, padding=kernel_size // 2)
    nn.init.xavier_uniform_(conv.weight, gain=1)
    nn.init.zeros_(conv.bias)
    return nn.Sequential(conv, nn.GroupNorm(32, d_model))


class DeformableDETR(nn.Module):
    """Deformable DETR (Zhu et al., ICLR 2021); the state dict uses the reference checkpoint names.

    Build it with :func:`build_model`. ``forward`` takes images normalised with the ImageNet mean
    and standard deviation.
    """

    def __init__(self, config: ModelConfig, backbone: Joiner, transformer: DeformableTransformer) -> None:
        super().__init__()
        self.config = config
        d_model = config.d_model
        num_predictions = config.decoder_layers + (1 if config.two_stage else 0)

        # Registration order below is the reference state-dict order: transformer, heads, queries,
        # input projections, backbone.
        self.transformer = transformer

        class_head = nn.Linear(d_model, config.num_classes)
        prior_probability = 0.01
        nn.init.constant_(class_head.bias, -math.log((1 - prior_probability) / prior_probability))
        box_head = BoxHead(d_model, d_model, 4, 3)
        nn.init.zeros_(box_head.layers[-1].weight)
        nn.init.zeros_(box_head.layers[-1].bias)
        # The initial box size is sigmoid(-2) ~ 0.12 of the image, unless two-stage proposals set it.
        nn.init.constant_(box_head.layers[-1].bias[2:], -2.0)
        if config.with_box_refine:
            self.class_embed = clones(class_head, num_predictions)
            self.bbox_embed = clones(box_head, num_predictions)
            for head in self.bbox_embed[1:]:
                nn.init.zeros_(head.layers[-1].bias)
            transformer.decoder.bbox_embed = self.bbox_embed
        else:
            # One head shared by every decoder layer, listed once per layer as in the reference.
            self.class_embed = nn.ModuleList([class_head] * num_predictions)
            self.bbox_embed = nn.ModuleList([box_head] * num_predictions)
        if config.two_stage:
            transformer.decoder.class_embed = self.class_embed
            for head in self.bbox_embed:
                nn.init.zeros_(head.layers[-1].bias)
        else:
            self.query_embed = nn.Embedding(config.num_queries, d_model * 2)
            if config.one_to_many_queries:
                # Training only (hybrid matching): inference runs query_embed alone, and the reference
                # layout leaves this out (inference_state_dict).
                self.one_to_many_query_embed = nn.Embedding(config.one_to_many_queries, d_model * 2)
        if config.denoising_groups:
            # Training only (denoising): the content of a query made from a noised target box.
            self.denoising_label_embed = nn.Embedding(config.num_classes, d_model)

        channels = backbone.num_channels
        projections = [_input_projection(c, d_model) for c in channels]
        for level in range(len(channels), config.num_feature_levels):
            # Extra levels: stride-2 3x3 convolutions, the first on the last backbone map.
            in_channels = channels[-1] if level == len(channels) else d_model
            projections.append(_input_projection(in_channels, d_model, kernel_size=3, stride=2))
        # Channels-last like the backbone's outputs they take (see Backbone).
        self.input_proj = nn.ModuleList(projections).to(memory_format=torch.channels_last)
        self.backbone = backbone

    def forward(
        self,
        images: Tensor | Sequence[Tensor],
        padding_mask: Tensor | None = None,
        *,
        targets: Sequence[dict[str, Tensor]] | None = None,
    ) -> dict[str, Any]:
        """
        Args:
            images: (N, 3, H, W), or a list of (3, H, W) images of any sizes (padded here).
            padding_mask: (N, H, W) bool, True on padding; None means no padding.
            targets: per image ``labels`` and ``boxes`` (normalised cx, cy, w, h), which denoising
                queries are made from in training; ignored otherwise.

        Returns:
            ``pred_logits`` (N, Q, C), ``pred_boxes`` (N, Q, 4) normalised (cx, cy, w, h),
            ``aux_outputs``: the same for every earlier decoder layer, in two-stage mode
            ``enc_outputs``: the encoder's class logits and proposal boxes for every position, and
            in training with hybrid matching ``one_to_many``: the extra query group's predictions
            (``pred_logits``, ``pred_boxes``, ``aux_outputs``), and with denoising ``denoising``: the
            same for the denoising queries, with ``groups``, their number (the queries of group g
            restore the targets of each image in order, from query g * D / groups on).
        """
        if not isinstance(images, Tensor):
            _check_image_list(images)
            if padding_mask is not None:
                raise ValueError("padding_mask must be None when images is a list; the list is padded here")
            images, padding_mask = pad_images(images)
        if padding_mask is None:
            padding_mask = torch.zeros((images.shape[0], *images.shape[-2:]), dtype=torch.bool, device=images.device)
        _check_batch(images, padding_mask)

        features, positions = self.backbone(images, padding_mask)
        sources = [projection(feature) for projection, (feature, _) in zip(self.input_proj, features)]
        masks = [mask for _, mask in features]
        for level in range(len(features), self.config.num_feature_levels):
            source = self.input_proj[level](features[-1][0] if level == len(features) else sources[-1])
            mask = resize_padding_mask(padding_mask, source.shape[-2:])
            sources.append(source)
            masks.append(mask)
            positions.append(self.backbone[1](mask))

        # The one-to-many group of hybrid matching runs in training only.
        one_to_many = self.config.one_to_many_queries if self.training else 0
        query_embed = None
        if not self.config.two_stage:
            query_embed = self.query_embed.weight
            if one_to_many:
                query_embed = torch.cat([query_embed, self.one_to_many_query_embed.weight])
        denoising = None
        if self.training and self.config.denoising_groups and targets is not None:
            denoising = self._denoising_queries(targets, images.device)
        hs, initial_reference, references, encoder_logits, encoder_coords, query_groups = self.transformer(
            sources, masks, positions, query_embed, one_to_many_queries=one_to_many, denoising=denoising
        )

        predictions = []
        for layer, output in enumerate(hs):
            reference = initial_reference if layer == 0 else references[layer - 1]
            box = refine_boxes(self.bbox_embed[layer](output), reference)
            predictions.append({"pred_logits": self.class_embed[layer](output), "pred_boxes": box})

        one_to_one, matched = query_groups.one_to_one, query_groups.one_to_one + query_groups.one_to_many
        outputs = _layer_outputs([_queries(p, slice(None, one_to_one)) for p in predictions])
        if one_to_many:
            outputs["one_to_many"] = _layer_outputs([_queries(p, slice(one_to_one, matched)) for p in predictions])
        if denoising is not None:
            outputs["denoising"] = {
                **_layer_outputs([_queries(p, slice(matched, None)) for p in predictions]), "groups": denoising.groups
            }
        if self.config.two_stage:
            outputs["enc_outputs"] = {"pred_logits": encoder_logits, "pred_boxes": encoder_coords.sigmoid()}
        return outputs

    def inference_state_dict(self) -> dict[str, Tensor]:
        """The state dict without training-only tensors: the published architecture's entries."""
        return {name: tensor for name, tensor in self.state_dict().items() if not name.startswith(TRAINING_ONLY)}

    def _denoising_queries(self, targets: Sequence[dict[str, Tensor]], device: torch.device) -> DenoisingQueries:
        """``denoising_groups`` groups of every image's targets, noised (``denoising_box_noise``,
        ``denoising_label_noise``). Groups are as long as the batch's longest target list; shorter
        lists are padded with boxes that only the class loss sees, as background. A batch without targets still gets one padding query a
        group, so that every parameter takes part in every step (DistributedDataParallel needs that)."""
        longest = max(1, *(len(target["labels"]) for target in targets))
        groups = self.config.denoising_groups
        boxes = torch.full((len(targets), longest, 4), 0.5, device=device)
        labels = torch.zeros((len(targets), longest), dtype=torch.int64, device=device)
        for index, target in enumerate(targets):
            boxes[index, : len(target["boxes"])] = target["boxes"]
            labels[index, : len(target["labels"])] = target["labels"]
        boxes, labels = boxes.repeat(1, groups, 1), labels.repeat(1, groups)
        size, box_noise = boxes[..., 2:], self.config.denoising_box_noise
        centre = boxes[..., :2] + (torch.rand_like(size) * 2 - 1) * size * box_noise / 2
        size = size * (1 + (torch.rand_like(size) * 2 - 1) * box_noise)
        redrawn = torch.rand(labels.shape, device=device) < self.config.denoising_label_noise
        labels = torch.where(redrawn, torch.randint_like(labels, self.config.num_classes), labels)
        noised = torch.cat([centre.clamp(0, 1), size.clamp(1e-3, 1)], -1)
        return DenoisingQueries(noised, self.denoising_label_embed(labels), groups)


def _queries(prediction: dict[str, Tensor], queries: slice) -> dict[str, Tensor]:
    return {key: value[:, queries] for key, value in prediction.items()}


def _layer_outputs(predictions: list[dict[str, Tensor]]) -> dict[str, Any]:
    """The last decoder layer's predictions, with the earlier layers' as ``aux_outputs``."""
    return {**predictions[-1], "aux_outputs": predictions[:-1]}


def build_model(config: str | ModelConfig = "r50", *, num_classes: int | None = None, **overrides: Any) -> DeformableDETR:
    """Build a Deformable DETR from a preset name (see ``PRESETS``) or a :class:`ModelConfig`.

    ``num_classes`` and any other ``ModelConfig`` field given as a keyword override the preset.
    With no ``num_classes`` the config's own (91 for the presets, as COCO) is kept.
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = get_config(config, **overrides)
    backbone = build_backbone(
        config.backbone,
        d_model=config.d_model,
        weights=config.backbone_weights,
        dilation=config.dilation,
        train_backbone=config.train_backbone,
        multi_scale=config.num_feature_levels > 1,
        position_embedding=config.position_embedding,
        norm=config.backbone_norm,
        width=config.backbone_width,
    )
    transformer = DeformableTransformer(
        d_model=config.d_model,
        num_heads=config.num_heads,
        encoder_layers=config.encoder_layers,
        decoder_layers=config.decoder_layers,
        dim_feedforward=config.dim_feedforward,
        dropout=config.dropout,
        num_feature_levels=config.num_feature_levels,
        encoder_points=config.encoder_points,
        decoder_points=config.decoder_points,
        two_stage=config.two_stage,
        num_queries=config.num_queries,
        mixed_query_selection=config.mixed_query_selection,
        look_forward_twice=config.look_forward_twice,
    )
    return DeformableDETR(config, backbone, transformer)
