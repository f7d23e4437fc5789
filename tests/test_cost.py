"""Detector cost: parameters and FLOPs of detector and neck, in the rows and from ``detbench methods --cost``."""
from __future__ import annotations

import torch

from harness.config import DetectorSpec
from harness.modeling import detector_cost, evaluation_size
from harness.modeling import build_detector


def test_cost_counts_parameters_and_conv_flops():
    spec = DetectorSpec(fpn_width=16, image_size=64)
    det = build_detector(spec, 3, arch="retinanet")
    cost = detector_cost(det, spec)
    assert cost.params == sum(p.numel() for p in det.parameters())
    assert cost.neck_params == sum(p.numel() for p in det.backbone.fpn.parameters())
    # the FPN's first lateral 1x1 conv alone: C3 (128 ch, 8x8 at 64 px) -> 16 ch = 2 * 128 * 16 * 64 FLOPs
    assert cost.neck_flops > 2 * 128 * 16 * 64 and cost.flops > cost.neck_flops > 0
    assert det.training  # restored
    metrics = cost.as_metrics()
    assert set(metrics) == {"cost/params_M", "cost/neck_params_M", "cost/gflops", "cost/neck_gflops"}


def test_neck_flops_hand_checked_for_the_lateral_only_neck():
    spec = DetectorSpec(fpn_width=8, image_size=64, neck="none")
    det = build_detector(spec, 2, arch="retinanet")
    cost = detector_cost(det, spec)
    # 1x1 laterals on C3 (128 ch, 8x8), C4 (256, 4x4), C5 (512, 2x2) -> 8 ch, then P6/P7 3x3 stride-2 convs
    lateral = 2 * 8 * (128 * 64 + 256 * 16 + 512 * 4)
    p6p7 = 2 * 8 * 8 * 9 * (1 * 1 + 1 * 1)  # P6 on the 2x2 P5 -> 1x1, P7 -> 1x1
    assert cost.neck_flops == lateral + p6p7


def test_evaluation_size():
    assert evaluation_size(DetectorSpec(image_size=128)) == (128, 128)
    assert evaluation_size(DetectorSpec(min_size=[640, 800], max_size=1333)) == (800, 1333)


def test_methods_cost_cli(capsys, tmp_path, monkeypatch):
    from harness.app.cli import main
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    suite = tmp_path / "s.yaml"
    suite.write_text("datasets: [{name: s, format: synthetic, synthetic: {train_images: 2, val_images: 1, "
                     "image_size: 64}}]\ndetector: {fpn_width: 16, image_size: 64}\nmethods: [{name: focal}]\n")
    assert main(["methods", "--cost", str(suite)]) == 0
    out = capsys.readouterr().out
    assert "| focal | retinanet |" in out and "| neck fpn | retinanet |" in out and "| neck none |" in out
