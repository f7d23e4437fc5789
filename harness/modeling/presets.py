"""torchvision's own detectors, rebuilt from torchvision's building blocks (``detector.preset``).

A preset builds exactly the model of one of torchvision's detection builders -- the same
modules, parameter names and shapes, anchors, samplers, NMS and score thresholds, image
normalisation -- so torchvision's COCO checkpoints load into it with ``strict=True``, and with
the same weights it gives the same detections and losses:

* ``torchvision_v1`` + faster_rcnn: ``fasterrcnn_resnet50_fpn`` (Faster R-CNN + FPN P2-P6, a
  one-conv RPN head, the two-fc box head); with ``backbone: mobilenet_v3``:
  ``fasterrcnn_mobilenet_v3_large_fpn`` (two levels plus pool, 15 anchors per location, RPN score
  threshold 0.05).
* ``torchvision_v1`` + retinanet: ``retinanet_resnet50_fpn`` (P3-P7 with P6/P7 from P5, a head
  without normalisation, L1 box loss).
* ``torchvision_v2`` + faster_rcnn: ``fasterrcnn_resnet50_fpn_v2`` (Li et al. 2021: BN in the FPN,
  a two-conv RPN head, a four-conv + one-fc box head with BN).
* ``torchvision_v2`` + retinanet: ``retinanet_resnet50_fpn_v2`` (P6/P7 from C5, GroupNorm(32) in the
  head, GIoU box loss).

``backbone`` may also be resnet18/34/101 under the ResNet recipes (same structure: the
extractor reads the channel counts from the network; v2 RetinaNet's P6 takes C5's channels);
any other combination is a :class:`~harness.core.errors.ConfigError` on ``detector.preset``.

What the spec controls under a preset, and what it does not:

* ``backbone``, ``backbone_weights`` (a classification checkpoint loaded into the whole
  classifier before its stages are extracted, as torchvision loads ``weights_backbone``),
  ``norm`` (the backbone's normalisation only: :attr:`DetectorSpec.norm_kind`, i.e. frozen BN
  when pretrained under v1, BN under v2, or the explicit value), ``trainable_layers``
  (torchvision's meaning, applied by torchvision's extractor), ``min_size`` / ``max_size``
  (800 / 1333 unless set; a list is multi-scale training, torchvision's transform picks one per
  batch and uses the last at test time) and ``detections_per_img`` (unset: torchvision's
  defaults, 100 for Faster R-CNN and 300 for RetinaNet: :meth:`DetectorSpec.max_detections`). MobileNetV3 has 6 stages in
  torchvision's count, so unset ``trainable_layers`` without pretrained weights means 6 (all, as
  the ``weights=None`` builder); an explicit value is passed as given.
* ``fpn_width``, ``neck``, ``neck_config``, ``rpn_batch_size_per_image``,
  ``box_batch_size_per_image``, ``retina_fg_iou`` and ``retina_bg_iou`` do **not** apply: the
  FPN is torchvision's (256 channels), and every other setting is the builder's default (RPN
  256 / RoI 512 samples per image, 2000/1000 proposals, the 0.5/0.4 RetinaNet matcher, ...).
  The normalisation of the FPN and heads is the recipe's (none in v1; BN in the v2 Faster R-CNN
  FPN and box head, GroupNorm(32) in the v2 RetinaNet head), whatever ``norm`` says.

Why we compose instead of calling torchvision's builders: with ``weights=None`` and no
``weights_backbone`` (nothing is ever downloaded here; a backbone checkpoint comes from a local
file), the builders force plain BN and all layers trainable (``_validate_trainable_layers``
ignores ``trainable_backbone_layers`` and the v1 builders pick FrozenBatchNorm2d only when they
load weights themselves). Loading the ImageNet weights ourselves therefore needs the recipe's
modules built with our own norm layer and freezing, which is what this module does -- with
torchvision's private helpers (``_resnet_fpn_extractor``, ``_mobilenet_extractor``, the
``_default_anchorgen`` of each file), so a torchvision upgrade that changes a recipe shows up in
``tests/test_presets.py`` as a difference from the builder, not as a silent drift.
"""
from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import mobilenet_v3_large, resnet
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead
from torchvision.models.detection.faster_rcnn import _default_anchorgen as _rcnn_anchorgen
from torchvision.models.detection.retinanet import RetinaNetHead
from torchvision.models.detection.retinanet import _default_anchorgen as _retina_anchorgen
from torchvision.models.detection.rpn import RPNHead
from torchvision.ops.feature_pyramid_network import LastLevelP6P7

from harness.config import DetectorSpec
from harness.core import ConfigError
from harness.modeling.backbones import norm_layer, trainable_stages
from harness.modeling.weights import load_backbone_weights

RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101")

#: (preset, arch) -> the backbones it takes; the first is torchvision's own model.
COMBINATIONS: dict[tuple[str, str], tuple[str, ...]] = {
    ("torchvision_v1", "faster_rcnn"): RESNETS + ("mobilenet_v3",),
    ("torchvision_v1", "retinanet"): RESNETS,
    ("torchvision_v2", "faster_rcnn"): RESNETS,
    ("torchvision_v2", "retinanet"): RESNETS,
}

#: The torchvision builder each (preset, arch, backbone) reproduces exactly (other ResNets: the same recipe).
TORCHVISION_MODELS: dict[tuple[str, str, str], str] = {
    ("torchvision_v1", "faster_rcnn", "resnet50"): "fasterrcnn_resnet50_fpn",
    ("torchvision_v1", "faster_rcnn", "mobilenet_v3"): "fasterrcnn_mobilenet_v3_large_fpn",
    ("torchvision_v1", "retinanet", "resnet50"): "retinanet_resnet50_fpn",
    ("torchvision_v2", "faster_rcnn", "resnet50"): "fasterrcnn_resnet50_fpn_v2",
    ("torchvision_v2", "retinanet", "resnet50"): "retinanet_resnet50_fpn_v2",
}

MOBILENET_STAGES = 6  # _mobilenet_extractor's stages of MobileNetV3-Large (its "all trainable")


def allowed_combinations() -> str:
    """The valid presets in words, for error messages and docs."""
    return "; ".join(f"{preset} + {arch} with {'/'.join(bbs)}" for (preset, arch), bbs in COMBINATIONS.items())


def check_preset(spec: DetectorSpec, arch: str) -> None:
    """A :class:`ConfigError` on ``detector.preset`` unless torchvision has this recipe."""
    backbones = COMBINATIONS.get((spec.preset, arch), ())
    if spec.backbone not in backbones:
        raise ConfigError(f"torchvision has no {spec.preset} {arch} with a {spec.backbone} backbone; the presets "
                          f"are: {allowed_combinations()}", field="detector.preset")


def _classifier(spec: DetectorSpec) -> nn.Module:
    """The whole classification network with the spec's norm, its local weights loaded (before extraction)."""
    norm = norm_layer(spec.norm_kind)
    if spec.backbone == "mobilenet_v3":
        net = mobilenet_v3_large(weights=None, norm_layer=norm)
    else:
        net = getattr(resnet, spec.backbone)(weights=None, norm_layer=norm)
    if spec.backbone_weights:
        load_backbone_weights(net, spec.backbone_weights)
    return net


def build_preset(spec: DetectorSpec, num_classes: int, arch: str) -> nn.Module:
    """torchvision's detector of ``spec.preset`` for ``num_classes`` foreground classes (K + 1 outputs)."""
    check_preset(spec, arch)
    net = _classifier(spec)
    trainable = trainable_stages(spec)
    classes = num_classes + 1  # + background: 90 COCO categories -> torchvision's 91
    sizes = dict(min_size=spec.min_sizes, max_size=spec.resize_max)
    v2 = spec.preset == "torchvision_v2"
    if arch == "faster_rcnn" and spec.backbone == "mobilenet_v3":  # fasterrcnn_mobilenet_v3_large_fpn
        backbone = _mobilenet_extractor(net, True, trainable)
        anchor_sizes = ((32, 64, 128, 256, 512),) * 3
        anchors = AnchorGenerator(anchor_sizes, ((0.5, 1.0, 2.0),) * len(anchor_sizes))
        return FasterRCNN(backbone, classes, rpn_anchor_generator=anchors, rpn_score_thresh=0.05,
                          box_detections_per_img=spec.max_detections(arch), **sizes)
    if arch == "faster_rcnn" and not v2:  # fasterrcnn_resnet50_fpn
        backbone = _resnet_fpn_extractor(net, trainable)
        return FasterRCNN(backbone, classes, box_detections_per_img=spec.max_detections(arch), **sizes)
    if arch == "faster_rcnn":  # fasterrcnn_resnet50_fpn_v2
        backbone = _resnet_fpn_extractor(net, trainable, norm_layer=nn.BatchNorm2d)
        anchors = _rcnn_anchorgen()
        rpn_head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0], conv_depth=2)
        box_head = FastRCNNConvFCHead((backbone.out_channels, 7, 7), [256, 256, 256, 256], [1024],
                                      norm_layer=nn.BatchNorm2d)
        return FasterRCNN(backbone, classes, rpn_anchor_generator=anchors, rpn_head=rpn_head, box_head=box_head,
                          box_detections_per_img=spec.max_detections(arch), **sizes)
    if not v2:  # retinanet_resnet50_fpn: P6 from P5 (LastLevelP6P7(256, 256)), torchvision's default head
        backbone = _resnet_fpn_extractor(net, trainable, returned_layers=[2, 3, 4],
                                         extra_blocks=LastLevelP6P7(256, 256))
        return RetinaNet(backbone, classes, detections_per_img=spec.max_detections(arch), **sizes)
    # retinanet_resnet50_fpn_v2: P6 from C5 (its channels: 2048 for ResNet-50), GN head, GIoU box loss
    c5 = net.inplanes  # the last stage's output channels (ResNet's running counter ends there)
    backbone = _resnet_fpn_extractor(net, trainable, returned_layers=[2, 3, 4], extra_blocks=LastLevelP6P7(c5, 256))
    anchors = _retina_anchorgen()
    head = RetinaNetHead(backbone.out_channels, anchors.num_anchors_per_location()[0], classes,
                         norm_layer=partial(nn.GroupNorm, 32))
    head.regression_head._loss_type = "giou"
    return RetinaNet(backbone, classes, anchor_generator=anchors, head=head,
                     detections_per_img=spec.max_detections(arch), **sizes)


__all__ = ["build_preset", "check_preset", "allowed_combinations", "COMBINATIONS", "TORCHVISION_MODELS"]
