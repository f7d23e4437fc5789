"""Ray: the Tune trial function, and what it hands each trial's Ray Train run.

Ray 2.60 runs Ray Train V2, where ``Tuner(TorchTrainer(...))`` no longer
works. The supported pattern is used instead: each Tune trial is a *function
trainable* (:func:`run_trial`, reserving only a sliver of CPU) that builds and
fits one ``TorchTrainer`` for all the stages it has to train. The trainer's
workers run :func:`harness.sweep.worker.train_worker` (DDP over gloo on CPU, nccl on
GPU), report once per epoch with a checkpoint, and a ``TuneReportCallback``
forwards rank 0's metrics of the last stage to Tune, so ASHA sees an explicit
``epoch`` and the validation AP. The Train run is named after the trial id, so
a restored trial finds its own checkpoints.

Earlier stages (teacher, ideal model, pretraining) are shared: a trial whose
earlier stage is already in the artifact store reuses it and trains only the
rest; otherwise it claims the artifact first (a second trial waits for it
without holding workers) and its worker group publishes it mid-run.
"""
from __future__ import annotations

import json
import time
import traceback
from dataclasses import replace

from harness.plan import Cell, RunInfo, StageOutput, stage_artifact_key
from harness.results import ResultStore, config_hash, report_of_rows, rows_for_trial
from harness.storage import ArtifactStore, ProducerClaims
from harness.sweep.job import WorkerJob, node_id
from harness.sweep.space import trial_cell
from harness.core import COST_TRAIN_RUN_S


def _stop_requested() -> bool:
    """Whether Tune asked this trial to stop (its session's stop event; Ray-internal, guarded)."""
    try:
        from ray.train._internal.session import get_session
        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:
        return False


def last_stage_reports(stage: str):
    """``TuneReportCallback`` for only ``stage``'s reports: Tune (and ASHA) see the trial's last
    stage -- its epochs, its AP -- not a teacher's or a pretraining's that the same Train run ran first."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class LastStageReports(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if metrics and metrics[0].get("stage") == stage:
                super().after_report(run_context, metrics, checkpoint)

    return LastStageReports()


def fit_stages(cell: Cell, run: RunInfo, trial_id: str, stages: list[str], *, artifacts: dict[str, str],
               produce: dict[str, str]) -> dict[str, StageOutput]:
    """``stages`` of a trial in one Ray Train run named after the trial id (:mod:`harness.sweep.worker`).

    ``artifacts``: earlier stages reused (stage -> artifact key); ``produce``: earlier stages this
    run trains and publishes. Returns each stage's output up to the first that failed.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig

    from harness.sweep.reaper import find_reaper, train_trainer_class
    from harness.sweep.worker import train_worker

    res = run.resources
    use_gpu = res.gpus_per_worker > 0
    train_fs, train_path = run.storage().arrow("train")  # a local folder or the run's bucket prefix
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer_class, watched = train_trainer_class(find_reaper())
    trainer = trainer_class(
        train_worker,
        train_loop_config=WorkerJob(cell=cell, stages=tuple(stages), artifacts=artifacts, produce=produce, run=run,
                                    trial_id=trial_id, threads=int(res.cpus_per_worker)).to_dict(),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=res.placement_strategy),
        run_config=RunConfig(
            name=trial_id, storage_path=train_path, storage_filesystem=train_fs,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[last_stage_reports(cell.stages[-1]), *watched]))
    started = time.time()
    outputs = trainer.fit().return_value or {stages[0]: StageOutput.failed("the Train run returned no result")}
    last = outputs[next(reversed(outputs))]
    last.final[COST_TRAIN_RUN_S] = time.time() - started  # the whole Train run: start-up, stages, teardown
    return outputs


def run_stages(cell: Cell, run: RunInfo, trial_id: str) -> dict[str, StageOutput] | None:
    """Every stage of a cell, in order: earlier stages from the shared artifact store when there,
    the rest in one worker group that publishes the earlier ones it trains.

    Returns each stage's output up to the first that failed, or None when Tune is
    stopping the trial (its Train run died with it: the driver records it as stopped).
    """
    store = ArtifactStore(run.artifact_storage())
    reused: dict[str, str] = {}
    with ProducerClaims(store) as claims:
        todo = list(cell.stages)
        for stage in cell.stages[:-1]:
            key = stage_artifact_key(cell, stage)
            if claims.acquire(key):  # missing (after waiting while another trial made it): produce it
                break
            reused[stage] = key
            todo.remove(stage)
        outputs = {s: replace(StageOutput.from_dict(store.meta(k)["output"]), reused=True, artifact=k)
                   for s, k in reused.items()}
        produce = {s: stage_artifact_key(cell, s) for s in todo[:-1]}
        claims.start_watching()
        try:
            ran = fit_stages(cell, run, trial_id, todo, artifacts=reused, produce=produce)
        except Exception as exc:  # plugin bug, worker group lost beyond max_failures, ...
            if _stop_requested():
                return None
            failed = StageOutput.failed(f"{type(exc).__name__}: {exc}".strip()[:500],
                                        traceback=traceback.format_exc())
            ran = _published(store, produce)  # the earlier stages it finished before it was lost
            ran[next(s for s in todo if s not in ran)] = failed
    for stage, out in ran.items():
        outputs[stage] = replace(out, artifact=produce[stage]) if stage in produce and out.ok else out
    return outputs


def _published(store: ArtifactStore, produce: dict[str, str]) -> dict[str, StageOutput]:
    """The outputs of the produced stages whose artifacts were committed, in order, up to the first missing."""
    done = {}
    for stage, key in produce.items():
        if store.get(key) is None:
            break
        done[stage] = StageOutput.from_dict(store.meta(key)["output"])
    return done


def finish_trial(cell: Cell, run: RunInfo, trial_id: str, outputs: dict[str, StageOutput],
                 wall_s: float) -> dict:
    """Write the trial's rows at once (and a failure's traceback); return its last report to Tune."""
    storage = run.storage()
    ResultStore(storage).write_trial(trial_id, rows_for_trial(run, cell, trial_id, outputs, wall_s=wall_s))
    tb = next((o.traceback for o in outputs.values() if o.traceback), "")
    if tb:
        storage.write_text(f"failures/{trial_id}.txt", tb)
    final = outputs.get(cell.stages[-1]) or next(iter(outputs.values()))
    report = {**(final.history[-1] if final.history else {}), **final.final, "epoch": len(final.history),
              "status": final.status}
    if cell.search:  # Tune checks every result carries the searched metric
        report.setdefault(cell.search.metric, float("nan"))
    return report


def run_trial(config: dict) -> None:
    """Tune function trainable: train every stage of one cell, then write its rows atomically.

    A trial whose rows are already committed (a resumed sweep whose Tune state predates
    them, or the same cell and config done by another trial) reports them and ends.
    """
    import ray.tune

    run, cell = RunInfo.from_dict(config["run"]), trial_cell(config)
    trial_id = ray.tune.get_context().get_trial_id()
    storage = run.storage()
    done = ResultStore(storage).finished(trial_id, cell.cell_id, config_hash(cell))
    if done is not None:
        ray.tune.report(report_of_rows(done, cell))
        return
    marker = {"cell": cell.cell_id, "trial_id": trial_id, "started": time.time(), "node": node_id()}
    storage.create(f"trials/{trial_id}.json", json.dumps(marker).encode())  # the first start is kept
    t0 = time.time()
    outputs = run_stages(cell, run, trial_id)
    if outputs is not None:
        ray.tune.report(finish_trial(cell, run, trial_id, outputs, wall_s=time.time() - t0))
