"""Pretrained initialisation: local files and torchvision cache names, key-by-key checks, frozen stages,
and the label space of a checkpoint for ``detbench eval``."""
from __future__ import annotations

import pytest
import torch
from torchvision.models import resnet18

from harness.plan.checkpoint_eval import checkpoint_classes, coco_category_names, predicted_labels
from harness.config import DetectorSpec, ScheduleSpec
from harness.core import ConfigError
from harness.modeling import backbone_body, build_detector
from harness.modeling.weights import cache_file, resolve
from harness.modeling import freeze_stages, trainable_stages


def _resnet18_file(tmp_path, **change):
    state = resnet18().state_dict()
    state.update(change)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, state


def test_backbone_weights_loaded_and_fc_dropped(tmp_path):
    path, state = _resnet18_file(tmp_path)
    body, _, _ = backbone_body(DetectorSpec(backbone_weights=str(path)))
    assert torch.equal(body.conv1.weight, state["conv1.weight"])
    assert torch.equal(body.layer4[1].bn2.running_var, state["layer4.1.bn2.running_var"])


def test_pretrained_defaults_follow_torchvision(tmp_path):
    path, _ = _resnet18_file(tmp_path)
    spec = DetectorSpec(backbone_weights=str(path))
    assert spec.norm_kind == "frozen_bn" and trainable_stages(spec) == 3
    assert DetectorSpec().norm_kind == "bn" and trainable_stages(DetectorSpec()) == 5
    assert DetectorSpec(backbone_weights=str(path), norm="bn", trainable_layers=5).norm_kind == "bn"
    assert DetectorSpec(preset="torchvision_v2", backbone_weights=str(path)).norm_kind == "bn"  # v2 trains BN


@pytest.mark.parametrize("case,match", [
    ("missing", "missing key 'layer4.1.bn2.weight'"),
    ("extra", "unexpected key 'head.weight'"),
    ("shape", "shape mismatch at key 'conv1.weight'"),
    ("not_state", "not a state dict"),
])
def test_bad_backbone_weights_name_the_key(tmp_path, case, match):
    path, state = _resnet18_file(tmp_path)
    if case == "missing":
        del state["layer4.1.bn2.weight"]
    elif case == "extra":
        state["head.weight"] = torch.zeros(1)
    elif case == "shape":
        state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    torch.save([1, 2, 3] if case == "not_state" else state, path)
    with pytest.raises(ConfigError, match=match) as err:
        backbone_body(DetectorSpec(backbone_weights=str(path)))
    assert err.value.file == str(path)


def test_wrong_architecture_is_refused(tmp_path):
    path, _ = _resnet18_file(tmp_path)  # a ResNet-18 file for a ResNet-50 backbone
    with pytest.raises(ConfigError, match="shape mismatch|missing key|unexpected key"):
        backbone_body(DetectorSpec(backbone="resnet50", backbone_weights=str(path)))


def test_torchvision_name_resolves_to_its_cache_file(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    ref = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    expected = tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth"
    assert cache_file(ref) == expected
    with pytest.raises(ConfigError, match=r"put the file resnet18-f37072fd\.pth .* at .*hub/checkpoints"):
        resolve(ref, field="detector.backbone_weights")
    expected.parent.mkdir(parents=True)
    torch.save(resnet18().state_dict(), expected)
    assert resolve(ref) == expected
    with pytest.raises(ConfigError, match="not a torchvision weights name"):
        resolve("torchvision:ResNet18_Weights.NOPE")


def test_trainable_layers_out_of_range_is_a_config_error(tmp_path):
    """The range is the backbone plugin's stage count, checked against the registry by the plan."""
    from harness.plan import load_suite
    path = tmp_path / "suite.yaml"
    path.write_text("datasets: [{name: s, format: synthetic}]\nmethods: [{name: faster_rcnn}]\n"
                    "detector: {backbone: resnet18, trainable_layers: 6}\n")
    with pytest.raises(ConfigError, match="resnet18 backbone is 0..5, got 6") as err:
        load_suite(path)
    assert err.value.field == "detector.trainable_layers" and str(path) in str(err.value)
    with pytest.raises(ValueError, match="greater than or equal to 0"):
        DetectorSpec(trainable_layers=-1)


@pytest.mark.parametrize("n,trained", [(0, set()), (1, {"layer4"}), (3, {"layer2", "layer3", "layer4"}),
                                       (5, {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4"})])
def test_freeze_stages_resnet_as_torchvision(n, trained):
    net = resnet18()
    freeze_stages(net, "resnet18", n)
    got = {name.split(".")[0] for name, p in net.named_parameters() if p.requires_grad}
    assert got == trained  # the classifier (fc) is never trained: it is dropped with the body


def test_frozen_stages_get_no_optimizer_slot(tmp_path):
    from harness.engine import build_optimizer
    path, _ = _resnet18_file(tmp_path)
    det = build_detector(DetectorSpec(fpn_width=16, image_size=64, backbone_weights=str(path)), 2)
    frozen = [n for n, p in det.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith(("backbone.body.conv1", "backbone.body.layer1")) for n in frozen)
    opt = build_optimizer(det, ScheduleSpec())
    assert sum(len(g["params"]) for g in opt.param_groups) == sum(p.requires_grad for p in det.parameters())


def test_checkpoint_label_space():
    names = coco_category_names()
    assert len(names) == 91 and names[1] == "person" and names[0] == "__background__"
    own = build_detector(DetectorSpec(fpn_width=16, image_size=64), 2).state_dict()
    assert predicted_labels(own) == 3
    assert checkpoint_classes("x.pt", own, ["a", "b"]) is None
    coco = {"roi_heads.box_predictor.cls_score.weight": torch.zeros(91, 8)}
    assert checkpoint_classes("x.pt", coco, ["a", "b"]) == names[1:]
    assert checkpoint_classes("torchvision:FasterRCNN_ResNet50_FPN_Weights.COCO_V1", {}, ["a"]) == names[1:]
    with pytest.raises(ConfigError, match="predicts 2 classes, the dataset has 4"):
        checkpoint_classes("x.pt", own, ["a", "b", "c", "d"])


def test_frozen_bn_eps_as_torchvision(tmp_path):
    """torchvision zeroes FrozenBN's eps only after loading its two legacy COCO_V1 files."""
    from torchvision.ops import FrozenBatchNorm2d

    def eps(model):
        return {m.eps for m in model.modules() if isinstance(m, FrozenBatchNorm2d)}
    preset = DetectorSpec(preset="torchvision_v1", backbone="resnet18", norm="frozen_bn", min_size=64, max_size=64)
    assert eps(build_detector(preset, 2)) == {1e-5}
    legacy = tmp_path / "fasterrcnn_resnet50_fpn_coco-258fb6c6.pth"
    torch.save(build_detector(preset, 2).state_dict(), legacy)
    assert eps(build_detector(preset.model_copy(update={"init_checkpoint": str(legacy)}), 2)) == {0.0}
    assert eps(build_detector(DetectorSpec(fpn_width=16, image_size=64, norm="frozen_bn"), 2)) == {0.0}
