"""Necks: the module between a backbone's stages and the detector's heads.

Contract: a neck plugin is a subclass of :class:`Neck` published under the
entry-point group ``detbench.necks`` (the built-in ``fpn`` and ``none`` are
declared in ``pyproject.toml`` like a third-party package would declare
one). A suite picks it with ``detector.neck: NAME`` and configures it with
``detector.neck_config: {...}``, validated by the neck's pydantic ``Config``.

``Neck.build(in_channels, width, arch)`` returns an ``nn.Module`` whose
``forward(features)`` takes an ordered dict of the backbone's stages, keys
``"0", "1", ...`` from the largest map (C2..C5 for ``faster_rcnn``, C3..C5 for
``retinanet``; ``in_channels`` lists their channels in that order) and returns
an ordered dict of pyramid levels, largest first, every one ``width``
channels wide: five levels of strides 4..64 for ``faster_rcnn`` and 8..128
for ``retinanet`` (see :data:`LEVELS`). A neck that cannot serve an arch
leaves it out of ``archs``; the suite is refused before anything runs.

The module must hold all of the neck's parameters and nothing else, so its
parameter count and FLOPs are the neck's cost (``detbench methods --cost``).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, ValidationError
from torch import Tensor, nn
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool, LastLevelP6P7

from harness.core import ConfigError, Registry

#: Pyramid levels each arch's heads expect: (strides of the backbone stages the neck gets,
#: strides of the levels it must return).
LEVELS = {"faster_rcnn": ((4, 8, 16, 32), (4, 8, 16, 32, 64)),
          "retinanet": ((8, 16, 32), (8, 16, 32, 64, 128))}


class NeckConfig(BaseModel):
    """Base for necks' ``Config``: unknown keys are errors, values are frozen."""
    model_config = ConfigDict(extra="forbid", frozen=True)


class Neck:
    """Base class of neck plugins; see the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[NeckConfig]] = NeckConfig
    archs: ClassVar[tuple[str, ...]] = tuple(LEVELS)
    #: The attribute of the detector's backbone holding the neck (checkpoint key prefix).
    module_name: ClassVar[str] = "neck"

    def __init__(self, config: NeckConfig | dict | None = None):
        self.config = config if isinstance(config, NeckConfig) else self.Config(**(config or {}))

    @classmethod
    def validate_config(cls, raw: dict[str, Any], *, file: str = "", prefix: tuple = ()) -> NeckConfig:
        from harness.core import format_validation_error
        try:
            return cls.Config(**raw)
        except ValidationError as err:
            raise format_validation_error(err, file, cls.Config, prefix) from None

    def build(self, in_channels: list[int], width: int, arch: str) -> nn.Module:
        raise NotImplementedError


#: Neck plugins (:class:`Neck` subclasses).
NECKS: Registry = Registry("neck", group="detbench.necks")


def build_neck(name: str, config: dict[str, Any], in_channels: list[int], width: int, arch: str) -> nn.Module:
    """The neck module ``name`` (from :data:`NECKS`) for ``arch``, configured by ``config``."""
    cls = NECKS.get(name, field="detector.neck")
    if arch not in cls.archs:
        raise ConfigError(f"neck '{name}' cannot serve a {arch} detector (it serves: {', '.join(cls.archs)})",
                          field="detector.neck")
    return cls(config).build(list(in_channels), width, arch)


def _top_block(arch: str, width: int) -> nn.Module:
    """torchvision's extra levels: max-pooled P6 (Faster R-CNN) or P6/P7 convs on P5 (RetinaNet)."""
    return LastLevelP6P7(width, width) if arch == "retinanet" else LastLevelMaxPool()


class FPNNeck(Neck):
    """torchvision's FPN (top-down pathway + lateral 1x1 + output 3x3), as torchvision builds it.

    The module is torchvision's own ``FeaturePyramidNetwork`` so that a detector with
    this neck has torchvision's module tree and checkpoint keys (``backbone.fpn.*``).
    """
    name = "fpn"
    module_name = "fpn"

    def build(self, in_channels: list[int], width: int, arch: str) -> nn.Module:
        return FeaturePyramidNetwork(in_channels, width, extra_blocks=_top_block(arch, width))


class LateralOnly(nn.Module):
    """1x1 projections of each stage to ``width``, no top-down fusion, torchvision's extra levels."""

    def __init__(self, in_channels: list[int], width: int, arch: str):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, width, 1) for c in in_channels)
        self.extra = _top_block(arch, width)

    def forward(self, features: "OrderedDict[str, Tensor]") -> "OrderedDict[str, Tensor]":
        names = list(features)
        inputs = list(features.values())
        outs = [conv(x) for conv, x in zip(self.lateral, inputs)]
        outs, names = self.extra(outs, inputs, names)
        return OrderedDict(zip(names, outs))


class NoNeck(Neck):
    """``neck: none``: the ablation without cross-level fusion (each level sees only its own stage)."""
    name = "none"

    def build(self, in_channels: list[int], width: int, arch: str) -> nn.Module:
        return LateralOnly(in_channels, width, arch)


__all__ = ["Neck", "NeckConfig", "NECKS", "build_neck", "LEVELS", "FPNNeck", "NoNeck"]
