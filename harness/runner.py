"""``detbench run``: suite -> checked data -> Ray sweep -> rows -> leaderboard.

Everything that can be wrong with the user's input (suite, data, resources)
is checked *before* the run directory is created, so a bad input leaves
nothing behind. The run directory then holds: ``suite.yaml`` (a copy),
``manifest.json`` (resolved config, versions, git SHA, cluster, seeds),
``rows/`` (one Parquet file per trial), ``tune/`` and ``train/`` (Ray's
storage: checkpoints, trial state), ``failures/`` (tracebacks),
``logs/driver.log`` and the leaderboard files; ``run.json`` (the planned cells
and run settings: what ``detbench resume`` needs), ``driver.json`` (pid and host
of the driver working on it) and ``trials/`` (one marker per started trial,
for ``detbench status``).

A run directory is resumable: ``detbench resume RUN_DIR`` (or ``detbench run``
with the same ``--name``) restores the Tune experiments with
``Tuner.restore(..., resume_errored=True)``; finished trials are not rerun
(also when Tune's state is older than the rows: see
:func:`harness.distributed.run_trial`), an interrupted trial's Train run picks
up its last epoch checkpoint, and Optuna's study comes back from its journal.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.config import ResourcesSpec, Suite, data_cache_dir, load_suite, method_label
from harness.errors import ConfigError, DetbenchError
from harness.fileio import atomic_write_json
from harness.data.loader import PreparedCondition, PreparedDataset, prepare_conditions, prepare_dataset
from harness.plan import plan_cells
from harness.records import Cell, RunInfo
from harness.results import ResultStore, record_unfinished

log = logging.getLogger(__name__)
PACKAGES = ("detbench", "torch", "torchvision", "ray", "optuna", "faster-coco-eval", "pycocotools",
            "numpy", "pandas", "pyarrow", "pydantic")


def package_versions() -> dict[str, str]:
    out = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "not installed"
    return out


#: Exact versions of a reproducible install (``make install``; refreshed by ``make lock``).
LOCK_FILE = Path(__file__).resolve().parent.parent / "requirements.lock"


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-").replace(".", "-")


def lock_status(versions: dict[str, str], lock_file: Path = LOCK_FILE) -> dict:
    """Whether the imported versions are the lock file's: ``{"file", "matches", "differs"}``.

    ``differs``: package -> [locked, installed] for each recorded package the lock pins
    otherwise; ``matches`` is None where there is no lock file (an installed wheel).
    """
    if not lock_file.is_file():
        return {"file": None, "matches": None, "differs": {}}
    locked = {}
    for line in lock_file.read_text().splitlines():
        name, sep, ver = line.split("#")[0].strip().partition("==")
        if sep:
            locked[_normalise(name)] = ver.strip()
    differs = {p: [locked[_normalise(p)], v] for p, v in versions.items()
               if _normalise(p) in locked and locked[_normalise(p)] != v}
    return {"file": str(lock_file), "matches": not differs, "differs": differs}


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver_log(run_dir: Path) -> None:
    """Ray's and our own library logging go to a file, not the user's terminal."""
    from harness.sweep import RAY_MESSAGES
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for record in RAY_MESSAGES.buffer:  # what Ray said while it started, before this file existed
        handler.handle(record)
    RAY_MESSAGES.buffer.clear()
    logging.getLogger("ray").removeHandler(RAY_MESSAGES)  # from now on the file gets it directly
    for name in ("ray", "harness", "methods"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False


RUN_FILE = "run.json"
DRIVER_FILE = "driver.json"


def run_suite(suite_path: str | Path, *, address: str | None = None, out_dir: str | Path = "results/runs",
              name: str | None = None, progress: bool = True, retry_failed: bool = False,
              checkpoint: str | None = None, method: str | None = None) -> Path:
    """Run a suite end to end and return the path of its Markdown leaderboard.

    With ``name`` of an existing run directory under ``out_dir``, that run is resumed.
    With ``checkpoint`` (``detbench eval``), nothing is trained: the checkpoint is evaluated as
    method ``method``'s detector on every dataset and condition (:mod:`harness.checkpoint_eval`).
    """
    from harness.sweep import cluster_nodes, init_ray

    if name and (Path(out_dir) / name / RUN_FILE).is_file():
        print(f"detbench: {Path(out_dir) / name} exists: resuming it")
        return resume_run(Path(out_dir) / name, address=address, progress=progress, retry_failed=retry_failed)
    checked = prepare_suite(suite_path, progress=progress)
    suite, cells = checked.suite, checked.cells
    if checkpoint:
        from harness.checkpoint_eval import eval_cells
        from harness.data.loader import load_split
        cells = eval_cells(cells, checked.path, checkpoint, method,
                           lambda d: load_split(d, "train", check_images=False).class_names)
    init_ray(address)
    nodes = cluster_nodes()
    concurrency = fit_or_refuse(suite.resources, nodes, checked.path)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = (Path(out_dir) / (name or f"{'eval-' if checkpoint else ''}{suite.name}-{stamp}")).resolve()
    try:
        run_dir.mkdir(parents=True, exist_ok=False)
    except FileExistsError:
        raise DetbenchError("exists but is not a detbench run (no run.json); choose another --name",
                            file=run_dir) from None
    _driver_log(run_dir)
    shutil.copyfile(checked.path, run_dir / "suite.yaml")
    import ray
    versions = package_versions()
    manifest = {"suite": suite.model_dump(), "versions": versions, "lock": lock_status(versions),
                "git_sha": git_sha(),
                "cluster": {"nodes": nodes, "ray_address": ray.get_runtime_context().gcs_address},
                "ray_session_dir": ray._private.worker._global_node.get_session_dir_path()
                if ray._private.worker._global_node else None,
                "seeds": suite.seeds, "cells": [c.cell_id for c in cells],
                "baselines": {method_label(m): m.baseline for m in suite.methods if m.baseline},
                "concurrency": concurrency, "started": stamp,
                "checkpoint": {"path": cells[0].checkpoint, "sha256": cells[0].checkpoint_sha256}
                if checkpoint else None}
    atomic_write_json(manifest, run_dir / "manifest.json", indent=2, default=str)
    run = RunInfo(run_dir=str(run_dir), run_id=run_dir.name, suite=suite.name, smoke=suite.smoke,
                  resources=suite.resources, versions_json=json.dumps(versions), git_sha=manifest["git_sha"])
    atomic_write_json({"run": run.to_dict(), "cells": [c.to_dict() for c in cells]}, run_dir / RUN_FILE)
    print(f"detbench: {len(cells)} cell(s), {count_trials(cells)} trial(s), up to {concurrency} at once; "
          f"run directory {run_dir}")
    return _sweep_and_report(run_dir, run, cells, concurrency, progress=progress)


@dataclass(frozen=True)
class CheckedSuite:
    """A suite whose every input has been checked, with its data prepared and its cells planned."""
    path: Path
    suite: Suite
    datasets: dict[str, PreparedDataset]
    conditions: dict[str, list[PreparedCondition]]
    cells: list[Cell]


def prepare_suite(suite_path: str | Path, *, progress: bool = False) -> CheckedSuite:
    """The one pre-run check of a suite file (``run`` and every command that runs a suite).

    Suite keys and values (search distributions included), dataset files and every image
    (the checks of ``detbench data check``), test conditions (rendered once into the cache),
    and the plan. Any problem is a :class:`DetbenchError` naming the file, record and
    field, raised before a run directory or a Ray session exists.
    """
    path = Path(suite_path)
    suite = load_suite(path)
    cache = data_cache_dir(suite)
    prepared = {ds.name: prepare_dataset(ds, cache, progress=progress) for ds in suite.datasets}
    conditions = {name: prepare_conditions(suite.conditions, p, cache, seed=suite.condition_seed,
                                           progress=progress) for name, p in prepared.items()}
    return CheckedSuite(path, suite, prepared, conditions, plan_cells(suite, prepared, conditions))


def fit_or_refuse(resources: ResourcesSpec, nodes: list[dict], source: Path) -> int:
    """How many trials fit at once; a request the cluster can never hold is refused naming ``source``."""
    from harness.sweep import check_fits
    try:
        return check_fits(resources, nodes)
    except ConfigError as err:
        raise ConfigError(err.message, file=source, field=err.field) from None


def count_trials(cells: list[Cell]) -> int:
    """Trials a sweep of ``cells`` runs: one per plain cell, ``num_samples`` per searched one."""
    return sum(c.trials for c in cells)


def load_run(run_dir: str | Path) -> tuple[RunInfo, list[Cell]]:
    """``(run, cells)`` of a run directory, or a clear error."""
    path = Path(run_dir) / RUN_FILE
    if not path.is_file():
        raise DetbenchError("not a detbench run directory (no run.json)", file=run_dir)
    state = json.loads(path.read_text())
    return RunInfo.from_dict(state["run"]), [Cell.from_dict(c) for c in state["cells"]]


def resume_run(run_dir: str | Path, *, address: str | None = None, progress: bool = True,
               retry_failed: bool = False) -> Path:
    """Continue a run after its driver stopped; ``retry_failed`` reruns the failed cells too."""
    from harness.sweep import cluster_nodes, init_ray

    run_dir = Path(run_dir).resolve()
    run, cells = load_run(run_dir)
    init_ray(address)
    concurrency = fit_or_refuse(run.resources, cluster_nodes(), run_dir / RUN_FILE)
    _driver_log(run_dir)
    retry = retire_failed(run_dir, cells) if retry_failed else []
    print(f"detbench: resuming {run_dir}" + (f"; retrying {len(retry)} failed cell(s)" if retry_failed else ""))
    return _sweep_and_report(run_dir, run, cells, concurrency, progress=progress, resume=True, retry=retry)


def retire_failed(run_dir: Path, cells: list[Cell]) -> list[Cell]:
    """Move the rows of failed plain-cell trials to ``rows-retired/``; return those cells.

    A failed trial of a hyperparameter search is one failed sample of the search, not a
    cell to retry: it stays.
    """
    store = ResultStore(run_dir)
    df = store.read()
    if df.empty:
        return []
    failed = df[(df["status"] == "failed")]
    by_id = {c.cell_id: c for c in cells if not c.search}
    retry = []
    for cell_id, g in failed.groupby("cell"):
        if cell_id in by_id:
            for trial_id in set(g["trial_id"]):
                store.retire(trial_id)
            retry.append(by_id[cell_id])
    return retry


def _sweep_and_report(run_dir: Path, run: RunInfo, cells: list[Cell], concurrency: int, *, progress: bool,
                      resume: bool = False, retry: list[Cell] = ()) -> Path:
    from harness.leaderboard import format_for_terminal, run_baselines, write_leaderboard
    from harness.progress import SweepProgress
    from harness.sweep import run_sweep

    driver = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(), "finished": None}
    atomic_write_json(driver, run_dir / DRIVER_FILE)
    store = ResultStore(run_dir)
    bar = SweepProgress(count_trials(cells) + len(retry), enabled=progress)
    bar.bar.update(len(store.trial_ids()) if resume else 0)
    t0 = time.time()
    try:
        grids = run_sweep(cells, run, concurrency=concurrency, callbacks=[bar], resume=resume, retry=retry)
    finally:
        bar.close()
    record_unfinished(grids, run, store)
    atomic_write_json({**driver, "finished": datetime.now(timezone.utc).isoformat()}, run_dir / DRIVER_FILE)
    board = write_leaderboard(run_dir, "md")
    write_leaderboard(run_dir, "csv")
    df = store.read()
    print(format_for_terminal(df, baselines=run_baselines(run_dir)))
    from harness.report import robustness_table, write_report
    if robustness_table(df):
        print("\n" + robustness_table(df))
    write_report(run_dir, df)
    print(f"\nwall time {time.time() - t0:.0f} s")
    return board
