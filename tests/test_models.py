"""Detector builders: image size pinned, anchors scaled, no downloads, safe checkpoint loading."""
from __future__ import annotations

import pytest
import torch

from harness.config import DetectorSpec
from harness.errors import ConfigError
from harness.models import base_anchor_size, build_detector, load_checkpoint


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
