"""Backbone networks shared by the methods, all built with timm's keywords (`num_classes`, `in_chans`).

`create_backbone(name, num_classes, in_chans, **kwargs)` returns
- ``small_cnn``: three conv blocks (32-64-128 channels) and a linear head; the fast CPU default on digits;
- ``dense``: deep CAMA's discriminative MNIST DNN (dense 512-256-126-512 with dropout), takes ``img_size``;
- ``resnet18_cifar`` / ``preact_resnet18_cifar``: timm's ResNet-18 / pre-activation ResNet-18 with the CIFAR stem
  (one 3×3 stride-1 convolution, no max-pool), the classifiers of the purification and poisoning papers;
- any other name: ``timm.create_model(name, pretrained=False, ...)`` (weights come from a path, never a download).
"""
from __future__ import annotations

from typing import Sequence

import timm
import torch
from timm.layers import create_act_layer, get_act_layer
from torch import nn

from lit_robust.storage.serialization import load_plain


class SmallCNN(nn.Module):
    """Three conv-BN-activation blocks with 2× max-pooling, global average pooling and a linear classifier.

    ``act_layer`` is any name timm's ``get_act_layer`` knows (``relu``, ``silu``, ``gelu``, ``elu``, ...): smooth
    activations give adversarial training's attacks better gradients (Xie et al. 2020, smooth adversarial training).
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, widths: tuple[int, ...] = (32, 64, 128),
                 drop_rate: float = 0.0, act_layer: str = "relu"):
        super().__init__()
        try:
            activation = get_act_layer(act_layer)
        except KeyError:
            raise ValueError(f"unknown act_layer '{act_layer}': use a name of timm's get_act_layer, e.g. relu, silu, "
                             "gelu, elu") from None
        layers: list[nn.Module] = []
        channels = in_chans
        for width in widths:
            layers += [nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       create_act_layer(activation, inplace=True),
                       nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       create_act_layer(activation, inplace=True),
                       nn.MaxPool2d(2, ceil_mode=True)]
            channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = channels
        self.head = nn.Sequential(nn.Dropout(drop_rate), nn.Linear(channels, num_classes))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


class DenseNet(nn.Module):
    """Flatten + ReLU dense layers with per-layer dropout: the discriminative DNN of deep CAMA's MNIST experiments
    (002 App. C: widths 512-256-126-512, dropout 0.25/0.25/0.25/0.5). ``img_size`` fixes the input width, or
    ``in_features`` for rows of measurements (the [64, 16, 32] DNN of §4.2)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int = 28,
                 widths: tuple[int, ...] = (512, 256, 126, 512), drop_rates: tuple[float, ...] = (0.25, 0.25, 0.25, 0.5),
                 in_features: int | None = None):
        super().__init__()
        if len(widths) != len(drop_rates):
            raise ValueError(f"widths {widths} and drop_rates {drop_rates} differ in length: give one rate per layer")
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features or in_chans * img_size * img_size
        for width, rate in zip(widths, drop_rates):
            layers += [nn.Linear(features, width), nn.ReLU(inplace=True), nn.Dropout(rate)]
            features = width
        self.net = nn.Sequential(*layers, nn.Linear(features, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _with_cifar_stem(model: nn.Module, conv_name: str, pool_name: str, in_chans: int) -> nn.Module:
    """Replace an ImageNet stem (7×7 stride 2 + max-pool) by one 3×3 stride-1 conv, as CIFAR ResNets do."""
    parent_conv, conv_attr = _resolve(model, conv_name)
    old = getattr(parent_conv, conv_attr)
    setattr(parent_conv, conv_attr, nn.Conv2d(in_chans, old.out_channels, 3, 1, 1, bias=False))
    parent_pool, pool_attr = _resolve(model, pool_name)
    setattr(parent_pool, pool_attr, nn.Identity())
    return model


def _resolve(model: nn.Module, dotted: str) -> tuple[nn.Module, str]:
    *path, attr = dotted.split(".")
    for part in path:
        model = getattr(model, part)
    return model, attr


CIFAR_STEMS = {
    "resnet18_cifar": ("resnet18", "conv1", "maxpool"),
    "preact_resnet18_cifar": ("resnetv2_18", "stem.conv", "stem.pool"),
}


def create_backbone(name: str, num_classes: int = 10, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a classifier backbone by name (see the module docstring for the names)."""
    if name == "small_cnn":
        return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name == "dense":
        return DenseNet(num_classes=num_classes, in_chans=in_chans, **kwargs)
    if name in CIFAR_STEMS:
        timm_name, conv, pool = CIFAR_STEMS[name]
        model = timm.create_model(timm_name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
        return _with_cifar_stem(model, conv, pool, in_chans)
    if name not in timm.list_models():
        raise ValueError(f"unknown backbone '{name}': use small_cnn, {', '.join(CIFAR_STEMS)} or a timm model name "
                         f"(timm.list_models())")
    return timm.create_model(name, pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)


def load_weights(model: nn.Module, path: str, strict: bool = True, keep: Sequence[str] = ()) -> nn.Module:
    """Load a state dict (or a Lightning checkpoint's ``state_dict``) from ``path``; the paper's pretrained weights
    enter this way, since nothing is downloaded at run time. A bare network takes the ``net.`` part of a lit_robust
    module's checkpoint (a source model for transfer). ``keep``: keys of ``model`` that keep their own values (a
    transfer model's new head, whose class count may differ from the source's)."""
    state = load_plain(path, "weights")
    state = state.get("state_dict", state)
    own = model.state_dict()
    if own and not any(key.startswith("net.") for key in own) and any(key.startswith("net.") for key in state):
        # a lit_robust module's checkpoint (keys under ``net.``) into a bare network: take its network
        state = {key[4:]: value for key, value in state.items() if key.startswith("net.")}
    model.load_state_dict({**state, **{key: own[key] for key in keep}}, strict=strict)
    return model
