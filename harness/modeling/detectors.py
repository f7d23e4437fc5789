"""Detector builders on torchvision: Faster R-CNN and RetinaNet with an FPN.

Everything is built from scratch (``weights=None``): this harness never
downloads weights. A local checkpoint can initialise any detector
(``torch.load(weights_only=True)``). The image transform is pinned to the
suite's image size (torchvision's default of 800 px makes CPU runs crawl), and
anchor sizes are scaled with it so small images still get anchors that fit
their objects.
"""
from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection._utils import overwrite_eps
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.retinanet import RetinaNetHead

from harness.config import DetectorSpec
from harness.core import ConfigError, Registry
from harness.modeling.backbones import build_backbone_body, norm_layer
from harness.modeling.necks import LEVELS, NECKS, build_neck
from harness.modeling.weights import load_state, resolve, zero_eps_checkpoint

log = logging.getLogger(__name__)

#: Pyramid levels, from the largest map (see docs/methods.md's notation).
FASTER_RCNN_STRIDES = LEVELS["faster_rcnn"][1]   # P2..P5 + max-pool P6
RETINANET_STRIDES = LEVELS["retinanet"][1]       # P3..P7


def base_anchor_size(image_size: int) -> int:
    """Anchor size at the largest level: 32 px at torchvision's 800 px (its absolute 32-512 px
    anchors), scaled down with the (shorter-side) image size, at least 8."""
    return max(8, round(32 * image_size / 800))


class BackboneWithNeck(nn.Module):
    """A backbone body (its stages as an ordered dict) followed by a neck (:mod:`harness.modeling.necks`).

    The neck sits under its plugin's ``module_name``: ``fpn`` for the FPN, so a detector
    with the default neck has torchvision's checkpoint keys (``backbone.body.*``,
    ``backbone.fpn.*``) and loads torchvision's and earlier detbench weights.
    """

    def __init__(self, body: nn.Module, return_layers: dict[str, str], neck: nn.Module, neck_name: str,
                 out_channels: int):
        super().__init__()
        self.body = IntermediateLayerGetter(body, return_layers=return_layers)
        self.neck_name = neck_name
        self.add_module(neck_name, neck)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor):
        return getattr(self, self.neck_name)(self.body(x))


def backbone_body(spec: DetectorSpec) -> tuple[nn.Module, list[str], list[int]]:
    """The classification network's body, the names of its stages of strides 4..32 and their channels
    (:func:`harness.modeling.backbones.build_backbone_body`: the backbone's plugin in ``BACKBONES``)."""
    return build_backbone_body(spec)


def build_backbone(spec: DetectorSpec, arch: str) -> BackboneWithNeck:
    """Backbone + the spec's neck, giving the pyramid levels ``arch``'s heads expect (:data:`LEVELS`)."""
    body, layers, channels = backbone_body(spec)
    used = len(LEVELS[arch][0])  # RetinaNet starts at C3, Faster R-CNN at C2
    layers, channels = layers[-used:], channels[-used:]
    neck = build_neck(spec.neck, spec.neck_config, channels, spec.fpn_width, arch)
    return BackboneWithNeck(body, {name: str(i) for i, name in enumerate(layers)}, neck,
                            NECKS.get(spec.neck).module_name, spec.fpn_width)


def build_detector(spec: DetectorSpec, num_classes: int, arch: str | None = None) -> nn.Module:
    """A torchvision detector for ``num_classes`` foreground classes (labels 1..K, 0 = background).

    ``arch`` overrides ``spec.arch`` (a method plugin knows which detector it trains).
    """
    arch = arch or spec.arch or "faster_rcnn"
    if spec.preset:  # torchvision's own detector, module for module (harness.modeling.presets)
        from harness.modeling.presets import build_preset
        model = build_preset(spec, num_classes, arch)
    else:
        model = _build_scaled(spec, num_classes, arch)
    if spec.norm_kind == "frozen_bn" and not spec.preset:
        overwrite_eps(model, 0.0)
    if spec.init_checkpoint:
        load_checkpoint(model, spec.init_checkpoint)
        if spec.preset and zero_eps_checkpoint(spec.init_checkpoint):
            overwrite_eps(model, 0.0)  # as torchvision does for its legacy COCO_V1 files, and only for them
    return model


#: Detector architectures of the scaled (non-preset) build: ``arch -> factory(spec, backbone, num_classes)``,
#: ``backbone`` a :class:`BackboneWithNeck` giving the levels of :data:`LEVELS[arch] <LEVELS>`; the factory
#: returns the torchvision detector with ``num_classes + 1`` outputs (background included).
DETECTORS: Registry[Callable[[DetectorSpec, BackboneWithNeck, int], nn.Module]] = Registry("detector arch")

#: The loss term through which each arch learns its classes (what a method's broken variant switches
#: off: :meth:`harness.plugin.Method.main_loss_term`). An arch registers its term with its factory.
CLASSIFICATION_TERMS: dict[str, str] = {}


def _build_scaled(spec: DetectorSpec, num_classes: int, arch: str) -> nn.Module:
    """detbench's detector for small images: anchors scaled with the image size, any neck, GN head."""
    factory = DETECTORS.get(arch, field="detector.arch")
    return factory(spec, build_backbone(spec, arch), num_classes)


def _sizes(spec: DetectorSpec) -> dict:
    return dict(min_size=spec.min_sizes, max_size=spec.resize_max)


def build_faster_rcnn(spec: DetectorSpec, backbone: BackboneWithNeck, num_classes: int) -> FasterRCNN:
    """Faster R-CNN, one anchor size per level (P2..P6) from :func:`base_anchor_size`, three ratios."""
    s = base_anchor_size(max(spec.min_sizes))
    anchors = AnchorGenerator(tuple((s * 2 ** i,) for i in range(5)), ((0.5, 1.0, 2.0),) * 5)
    return FasterRCNN(backbone, num_classes=num_classes + 1, rpn_anchor_generator=anchors,
                      rpn_batch_size_per_image=spec.rpn_batch_size_per_image,
                      box_batch_size_per_image=spec.box_batch_size_per_image,
                      rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                      rpn_pre_nms_top_n_test=500, rpn_post_nms_top_n_test=300,
                      box_detections_per_img=spec.max_detections("faster_rcnn"), **_sizes(spec))


DETECTORS.register("faster_rcnn", build_faster_rcnn)
CLASSIFICATION_TERMS["faster_rcnn"] = "loss_classifier"


def build_retinanet(spec: DetectorSpec, backbone: BackboneWithNeck, num_classes: int) -> RetinaNet:
    """RetinaNet, three scales x three ratios per level (P3..P7), a GroupNorm head."""
    s = base_anchor_size(max(spec.min_sizes))
    sizes = tuple((round(x), round(x * 2 ** (1 / 3)), round(x * 2 ** (2 / 3)))
                  for x in (s * 2 ** i for i in range(5)))
    anchors = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * 5)
    # GroupNorm in the head (as torchvision's RetinaNet v2): from scratch, the stock
    # norm-free head shrinks its signal ~6x per conv and the classifier never leaves its prior.
    head = RetinaNetHead(spec.fpn_width, anchors.num_anchors_per_location()[0], num_classes + 1,
                         norm_layer=retinanet_head_norm(spec))
    return RetinaNet(backbone, num_classes=num_classes + 1, anchor_generator=anchors, head=head,
                     fg_iou_thresh=spec.retina_fg_iou, bg_iou_thresh=spec.retina_bg_iou,
                     detections_per_img=spec.max_detections("retinanet"), **_sizes(spec))


DETECTORS.register("retinanet", build_retinanet)
CLASSIFICATION_TERMS["retinanet"] = "classification"


def detection_losses(detector: nn.Module, images, features, targets: list[dict]) -> dict[str, torch.Tensor]:
    """torchvision's own training losses of ``detector`` from FPN ``features`` already computed.

    For methods that add a feature-level term (DeFeat, FCTL): the backbone runs once
    per step and both the detection loss and the extra term see the same features.
    ``images`` / ``targets`` are the outputs of ``detector.transform``.
    """
    if isinstance(detector, FasterRCNN):
        proposals, rpn_losses = detector.rpn(images, features, targets)
        _, roi_losses = detector.roi_heads(features, proposals, images.image_sizes, targets)
        return {**roi_losses, **rpn_losses}
    feats = list(features.values())
    head_outputs = detector.head(feats)
    anchors = detector.anchor_generator(images, feats)
    return detector.compute_loss(targets, head_outputs, anchors)


def retinanet_head_norm(spec: DetectorSpec):
    """The RetinaNet head's norm: none in torchvision's v1 preset, GN(32) in v2, GN otherwise."""
    if spec.preset == "torchvision_v1":
        return None
    return partial(nn.GroupNorm, 32 if spec.preset else math.gcd(32, spec.fpn_width))


def replace_classification_head(model: nn.Module, head_cls, spec: DetectorSpec, **kwargs) -> nn.Module:
    """Install ``head_cls`` (a RetinaNetClassificationHead subclass) with the detector's own shape and norm."""
    old = model.head.classification_head
    model.head.classification_head = head_cls(old.conv[0][0].in_channels, old.num_anchors, old.num_classes,
                                              norm_layer=retinanet_head_norm(spec), **kwargs)
    return model


def load_checkpoint(model: nn.Module, path: str | Path, prefix: str = "") -> None:
    """Load matching tensors (by name and shape) into ``model``; log what did not match.

    ``path``: a local file or a ``torchvision:<Weights>.<member>`` name (:mod:`harness.modeling.weights`)."""
    path = resolve(str(path), field="detector.init_checkpoint")
    state = {k[len(prefix):]: v for k, v in load_state(path).items() if k.startswith(prefix)}
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError("no tensor of the checkpoint matches the detector", file=path)
    model.load_state_dict(usable, strict=False)
    log.info("loaded %d/%d tensors from %s (%d of the model's not in it)",
             len(usable), len(state), path, len(own) - len(usable))


def describe(spec: DetectorSpec, arch: str) -> str:
    sizes = spec.min_sizes
    size = (f"{spec.image_size}px" if sizes == (spec.image_size,) and spec.resize_max == spec.image_size
            else f"{'-'.join(map(str, sizes))}x{spec.resize_max}px")
    if spec.preset:
        return f"{arch}/{spec.backbone}/{spec.preset}/{size}/{spec.norm_kind}"
    return f"{arch}/{spec.backbone}/{spec.neck}{spec.fpn_width}/{size}/{spec.norm_kind}"


__all__ = ["build_detector", "build_backbone", "backbone_body", "BackboneWithNeck", "DETECTORS", "CLASSIFICATION_TERMS",
           "build_faster_rcnn", "build_retinanet", "load_checkpoint", "load_state", "describe",
           "replace_classification_head", "retinanet_head_norm",
           "FASTER_RCNN_STRIDES", "RETINANET_STRIDES", "norm_layer"]
