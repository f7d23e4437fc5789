"""``detbench compare``: two run directories built without Ray (as in tests/test_report.py).

Each run is a suite planned for real (``prepare_suite``) with rows as trials write them and
detections made from the ground truth with per-run, per-method noise, so which run is better
on which cell is known.
"""
from __future__ import annotations

import json
import shutil

import pytest

from harness.report import compare_runs, format_comparison
from harness.data import load_coco
from harness.evaluate import evaluate_coco
from harness.evaluate import detections_rel, write_detections
from harness.results import ResultRow, ResultStore
from harness.app.runner import prepare_suite
from harness.storage import open_storage
from test_report import SUITE, _detections, run_info


def make_run(root, name: str, ann, noise: dict[str, float], *, det_seed: int, config: dict | None = None,
             versions: dict | None = None, git_sha: str = "abc123", suite: str = "compare-test"):
    """A finished run directory ``root/name``: ``noise`` names its methods (box jitter of each)."""
    methods = "\n".join(f"  - name: {m}" for m in noise)
    path = root / f"{name}.yaml"
    path.write_text(SUITE.format(name=suite, ann=ann, img=ann.parent, methods=methods))
    checked = prepare_suite(path)
    storage = open_storage(root / name)
    versions = versions or {"torch": "2.4.1", "numpy": "1.26.4"}
    storage.write_json("manifest.json", {"suite": checked.suite.model_dump(), "baselines": {},
                                         "git_sha": git_sha, "versions": versions, "seeds": [0, 1],
                                         "storage": {"uri": str(root / name), "endpoint_url": "http://secret"}})
    storage.write_json("run.json", {"run": run_info(storage).to_dict(), "cells": [c.to_dict() for c in checked.cells]})
    gt = load_coco(ann, ann.parent, check_images=False).gt_for_eval()
    store = ResultStore(storage)
    for cell in checked.cells:
        trial, stage = f"{cell.method}-{cell.seed}", cell.stages[-1]
        dets = _detections(gt, noise[cell.method], seed=det_seed + cell.seed + 10 * len(cell.method))
        write_detections(storage, detections_rel(trial, stage), dets)
        cfg = {"method_config": {"lr": 0.01}, "schedule": {"epochs": 12}, **(config or {}).get(cell.method, {})}
        common = dict(run_id=name, suite=suite, trial_id=trial, cell=cell.cell_id, method=cell.method,
                      stage=stage, dataset="shapes", seed=cell.seed, config_hash=f"h{trial}",
                      config_json=json.dumps(cfg), versions_json=json.dumps(versions), git_sha=git_sha,
                      detector="d", wall_s=1.0, status="ok")
        store.write_trial(trial, [ResultRow(**common, metric=k, value=v) for k, v in evaluate_coco(gt, dets).items()])
    return storage


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from harness.data import write_synthetic_coco
    root = tmp_path_factory.mktemp("compare")
    ann = write_synthetic_coco(root / "data", n_images=40, seed=3, image_size=64, max_objects=3)
    a = make_run(root, "a", ann, {"faster_rcnn": 0.15, "focal": 0.15}, det_seed=0)
    # B: focal much better (less jitter), a changed focal config, another torch and commit
    b = make_run(root, "b", ann, {"faster_rcnn": 0.15, "focal": 0.05}, det_seed=100,
                 config={"focal": {"method_config": {"lr": 0.02, "gamma": 2.0}}},
                 versions={"torch": "2.5.0", "numpy": "1.26.4"}, git_sha="def456")
    c = make_run(root, "c", ann, {"faster_rcnn": 0.15}, det_seed=200)  # lacks focal
    return {"root": root, "ann": ann, "a": a, "b": b, "c": c}


@pytest.fixture(scope="module")
def ab(runs):
    return compare_runs(runs["a"], runs["b"])


def _cell(comparison, label, metric="AP"):
    return next(c for c in comparison.cells if (c.label, c.dataset, c.cond, c.metric) ==
                (label, "shapes", "clean", metric))


def test_a_better_method_in_b_has_a_positive_gain_whose_interval_excludes_zero(ab):
    focal = _cell(ab, "focal")
    assert focal.delta > 10 and len(focal.a_values) == len(focal.b_values) == 2
    iv = focal.interval
    assert iv is not None and iv.excludes_zero and iv.low * 100 < focal.delta < iv.high * 100
    assert iv.resamples == 200 and iv.ci == 0.9  # run A's leaderboard settings
    assert abs(iv.delta * 100 - focal.delta) < 0.5  # the bootstrap's point estimate is the rows' Δ
    row = next(r for r in ab.table.rows if r[0] == "focal" and r[3] == "AP")
    assert row[6] == f"{focal.delta:+.2f}" and row[7].endswith("]†") and row[8] == "2/2"
    assert " ± " in row[4] and " ± " in row[5]
    same = _cell(ab, "faster_rcnn")  # same noise in both runs: a small difference, an interval around it
    assert same.interval is not None and abs(same.delta) < 5
    assert same.interval.low * 100 <= same.delta <= same.interval.high * 100
    assert {(c.label, c.metric) for c in ab.cells} == {(m, k) for m in ("faster_rcnn", "focal") for k in ("AP", "AP50")}
    assert not ab.only_a and not ab.only_b


def test_config_versions_and_git_sha_differences_are_shown(ab):
    assert set(ab.config_diffs) == {"focal"}  # faster_rcnn's config is the same in both
    diffs = {d.path: (d.a, d.b) for d in ab.config_diffs["focal"]}
    assert diffs == {"method_config.lr": ("0.01", "0.02"), "method_config.gamma": ("(absent)", "2.0")}
    runs = {d.path: (d.a, d.b) for d in ab.run_diffs}
    assert runs == {"versions.torch": ('"2.4.1"', '"2.5.0"'), "git_sha": ('"abc123"', '"def456"')}
    md = format_comparison(ab)
    assert "- `method_config.lr`: 0.01 → 0.02" in md and "### focal" in md
    assert '- `versions.torch`: "2.4.1" → "2.5.0"' in md and '- `git_sha`: "abc123" → "def456"' in md
    assert "| focal | shapes | clean | AP |" in md and "90% interval of Δ" in md
    assert "secret" not in md and "endpoint" not in md  # the manifest's storage options are never shown


def test_a_method_only_in_a_is_listed(runs):
    c = compare_runs(runs["a"], runs["c"], bootstrap=0)
    assert c.only_a == [("focal", "shapes", "clean", "AP"), ("focal", "shapes", "clean", "AP50")]
    assert not c.only_b and {cell.label for cell in c.cells} == {"faster_rcnn"}
    assert all(cell.interval is None for cell in c.cells) and "bootstrap 0: no intervals" in c.notes
    md = format_comparison(c)
    assert "- only in A: 2 cell(s): focal shapes/clean AP; focal shapes/clean AP50" in md
    assert "only in B" not in md


def test_without_detections_in_b_there_is_no_interval_and_a_note(runs, tmp_path):
    copy = open_storage(tmp_path / "b")
    shutil.copytree(runs["b"].local_path(""), copy.local_path(""), dirs_exist_ok=True)
    copy.delete_tree("detections")
    c = compare_runs(runs["a"], copy)
    assert c.cells and all(cell.interval is None for cell in c.cells)
    assert _cell(c, "focal").delta > 10  # the Δ is still shown
    assert any(n.startswith("run B: no detections kept for 4 trial(s)") for n in c.notes)
    assert all(r[7] == "—" for r in c.table.rows)
    assert "interval of Δ" not in format_comparison(c)


def test_different_test_images_give_no_interval(runs):
    from harness.data import write_synthetic_coco
    root = runs["root"]
    other = write_synthetic_coco(root / "other", n_images=30, seed=4, image_size=64, max_objects=3)
    d = make_run(root, "d", other, {"faster_rcnn": 0.15}, det_seed=300)
    c = compare_runs(runs["a"], d)
    assert c.cells and all(cell.interval is None for cell in c.cells)
    assert any("the runs evaluated different images (40 in A, 30 in B" in n for n in c.notes)


def test_no_shared_cells_is_an_answer(runs, tmp_path, capsys):
    from harness.app.cli import main
    storage = open_storage(tmp_path / "elsewhere")
    storage.write_json("run.json", {"run": run_info(storage).to_dict(), "cells": []})
    common = dict(run_id="e", suite="other-suite", trial_id="t0", cell="c0", method="faster_rcnn", stage="train",
                  dataset="voc", seed=0, config_hash="h", config_json="{}", detector="d", wall_s=1.0, status="ok")
    ResultStore(storage).write_trial("t0", [ResultRow(**common, metric="AP", value=0.5)])
    assert main(["compare", str(runs["c"].local_path("")), str(tmp_path / "elsewhere")]) == 0
    out = capsys.readouterr().out
    assert "No shared cells" in out and "- only in A: 2 cell(s)" in out
    assert "- only in B: 1 cell(s): faster_rcnn voc/clean AP" in out
    assert '- `suite`: "compare-test" → "other-suite"' in out


def test_cli_prints_markdown_and_writes_it_whole(runs, tmp_path, capsys):
    from harness.app.cli import main
    out_file = tmp_path / "reports" / "a-vs-b.md"
    assert main(["compare", str(runs["a"].local_path("")), str(runs["b"].local_path("")), "--bootstrap", "100",
                 "--ci", "0.8", "--out", str(out_file)]) == 0
    printed = capsys.readouterr().out
    text = out_file.read_text()
    assert text in printed and f"comparison: {out_file}" in printed
    assert "80% interval of Δ" in text and "100 resamples" in text
    assert sorted(p.name for p in out_file.parent.iterdir()) == ["a-vs-b.md"]  # no temporary left behind


def test_not_a_run_or_a_bad_option_exits_2(runs, tmp_path, capsys):
    from harness.app.cli import main
    (tmp_path / "empty").mkdir()
    assert main(["compare", str(tmp_path / "empty"), str(runs["a"].local_path(""))]) == 2
    assert "not a detbench run directory" in capsys.readouterr().err
    assert main(["compare", str(runs["a"].local_path("")), str(tmp_path / "missing")]) == 2
    assert main(["compare", str(runs["a"].local_path("")), str(runs["b"].local_path("")), "--ci", "1.5"]) == 2
    assert "--ci" in capsys.readouterr().err
