"""FCTL: feature corrective transfer learning with the EANSDL loss (Wei et al., CVPRW 2024).

Follows docs/methods.md, section "FCTL". The paper published no code, so this file is
meant to be read as the reference. Two stages, ``ideal -> corrective``:

* ``ideal``: the suite's detector trained on clean images. Its artifact is keyed
  by data / detector / schedule / seed only (``Stage("ideal")`` reads no field),
  so a sweep over ``lambda_fs``, ``r0``, ``alpha``, ``beta``, ... trains it once.
* ``corrective``: the same architecture, initialised from the ideal weights,
  trained on degraded twins x' of the training images with

      L = L_det(x') + lambda_fs * sum_{levels l} EANSDL(F_ideal(x)_l, F(x')_l)

  where ``F_ideal`` is the frozen ideal model (eval mode, ``requires_grad=False``,
  run under ``no_grad``) on the CLEAN twin x. Both twins share their geometry
  (:class:`harness.data.DegradedTwins`; corruptions that move pixels are
  refused).

EANSDL of one FPN level (:func:`eansdl`), with G the per-channel Sobel magnitude
(:func:`sobel_magnitude`) and ``D = G(A) - G(B)``::

    EANSDL = decay(progress) * mean_{n,c,x,y}( exp(-|D|) |D| + lambda_omega * Omega )
    Omega(x, y) = 1/(2r+1)^2 sum_{|i|,|j| <= r} |D(x, y) - D(x+i, y+j)|   (indices clamped)
    r = max(1, floor(r0 / 2^level)),  decay(p) = exp(-alpha p^beta)

Omega is the cost: (2r+1)^2 = 81 shifted comparisons on the largest map at r0 = 4.
:func:`omega_map_reference` is the literal definition (a loop of shifted slices
under autograd, kept as the tests' oracle and the benchmark's reference);
:func:`eansdl` uses :class:`OmegaSum`, a custom autograd function that

1. needs only the SUM of Omega (the loss is a mean), so for an offset pair
   ``+o / -o`` both sums are read from ONE difference map ``|P(u) - P(u+o)|`` on the
   replicate-padded map P: the ``+o`` terms are that map over the interior window,
   the ``-o`` terms over the interior shifted by ``-o`` (exact, borders included);
2. never keeps per-offset tensors: the backward pass recomputes the signs and
   accumulates them in place into one padded gradient buffer, then folds the
   padding back (the adjoint of replicate padding);
3. works through the N*C planes in cache-sized chunks on CPU (all at once on a
   GPU) and never syncs with the host.

The Sobel magnitude of the trained features and the local term are recomputed in
the backward pass (activation checkpointing), so autograd keeps two copies of a
map per level between forward and backward instead of about seven.

Decisions where the specification (docs/methods.md) is silent (following the paper where it says something):

* ``levels``: FPN levels (0 = the largest map, P2 on Faster R-CNN, P3 on
  RetinaNet) that get the loss; default all five, summed as in the formula of docs/methods.md.
* ``train_conditions``: the degradations of the corrective stage; default (None)
  the suite's corruption conditions of the dataset (what it is tested on). Each
  training image gets one of them per epoch, drawn from (seed, epoch, index),
  corrupted on the fly (fresh corruption noise every epoch). The paper trains one
  model per degraded dataset: list one condition per method entry to do the same.
* ``variant: degraded_only`` is the paper's baseline, training on degraded images
  without the feature loss (lambda_fs is ignored). With ``init_from_ideal: true``
  (default) it starts from the same ideal weights as ``fctl``, so the gain of
  ``fctl`` over it isolates the EANSDL term; ``init_from_ideal: false`` trains it
  from scratch (the stage ``ideal`` is then skipped).
* The ideal model's transform must produce the same batch geometry as the
  corrective one's (same image size): checked every step.
* A corrective stage built without an ideal artifact (only the registry's smoke
  test does that) uses a random ideal model and logs a warning. A plain image
  instead of a ``(clean, degraded)`` pair counts as its own clean twin.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torch.utils.data import Dataset

from harness.core import ConfigError
from harness.modeling import build_detector, detection_losses
from harness.plugin import Method, MethodConfig, Stage, StageContext

log = logging.getLogger(__name__)

SOBEL_EPS = 1e-6
#: CPU working set of one OmegaSum chunk (elements of the padded planes, 4 MiB in float32):
#: large enough to amortise the per-offset Python calls, small enough to stay in cache.
CPU_CHUNK_ELEMENTS = 1 << 20


# --------------------------------------------------------------------------- mixed precision
def _full_precision(x: Tensor) -> Tensor:
    """``x`` in at least float32: fp16 / bf16 (autocast outputs) are upcast, float32 / float64 kept.

    Differentiable: the gradient flows back to ``x`` in ``x``'s own dtype.
    """
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _autocast_off(x: Tensor):
    """A context with autocast disabled for ``x``'s device: the ops inside run in their inputs' dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


# --------------------------------------------------------------------------- the loss
def sobel_magnitude(feat: Tensor, eps: float = SOBEL_EPS) -> Tensor:
    """Per-channel Sobel gradient magnitude ``sqrt(Gx^2 + Gy^2 + eps)``, N x C x H x W in and out.

    Unnormalised 3x3 kernels ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` (Gx) and its transpose
    (Gy), replicate padding: a constant map has zero gradient everywhere.
    Computed in float32 at least (fp16 / bf16 input from autocast is upcast: ``eps`` = 1e-6
    and the squared differences need it); float64 stays float64.
    """
    if feat.ndim != 4:
        raise ValueError(f"expected N x C x H x W features, got shape {tuple(feat.shape)}")
    with _autocast_off(feat):
        return _sobel_magnitude(_full_precision(feat), eps)


def _sobel_magnitude(feat: Tensor, eps: float) -> Tensor:
    # Separable: Gx = [1,2,1]^T (smooth rows) x [-1,0,1] (difference columns), Gy transposed.
    p = F.pad(feat, (1, 1, 1, 1), mode="replicate")
    dx = p[..., :, 2:] - p[..., :, :-2]                        # [N, C, H+2, W]
    gx = (dx[..., :-2, :] + dx[..., 2:, :]).add_(dx[..., 1:-1, :], alpha=2)
    del dx
    dy = p[..., 2:, :] - p[..., :-2, :]                        # [N, C, H, W+2]
    gy = (dy[..., :, :-2] + dy[..., :, 2:]).add_(dy[..., :, 1:-1], alpha=2)
    del dy, p
    if torch.is_grad_enabled() and feat.requires_grad:
        return (gx * gx + gy * gy + eps).sqrt()
    return gx.square_().add_(gy.square_()).add_(eps).sqrt_()   # no graph: in place


def decay(progress: float, alpha: float = 2.0, beta: float = 1.0) -> float:
    """Time decay ``D(progress) = exp(-alpha * progress^beta)``; progress = epoch / epochs (fractional)."""
    if progress < 0:
        raise ValueError(f"progress must be >= 0, got {progress}")
    return math.exp(-alpha * progress ** beta)


def level_radius(level: int, r0: int = 4) -> int:
    """Extended-area radius of FPN level ``level`` (0 = largest map): ``max(1, floor(r0 / 2^level))``."""
    if level < 0 or r0 < 1:
        raise ValueError(f"level must be >= 0 and r0 >= 1, got level={level}, r0={r0}")
    return max(1, r0 >> level)


def omega_map_reference(d: Tensor, r: int) -> Tensor:
    """Omega(x, y) of docs/methods.md for ``D = G(A) - G(B)``, literally: a loop over the (2r+1)^2 offsets.

    Clear and slow (autograd keeps every shifted difference): the oracle of the tests and
    the reference of ``make bench``. Returns a map of ``d``'s shape.
    """
    h, w = d.shape[-2:]
    p = F.pad(d, (r, r, r, r), mode="replicate")               # clamped neighbours
    total = torch.zeros_like(d)
    for i in range(-r, r + 1):
        for j in range(-r, r + 1):
            total = total + (d - p[..., r + i:r + i + h, r + j:r + j + w]).abs()
    return total / (2 * r + 1) ** 2


def _half_offsets(r: int) -> list[tuple[int, int]]:
    """One offset of each ``+o / -o`` pair (the zero offset contributes nothing)."""
    return [(i, j) for i in range(r + 1) for j in range(-r, r + 1) if i > 0 or j > 0]


def _offset_geometry(h: int, w: int, r: int, device, dtype):
    """Per half-offset: the region R of the padded map holding both windows, and its 0/1/2 weights.

    In padded coordinates the interior is I = [r, r+h) x [r, r+w). For offset o = (i, j),
    ``sum_{p in I} |P(p) - P(p+o)|`` and ``sum_{p in I} |P(p) - P(p-o)|`` are sums of
    ``M(u) = |P(u) - P(u+o)|`` over u in I and over u in I - o; R bounds both.
    """
    out = []
    for i, j in _half_offsets(r):
        r0, c0 = r - i, r - max(j, 0)
        rows, cols = h + i, w + abs(j)
        weight = torch.zeros(rows, cols, device=device, dtype=dtype)
        weight[r - r0:r - r0 + h, r - c0:r - c0 + w] += 1      # u in I
        weight[0:h, r - j - c0:r - j - c0 + w] += 1             # u in I - o
        out.append((i, j, r0, c0, rows, cols, weight))
    return out


def _chunk_planes(plane_elements: int, n_planes: int, device: torch.device) -> int:
    if device.type != "cpu":
        return n_planes
    return max(1, min(n_planes, CPU_CHUNK_ELEMENTS // max(1, plane_elements)))


class OmegaSum(torch.autograd.Function):
    """``sum_{n,c,x,y} sum_{|i|,|j|<=r} |D(x,y) - D(clamp(x+i), clamp(y+j))|`` with a lean backward.

    Equal to ``omega_map_reference(d, r).sum() * (2r+1)^2``; see the module docstring for
    how it avoids the per-offset tensors. Memory: a few copies of one chunk of planes.

    Mixed precision: forward and backward always compute in float32 at least, with autocast
    disabled (``custom_fwd(cast_inputs=float32)`` would serve one device type only): an fp16 /
    bf16 ``d`` is upcast (its sum over ~81 offsets and all planes would not survive half
    precision, and autocast would run the weighted sum ``@`` in it); the value is float32 and
    the gradient comes back in ``d``'s dtype.
    """

    @staticmethod
    def forward(ctx, d: Tensor, r: int) -> Tensor:
        ctx.save_for_backward(d)  # as given (a half-precision d stays small); upcast again in backward
        ctx.r = r
        with _autocast_off(d):
            return OmegaSum._forward(_full_precision(d), r)

    @staticmethod
    def _forward(d: Tensor, r: int) -> Tensor:
        h, w = d.shape[-2:]
        planes = d.detach().reshape(-1, h, w)
        geometry = _offset_geometry(h, w, r, d.device, d.dtype)
        step = _chunk_planes((h + 2 * r) * (w + 2 * r), planes.shape[0], d.device)
        total = d.new_zeros(())
        buf = d.new_empty(min(step, planes.shape[0]) * (h + r) * (w + 2 * r))  # reused: no malloc per offset
        for s in range(0, planes.shape[0], step):
            p = F.pad(planes[s:s + step].unsqueeze(0), (r, r, r, r), mode="replicate")[0]
            k = p.shape[0]
            for i, j, r0, c0, rows, cols, weight in geometry:
                m = buf[:k * rows * cols].view(k, rows, cols)
                torch.sub(p[:, r0:r0 + rows, c0:c0 + cols], p[:, r0 + i:r0 + i + rows, c0 + j:c0 + j + cols], out=m)
                total += (m.abs_().view(k, -1) @ weight.view(-1)).sum()
        return total

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        (d,) = ctx.saved_tensors
        with _autocast_off(d):
            grad = OmegaSum._backward(_full_precision(d), ctx.r)
            return (grad * grad_out).to(d.dtype), None

    @staticmethod
    def _backward(d: Tensor, r: int) -> Tensor:
        """d total / d d (float32 or float64, d's shape)."""
        h, w = d.shape[-2:]
        planes = d.reshape(-1, h, w)
        geometry = _offset_geometry(h, w, r, d.device, d.dtype)
        step = _chunk_planes((h + 2 * r) * (w + 2 * r), planes.shape[0], d.device)
        grad = torch.empty_like(planes)
        buf = d.new_empty(min(step, planes.shape[0]) * (h + r) * (w + 2 * r))
        for s in range(0, planes.shape[0], step):
            p = F.pad(planes[s:s + step].unsqueeze(0), (r, r, r, r), mode="replicate")[0]
            g = torch.zeros_like(p)                                # d total / d P (padded)
            k = p.shape[0]
            for i, j, r0, c0, rows, cols, weight in geometry:
                a = p[:, r0:r0 + rows, c0:c0 + cols]
                b = p[:, r0 + i:r0 + i + rows, c0 + j:c0 + j + cols]
                sgn = buf[:k * rows * cols].view(k, rows, cols)
                torch.sub(a, b, out=sgn).sign_().mul_(weight)
                g[:, r0:r0 + rows, c0:c0 + cols] += sgn
                g[:, r0 + i:r0 + i + rows, c0 + j:c0 + j + cols] -= sgn
            # adjoint of replicate padding: the border strips flow back to the edge pixels
            g[:, :, r] += g[:, :, :r].sum(-1)
            g[:, :, r + w - 1] += g[:, :, r + w:].sum(-1)
            g[:, r] += g[:, :r].sum(-2)
            g[:, r + h - 1] += g[:, r + h:].sum(-2)
            grad[s:s + step] = g[:, r:r + h, r:r + w]
        return grad.view_as(d)


def _local_mean(d: Tensor) -> Tensor:
    delta = d.abs()
    return (torch.exp(-delta) * delta).mean()


def _recomputed(fn, x: Tensor) -> Tensor:
    """``fn(x)`` keeping only ``x`` for backward (recomputed there): a few map copies less."""
    if x.requires_grad and torch.is_grad_enabled():
        return checkpoint(fn, x, use_reentrant=False)
    return fn(x)


def eansdl(feat_ideal: Tensor, feat_degraded: Tensor, level: int, *, r0: int = 4, lambda_omega: float = 0.5,
           progress: float = 0.0, alpha: float = 2.0, beta: float = 1.0, reference: bool = False) -> Tensor:
    """EANSDL of one FPN level (docs/methods.md), a scalar.

    ``feat_ideal`` (A): the frozen ideal model's features of the clean twin;
    ``feat_degraded`` (B): the corrective model's features of the degraded image, both
    N x C x H x W. ``level``: 0 for the largest map (radius ``r0``), halving per level.
    ``progress`` = epoch / total epochs. ``reference=True`` computes Omega with
    :func:`omega_map_reference` (same value and gradient, much slower).

    Under autocast (``schedule.amp``) the features arrive in fp16 / bf16: the loss is computed
    in float32 with autocast disabled (differences of Sobel magnitudes, ``exp(-|D|)`` and the
    Omega sums need it) and returned in float32; gradients flow back to the features in their
    own dtype. float32 / float64 inputs are computed as they are.
    """
    if feat_ideal.shape != feat_degraded.shape or feat_ideal.ndim != 4:
        raise ValueError(f"ideal and degraded features must be equal N x C x H x W shapes, got "
                         f"{tuple(feat_ideal.shape)} and {tuple(feat_degraded.shape)}")
    with _autocast_off(feat_degraded):
        return _eansdl(feat_ideal, feat_degraded, level, r0, lambda_omega, progress, alpha, beta, reference)


def _eansdl(feat_ideal: Tensor, feat_degraded: Tensor, level: int, r0: int, lambda_omega: float,
            progress: float, alpha: float, beta: float, reference: bool) -> Tensor:
    # sobel_magnitude upcasts itself: the checkpoint keeps the (half-precision) input only
    d = sobel_magnitude(feat_ideal) - _recomputed(sobel_magnitude, feat_degraded)
    local = _recomputed(_local_mean, d)
    r = level_radius(level, r0)
    if reference:
        omega = omega_map_reference(d, r).mean()
    else:
        omega = OmegaSum.apply(d, r) / ((2 * r + 1) ** 2 * d.numel())
    return decay(progress, alpha, beta) * (local + lambda_omega * omega)


# --------------------------------------------------------------------------- the corrective model
def _split_twins(inputs: list) -> tuple[list[Tensor], list[Tensor]]:
    clean, degraded = [], []
    for x in inputs:
        c, d = (x, x) if torch.is_tensor(x) else x
        clean.append(c)
        degraded.append(d)
    return clean, degraded


class CorrectiveModel(nn.Module):
    """The corrective detector + the frozen ideal detector; ``forward`` returns the named losses.

    Training: ``forward(pairs, targets, progress)`` with ``pairs[i] = (clean, degraded)``.
    Eval mode: ``forward(images)`` is the corrective detector's inference.
    """

    def __init__(self, detector: nn.Module, ideal: nn.Module | None, levels: tuple[int, ...], *,
                 lambda_fs: float = 1.0, r0: int = 4, lambda_omega: float = 0.5, alpha: float = 2.0,
                 beta: float = 1.0):
        super().__init__()
        self.detector, self.ideal = detector, ideal
        if ideal is not None:
            ideal.eval()
            ideal.requires_grad_(False)
        self.levels, self.lambda_fs, self.r0 = tuple(levels), lambda_fs, r0
        self.lambda_omega, self.alpha, self.beta = lambda_omega, alpha, beta
        self.reset_stats()

    def reset_stats(self) -> None:
        self.stats = {"eansdl": 0.0, "decay": 0.0, "steps": 0}

    def train(self, mode: bool = True) -> "CorrectiveModel":
        super().train(mode)
        if self.ideal is not None:
            self.ideal.eval()  # frozen: BN statistics never move
        return self

    def forward(self, inputs: list, targets: list[dict] | None = None, progress: float = 0.0):
        if not self.training:
            return self.detector(inputs)
        if targets is None:
            raise ValueError("targets are needed in training mode")
        clean, degraded = _split_twins(inputs)
        det = self.detector
        images, tgts = det.transform(degraded, targets)
        feats = det.backbone(images.tensors)
        losses = detection_losses(det, images, feats, tgts)
        if self.ideal is None or self.lambda_fs == 0:
            return losses
        with torch.no_grad():
            ideal_images, _ = self.ideal.transform(clean, targets)
            if ideal_images.tensors.shape != images.tensors.shape:
                raise RuntimeError(f"clean and degraded batches differ after the transforms: "
                                   f"{tuple(ideal_images.tensors.shape)} vs {tuple(images.tensors.shape)}")
            ideal_feats = list(self.ideal.backbone(ideal_images.tensors).values())
        own = list(feats.values())
        if max(self.levels) >= len(own):
            raise ConfigError(f"levels {list(self.levels)} but the FPN has {len(own)} levels", field="levels")
        value = sum(eansdl(ideal_feats[k], own[k], k, r0=self.r0, lambda_omega=self.lambda_omega,
                           progress=progress, alpha=self.alpha, beta=self.beta) for k in self.levels)
        self.stats["eansdl"] = self.stats["eansdl"] + value.detach()  # a tensor: no host sync per step
        self.stats["decay"] += decay(progress, self.alpha, self.beta)
        self.stats["steps"] += 1
        losses["eansdl"] = self.lambda_fs * value
        return losses


class TwinPairs(Dataset):
    """``DegradedTwins`` items ``(clean, degraded, target)`` as the harness's ``((clean, degraded), target)``."""

    def __init__(self, twins: Dataset):
        self.twins = twins

    def set_epoch(self, epoch: int) -> None:
        self.twins.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.twins)

    def __getitem__(self, i: int):
        clean, degraded, target = self.twins[i]
        return (clean, degraded), target


# --------------------------------------------------------------------------- the plugin
class FCTLConfig(MethodConfig):
    """Defaults from docs/methods.md (lambda_fs 1, r0 4, lambda_omega 0.5, alpha 2, beta 1); all sweepable."""
    variant: Literal["fctl", "degraded_only"] = "fctl"
    lambda_fs: float = Field(1.0, ge=0)
    r0: int = Field(4, ge=1)
    lambda_omega: float = Field(0.5, ge=0)
    alpha: float = Field(2.0, ge=0)
    beta: float = Field(1.0, gt=0)
    levels: tuple[int, ...] = (0, 1, 2, 3, 4)      # FPN levels with the loss, 0 = largest map
    train_conditions: list[str | dict[str, Any]] | None = None  # None: the suite's corruptions
    init_from_ideal: bool = True

    @field_validator("levels")
    @classmethod
    def _levels(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or min(v) < 0 or len(set(v)) != len(v):
            raise ValueError("levels must be distinct FPN level indices >= 0 (0 = the largest map)")
        return tuple(sorted(v))

    @field_validator("train_conditions")
    @classmethod
    def _conditions(cls, v):
        if v is not None:
            from harness.data import twin_conditions
            twin_conditions(v, field="train_conditions")
        return v


class FCTL(Method):
    name = "fctl"
    Config = FCTLConfig
    #: The ideal model trains on clean images: no FCTL hyperparameter changes it. The corrective
    #: model's EANSDL decays with training progress.
    stages = (Stage("ideal"), Stage("corrective", takes_progress=True))
    arch = "faster_rcnn"
    supported_archs = ("retinanet",)
    curves = {"fctl/": "FCTL EANSDL and decay"}
    default_search = {"lambda_fs": {"loguniform": [0.1, 10.0]}, "r0": {"choice": [2, 4, 8]},
                      "alpha": {"uniform": [0.5, 4.0]}, "beta": {"uniform": [0.5, 2.0]}}

    @property
    def active_stages(self) -> tuple[str, ...]:
        c = self.config
        return ("corrective",) if c.variant == "degraded_only" and not c.init_from_ideal else self.stage_names()

    def train_conditions(self, ctx: StageContext) -> list:
        """The corrective stage's degradations: the config's, else the dataset's corruption test sets."""
        from harness.data import CORRUPTIONS, twin_conditions
        if self.config.train_conditions is not None:
            return twin_conditions(self.config.train_conditions, field="train_conditions")
        found = [c.label for c in ctx.conditions if c.name in CORRUPTIONS]
        if not found:
            raise ConfigError("fctl trains on degraded twins but the suite tests no corruption of this "
                              "dataset: set the method's train_conditions or the suite's conditions",
                              field="train_conditions")
        return twin_conditions(found, field="conditions")

    def train_dataset(self, stage: str, ctx: StageContext, dataset: Dataset) -> Dataset:
        if stage != "corrective":
            return dataset
        from harness.data import DegradedTwins
        return TwinPairs(DegradedTwins(dataset, self.train_conditions(ctx), seed=ctx.seed))

    def example_inputs(self, stage: str, images: list[Tensor]) -> list:
        """The corrective stage trains on (clean, degraded) pairs (:class:`TwinPairs`); a contrast-reduced
        copy stands in for the degraded twin."""
        if stage != "corrective":
            return images
        return [(im, (im * 0.5 + 0.3).clamp(0, 1)) for im in images]

    def _ideal(self, ctx: StageContext) -> nn.Module:
        ideal = build_detector(ctx.detector, ctx.num_classes, arch=ctx.arch)
        if "ideal" in ctx.artifacts:
            ideal.load_state_dict(ctx.artifact("ideal"))
        else:
            log.warning("fctl: no ideal artifact; the corrective stage uses a randomly initialised ideal model")
        return ideal

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        if stage == "ideal":
            return build_detector(ctx.detector, ctx.num_classes, arch=ctx.arch)
        if stage != "corrective":
            raise ValueError(f"fctl has stages {self.stage_names()}, not {stage!r}")
        c = self.config
        detector = build_detector(ctx.detector, ctx.num_classes, arch=ctx.arch)
        needs_ideal = c.variant == "fctl" or c.init_from_ideal
        ideal = self._ideal(ctx) if needs_ideal else None
        if c.init_from_ideal:
            detector.load_state_dict(ideal.state_dict())
        if c.variant == "degraded_only":
            ideal = None  # no feature loss: the ideal model is not kept around
        return CorrectiveModel(detector, ideal, c.levels, lambda_fs=c.lambda_fs, r0=c.r0,
                               lambda_omega=c.lambda_omega, alpha=c.alpha, beta=c.beta)

    def epoch_metrics(self, stage: str, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        """Mean EANSDL (summed over levels, decay included, before lambda_fs) and decay of the epoch."""
        model = getattr(model, "module", model)
        stats = getattr(model, "stats", None)
        if not stats or not stats["steps"]:
            return {}
        out = {"fctl/eansdl": float(stats["eansdl"]) / stats["steps"], "fctl/decay": stats["decay"] / stats["steps"]}
        model.reset_stats()
        return out



__all__ = ["sobel_magnitude", "decay", "level_radius", "omega_map_reference", "OmegaSum", "eansdl",
           "CorrectiveModel", "TwinPairs", "FCTLConfig", "FCTL"]
