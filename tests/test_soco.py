"""SoCo: its functions on hand-computed inputs, proposal caching, views, EMA target, weight hand-over."""
from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

import methods.soco_data as sd
from harness.config import DetectorSpec, ScheduleSpec
from harness.data import CocoDetection, load_coco
from harness.data import PreparedDataset
from harness.core import ConfigError
from harness.plugin import StageContext
from methods.soco import (SoCo, SoCoConfig, SoCoPretrainModel, assign_fpn_level, byol_loss, filter_proposals,
                          momentum)
from methods.soco_data import ProposalStore, SoCoViews, ViewBuilder

TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)
SMALL = dict(view_size=64, small_view_size=32, proj_hidden=64, proj_dim=32, pred_hidden=64)


def make_ctx(stage: str, artifacts=None, detector=TINY, **kw) -> StageContext:
    return StageContext(stage=stage, detector=detector, arch="faster_rcnn", schedule=ScheduleSpec(epochs=2),
                        num_classes=3, class_names=["a", "b", "c"], device=torch.device("cpu"), seed=0,
                        artifacts=artifacts or {}, **kw)


def method(tmp_path, **kw) -> SoCo:
    return SoCo({**SMALL, "proposal_cache": str(tmp_path / "props"), **kw})


def tiny_index(tiny_data):
    return load_coco(tiny_data["train_annotations"], tiny_data["train_images"])


# --------------------------------------------------------------------------- functions
def test_assign_fpn_level_hand_computed():
    sides = [10, 48, 48.5, 96, 100, 192, 193, 500]
    boxes = torch.tensor([[5.0, 5.0, 5 + s, 5 + s] for s in sides] + [[0.0, 0.0, 24.0, 96.0]])  # last: side 48
    assert assign_fpn_level(boxes).tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 0]
    assert assign_fpn_level(boxes).dtype == torch.int64
    assert assign_fpn_level(torch.tensor([[0.0, 0, 20, 20]]), sides=(10, 30, 40)).tolist() == [1]


def test_momentum_schedule():
    assert momentum(0, 100) == pytest.approx(0.99)
    assert momentum(100, 100) == pytest.approx(1.0)
    assert momentum(50, 100) == pytest.approx(0.995)
    assert momentum(25, 100, m0=0.9) == pytest.approx(1 - 0.1 * (math.cos(math.pi / 4) + 1) / 2)
    assert momentum(150, 100) == pytest.approx(1.0) and momentum(0, 0) == pytest.approx(0.99)


def test_byol_loss_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    assert byol_loss(a, a * 5).item() == pytest.approx(0.0, abs=1e-6)        # scale-invariant
    assert byol_loss(a, -a).item() == pytest.approx(4.0)
    z = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]])                   # 2, 0, 2 - sqrt 2
    assert byol_loss(a, z).item() == pytest.approx((2 + 0 + 2 - math.sqrt(2)) / 3, rel=1e-6)
    p, t = a.clone().requires_grad_(), z.clone().requires_grad_()
    byol_loss(p, t).backward()
    assert p.grad is not None and t.grad is None                               # no gradient to the target


def test_filter_proposals_cascade():
    keep = [[0, 0, 100, 100], [10, 10, 70, 190]]  # side 100 (ratio 0.5); 60x180: aspect exactly 1/3, ratio 0.52
    drop = [[0, 0, 20, 100],    # w < 32
            [0, 0, 150, 40],    # aspect 3.75
            [0, 0, 50, 50],     # ratio 0.25
            [0, 0, 170, 170],   # ratio 0.85
            [5, 5, 5, 50]]      # empty
    out = filter_proposals(np.array(drop[:2] + keep[:1] + drop[2:] + keep[1:]), 200, 200)
    np.testing.assert_array_equal(out, np.array(keep, np.float32))
    assert out.dtype == np.float32
    # no box passes: the aspect filter alone; then unfiltered; then the whole image
    np.testing.assert_array_equal(filter_proposals([[0, 0, 20, 20], [0, 0, 100, 10]], 200, 200), [[0, 0, 20, 20]])
    np.testing.assert_array_equal(filter_proposals([[0, 0, 100, 10]], 200, 200), [[0, 0, 100, 10]])
    np.testing.assert_array_equal(filter_proposals(np.zeros((0, 4)), 64, 48), [[0, 0, 64, 48]])
    np.testing.assert_array_equal(filter_proposals([[3, 3, 3, 9]], 64, 48), [[0, 0, 64, 48]])
    # a 64 px image: 40x40 passes (ratio 0.625), 30x30 only through the fallback
    np.testing.assert_array_equal(filter_proposals([[0, 0, 30, 30], [8, 8, 48, 48]], 64, 64), [[8, 8, 48, 48]])


def test_random_fallback_proposals_meet_the_filter():
    boxes = sd.random_proposals(200, 160, np.random.default_rng(0))
    w, h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    rel = np.sqrt(w * h) / math.sqrt(200 * 160)
    assert len(boxes) > 10 and (w >= 32).all() and (h >= 32).all()
    assert ((w / h >= 1 / 3 - 1e-6) & (w / h <= 3 + 1e-6)).all() and ((rel >= 0.3 - 1e-6) & (rel <= 0.8 + 1e-6)).all()
    assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= 200).all() and (boxes[:, 3] <= 160).all()


# --------------------------------------------------------------------------- proposals and their cache
def test_selective_search_runs_with_spec_parameters():
    if not sd.has_selective_search():
        pytest.skip("opencv-contrib not installed")
    img = np.zeros((96, 96, 3), np.uint8)
    img[20:70, 10:60] = (220, 40, 40)
    boxes = sd.selective_search(img, scale=300, sigma=0.9, min_size=100)
    assert boxes.ndim == 2 and boxes.shape[1] == 4 and len(boxes)
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 2] <= 96).all()
    assert any(np.allclose(b, [10, 20, 60, 70], atol=2) for b in boxes)  # the red square is a region


def test_proposals_computed_once_per_image_across_runs(tmp_path, tiny_data, monkeypatch):
    if not sd.has_selective_search():
        pytest.skip("opencv-contrib not installed")
    calls = []
    real = sd.selective_search
    monkeypatch.setattr(sd, "selective_search", lambda *a, **k: calls.append(1) or real(*a, **k))
    index = tiny_index(tiny_data)
    n = len(index)
    for run in range(2):  # two pretraining runs (new plugin, new dataset), two epochs each
        m = method(tmp_path)
        data = m.train_dataset("pretrain", make_ctx("pretrain"), CocoDetection(index))
        assert isinstance(data, SoCoViews) and len(data) == n
        for _epoch in range(2):
            for i in range(n):
                views, target = data[i]
                assert set(views) == {"v1", "v2", "v3", "b1_12", "b1_13", "b2", "b3"} and target == {"index": i}
        assert len(calls) == n
        files = sorted((tmp_path / "props").glob("*.npy"))
        if run == 0:
            first = {f: f.stat().st_mtime_ns for f in files}
    assert len(files) == n and {f: f.stat().st_mtime_ns for f in files} == first  # reused, not rewritten
    assert not list((tmp_path / "props").glob("*.tmp"))


def test_cache_key_and_corrupt_file(tmp_path):
    img = torch.rand(3, 40, 50, generator=torch.Generator().manual_seed(0))
    store = ProposalStore(cache_dir=tmp_path, generator="random")
    a = store.get(img)
    other = ProposalStore(sd.ProposalParams(min_side=8), cache_dir=tmp_path, generator="random")
    assert len(list(tmp_path.glob("*.npy"))) == 1
    other.get(img)
    assert len(list(tmp_path.glob("*.npy"))) == 2  # other parameters: other entry
    f = tmp_path / f"{store.key(store.identity(img, None), 50, 40)}.npy"
    f.write_bytes(b"garbage")
    np.testing.assert_array_equal(ProposalStore(cache_dir=tmp_path, generator="random").get(img), a)


def test_fallback_without_opencv_warns(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sd, "_SEGMENTATION", None)
    monkeypatch.setattr(ProposalStore, "_warned", False)
    with caplog.at_level(logging.WARNING):
        store = ProposalStore(cache_dir=tmp_path)
    assert store.generator == "random" and "selective search" in caplog.text
    boxes = store.get(torch.rand(3, 128, 128))
    assert len(boxes) and ((boxes[:, 2:] - boxes[:, :2]) >= 32).all()


# --------------------------------------------------------------------------- views
def test_view_geometry_maps_boxes_into_crops():
    image = torch.zeros(3, 120, 160)
    prop = [30.0, 20.0, 110.0, 90.0]
    image[:, 20:90, 30:110] = 1.0
    builder = ViewBuilder(view_size=64, small_view_size=32, num_proposals=4, jitter_prob=0.0, augment=False)
    for seed in range(6):
        out, meta = builder(image, np.array([prop]), torch.Generator().manual_seed(seed), return_meta=True)
        assert out["v1"].shape == (3, 64, 64) and out["v3"].shape == (3, 32, 32)
        for view, box_key, crop_key, size in (("v2", "b2", "crop2", 64), ("v3", "b3", "crop3", 32)):
            top, left, h, w = meta[crop_key]
            x1, x2 = (max(prop[0], left) - left) * size / w, (min(prop[2], left + w) - left) * size / w
            y1, y2 = (max(prop[1], top) - top) * size / h, (min(prop[3], top + h) - top) * size / h
            if meta["flips"][view]:
                x1, x2 = size - x2, size - x1
            assert out[box_key].shape == (4, 4)  # K = 4, the single proposal duplicated
            torch.testing.assert_close(out[box_key], torch.tensor([[x1, y1, x2, y2]]).repeat(4, 1))
            # the white proposal is where the box says: inside bright, outside dark
            bx1, by1, bx2, by2 = out[box_key][0].tolist()
            img = out[view][0]
            inner = img[math.ceil(by1) + 1:int(by2) - 1, math.ceil(bx1) + 1:int(bx2) - 1]
            assert inner.numel() and inner.min() > 0.95
            mask = torch.ones_like(img, dtype=torch.bool)
            mask[max(0, int(by1) - 1):math.ceil(by2) + 1, max(0, int(bx1) - 1):math.ceil(bx2) + 1] = False
            assert not mask.any() or img[mask].max() < 0.05
        v1 = torch.tensor([[p * 64 / s for p, s in zip(prop, (160, 120, 160, 120))]]).repeat(4, 1)
        if meta["flips"]["v1"]:
            v1 = torch.stack([64 - v1[:, 2], v1[:, 1], 64 - v1[:, 0], v1[:, 3]], 1)
        torch.testing.assert_close(out["b1_12"], v1)
        torch.testing.assert_close(out["b1_13"], v1)


def test_box_jitter_bounds():
    boxes = torch.tensor([[10.0, 10.0, 50.0, 90.0]]).repeat(200, 1)
    out = sd.jitter_boxes(boxes, torch.Generator().manual_seed(0), prob=0.5, ratio=0.1, width=100, height=100)
    moved = (out != boxes).any(1)
    assert 60 < moved.sum() < 140                                            # p = 0.5
    w, h = out[:, 2] - out[:, 0], out[:, 3] - out[:, 1]
    assert (out[:, 0] >= 6 - 1e-4).all() and (out[:, 0] <= 14 + 1e-4).all()  # x shift within 0.1 w
    assert (w >= 40 * 0.9 - 8 - 1e-3).all() and (w <= 40 * 1.1 + 1e-3).all() and (h <= 88 + 1e-3).all()
    assert (out >= 0).all() and (out <= 100).all()


def test_views_are_reproducible_and_select_overlapping_proposals():
    image = torch.rand(3, 100, 100, generator=torch.Generator().manual_seed(1))
    props = np.array([[0, 0, 40, 40], [60, 60, 100, 100], [20, 30, 90, 80]], np.float32)
    b = ViewBuilder(view_size=48, small_view_size=24)
    x = b(image, props, torch.Generator().manual_seed(3))
    y = b(image, props, torch.Generator().manual_seed(3))
    assert all(torch.equal(x[k], y[k]) for k in x)
    for seed in range(10):
        out, meta = b(image, props, torch.Generator().manual_seed(seed), return_meta=True)
        for key, crop_key in (("props12", "crop2"), ("props13", "crop3")):
            assert len(sd.overlapping(meta[key], meta[crop_key])) == 4       # every pick overlaps its crop
        for k in ("b2", "b3", "b1_12", "b1_13"):
            assert ((out[k][:, 2] > out[k][:, 0]) & (out[k][:, 3] > out[k][:, 1])).all()


# --------------------------------------------------------------------------- model and training
def pretrain_batch(m: SoCo, n: int = 2, size: int = 96):
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, size, size, generator=g) for _ in range(n)]
    data = SoCoViews([(im, {}) for im in images], m.view_builder(), ProposalStore(cache_dir=None, generator="random"))
    torch.manual_seed(0)
    items = [data[i] for i in range(n)]
    return [v for v, _ in items], [t for _, t in items]


def test_pretrain_step_gradients_and_ema_target(tmp_path):
    torch.manual_seed(0)
    m = method(tmp_path)
    model = m.build_model("pretrain", make_ctx("pretrain")).train()
    assert isinstance(model, SoCoPretrainModel) and m.detector_of(model) is model.detector
    online = dict(model.detector.backbone.named_parameters())
    assert all(torch.equal(p, online[k]) for k, p in model.target["backbone"].named_parameters())  # target = copy
    inputs, targets = pretrain_batch(m)
    terms = m.training_losses("pretrain", model, inputs, targets, make_ctx("pretrain"))
    assert set(terms) == {"byol"} and math.isfinite(terms["byol"].item()) and 0 <= terms["byol"].item() <= 16
    terms["byol"].backward()
    trained = ("detector.backbone.", "detector.roi_heads.box_head.", "projector.", "predictor.")
    for name, p in model.named_parameters():
        if name.startswith(trained):
            assert p.grad is not None, name
        else:  # target, RPN, box predictor
            assert p.grad is None and not p.requires_grad, name
    assert model.predictor[0].weight.grad.abs().sum() > 0 and model.detector.backbone.body.conv1.weight.grad.abs().sum() > 0

    torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5).step()
    before = [p.detach().clone() for p in model.target.parameters()]
    ctx = make_ctx("pretrain", epoch=1, step_in_epoch=3, steps_per_epoch=10)
    m.after_step("pretrain", model, ctx)
    mom = momentum(13, 20, 0.99)
    assert m.last_momentum == mom and m.epoch_metrics("pretrain", model, ctx) == {"soco/momentum": mom}
    onl = [p for o, _ in model.online_target_pairs() for p in o.parameters()]
    assert len(onl) == len(before)
    for t, old, o in zip(model.target.parameters(), before, onl):
        assert torch.equal(t, old.mul(mom).add(o.detach(), alpha=1 - mom))
    assert any(not torch.equal(t, old) for t, old in zip(model.target.parameters(), before))


def test_pretrain_accepts_raw_detection_batches(tmp_path):
    torch.manual_seed(0)
    m = method(tmp_path)
    model = m.build_model("pretrain", make_ctx("pretrain")).train()
    images = [torch.rand(3, 64, 64), torch.rand(3, 64, 80)]
    targets = [{"boxes": torch.tensor([[5.0, 5, 30, 40]]), "labels": torch.tensor([1]), "image_id": 1}] * 2
    loss = m.training_losses("pretrain", model, images, targets, make_ctx("pretrain"))["byol"]
    assert math.isfinite(loss.item())
    loss.backward()
    out = m.detector_of(model).eval()(images)
    assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


def test_weight_handover_to_finetune(tmp_path, caplog):
    torch.manual_seed(0)
    m = method(tmp_path)
    model = m.build_model("pretrain", make_ctx("pretrain"))
    with torch.no_grad():  # unlike any fresh initialisation
        for p in model.detector.parameters():
            p.add_(0.5)
    path = tmp_path / "pretrain.pt"
    torch.save(m.detector_of(model).state_dict(), path)
    art = torch.load(path, weights_only=True)
    torch.manual_seed(1)
    det = m.build_model("finetune", make_ctx("finetune", artifacts={"pretrain": path}))
    moved = [k for k in det.state_dict() if k.startswith(("backbone.", "roi_heads.box_head."))]
    assert any(k.startswith("backbone.fpn.") for k in moved) and any(k.startswith("roi_heads.box_head.") for k in moved)
    for k, v in det.state_dict().items():
        if k in moved:
            assert torch.equal(v, art[k]), k
        elif v.is_floating_point() and k.endswith("weight"):
            assert not torch.equal(v, art[k]), k  # RPN and box predictor start afresh
    det.train()
    images = [torch.rand(3, 64, 64)]
    losses = det(images, [{"boxes": torch.tensor([[5.0, 5, 40, 40]]), "labels": torch.tensor([2])}])
    assert {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"} <= set(losses)

    no_head = method(tmp_path, transfer_box_head=False).build_model("finetune", make_ctx("finetune", {"pretrain": path}))
    assert not torch.equal(no_head.roi_heads.box_head.fc6.weight, art["roi_heads.box_head.fc6.weight"])
    assert torch.equal(no_head.backbone.body.conv1.weight, art["backbone.body.conv1.weight"])
    with pytest.raises(ConfigError, match="does not fit"):
        m.build_model("finetune", make_ctx("finetune", {"pretrain": path}, detector=TINY.model_copy(update={"fpn_width": 8})))
    with caplog.at_level(logging.WARNING):
        m.build_model("finetune", make_ctx("finetune"))
    assert "from scratch" in caplog.text


def test_plugin_hooks_and_config():
    m = SoCo()
    assert m.stage_names() == ("pretrain", "finetune") and m.arch == "faster_rcnn"
    assert not m.stage("pretrain").evaluates and m.stage("finetune").evaluates
    assert "proposal_cache" not in m.stage("pretrain").reads and "view_size" in m.stage("pretrain").reads
    s = ScheduleSpec(epochs=6, lr=0.02)
    assert SoCo({"pretrain_epochs": 2, "pretrain_lr": 0.1}).stage_schedule("pretrain", s).epochs == 2
    assert SoCo({"pretrain_epochs": 2}).stage_schedule("finetune", s) == s
    for bad in ({"min_area_ratio": 0.9}, {"level_sides": (96, 48, 192)}, {"num_proposals": 0}, {"foo": 1}):
        with pytest.raises(Exception):
            SoCoConfig(**bad)


def test_both_stages_through_the_engine(tmp_path, tiny_data):
    from harness.engine import StageJob, run_stage
    m = method(tmp_path, pretrain_epochs=1)
    sched = ScheduleSpec(epochs=2, batch_size=4, warmup_iters=0)
    job = StageJob(method=m, stage="pretrain", dataset=PreparedDataset(**tiny_data), detector=TINY, arch="faster_rcnn",
                   schedule=m.stage_schedule("pretrain", sched), seed=0)
    state, model = run_stage(job, device=torch.device("cpu"))
    rec = state.history[-1]
    assert state.epoch == 1 and math.isfinite(rec["train/byol"]) and not any(k.startswith("val/") for k in rec)
    assert rec["soco/momentum"] == pytest.approx(momentum(2, 3))                # 12 images / 4 = 3 steps
    path = tmp_path / "pretrain.pt"
    torch.save(m.detector_of(model).state_dict(), path)
    job = StageJob(method=m, stage="finetune", dataset=PreparedDataset(**tiny_data), detector=TINY, arch="faster_rcnn",
                   schedule=sched, seed=0, artifacts={"pretrain": path})
    _, det = run_stage(job, device=torch.device("cpu"), max_steps=1)
    assert not torch.equal(det.backbone.body.conv1.weight, model.detector.backbone.body.conv1.weight)  # trained on
