"""Reading a run directory: is it one, its plan (``run.json``), the suite settings its outputs need.

Every command that reads an existing run (leaderboard, report, compare, status, check,
resume) opens it here, so "not a run directory" is one message everywhere.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from harness.config import LeaderboardSpec, Suite, method_label
from harness.core import DetbenchError
from harness.plan import Cell, RunInfo
from harness.storage import Storage, open_storage

log = logging.getLogger(__name__)

RUN_FILE = "run.json"
DRIVER_FILE = "driver.json"


def open_run(run_dir: str | Path | Storage) -> Storage:
    """The storage of an existing run directory, or a clear error (:class:`DetbenchError`)."""
    storage = open_storage(run_dir)
    if not storage.is_local:  # an unreachable endpoint or missing bucket is named as such
        storage.check()
    if not storage.exists(RUN_FILE) and not storage.list("rows"):
        hint = "" if storage.is_local else " (the prefix holds something else, or nothing)"
        raise DetbenchError(f"not a detbench run directory (no run.json){hint}", file=storage.display())
    return storage


def load_run(run_dir: str | Path | Storage) -> tuple[RunInfo, list[Cell]]:
    """``(run, cells)`` of a run directory, or a clear error."""
    storage = open_storage(run_dir)
    try:
        state = storage.read_json(RUN_FILE)
    except FileNotFoundError:
        raise DetbenchError("not a detbench run directory (no run.json)", file=storage.display()) from None
    return RunInfo.from_dict(state["run"]), [Cell.from_dict(c) for c in state["cells"]]


def planned_cells(storage: Storage) -> list:
    """The run's planned cells (their test sets' ground truth); none for a directory without run.json."""
    try:
        return load_run(storage)[1]
    except DetbenchError:
        return []


@dataclass
class RunSettings:
    """What of the run's suite the outputs need (from ``manifest.json``; defaults without one)."""
    leaderboard: LeaderboardSpec = field(default_factory=LeaderboardSpec)
    published: dict[str, str] = field(default_factory=dict)   # row label -> published.csv key
    baselines: dict[str, str] = field(default_factory=dict)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])  # what a resumed sweep feeds
    manifest: dict = field(default_factory=dict)


def run_settings(storage: Storage) -> RunSettings:
    try:
        manifest = storage.read_json("manifest.json")
    except FileNotFoundError:
        return RunSettings()
    try:
        suite = Suite.model_validate(manifest["suite"]) if "suite" in manifest else None
    except ValidationError:  # a manifest written by another detbench version: its baselines still count
        log.warning("manifest.json's suite does not validate with this version; leaderboard defaults used")
        suite = None
    return RunSettings(leaderboard=suite.leaderboard if suite else LeaderboardSpec(),
                       published={method_label(m): m.published for m in suite.methods if m.published}
                       if suite else {},
                       baselines=manifest.get("baselines", {}),
                       loggers=list(suite.loggers) if suite else ["tensorboard"], manifest=manifest)
