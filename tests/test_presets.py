"""harness.modeling.presets: torchvision's five zoo detectors, rebuilt module for module.

Every comparison is against torchvision's own builder called with ``weights=None,
weights_backbone=None`` (nothing is downloaded; ``num_params`` is read from the weights
enums' metadata, which needs no file).
"""
from __future__ import annotations

import copy
import inspect
from functools import lru_cache

import pytest
import torch
from torchvision.models import mobilenet_v3_large, resnet18, resnet50
from torchvision.models.detection import (FasterRCNN, FasterRCNN_MobileNet_V3_Large_FPN_Weights,
                                          FasterRCNN_ResNet50_FPN_V2_Weights, FasterRCNN_ResNet50_FPN_Weights,
                                          RetinaNet, RetinaNet_ResNet50_FPN_V2_Weights,
                                          RetinaNet_ResNet50_FPN_Weights, fasterrcnn_mobilenet_v3_large_fpn,
                                          fasterrcnn_resnet50_fpn, fasterrcnn_resnet50_fpn_v2,
                                          retinanet_resnet50_fpn, retinanet_resnet50_fpn_v2)
from torchvision.models.detection.backbone_utils import _mobilenet_extractor, _resnet_fpn_extractor
from torchvision.ops import FrozenBatchNorm2d

from harness.config import DetectorSpec
from harness.core import ConfigError
from harness.modeling.presets import TORCHVISION_MODELS, build_preset

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


# id: (preset, arch, backbone, torchvision builder, weights enum with the metadata)
ZOO = {
    "frcnn_r50_v1": ("torchvision_v1", "faster_rcnn", "resnet50", fasterrcnn_resnet50_fpn,
                     FasterRCNN_ResNet50_FPN_Weights),
    "frcnn_mbv3_v1": ("torchvision_v1", "faster_rcnn", "mobilenet_v3", fasterrcnn_mobilenet_v3_large_fpn,
                      FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    "retina_r50_v1": ("torchvision_v1", "retinanet", "resnet50", retinanet_resnet50_fpn,
                      RetinaNet_ResNet50_FPN_Weights),
    "frcnn_r50_v2": ("torchvision_v2", "faster_rcnn", "resnet50", fasterrcnn_resnet50_fpn_v2,
                     FasterRCNN_ResNet50_FPN_V2_Weights),
    "retina_r50_v2": ("torchvision_v2", "retinanet", "resnet50", retinanet_resnet50_fpn_v2,
                      RetinaNet_ResNet50_FPN_V2_Weights),
}
NUM_PARAMS = {"frcnn_r50_v1": 41_755_286, "frcnn_mbv3_v1": 19_386_354, "retina_r50_v1": 34_014_999,
              "frcnn_r50_v2": 43_712_278, "retina_r50_v2": 38_198_935}
MIN_SIZES, MAX_SIZE = (80, 96), 128  # small inputs: multi-scale so the transform's random pick is exercised
COCO_FG = 90  # torchvision's 91 outputs = 90 foreground + background


def zoo_spec(name: str, **kw) -> DetectorSpec:
    preset, arch, backbone, _, _ = ZOO[name]
    return DetectorSpec(preset=preset, arch=arch, backbone=backbone, **kw)


def frozen_spec(name: str, **kw) -> DetectorSpec:
    """The pretrained-style configuration: frozen BN under v1, BN under v2 (as torchvision's recipes)."""
    return zoo_spec(name, norm="frozen_bn" if ZOO[name][0] == "torchvision_v1" else "bn", **kw)


def small_spec(name: str, **kw) -> DetectorSpec:
    return zoo_spec(name, min_size=list(MIN_SIZES), max_size=MAX_SIZE, **kw)


@lru_cache(maxsize=None)
def builder(name: str):
    """torchvision's model (random init, small sizes); shared: tests only read it or copy it."""
    torch.manual_seed(0)
    return ZOO[name][3](weights=None, weights_backbone=None, num_classes=COCO_FG + 1,
                        min_size=MIN_SIZES, max_size=MAX_SIZE)


@lru_cache(maxsize=None)
def pretrained_style(name: str):
    """Ours in :func:`frozen_spec`'s configuration at default sizes; shared by read-only tests."""
    return build_preset(frozen_spec(name), COCO_FG, ZOO[name][1])


def without_counters(state: dict) -> dict:
    return {k: tuple(v.shape) for k, v in state.items() if not k.endswith("num_batches_tracked")}


def anchor_generator(model):
    return model.rpn.anchor_generator if isinstance(model, FasterRCNN) else model.anchor_generator


def settings(model) -> dict:
    """Every non-learned setting of a torchvision detector: transform, anchors, samplers, NMS, thresholds."""
    t = model.transform
    out = {"transform": (t.min_size, t.max_size, t.image_mean, t.image_std, t.size_divisible, t.fixed_size),
           "anchors": (anchor_generator(model).sizes, anchor_generator(model).aspect_ratios)}
    if isinstance(model, FasterRCNN):
        rpn, roi = model.rpn, model.roi_heads
        out["rpn"] = (rpn._pre_nms_top_n, rpn._post_nms_top_n, rpn.nms_thresh, rpn.score_thresh, rpn.min_size,
                      rpn.fg_bg_sampler.batch_size_per_image, rpn.fg_bg_sampler.positive_fraction,
                      rpn.proposal_matcher.high_threshold, rpn.proposal_matcher.low_threshold,
                      rpn.proposal_matcher.allow_low_quality_matches, rpn.box_coder.weights)
        out["roi"] = (roi.score_thresh, roi.nms_thresh, roi.detections_per_img,
                      roi.fg_bg_sampler.batch_size_per_image, roi.fg_bg_sampler.positive_fraction,
                      roi.proposal_matcher.high_threshold, roi.proposal_matcher.low_threshold,
                      roi.box_coder.weights, roi.box_roi_pool.featmap_names, roi.box_roi_pool.output_size,
                      roi.box_roi_pool.sampling_ratio)
    else:
        out["retina"] = (model.score_thresh, model.nms_thresh, model.detections_per_img, model.topk_candidates,
                         model.proposal_matcher.high_threshold, model.proposal_matcher.low_threshold,
                         model.proposal_matcher.allow_low_quality_matches, model.box_coder.weights,
                         model.head.regression_head._loss_type, model.head.classification_head.num_classes)
    return out


def trainable(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def inputs():
    g = torch.Generator().manual_seed(1)
    images = [torch.rand(3, 96, 128, generator=g), torch.rand(3, 128, 96, generator=g)]
    targets = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0], [70.0, 20.0, 120.0, 90.0]]),
                "labels": torch.tensor([1, 17])},
               {"boxes": torch.tensor([[5.0, 30.0, 80.0, 110.0]]), "labels": torch.tensor([90])}]
    return images, targets


# ---------------------------------------------------------------- 1. parameter counts


@pytest.mark.parametrize("name", ZOO)
def test_num_params_match_torchvision_metadata(name):
    model = pretrained_style(name)
    expected = ZOO[name][4].COCO_V1.meta["num_params"]
    assert expected == NUM_PARAMS[name]
    assert sum(p.numel() for p in model.parameters()) == expected
    assert TORCHVISION_MODELS[ZOO[name][:3]] == ZOO[name][3].__name__


# ---------------------------------------------------------------- 2. state dicts


@pytest.mark.parametrize("name", ZOO)
def test_state_dict_equals_builder_and_loads_strict(name):
    """Both backbone norms: the recipe's pretrained one (v1 frozen BN, v2 BN) and the other one."""
    reference = builder(name).state_dict()
    other = "bn" if ZOO[name][0] == "torchvision_v1" else "frozen_bn"
    for ours in (pretrained_style(name), build_preset(small_spec(name, norm=other), COCO_FG, ZOO[name][1])):
        if any(isinstance(m, FrozenBatchNorm2d) for m in ours.backbone.body.modules()):
            assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in ours.backbone.body.modules())
            assert without_counters(ours.state_dict()) == without_counters(reference)  # FrozenBN has no counter
        else:
            assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
                   {k: tuple(v.shape) for k, v in reference.items()}
            assert list(ours.state_dict()) == list(reference)  # same modules in the same order
        ours.load_state_dict(reference, strict=True)  # values only: the cached model stays valid for the others


# ---------------------------------------------------------------- 3. same weights, same outputs


@pytest.mark.parametrize("name", ZOO)
def test_same_weights_same_detections_and_losses(name):
    theirs = copy.deepcopy(builder(name))
    # torchvision's weights=None configuration: BN, every stage trainable (unset + not pretrained = all);
    # detections unset: the builder's default (100 Faster R-CNN, 300 RetinaNet).
    ours = build_preset(small_spec(name, norm="bn"), COCO_FG, ZOO[name][1])
    ours.load_state_dict(theirs.state_dict(), strict=True)
    assert settings(ours) == settings(theirs)
    assert trainable(ours) == trainable(theirs)
    for model in (ours, theirs):  # the same test-only changes on both, after the settings were compared:
        if isinstance(model, FasterRCNN):  # random heads score ~1/91: keep every box so there is something
            model.roi_heads.score_thresh = 0.0  # to compare; fewer proposals keep the box heads fast on CPU
            model.rpn._pre_nms_top_n = dict(training=200, testing=100)
            model.rpn._post_nms_top_n = dict(training=64, testing=50)
        else:
            model.score_thresh, model.topk_candidates = 0.0, 100
    images, targets = inputs()

    outputs = []
    for model in (ours, theirs):
        model.eval()
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(model(images))
    for a, b in zip(*outputs):
        assert len(a["boxes"]) > 0
        for key in ("boxes", "scores", "labels"):
            assert torch.equal(a[key], b[key]), key

    losses = []
    for model in (ours, theirs):
        model.train()
        torch.manual_seed(0)  # the transform's size pick and the samplers draw from the global RNG
        losses.append(model(images, targets))
    assert losses[0].keys() == losses[1].keys()
    for key in losses[0]:
        assert torch.isfinite(losses[0][key]), key
        assert torch.equal(losses[0][key], losses[1][key]), key


# ---------------------------------------------------------------- 4. frozen stages


def reference_extractor(backbone: str, trainable_layers: int):
    if backbone == "mobilenet_v3":
        return _mobilenet_extractor(mobilenet_v3_large(norm_layer=FrozenBatchNorm2d), True, trainable_layers)
    net = {"resnet50": resnet50, "resnet18": resnet18}[backbone](norm_layer=FrozenBatchNorm2d)
    return _resnet_fpn_extractor(net, trainable_layers)


@pytest.mark.parametrize("name", ZOO)
def test_trainable_layers_freeze_torchvision_set(name):
    ours = build_preset(zoo_spec(name, norm="frozen_bn", trainable_layers=3), COCO_FG, ZOO[name][1])
    ref = reference_extractor(ZOO[name][2], 3)
    assert trainable(ours.backbone.body) == trainable(ref.body)
    assert {n for n, _ in ours.backbone.body.named_parameters()} == {n for n, _ in ref.body.named_parameters()}
    assert trainable(ours.backbone.body) < {n for n, _ in ours.backbone.body.named_parameters()}
    frozen = {n for n, p in ours.named_parameters() if not p.requires_grad}
    assert frozen and all(n.startswith("backbone.body.") for n in frozen)  # FPN and heads always train


@pytest.mark.parametrize("layers", [0, 5])
def test_trainable_layers_extremes(layers):
    spec = DetectorSpec(preset="torchvision_v1", backbone="resnet18", norm="frozen_bn", trainable_layers=layers)
    ours = build_preset(spec, 3, "faster_rcnn")
    assert trainable(ours.backbone.body) == trainable(reference_extractor("resnet18", layers).body)


def test_mobilenet_trainable_layers():
    """Explicit values are torchvision's (5 of 6 stages: the stem stays frozen); unset from scratch: all 6."""
    five = build_preset(zoo_spec("frcnn_mbv3_v1", norm="frozen_bn", trainable_layers=5), COCO_FG, "faster_rcnn")
    ref = reference_extractor("mobilenet_v3", 5)
    assert trainable(five.backbone.body) == trainable(ref.body)
    assert not any(n.startswith(("0.", "1.")) for n in trainable(five.backbone.body))
    unset = build_preset(zoo_spec("frcnn_mbv3_v1", norm="bn"), COCO_FG, "faster_rcnn")
    assert all(p.requires_grad for p in unset.parameters())


# ---------------------------------------------------------------- 5. defaults: sizes, anchors, settings


@pytest.mark.parametrize("name", ZOO)
def test_default_sizes_and_torchvision_settings(name):
    ours = pretrained_style(name)
    cls = FasterRCNN if ZOO[name][1] == "faster_rcnn" else RetinaNet
    defaults = inspect.signature(cls.__init__).parameters
    assert ours.transform.min_size == (800,) == (defaults["min_size"].default,)
    assert ours.transform.max_size == 1333 == defaults["max_size"].default
    theirs = builder(name)
    assert anchor_generator(ours).sizes == anchor_generator(theirs).sizes
    assert anchor_generator(ours).aspect_ratios == anchor_generator(theirs).aspect_ratios
    # everything but the sizes (ours: defaults, the cached builder: small)
    mine, ref = settings(ours), settings(theirs)
    assert mine["transform"][2:] == ref["transform"][2:]
    if cls is FasterRCNN:
        assert mine["rpn"] == ref["rpn"] and mine["roi"] == ref["roi"]
    else:
        assert ours.detections_per_img == 300  # torchvision's RetinaNet default
        assert mine["retina"] == ref["retina"]


def test_spec_sizes_and_detections_reach_the_model():
    spec = DetectorSpec(preset="torchvision_v2", backbone="resnet18", min_size=[480, 512, 544], max_size=900,
                        detections_per_img=37)
    frcnn, retina = build_preset(spec, 4, "faster_rcnn"), build_preset(spec, 4, "retinanet")
    for model in (frcnn, retina):
        assert model.transform.min_size == (480, 512, 544) and model.transform.max_size == 900
    assert frcnn.roi_heads.detections_per_img == 37 and retina.detections_per_img == 37
    assert frcnn.roi_heads.box_predictor.cls_score.out_features == 5
    assert retina.head.classification_head.num_classes == 5


# ---------------------------------------------------------------- other ResNets, local backbone weights


@pytest.mark.parametrize("preset", ["torchvision_v1", "torchvision_v2"])
@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_resnet18_recipes_train(preset, arch):
    spec = DetectorSpec(preset=preset, backbone="resnet18", min_size=96, max_size=128)
    model = build_preset(spec, 90, arch)
    if arch == "retinanet":  # v1: P6 from P5 (256 channels); v2: from C5 (ResNet-18: 512)
        assert model.backbone.fpn.extra_blocks.p6.in_channels == (256 if preset == "torchvision_v1" else 512)
        assert model.head.regression_head._loss_type == ("l1" if preset == "torchvision_v1" else "giou")
    if arch == "faster_rcnn":  # fewer RoIs: the v2 box head's four convs are slow on CPU
        model.rpn._post_nms_top_n = dict(training=64, testing=50)
    images, targets = inputs()
    torch.manual_seed(0)
    losses = model(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_backbone_weights_load_before_extraction(tmp_path):
    torch.manual_seed(3)
    net = resnet18()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-1, 1)
    torch.save(net.state_dict(), tmp_path / "r18.pth")  # with fc.*: a classification checkpoint
    spec = DetectorSpec(preset="torchvision_v1", backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth"))
    model = build_preset(spec, 5, "faster_rcnn")
    body = model.backbone.body
    assert torch.equal(body.conv1.weight, net.conv1.weight)
    assert torch.equal(body.layer4[1].conv2.weight, net.layer4[1].conv2.weight)
    assert isinstance(body.bn1, FrozenBatchNorm2d) and torch.equal(body.bn1.running_mean, net.bn1.running_mean)
    # pretrained: torchvision's defaults, frozen BN and 3 trainable stages
    assert trainable(body) == trainable(reference_extractor("resnet18", 3).body)
    v2 = build_preset(spec.model_copy(update={"preset": "torchvision_v2"}), 5, "faster_rcnn")
    assert isinstance(v2.backbone.body.bn1, torch.nn.BatchNorm2d)  # v2 trains BN
    assert torch.equal(v2.backbone.body.bn1.running_mean, net.bn1.running_mean)


# ---------------------------------------------------------------- 6. combinations torchvision has not


@pytest.mark.parametrize("preset,arch", [("torchvision_v2", "faster_rcnn"), ("torchvision_v1", "retinanet"),
                                         ("torchvision_v2", "retinanet")])
def test_bad_combination_is_a_config_error(preset, arch):
    spec = DetectorSpec(preset=preset, backbone="mobilenet_v3")
    with pytest.raises(ConfigError) as err:
        build_preset(spec, 3, arch)
    assert err.value.field == "detector.preset"
    assert "mobilenet_v3" in err.value.message and "torchvision_v1 + faster_rcnn with" in err.value.message


def test_build_detector_dispatches_to_presets():
    from harness.modeling import build_detector
    spec = DetectorSpec(preset="torchvision_v2", backbone="mobilenet_v3")
    with pytest.raises(ConfigError, match="torchvision_v2"):
        build_detector(spec, 3, "faster_rcnn")
    model = build_detector(zoo_spec("frcnn_mbv3_v1", norm="bn"), COCO_FG)
    assert without_counters(model.state_dict()) == without_counters(builder("frcnn_mbv3_v1").state_dict())
