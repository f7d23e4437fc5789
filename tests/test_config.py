"""Suite validation: every mistake is a ConfigError naming the key path, with a suggestion."""
from __future__ import annotations

from pathlib import Path

import pytest

from harness.app.cli import main
from harness.plan import load_suite
from harness.core import ConfigError

GOOD = """
name: t
datasets:
  - name: shapes
    format: synthetic
methods:
  - name: faster_rcnn
  - name: focal
    config: {variant: ce}
seeds: [0, 1]
"""


def load(tmp_path, text):
    p = tmp_path / "suite.yaml"
    p.write_text(text)
    return load_suite(p)


def error_of(tmp_path, text) -> str:
    with pytest.raises(ConfigError) as exc:
        load(tmp_path, text)
    return str(exc.value)


def test_good_suite_and_defaults(tmp_path):
    suite = load(tmp_path, GOOD)
    assert [m.name for m in suite.methods] == ["faster_rcnn", "focal"]
    assert suite.datasets[0].synthetic.image_size == 128
    assert suite.schedule.epochs >= 1 and suite.detector.backbone == "resnet18"


SUITES = Path(__file__).resolve().parent.parent / "suites"


def _repo_suites() -> list[Path]:
    return sorted(SUITES.rglob("*.yaml"))


def test_the_repo_suites_are_found_in_subfolders_too():
    names = {p.relative_to(SUITES).as_posix() for p in _repo_suites()}
    assert "smoke.yaml" in names and any("/" in n for n in names), names


@pytest.mark.parametrize("path", _repo_suites(), ids=lambda p: p.relative_to(SUITES).as_posix())
def test_repo_suite_loads_and_plans(path):
    """Every suite under suites/ (recursively): read, checked against the registries, planned into cells."""
    from harness.data import PreparedDataset
    from harness.plan import plan_cells
    suite = load_suite(path, check_paths=False)
    stub = {d.name: PreparedDataset(d.name, "a.json", "a", "b.json", "b") for d in suite.datasets}
    cells = plan_cells(suite, stub)
    assert cells and {c.method for c in cells} == {m.name for m in suite.methods}


def test_unknown_top_level_key_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD + "sedes: [1]\n")
    assert "unknown key 'sedes'" in msg and "did you mean 'seeds'" in msg and "suite.yaml" in msg


def test_unknown_nested_key_names_path(tmp_path):
    msg = error_of(tmp_path, GOOD + "schedule: {epocs: 3}\n")
    assert "field 'schedule.epocs'" in msg and "did you mean 'epochs'" in msg


def test_unknown_method_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: focal", "name: focall"))
    assert "methods[1].name" in msg and "did you mean 'focal'" in msg


def test_bad_literal_suggests(tmp_path):
    msg = error_of(tmp_path, GOOD + "detector: {backbone: resnet81}\n")
    assert "detector.backbone" in msg and "resnet18" in msg


def test_unknown_method_config_key(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{variant: ce}", "{gama: 1.0}"))
    assert "methods[1].config.gama" in msg and "did you mean 'gamma'" in msg


def test_bad_method_config_value(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("{variant: ce}", "{variant: bce}"))
    assert "methods[1].config.variant" in msg


def test_method_schedule_override_checked(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: faster_rcnn", "name: faster_rcnn\n    schedule: {lrr: 1}"))
    assert "methods[0].schedule.lrr" in msg


def test_search_key_must_exist(tmp_path):
    text = GOOD.replace("config: {variant: ce}", "search: {space: {gammma: {uniform: [1, 3]}}}")
    msg = error_of(tmp_path, text)
    assert "gammma" in msg and "methods[1].search.space" in msg


def test_default_search_space_is_the_methods_declared_one(tmp_path):
    from methods.focal import FocalRetinaNet
    suite = load(tmp_path, GOOD.replace("config: {variant: ce}", "search: {space: default, num_samples: 2}"))
    search = suite.methods[1].search
    assert search.space == FocalRetinaNet.default_search and search.num_samples == 2
    msg = error_of(tmp_path, GOOD.replace("  - name: faster_rcnn\n",
                                          "  - name: faster_rcnn\n    search: {space: default}\n"))
    assert "declares no default search space" in msg and "methods[0].search.space" in msg


def test_missing_dataset_path(tmp_path):
    text = GOOD.replace("format: synthetic", "format: coco\n    train: {annotations: nope.json, images: img}\n"
                        "    val: {annotations: nope.json, images: img}")
    msg = error_of(tmp_path, text)
    assert "datasets[0].train.annotations" in msg and "nope.json" in msg


def test_duplicate_labels_rejected(tmp_path):
    msg = error_of(tmp_path, GOOD.replace("name: focal\n    config: {variant: ce}", "name: faster_rcnn"))
    assert "label" in msg


def test_invalid_yaml_names_line(tmp_path):
    msg = error_of(tmp_path, "name: [unclosed\n")
    assert "line" in msg and "suite.yaml" in msg


def test_cli_bad_suite_exits_2_and_leaves_no_run_dir(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text(GOOD + "sedes: [1]\n")
    out = tmp_path / "runs"
    assert main(["run", str(p), "--out", str(out)]) == 2
    assert "did you mean 'seeds'" in capsys.readouterr().err
    assert not out.exists()


def test_smoke_suite_exercises_every_registered_method():
    from harness.plugin import METHODS
    from tests.conftest import ROOT
    suite = load_suite(ROOT / "suites" / "smoke.yaml", check_paths=False)
    assert {m.name for m in suite.methods} == set(METHODS.names())
