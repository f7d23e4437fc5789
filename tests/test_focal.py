"""focal_loss equals torchvision's sigmoid_focal_loss; the ce variant is plain BCE."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import sigmoid_focal_loss

from methods.focal import FocalConfig, focal_loss


@pytest.mark.parametrize("alpha,gamma", [(0.25, 2.0), (0.5, 1.0), (-1, 0.0), (0.1, 3.5)])
@pytest.mark.parametrize("reduction", ["sum", "mean", "none"])
def test_matches_torchvision(alpha, gamma, reduction):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(50, 7, generator=g) * 3
    targets = (torch.rand(50, 7, generator=g) > 0.8).float()
    ours = focal_loss(logits, targets, alpha, gamma, reduction)
    ref = sigmoid_focal_loss(logits, targets, alpha, gamma, reduction)
    torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-7)


def test_hand_computed_value():
    # one logit 0 (p = 0.5), positive: -0.25 * 0.5^2 * log(0.5)
    loss = focal_loss(torch.zeros(1), torch.ones(1))
    assert loss.item() == pytest.approx(0.25 * 0.25 * math.log(2))
    # negative, logit 0: -(0.75) * 0.5^2 * log(0.5)
    assert focal_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(0.75 * 0.25 * math.log(2))


def test_gamma0_alpha_off_is_bce():
    logits, targets = torch.randn(20, 3), (torch.rand(20, 3) > 0.5).float()
    torch.testing.assert_close(focal_loss(logits, targets, -1, 0.0),
                               F.binary_cross_entropy_with_logits(logits, targets, reduction="sum"))


def test_ce_variant_forces_unweighted_bce():
    cfg = FocalConfig(variant="ce", gamma=3.0, alpha=0.4)
    assert (cfg.alpha, cfg.gamma) == (-1.0, 0.0)
    assert FocalConfig().alpha == 0.25 and FocalConfig().gamma == 2.0


def test_bad_reduction():
    with pytest.raises(ValueError):
        focal_loss(torch.zeros(1), torch.zeros(1), reduction="avg")


def test_head_normalises_by_batch_positives():
    from methods.focal import FocalClassificationHead
    head = FocalClassificationHead(8, 1, 3)
    logits = torch.zeros(2, 4, 3)  # 2 images x 4 anchors x 3 classes
    targets = [{"labels": torch.tensor([1])}, {"labels": torch.tensor([2, 0])}]
    matched = [torch.tensor([0, -1, -1, -2]), torch.tensor([0, 1, -1, -1])]
    loss = head.compute_loss(targets, {"cls_logits": logits}, matched)
    # 7 valid anchors x 3 classes at p = 0.5; 3 positive entries; normalised by 3 positives
    pos, neg = 0.25 * 0.25 * math.log(2), 0.75 * 0.25 * math.log(2)
    assert loss.item() == pytest.approx((3 * pos + (7 * 3 - 3) * neg) / 3, rel=1e-6)
