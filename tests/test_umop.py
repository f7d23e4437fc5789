"""UMOP's progressive focal loss on hand-computed tensors, its DDP statistics, and the RetinaNet head."""
from __future__ import annotations

import json
import math
from datetime import timedelta

import pytest
import torch

from harness.config import DetectorSpec, ScheduleSpec
from harness.core import ConfigError
from harness.plugin import StageContext
from methods.focal import focal_loss
from methods.umop import (UMOP, ProgressiveFocalHead, UMOPConfig, adaptive_focal_params, level_focal_params,
                          progressive_focal_loss)
from runkit import hang_guard

P2 = math.exp(-2.0)  # the neutral point: -log(e^-2) = 2 = gamma, alpha = 0.5 / 2 = 0.25


def logit(p: float) -> float:
    return math.log(p / (1 - p))


def make_level(n: int, c: int, pos: list[tuple[int, int, float]], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, c] random logits and one-hot targets; ``pos`` = (row, class, GT-class probability)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, generator=g, dtype=torch.float64) * 2
    t = torch.zeros(n, c, dtype=torch.float64)
    for r, k, p in pos:
        x[r, k], t[r, k] = logit(p), 1.0
    return x, t


def neutral_levels():
    """Four levels whose mean positive probability is e^-2 (the last one has no positive)."""
    return [make_level(12, 3, [(0, 0, P2), (3, 2, P2), (7, 1, P2)], 0),
            make_level(6, 3, [(1, 1, P2)], 1),
            make_level(5, 3, [(0, 2, P2), (4, 2, P2)], 2),
            make_level(4, 3, [], 3)]


# --------------------------------------------------------------------------- adaptive_focal_params
def test_params_hand_computed():
    p = torch.tensor([0.2, 0.1])
    g, a = adaptive_focal_params(p, gamma_stat="log_of_mean")
    assert g == pytest.approx(-math.log(0.15)) and a == pytest.approx(0.5 / -math.log(0.15))
    g, a = adaptive_focal_params(p, gamma_stat="mean_of_log")
    expected = (-math.log(0.2) - math.log(0.1)) / 2
    assert g == pytest.approx(expected) and a == pytest.approx(0.5 / expected)
    assert adaptive_focal_params(torch.full((5,), P2)) == pytest.approx((2.0, 0.25))


@pytest.mark.parametrize("gamma_stat", ["log_of_mean", "mean_of_log"])
def test_params_clamped_at_both_ends(gamma_stat):
    # confident positives: -log 0.9 = 0.105 -> gamma - delta
    assert adaptive_focal_params(torch.full((3,), 0.9), gamma_stat=gamma_stat) == pytest.approx((1.5, 0.5 / 1.5))
    # hopeless positives: -log 0.01 = 4.6 -> gamma + delta
    assert adaptive_focal_params(torch.full((3,), 0.01), gamma_stat=gamma_stat) == pytest.approx((2.5, 0.2))
    assert adaptive_focal_params(torch.zeros(2), gamma_stat=gamma_stat) == pytest.approx((2.5, 0.2))  # p = 0
    assert adaptive_focal_params(torch.full((3,), 0.01), gamma=3.0, delta=0.25, w=0.6,
                                 gamma_stat=gamma_stat) == pytest.approx((3.25, 0.6 / 3.25))


def test_params_no_positives():
    assert adaptive_focal_params(torch.zeros(0)) == (2.0, 0.25)
    assert adaptive_focal_params(torch.zeros(0), gamma=3.0, w=0.6) == (3.0, pytest.approx(0.2))
    assert level_focal_params([torch.randn(4, 2)], [torch.zeros(4, 2)]) == [(2.0, 0.25)]


def test_params_reject_bad_arguments():
    with pytest.raises(ValueError):
        adaptive_focal_params(torch.ones(1) * 0.5, gamma=1.0, delta=1.0)
    with pytest.raises(ValueError):
        adaptive_focal_params(torch.ones(1) * 0.5, gamma_stat="median")


# --------------------------------------------------------------------------- progressive_focal_loss
@pytest.mark.parametrize("gamma_stat", ["log_of_mean", "mean_of_log"])
def test_neutral_point_equals_focal_total_positives(gamma_stat):
    levels = neutral_levels()
    xs, ts = [x for x, _ in levels], [t for _, t in levels]
    loss, params = progressive_focal_loss(xs, ts, gamma_stat=gamma_stat, return_params=True)
    assert params == [pytest.approx((2.0, 0.25))] * 4
    expected = focal_loss(torch.cat(xs), torch.cat(ts), alpha=0.25, gamma=2.0) / 6  # 6 positives
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_neutral_point_log_of_mean_with_unequal_probabilities():
    # mean of {0.5 e^-2, 1.5 e^-2} is e^-2: log_of_mean is neutral, mean_of_log is not
    x, t = make_level(8, 2, [(0, 0, 0.5 * P2), (5, 1, 1.5 * P2)], 4)
    torch.testing.assert_close(progressive_focal_loss([x], [t], gamma_stat="log_of_mean"),
                               focal_loss(x, t, 0.25, 2.0) / 2, rtol=1e-9, atol=0)
    g, _ = level_focal_params([x], [t], gamma_stat="mean_of_log")[0]
    assert g == pytest.approx(-(math.log(0.5 * P2) + math.log(1.5 * P2)) / 2) and g != pytest.approx(2.0)


def test_neutral_point_mean_of_levels():
    levels = neutral_levels()
    xs, ts = [x for x, _ in levels], [t for _, t in levels]
    loss = progressive_focal_loss(xs, ts, level_norm="mean_of_levels")
    # each level's focal sum over its own positives (1 for the level without), averaged over 4 levels
    per_level = [focal_loss(x, t, 0.25, 2.0) / n for (x, t), n in zip(levels, (3, 1, 2, 1))]
    torch.testing.assert_close(loss, sum(per_level) / 4, rtol=1e-9, atol=0)
    assert not torch.isclose(loss, progressive_focal_loss(xs, ts))  # the two normalisations differ here


@pytest.mark.parametrize("level_norm", ["total_positives", "mean_of_levels"])
def test_per_level_parameters(level_norm):
    # level 0: mean p = e^-1.8 -> gamma 1.8; level 1: p = e^-4 -> clamped 2.5; level 2: p = 0.8 -> clamped 1.5
    levels = [make_level(10, 3, [(0, 1, math.exp(-1.8)), (2, 0, math.exp(-1.8))], 5),
              make_level(6, 3, [(5, 2, math.exp(-4.0))], 6),
              make_level(3, 3, [(1, 1, 0.8)], 7)]
    xs, ts = [x for x, _ in levels], [t for _, t in levels]
    loss, params = progressive_focal_loss(xs, ts, level_norm=level_norm, return_params=True)
    gammas = (1.8, 2.5, 1.5)
    assert params == [pytest.approx((g, 0.5 / g)) for g in gammas]
    sums = [focal_loss(x, t, 0.5 / g, g) for (x, t), g in zip(levels, gammas)]
    expected = sum(sums) / 4 if level_norm == "total_positives" else (sums[0] / 2 + sums[1] + sums[2]) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


def test_default_is_mean_of_log():
    x, t = make_level(8, 2, [(0, 0, 0.5 * P2), (5, 1, 1.5 * P2)], 4)
    g = -(math.log(0.5 * P2) + math.log(1.5 * P2)) / 2  # mean of -log p, not -log of the mean
    _, params = progressive_focal_loss([x], [t], return_params=True)
    assert params == [pytest.approx((g, 0.5 / g))]
    assert UMOP().config.gamma_stat == "mean_of_log"


def test_total_positives_counts_at_least_one_per_image():
    # a batch of two images: image 0 has 3 positives, image 1 none -> released code divides by 3 + 1 = 4
    levels = neutral_levels()
    xs, ts = [x for x, _ in levels], [t for _, t in levels]  # 6 positives in all
    per_image = torch.tensor([6, 0])
    loss = progressive_focal_loss(xs, ts, image_positives=per_image)
    focal_sum = focal_loss(torch.cat(xs), torch.cat(ts), alpha=0.25, gamma=2.0)
    torch.testing.assert_close(loss, focal_sum / 7, rtol=1e-9, atol=0)
    torch.testing.assert_close(progressive_focal_loss(xs, ts, image_positives=[3, 3]), focal_sum / 6,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(progressive_focal_loss(xs, ts, image_positives=[0, 0]), focal_sum / 2,
                               rtol=1e-9, atol=0)
    torch.testing.assert_close(progressive_focal_loss(xs, ts), focal_sum / 6, rtol=1e-9, atol=0)  # one image


def test_no_gradient_through_gamma_ad():
    levels = [make_level(10, 3, [(0, 1, 0.3), (2, 0, 0.05)], 8), make_level(6, 3, [(5, 2, 0.1)], 9)]
    xs = [x.clone().requires_grad_(True) for x, _ in levels]
    ts = [t for _, t in levels]
    loss, params = progressive_focal_loss(xs, ts, return_params=True)
    assert all(1.5 < g < 2.5 for g, _ in params)  # not clamped: a gradient through gamma_ad would show
    grads = torch.autograd.grad(loss, xs)
    # the same loss with gamma_ad / alpha_ad plugged in as constants
    ref_xs = [x.detach().clone().requires_grad_(True) for x in xs]
    ref = sum(focal_loss(x, t, a, g) for x, t, (g, a) in zip(ref_xs, ts, params)) / 3
    ref_grads = torch.autograd.grad(ref, ref_xs)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)
    # sanity: letting gamma_ad carry a gradient changes it
    live_xs = [x.detach().clone().requires_grad_(True) for x in xs]
    live = 0
    for x, t in zip(live_xs, ts):
        g = -torch.log(torch.sigmoid(x[t > 0.5]).mean())
        live = live + focal_loss(x, t, 0.5 / g, g)
    live_grads = torch.autograd.grad(live / 3, live_xs)
    assert not torch.allclose(live_grads[0], grads[0])


def test_loss_rejects_bad_arguments():
    x, t = make_level(4, 2, [(0, 0, 0.5)], 0)
    with pytest.raises(ValueError, match="level_norm"):
        progressive_focal_loss([x], [t], level_norm="sum")
    with pytest.raises(ValueError):
        progressive_focal_loss([x, x], [t])
    with pytest.raises(ValueError):
        progressive_focal_loss([], [])


# --------------------------------------------------------------------------- DDP statistics
def _ddp_worker(rank: int, world: int, init_file: str, out_dir: str, halves: list) -> None:
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        xs, ts = halves[rank]
        out = {stat: level_focal_params(xs, ts, gamma_stat=stat) for stat in ("log_of_mean", "mean_of_log")}
        pos = [torch.sigmoid(x[t > 0.5]) for x, t in zip(xs, ts)]
        out["single"] = [adaptive_focal_params(p) for p in pos]
        with open(f"{out_dir}/rank{rank}.json", "w") as f:
            json.dump(out, f)
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(hang_guard(15))
def test_ddp_params_equal_whole_batch(tmp_path):
    import torch.multiprocessing as mp
    # rank 0 and rank 1 hold unequal numbers of positives per level (a mean of means would be wrong);
    # level 2 has positives on rank 1 only, level 3 none at all
    first = [make_level(6, 2, [(0, 0, 0.9), (1, 1, 0.8), (2, 0, 0.7)], 10), make_level(4, 2, [(0, 1, 0.05)], 11),
             make_level(3, 2, [], 12), make_level(2, 2, [], 13)]
    second = [make_level(6, 2, [(4, 1, 0.02)], 14), make_level(4, 2, [(1, 0, 0.3), (3, 1, 0.2)], 15),
              make_level(3, 2, [(2, 1, 0.25)], 16), make_level(2, 2, [], 17)]
    halves = [([x for x, _ in h], [t for _, t in h]) for h in (first, second)]
    whole_x = [torch.cat([a, b]) for a, b in zip(halves[0][0], halves[1][0])]
    whole_t = [torch.cat([a, b]) for a, b in zip(halves[0][1], halves[1][1])]
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(tmp_path), halves), nprocs=2, join=True)
    for rank in (0, 1):
        got = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for stat in ("log_of_mean", "mean_of_log"):
            expected = level_focal_params(whole_x, whole_t, gamma_stat=stat)
            assert got[stat] == [pytest.approx(list(p), rel=1e-12) for p in expected]
            # and it is not what this rank alone would compute
            assert got[stat] != [pytest.approx(list(p)) for p in
                                 level_focal_params(*halves[rank], gamma_stat=stat)]
        single = [adaptive_focal_params(torch.sigmoid(x[t > 0.5])) for x, t in zip(whole_x, whole_t)]
        assert got["single"] == [pytest.approx(list(p), rel=1e-12) for p in single]
    assert got["log_of_mean"][3] == [2.0, 0.25]


# --------------------------------------------------------------------------- the head and the plugin
def test_head_splits_levels_and_drops_ignored_anchors():
    head = ProgressiveFocalHead(8, 1, 3)
    head([torch.zeros(2, 8, 2, 2), torch.zeros(2, 8, 1, 1)])  # records 4 + 1 anchors per image
    assert head.anchors_per_level == [4, 1]
    logits = torch.zeros(2, 5, 3, dtype=torch.float64)
    # image 0: anchor 0 (level 0) positive class 1 at p = e^-2; anchor 3 ignored; anchor 4 (level 1) positive
    # class 0 at p = e^-3 (clamped to 2.5). Image 1: anchor 2 (level 0) positive class 2 at p = e^-1.8.
    logits[0, 0, 1], logits[0, 4, 0], logits[1, 2, 2] = logit(P2), logit(math.exp(-3)), logit(math.exp(-1.8))
    targets = [{"labels": torch.tensor([1, 0])}, {"labels": torch.tensor([2])}]
    matched = [torch.tensor([0, -1, -1, -2, 1]), torch.tensor([-1, -1, 0, -1, -1])]
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    g0 = (2.0 + 1.8) / 2  # the default gamma_stat: mean of -log p
    lvl0_x = torch.cat([logits[0, :3], logits[1, :4]])
    lvl0_t = torch.zeros(7, 3, dtype=torch.float64)
    lvl0_t[0, 1] = lvl0_t[5, 2] = 1
    lvl1_x = logits[:, 4]
    lvl1_t = torch.tensor([[1.0, 0, 0], [0, 0, 0]], dtype=torch.float64)
    expected = (focal_loss(lvl0_x, lvl0_t, 0.5 / g0, g0) + focal_loss(lvl1_x, lvl1_t, 0.2, 2.5)) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)
    assert head.pop_epoch_params() == [pytest.approx((g0, 0.5 / g0)), pytest.approx((2.5, 0.2))]
    assert head.pop_epoch_params() == []
    # image 1 without positives: the normaliser counts it as one (2 + 1), not the batch total 2
    matched[1] = torch.tensor([-1, -1, -1, -1, -1])
    lvl0_t[5, 2] = 0
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    expected = (focal_loss(lvl0_x, lvl0_t, 0.25, 2.0) + focal_loss(lvl1_x, lvl1_t, 0.2, 2.5)) / 3
    torch.testing.assert_close(loss, expected, rtol=1e-9, atol=0)


TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)


def test_model_trains_one_step_and_reports_per_level_params():
    torch.manual_seed(0)
    method = UMOP({"level_norm": "mean_of_levels"})
    ctx = StageContext(stage="train", detector=TINY, arch="retinanet", schedule=ScheduleSpec(epochs=1),
                       num_classes=3, class_names=["a", "b", "c"], device=torch.device("cpu"), seed=0)
    model = method.build_model("train", ctx).train()
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 12.0, 12.0]]),
                "labels": torch.tensor([3, 2])}]
    for _ in range(2):
        terms = method.training_losses("train", model, images, targets, ctx)
        assert set(terms) == {"classification", "bbox_regression"}
        assert all(math.isfinite(v.item()) for v in terms.values())
    sum(terms.values()).backward()
    metrics = method.epoch_metrics("train", model, ctx)
    assert set(metrics) == {f"umop/{k}/P{i}" for k in ("gamma_ad", "alpha_ad") for i in range(3, 8)}
    for i in range(3, 8):
        assert 1.5 <= metrics[f"umop/gamma_ad/P{i}"] <= 2.5
        assert 0.2 <= metrics[f"umop/alpha_ad/P{i}"] <= 0.5 / 1.5
    assert method.epoch_metrics("train", model, ctx) == {}  # reset after each call


def test_config_defaults_validation_and_search_space():
    cfg = UMOPConfig()
    assert (cfg.gamma, cfg.delta, cfg.w, cfg.level_norm, cfg.gamma_stat, cfg.variant) == \
        (2.0, 0.5, 0.5, "total_positives", "mean_of_log", "")  # the released code's configuration
    assert UMOP({"variant": "mean_of_levels", "level_norm": "mean_of_levels"}).variant == "mean_of_levels"
    for bad in ({"level_norm": "sum"}, {"gamma_stat": "median"}, {"delta": 2.0}, {"delta": -0.1},
                {"w": 2.0}, {"unknown": 1}):
        with pytest.raises(ConfigError):
            UMOP.validate_config(bad)
    space = UMOP.default_search
    for key, dist in space.items():
        UMOP.check_search_key(key)
        lo, hi = dist["uniform"]
        UMOPConfig(**{key: lo}), UMOPConfig(**{key: hi})
    UMOPConfig(delta=max(space["delta"]["uniform"]), w=max(space["w"]["uniform"]))  # corner still valid
