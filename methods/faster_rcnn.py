"""Baseline ``faster_rcnn``: torchvision's Faster R-CNN with an FPN, trained as is.

The reference row of most leaderboards: every two-stage method is compared
against the same detector, schedule and data without the method's additions.
"""
from __future__ import annotations

from torch import nn

from harness.modeling import build_detector
from harness.plugin import Method, MethodConfig, StageContext


class FasterRCNNConfig(MethodConfig):
    """No hyperparameters of its own: the detector and schedule come from the suite."""


class FasterRCNNBaseline(Method):
    name = "faster_rcnn"
    Config = FasterRCNNConfig
    arch = "faster_rcnn"

    def build_model(self, stage: str, ctx: StageContext) -> nn.Module:
        return build_detector(ctx.detector, ctx.num_classes, arch="faster_rcnn")
