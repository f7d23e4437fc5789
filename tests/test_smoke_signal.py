"""Every row of the smoke suite carries signal: each method learns, and a broken variant does not.

For each registered method, the smoke suite's own cell (``suites/smoke.yaml``: data, detector,
schedule, method config) is trained twice through the harness's engine -- as configured, and
with the method's classification term switched off (``schedule.loss_weights``) -- and its
clean AP50 must be >= 0.30 and fall by >= 0.10 when broken. A change that silently breaks a
loss (a sign, a normalisation, a target) then fails here instead of passing the smoke run.

This trains the whole smoke suite twice (~14 minutes on 2 cores), so it is its own tier:
``make test-signal`` (marker ``signal``), not part of ``make test``.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.plugin import METHODS

pytestmark = pytest.mark.signal

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def smoke_cells():
    from harness.app.runner import prepare_suite
    checked = prepare_suite(ROOT / "suites" / "smoke.yaml")
    return {c.method: c for c in checked.cells if c.dataset.name == "shapes"}


def _clean_ap50(cell, folder: Path) -> float:
    from harness.plan import stage_job
    from harness.engine import run_stage
    artifacts: dict[str, str] = {}
    state = None
    for stage in cell.stages:
        state, model = run_stage(stage_job(cell, stage, artifacts), device=torch.device("cpu"))
        path = folder / f"{cell.method}-{stage}.pt"
        torch.save(cell.plugin.detector_of(model).state_dict(), path)
        artifacts[stage] = str(path)
    return float(state.last_eval["AP50"])


def test_the_smoke_suite_has_a_cell_of_every_method(smoke_cells):
    assert set(smoke_cells) == set(METHODS.names())


@pytest.mark.parametrize("method", METHODS.names())
def test_smoke_cell_learns_and_its_broken_variant_does_not(method, smoke_cells, one_thread, tmp_path):
    """Broken: the plugin's main loss term (:meth:`Method.main_loss_term`) weighted 0."""
    from dataclasses import replace
    cell = smoke_cells[method]
    (tmp_path / "good").mkdir()
    (tmp_path / "broken").mkdir()
    good = _clean_ap50(cell, tmp_path / "good")
    broken_schedule = cell.schedule.model_copy(update={"loss_weights": {cell.plugin.main_loss_term(cell.arch): 0.0}})
    broken = _clean_ap50(replace(cell, schedule=broken_schedule), tmp_path / "broken")
    print(f"{method}: AP50 {good:.3f}, broken {broken:.3f}")
    assert good >= 0.30, f"{method} smoke AP50 {good:.3f} < 0.30"
    assert good - broken >= 0.10, f"{method}: broken variant {broken:.3f} vs {good:.3f}"
