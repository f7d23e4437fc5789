"""Backbones: the classification network whose stages of strides 4..32 feed the neck.

Contract: a backbone plugin is a :class:`BackboneInfo` published under the
entry-point group ``detbench.backbones`` (the built-in ResNets and MobileNetV3
are declared in ``pyproject.toml`` like a third-party package would declare
one); a suite picks it with ``detector.backbone: NAME``, validated against
this registry.

``BackboneInfo.build(spec, norm_layer)`` returns the *whole* classification
network (``weights=None``: nothing is downloaded), normalised by
``norm_layer`` (a callable ``channels -> nn.Module``, see :func:`norm_layer`),
so that a classification checkpoint (``detector.backbone_weights``) loads into
it with its own keys (:func:`harness.modeling.weights.load_backbone_weights` drops the
``fc.*`` / ``classifier.*`` head). ``body(net)`` is the part holding the
stages (the ResNet itself, MobileNetV3's ``features``); ``stages`` names the
body's children whose outputs have strides 4, 8, 16 and 32, and ``channels``
their channels, in that order. ``freeze(body, n)`` freezes all but the last
``n`` stages as torchvision counts them for ``trainable_layers``, with
``max_trainable_layers`` = all (ResNet 5, MobileNetV3 6).

:func:`build_backbone_body` does all of it for a :class:`DetectorSpec` and
returns ``(body, stage names, channels)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Callable

from torch import nn

from harness.core import Registry
from harness.modeling.weights import freeze_mobilenet_stages, freeze_resnet_stages, load_backbone_weights

if TYPE_CHECKING:
    from harness.config import DetectorSpec


def norm_layer(kind: str):
    """BN for from-scratch training (the default here), GN for small batches, frozen BN for fine-tuning."""
    if kind == "bn":
        return nn.BatchNorm2d
    if kind == "gn":
        return lambda c: nn.GroupNorm(math.gcd(32, c), c)
    from torchvision.ops import FrozenBatchNorm2d
    return FrozenBatchNorm2d


def _whole(net: nn.Module) -> nn.Module:
    return net


@dataclass(frozen=True)
class BackboneInfo:
    """One backbone plugin; see the module docstring for the contract."""
    build: Callable[["DetectorSpec", Callable[[int], nn.Module]], nn.Module]
    stages: tuple[str, ...]
    channels: tuple[int, ...]
    max_trainable_layers: int
    freeze: Callable[[nn.Module, int], None]
    body: Callable[[nn.Module], nn.Module] = _whole


#: Backbone plugins (:class:`BackboneInfo` objects).
BACKBONES: Registry = Registry("backbone", group="detbench.backbones")


def trainable_stages(spec: "DetectorSpec") -> int:
    """Backbone stages with gradients: ``trainable_layers``, or torchvision's default (3 with pretrained
    weights, else all the backbone's stages)."""
    if spec.trainable_layers is not None:
        return spec.trainable_layers
    return 3 if spec.pretrained else BACKBONES.get(spec.backbone, field="detector.backbone").max_trainable_layers


def freeze_stages(body: nn.Module, backbone: str, trainable_layers: int) -> None:
    """Freeze all but the last ``trainable_layers`` stages of a torchvision body, as torchvision does.

    ``body``: the body of ``backbone``'s classifier (:mod:`harness.modeling.backbones`: the whole ResNet,
    or MobileNetV3's ``features``); the backbone's plugin says how its stages are counted.
    """
    BACKBONES.get(backbone, field="detector.backbone").freeze(body, trainable_layers)



def build_backbone_body(spec: "DetectorSpec") -> tuple[nn.Module, list[str], list[int]]:
    """The body of ``spec.backbone``'s classifier (its weights loaded, its stages frozen per the spec),
    the names of its stages of strides 4..32 and their channels."""
    info: BackboneInfo = BACKBONES.get(spec.backbone, field="detector.backbone")
    net = info.build(spec, norm_layer(spec.norm_kind))
    if spec.backbone_weights:
        load_backbone_weights(net, spec.backbone_weights)
    body = info.body(net)
    info.freeze(body, trainable_stages(spec))
    return body, list(info.stages), list(info.channels)


# ---------------------------------------------------------------- built-in backbones (torchvision's)

def _resnet(name: str, spec: "DetectorSpec", norm) -> nn.Module:
    from torchvision.models import resnet
    return getattr(resnet, name)(weights=None, norm_layer=norm)


def _resnet_info(name: str, expansion: int) -> BackboneInfo:
    return BackboneInfo(build=partial(_resnet, name), stages=("layer1", "layer2", "layer3", "layer4"),
                        channels=tuple(c * expansion for c in (64, 128, 256, 512)),
                        max_trainable_layers=5, freeze=freeze_resnet_stages)


RESNET18 = _resnet_info("resnet18", 1)
RESNET34 = _resnet_info("resnet34", 1)
RESNET50 = _resnet_info("resnet50", 4)     # bottleneck blocks: 4x wider outputs
RESNET101 = _resnet_info("resnet101", 4)


def _mobilenet_v3_large(spec: "DetectorSpec", norm) -> nn.Module:
    from torchvision.models import mobilenet_v3_large
    return mobilenet_v3_large(weights=None, norm_layer=norm)


def _features(net: nn.Module) -> nn.Module:
    return net.features


MOBILENET_V3 = BackboneInfo(build=_mobilenet_v3_large, stages=("3", "6", "12", "16"),  # blocks of strides 4..32
                            channels=(24, 40, 112, 960), max_trainable_layers=6,
                            freeze=freeze_mobilenet_stages, body=_features)


__all__ = ["BACKBONES", "BackboneInfo", "build_backbone_body", "norm_layer",
           "RESNET18", "RESNET34", "RESNET50", "RESNET101", "MOBILENET_V3"]
