"""A trial's outputs as result rows: config hash, row building, the unfinished trials of a sweep.

The one place that decides what a trial's rows are: per-epoch curves, the final
evaluation per test condition, or one failure / stopped row per stage. The trial
itself (:mod:`harness.sweep.trial`), a resumed trial that finds its rows already
written, and the driver recording trials the scheduler stopped (:func:`harness.sweep.record_unfinished`)
all go through here.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import TYPE_CHECKING

from harness.results.schema import ResultRow
from harness.core import COST_DEVICE_S

if TYPE_CHECKING:
    from harness.plan import Cell, RunInfo, StageOutput

#: Cell fields that do not change what a trial computes (names, the plan's bookkeeping).
_NOT_HASHED = ("cell_id", "label", "search", "stages", "conditions")


def config_hash(cell: "Cell") -> str:
    """16 hex of everything that determines a cell's numbers (the dataset by name)."""
    keep = {k: v for k, v in cell.to_dict().items() if k not in _NOT_HASHED}
    keep["dataset"] = cell.dataset.name
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _number(v) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None


def row_variant(cell: "Cell") -> str:
    """The leaderboard variant of a cell; each sampled configuration of a search is its own."""
    sampled = cell.sampled_values()
    if not sampled:
        return cell.variant
    values = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in sampled.items())
    return (cell.variant + " " if cell.variant else "") + values


def rows_for_trial(run: "RunInfo", cell: "Cell", trial_id: str, outputs: dict[str, "StageOutput"],
                   wall_s: float) -> list[ResultRow]:
    """All rows of one trial: per-epoch curves, final evaluation, or a failure row, per stage."""
    from harness.modeling import describe

    common = dict(run_id=run.run_id, suite=run.suite, trial_id=trial_id, cell=cell.cell_id,
                  method=cell.method, variant=row_variant(cell), dataset=cell.dataset.name,
                  seed=cell.seed, config_hash=config_hash(cell),
                  config_json=json.dumps({"method_config": cell.method_config,
                                          "detector": cell.detector.model_dump(),
                                          "schedule": cell.schedule.model_dump()}, sort_keys=True),
                  wall_s=wall_s, metric_backend="faster_coco_eval", versions_json=run.versions_json,
                  git_sha=run.git_sha, smoke=run.smoke)
    by_label = {c.label: c for c in cell.conditions}
    rows = []
    for stage, out in outputs.items():
        detector = describe(cell.plugin.stage_detector(stage, cell.detector), cell.arch)
        base = dict(common, stage=stage, detector=detector, restarts=int(out.resumes), node_id=out.node_id,
                    device_s=_number(out.final.get(COST_DEVICE_S)) or 0.0)  # every worker's seconds, summed
        if out.artifact:  # a shared earlier stage: identified by what determines it
            base["config_hash"] = out.artifact[:16]
        for record in out.history:
            for key, value in record.items():
                v = _number(value)
                if key == "epoch" or v is None:
                    continue
                split = "val" if key.startswith("val/") else "train"
                rows.append(ResultRow(**base, split=split, epoch=int(record["epoch"]), metric=key,
                                      value=v, status="ok"))
        if not out.ok:
            rows.append(ResultRow.failure(out.reason or "unknown failure", **base))
            continue
        evals = [("clean", 0, out.final)] + [(by_label[lab].name, by_label[lab].severity, m)
                                             for lab, m in out.conditions.items() if lab in by_label]
        for condition, severity, metrics in evals:
            for key, value in metrics.items():
                v = _number(value)
                rows.append(ResultRow(**base, split="val", condition=condition, severity=severity,
                                      metric=key, value=math.nan if v is None else v, status="ok"))
    return rows


def report_of_rows(df, cell: "Cell") -> dict:
    """What a finished trial reported to Tune, rebuilt from its rows (a resumed sweep)."""
    mine = df[df["stage"] == cell.stages[-1]]
    final = mine[mine["epoch"].isna() & (mine["condition"] == "clean")]
    report = {m: float(v) for m, v in zip(final["metric"], final["value"])}
    report.update(epoch=int(mine["epoch"].max()) if mine["epoch"].notna().any() else 0, status="ok",
                  resumed_from_rows=True)
    if cell.search:
        report.setdefault(cell.search.metric, float("nan"))
    return report
