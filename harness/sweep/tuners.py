"""Run a suite on Ray: connect, size the trials to the cluster, tune, collect.

The same code runs on a laptop (``ray.init()`` starts an embedded local
cluster) and on a real cluster (``--address auto`` / ``RAY_ADDRESS``).
Requests are sized from what the cluster really has: a trial that cannot fit
on it would wait PENDING forever, so it is refused up front with an
explanation. Plain cells run in one Tuner (grid over cells); a method with a
``search:`` gets a Tuner of its own per (dataset, seed) with OptunaSearch
(study journal in the run directory) and ASHA on the explicit ``epoch``.
"""
from __future__ import annotations

import logging
import logging.handlers
import math
import os
from collections.abc import Sequence
from pathlib import Path

from harness.config import ResourcesSpec
from harness.core import ConfigError
from harness.plan import Cell, RunInfo, StageOutput
from harness.results import ResultStore, rows_for_trial
from harness.sweep.job import TRIAL_CPU
from harness.sweep.space import trial_cell, trial_config, tune_space

log = logging.getLogger(__name__)

#: Set for every Ray process: Train's per-report health-check wait is 2 s by default; Tune's
#: experiment state (what a resume restores) is saved every 5 s instead of an adaptive period.
RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", "TUNE_GLOBAL_CHECKPOINT_S": "5",
           "RAY_TRAIN_ENABLE_PRINT_PATCH": "0", "PYTHONWARNINGS": "ignore::DeprecationWarning"}


#: Ray's driver-side messages (its logger, raylet warnings) kept until the run's driver log exists.
RAY_MESSAGES = logging.handlers.MemoryHandler(capacity=10_000, flushLevel=logging.CRITICAL + 1)


def ray_address(address: str | None) -> str:
    """``--address``, else RAY_ADDRESS, else ``"local"``: a new embedded cluster, never one that a
    ``ray start`` left running on this machine (``ray.init()`` without an address would attach to it)."""
    return address or os.environ.get("RAY_ADDRESS") or "local"


def init_ray(address: str | None, log_dir: Path | None = None) -> None:
    """Connect to ``address`` (or RAY_ADDRESS), else start the embedded local cluster.

    Ray's own console output (its logger, e.g. the token-authentication notice, and the
    raylet's warnings relayed to the driver) goes to :data:`RAY_MESSAGES`, which the run's
    ``logs/driver.log`` receives; the user's terminal shows detbench's output only.
    """
    import ray
    os.environ.update(RAY_ENV)
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if ray.is_initialized():
        return
    # ray.init clears the "ray" logger's handlers: what its internals say while it starts is
    # caught one level down, then the "ray" logger itself keeps everything from the terminal.
    internals = logging.getLogger("ray._private")
    internals.addHandler(RAY_MESSAGES)
    internals.propagate = False
    try:
        ray.init(address=ray_address(address), log_to_driver=False, logging_level=logging.WARNING,
                 runtime_env={"env_vars": dict(RAY_ENV)}, configure_logging=False)
    finally:
        internals.removeHandler(RAY_MESSAGES)
        internals.propagate = True
    ray_logger = logging.getLogger("ray")
    ray_logger.addHandler(RAY_MESSAGES)
    ray_logger.propagate = False
    _relay_raylet_messages_to_log()


def _relay_raylet_messages_to_log() -> None:
    """The driver prints the raylet's warnings (e.g. worker start-up counts) straight to the
    terminal; send them to the "ray" logger instead (private Ray API: skipped if it moved)."""
    import ray._private.worker as worker
    if not hasattr(worker, "print_to_stdstream"):
        return
    raylet_log = logging.getLogger("ray.raylet")

    def to_log(data, ignore_prefix=False):
        for line in data.get("lines", ()):
            raylet_log.warning("(%s) %s", data.get("pid", "ray"), line)
    worker.print_to_stdstream = to_log


def cluster_nodes() -> list[dict]:
    """Alive nodes with their total resources."""
    import ray
    return [n["Resources"] for n in ray.nodes() if n.get("Alive")]


def ray_session() -> dict:
    """The connected cluster's GCS address and this driver's Ray session folder (the manifest keeps both)."""
    import ray
    node = ray._private.worker._global_node
    return {"ray_address": ray.get_runtime_context().gcs_address,
            "ray_session_dir": node.get_session_dir_path() if node else None}


def check_fits(res: ResourcesSpec, nodes: list[dict]) -> int:
    """Refuse requests the cluster can never schedule; return how many trials fit at once."""
    need = {"CPU": res.cpus_per_worker, "GPU": res.gpus_per_worker}

    def worker_slots(node: dict, reserve_cpu: float = 0.0) -> int:
        return min(math.floor((node.get(k, 0) - (reserve_cpu if k == "CPU" else 0)) / v + 1e-9)
                   if v else 10**6 for k, v in need.items())

    # Workers of one trial may land on different nodes; the trial's own sliver of CPU
    # must fit too, on whichever node leaves the most worker slots.
    slots = max((sum(worker_slots(n, TRIAL_CPU if i == j else 0.0) for i, n in enumerate(nodes))
                 for j in range(len(nodes))), default=0)
    if slots < res.workers_per_trial:
        have = ", ".join(f"node {i}: {n.get('CPU', 0):g} CPU / {n.get('GPU', 0):g} GPU"
                         for i, n in enumerate(nodes))
        raise ConfigError(
            f"a trial asks {res.workers_per_trial} worker(s) x ({res.cpus_per_worker:g} CPU, "
            f"{res.gpus_per_worker:g} GPU) plus {TRIAL_CPU} CPU for its driver, but the cluster can "
            f"place only {slots} such worker(s) ({have}); it would wait PENDING forever. Lower "
            f"resources.workers_per_trial / cpus_per_worker / gpus_per_worker", field="resources")
    hosts = sum(worker_slots(n) >= 1 for n in nodes)
    if res.placement_strategy == "STRICT_SPREAD" and hosts < res.workers_per_trial:
        raise ConfigError(f"placement_strategy STRICT_SPREAD puts each of the {res.workers_per_trial} workers "
                          f"of a trial on its own node, but only {hosts} node(s) can host one; it would "
                          f"wait PENDING forever", field="resources.placement_strategy")
    fit = max(1, slots // res.workers_per_trial)
    total_cpu = sum(n.get("CPU", 0) for n in nodes)
    fit = min(fit, max(1, math.floor(total_cpu / (res.workers_per_trial * res.cpus_per_worker + TRIAL_CPU))))
    if res.max_concurrent_trials != "auto":
        fit = min(fit, res.max_concurrent_trials)
    return fit


def cluster_report(address: str | None, suite_path: str | None = None) -> tuple[str, bool]:
    """Text for ``detbench cluster info``: nodes, resources, and a suite's per-trial request.

    Returns ``(text, fits)``; ``fits`` is False when the suite's trials could never be
    scheduled on this cluster (the same check ``detbench run`` refuses with).
    """
    import ray

    init_ray(address)
    lines = [f"Ray cluster {ray.get_runtime_context().gcs_address}"]
    alive = [n for n in ray.nodes() if n.get("Alive")]
    for n in alive:
        res = n["Resources"]
        custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                  and not k.startswith("node:") and k != "accelerator_type"}
        lines.append(f"  node {n['NodeID'][:12]} {n.get('NodeManagerAddress', '')}"
                     f"{' (head)' if n.get('Resources', {}).get('node:__internal_head__') else ''}: "
                     f"{res.get('CPU', 0):g} CPU, {res.get('GPU', 0):g} GPU, "
                     f"{res.get('memory', 0) / 2**30:.1f} GiB memory"
                     + (f", {', '.join(f'{k}={v:g}' for k, v in sorted(custom.items()))}" if custom else ""))
    totals = {k: sum(n["Resources"].get(k, 0) for n in alive) for k in ("CPU", "GPU")}
    lines.append(f"  total: {len(alive)} node(s), {totals['CPU']:g} CPU, {totals['GPU']:g} GPU")
    if not suite_path:
        return "\n".join(lines), True
    from harness.plan import load_suite
    res = load_suite(suite_path, check_paths=False).resources
    lines.append(f"suite {suite_path}: per trial {res.workers_per_trial} worker(s) x ({res.cpus_per_worker:g} CPU, "
                 f"{res.gpus_per_worker:g} GPU), {res.placement_strategy}, plus {TRIAL_CPU} CPU for the "
                 f"trial driver")
    try:
        n = check_fits(res, [node["Resources"] for node in alive])
    except ConfigError as err:
        lines.append(f"  cannot be scheduled: {err}")
        return "\n".join(lines), False
    lines.append(f"  fits: up to {n} trial(s) at once")
    return "\n".join(lines), True


def _tune_run_config(name: str, run: RunInfo, callbacks):
    """A trial whose driver actor is lost with its node is restarted (its Train run then
    resumes from the last checkpoint) as often as Train may restart a worker group.
    Tune's state goes to ``tune/`` of the run's storage (a folder or the bucket prefix)."""
    from ray import tune
    fs, path = run.storage().arrow("tune")
    return tune.RunConfig(name=name, storage_path=path, storage_filesystem=fs, verbose=0,
                          callbacks=list(callbacks),
                          failure_config=tune.FailureConfig(max_failures=run.resources.max_failures))


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def run_sweep(cells: list[Cell], run: RunInfo, *, concurrency: int, callbacks=(), resume: bool = False,
              retry: list[Cell] = (), loggers: Sequence[str] = ("tensorboard",)) -> list:
    """Run every cell as a Tune trial; returns the ResultGrids.

    ``resume``: each experiment already started in the run directory is restored
    (``Tuner.restore(..., resume_errored=True)``) instead of started anew. ``retry``:
    cells to run again in an experiment of their own (``retry<k>``). ``loggers``: the suite's
    live monitors (:mod:`harness.sweep.loggers`), fresh callbacks for each experiment, after ``callbacks``.
    """
    import ray
    from ray import tune

    from harness.sweep.loggers import check_loggers, logger_callbacks
    from harness.sweep.reaper import start_reaper
    from harness.sweep.trial import run_trial

    check_loggers(loggers, run_dir=run.run_dir)
    if ray.is_initialized():  # init_ray ran (always, from the runner): trials' placement groups are watched
        start_reaper()
    trainable = tune.with_resources(run_trial, {"CPU": TRIAL_CPU})
    fs, storage = run.storage().arrow("tune")

    def monitored() -> list:
        return [*callbacks, *logger_callbacks(loggers, run_dir=run.run_dir, suite_name=run.suite, run_id=run.run_id)]

    def fit(name: str, make_tuner, param_space: dict, cbs: list):
        path = f"{storage}/{name}"
        if resume and tune.Tuner.can_restore(path, storage_filesystem=fs):
            tuner = tune.Tuner.restore(path, trainable, resume_errored=True, param_space=param_space,
                                       storage_filesystem=fs)
            internal = getattr(tuner, "_local_tuner", None)  # this driver's progress, not the pickled one
            if internal is not None:
                internal.get_run_config().callbacks = cbs
        else:
            tuner = make_tuner()
        return tuner.fit()

    def grid_tuner(name: str, group: list[Cell]):
        space = {"cell": tune.grid_search([c.to_dict() for c in group]), "run": run.to_dict()}
        cbs = monitored()
        return fit(name, lambda: tune.Tuner(
            trainable, param_space=space,
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrency, trial_dirname_creator=_trial_dirname),
            run_config=_tune_run_config(name, run, cbs)),
            space, cbs)

    grids = []
    plain = [c for c in cells if not c.search]
    if plain:
        grids.append(grid_tuner("cells", plain))
    for i, cell in enumerate(c for c in cells if c.search):
        cbs = monitored()
        tuner, space, cbs = _search_tuner(trainable, cell, run, i, concurrency, cbs)
        grids.append(fit(f"search{i}", lambda: tuner, space, cbs))  # a restored search publishes its journal too
    if retry:
        k = sum(1 for d in run.storage().list_dirs("tune") if d.startswith("retry"))
        grids.append(grid_tuner(f"retry{k}", list(retry)))
    return grids


def _search_tuner(trainable, cell: Cell, run: RunInfo, i: int, concurrency: int, callbacks):
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler
    from ray.tune.search.optuna import OptunaSearch

    s = cell.search
    journal_rel = f"optuna/search{i}.journal"
    journal = run.storage().working_copy(journal_rel)  # Optuna appends under a file lock: a local file
    storage_backend = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(journal)))
    callbacks = [*callbacks, _publish_journal(run.storage(), journal_rel, journal)]
    searcher = OptunaSearch(metric=s.metric, mode=s.mode, seed=cell.seed,
                            storage=storage_backend, study_name=cell.cell_id)
    # max_t one past the last epoch: a trial that reaches its end finishes by itself (and
    # writes its rows) instead of being stopped by ASHA at the last report.
    scheduler = (ASHAScheduler(time_attr="epoch", max_t=cell.schedule.epochs + 1,
                               grace_period=s.grace_period, reduction_factor=s.reduction_factor)
                 if s.scheduler == "asha" else FIFOScheduler())
    space = {**trial_config(cell, run), "hp": tune_space(s.space)}
    return tune.Tuner(
        trainable,
        param_space=space,
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=s.metric,
                                    mode=s.mode, num_samples=s.num_samples,
                                    max_concurrent_trials=concurrency,
                                    trial_dirname_creator=_trial_dirname),
        run_config=_tune_run_config(f"search{i}", run, callbacks)), space, callbacks


def _publish_journal(storage, rel: str, journal: Path):
    """A Tune callback publishing Optuna's journal to the run's storage after every finished
    trial and at the end (on POSIX it is written in place and this does nothing)."""
    from ray.tune import Callback

    class PublishJournal(Callback):
        def on_trial_complete(self, iteration, trials, trial, **info):
            storage.publish_copy(rel, journal)

        def on_experiment_end(self, trials, **info):
            storage.publish_copy(rel, journal)
    return PublishJournal()


def record_unfinished(grids, run: RunInfo, store: ResultStore) -> None:
    """Trials that never wrote rows (ASHA stopped them, or the trial actor died) get one row each.

    A trial the scheduler stopped never made its end-of-trial report (which carries
    ``status``). If its Train run died under the stop before the trial actor did, the
    trial may have written "failed" rows: the scheduler's decision wins, they become
    one "stopped" row.
    """
    written = store.trial_ids()
    for grid in grids:
        for result in grid:
            cfg = result.config or {}
            metrics = result.metrics or {}
            trial_id = metrics.get("trial_id", "")  # Tune adds it to every result
            if not trial_id or not cfg or store.retired(trial_id):
                continue
            stopped = result.error is None and "status" not in metrics
            if trial_id in written:
                if not (stopped and (store.read_trial(trial_id)["status"] == "failed").any()):
                    continue
            if result.error is None:
                reason = f"stopped early by the scheduler at epoch {metrics.get('epoch', 0)}"
                status = "stopped"
            else:
                reason, status = f"trial errored: {str(result.error).splitlines()[0][:300]}", "failed"
            cell = trial_cell(cfg)
            curve = [] if result.metrics_dataframe is None else [
                {k: v for k, v in rec.items() if k == "epoch" or k == "lr" or k.startswith(("train/", "val/", "time/"))}
                for rec in result.metrics_dataframe.to_dict("records") if "train/loss" in rec]
            outputs = {cell.stages[-1]: StageOutput.failed(reason, history=curve)}
            rows = rows_for_trial(run, cell, trial_id, outputs, wall_s=math.nan)
            store.write_trial(trial_id, [r.model_copy(update={"status": status}) for r in rows])
