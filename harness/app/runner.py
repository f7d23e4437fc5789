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
:func:`harness.sweep.trial.run_trial`), an interrupted trial's Train run picks
up its last epoch checkpoint, and Optuna's study comes back from its journal.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.config import ResourcesSpec, Suite, data_cache_dir, method_label
from harness.core import ConfigError, DetbenchError
from harness.data import PreparedCondition, PreparedDataset, load_split, prepare_conditions, prepare_dataset
from harness.plan import Cell, RunInfo, eval_cells, load_suite, plan_cells
from harness.results import DRIVER_FILE, RUN_FILE, ResultStore, load_run, open_run, run_settings
from harness.storage import Storage, open_storage
from harness.sweep import (RAY_MESSAGES, SweepProgress, check_fits, check_loggers, cluster_nodes,
                           decode_check_on_cluster, init_ray, ray_session, record_unfinished, run_sweep)

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
LOCK_FILE = Path(__file__).resolve().parents[2] / "requirements.lock"


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


DRIVER_LOG = "logs/driver.log"


def _driver_log(storage: Storage) -> Path:
    """Ray's and our own library logging go to a file, not the user's terminal; returns it.

    On a POSIX run directory it is ``logs/driver.log``; on an object store the node's working
    copy (:meth:`Storage.working_copy`: a resumed run appends to the stored log), published
    when the sweep ends (:func:`_publish_log`).
    """
    path = storage.working_copy(DRIVER_LOG)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for record in RAY_MESSAGES.buffer:  # what Ray said while it started, before this file existed
        handler.handle(record)
    RAY_MESSAGES.buffer.clear()
    logging.getLogger("ray").removeHandler(RAY_MESSAGES)  # from now on the file gets it directly
    for name in ("ray", "harness", "methods"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False
    return path


def _publish_log(storage: Storage, path: Path) -> None:
    for lg in ("ray", "harness", "methods"):
        for h in logging.getLogger(lg).handlers:
            h.flush()
    storage.publish_copy(DRIVER_LOG, path)


def out_storage(out_dir: str | Path | None, suite: Suite | None = None) -> Storage:
    """Where new run directories go: ``--out``, else the suite's ``storage.uri``, else ``results/runs``;
    checked (reachable, bucket present, credentials accepted) before anything else happens."""
    spec = suite.storage if suite is not None else None
    where = out_dir or (spec.uri if spec else None) or "results/runs"
    storage = open_storage(where, **(spec.options() if spec else {}))
    storage.check(write=True)
    return storage




def run_suite(suite_path: str | Path, *, address: str | None = None, out_dir: str | Path | None = None,
              name: str | None = None, progress: bool = True, retry_failed: bool = False,
              checkpoint: str | None = None, method: str | None = None, check_images: str = "header") -> Path:
    """Run a suite end to end and return the path of its Markdown leaderboard.

    ``out_dir``: a folder or ``s3://BUCKET/PREFIX`` (default: the suite's ``storage.uri``, else
    ``results/runs``). With ``name`` of an existing run directory under it, that run is resumed.
    With ``checkpoint`` (``detbench eval``), nothing is trained: the checkpoint is evaluated as
    method ``method``'s detector on every dataset and condition (:mod:`harness.plan.checkpoint_eval`).
    """

    out = out_storage(out_dir, load_suite(suite_path, check_paths=False))
    if name and out.child(name).exists(RUN_FILE):
        print(f"detbench: {out.child(name).display()} exists: resuming it")
        return resume_run(out.child(name), address=address, progress=progress, retry_failed=retry_failed)
    # decode: the header check here, the full decode as Ray tasks on the cluster once it is up
    checked = prepare_suite(suite_path, progress=progress,
                            check_images="header" if check_images == "decode" else check_images)
    suite, cells = checked.suite, checked.cells
    if checkpoint:
        cells = eval_cells(cells, checked.path, checkpoint, method,
                           lambda d: load_split(d, "val", check_images=False).class_names)
    check_loggers(suite.loggers, run_dir=out.uri)  # a logger that cannot work: refused before Ray starts
    init_ray(address)
    nodes = cluster_nodes()
    concurrency = fit_or_refuse(suite.resources, nodes, checked.path)
    if check_images == "decode":  # before the run directory exists: a bad image leaves nothing behind
        decode_check_on_cluster([d.split(s) for d in checked.datasets.values() for s in ("train", "val")],
                                progress=progress)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    storage = out.child(name or f"{'eval-' if checkpoint else ''}{suite.name}-{stamp}")
    new_run_dir(storage)
    log_file = _driver_log(storage)
    storage.upload("suite.yaml", checked.path)
    versions = package_versions()
    session = ray_session()
    manifest = {"suite": suite.model_dump(), "versions": versions, "lock": lock_status(versions),
                "git_sha": git_sha(),
                "cluster": {"nodes": nodes, "ray_address": session["ray_address"]},
                "ray_session_dir": session["ray_session_dir"],
                "seeds": suite.seeds, "cells": [c.cell_id for c in cells],
                "baselines": {method_label(m): m.baseline for m in suite.methods if m.baseline},
                "concurrency": concurrency, "started": stamp, "storage": storage.describe(),
                "checkpoint": {"path": cells[0].checkpoint, "sha256": cells[0].checkpoint_sha256}
                if checkpoint else None}
    storage.write_json("manifest.json", manifest, indent=2, default=str)
    options = {k: v for k, v in storage.describe().items() if k != "uri"} or None
    run = RunInfo(run_dir=storage.uri, run_id=storage.uri.rstrip("/").rsplit("/", 1)[-1], suite=suite.name,
                  smoke=suite.smoke, resources=suite.resources, versions_json=json.dumps(versions),
                  git_sha=manifest["git_sha"], storage_options=options)
    storage.write_json(RUN_FILE, {"run": run.to_dict(), "cells": [c.to_dict() for c in cells]})
    print(f"detbench: {len(cells)} cell(s), {count_trials(cells)} trial(s), up to {concurrency} at once; "
          f"run directory {storage.display()}")
    return _sweep_and_report(storage, run, cells, concurrency, progress=progress, log_file=log_file,
                             loggers=suite.loggers)


def new_run_dir(storage: Storage) -> None:
    """Refuse a run directory that already holds anything (it would mix two runs' files)."""
    local = storage.local_path()
    if local is not None:
        try:
            local.mkdir(parents=True, exist_ok=False)
            return
        except FileExistsError:
            pass
    elif not storage.list("") and not storage.list_dirs(""):
        return
    raise DetbenchError("exists but is not a detbench run (no run.json); choose another --name",
                        file=storage.display())


@dataclass(frozen=True)
class CheckedSuite:
    """A suite whose every input has been checked, with its data prepared and its cells planned."""
    path: Path
    suite: Suite
    datasets: dict[str, PreparedDataset]
    conditions: dict[str, list[PreparedCondition]]
    cells: list[Cell]


def prepare_suite(suite_path: str | Path, *, progress: bool = False, check_images: str = "header") -> CheckedSuite:
    """The one pre-run check of a suite file (``run`` and every command that runs a suite).

    Suite keys and values (search distributions included), dataset files and every image
    (the checks of ``detbench data check``), test conditions (rendered once into the cache),
    and the plan. Any problem is a :class:`DetbenchError` naming the file, record and
    field, raised before a run directory or a Ray session exists.
    """
    path = Path(suite_path)
    suite = load_suite(path)
    cache = data_cache_dir(suite)
    prepared = {ds.name: prepare_dataset(ds, cache, check_level=check_images, progress=progress)
                for ds in suite.datasets}
    conditions = {name: prepare_conditions(suite.conditions, p, cache, seed=suite.condition_seed,
                                           progress=progress) for name, p in prepared.items()}
    return CheckedSuite(path, suite, prepared, conditions, plan_cells(suite, prepared, conditions))


def fit_or_refuse(resources: ResourcesSpec, nodes: list[dict], source: str | Path) -> int:
    """How many trials fit at once; a request the cluster can never hold is refused naming ``source``."""
    try:
        return check_fits(resources, nodes)
    except ConfigError as err:
        raise ConfigError(err.message, file=source, field=err.field) from None


def count_trials(cells: list[Cell]) -> int:
    """Trials a sweep of ``cells`` runs: one per plain cell, ``num_samples`` per searched one."""
    return sum(c.trials for c in cells)


def resume_run(run_dir: str | Path, *, address: str | None = None, progress: bool = True,
               retry_failed: bool = False) -> Path:
    """Continue a run after its driver stopped; ``retry_failed`` reruns the failed cells too."""

    storage = open_run(run_dir)
    storage.check(write=True)
    run, cells = load_run(storage)
    if run.run_dir != storage.uri:  # the run directory was moved or copied: it is where it is now
        run = replace(run, run_dir=storage.uri)
    storage = run.storage()
    loggers = run_settings(storage).loggers  # the suite's, from the run's manifest
    check_loggers(loggers, run_dir=storage.uri)
    init_ray(address)
    concurrency = fit_or_refuse(run.resources, cluster_nodes(), storage.display(RUN_FILE))
    log_file = _driver_log(storage)
    retry = retire_failed(storage, cells) if retry_failed else []
    print(f"detbench: resuming {storage.display()}" +
          (f"; retrying {len(retry)} failed cell(s)" if retry_failed else ""))
    return _sweep_and_report(storage, run, cells, concurrency, progress=progress, resume=True, retry=retry,
                             log_file=log_file, loggers=loggers)


def retire_failed(run_dir: str | Path | Storage, cells: list[Cell]) -> list[Cell]:
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


def _sweep_and_report(storage: Storage, run: RunInfo, cells: list[Cell], concurrency: int, *, progress: bool,
                      resume: bool = False, retry: list[Cell] = (), log_file: Path | None = None,
                      loggers=("tensorboard",)) -> str:

    driver = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(timezone.utc).isoformat(), "finished": None}
    storage.write_json(DRIVER_FILE, driver)
    store = ResultStore(storage)
    bar = SweepProgress(count_trials(cells) + len(retry), enabled=progress)
    bar.bar.update(len(store.trial_ids()) if resume else 0)
    t0 = time.time()
    try:
        grids = run_sweep(cells, run, concurrency=concurrency, callbacks=[bar], resume=resume, retry=retry,
                          loggers=loggers)
    finally:
        bar.close()
        if log_file is not None:
            _publish_log(storage, log_file)
    record_unfinished(grids, run, store)
    storage.write_json(DRIVER_FILE, {**driver, "finished": datetime.now(timezone.utc).isoformat()})
    from harness.report import format_for_terminal, robustness_table, write_run_outputs
    df = store.read()
    outputs = write_run_outputs(storage, df=df)
    print(format_for_terminal(outputs.board))
    if robustness_table(df):
        print("\n" + robustness_table(df))
    for note in outputs.notes:
        print(f"note: {note}")
    print(f"\nreport: {storage.display('report.html')}")
    board = storage.display("leaderboard.md")
    print(f"\nwall time {time.time() - t0:.0f} s")
    return board
