"""The same cell with the same seed gives bitwise identical rows on CPU (losses and AP)."""
from __future__ import annotations

import pytest
import torch

import math

from harness.config import DetectorSpec, ResourcesSpec, ScheduleSpec
from harness.plan import stage_job
from harness.engine import run_stage
from harness.plan import RunInfo, StageOutput
from harness.results import rows_for_trial
from runkit import make_cell

TINY = DetectorSpec(fpn_width=16, image_size=64)
RUN = RunInfo(run_dir="/r", run_id="r", suite="det", smoke=True, resources=ResourcesSpec(),
              versions_json="{}", git_sha="")


def _rows(cell) -> list[tuple]:
    state, _ = run_stage(stage_job(cell, cell.stages[-1]), device=torch.device("cpu"))
    out = StageOutput("ok", history=state.history, final=state.last_eval)
    rows = rows_for_trial(RUN, cell, "t", {cell.stages[-1]: out}, wall_s=0.0)
    # NaN (an AP with no ground truth of that size) compared as a marker: NaN != NaN
    return [(r.metric, r.epoch, "nan" if math.isnan(r.value) else r.value) for r in rows
            if not r.metric.startswith("time/")]


@pytest.fixture()
def restore_determinism():
    yield
    torch.use_deterministic_algorithms(False)  # schedule.deterministic sets process-wide state


@pytest.mark.parametrize("method", ["faster_rcnn", "focal"])
def test_same_cell_same_seed_identical_rows(method, tiny_data, one_thread, restore_determinism):
    cell = make_cell(method, {}, tiny_data, detector=TINY, arch="retinanet" if method == "focal" else "faster_rcnn",
                     schedule=ScheduleSpec(epochs=2, batch_size=4, warmup_iters=1, deterministic=True))
    first, second = _rows(cell), _rows(cell)
    assert any(m == "train/loss" for m, _, _ in first) and any(m == "AP" and e is None for m, e, _ in first)
    assert first == second  # bitwise: floats compared with ==
    other = _rows(make_cell(method, {}, tiny_data, detector=TINY, seed=1,
                            arch="retinanet" if method == "focal" else "faster_rcnn",
                            schedule=ScheduleSpec(epochs=2, batch_size=4, warmup_iters=1, deterministic=True)))
    assert [v for m, _, v in other if m == "train/loss"] != [v for m, _, v in first if m == "train/loss"]
