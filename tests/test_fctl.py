"""FCTL: Sobel magnitude, EANSDL and its decay on hand-computed tensors, the fast Omega against the
literal definition, the frozen ideal model, degraded twins, config, artifact key and the engine loop."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import methods.fctl as fctl_mod
from harness.config import DetectorSpec, ScheduleSpec
from harness.core import ConfigError
from harness.plugin import StageContext
from harness.plugin import METHODS
from methods.fctl import (FCTL, CorrectiveModel, FCTLConfig, OmegaSum, decay, eansdl, level_radius,
                          omega_map_reference, sobel_magnitude)

ROOT = Path(__file__).resolve().parent.parent
TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)
EPS = 1e-6


def ctx_for(stage="corrective", arch="faster_rcnn", **kw) -> StageContext:
    return StageContext(stage=stage, detector=TINY, arch=arch, schedule=ScheduleSpec(epochs=2),
                        num_classes=3, class_names=["a", "b", "c"], device=torch.device("cpu"), seed=0, **kw)


def twin_batch():
    g = torch.Generator().manual_seed(0)
    clean = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    pairs = [(c, (c * 0.5 + 0.3).clamp(0, 1)) for c in clean]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1])},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0]]), "labels": torch.tensor([3])}]
    return pairs, targets


# --------------------------------------------------------------------------- Sobel
def test_sobel_constant_map_has_zero_gradient_up_to_eps():
    g = sobel_magnitude(torch.full((2, 3, 5, 4), 7.0))
    assert g.shape == (2, 3, 5, 4)
    assert torch.allclose(g, torch.full_like(g, math.sqrt(EPS)))


def test_sobel_hand_computed_corner_and_ramp():
    # Replicate padding worked by hand: a single corner pixel, and a vertical ramp (Gy = 4, Gx = 0).
    x = torch.tensor([[[[1.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [1.0, 1.0]]]])
    g = sobel_magnitude(x)
    corner = torch.tensor([[18.0, 10.0], [10.0, 2.0]]).add(EPS).sqrt()
    assert torch.allclose(g[0, 0], corner, atol=1e-6)
    assert torch.allclose(g[0, 1], torch.full((2, 2), math.sqrt(16 + EPS)), atol=1e-6)


def test_sobel_is_per_channel_and_rejects_other_ranks():
    x = torch.randn(1, 2, 6, 6)
    assert torch.allclose(sobel_magnitude(x)[:, 1:], sobel_magnitude(x[:, 1:]))
    with pytest.raises(ValueError, match="N x C x H x W"):
        sobel_magnitude(torch.zeros(3, 4, 4))


# --------------------------------------------------------------------------- decay, radius
@pytest.mark.parametrize("progress,alpha,beta", [(0.0, 2.0, 1.0), (0.5, 2.0, 1.0), (0.37, 3.0, 2.0),
                                                 (1.0, 0.5, 0.5)])
def test_decay_formula(progress, alpha, beta):
    assert decay(progress, alpha, beta) == pytest.approx(math.exp(-alpha * progress ** beta), rel=1e-12)


def test_decay_defaults_and_bounds():
    assert decay(0.0) == 1.0 and decay(1.0) == pytest.approx(math.exp(-2.0))
    with pytest.raises(ValueError):
        decay(-0.1)


def test_level_radius_halves_per_level_at_least_one():
    assert [level_radius(k, 4) for k in range(5)] == [4, 2, 1, 1, 1]
    assert [level_radius(k, 8) for k in range(5)] == [8, 4, 2, 1, 1]
    assert level_radius(0, 1) == 1


# --------------------------------------------------------------------------- EANSDL
def test_identical_features_give_zero():
    a = torch.randn(2, 4, 9, 7)
    for level in range(3):
        assert eansdl(a, a.clone(), level).item() == 0.0


def test_hand_computed_two_by_two_two_channel_example():
    """A: channel 0 a vertical ramp, channel 1 a corner pixel; B = 0; level 2 -> r = 1; progress 0.5."""
    a = torch.tensor([[[[0.0, 0.0], [1.0, 1.0]], [[1.0, 0.0], [0.0, 0.0]]]], dtype=torch.float64)
    b = torch.zeros_like(a)
    e = math.sqrt(EPS)  # G(B) everywhere
    ramp = math.sqrt(16 + EPS) - e                          # D on channel 0: constant, Omega = 0
    d00, d01, d11 = (math.sqrt(18 + EPS) - e, math.sqrt(10 + EPS) - e, math.sqrt(2 + EPS) - e)
    local = lambda v: math.exp(-v) * v  # noqa: E731
    # Clamped 3x3 windows on a 2x2 map: own pixel x4, the two edge neighbours x2, the diagonal x1.
    omega = [(2 * (d00 - d01) * 2 + (d00 - d11)) / 9,      # (0, 0)
             (2 * (d00 - d01) + 2 * (d01 - d11)) / 9,       # (0, 1); (1, 0) the same
             (2 * (d00 - d01) + 2 * (d01 - d11)) / 9,
             ((d00 - d11) + 2 * 2 * (d01 - d11)) / 9]       # (1, 1)
    per_pixel = [local(ramp)] * 4 + [local(d00) + 0.5 * omega[0], local(d01) + 0.5 * omega[1],
                                     local(d01) + 0.5 * omega[2], local(d11) + 0.5 * omega[3]]
    expected = math.exp(-2.0 * 0.5) * sum(per_pixel) / 8
    got = eansdl(a, b, level=2, r0=4, lambda_omega=0.5, progress=0.5, alpha=2.0, beta=1.0)
    assert got.item() == pytest.approx(expected, rel=1e-9)
    assert eansdl(a, b, level=2, progress=0.5, reference=True).item() == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("shape,r", [((2, 3, 7, 9), 4), ((1, 2, 2, 2), 1), ((1, 1, 1, 1), 1),
                                     ((2, 5, 11, 6), 2), ((1, 3, 3, 5), 4), ((1, 4, 16, 16), 3)])
def test_fast_omega_equals_the_literal_definition(shape, r, monkeypatch):
    monkeypatch.setattr(fctl_mod, "CPU_CHUNK_ELEMENTS", 64)  # force several chunks
    torch.manual_seed(0)
    d = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    ref = omega_map_reference(d, r).sum() * (2 * r + 1) ** 2
    (g_ref,) = torch.autograd.grad(ref, d)
    fast = OmegaSum.apply(d, r)
    (g_fast,) = torch.autograd.grad(fast, d)
    assert fast.item() == pytest.approx(ref.item(), rel=1e-12)
    assert torch.allclose(g_fast, g_ref, atol=1e-12)


def test_fast_eansdl_value_and_gradient_match_reference():
    torch.manual_seed(1)
    a = torch.randn(2, 3, 12, 10, dtype=torch.float64)
    b = torch.randn(2, 3, 12, 10, dtype=torch.float64, requires_grad=True)
    kw = dict(r0=4, lambda_omega=0.7, progress=0.3, alpha=1.5, beta=2.0)
    for level in (0, 1, 3):
        fast, ref = eansdl(a, b, level, **kw), eansdl(a, b, level, reference=True, **kw)
        (gf,), (gr,) = torch.autograd.grad(fast, b), torch.autograd.grad(ref, b)
        assert fast.item() == pytest.approx(ref.item(), rel=1e-12)
        assert torch.allclose(gf, gr, atol=1e-12)


def test_fast_eansdl_keeps_no_per_offset_tensors():
    """Autograd saves two copies of the map for the fast loss, ~(2r+1)^2 for the literal one."""
    a, b = torch.randn(1, 4, 16, 16), torch.randn(1, 4, 16, 16, requires_grad=True)

    def saved_elements(reference: bool) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            eansdl(a, b, 0, r0=4, reference=reference)
        return sum(sizes)
    assert saved_elements(False) <= 3 * b.numel()
    assert saved_elements(True) >= 81 * b.numel()


def test_eansdl_shape_mismatch():
    with pytest.raises(ValueError, match="equal"):
        eansdl(torch.zeros(1, 2, 4, 4), torch.zeros(1, 2, 4, 5), 0)


# --------------------------------------------------------------------------- the corrective model
def test_ideal_is_frozen_and_gradients_reach_only_the_corrective_model(tmp_path):
    torch.manual_seed(0)
    method = FCTL()
    ideal_file = tmp_path / "ideal.pt"
    torch.save(fctl_mod.build_detector(TINY, 3, arch="faster_rcnn").state_dict(), ideal_file)
    ctx = ctx_for(artifacts={"ideal": ideal_file})
    model = method.build_model("corrective", ctx)
    ref = {k: v.clone() for k, v in model.ideal.state_dict().items()}
    # starts from the ideal weights
    assert all(torch.equal(v, ref[k]) for k, v in model.detector.state_dict().items())
    model.train()
    assert not model.ideal.training and all(not p.requires_grad for p in model.ideal.parameters())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pairs, targets = twin_batch()
    terms = method.training_losses("corrective", model, pairs, targets, ctx)
    assert "eansdl" in terms and terms["eansdl"].item() > 0
    sum(terms.values()).backward()
    assert all(p.grad is None for p in model.ideal.parameters())
    assert model.detector.backbone.body.conv1.weight.grad.abs().sum() > 0
    opt.step()
    assert all(torch.equal(v, ref[k]) for k, v in model.ideal.state_dict().items())  # BN stats too
    metrics = method.epoch_metrics("corrective", model, ctx)
    assert metrics["fctl/decay"] == pytest.approx(1.0) and metrics["fctl/eansdl"] > 0
    assert method.epoch_metrics("corrective", model, ctx) == {}  # reset after each epoch


def test_feature_loss_is_decayed_with_progress_and_weighted():
    torch.manual_seed(0)
    det = fctl_mod.build_detector(TINY, 3, arch="faster_rcnn")
    ideal = fctl_mod.build_detector(TINY, 3, arch="faster_rcnn")
    model = CorrectiveModel(det, ideal, (0, 1), lambda_fs=3.0).train()
    pairs, targets = twin_batch()
    torch.manual_seed(1)
    early = model(pairs, targets, progress=0.0)["eansdl"]
    torch.manual_seed(1)
    late = model(pairs, targets, progress=0.5)["eansdl"]
    assert late.item() == pytest.approx(early.item() * math.exp(-1.0), rel=1e-5)
    assert model.stats["steps"] == 2


def test_degraded_only_variant_has_no_feature_term():
    method = FCTL({"variant": "degraded_only"})
    assert method.active_stages == ("ideal", "corrective")
    model = method.build_model("corrective", ctx_for()).train()
    assert model.ideal is None
    pairs, targets = twin_batch()
    assert "eansdl" not in method.training_losses("corrective", model, pairs, targets, ctx_for())
    scratch = FCTL({"variant": "degraded_only", "init_from_ideal": False})
    assert scratch.active_stages == ("corrective",)


def test_retinanet_corrective_step():
    method = FCTL({"levels": [0, 4]})
    ctx = ctx_for(arch="retinanet")
    model = method.build_model("corrective", ctx).train()
    pairs, targets = twin_batch()
    terms = method.training_losses("corrective", model, pairs, targets, ctx)
    assert {"classification", "bbox_regression", "eansdl"} <= set(terms)
    sum(terms.values()).backward()


def test_levels_beyond_the_fpn_are_refused():
    method = FCTL({"levels": [5]})
    model = method.build_model("corrective", ctx_for()).train()
    with pytest.raises(ConfigError, match="levels"):
        method.training_losses("corrective", model, *twin_batch(), ctx_for())


# --------------------------------------------------------------------------- data, config
def test_train_dataset_gives_geometry_sharing_twins(tiny_data):
    from harness.data import CocoDetection
    from harness.data import load_split
    method = FCTL({"train_conditions": ["fog@3", "dark@2"]})
    data = CocoDetection(load_split(tiny_data, "train"))
    twins = method.train_dataset("corrective", ctx_for(), data)
    assert method.train_dataset("ideal", ctx_for(), data) is data
    twins.set_epoch(1)
    (clean, degraded), target = twins[0]
    assert clean.shape == degraded.shape and not torch.equal(clean, degraded)
    assert torch.equal(target["boxes"], data[0][1]["boxes"])


def test_train_conditions_default_to_the_suites_corruptions():
    method = FCTL()
    from harness.data import PreparedCondition
    conds = [PreparedCondition("fog@3", "fog", 3, "a.json", "imgs"),
             PreparedCondition("rtts", "rtts", 0, "b.json", "rtts", by_name=True)]
    assert [c.label for c in method.train_conditions(ctx_for(conditions=conds))] == ["fog@3"]
    with pytest.raises(ConfigError, match="train_conditions"):
        method.train_conditions(ctx_for())


def test_config_defaults_validation_and_sweepable_fields():
    c = FCTLConfig()
    assert (c.lambda_fs, c.r0, c.lambda_omega, c.alpha, c.beta) == (1.0, 4, 0.5, 2.0, 1.0)
    assert c.levels == (0, 1, 2, 3, 4)
    with pytest.raises(ConfigError, match="moves pixels"):
        FCTL.validate_config({"train_conditions": ["motion_blur@2"]})
    with pytest.raises(ConfigError, match="levels"):
        FCTL.validate_config({"levels": [0, 0]})
    with pytest.raises(ConfigError):
        FCTL.validate_config({"r0": 0})
    for key in ("lambda_fs", "r0", "lambda_omega", "alpha", "beta", "levels", *FCTL.default_search):
        FCTL.check_search_key(key)


def test_ideal_artifact_key_ignores_every_fctl_field():
    from harness.plan import stage_artifact_key
    from dataclasses import replace
    from runkit import make_cell
    cell = make_cell("fctl", {}, {"name": "d", **{f: "x" for f in ("train_annotations", "train_images",
                     "val_annotations", "val_images")}}, detector=TINY, schedule=ScheduleSpec())
    key = stage_artifact_key(cell, "ideal")
    for change in ({"lambda_fs": 3.0}, {"r0": 2}, {"alpha": 1.0, "beta": 2.0}, {"variant": "degraded_only"},
                   {"train_conditions": ["rain@2"]}):
        swept = replace(cell, method_config=FCTLConfig(**change).model_dump())
        assert stage_artifact_key(swept, "ideal") == key, change
    assert stage_artifact_key(replace(cell, seed=1), "ideal") != key


def test_weather_suite_is_valid():
    from harness.plan import load_suite
    from harness.config import method_label
    suite = load_suite(ROOT / "suites" / "fctl_weather.yaml", check_paths=False)
    labels = {method_label(m): m for m in suite.methods}
    names = {c if isinstance(c, str) else c.get("corruption") for c in suite.conditions}
    assert {"rain", "fog", "dark"} <= {n.split("@")[0] for n in names if n}
    corrective = [m for m in suite.methods if m.name == "fctl" and m.config.get("variant", "fctl") == "fctl"]
    assert corrective, "the weather suite has no FCTL (corrective) row"
    for m in corrective:
        assert m.baseline in labels and labels[m.baseline].config.get("variant") == "degraded_only"


def test_harness_runs_ideal_then_corrective(tiny_data, tmp_path):
    """The engine's own loop: degraded twins per epoch, the ideal artifact, EANSDL and decay logged."""
    from harness.plan import stage_job
    from harness.engine import run_stage
    from runkit import make_cell
    cell = make_cell("fctl", {"train_conditions": ["fog@2"], "levels": [0, 1]}, tiny_data, detector=TINY,
                     schedule=ScheduleSpec(epochs=2, batch_size=4, warmup_iters=1))
    _, ideal = run_stage(stage_job(cell, "ideal"), device=torch.device("cpu"), max_steps=1)
    art = tmp_path / "detector.pt"
    torch.save(ideal.state_dict(), art)
    state, model = run_stage(stage_job(cell, "corrective", {"ideal": str(art)}), device=torch.device("cpu"))
    first, last = state.history
    assert {"train/eansdl", "fctl/eansdl", "fctl/decay", "val/AP"} <= set(last)
    assert last["fctl/decay"] < first["fctl/decay"] < 1.0
    ref = ideal.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in model.ideal.state_dict().items())


def test_registered():
    assert METHODS.get("fctl") is FCTL
