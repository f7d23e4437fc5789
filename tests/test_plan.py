"""harness.plan.cells.plan_cells and the Cell record: suite -> cells, to / from the Ray boundary, config hash."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

from harness.config import ScheduleSpec
from harness.plan import load_suite
from harness.data import PreparedCondition, PreparedDataset
from harness.core import ConfigError
from harness.plan import plan_cells
from harness.plan import Cell, RunInfo, StageOutput
from harness.results import config_hash, rows_for_trial

SUITE = """\
name: plan
datasets:
  - {name: a, format: synthetic, synthetic: {train_images: 4, val_images: 2, image_size: 64}}
  - {name: b, format: synthetic, synthetic: {train_images: 4, val_images: 2, image_size: 64}}
detector: {fpn_width: 16, image_size: 64}
methods:
  - name: faster_rcnn
  - name: fctl
    config: {variant: degraded_only}
    datasets: [b]
  - name: defeat
    label: distilled
    config: {teacher_backbone: resnet34}
  - name: focal
    schedule: {lr: 0.02}
    search: {space: {gamma: {uniform: [1.0, 3.0]}, schedule.lr: {loguniform: [0.001, 0.1]}}, num_samples: 3}
seeds: [0, 1]
schedule: {epochs: 2, batch_size: 2}
"""


def _prepared(name: str) -> PreparedDataset:
    return PreparedDataset(name, f"{name}/train.json", f"{name}/train", f"{name}/val.json", f"{name}/val")


@pytest.fixture()
def suite(tmp_path: Path):
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE)
    return load_suite(path, check_paths=False)


@pytest.fixture()
def cells(suite):
    fog = PreparedCondition("fog@2", "fog", 2, "b/val.json", "cache/fog2")
    return plan_cells(suite, {"a": _prepared("a"), "b": _prepared("b")}, {"b": [fog]})


def test_one_cell_per_method_dataset_seed_in_suite_order(cells):
    assert [c.cell_id for c in cells] == [
        "faster_rcnn/a/seed0", "faster_rcnn/a/seed1", "faster_rcnn/b/seed0", "faster_rcnn/b/seed1",
        "fctl[degraded_only]/b/seed0", "fctl[degraded_only]/b/seed1",  # only its datasets
        "distilled/a/seed0", "distilled/a/seed1", "distilled/b/seed0", "distilled/b/seed1",
        "focal/a/seed0", "focal/a/seed1", "focal/b/seed0", "focal/b/seed1"]


def test_cells_carry_resolved_settings(cells):
    fctl = next(c for c in cells if c.method == "fctl")
    assert fctl.stages == ("ideal", "corrective") and fctl.variant == "degraded_only"
    assert fctl.method_config["variant"] == "degraded_only" and fctl.method_config["lambda_fs"] == 1.0
    assert [c.label for c in fctl.conditions] == ["fog@2"]          # the dataset's own test sets
    assert next(c for c in cells if c.dataset.name == "a").conditions == ()
    distilled = next(c for c in cells if c.label == "distilled")
    assert distilled.method == "defeat" and distilled.variant == "distilled" and distilled.stages == ("teacher", "student")
    focal = next(c for c in cells if c.method == "focal")
    assert focal.arch == "retinanet" and focal.schedule.lr == 0.02 and focal.schedule.epochs == 2
    assert focal.trials == 3 and next(c for c in cells if c.method == "faster_rcnn").trials == 1
    assert focal.detector.fpn_width == 16


def test_active_stages_follow_the_config(suite):
    suite.methods[1] = suite.methods[1].model_copy(update={"config": {"variant": "degraded_only",
                                                                       "init_from_ideal": False}})
    cells = plan_cells(suite, {"a": _prepared("a"), "b": _prepared("b")})
    assert next(c for c in cells if c.method == "fctl").stages == ("corrective",)


def test_a_method_on_an_arch_it_cannot_train_is_refused(suite):
    suite.methods[0] = suite.methods[0].model_copy(update={"detector": {"arch": "retinanet"}})
    with pytest.raises(ConfigError, match="trains faster_rcnn detectors, not retinanet") as err:
        plan_cells(suite, {"a": _prepared("a"), "b": _prepared("b")})
    assert err.value.field == "methods[0].detector.arch"


def test_cell_round_trips_through_plain_json(cells):
    for cell in cells:
        wire = json.loads(json.dumps(cell.to_dict()))
        back = Cell.from_dict(wire)
        assert back == cell and back.to_dict() == cell.to_dict()


def test_run_info_round_trips(suite):
    run = RunInfo(run_dir="/r", run_id="r", suite="plan", smoke=True, resources=suite.resources,
                  versions_json="{}", git_sha="abc")
    assert RunInfo.from_dict(json.loads(json.dumps(run.to_dict()))) == run
    out = StageOutput("ok", history=[{"epoch": 1}], final={"AP": 0.5}, reused=True, artifact="k")
    assert StageOutput.from_dict(json.loads(json.dumps(out.to_dict()))) == out
    # an artifact manifest written by an older version may carry keys this one does not know
    assert StageOutput.from_dict({"status": "ok", "final": {"AP": 0.5}, "an_old_key": 1}) == StageOutput("ok", final={"AP": 0.5})


def test_with_sampled_sets_method_and_schedule_fields(cells):
    focal = next(c for c in cells if c.method == "focal")
    sampled = focal.with_sampled({"gamma": 1.5, "schedule.lr": 0.003})
    assert sampled.method_config["gamma"] == 1.5 and sampled.schedule.lr == 0.003
    assert focal.method_config["gamma"] == 2.0 and focal.schedule.lr == 0.02   # the original is untouched
    assert sampled.sampled_values() == {"gamma": 1.5, "schedule.lr": 0.003}
    assert sampled.plugin.config.gamma == 1.5


def test_config_hash_ignores_names_and_bookkeeping_not_settings(cells):
    cell = cells[0]
    h = config_hash(cell)
    assert len(h) == 16
    assert config_hash(replace(cell, cell_id="x", label="y", stages=("train",), conditions=())) == h
    assert config_hash(replace(cell, dataset=replace(cell.dataset, train_images="elsewhere"))) == h  # by name
    assert config_hash(replace(cell, seed=7)) != h
    assert config_hash(replace(cell, schedule=ScheduleSpec(epochs=3, batch_size=2))) != h
    assert config_hash(replace(cell, dataset=_prepared("other"))) != h


def test_rows_of_a_sampled_trial_name_their_values(cells, suite):
    focal = next(c for c in cells if c.method == "focal").with_sampled({"gamma": 1.5, "schedule.lr": 0.003})
    run = RunInfo(run_dir="/r", run_id="r", suite="plan", smoke=False, resources=suite.resources,
                  versions_json="{}", git_sha="")
    out = StageOutput("ok", history=[{"epoch": 1, "train/loss": 1.0}], final={"AP": 0.25})
    rows = rows_for_trial(run, focal, "t1", {"train": out}, wall_s=1.0)
    assert {r.variant for r in rows} == {"gamma=1.5 schedule.lr=0.003"}
    assert [(r.metric, r.epoch, r.value) for r in rows] == [("train/loss", 1, 1.0), ("AP", None, 0.25)]
    assert {r.config_hash for r in rows} == {config_hash(focal)}
    failed = rows_for_trial(run, focal, "t2", {"train": StageOutput.failed("boom")}, wall_s=1.0)
    assert [(r.status, r.reason) for r in failed] == [("failed", "boom")]
