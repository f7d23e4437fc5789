"""DeFeat: GT level masks, decoupled neck / KD losses on hand-computed tensors, the frozen teacher,
one full student step (Faster R-CNN, RetinaNet), teacher loading, config and the ablation suite."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.config import DetectorSpec, ScheduleSpec
from harness.core import ConfigError
from harness.plugin import StageContext
from harness.modeling import FASTER_RCNN_STRIDES, RETINANET_STRIDES, build_detector
from harness.plugin import METHODS
from methods.defeat import (DeFeat, DeFeatConfig, DeFeatStudent, decoupled_kd_loss, decoupled_neck_loss,
                            gt_level_masks, make_adapters)

ROOT = Path(__file__).resolve().parent.parent
TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)


def ctx_for(arch="faster_rcnn", detector=TINY, **kw) -> StageContext:
    return StageContext(stage="student", detector=detector, arch=arch, schedule=ScheduleSpec(epochs=2),
                        num_classes=3, class_names=["a", "b", "c"], device=torch.device("cpu"), seed=0, **kw)


def batch():
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 12.0, 12.0]]),
                "labels": torch.tensor([3, 2])}]
    return images, targets


def identity_adapters(channels: int, levels: int) -> nn.ModuleList:
    adapters = make_adapters(channels, levels)
    with torch.no_grad():
        for conv in adapters:
            conv.weight.zero_()
            conv.bias.zero_()
            conv.weight[torch.arange(channels), torch.arange(channels), 1, 1] = 1.0
    return adapters


@pytest.fixture
def registered():
    """``defeat`` in the registry (the entry point, once pyproject declares it)."""
    added = "defeat" not in METHODS
    if added:
        METHODS.register("defeat", DeFeat)
    yield
    if added:
        METHODS.unregister("defeat")


# --------------------------------------------------------------------------- gt_level_masks
@pytest.mark.parametrize("side_w,side_h,level", [
    # the released code's k = floor(log2(sqrt((w + 1)(h + 1)) / 56 + 1e-6))
    (56, 56, 0), (112, 112, 1), (224, 224, 2), (448, 448, 3), (896, 896, 4),
    (111, 111, 1),           # sqrt(112 * 112) / 56 = 2 exactly: up a level (sqrt(w h) would give 0)
    (110, 111, 0),           # sqrt(111 * 112) = 111.5 < 112
    (64, 192, 1),            # sqrt(65 * 193) = 112.004 (sqrt(w h) = 110.9 would give 0)
    (223, 224, 2),           # sqrt(224 * 225) = 224.5 (sqrt(w h) = 223.5 would give 1)
    (56, 224, 1),            # sqrt(57 * 225) = 113.2
    (4, 4, 0), (1, 2, 0),    # tiny: clamped to the first level
    (1000, 1000, 4), (1024, 1024, 4),  # huge: clamped to the last level
])
def test_level_assignment(side_w, side_h, level):
    sizes = [(1024 // s, 1024 // s) for s in FASTER_RCNN_STRIDES]
    masks = gt_level_masks([torch.tensor([[0.0, 0.0, side_w, side_h]])], sizes, FASTER_RCNN_STRIDES)
    assert [m.shape for m in masks] == [torch.Size([1, h, w]) for h, w in sizes]
    assert [int(m.sum() > 0) for m in masks] == [int(k == level) for k in range(5)]


def test_level_assignment_retinanet_counts_from_p3():
    sizes = [(1024 // s, 1024 // s) for s in RETINANET_STRIDES]
    boxes = torch.tensor([[0.0, 0.0, 56.0, 56.0], [0.0, 0.0, 112.0, 112.0]])
    masks = gt_level_masks([boxes[:1], boxes[1:]], sizes, RETINANET_STRIDES)
    assert masks[0][0].sum() == 7 * 7 and masks[0][1].sum() == 0          # 56 px -> P3 (stride 8)
    assert masks[1][1].sum() == 7 * 7 and masks[1][0].sum() == 0          # 112 px -> P4 (stride 16)


def expected(h, w, *cells):
    m = torch.zeros(h, w)
    for r0, r1, c0, c1 in cells:
        m[r0:r1, c0:c1] = 1.0
    return m


def test_covered_cells_floor_ceil_clip_and_min_one_cell():
    strides, sizes = (4, 8), [(16, 16), (8, 8)]   # a 64-px image
    boxes = torch.tensor([
        [5.0, 6.0, 30.0, 41.0],     # cols [1, 8) (ceil 7.5), rows [1, 11) (ceil 10.25)
        [44.0, 44.0, 48.0, 48.0],   # exactly on cell borders: one cell [11, 12)
        [60.0, 61.0, 100.0, 70.0],  # leaves the map: clipped to [15, 16)
        [32.0, 8.0, 32.0, 8.0],     # zero size: still one cell at (2, 8)
    ])
    masks = gt_level_masks([torch.zeros(0, 4), boxes], sizes, strides)
    assert masks[0][0].sum() == 0 and masks[1].sum() == 0     # all boxes < 56 px: level 0 only
    torch.testing.assert_close(masks[0][1], expected(16, 16, (1, 11, 1, 8), (11, 12, 11, 12),
                                                     (15, 16, 15, 16), (2, 3, 8, 9)))
    # just past a border: ceil takes the next cell (the public code's truncation would not)
    m = gt_level_masks([torch.tensor([[4.0, 4.0, 8.1, 8.0]])], sizes, strides)[0][0]
    torch.testing.assert_close(m, expected(16, 16, (1, 2, 1, 3)))
    # entirely outside the map: the nearest border cell
    m = gt_level_masks([torch.tensor([[80.0, 90.0, 90.0, 100.0]])], sizes, strides)[0][0]
    torch.testing.assert_close(m, expected(16, 16, (15, 16, 15, 16)))


def test_box_on_second_level_uses_its_stride():
    m = gt_level_masks([torch.tensor([[8.0, 0.0, 120.0, 112.0]])], [(32, 32), (16, 16)], (4, 8))
    assert m[0].sum() == 0   # sqrt(112 * 112) -> level 1, background on level 0
    torch.testing.assert_close(m[1][0], expected(16, 16, (0, 14, 1, 15)))


# --------------------------------------------------------------------------- decoupled_neck_loss
def test_adapters_init():
    adapters = make_adapters(16, 5)
    assert len(adapters) == 5
    for conv in adapters:
        assert conv.weight.shape == (16, 16, 3, 3) and conv.padding == (1, 1)
        assert conv.weight.abs().max() <= 2e-4 and 0.5e-4 < conv.weight.std() < 1.2e-4  # fmod(2) * 1e-4
        bound = 1 / math.sqrt(16 * 9)  # PyTorch's default bias init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        assert conv.bias.abs().sum() > 0 and conv.bias.abs().max() <= bound


def test_neck_loss_hand_computed():
    s0 = torch.zeros(1, 2, 2, 2)
    t0 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [0.0, 1.0]]]])
    m0 = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    s1 = torch.ones(1, 2, 1, 1)
    t1 = torch.tensor([0.0, 3.0]).view(1, 2, 1, 1)
    m1 = torch.zeros(1, 1, 1)
    # level 0: squared diffs summed over channels [[1, 5], [9, 17]]; fg 1 / (2*2*1), bg 31 / (2*2*3)
    # level 1: diff^2 = 1 + 4 = 5, no fg cell (N_obj -> max(1, 0)); bg 5 / (2*2*1)
    l_fg, l_bg = (0.25 + 0.0) / 2, (31 / 12 + 1.25) / 2
    adapters = identity_adapters(2, 2)
    loss = decoupled_neck_loss([s0, s1], [t0, t1], [m0, m1], adapters)
    assert loss.item() == pytest.approx(4 * l_fg + 16 * l_bg, rel=1e-6)
    only_fg = decoupled_neck_loss({"0": s0, "1": s1}, {"0": t0, "1": t1}, [m0, m1], adapters, 1.0, 0.0)
    assert only_fg.item() == pytest.approx(l_fg, rel=1e-6)
    assert decoupled_neck_loss([s0, s1], [t0, t1], [m0, m1], adapters, 0.0, 1.0).item() == pytest.approx(l_bg)


def test_neck_loss_zero_when_equal_and_grads_reach_adapters():
    g = torch.Generator().manual_seed(0)
    feats = [torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 3, 3, generator=g)]
    masks = [(torch.rand(2, 6, 6, generator=g) > 0.7).float(), (torch.rand(2, 3, 3, generator=g) > 0.7).float()]
    assert decoupled_neck_loss(feats, feats, masks, identity_adapters(4, 2)).item() == pytest.approx(0, abs=1e-10)
    adapters = make_adapters(4, 2)
    student = [f.clone().requires_grad_() for f in feats]
    decoupled_neck_loss(student, [f * 2 for f in feats], masks, adapters).backward()
    assert all(a.weight.grad.abs().sum() > 0 for a in adapters) and student[0].grad.abs().sum() > 0


def test_neck_loss_shape_checks():
    with pytest.raises(ValueError):
        decoupled_neck_loss([torch.zeros(1, 2, 2, 2)], [torch.zeros(1, 2, 2, 3)], [torch.zeros(1, 2, 2)],
                            identity_adapters(2, 1))


# --------------------------------------------------------------------------- decoupled_kd_loss
K1 = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)   # KL([.75, .25] || [.5, .5])


def test_kd_loss_hand_computed():
    ln3 = math.log(3.0)
    zs = torch.zeros(3, 2)
    zt = torch.tensor([[ln3, 0.0],          # positive: p_t = [.75, .25] vs p_s = [.5, .5]
                       [2 * ln3, 0.0],      # negative, T_bg = 2: same distributions after / T
                       [0.0, 0.0]])         # negative, equal: KL 0
    pos = torch.tensor([True, False, False])
    # L_obj = 1 * K1; L_bg = 2^2 * (K1 + 0) / 2
    loss = decoupled_kd_loss(zs, zt, pos, T_obj=1.0, T_bg=2.0)
    assert loss.item() == pytest.approx(2 * K1 + 2 * (4 * K1 / 2), rel=1e-6)
    assert decoupled_kd_loss(zs, zt, pos, T_bg=2.0, beta_obj=1.0, beta_bg=0.0).item() == pytest.approx(K1)
    assert decoupled_kd_loss(zs, zt, pos, T_bg=2.0, beta_obj=0.0, beta_bg=1.0).item() == pytest.approx(2 * K1)


def test_kd_loss_empty_group_and_equal_logits():
    z = torch.randn(5, 4, generator=torch.Generator().manual_seed(0))
    none = torch.zeros(5, dtype=torch.bool)
    assert decoupled_kd_loss(z, z, none).item() == pytest.approx(0, abs=1e-7)
    zs = torch.zeros(2, 2, requires_grad=True)
    zt = torch.tensor([[math.log(3.0), 0.0]] * 2)
    loss = decoupled_kd_loss(zs, zt, torch.tensor([True, True]), beta_obj=1.0)  # no negatives: L_bg = 0
    assert loss.item() == pytest.approx(K1, rel=1e-6)
    loss.backward()
    assert zs.grad.abs().sum() > 0
    empty = decoupled_kd_loss(zs[:0], zt[:0], torch.zeros(0, dtype=torch.bool))
    assert empty.item() == 0


# --------------------------------------------------------------------------- the student model
def student_model(arch="faster_rcnn", detector=TINY, **config):
    method = DeFeat({"teacher_backbone": "resnet18", **config})
    return method, method.build_model("student", ctx_for(arch, detector))


def test_teacher_is_frozen(caplog):
    torch.manual_seed(0)
    method, model = student_model()
    assert isinstance(model, DeFeatStudent) and "teacher has no trained weights" in caplog.text
    model.eval()
    model.train()
    assert not any(m.training for m in model.teacher.modules())
    assert all(m.training for m in model.detector.modules())
    assert not any(p.requires_grad for p in model.teacher.parameters())
    teacher_before = {k: v.clone() for k, v in model.teacher.state_dict().items()}   # BN buffers too
    student_before = {k: v.clone() for k, v in model.detector.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)  # all parameters
    images, targets = batch()
    loss = sum(method.training_losses("student", model, images, targets, ctx_for()).values())
    loss.backward()
    assert all(p.grad is None for p in model.teacher.parameters())
    assert all(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in model.adapters)
    opt.step()
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.state_dict().items())
    assert any(not torch.equal(v, student_before[k]) for k, v in model.detector.state_dict().items())
    assert method.detector_of(model) is model.detector
    ddp_like = type("DDP", (), {"module": model})()
    assert method.detector_of(ddp_like) is model.detector


def test_faster_rcnn_step_with_default_resnet50_teacher():
    torch.manual_seed(0)
    method = DeFeat()
    model = method.build_model("student", ctx_for()).train()
    assert method.stage_detector("teacher", TINY).backbone == "resnet50"
    assert isinstance(model.teacher.backbone.body.layer1[0].conv3, nn.Conv2d)   # a bottleneck ResNet
    images, targets = batch()
    terms = method.training_losses("student", model, images, targets, ctx_for())
    assert set(terms) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg",
                          "defeat_neck", "defeat_head"}
    assert all(v.ndim == 0 and math.isfinite(v.item()) for v in terms.values())
    assert terms["defeat_neck"] > 0 and terms["defeat_head"] > 0
    sum(terms.values()).backward()
    det = method.detector_of(model).eval()
    with torch.no_grad():
        out = det(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


def test_identical_teacher_gives_zero_terms():
    """Teacher == student (GroupNorm: same in train and eval), identity adapters: both terms vanish.

    The head term is only 0 if both heads see the same RoIs (the teacher's sampled ones): the
    student's own sampler would pick other boxes.
    """
    torch.manual_seed(0)
    gn = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64, norm="gn")
    method, model = student_model(detector=gn)
    model.teacher.load_state_dict(model.detector.state_dict())
    model.adapters = identity_adapters(16, 5)
    model.train()
    terms = method.training_losses("student", model, *batch(), ctx_for(detector=gn))
    assert terms["defeat_neck"].item() == pytest.approx(0, abs=1e-8)
    assert terms["defeat_head"].item() == pytest.approx(0, abs=1e-5)
    assert terms["loss_classifier"] > 0


def test_retinanet_step():
    torch.manual_seed(0)
    method, model = student_model("retinanet")
    assert model.strides == RETINANET_STRIDES and not model.use_head
    model.train()
    terms = method.training_losses("student", model, *batch(), ctx_for("retinanet"))
    assert set(terms) == {"classification", "bbox_regression", "defeat_neck"}
    assert all(v.ndim == 0 and math.isfinite(v.item()) for v in terms.values())
    sum(terms.values()).backward()
    assert all(a.weight.grad.abs().sum() > 0 for a in model.adapters)
    with pytest.raises(ConfigError, match="nothing to distil"):
        student_model("retinanet", use_neck=False)


def test_ablation_switches_and_annealing():
    torch.manual_seed(0)
    method, model = student_model(use_neck=False, anneal=True)
    assert model.adapters is None
    model.train()
    images, targets = batch()
    halfway = ctx_for(epoch=1)   # epoch 1 of 2: progress 0.5
    assert method.distill_weight(ctx_for()) == 1.0 and method.distill_weight(halfway) == 0.5
    assert DeFeat().distill_weight(halfway) == 1.0
    torch.manual_seed(1)
    full = method.training_losses("student", model, images, targets, ctx_for())
    assert set(full) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg", "defeat_head"}
    torch.manual_seed(1)
    half = method.training_losses("student", model, images, targets, halfway)["defeat_head"]
    assert half.item() == pytest.approx(0.5 * full["defeat_head"].item(), rel=1e-5)
    _, neck_only = student_model(use_head=False)
    assert not neck_only.use_head and neck_only.adapters is not None
    assert set(neck_only.train()(images, targets)) == {"loss_classifier", "loss_box_reg", "loss_objectness",
                                                       "loss_rpn_box_reg", "defeat_neck"}


# --------------------------------------------------------------------------- teacher loading
def test_teacher_from_checkpoint_and_from_artifact(tmp_path):
    torch.manual_seed(0)
    method = DeFeat({"teacher_backbone": "resnet34"})
    teacher = build_detector(method.stage_detector("teacher", TINY), 3, "faster_rcnn")
    ckpt = tmp_path / "teacher.pt"
    torch.save({"model": teacher.state_dict()}, ckpt)
    method = DeFeat({"teacher_backbone": "resnet34", "teacher_checkpoint": str(ckpt)})
    assert method.active_stages == ("student",) and DeFeat().active_stages == ("teacher", "student")
    model = method.build_model("student", ctx_for())
    ref = teacher.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.teacher.state_dict().items())
    # the harness's artifact of the teacher stage (a plain state dict)
    art = tmp_path / "detector.pt"
    torch.save(teacher.state_dict(), art)
    model = DeFeat({"teacher_backbone": "resnet34"}).build_model("student", ctx_for(artifacts={"teacher": art}))
    assert all(torch.equal(v, ref[k]) for k, v in model.teacher.state_dict().items())
    with pytest.raises(ConfigError, match="do not fit"):   # a resnet18 teacher file for a resnet34 teacher
        DeFeat({"teacher_checkpoint": str(ckpt)}).build_model("student", ctx_for())
    with pytest.raises(ConfigError, match="not found"):
        DeFeat({"teacher_checkpoint": str(tmp_path / "missing.pt")}).build_model("student", ctx_for())


def test_teacher_stage_trains_the_larger_plain_detector():
    method = DeFeat()
    spec = method.stage_detector("teacher", TINY.model_copy(update={"init_checkpoint": "/x/student.pt"}))
    assert spec.backbone == "resnet50" and spec.init_checkpoint is None and spec.fpn_width == 16
    assert method.stage_detector("student", TINY) is TINY
    torch.manual_seed(0)
    teacher = method.build_model("teacher", ctx_for(detector=DeFeat({"teacher_backbone": "resnet18"})
                                                    .stage_detector("teacher", TINY)))
    teacher.train()
    terms = method.training_losses("teacher", teacher, *batch(), ctx_for())
    assert set(terms) == {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert method.detector_of(teacher) is teacher


# --------------------------------------------------------------------------- config, caching, suite
def test_config_defaults_and_parts():
    c = DeFeatConfig()
    assert (c.alpha_obj, c.alpha_bg, c.beta_obj, c.beta_bg, c.T_obj, c.T_bg) == (4.0, 16.0, 2.0, 2.0, 1.0, 1.0)
    assert (c.teacher_backbone, c.canonical_size, c.anneal, c.use_neck, c.use_head) == ("resnet50", 56.0,
                                                                                         False, True, True)
    fg = DeFeatConfig(parts="fg")
    assert (fg.alpha_obj, fg.alpha_bg, fg.beta_obj, fg.beta_bg) == (4.0, 0.0, 2.0, 0.0)
    bg = DeFeatConfig(parts="bg", alpha_bg=12.0)
    assert (bg.alpha_obj, bg.alpha_bg, bg.beta_obj, bg.beta_bg) == (0.0, 12.0, 0.0, 2.0)
    with pytest.raises(ConfigError, match="nothing to distil"):
        DeFeat.validate_config({"use_neck": False, "use_head": False})
    with pytest.raises(ConfigError):
        DeFeat.validate_config({"alpha_obj": -1})
    for key in DeFeat.default_search:
        DeFeat.check_search_key(key)


def test_teacher_artifact_key_ignores_distillation_fields(registered):
    from harness.plan import stage_artifact_key
    from dataclasses import replace
    from runkit import make_cell
    cell = make_cell("defeat", {}, {"name": "d", **{f: "x" for f in ("train_annotations", "train_images",
                     "val_annotations", "val_images")}}, detector=TINY, schedule=ScheduleSpec())
    key = stage_artifact_key(cell, "teacher")
    swept = replace(cell, method_config=DeFeatConfig(alpha_obj=1.0, use_head=False, anneal=True).model_dump())
    assert stage_artifact_key(swept, "teacher") == key
    bigger = replace(cell, method_config=DeFeatConfig(teacher_backbone="resnet101").model_dump())
    assert stage_artifact_key(bigger, "teacher") != key
    assert DeFeat().stage_key("teacher") == {"teacher_backbone": "resnet50"}


def test_ablation_suite_is_valid(registered):
    from harness.config import detector_for
    from harness.plan import load_suite
    from harness.config import method_label
    suite = load_suite(ROOT / "suites" / "defeat_ablation.yaml", check_paths=False)
    assert suite.datasets[0].format == "coco" and suite.detector.backbone == "resnet18"
    labels = [method_label(m) for m in suite.methods]
    assert "faster_rcnn" in labels and len([m for m in suite.methods if m.name == "defeat"]) >= 5
    for m in suite.methods:
        if m.name == "defeat":
            method = DeFeat(DeFeat.validate_config(m.config))
            det = detector_for(suite, m)
            assert method.stage_detector("teacher", det).backbone == "resnet50" and det.backbone == "resnet18"
    assert {tuple(sorted(m.config.items())) for m in suite.methods if m.name == "defeat"} >= {
        (), (("use_head", False),), (("use_neck", False),), (("parts", "fg"),), (("parts", "bg"),)}


def test_harness_runs_teacher_then_student(registered, tmp_path):
    """The engine's own loop: the teacher stage's detector becomes the student stage's artifact."""
    from harness.data import write_synthetic_coco
    from harness.plan import stage_job
    from harness.engine import run_stage
    from runkit import make_cell
    tr = write_synthetic_coco(tmp_path / "train", n_images=4, seed=0, image_size=64, max_objects=2)
    va = write_synthetic_coco(tmp_path / "val", n_images=2, seed=1, image_size=64, max_objects=2)
    data = {"name": "tiny", "train_annotations": str(tr), "train_images": str(tr.parent),
            "val_annotations": str(va), "val_images": str(va.parent)}
    cell = make_cell("defeat", {"teacher_backbone": "resnet34", "anneal": True}, data, detector=TINY,
                     schedule=ScheduleSpec(epochs=1, batch_size=4, warmup_iters=1))
    method = cell.plugin
    _, teacher = run_stage(stage_job(cell, "teacher"), device=torch.device("cpu"), max_steps=1)
    assert teacher.backbone.body.layer4[0].conv1.in_channels == 256   # resnet34, not the suite's resnet18
    art = tmp_path / "detector.pt"
    torch.save(method.detector_of(teacher).state_dict(), art)
    state, model = run_stage(stage_job(cell, "student", {"teacher": str(art)}), device=torch.device("cpu"))
    record = state.history[-1]
    assert {"train/defeat_neck", "train/defeat_head", "train/loss_classifier", "val/AP"} <= set(record)
    assert all(math.isfinite(record[k]) for k in ("train/loss", "train/defeat_neck", "train/defeat_head"))
    ref = teacher.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.teacher.state_dict().items())
