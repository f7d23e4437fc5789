"""The micro golden gate: a tiny deterministic suite must reproduce its committed numbers.

``results/golden/micro.yaml`` is planned like any suite (``prepare_suite``: data written,
corruptions rendered), each cell is trained in-process through the harness's engine (the
code a Ray worker runs), its rows go to a results store, and ``detbench check`` compares
them with ``results/golden/micro.csv``. A change that moves the numbers fails ``make test``;
updating the reference is a reviewed commit: ``DETBENCH_WRITE_GOLDEN=1 pytest tests/test_golden_gate.py``
re-records it and skips (a run that writes the reference checks nothing).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from harness.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
SUITE, REFERENCE = ROOT / "results" / "golden" / "micro.yaml", ROOT / "results" / "golden" / "micro.csv"


def _train_suite(run_dir: Path) -> None:
    from harness.config import ResourcesSpec
    from harness.plan import stage_job
    from harness.engine import run_stage
    from harness.plan import RunInfo, StageOutput
    from harness.results import ResultStore, rows_for_trial
    from harness.app.runner import prepare_suite

    checked = prepare_suite(SUITE)
    run = RunInfo(run_dir=str(run_dir), run_id="golden", suite=checked.suite.name, smoke=True,
                  resources=ResourcesSpec(), versions_json="{}", git_sha="")
    store = ResultStore(run_dir)
    for i, cell in enumerate(checked.cells):
        stage = cell.stages[-1]
        state, _ = run_stage(stage_job(cell, stage), device=torch.device("cpu"))
        out = StageOutput("ok", history=state.history, final=state.last_eval, conditions=state.conditions)
        store.write_trial(f"t{i}", rows_for_trial(run, cell, f"t{i}", {stage: out}, wall_s=0.0))
    (run_dir / "run.json").write_text("{}")


def test_micro_suite_reproduces_its_golden_numbers(tmp_path, one_thread, capsys, monkeypatch):
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    _train_suite(run_dir)
    torch.use_deterministic_algorithms(False)  # the suite's schedule.deterministic set it process-wide
    if os.environ.get("DETBENCH_WRITE_GOLDEN") == "1":
        assert main(["check", str(run_dir), "--against", str(REFERENCE), "--write"]) == 0
        pytest.skip(f"re-recorded {REFERENCE.name} (DETBENCH_WRITE_GOLDEN=1): review the diff; nothing was checked")
    code = main(["check", str(run_dir), "--against", str(REFERENCE), "--tolerance", "0.02"])
    out = capsys.readouterr().out
    print(out)
    assert code == 0, out
    assert "within 0.02" in out
