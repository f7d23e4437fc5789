"""Every registered method plugin gets the same smoke test for free (timm style)."""
from __future__ import annotations

import math

import pytest
import torch
from pydantic_core import PydanticUndefined

from harness.config import DetectorSpec, ScheduleSpec
from harness.plugin import Method, Stage, StageContext
from harness.modeling import DETECTORS
from harness.plugin import METHODS
from runkit import detection_batch, method_context

TINY = DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64)


ctx_for, batch = method_context, detection_batch


def test_every_declared_entry_point_is_registered():
    """Each plugin declared under ``detbench.methods`` (this project's and any installed package's) loads."""
    from importlib.metadata import entry_points
    declared = {ep.name for ep in entry_points(group="detbench.methods")}
    assert declared and declared <= set(METHODS.names())


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
    assert cls.arch in DETECTORS and all(a in DETECTORS for a in cls.supported_archs)
    method = cls()  # defaults must be valid, and are what ``detbench methods`` lists
    for field, _, default in cls.describe():
        info = cls.Config.model_fields[field]
        expected = info.get_default(call_default_factory=True)
        assert getattr(method.config, field) == expected, field
        assert default == expected or (info.default_factory is not None and default is PydanticUndefined), field


@pytest.mark.parametrize("name", METHODS.names())
def test_plugin_trains_one_step_and_evaluates(name, tmp_path):
    """Each stage on its plugin's own test configuration; the last stage returns its main loss term."""
    torch.manual_seed(0)
    cls = METHODS.get(name)
    method = cls(cls.test_config(tmp_path))
    for stage in method.stage_names():
        ctx = ctx_for(type(method), stage)
        model = method.build_model(stage, ctx)
        model.train()
        images, targets = batch()
        terms = method.training_losses(stage, model, method.example_inputs(stage, images), targets, ctx)
        assert terms and all(torch.is_tensor(v) and v.ndim == 0 for v in terms.values())
        if stage == method.stage_names()[-1]:
            assert method.main_loss_term(ctx.arch) in terms, (method.main_loss_term(ctx.arch), sorted(terms))
        loss = sum(terms.values())
        assert math.isfinite(loss.item())
        loss.backward()
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        det = method.detector_of(model).eval()
        with torch.no_grad():
            out = det(images)
        assert len(out) == 2 and {"boxes", "scores", "labels"} <= set(out[0])


@pytest.mark.parametrize("name", METHODS.names())
def test_unknown_method_error_suggests(name):
    from harness.core import ConfigError
    with pytest.raises(ConfigError, match=f"did you mean '{name}'"):
        METHODS.get(name + "x")


def test_methods_command_lists_every_method_and_field(capsys):
    from harness.app.cli import main
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS.names():
        assert name in out
        assert all(field in out for field, _, _ in METHODS.get(name).describe()), name
