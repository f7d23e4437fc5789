"""UMOP: RetinaNet trained with the Progressive Focal Loss (PFL) and level-wise resampling.

Follows docs/methods.md, section "UMOP". Per FPN level ``l`` and per training step:

* ``gamma_ad(l) = mean(-log p_i)`` over the level's positive anchors, ``p_i``
  the sigmoid probability of the anchor's GT class (``gamma_stat:
  mean_of_log``, the default: the released code's form), or ``-log(mean p_i)``
  (``log_of_mean``, the paper's formula); ``gamma`` when the level has no
  positive anchor;
  clamped to ``[gamma - delta, gamma + delta]``; ``alpha_ad(l) = w / gamma_ad(l)``.
  Both are plain numbers: no gradient flows through them.
* Under DDP (``torch.distributed`` initialised, world size > 1) the per-level
  statistics (sum of ``p_i`` -- or of ``-log p_i`` -- and the positive count)
  are all-reduced (SUM, one collective for all levels) before dividing, so
  every worker uses the parameters of the global batch.
* The level's classification loss is ``methods.focal.focal_loss`` with
  ``(alpha_ad(l), gamma_ad(l))``, summed over the level's non-ignored anchors.
  ``level_norm: total_positives`` (default, the released code) divides the sum
  over levels by ``sum over images of max(1, the image's positives)`` (the
  released code counts at least one positive per image, so a positive-free
  image still adds 1); ``mean_of_levels`` (the paper) averages ``level sum /
  max(1, level positives)`` over all levels. Positive counts used for
  normalisation are the worker's own, as in ``focal``.
* The defaults (``mean_of_log`` + ``total_positives``) are the released code's
  configuration as a whole, the one that produced the published numbers
  (docs/methods.md); the paper's forms stay selectable.
* Under DDP the statistics are pooled sums and counts (the exact global mean);
  the released code averages the workers' means instead.
* Box regression is RetinaNet's, unchanged.

Decisions where the specification (docs/methods.md) is silent (following the PFL paper / released code):

* A "positive" is an anchor matched to a GT box (torchvision's matcher, IoU >=
  0.5); ignored anchors (between thresholds) take no part in the loss nor the
  statistics. Statistics are computed in float64.
* ``mean_of_levels`` averages over all levels, including levels without
  positives (their loss is the negatives' sum, divided by 1).
* ``epoch_metrics`` reports, per level, the mean over the epoch's training
  steps of the gamma_ad / alpha_ad actually used (a step whose level has no
  positive counts with the neutral ``(gamma, w / gamma)``).
"""
from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

from harness.modeling import RETINANET_STRIDES, build_detector, replace_classification_head
from harness.plugin import Method, MethodConfig, StageContext
from methods.focal import classification_targets, focal_loss

GammaStat = Literal["log_of_mean", "mean_of_log"]
LevelNorm = Literal["total_positives", "mean_of_levels"]


# --------------------------------------------------------------------------- the loss
def _check(gamma: float, delta: float, w: float, gamma_stat: str) -> None:
    if gamma_stat not in ("log_of_mean", "mean_of_log"):
        raise ValueError(f"gamma_stat must be 'log_of_mean' or 'mean_of_log', got {gamma_stat!r}")
    if not (0 <= delta < gamma) or w <= 0:
        raise ValueError(f"need 0 <= delta < gamma and w > 0, got gamma={gamma}, delta={delta}, w={w}")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _autocast_off(device: torch.device):
    """A context with autocast disabled on ``device``: the ops inside run in their inputs' dtype."""
    return torch.autocast(device_type=device.type, enabled=False)


def _level_stats(values: Sequence[Tensor]) -> Tensor:
    """``[L, 2]`` float64 (sum, count) of each level's per-positive statistic; all-reduced (SUM) under DDP.

    Summed in float64 whatever the values' dtype (fp16 / bf16 under autocast), autocast off.
    """
    device = values[0].device if len(values) else torch.device("cpu")
    with _autocast_off(device):
        return _level_stats_f64(values, device)


def _level_stats_f64(values: Sequence[Tensor], device: torch.device) -> Tensor:
    sums = [v.detach().to(torch.float64).sum() for v in values]
    counts = [float(v.numel()) for v in values]
    stats = torch.stack([torch.stack(sums) if sums else torch.zeros(0, dtype=torch.float64, device=device),
                         torch.tensor(counts, dtype=torch.float64, device=device)], dim=1)
    if _distributed():
        dist.all_reduce(stats, op=dist.ReduceOp.SUM)
    return stats


def _statistic_of_logits(gt_logits: Tensor, gamma_stat: str) -> Tensor:
    """p = sigmoid(x) (log_of_mean) or -log p = softplus(-x) (mean_of_log), float64, detached."""
    with _autocast_off(gt_logits.device):
        x = gt_logits.detach().to(torch.float64).reshape(-1)
        return torch.sigmoid(x) if gamma_stat == "log_of_mean" else F.softplus(-x)


def _params_from_stats(stats: Tensor, gamma: float, delta: float, w: float,
                       gamma_stat: str) -> list[tuple[float, float]]:
    params = []
    for s, n in stats.tolist():  # one host sync for all levels
        if n <= 0:
            g = gamma
        else:
            mean = s / n
            g = (-math.log(mean) if mean > 0 else math.inf) if gamma_stat == "log_of_mean" else mean
            g = min(max(g, gamma - delta), gamma + delta)
        params.append((g, w / g))
    return params


def adaptive_focal_params(pos_gt_probs: Tensor, *, gamma: float = 2.0, delta: float = 0.5, w: float = 0.5,
                          gamma_stat: GammaStat = "mean_of_log") -> tuple[float, float]:
    """``(gamma_ad, alpha_ad)`` of one level from the GT-class probabilities of its positive anchors.

    Detached; all-reduced across workers under DDP (every worker must call it).
    No positives (on any worker) gives ``(gamma, w / gamma)``. Computed in float64 (autocast
    off) whatever the dtype of ``pos_gt_probs``.
    """
    _check(gamma, delta, w, gamma_stat)
    with _autocast_off(pos_gt_probs.device):
        p = pos_gt_probs.detach().to(torch.float64).reshape(-1)
        values = p if gamma_stat == "log_of_mean" else -torch.log(p)
    return _params_from_stats(_level_stats([values]), gamma, delta, w, gamma_stat)[0]


def level_focal_params(logits_per_level: Sequence[Tensor], targets_per_level: Sequence[Tensor], *,
                       gamma: float = 2.0, delta: float = 0.5, w: float = 0.5,
                       gamma_stat: GammaStat = "mean_of_log") -> list[tuple[float, float]]:
    """``[(gamma_ad, alpha_ad)]`` of every level (same inputs as :func:`progressive_focal_loss`).

    Under DDP one all-reduce carries every level's statistics.
    """
    return _level_params(logits_per_level, targets_per_level, gamma, delta, w, gamma_stat)[0]


def _level_params(logits_per_level, targets_per_level, gamma, delta, w, gamma_stat
                  ) -> tuple[list[tuple[float, float]], list[int]]:
    """Per-level (gamma_ad, alpha_ad) and this worker's positive count per level."""
    _check(gamma, delta, w, gamma_stat)
    if len(logits_per_level) != len(targets_per_level):
        raise ValueError(f"{len(logits_per_level)} levels of logits but {len(targets_per_level)} of targets")
    values = [_statistic_of_logits(x.detach()[t > 0.5], gamma_stat)  # the GT-class logit of each positive
              for x, t in zip(logits_per_level, targets_per_level)]
    params = _params_from_stats(_level_stats(values), gamma, delta, w, gamma_stat)
    return params, [v.numel() for v in values]


def progressive_focal_loss(logits_per_level: Sequence[Tensor], targets_per_level: Sequence[Tensor], *,
                           gamma: float = 2.0, delta: float = 0.5, w: float = 0.5,
                           level_norm: LevelNorm = "total_positives", gamma_stat: GammaStat = "mean_of_log",
                           image_positives: Tensor | Sequence[int] | None = None,
                           return_params: bool = False):
    """PFL classification loss over FPN levels.

    ``logits_per_level[l]``: ``[N_l, C]`` logits; ``targets_per_level[l]``: one-hot
    ``[N_l, C]`` float (background rows all zero, ignored anchors removed).
    ``image_positives``: the positive anchors of each image of the batch (all
    levels); ``total_positives`` divides by ``sum_i max(1, n_i)`` as the released
    code does. ``None`` counts the whole batch as one image: ``max(1, total)``.
    Returns the scalar loss, or ``(loss, [(gamma_ad, alpha_ad) per level])``
    with ``return_params=True``.

    Mixed precision: under autocast the logits are fp16 / bf16; the statistics are float64
    and the loss float32 (``focal_loss`` upcasts; the sums and normalisation run with autocast
    off), the gradient flows back to the logits in their own dtype.
    """
    if level_norm not in ("total_positives", "mean_of_levels"):
        raise ValueError(f"level_norm must be 'total_positives' or 'mean_of_levels', got {level_norm!r}")
    if not logits_per_level:
        raise ValueError("progressive_focal_loss needs at least one level")
    with _autocast_off(logits_per_level[0].device):
        return _progressive_focal_loss(logits_per_level, targets_per_level, gamma, delta, w, level_norm,
                                       gamma_stat, image_positives, return_params)


def _progressive_focal_loss(logits_per_level, targets_per_level, gamma, delta, w, level_norm, gamma_stat,
                            image_positives, return_params):
    params, positives = _level_params(logits_per_level, targets_per_level, gamma, delta, w, gamma_stat)
    sums = [focal_loss(x, t, alpha=a, gamma=g, reduction="sum")
            for x, t, (g, a) in zip(logits_per_level, targets_per_level, params)]
    if level_norm == "total_positives":
        loss = torch.stack(sums).sum() / total_positives_normaliser(positives, image_positives)
    else:
        loss = torch.stack([s / max(1, n) for s, n in zip(sums, positives)]).mean()
    return (loss, params) if return_params else loss


def total_positives_normaliser(level_positives: Sequence[int], image_positives=None) -> Tensor | int:
    """``sum_i max(1, n_i)`` over images (the released code), or ``max(1, total)`` without per-image counts."""
    if image_positives is None:
        return max(1, sum(level_positives))
    counts = torch.as_tensor(image_positives)
    return counts.clamp(min=1).sum().to(torch.float32) if counts.numel() else 1


# --------------------------------------------------------------------------- the head
class ProgressiveFocalHead(RetinaNetClassificationHead):
    """RetinaNet classification head whose loss is the progressive focal loss, per FPN level.

    ``forward`` records the anchors per level (``H * W * A`` per feature map, in
    order); ``compute_loss`` splits the head output (concatenated level by
    level) accordingly. Running sums of the per-level parameters are kept for
    :meth:`pop_epoch_params`.
    """

    def __init__(self, *args, gamma: float = 2.0, delta: float = 0.5, w: float = 0.5,
                 level_norm: LevelNorm = "total_positives", gamma_stat: GammaStat = "mean_of_log", **kw):
        super().__init__(*args, **kw)
        _check(gamma, delta, w, gamma_stat)
        self.gamma, self.delta, self.w = gamma, delta, w
        self.level_norm, self.gamma_stat = level_norm, gamma_stat
        self.anchors_per_level: list[int] = []
        self._param_sums: list[list[float]] = []  # per level: [sum gamma_ad, sum alpha_ad]
        self._steps = 0

    def forward(self, x: list[Tensor]) -> Tensor:
        self.anchors_per_level = [f.shape[-2] * f.shape[-1] * self.num_anchors for f in x]
        return super().forward(x)

    def compute_loss(self, targets, head_outputs, matched_idxs):
        logits = head_outputs["cls_logits"]
        sizes = self.anchors_per_level
        if sum(sizes) != logits.shape[1]:
            raise RuntimeError(f"head output has {logits.shape[1]} anchors per image but forward() "
                               f"recorded {sizes} per level")
        valid, onehot, positive = classification_targets(targets, logits, matched_idxs)
        xs, ts = [], []
        for lg, oh, v in zip(logits.split(sizes, dim=1), onehot.split(sizes, dim=1), valid.split(sizes, dim=1)):
            xs.append(lg[v])
            ts.append(oh[v])
        loss, params = progressive_focal_loss(xs, ts, gamma=self.gamma, delta=self.delta, w=self.w,
                                              level_norm=self.level_norm, gamma_stat=self.gamma_stat,
                                              image_positives=positive.sum(dim=1), return_params=True)
        self._record(params)
        return loss

    def _record(self, params: list[tuple[float, float]]) -> None:
        if len(self._param_sums) != len(params):
            self._param_sums, self._steps = [[0.0, 0.0] for _ in params], 0
        for acc, (g, a) in zip(self._param_sums, params):
            acc[0] += g
            acc[1] += a
        self._steps += 1

    def pop_epoch_params(self) -> list[tuple[float, float]]:
        """Per level, the mean (gamma_ad, alpha_ad) since the last call; then resets."""
        out = [(g / self._steps, a / self._steps) for g, a in self._param_sums] if self._steps else []
        self._param_sums, self._steps = [], 0
        return out


def level_names(n: int) -> list[str]:
    """``P3..P7`` for the harness's RetinaNet (named from its strides), ``L0..`` otherwise."""
    if n == len(RETINANET_STRIDES):
        return [f"P{int(math.log2(s))}" for s in RETINANET_STRIDES]
    return [f"L{i}" for i in range(n)]


# --------------------------------------------------------------------------- the plugin
class UMOPConfig(MethodConfig):
    """Defaults from docs/methods.md. ``variant`` is a free leaderboard label (e.g. the level_norm in use)."""
    variant: str = ""
    gamma: float = 2.0
    delta: float = 0.5
    w: float = 0.5
    level_norm: LevelNorm = "total_positives"
    gamma_stat: GammaStat = "mean_of_log"

    @model_validator(mode="after")
    def _valid_range(self) -> "UMOPConfig":
        _check(self.gamma, self.delta, self.w, self.gamma_stat)
        if self.w / (self.gamma - self.delta) > 1:
            raise ValueError(f"alpha_ad = w / gamma_ad can reach {self.w / (self.gamma - self.delta):.3g} > 1 "
                             "(negatives would get a negative weight); lower w or delta")
        return self


class UMOP(Method):
    name = "umop"
    Config = UMOPConfig
    arch = "retinanet"
    curves = {"umop/gamma_ad/": "UMOP gamma_ad per level", "umop/alpha_ad/": "UMOP alpha_ad per level"}
    default_search = {"delta": {"uniform": [0.0, 1.0]}, "w": {"uniform": [0.25, 1.0]}}

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        model = build_detector(ctx.detector, ctx.num_classes, arch="retinanet")
        c = self.config
        return replace_classification_head(model, ProgressiveFocalHead, ctx.detector, gamma=c.gamma,
                                           delta=c.delta, w=c.w, level_norm=c.level_norm,
                                           gamma_stat=c.gamma_stat)

    def epoch_metrics(self, stage: str, model: nn.Module, ctx: StageContext) -> dict[str, float]:
        head = next((m for m in model.modules() if isinstance(m, ProgressiveFocalHead)), None)
        if head is None:
            return {}
        params = head.pop_epoch_params()
        out: dict[str, float] = {}
        for lvl, (g, a) in zip(level_names(len(params)), params):
            out[f"umop/gamma_ad/{lvl}"] = g
            out[f"umop/alpha_ad/{lvl}"] = a
        return out


__all__ = ["adaptive_focal_params", "level_focal_params", "progressive_focal_loss", "ProgressiveFocalHead",
           "UMOPConfig", "UMOP", "level_names"]
