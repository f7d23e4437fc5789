"""CFPT neck: parameter parity with the official module, output shapes for any image size (equal to
torchvision's FPN + P6P7), gradients, bf16 autocast, config validation, and the window partitions,
position bias and cosine attention on hand-checked tensors.

Official parameter counts. The official module (``duzw9311/CFPT`` at commit 7521d45,
``mmdet/models/necks/cfpt.py``) was instantiated in a scratch directory outside this repository
with the arguments of ``configs/CFPT/retinanet_r18_cfpt_1x_visdrone.py`` (out_channels 256,
alpha 1, beta 1, num_heads 4, mlp_ratio 2, reduction 4): its file unchanged, einops installed,
and stubs for what it imports from elsewhere (``mmcv.runner.BaseModule``: an ``nn.Module`` taking
``init_cfg``, no parameters; ``auto_fp16``: identity decorator; ``mmdet``'s ``NECKS``: a no-op
registry; ``timm``'s ``trunc_normal_`` / ``to_2tuple``). ``sum(p.numel() for p in parameters())``:

* in_channels (64, 128, 256, 512) (ResNet-18; C2's 64 has no parameters): 4,749,480
* in_channels (256, 512, 1024, 2048) (ResNet-50): 8,976,552

In the same scratch setup the official weights (state dict renamed) load into :class:`CFPT` with
every key matched, and on 128 x 192 inputs in float64, train and eval mode, outputs and input
gradients agree exactly with zero relative-position tables, and to 1e-5 (the official float32
index arithmetic) with random ones.
"""
from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
import torchvision
from pydantic import ValidationError
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from harness.core import ConfigError
from harness.modeling import LEVELS, NECKS, build_neck
from harness.plugin import METHODS
from methods.cfpt import (CFPT, CFPTConfig, CFPTNeck, CrossLayerChannelAttention, CrossLayerSpatialAttention,
                          cosine_attention, window_geometry)

OFFICIAL_PARAMS = {"resnet18": ((128, 256, 512), 4_749_480), "resnet50": ((512, 1024, 2048), 8_976_552)}
SMALL = (8, 16, 32)   # C3..C5 channels for the fast tests
WIDTH = 32            # hidden 8, 4 heads of 2


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def resnet_stage_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """(H, W) of C3, C4, C5 of torchvision's ResNet-18 on an h x w image (run on the meta device)."""
    with torch.device("meta"):
        net = torchvision.models.resnet18().eval()
        x = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(torch.empty(1, 3, h, w))))))
        c3 = net.layer2(x)
        c4 = net.layer3(c3)
        c5 = net.layer4(c4)
    return [tuple(c.shape[-2:]) for c in (c3, c4, c5)]


def features(shapes, channels=SMALL, batch=1, seed=0) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((str(i), torch.randn(batch, c, *s, generator=g))
                       for i, (c, s) in enumerate(zip(channels, shapes)))


# --------------------------------------------------------------------------- parity, plugin
@pytest.mark.parametrize("backbone", sorted(OFFICIAL_PARAMS))
def test_parameter_count_equals_the_official_module(backbone):
    channels, official = OFFICIAL_PARAMS[backbone]
    assert num_params(CFPT(channels, 256)) == official
    assert num_params(CFPTNeck().build(list(channels), 256, "retinanet")) == official


def test_defaults_are_the_official_r18_config():
    assert CFPTConfig().model_dump() == {"alpha": 1, "beta": 1, "num_heads": 4, "mlp_ratio": 2.0,
                                         "reduction": 4, "num_blocks": 1}
    assert window_geometry(1, 2) == [(9, 8, 1), (5, 4, 1), (3, 2, 1), (1, 1, 0)]      # CSA
    assert window_geometry(1, 4) == [(65, 64, 1), (17, 16, 1), (5, 4, 1), (1, 1, 0)]  # CCA
    assert window_geometry(3, 2) == [(11, 8, 2), (7, 4, 2), (5, 2, 2), (3, 1, 1)]


def test_plugin_and_build_neck():
    assert (CFPTNeck.name, CFPTNeck.Config, CFPTNeck.archs) == ("cfpt", CFPTConfig, ("retinanet",))
    assert NECKS.get("cfpt") is CFPTNeck  # through the entry point, like a third-party neck
    neck = build_neck("cfpt", {"num_blocks": 2}, list(SMALL), WIDTH, "retinanet")
    assert isinstance(neck, CFPT) and len(neck.blocks) == 2
    with pytest.raises(ConfigError, match="cannot serve a faster_rcnn"):
        build_neck("cfpt", {}, [4, 8, 16, 32], WIDTH, "faster_rcnn")


def test_config_validation():
    with pytest.raises(ValidationError, match="alpha must be an odd positive integer"):
        CFPTConfig(alpha=2)
    with pytest.raises(ValidationError, match="beta must be an odd positive integer"):
        CFPTConfig(beta=0)
    with pytest.raises(ValidationError, match="extra"):
        CFPTConfig(width=128)
    with pytest.raises(ConfigError, match="alpha"):
        CFPTNeck.validate_config({"alpha": 4})
    with pytest.raises(ConfigError):
        CFPTNeck.validate_config({"heads": 8})
    assert CFPTConfig(alpha=3, beta=5).beta == 5
    with pytest.raises(ConfigError, match="multiple of num_heads"):   # width 32 // 4 = 8 channels, 3 heads
        CFPTNeck({"num_heads": 3}).build(list(SMALL), WIDTH, "retinanet")


# --------------------------------------------------------------------------- shapes, gradients, bf16
@pytest.mark.parametrize("image", [(600, 1000), (513, 771), (512, 512)])
def test_output_shapes_equal_torchvision_fpn_p6p7(image):
    shapes = resnet_stage_shapes(*image)
    assert shapes[0] == tuple(math.ceil(s / 8) for s in image)
    x = features(shapes)
    with torch.device("meta"):
        fpn = FeaturePyramidNetwork(list(SMALL), WIDTH, extra_blocks=LastLevelP6P7(WIDTH, WIDTH))
        expected = fpn(OrderedDict((k, torch.empty_like(v, device="meta")) for k, v in x.items()))
    neck = CFPT(SMALL, WIDTH).eval()
    with torch.no_grad():
        out = neck(x)
    assert list(out) == list(expected) == ["0", "1", "2", "p6", "p7"]
    assert [tuple(v.shape) for v in out.values()] == [tuple(v.shape) for v in expected.values()]
    assert all(v.shape[1] == WIDTH and torch.isfinite(v).all() for v in out.values())
    assert len(out) == len(LEVELS["retinanet"][1])


def test_gradients_reach_every_parameter():
    torch.manual_seed(0)
    neck = CFPT(SMALL, WIDTH, num_blocks=2).train()
    out = neck(features(resnet_stage_shapes(100, 164), batch=2))   # C3 13 x 21: padded inside
    sum(v.sum() for v in out.values()).backward()
    for name, p in neck.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        # CCPE's per-query-level bias cannot change a softmax over keys (as in the official code).
        if not name.endswith("level_bias"):
            assert p.grad.abs().sum() > 0, name


def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    neck = CFPT(SMALL, WIDTH).train()
    x = features(resnet_stage_shapes(130, 98))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = neck(x)
        loss = sum(v.float().sum() for v in out.values())
    loss.backward()
    assert all(v.dtype == torch.bfloat16 and torch.isfinite(v).all() for v in out.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in neck.parameters())


# --------------------------------------------------------------------------- hand-checked pieces
def test_cosine_attention_hand_computed():
    q = torch.tensor([[3.0, 0.0]])                     # one query; cosine with the keys: 1 and 0
    k = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    v = torch.tensor([[1.0], [5.0]])
    e = math.e
    out = cosine_attention(q, k, v, torch.zeros(1, 2))
    assert out.item() == pytest.approx((e * 1 + 1 * 5) / (e + 1), rel=1e-6)
    out = cosine_attention(q, k, v, torch.tensor([[0.0, 1.0]]))   # bias evens the logits
    assert out.item() == pytest.approx(3.0, rel=1e-6)
    # No temperature: scaling q or k changes nothing.
    assert cosine_attention(q * 100, k * 0.01, v, torch.zeros(1, 2)).item() == pytest.approx(
        (e + 5) / (e + 1), rel=1e-6)


def test_spatial_windows_are_overlapping_and_scale_matched():
    """CSA tokens of the stride-8 level for each coarse pixel: the 9 x 9 block of rows and columns
    8m-1 .. 8m+7 (zero outside the map), token order row-major."""
    csa = CrossLayerSpatialAttention(16)                 # hidden 4, 4 heads of 1 channel
    ids = torch.arange(1, 16 * 24 + 1, dtype=torch.float32).reshape(16, 24)
    qkv = torch.zeros(1, 12, 16, 24)
    qkv[0, 0] = ids                                      # q of head 0
    qkv[0, 9] = -ids                                     # v of head 1
    tok = csa._tokens(qkv, 0, (2, 3))                    # (3, B, heads, windows, 81, hd)
    assert tok.shape == (3, 1, 4, 6, 81, 1)
    padded = torch.nn.functional.pad(ids, (1, 1, 1, 1))  # padded[r + 1, c + 1] = ids[r, c]
    for m, (r, c) in enumerate([(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]):
        block = padded[8 * r:8 * r + 9, 8 * c:8 * c + 9].flatten()
        assert torch.equal(tok[0, 0, 0, m, :, 0], block)
        assert torch.equal(tok[2, 0, 1, m, :, 0], -block)
    assert tok[1].abs().sum() == 0
    # The coarsest level: one token per window, the pixel itself.
    small = torch.randn(1, 12, 2, 3)
    assert torch.equal(csa._tokens(small, 3, (2, 3))[0, 0, 0, :, 0, 0], small[0, 0].flatten())
    # Folding back sums overlaps: all-ones tokens count how many windows cover each pixel.
    ones = torch.ones(1, 4, 6, 81, 1)
    cover = csa._untokens(ones, 0, (1, 16, 16, 24))[0, 0]
    assert cover[0, 0] == 1 and cover[7, 7] == 4 and cover[7, 3] == 2 and cover[15, 23] == 1


def test_channel_windows_follow_the_official_layout():
    """CCA tokens of the stride-8 level: qkv pixel-unshuffled by 8 (channel c -> 64c .. 64c+63), then
    65-channel windows at stride 64 with one channel of padding, over the concatenated q|k|v axis."""
    cca = CrossLayerChannelAttention(16)                 # hidden 4: windows = 4 channels x (q, k, v)
    qkv = torch.randn(1, 12, 16, 16, generator=torch.Generator().manual_seed(0))
    tok = cca._tokens(qkv, 0, (2, 2))                    # (3, B, heads, hd, 65, cells)
    assert tok.shape == (3, 1, 4, 1, 65, 4)
    unshuffled = torch.nn.functional.pixel_unshuffle(qkv, 8).flatten(2)[0]     # (12 * 64, 4)
    assert torch.equal(tok[0, 0, 0, 0, 0], torch.zeros(4))                    # padding
    assert torch.equal(tok[0, 0, 0, 0, 1:], unshuffled[0:64])                 # q channel 0
    assert torch.equal(tok[0, 0, 2, 0, 0], unshuffled[127])                   # overlap with channel 1
    assert torch.equal(tok[1, 0, 0, 0, 0], unshuffled[255])                   # k window 0 starts on q's last
    assert torch.equal(tok[2, 0, 3, 0, 1:], unshuffled[11 * 64:12 * 64])      # v channel 3
    # The coarsest level: window 1, stride 1, the channel itself.
    coarse = torch.randn(1, 12, 2, 2)
    assert torch.equal(cca._tokens(coarse, 3, (2, 2))[:, 0, :, 0, 0], coarse[0].reshape(3, 4, 4))
    # Round trip of v with summed overlaps: every channel once, plus the one it shares with a neighbour.
    v = tok[2]
    back = cca._untokens(v, 0, (1, 4, 16, 16))
    expected = torch.nn.functional.pixel_unshuffle(qkv[:, 8:], 8)             # (1, 256, 2, 2)
    expected[:, 63:255:64] *= 2            # channel 64j-1 is the first token of window j too (j = 1..3)
    assert torch.allclose(torch.nn.functional.pixel_unshuffle(back, 8), expected)


def test_position_bias_interpolates_the_flattened_table_index():
    """CCPE of CSA (windows 9/5/3/1, table 17 x 17): level-1 offsets are rescaled by 9/5, so the
    (level-0 centre, level-1 top-left) pair has relative position (3.6, 3.6), flat index
    (3.6 + 8) * 17 + (3.6 + 8) = 208.8, read as 0.2 * table[208] + 0.8 * table[209]."""
    csa = CrossLayerSpatialAttention(16)
    pb = csa.pos_bias
    with torch.no_grad():
        pb.table.copy_(torch.randn_like(pb.table))
        pb.level_bias.copy_(torch.randn_like(pb.level_bias))
    bias = pb()
    assert bias.shape == (4, 116, 116)
    centre0, corner1, coarse = 40, 81, 115              # token 40 = level 0 (4, 4); 81 = level 1 (0, 0)
    t, lb = pb.table.detach(), pb.level_bias.detach()
    torch.testing.assert_close(bias[:, centre0, corner1], 0.2 * t[208] + 0.8 * t[209] + lb[0])
    torch.testing.assert_close(bias[:, centre0, centre0], t[8 * 17 + 8] + lb[0])
    # Level 3's single token against level 0's top-left (-4, -4): relative (4, 4) -> 12 * 17 + 12.
    torch.testing.assert_close(bias[:, coarse, 0], t[12 * 17 + 12] + lb[3])


def test_position_tables_are_declared_decay_free():
    from harness.config import ScheduleSpec
    from harness.engine import parameter_groups
    neck = CFPTNeck().build([128, 256, 512], 32, "retinanet")
    _, free = parameter_groups(neck, ScheduleSpec(norm_weight_decay=0.0))
    names = {id(p): n for n, p in neck.named_parameters()}
    exempt = {names[id(p)] for p in free["params"]}
    assert {n for n in names.values() if n.endswith(("pos_bias.table", "pos_bias.level_bias"))} <= exempt
    assert not any(n.endswith("qkv.weight") for n in exempt)


# --------------------------------------------------------------------------- in detectors and suites
RETINANET_METHODS = [n for n in METHODS.names()
                     if "retinanet" in (METHODS.get(n).arch, *METHODS.get(n).supported_archs)]


def test_some_registered_methods_train_retinanet():
    assert RETINANET_METHODS


@pytest.mark.parametrize("method", RETINANET_METHODS)
def test_any_retinanet_method_takes_the_cfpt_neck(method, tmp_path):
    from harness.config import DetectorSpec, ScheduleSpec
    from harness.plugin import StageContext
    cls = METHODS.get(method)
    plugin = cls(cls.test_config(tmp_path))
    spec = DetectorSpec(fpn_width=32, image_size=64, arch="retinanet", neck="cfpt",
                        neck_config={"num_heads": 2})
    stage = plugin.stage_names()[0]  # a first stage builds the detector later stages copy
    ctx = StageContext(stage=stage, detector=plugin.stage_detector(stage, spec), arch="retinanet",
                       schedule=ScheduleSpec(epochs=1), num_classes=2, class_names=["a", "b"],
                       device=torch.device("cpu"), seed=0)
    model = plugin.build_model(stage, ctx)
    det = plugin.detector_of(model)
    assert isinstance(det.backbone.neck, CFPT)
    det.train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 48)]
    targets = [{"boxes": torch.tensor([[4.0, 4.0, 30.0, 30.0]]), "labels": torch.tensor([1])}] * 2
    losses = det(images, targets)
    assert all(torch.isfinite(v) for v in losses.values())


def test_cfpt_method_row_is_focal_with_the_neck():
    from harness.config import DetectorSpec
    from methods.cfpt_retinanet import CFPTRetinaNet
    method = CFPTRetinaNet({"neck_config": {"num_heads": 2}})
    spec = method.stage_detector("train", DetectorSpec())
    assert spec.neck == "cfpt" and spec.neck_config == {"num_heads": 2}
    assert (method.config.alpha, method.config.gamma) == (0.25, 2.0)
    with pytest.raises(ConfigError, match="alpha"):
        CFPTRetinaNet.validate_config({"neck_config": {"alpha": 2}})


@pytest.mark.parametrize("extra,field", [
    ("detector: {neck: cfpt}\nmethods: [{name: faster_rcnn}]", "detector.neck"),             # arch it cannot serve
    ("detector: {neck: cfpt, neck_config: {beta: 4}}\nmethods: [{name: focal}]", "detector.neck_config.beta"),
    ("detector: {neck: cfpt, neck_config: {heads: 4}}\nmethods: [{name: focal}]", "detector.neck_config.heads"),
    ("methods: [{name: focal, detector: {neck: cfpn}}]", "methods[0].detector.neck"),             # unknown neck
    ("methods: [{name: cfpt, config: {neck_config: {alpha: 2}}}]", "methods[0].config.neck_config.alpha"),
])
def test_bad_neck_settings_name_the_key_path(tmp_path, extra, field):
    from harness.plan import load_suite
    path = tmp_path / "s.yaml"
    path.write_text("datasets: [{name: s, format: synthetic}]\n" + extra + "\n")
    with pytest.raises(ConfigError) as err:
        load_suite(path)
    assert err.value.field == field and str(path) in str(err.value), str(err.value)
