"""Schedules and sizes as the references write them: multistep with warm-up factor, linear scaling,
norm weight decay groups, repeated datasets, keep-ratio / multi-scale sizes."""
from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from harness.config import DetectorSpec, ScheduleSpec
from harness.engine import RepeatedDataset, lr_factor, parameter_groups
from harness.modeling import build_detector


def test_multistep_with_warmup_factor_as_torchvision_references():
    # 4 epochs x 10 iterations, steps after epochs 2 and 3, warm-up 5 iterations from 0.001
    s = ScheduleSpec(epochs=4, lr_schedule="multistep", lr_steps=[2, 3], lr_gamma=0.1,
                     warmup_iters=5, warmup_factor=0.001)
    got = [lr_factor(it, 40, s) for it in range(40)]
    assert got[0] == pytest.approx(0.001)
    assert got[2] == pytest.approx(0.001 + 0.999 * 2 / 5)   # LinearLR: start + (1 - start) * it / W
    assert got[5:20] == pytest.approx([1.0] * 15)
    assert got[20:30] == pytest.approx([0.1] * 10) and got[30:] == pytest.approx([0.01] * 10)


def test_default_warmup_unchanged():
    s = ScheduleSpec(epochs=2, warmup_iters=4, lr_schedule="constant")
    assert [lr_factor(it, 20, s) for it in range(6)] == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1])


def test_linear_scaling_rule():
    assert ScheduleSpec(lr=0.02, batch_size=4, lr_reference_batch=16).base_lr == pytest.approx(0.005)
    assert ScheduleSpec(lr=0.02, batch_size=4).base_lr == 0.02


@pytest.mark.parametrize("bad", [{"lr_schedule": "multistep"}, {"lr_steps": [3, 2]}, {"lr_steps": [7], "epochs": 6},
                                 {"lr_steps": [0]}, {"warmup_factor": 2.0}])
def test_bad_schedules(bad):
    with pytest.raises(ValidationError):
        ScheduleSpec(**bad)


class WithTable(nn.Module):
    def __init__(self):
        super().__init__()
        self.table = nn.Parameter(torch.zeros(3))
        self.proj = nn.Linear(3, 3)

    def no_weight_decay(self):
        return {"table"}


def test_norm_weight_decay_groups():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.GroupNorm(2, 4), WithTable())
    assert len(parameter_groups(model, ScheduleSpec())) == 1
    decay, free = parameter_groups(model, ScheduleSpec(norm_weight_decay=0.0))
    named = {id(p): n for n, p in model.named_parameters()}
    assert sorted(named[id(p)] for p in free["params"]) == ["1.bias", "1.weight", "2.bias", "2.weight", "3.table"]
    assert sorted(named[id(p)] for p in decay["params"]) == ["0.bias", "0.weight", "3.proj.bias", "3.proj.weight"]
    assert free["weight_decay"] == 0.0 and "weight_decay" not in decay


def test_repeated_dataset_and_epoch_passthrough():
    class Data(torch.utils.data.Dataset):
        epoch = None

        def __len__(self):
            return 3

        def __getitem__(self, i):
            return i

        def set_epoch(self, e):
            self.epoch = e
    data = Data()
    rep = RepeatedDataset(data, 5)
    assert len(rep) == 15 and [rep[i] for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    rep.set_epoch(4)
    assert data.epoch == 4


def test_keep_ratio_and_multiscale_sizes():
    spec = DetectorSpec(min_size=[64, 80, 96], max_size=160, fpn_width=16)
    model = build_detector(spec, 2, arch="faster_rcnn")
    assert model.transform.min_size == (64, 80, 96) and model.transform.max_size == 160
    model.eval()
    images, _ = model.transform([torch.rand(3, 100, 200)])
    assert images.image_sizes == [(80, 160)]  # shorter side 96 would make the longer 192 > 160: capped
    assert DetectorSpec(image_size=128).min_sizes == (128,) and DetectorSpec(image_size=128).resize_max == 128
    with pytest.raises(ValidationError, match="larger than max_size"):
        DetectorSpec(min_size=900, max_size=800)
