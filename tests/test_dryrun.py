"""``detbench plan``: the dry run's counts against hand-computed values, missing files, the estimate."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from harness.plan.estimate import EVAL_WEIGHT, steps_per_epoch, val_evaluations
from harness.plan import format_plan, plan_suite
from harness.core import ConfigError

# shapes: 10 train images x repeat 3 = 30 per epoch, 4 val images, 2 corruptions of val (fog@1, fog@3).
# Schedule: 3 epochs (fctl 2), eval every 2 epochs and at the last one.
TINY = """\
name: tiny
datasets:
  - name: shapes
    format: synthetic
    repeat: 3
    synthetic: {train_images: 10, val_images: 4, image_size: 64}
detector: {fpn_width: 16, image_size: 64}
methods:
  - name: faster_rcnn
  - name: defeat
    config: {teacher_backbone: resnet34}
  - name: fctl
    schedule: {epochs: 2}
  - name: focal
    search: {space: {gamma: {uniform: [1.0, 3.0]}}, num_samples: 3}
seeds: [0, 1]
schedule: {epochs: 3, batch_size: 4, eval_every: 2}
conditions: [clean, {corruption: fog, severity: [1, 3]}]
"""


def write(tmp_path: Path, text: str, name: str = "suite.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    return plan_suite(write(tmp_path_factory.mktemp("dry"), TINY), cost_per_image_s=0.5)


def stages_of(plan, cell_id):
    cell = next(c for c in plan.cells if c.cell_id == cell_id)
    return cell, {s.stage: s for s in cell.stages}


def test_cells_and_stages(tiny_plan):
    ids = [c.cell_id for c in tiny_plan.cells]
    assert ids == [f"{m}/shapes/seed{s}" for m in ("faster_rcnn", "defeat", "fctl", "focal") for s in (0, 1)]
    assert [s.stage for s in stages_of(tiny_plan, "defeat/shapes/seed0")[0].stages] == ["teacher", "student"]
    assert [s.stage for s in stages_of(tiny_plan, "fctl/shapes/seed1")[0].stages] == ["ideal", "corrective"]
    _, st = stages_of(tiny_plan, "defeat/shapes/seed0")
    assert "resnet34" in st["teacher"].detector and "resnet18" in st["student"].detector
    assert tiny_plan.datasets[0].images_per_epoch == 30 and tiny_plan.datasets[0].val_images == 4
    assert [e.label for e in tiny_plan.conditions["shapes"]] == ["fog@1", "fog@3"]


def test_counts_per_stage_match_hand_computed(tiny_plan):
    cell, st = stages_of(tiny_plan, "faster_rcnn/shapes/seed0")
    s = st["train"]
    assert (s.epochs, s.images_per_epoch, s.runs) == (3, 30, 1)
    assert s.steps_per_epoch == 7              # 30 images, batch 4, last partial batch dropped
    assert s.train_images == 3 * 30
    assert s.val_evaluations == 2              # epochs 2 and 3
    assert s.eval_images == 2 * 4 + 2 * 4      # val twice + fog@1, fog@3 once each
    _, st = stages_of(tiny_plan, "fctl/shapes/seed0")
    for name in ("ideal", "corrective"):
        assert (st[name].epochs, st[name].train_images, st[name].val_evaluations) == (2, 60, 1)
        assert st[name].eval_images == 4 + 8
    cell, st = stages_of(tiny_plan, "defeat/shapes/seed1")
    assert cell.train_images == 2 * 90 and cell.eval_images == 2 * 16 and cell.epochs == 6


def test_search_counts_num_samples_trials(tiny_plan):
    cell, st = stages_of(tiny_plan, "focal/shapes/seed0")
    assert cell.search and cell.trials == 3
    assert st["train"].runs == 3 and st["train"].train_images == 3 * 90 and st["train"].eval_images == 3 * 16


def test_totals_match_hand_computed(tiny_plan):
    p = tiny_plan
    assert len(p.cells) == 8
    assert p.trials == 2 * (1 + 1 + 1 + 3)
    assert p.epochs == 2 * (3 + 6 + 4 + 9)
    assert p.train_images == 2 * (90 + 180 + 120 + 270) == 1320
    assert p.eval_images == 2 * (16 + 32 + 24 + 48) == 240
    assert p.complete and not p.unknown


def test_device_hours_with_a_given_cost(tiny_plan):
    assert EVAL_WEIGHT == pytest.approx(1 / 3)
    assert tiny_plan.device_s == pytest.approx(0.5 * (1320 + 240 / 3))
    assert tiny_plan.device_hours == pytest.approx(700 / 3600)
    text = format_plan(tiny_plan)
    assert "device-hours:       0.194" in text and "given (--cost-per-image-s)" in text
    assert "trials:             12" in text and "train images:       1,320" in text
    assert "eval images:        240" in text


def test_format_lists_every_cell_and_stage(tiny_plan):
    text = format_plan(tiny_plan)
    for c in tiny_plan.cells:
        assert c.cell_id in text
    for stage in ("teacher", "student", "ideal", "corrective"):
        assert f" {stage} " in text
    assert "1 worker(s) x (1 CPU)" in text


def test_earlier_stages_shared_between_cells_and_trials(tmp_path):
    text = TINY.replace("""  - name: focal
    search: {space: {gamma: {uniform: [1.0, 3.0]}}, num_samples: 3}
""", """  - name: fctl
    config: {variant: degraded_only}
    schedule: {epochs: 2}
  - name: defeat
    label: defeat[searched]
    config: {teacher_backbone: resnet34}
    search: {space: {alpha_obj: {uniform: [0.5, 2.0]}}, num_samples: 2}
  - name: defeat
    label: defeat[lr]
    config: {teacher_backbone: resnet34}
    search: {space: {schedule.lr: {loguniform: [0.001, 0.02]}}, num_samples: 2}
""").replace("seeds: [0, 1]", "seeds: [0]")
    plan = plan_suite(write(tmp_path, text))
    _, st = stages_of(plan, "fctl[degraded_only]/shapes/seed0")
    assert st["ideal"].runs == 0 and st["ideal"].shared_with == "fctl/shapes/seed0"
    assert st["ideal"].train_images == 0 and st["ideal"].eval_images == 0 and st["corrective"].runs == 1
    # a searched field the teacher does not read: the first defeat cell's teacher is reused
    _, st = stages_of(plan, "defeat[searched]/shapes/seed0")
    assert st["teacher"].runs == 0 and st["teacher"].shared_with == "defeat/shapes/seed0"
    assert st["student"].runs == 2
    # the learning rate changes the teacher: one per trial
    _, st = stages_of(plan, "defeat[lr]/shapes/seed0")
    assert st["teacher"].runs == 2 and st["student"].runs == 2 and st["teacher"].shared_with is None
    assert "0 (= fctl/shapes/seed0)" in format_plan(plan)


def test_shared_stages_agree_with_the_trial_artifact_key(tmp_path):
    """The dry run's stage key groups cells exactly as the trial's artifact key does."""
    from dataclasses import replace

    from harness.data import PreparedDataset
    from harness.plan import load_suite, plan_cells, stage_artifact_key
    from harness.plan.estimate import stage_key
    text = TINY.replace("  - name: focal\n", "  - name: fctl\n    config: {variant: degraded_only}\n"
                        "    schedule: {epochs: 2}\n  - name: focal\n")
    suite = load_suite(write(tmp_path, text), check_paths=False)
    prepared = {"shapes": PreparedDataset("shapes", "a.json", "a", "b.json", "b", repeat=3)}
    cells = [c for c in plan_cells(suite, prepared) if len(c.stages) > 1]
    stub = PreparedDataset("shapes", *[f"(dry run) {suite.datasets[0].model_dump_json()}"] * 4, repeat=3)
    ours = [stage_key(replace(c, dataset=stub), c.stages[0]) for c in cells]
    theirs = [stage_artifact_key(c, c.stages[0]) for c in cells]
    same = lambda keys: [[a == b for b in keys] for a in keys]  # noqa: E731
    assert same(ours) == same(theirs)
    assert any(a == b for i, a in enumerate(ours) for b in ours[i + 1:])  # fctl variants do share


def test_missing_coco_annotations_say_not_found(tmp_path, monkeypatch):
    monkeypatch.delenv("DETBENCH_DATA", raising=False)
    text = TINY.replace("detector:", """  - name: coco
    format: coco
    train: {annotations: $DETBENCH_DATA/coco/annotations/instances_train2017.json, images: $DETBENCH_DATA/coco/train2017}
    val: {annotations: $DETBENCH_DATA/coco/annotations/instances_val2017.json, images: $DETBENCH_DATA/coco/val2017}
detector:""")
    plan = plan_suite(write(tmp_path, text), cost_per_image_s=0.5)
    coco = next(d for d in plan.datasets if d.name == "coco")
    assert coco.train_images is None and coco.val_images is None
    assert any("annotations not found:" in n and "instances_train2017.json" in n for n in coco.notes)
    assert plan.unknown == ["coco"] and not plan.complete
    _, st = stages_of(plan, "faster_rcnn/coco/seed0")
    assert st["train"].train_images is None and st["train"].device_s is None
    # totals: the known dataset's counts, unchanged
    assert plan.train_images == 1320 and plan.eval_images == 240
    text = format_plan(plan)
    assert "annotations not found: " in text and "unknown: coco" in text and "DETBENCH_DATA" in text


def test_counts_from_coco_json_visdrone_folder_and_real_condition(tmp_path):
    def coco(path: Path, n: int) -> str:
        path.write_text(json.dumps({"images": [{"id": i} for i in range(n)], "annotations": [],
                                    "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
        return str(path)
    for split, n in (("train", 7), ("val", 3)):
        (tmp_path / f"vd-{split}" / "annotations").mkdir(parents=True)
        for i in range(n + 1):
            (tmp_path / f"vd-{split}" / "annotations" / f"{i}.txt").write_text("")
    text = f"""\
datasets:
  - name: c
    format: coco
    repeat: 2
    train: {{annotations: {coco(tmp_path / 'tr.json', 5)}, images: img}}
    val: {{annotations: {coco(tmp_path / 'va.json', 2)}, images: img}}
  - name: v
    format: visdrone
    train: {{root: vd-train}}
    val: {{root: vd-val}}
detector: {{fpn_width: 16, image_size: 64}}
methods: [{{name: faster_rcnn}}]
schedule: {{epochs: 1, batch_size: 2}}
conditions: [clean, {{name: foggy, format: coco, annotations: {coco(tmp_path / 'fog.json', 6)}, images: img,
                      dataset: c}}]
"""
    plan = plan_suite(write(tmp_path, text))
    c, v = plan.datasets
    assert (c.train_images, c.images_per_epoch, c.val_images, c.num_classes) == (5, 10, 2, 2)
    assert (v.train_images, v.val_images) == (8, 4)
    assert [(e.label, e.kind, e.images) for e in plan.conditions["c"]] == [("foggy", "real", 6)]
    assert plan.conditions["v"] == []
    _, st = stages_of(plan, "faster_rcnn/c/seed0")
    assert st["train"].train_images == 10 and st["train"].eval_images == 2 + 6
    _, st = stages_of(plan, "faster_rcnn/v/seed0")
    assert st["train"].train_images == 8 and st["train"].eval_images == 4
    assert plan.device_s is None and "device-hours:       ?" in format_plan(plan)


def test_bad_cost_options(tmp_path):
    path = write(tmp_path, TINY)
    with pytest.raises(ConfigError, match="not both"):
        plan_suite(path, cost_per_image_s=1.0, measure=True)
    for bad in (0.0, -1.0, math.nan):
        with pytest.raises(ConfigError, match="positive"):
            plan_suite(path, cost_per_image_s=bad)


def test_helpers():
    assert val_evaluations(3, 2) == 2 and val_evaluations(5, 1) == 5 and val_evaluations(4, 10) == 1
    assert steps_per_epoch(30, 4, 1) == 7 and steps_per_epoch(3, 4, 1) == 1 and steps_per_epoch(30, 4, 2) == 3


def test_measure_times_the_distinct_detector(tmp_path):
    text = """\
datasets: [{name: s, format: synthetic, synthetic: {train_images: 4, val_images: 2, image_size: 64}}]
detector: {backbone: resnet18, fpn_width: 16, image_size: 64}
methods: [{name: faster_rcnn}, {name: faster_rcnn, label: again}]
seeds: [0, 1]
schedule: {epochs: 1, batch_size: 8}
"""
    plan = plan_suite(write(tmp_path, text), measure=True)
    assert len(plan.measured) == 1            # one distinct (detector, arch), timed once
    mc = plan.measured[0]
    assert mc.error == "" and mc.seconds_per_image > 0 and mc.batch == 2 and mc.image_hw == (64, 64)
    assert plan.cost_per_image_s == pytest.approx(mc.seconds_per_image)
    assert all(s.cost_per_image_s == mc.seconds_per_image for c in plan.cells for s in c.stages)
    assert plan.device_s == pytest.approx(mc.seconds_per_image * 4 * (4 + 2 * EVAL_WEIGHT))
    text = format_plan(plan)
    assert "measured (--measure)" in text and "Measured per-image training cost" in text


def test_an_arch_the_method_cannot_train_is_refused(tmp_path):
    text = TINY.replace("  - name: faster_rcnn\n", "  - name: faster_rcnn\n    detector: {arch: retinanet}\n")
    with pytest.raises(ConfigError, match="trains faster_rcnn"):
        plan_suite(write(tmp_path, text))
