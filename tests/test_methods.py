"""Every registered method plugin gets the same smoke test for free (timm style)."""
from __future__ import annotations

import math

import pytest
import torch

from harness.config import DetectorSpec, ScheduleSpec
from harness.method import Method, Stage, StageContext
from harness.registry import METHODS
from runkit import detection_batch, method_context

TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)


ctx_for, batch = method_context, detection_batch


def test_builtin_plugins_registered_through_entry_points():
    assert {"faster_rcnn", "focal"} <= set(METHODS.names())


@pytest.mark.parametrize("name", METHODS.names())
def test_plugin_contract(name):
    cls = METHODS.get(name)
    assert issubclass(cls, Method) and cls.name == name and cls.stages
    assert all(isinstance(s, Stage) for s in cls.stages) and cls.stages[-1].evaluates
    for stage in cls.stages[:-1]:  # what an earlier stage reads is a config field
        assert set(stage.reads) <= set(cls.Config.model_fields), stage
    for key in cls.default_search:  # a declared default space is searchable as it stands
        cls.check_search_key(key)
    assert isinstance(cls.find_unused_parameters, bool) and all(isinstance(t, str) for t in cls.curves.values())
    assert cls.arch in ("faster_rcnn", "retinanet")
    method = cls()  # defaults must be valid
    for field, _, default in cls.describe():
        assert getattr(method.config, field) == default or cls.Config.model_fields[field].default is not None


@pytest.mark.parametrize("name", METHODS.names())
def test_plugin_trains_one_step_and_evaluates(name):
    torch.manual_seed(0)
    method = METHODS.get(name)()
    for stage in method.stage_names():
        ctx = ctx_for(type(method), stage)
        model = method.build_model(stage, ctx)
        model.train()
        images, targets = batch()
        terms = method.training_losses(stage, model, images, targets, ctx)
        assert terms and all(torch.is_tensor(v) and v.ndim == 0 for v in terms.values())
        loss = sum(terms.values())
        assert math.isfinite(loss.item())
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        det = method.detector_of(model).eval()
        with torch.no_grad():
            out = det(images)
        assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


def test_unknown_method_error_suggests():
    from harness.errors import ConfigError
    with pytest.raises(ConfigError, match="did you mean 'focal'"):
        METHODS.get("focall")


def test_methods_command_lists_fields(capsys):
    from harness.cli import main
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "focal" in out and "gamma" in out and "faster_rcnn" in out
