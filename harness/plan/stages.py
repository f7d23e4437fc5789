"""A cell's stages: the engine job that trains each, and the artifact key of each earlier one.

Both are derived from the method plugin's per-stage settings (``stage_detector``,
``stage_schedule``, ``stage_key``), so the trial, its workers and ``detbench plan``
agree on what a stage computes without one of them importing the others.
"""
from __future__ import annotations

from pathlib import Path

from harness.engine import StageJob, loader_workers
from harness.plan.records import Cell
from harness.storage import artifact_key


def stage_job(cell: Cell, stage: str, artifacts: dict[str, str] | None = None, *,
              detections=None, cpus: int = 1) -> StageJob:
    """What a worker needs to run ``stage`` of ``cell``: the stage's detector and schedule resolved.

    ``artifacts``: earlier stage -> its detector file on this node; ``detections``: the Storage
    where the final evaluations' detections go (None: not kept); ``cpus``: the worker's CPUs (the
    default number of loader workers is one less).
    """
    method = cell.plugin
    schedule = method.stage_schedule(stage, cell.schedule)
    return StageJob(method=method, stage=stage, dataset=cell.dataset, detections=detections,
                    detector=method.stage_detector(stage, cell.detector), arch=cell.arch,
                    schedule=schedule, seed=cell.seed,
                    artifacts={k: Path(v) for k, v in (artifacts or {}).items()},
                    conditions=list(cell.conditions), checkpoint=cell.checkpoint,
                    checkpoint_classes=list(cell.checkpoint_classes) if cell.checkpoint_classes else None,
                    loader_workers=loader_workers(schedule, cpus))


def stage_artifact_key(cell: Cell, stage: str) -> str:
    """Key of an earlier stage's output: everything that determines it, nothing else."""
    method = cell.plugin
    data = {k: v for k, v in cell.dataset.to_dict().items() if k != "name"}
    return artifact_key({"method": cell.method, "stage": stage, "config": method.stage_key(stage),
                         "dataset": data, "detector": method.stage_detector(stage, cell.detector).model_dump(),
                         "arch": cell.arch, "schedule": method.stage_schedule(stage, cell.schedule).model_dump(),
                         "seed": cell.seed, "earlier": list(cell.stages[:cell.stages.index(stage)])})
