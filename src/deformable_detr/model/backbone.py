"""ResNet backbone (frozen or trainable batch norm) returning feature maps with their padding masks."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval
from torchvision import ops
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.resnet import ResNet

from .inference import eager_inference
from .position import build_position_embedding


class FrozenBatchNorm2d(ops.FrozenBatchNorm2d):
    """torchvision's frozen batch norm (same buffers and state dict), applied in one pass.

    ``shift + x * scale`` as one ``addcmul`` allocates and writes the (large) output once instead
    of twice: at 800 x 1066 this halves the time the backbone spends outside its convolutions.
    Where no gradient is recorded it writes over ``x``, which in a ResNet is always the fresh output
    of the convolution before it, so that inference allocates no second tensor of that size (unless
    ``x`` is in a lower precision than the norm, as under autocast, whose result is the norm's).
    """

    def forward(self, x: Tensor) -> Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        in_place = x.dtype == scale.dtype and eager_inference()
        return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1), out=x if in_place else None)


# Every torchvision ResNet, ResNeXt and wide ResNet: the backbones this model is built on.
RESNETS = tuple(sorted(name for name in torchvision.models.list_models(module=torchvision.models)
                       if name.startswith(("resnet", "resnext", "wide_resnet"))))


def load_resnet(
    name: str, *, weights: str | None = None, dilation: bool = False, frozen_norm: bool = True, width: int = 64
) -> nn.Module:
    """A torchvision ResNet with frozen (or, ``frozen_norm=False``, trainable) batch norm.

    ``weights`` is None (random init), a torchvision weights name of that model ("DEFAULT",
    "IMAGENET1K_V1", ...), resolved through torchvision's weights API, or the path of a local file
    holding a torchvision ResNet state dict (.pth/.pt or .safetensors). ``width`` is the channels of
    the stem and the first stage, each later stage doubling them: torchvision's ResNets have 64, the
    only width with pretrained weights.
    """
    if name not in RESNETS:
        raise ValueError(f"unsupported backbone {name!r}: expected a torchvision ResNet: {', '.join(RESNETS)}")
    local_file = weights is not None and (Path(weights).suffix in {".pth", ".pt", ".safetensors"} or Path(weights).exists())
    state_dict = _read_state_dict(Path(weights)) if local_file else None  # a missing file is the first thing to say
    if width != 64 and weights is not None:
        raise ValueError(f"backbone weights {weights!r} are for width 64, not {width}: a narrower ResNet trains from scratch")
    if weights is not None and not local_file:
        _check_weights_name(name, weights)
    try:
        resnet = torchvision.models.get_model(
            name,
            weights=None if local_file else weights,
            norm_layer=FrozenBatchNorm2d if frozen_norm else nn.BatchNorm2d,
            replace_stride_with_dilation=[False, False, dilation],
        )
    except (URLError, ConnectionError, TimeoutError) as error:  # the download of named weights
        raise OSError(_download_failed(name, weights, error)) from error
    if state_dict is not None:
        resnet.load_state_dict(state_dict)
    if width != 64:
        _rebuild_with_width(resnet, width, dilation=dilation)
    return resnet


def _check_weights_name(name: str, weights: str) -> None:
    """Raise ValueError where ``weights`` is none of torchvision's names for ``name``'s weights
    (``IMAGENET1K_V2``, ``ResNet50_Weights.IMAGENET1K_V2``, ``DEFAULT``): torchvision's lookup fails on
    it as a bare KeyError."""
    weights_enum = torchvision.models.get_model_weights(name)
    try:
        weights_enum.verify(weights)
    except KeyError:
        names = ", ".join(["DEFAULT", *(entry.name for entry in weights_enum)])
        raise ValueError(f"backbone weights {weights!r}: no such file, nor a torchvision name of {name}'s weights: "
                         f"{names}") from None


def _download_failed(name: str, weights: str, error: OSError) -> str:
    """One line for torchvision's weights ``weights`` of ``name`` not downloaded (no internet, as on
    many cluster nodes): from where, and how to give them as a local file instead."""
    url = torchvision.models.get_model_weights(name).verify(weights).url  # any name _check_weights_name passes
    reason = getattr(error, "reason", error)
    return (f"{name} weights {weights}: the download of {url} failed ({reason}); without internet, fetch that file "
            f"elsewhere and give its path as the backbone weights (--backbone-weights {Path(url).name}), or put it "
            f"in {Path(torch.hub.get_dir()) / 'checkpoints'}")


def _rebuild_with_width(resnet: ResNet, width: int, *, dilation: bool) -> None:
    """Replace ``resnet``'s stem and stages with ones of ``width`` channels in the first stage (each
    later stage doubling them), built and initialised as torchvision builds its ResNets."""
    block = type(resnet.layer1[0])
    resnet.inplanes, resnet.dilation = width, 1
    resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
    resnet.bn1 = resnet._norm_layer(width)
    for index in range(4):
        name = f"layer{index + 1}"
        blocks = len(getattr(resnet, name))
        setattr(resnet, name, resnet._make_layer(block, width * 2**index, blocks, stride=1 if index == 0 else 2,
                                                 dilate=dilation and index == 3))
    for module in resnet.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")


def fold_batch_norms(module: nn.Module) -> nn.Module:
    """``module`` (in eval mode) with each batch norm folded into the convolution just before it, in
    place: the convolution takes the norm's scale into its weights and its shift as its bias, and the
    norm becomes an identity. Outputs are unchanged up to float rounding; the state dict is not the
    published one. torchvision's ResNets register each convolution just before its norm
    (``conv1``, ``bn1``, ...; ``downsample``'s ``0``, ``1``), the order this relies on.
    """
    for parent in module.modules():
        children = list(parent.named_children())
        for (conv_name, conv), (norm_name, norm) in zip(children, children[1:]):
            if isinstance(conv, nn.Conv2d) and isinstance(norm, (ops.FrozenBatchNorm2d, nn.BatchNorm2d)):
                setattr(parent, conv_name, fuse_conv_bn_eval(conv, norm))
                setattr(parent, norm_name, nn.Identity())
    return module


def _read_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    return torch.load(path, map_location="cpu", weights_only=True)


def _out_channels(stage: nn.Module) -> int:
    # The last convolution of a stage sets its width, for basic and bottleneck blocks alike.
    return [m for m in stage.modules() if isinstance(m, nn.Conv2d)][-1].out_channels


def resize_padding_mask(padding_mask: Tensor, size: tuple[int, int]) -> Tensor:
    """(N, H, W) padding mask resized to ``size`` (h, w) with nearest interpolation."""
    return F.interpolate(padding_mask[None].float(), size=size)[0].to(torch.bool)


class Backbone(nn.Module):
    """The ResNet trunk (``body``) returning layer2..4 (multi-scale, strides 8/16/32) or layer4 only.

    ``num_channels`` lists the channels of each returned map, read off the network.
    """

    def __init__(self, resnet: nn.Module, *, train_backbone: bool, return_interm_layers: bool, train_all_stages: bool = False) -> None:
        super().__init__()
        for name, parameter in resnet.named_parameters():
            # The stem and layer1 stay frozen, as in the reference recipe, unless trained from scratch.
            if not train_backbone or not (train_all_stages or name.startswith(("layer2", "layer3", "layer4"))):
                parameter.requires_grad_(False)
        layers = ["layer2", "layer3", "layer4"] if return_interm_layers else ["layer4"]
        self.num_channels = [_out_channels(getattr(resnet, layer)) for layer in layers]
        self.body = IntermediateLayerGetter(resnet, return_layers={layer: str(i) for i, layer in enumerate(layers)})
        # Channels-last convolutions skip oneDNN's layout conversions on the CPU, and
        # their outputs flatten into the transformer's (N, H*W, C) sequences without a copy.
        self.body.to(memory_format=torch.channels_last)

    def forward(self, images: Tensor, padding_mask: Tensor) -> list[tuple[Tensor, Tensor]]:
        """(feature map, padding mask resized to it with nearest interpolation) per returned layer."""
        outputs = []
        for feature in self.body(images.contiguous(memory_format=torch.channels_last)).values():
            outputs.append((feature, resize_padding_mask(padding_mask, feature.shape[-2:])))
        return outputs


class Joiner(nn.Sequential):
    """Backbone (index 0) and position embedding (index 1), the reference's state-dict layout."""

    def __init__(self, backbone: Backbone, position_embedding: nn.Module) -> None:
        super().__init__(backbone, position_embedding)
        self.num_channels = backbone.num_channels

    def forward(self, images: Tensor, padding_mask: Tensor) -> tuple[list[tuple[Tensor, Tensor]], list[Tensor]]:
        features = self[0](images, padding_mask)
        positions = [self[1](mask) for _, mask in features]
        return features, positions


def build_backbone(
    name: str,
    *,
    d_model: int,
    weights: str | None = None,
    dilation: bool = False,
    train_backbone: bool = True,
    multi_scale: bool = True,
    position_embedding: str = "sine",
    norm: str = "frozen",
    width: int = 64,
) -> Joiner:
    resnet = load_resnet(name, weights=weights, dilation=dilation, frozen_norm=norm == "frozen", width=width)
    backbone = Backbone(resnet, train_backbone=train_backbone, return_interm_layers=multi_scale, train_all_stages=norm == "batch")
    return Joiner(backbone, build_position_embedding(position_embedding, d_model))
