"""``detbench check``: a run against a golden file -- regressed, missing, improved, unusable input."""
from __future__ import annotations

import math
from pathlib import Path

import pytest

from harness.app.cli import main
from harness.report import check_run
from harness.report.golden import read_golden, run_values
from harness.results import ResultRow, ResultStore

BASE = dict(run_id="r", suite="s", stage="train", dataset="shapes", config_hash="h", config_json="{}",
            detector="det", wall_s=1.0, status="ok")
VALUES = {("faster_rcnn", "", 0): (0.40, 0.70), ("faster_rcnn", "", 1): (0.42, 0.72),
          ("focal", "ce", 0): (0.30, 0.55)}


def _run(root: Path, values=VALUES, *, fog: float | None = 0.33) -> Path:
    store = ResultStore(root)
    root.mkdir(parents=True)
    (root / "run.json").write_text("{}")
    for (method, variant, seed), (ap, ap50) in values.items():
        tid = f"{method}{variant}-{seed}"
        common = dict(BASE, trial_id=tid, cell=f"{method}/shapes/seed{seed}", method=method, variant=variant,
                      seed=seed)
        rows = [ResultRow(**common, metric="AP", value=ap), ResultRow(**common, metric="AP50", value=ap50),
                ResultRow(**common, metric="APs", value=math.nan),              # not a checked metric
                ResultRow(**common, metric="AP", value=0.99, epoch=1)]          # curves never count
        if fog is not None and method == "faster_rcnn":
            rows.append(ResultRow(**common, metric="AP", value=fog, condition="fog", severity=2))
        store.write_trial(tid, rows)
    return root


def test_write_then_check_the_same_run_passes(tmp_path, capsys):
    run = _run(tmp_path / "run")
    ref = tmp_path / "golden.csv"
    assert main(["check", str(run), "--against", str(ref), "--write"]) == 0
    rows = read_golden(ref)
    assert len(rows) == 8 and {r["metric"] for r in rows} == {"AP", "AP50"}   # 3 cells x 2 + 2 fog
    assert {(r["label"], r["condition"], r["severity"]) for r in rows} >= {("focal[ce]", "clean", 0),
                                                                           ("faster_rcnn", "fog", 2)}
    capsys.readouterr()
    assert main(["check", str(run), "--against", str(ref)]) == 0
    assert "all 8 checked value(s) within 0.02" in capsys.readouterr().out


def test_a_regressed_and_a_missing_cell_fail_naming_both(tmp_path, capsys):
    ref = tmp_path / "golden.csv"
    main(["check", str(_run(tmp_path / "good")), "--against", str(ref), "--write"])
    worse = {**VALUES, ("focal", "ce", 0): (0.25, 0.55)}               # AP -0.05
    del worse[("faster_rcnn", "", 1)]                                 # a cell that did not run
    capsys.readouterr()
    assert main(["check", str(_run(tmp_path / "bad", worse)), "--against", str(ref)]) == 1
    out = capsys.readouterr().out
    assert "regressed: focal[ce] (train) / shapes / clean / seed 0 / AP" in out
    assert "missing: faster_rcnn (train) / shapes / clean / seed 1 / AP50" in out
    assert "-0.0500" in out and "4 of 8" in out  # seed 1: AP, AP50, fog AP; focal AP


def test_tolerance_and_improvements(tmp_path, capsys):
    ref = tmp_path / "golden.csv"
    main(["check", str(_run(tmp_path / "good")), "--against", str(ref), "--write"])
    moved = {**VALUES, ("focal", "ce", 0): (0.285, 0.60)}             # -0.015 AP, +0.05 AP50
    run = _run(tmp_path / "moved", moved)
    capsys.readouterr()
    assert main(["check", str(run), "--against", str(ref)]) == 0
    assert "improved" in capsys.readouterr().out
    assert main(["check", str(run), "--against", str(ref), "--tolerance", "0.01"]) == 1
    states = {c.name: c.state(0.01) for c in check_run(run, ref)}
    assert states["focal[ce] (train) / shapes / clean / seed 0 / AP"] == "regressed"
    assert states["focal[ce] (train) / shapes / clean / seed 0 / AP50"] == "improved"


@pytest.mark.parametrize("content, message", [
    ("label,stage,dataset,seed,metric,value\n", "missing column(s) condition, severity"),
    ("label,stage,dataset,condition,severity,seed,metric,value\n", "has no rows"),
    ("label,stage,dataset,condition,severity,seed,metric,value\nfocal,train,shapes,clean,0,0,AP,high\n",
     "line 2: field 'value': value 'high' is not a number"),
])
def test_a_malformed_reference_is_exit_2_naming_file_and_line(tmp_path, capsys, content, message):
    ref = tmp_path / "golden.csv"
    ref.write_text(content)
    assert main(["check", str(_run(tmp_path / "run")), "--against", str(ref)]) == 2
    err = capsys.readouterr().err
    assert str(ref) in err and message in err and len(err.strip().splitlines()) == 1


def test_not_a_run_directory_is_exit_2(tmp_path, capsys):
    ref = tmp_path / "golden.csv"
    ref.write_text("x")
    assert main(["check", str(tmp_path / "nothing"), "--against", str(ref)]) == 2
    assert "not a detbench run directory" in capsys.readouterr().err
    assert main(["check", str(tmp_path / "nothing"), "--against", str(tmp_path / "none.csv")]) == 2


def test_a_shared_stage_recorded_by_several_trials_is_one_value(tmp_path):
    store = ResultStore(tmp_path)
    for tid in ("a", "b"):  # two trials reusing one earlier-stage artifact record the same numbers
        common = dict(BASE, trial_id=tid, cell="fctl/shapes/seed0", method="fctl", variant="", seed=0, stage="ideal")
        store.write_trial(tid, [ResultRow(**common, metric="AP", value=0.5)])
    assert len(run_values(tmp_path)) == 1
