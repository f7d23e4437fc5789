"""``detbench run``: suite -> checked data -> Ray sweep -> rows -> leaderboard.

Everything that can be wrong with the user's input (suite, data, resources)
is checked *before* the run directory is created, so a bad input leaves
nothing behind. The run directory then holds: ``suite.yaml`` (a copy),
``manifest.json`` (resolved config, versions, git SHA, cluster, seeds),
``rows/`` (one Parquet file per trial), ``tune/`` and ``train/`` (Ray's
storage: checkpoints, trial state), ``failures/`` (tracebacks),
``logs/driver.log`` and the leaderboard files.
"""
from __future__ import annotations

import json
import logging
import math
import shutil
import subprocess
import time
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from harness.config import data_cache_dir, load_suite, method_label
from harness.data.loader import prepare_conditions, prepare_dataset
from harness.plan import plan_cells, rows_for_trial
from harness.results import ResultStore

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


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, text=True,
                              capture_output=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _driver_log(run_dir: Path) -> None:
    """Ray's and our own library logging go to a file, not the user's terminal."""
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(run_dir / "logs" / "driver.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in ("ray", "harness", "methods"):
        lg = logging.getLogger(name)
        lg.addHandler(handler)
        lg.propagate = False


def record_unfinished(grids, run: dict, store: ResultStore) -> None:
    """Trials that never wrote rows (ASHA stopped them, or the trial actor died) get one row each."""
    for grid in grids:
        for result in grid:
            cfg = result.config or {}
            trial_id = (result.metrics or {}).get("trial_id", "")  # Tune adds it to every result
            if not trial_id or not cfg or trial_id in store.trial_ids():
                continue
            metrics = result.metrics or {}
            if result.error is None:
                reason = f"stopped early by the scheduler at epoch {metrics.get('epoch', 0)}"
                status = "stopped"
            else:
                reason, status = f"trial errored: {str(result.error).splitlines()[0][:300]}", "failed"
            from harness.distributed import apply_search, sampled_params
            cell = apply_search(cfg["cell"], sampled_params(cfg))
            curve = [] if result.metrics_dataframe is None else [
                {k: v for k, v in rec.items() if k == "epoch" or k == "lr" or k.startswith(("train/", "val/", "time/"))}
                for rec in result.metrics_dataframe.to_dict("records") if "train/loss" in rec]
            stage = cell["stages"][-1]
            rows = rows_for_trial(run, cell, trial_id,
                                  {stage: {"status": "failed", "reason": reason, "history": curve}},
                                  wall_s=math.nan)
            rows = [r.model_copy(update={"status": status}) for r in rows]
            store.write_trial(trial_id, rows)


def run_suite(suite_path: str | Path, *, address: str | None = None, out_dir: str | Path = "results/runs",
              name: str | None = None, progress: bool = True) -> Path:
    """Run a suite end to end and return the path of its Markdown leaderboard."""
    from harness.leaderboard import format_for_terminal, write_leaderboard
    from harness.progress import SweepProgress
    from harness.sweep import check_fits, cluster_nodes, init_ray, run_sweep

    suite_path = Path(suite_path)
    suite = load_suite(suite_path)
    cache = data_cache_dir(suite)
    prepared = {ds.name: prepare_dataset(ds, cache) for ds in suite.datasets}
    conditions = {name: prepare_conditions(suite.conditions, p, cache, seed=suite.condition_seed,
                                           progress=progress) for name, p in prepared.items()}
    cells = plan_cells(suite, prepared, conditions)
    init_ray(address)
    nodes = cluster_nodes()
    concurrency = check_fits(suite.resources, nodes)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_dir = (Path(out_dir) / (name or f"{suite.name}-{stamp}")).resolve()
    run_dir.mkdir(parents=True, exist_ok=False)
    _driver_log(run_dir)
    shutil.copyfile(suite_path, run_dir / "suite.yaml")
    import ray
    versions = package_versions()
    manifest = {"suite": suite.model_dump(), "versions": versions, "git_sha": git_sha(),
                "cluster": {"nodes": nodes, "ray_address": ray.get_runtime_context().gcs_address},
                "ray_session_dir": ray._private.worker._global_node.get_session_dir_path()
                if ray._private.worker._global_node else None,
                "seeds": suite.seeds, "cells": [c["cell_id"] for c in cells],
                "baselines": {method_label(m): m.baseline for m in suite.methods if m.baseline},
                "concurrency": concurrency, "started": stamp}
    (run_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, default=str))
    run = {"run_dir": str(run_dir), "run_id": run_dir.name, "suite": suite.name, "smoke": suite.smoke,
           "resources": suite.resources.model_dump(), "versions_json": json.dumps(versions),
           "git_sha": manifest["git_sha"]}

    n_trials = sum(c["search"]["num_samples"] if c.get("search") else 1 for c in cells)
    print(f"detbench: {len(cells)} cell(s), {n_trials} trial(s), up to {concurrency} at once; "
          f"run directory {run_dir}")
    bar = SweepProgress(n_trials, enabled=progress)
    t0 = time.time()
    try:
        grids = run_sweep(cells, run, concurrency=concurrency, callbacks=[bar])
    finally:
        bar.close()
    store = ResultStore(run_dir)
    record_unfinished(grids, run, store)
    board = write_leaderboard(run_dir, "md")
    write_leaderboard(run_dir, "csv")
    df = store.read()
    print(format_for_terminal(df, baselines=manifest["baselines"]))
    from harness.report import robustness_table, write_report
    if robustness_table(df):
        print("\n" + robustness_table(df))
    write_report(run_dir, df)
    print(f"\nwall time {time.time() - t0:.0f} s")
    return board
