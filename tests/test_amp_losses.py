"""Mixed precision (``schedule.amp``): the methods' full-precision loss terms under CPU bf16 autocast,
and one training step of every registered method's last stage (and SoCo's pretraining) under it.

How a term is checked (:func:`check_term`): its inputs are rounded to bf16 (what autocast hands
a loss: the outputs of bf16 convs / linears), marked for gradients, and the term is computed
inside ``torch.autocast("cpu", torch.bfloat16)``. The value must be a finite float32 scalar,
gradients must reach every bf16 input (in bf16, finite, not all zero), and the value must agree

* with the same term computed in plain fp32 (no autocast) on those bf16 values upcast, to
  ``RTOL_UPCAST`` = 1e-5: both compute in float32 from identical numbers, so a term that
  silently computed in bf16 inside autocast (8-bit mantissa: ~4e-3 per operation) fails here;
* with the term on the original fp32 inputs, to ``RTOL_INPUTS`` = 2e-2: there the only
  difference is the rounding of the inputs to bf16 (relative 2^-9 ~ 2e-3 per element, i.e.
  ~3 significant digits); through squares, Sobel differences, exp and softmax that stays a few
  1e-3 on these inputs, and 2e-2 leaves headroom without hiding a real bf16 computation.

The measured differences are printed (``pytest -s``).
"""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from harness.config import DetectorSpec, ScheduleSpec
from harness.plugin import StageContext
from harness.modeling import FASTER_RCNN_STRIDES, build_detector
from harness.plugin import METHODS
from runkit import detection_batch, method_context
from methods import fctl as fctl_mod
from methods import soco as soco_mod
from methods.defeat import decoupled_kd_loss, decoupled_neck_loss, gt_level_masks, make_adapters
from methods.fctl import OmegaSum, eansdl, sobel_magnitude
from methods.focal import focal_loss
from methods.soco import SoCo, byol_loss
from methods.umop import _level_stats, adaptive_focal_params, level_focal_params, progressive_focal_loss

BF16 = torch.bfloat16
RTOL_UPCAST = 1e-5   # vs fp32 on the same (bf16-rounded) values: float32 arithmetic on both sides
RTOL_INPUTS = 2e-2   # vs fp32 on the original inputs: bf16 input rounding only (~3 significant digits)
TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)
SOCO_SMALL = dict(view_size=64, small_view_size=32, proj_hidden=64, proj_dim=32, pred_hidden=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: one torch thread for this module


def amp():
    return torch.autocast("cpu", dtype=BF16)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def check_term(name: str, fn, inputs: list[torch.Tensor], grad_of: tuple[int, ...] = (0,),
               rtol: float = RTOL_INPUTS) -> float:
    """``fn(*inputs)`` on bf16 inputs under autocast vs fp32; returns the relative difference to the
    fp32 value on the original inputs (see the module docstring)."""
    low = [x.detach().to(BF16).requires_grad_(i in grad_of) for i, x in enumerate(inputs)]
    with amp():
        value = fn(*low)
    assert value.dtype == torch.float32 and value.ndim == 0, (name, value.dtype)
    assert torch.isfinite(value), name
    value.backward()
    for i in grad_of:
        g = low[i].grad
        assert g is not None and g.dtype == BF16 and torch.isfinite(g).all() and g.abs().sum() > 0, (name, i)
    upcast = fn(*[x.detach().float() for x in low])
    exact = fn(*[x.detach() for x in inputs])
    assert upcast.dtype == exact.dtype == torch.float32
    d_up, d_in = rel(value.item(), upcast.item()), rel(value.item(), exact.item())
    print(f"\n{name}: bf16-autocast {value.item():.6g}, fp32 {exact.item():.6g}; "
          f"rel diff vs upcast inputs {d_up:.2e}, vs fp32 inputs {d_in:.2e}")
    assert d_up <= RTOL_UPCAST, (name, d_up)
    assert d_in <= rtol, (name, d_in)
    return d_in


# --------------------------------------------------------------------------- FCTL
@pytest.mark.parametrize("level", [0, 2])
def test_eansdl_bf16(level):
    g = torch.Generator().manual_seed(level)
    a, b = torch.randn(2, 4, 16, 12, generator=g), torch.randn(2, 4, 16, 12, generator=g)
    kw = dict(r0=4, lambda_omega=0.5, progress=0.3, alpha=2.0, beta=1.0)
    # A = the frozen ideal model's features (no gradient), B = the trained model's
    fn = lambda deg, ideal: eansdl(ideal, deg, level, **kw)  # noqa: E731
    check_term(f"eansdl level {level}", fn, [b, a], grad_of=(0,))
    check_term(f"eansdl level {level}, grads to both", fn, [b, a], grad_of=(0, 1))


def test_sobel_and_omega_sum_compute_in_fp32_under_autocast():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 3, 9, 7, generator=g)
    low = x.to(BF16).requires_grad_(True)
    with amp():
        s = sobel_magnitude(low)
        omega = OmegaSum.apply(s - s.detach().flip(-1), 2)
    assert s.dtype == torch.float32 and omega.dtype == torch.float32
    ref_s = sobel_magnitude(low.detach().float())
    assert torch.allclose(s.detach(), ref_s, rtol=1e-6, atol=0)
    ref_o = OmegaSum.apply(ref_s - ref_s.flip(-1), 2)
    assert rel(omega.item(), ref_o.item()) <= RTOL_UPCAST
    omega.backward()
    assert low.grad.dtype == BF16 and torch.isfinite(low.grad).all() and low.grad.abs().sum() > 0
    # fp32 outside autocast is untouched: same tensor type, same value as before
    assert sobel_magnitude(x).dtype == torch.float32
    d = torch.randn(1, 2, 5, 5, generator=g, dtype=torch.float64)
    assert OmegaSum.apply(d, 1).dtype == torch.float64


# --------------------------------------------------------------------------- DeFeat
def _neck_inputs(seed: int):
    g = torch.Generator().manual_seed(seed)
    sizes = [(16, 16), (8, 8), (4, 4), (2, 2), (1, 1)]
    s = [torch.randn(2, 8, h, w, generator=g) for h, w in sizes]
    t = [torch.randn(2, 8, h, w, generator=g) for h, w in sizes]
    boxes = [torch.tensor([[4.0, 4.0, 40.0, 30.0]]), torch.tensor([[0.0, 10.0, 20.0, 60.0]])]
    masks = gt_level_masks(boxes, sizes, FASTER_RCNN_STRIDES, canonical=16.0)
    return s, t, masks


@pytest.mark.parametrize("identity", [False, True])
def test_defeat_neck_loss_bf16(identity):
    torch.manual_seed(0)
    s, t, masks = _neck_inputs(0)
    adapters = make_adapters(8, 5)  # the released init (|w| < 2e-4): phi(S) ~ bias
    if identity:  # phi(S) = S: the loss sees the student's features themselves
        with torch.no_grad():
            for conv in adapters:
                conv.weight.zero_()
                conv.bias.zero_()
                conv.weight[torch.arange(8), torch.arange(8), 1, 1] = 1.0
    n = len(s)
    fn = lambda *x: decoupled_neck_loss(list(x[:n]), list(x[n:]), masks, adapters)  # noqa: E731
    check_term(f"defeat neck (identity adapters={identity})", fn, s + t, grad_of=tuple(range(n)))
    assert all(a.weight.grad is not None and torch.isfinite(a.weight.grad).all() for a in adapters)


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_defeat_kd_kl_bf16(temperature):
    g = torch.Generator().manual_seed(1)
    zs, zt = torch.randn(12, 4, generator=g) * 2, torch.randn(12, 4, generator=g) * 2
    pos = torch.tensor([1, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 0], dtype=torch.bool)
    fn = lambda a, b: decoupled_kd_loss(a, b, pos, T_obj=temperature, T_bg=temperature)  # noqa: E731
    check_term(f"defeat KD KL T={temperature}", fn, [zs, zt], grad_of=(0,))
    # an empty group: still float32 and connected
    low = zs.to(BF16).requires_grad_(True)
    with amp():
        v = decoupled_kd_loss(low, zt.to(BF16), torch.zeros(12, dtype=torch.bool))
    assert v.dtype == torch.float32 and torch.isfinite(v)


# --------------------------------------------------------------------------- UMOP
def _pfl_levels(seed: int):
    """Three levels of [n, 4] logits + one-hot targets; positives around p = 0.12 (gamma_ad ~ 2.1,
    inside [gamma - delta, gamma + delta] so the statistic is not clamped); the last has none."""
    g = torch.Generator().manual_seed(seed)
    levels = []
    for n, n_pos in ((40, 5), (20, 3), (10, 0)):
        x = torch.randn(n, 4, generator=g) * 2 - 2
        t = torch.zeros(n, 4)
        rows = torch.randperm(n, generator=g)[:n_pos]
        cls = torch.randint(0, 4, (n_pos,), generator=g)
        t[rows, cls] = 1.0
        x[rows, cls] = -2.0 + 0.5 * torch.randn(n_pos, generator=g)
        levels.append((x, t))
    return [x for x, _ in levels], [t for _, t in levels]


@pytest.mark.parametrize("gamma_stat", ["mean_of_log", "log_of_mean"])
@pytest.mark.parametrize("level_norm", ["total_positives", "mean_of_levels"])
def test_umop_pfl_bf16(gamma_stat, level_norm):
    xs, ts = _pfl_levels(0)
    n = len(xs)
    kw = dict(gamma=2.0, delta=0.5, w=0.5, gamma_stat=gamma_stat, level_norm=level_norm)
    fn = lambda *a: progressive_focal_loss(list(a[:n]), list(a[n:]), image_positives=[5, 3], **kw)  # noqa: E731
    check_term(f"umop PFL {gamma_stat}/{level_norm}", fn, xs + ts, grad_of=tuple(range(n)))


@pytest.mark.parametrize("gamma_stat", ["mean_of_log", "log_of_mean"])
def test_umop_gamma_alpha_statistics_bf16(gamma_stat):
    xs, ts = _pfl_levels(1)
    low = [x.to(BF16) for x in xs]
    kw = dict(gamma=2.0, delta=0.5, w=0.5, gamma_stat=gamma_stat)
    with amp():
        got = level_focal_params(low, [t.to(BF16) for t in ts], **kw)
        stats = _level_stats([x.reshape(-1) for x in low])
        probs = torch.sigmoid(low[0][ts[0] > 0.5])  # bf16 (sigmoid is not an autocast op)
        one = adaptive_focal_params(probs, **kw)
    assert stats.dtype == torch.float64
    assert torch.equal(stats, _level_stats([x.float().reshape(-1) for x in low]))
    upcast = level_focal_params([x.float() for x in low], ts, **kw)
    exact = level_focal_params(xs, ts, **kw)
    assert got == upcast  # float64 statistics from the same values: identical
    worst = 0.0
    for (g, a), (ge, ae) in zip(got, exact):
        assert math.isfinite(g) and math.isfinite(a)
        worst = max(worst, rel(g, ge), rel(a, ae))
    print(f"\numop gamma_ad/alpha_ad {gamma_stat}: {got} vs fp32 {exact}; max rel diff {worst:.2e}")
    assert worst <= RTOL_INPUTS
    assert 1.5 < got[0][0] < 2.5 and got[2] == (2.0, 0.25)  # not clamped; no positives: neutral
    assert one == adaptive_focal_params(probs.float(), **kw)
    assert rel(one[0], got[0][0]) <= RTOL_INPUTS  # probabilities rounded to bf16 before the statistic


# --------------------------------------------------------------------------- SoCo
def test_soco_byol_loss_bf16():
    g = torch.Generator().manual_seed(2)
    q, z = torch.randn(16, 32, generator=g), torch.randn(16, 32, generator=g)
    check_term("soco byol", byol_loss, [q, z], grad_of=(0,))
    # nearly aligned pairs (the loss near 0, where 2 - 2 cos cancels): still well within tolerance
    check_term("soco byol aligned", byol_loss, [q, q + 0.3 * z], grad_of=(0,))


def test_soco_pretrain_step_under_autocast(tmp_path, monkeypatch):
    """The pretraining model (SoCo's heads, EMA target) trains under bf16 autocast; RoIs stay float32."""
    torch.manual_seed(0)
    m = SoCo({**SOCO_SMALL, "view_size": 32, "small_view_size": 16, "proposal_cache": str(tmp_path / "props")})
    ctx = ctx_for(SoCo, "pretrain")
    model = m.build_model("pretrain", ctx).train()
    roi_dtypes = []
    real = soco_mod.roi_align

    def spy(feat, rois, *a, **kw):
        roi_dtypes.append(rois.dtype)
        return real(feat, rois, *a, **kw)

    monkeypatch.setattr(soco_mod, "roi_align", spy)
    images, targets = batch()
    with amp():
        terms = m.training_losses("pretrain", model, images, targets, ctx)
        loss = sum(terms.values())
    assert terms["byol"].dtype == torch.float32 and torch.isfinite(loss)
    assert roi_dtypes and set(roi_dtypes) == {torch.float32}  # box coordinates not rounded to bf16
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(gr).all() for gr in grads)
    assert model.predictor[0].weight.grad.abs().sum() > 0


# --------------------------------------------------------------------------- focal
@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (-1.0, 0.0)])
def test_focal_loss_bf16(alpha, gamma):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 5, generator=g) * 3 - 2  # mostly easy negatives, as on RetinaNet anchors
    t = (torch.rand(200, 5, generator=g) < 0.03).float()
    check_term(f"focal alpha={alpha} gamma={gamma}", lambda a, b: focal_loss(a, b, alpha, gamma), [x, t])
    with amp():
        none = focal_loss(x.to(BF16), t, alpha, gamma, reduction="none")
    assert none.dtype == torch.float32 and none.shape == x.shape


# --------------------------------------------------------------------------- every method's training step
ctx_for, batch = method_context, detection_batch


@pytest.mark.parametrize("name", METHODS.names())
def test_last_stage_trains_under_bf16_autocast(name, tmp_path):
    """One step of the last stage as ``run_stage`` runs it with ``schedule.amp`` (CPU: bf16): the
    earlier stages' artifacts are their (untrained) detectors, saved as the harness saves them."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    method = cls(cls.test_config(tmp_path))
    *earlier, last = method.active_stages
    artifacts = {}
    for stage in earlier:
        spec = method.stage_detector(stage, TINY)
        ctx = ctx_for(type(method), stage)
        ctx.detector = spec
        model = method.build_model(stage, ctx)
        artifacts[stage] = tmp_path / f"{stage}.pt"
        torch.save(method.detector_of(model).state_dict(), artifacts[stage])
        del model
    ctx = ctx_for(type(method), last, artifacts)
    ctx.detector = method.stage_detector(last, TINY)
    model = method.build_model(last, ctx).train()
    images, targets = batch()
    with amp():
        terms = method.training_losses(last, model, method.example_inputs(last, images), targets, ctx)
        loss = sum(terms.values())
    assert terms
    for k, v in terms.items():
        assert torch.is_tensor(v) and v.ndim == 0 and torch.isfinite(v), (k, v)
        assert v.dtype == torch.float32, (k, v.dtype)  # the harness sums and logs the terms
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # autocast never touches the weights
