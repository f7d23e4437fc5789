"""Detector builders: image size pinned, anchors scaled, no downloads, safe checkpoint loading."""
from __future__ import annotations

import pytest
import torch

from harness.config import DetectorSpec
from harness.core import ConfigError
from harness.modeling.detectors import base_anchor_size
from harness.modeling import build_detector, load_checkpoint


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3"])
def test_build_and_transform_size(arch, backbone):
    spec = DetectorSpec(backbone=backbone, fpn_width=16, image_size=96)
    model = build_detector(spec, num_classes=4, arch=arch)
    assert model.transform.min_size == (96,) and model.transform.max_size == 96
    feats = model.backbone(torch.rand(1, 3, 96, 96))
    assert len(feats) == 5 and all(f.shape[1] == 16 for f in feats.values())
    largest = next(iter(feats.values()))
    assert largest.shape[-1] == 96 // (4 if arch == "faster_rcnn" else 8)


def test_anchor_scale():
    assert base_anchor_size(800) == 32 and base_anchor_size(128) == 8 and base_anchor_size(400) == 16


def test_checkpoint_roundtrip_weights_only(tmp_path):
    spec = DetectorSpec(fpn_width=16, image_size=64)
    a, b = build_detector(spec, 2), build_detector(spec, 2)
    torch.save({"model": a.state_dict()}, tmp_path / "w.pt")
    load_checkpoint(b, tmp_path / "w.pt")
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k
    init = build_detector(spec.model_copy(update={"init_checkpoint": str(tmp_path / "w.pt")}), 2)
    assert torch.equal(init.state_dict()["rpn.head.conv.0.0.weight"], a.state_dict()["rpn.head.conv.0.0.weight"])


def test_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))
    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="cannot load checkpoint safely"):
        load_checkpoint(build_detector(DetectorSpec(fpn_width=16, image_size=64), 2), tmp_path / "evil.pt")


def test_missing_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_checkpoint(build_detector(DetectorSpec(fpn_width=16, image_size=64), 2), tmp_path / "no.pt")


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_fpn_neck_is_torchvisions_backbone_with_fpn(arch):
    """The default neck keeps torchvision's module keys and shapes (``backbone.body.*``, ``backbone.fpn.*``),
    so torchvision checkpoints and run artifacts written before the neck slot still load strictly."""
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7
    spec = DetectorSpec(fpn_width=16, image_size=64)
    ours = build_detector(spec, 3, arch=arch).backbone
    layers = ["layer1", "layer2", "layer3", "layer4"][(arch == "retinanet"):]
    channels = [64, 128, 256, 512][(arch == "retinanet"):]
    extra = LastLevelP6P7(16, 16) if arch == "retinanet" else LastLevelMaxPool()
    theirs = BackboneWithFPN(resnet18(), {n: str(i) for i, n in enumerate(layers)}, channels, 16, extra_blocks=extra)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.rand(2, 3, 64, 64)
    ours.eval(), theirs.eval()
    for a, b in zip(ours(x).values(), theirs(x).values()):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
def test_no_neck_ablation_gives_the_same_levels(arch):
    spec = DetectorSpec(fpn_width=16, image_size=64, neck="none")
    model = build_detector(spec, 3, arch=arch)
    feats = model.backbone(torch.rand(2, 3, 64, 64))
    ref = build_detector(DetectorSpec(fpn_width=16, image_size=64), 3, arch=arch).backbone(torch.rand(2, 3, 64, 64))
    assert [f.shape for f in feats.values()] == [f.shape for f in ref.values()]
    assert "backbone.neck.lateral.0.weight" in model.state_dict()


def test_unknown_neck_and_bad_neck_config(tmp_path):
    from harness.plan import load_suite
    base = "datasets: [{name: s, format: synthetic}]\nmethods: [{name: focal}]\n"
    for extra, field in (("detector: {neck: fpnn}", "detector.neck"),
                         ("detector: {neck: fpn, neck_config: {depth: 2}}", "detector.neck_config.depth")):
        path = tmp_path / "s.yaml"
        path.write_text(base + extra + "\n")
        with pytest.raises(ConfigError) as err:
            load_suite(path)
        assert err.value.field == field and str(path) in str(err.value)
    path.write_text(base + "detector: {neck: fpnn}\n")
    with pytest.raises(ConfigError, match="did you mean 'fpn'"):
        load_suite(path)


# ---------------------------------------------------------------- registries (backbones, detector archs)

from harness.modeling import BACKBONES, build_backbone_body  # noqa: E402
from harness.modeling import DETECTORS  # noqa: E402


def test_registries_hold_every_declared_entry_point():
    """Each backbone declared under ``detbench.backbones`` (this project's and any installed package's)
    loads into the registry; each registered arch has its pyramid levels and classification term."""
    from importlib.metadata import entry_points

    from harness.modeling import CLASSIFICATION_TERMS, LEVELS
    declared = {ep.name for ep in entry_points(group="detbench.backbones")}
    assert declared and declared <= set(BACKBONES.names())
    assert DETECTORS.names() and all(arch in LEVELS and arch in CLASSIFICATION_TERMS for arch in DETECTORS.names())


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("arch", DETECTORS.names())
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_registered_backbone_builds_every_arch(backbone, arch):
    """The FPN neck gives each arch its pyramid (:data:`LEVELS`): the strides it declares, the width asked."""
    from harness.modeling import LEVELS
    spec = DetectorSpec(backbone=backbone, fpn_width=8, image_size=64)
    model = build_detector(spec, num_classes=2, arch=arch).eval()
    with torch.no_grad():
        feats = model.backbone(torch.rand(1, 3, 64, 64))
    strides = LEVELS[arch][1]
    assert [f.shape[1:] for f in feats.values()] == [(8, max(1, -(-64 // s)), max(1, -(-64 // s))) for s in strides]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_backbone_plugin_contract(backbone):
    """Stages of strides 4..32 with the channels the plugin declares; trainable_layers counts its stages."""
    from torchvision.models._utils import IntermediateLayerGetter
    info = BACKBONES.get(backbone)
    spec = DetectorSpec(backbone=backbone, image_size=64, trainable_layers=info.max_trainable_layers)
    from harness.modeling import trainable_stages
    assert trainable_stages(spec) == info.max_trainable_layers
    assert trainable_stages(DetectorSpec(backbone=backbone)) == info.max_trainable_layers  # from scratch: all
    body, stages, channels = build_backbone_body(spec)
    getter = IntermediateLayerGetter(body, {name: name for name in stages}).eval()  # up to the last stage
    assert all(p.requires_grad for p in getter.parameters())
    with torch.no_grad():
        out = getter(torch.rand(1, 3, 64, 64))
    assert [tuple(f.shape[1:]) for f in out.values()] == [(c, 64 // s, 64 // s) for c, s in zip(channels, (4, 8, 16, 32))]
    frozen, _, _ = build_backbone_body(spec.model_copy(update={"trainable_layers": 0}))
    assert not any(p.requires_grad for p in frozen.parameters())
    from pathlib import Path

    from harness.core import ConfigError
    from harness.plan.check import check_detector
    too_many = DetectorSpec(backbone=backbone, trainable_layers=info.max_trainable_layers + 1)
    with pytest.raises(ConfigError, match=f"0..{info.max_trainable_layers}, got") as err:  # the plugin's count
        check_detector(too_many, "faster_rcnn", Path("suite.yaml"), {}, 0)
    assert err.value.field == "detector.trainable_layers"


def test_unknown_backbone_suggests(tmp_path):
    from harness.plan import load_suite
    path = tmp_path / "s.yaml"
    path.write_text("datasets: [{name: s, format: synthetic}]\nmethods: [{name: focal}]\n"
                    "detector: {backbone: resnet81}\n")
    with pytest.raises(ConfigError, match=r"unknown backbone 'resnet81' \(did you mean 'resnet18'\?\); available: ") as err:
        load_suite(path)
    assert err.value.field == "detector.backbone" and str(path) in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'mobilenet_v3'") as err:  # past validation too
        build_backbone_body(DetectorSpec.model_construct(backbone="mobilenet_v2"))
    assert err.value.field == "detector.backbone"


def test_unknown_arch_suggests():
    with pytest.raises(ConfigError, match=r"unknown detector arch 'retinanett' \(did you mean 'retinanet'\?\)") as err:
        build_detector(DetectorSpec(fpn_width=8, image_size=64), 2, arch="retinanett")
    assert err.value.field == "detector.arch"
