"""Baseline ``focal``: RetinaNet with the focal loss (Lin et al., 2017).

``variant: ce`` trains the same detector with plain sigmoid cross-entropy
(gamma 0, no alpha weighting), the ablation row that shows what focal loss
buys. Following docs/methods.md the classification loss is normalised by the number of
positive anchors in the whole batch (torchvision normalises per image and then
averages images; with one object count per image both agree).
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import Tensor, nn
from torchvision.models.detection._utils import Matcher
from torchvision.models.detection.retinanet import RetinaNetClassificationHead

from harness.modeling import build_detector, replace_classification_head
from harness.plugin import Method, MethodConfig, StageContext


def focal_loss(logits: Tensor, targets: Tensor, alpha: float = 0.25, gamma: float = 2.0,
               reduction: str = "sum") -> Tensor:
    """Sigmoid focal loss FL = -alpha_t (1 - p_t)^gamma log p_t, element-wise over classes.

    ``alpha < 0`` disables the alpha weighting; ``gamma = 0`` with ``alpha = -1``
    is binary cross-entropy. Equal to ``torchvision.ops.sigmoid_focal_loss``.

    Mixed precision: computed in float32 at least with autocast disabled (under autocast the
    head's logits are fp16 / bf16: ``(1 - p_t)^gamma`` of easy negatives and the sum over all
    anchors would not survive half precision); the result is float32 and the gradient flows
    back to ``logits`` in its own dtype. float32 / float64 inputs are computed as they are.
    """
    if reduction not in ("sum", "mean", "none"):
        raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")
    with _autocast_off(logits):
        dtype = torch.promote_types(torch.promote_types(logits.dtype, targets.dtype), torch.float32)
        return _focal_loss(logits.to(dtype), targets.to(dtype), alpha, gamma, reduction)


def _autocast_off(x: Tensor):
    """A context with autocast disabled for ``x``'s device: the ops inside run in their inputs' dtype."""
    return torch.autocast(device_type=x.device.type, enabled=False)


def _focal_loss(logits: Tensor, targets: Tensor, alpha: float, gamma: float, reduction: str) -> Tensor:
    p = torch.sigmoid(logits)
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = p * targets + (1 - p) * (1 - targets)
    loss = ce * (1 - p_t) ** gamma
    if alpha >= 0:
        loss = (alpha * targets + (1 - alpha) * (1 - targets)) * loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.mean()
    return loss


def classification_targets(targets: list[dict], cls_logits: Tensor, matched_idxs: list[Tensor]
                           ) -> tuple[Tensor, Tensor, Tensor]:
    """One-hot targets of RetinaNet's anchors, ignored anchors removed.

    Returns ``(valid [N, A] bool, onehot [N, A, C] float, positive [N, A] bool)``
    following torchvision's matcher (label index = column; -2 = between thresholds).
    """
    onehot = torch.zeros_like(cls_logits)
    valid, positive = [], []
    for i, (t, m) in enumerate(zip(targets, matched_idxs)):
        pos = m >= 0
        onehot[i, pos, t["labels"][m[pos]]] = 1.0
        positive.append(pos)
        valid.append(m != Matcher.BETWEEN_THRESHOLDS)
    return torch.stack(valid), onehot, torch.stack(positive)


class FocalClassificationHead(RetinaNetClassificationHead):
    """RetinaNet's classification head with configurable alpha/gamma and batch-level normalisation."""

    def __init__(self, *args, alpha: float = 0.25, gamma: float = 2.0, **kw):
        super().__init__(*args, **kw)
        self.alpha, self.gamma = alpha, gamma

    def compute_loss(self, targets, head_outputs, matched_idxs):
        logits = head_outputs["cls_logits"]
        valid, onehot, positive = classification_targets(targets, logits, matched_idxs)
        loss = focal_loss(logits[valid], onehot[valid], self.alpha, self.gamma, reduction="sum")
        return loss / positive.sum().clamp(min=1)


class FocalConfig(MethodConfig):
    variant: Literal["focal", "ce"] = "focal"
    alpha: float = 0.25
    gamma: float = 2.0

    @model_validator(mode="after")
    def _ce_is_unweighted(self) -> "FocalConfig":
        if self.variant == "ce":  # plain cross-entropy, whatever alpha/gamma say
            object.__setattr__(self, "alpha", -1.0)
            object.__setattr__(self, "gamma", 0.0)
        return self


class FocalRetinaNet(Method):
    name = "focal"
    Config = FocalConfig
    arch = "retinanet"
    default_search = {"gamma": {"uniform": [0.5, 3.0]}, "alpha": {"uniform": [0.1, 0.5]}}

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        model = build_detector(ctx.detector, ctx.num_classes, arch="retinanet")
        return replace_classification_head(model, FocalClassificationHead, ctx.detector,
                                           alpha=self.config.alpha, gamma=self.config.gamma)

