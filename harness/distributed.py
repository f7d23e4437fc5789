"""Ray: the Tune trial function and the Ray Train worker function.

Ray 2.60 runs Ray Train V2, where ``Tuner(TorchTrainer(...))`` no longer
works. The supported pattern is used instead: each Tune trial is a *function
trainable* (:func:`run_trial`, reserving only a sliver of CPU) that builds and
fits one ``TorchTrainer`` per method stage. The trainer's workers run
:func:`train_worker` (DDP over gloo on CPU, nccl on GPU), report once per
epoch with a checkpoint, and ``TuneReportCallback`` forwards rank 0's
metrics to Tune, so ASHA sees an explicit ``epoch`` and the validation AP.
Each Train run is named after the trial id and stage, so a restored trial
finds its own checkpoints.
"""
from __future__ import annotations

import json
import tempfile
import time
import traceback
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator

import torch

from harness.artifacts import ArtifactStore, artifact_key
from harness.engine import NonFiniteLoss, StageJob, StageState, run_stage
from harness.evaluate.detections import detections_prefix
from harness.records import Cell, RunInfo, StageOutput
from harness.results import ResultStore, config_hash, report_of_rows, rows_for_trial

TRIAL_CPU = 0.01  # the trial driver itself: enough to be scheduled, small enough for workers to fit


def stage_job(cell: Cell, stage: str, artifacts: dict[str, str] | None = None, *,
              detections=None) -> StageJob:
    """What a worker needs to run ``stage`` of ``cell``: the stage's detector and schedule resolved.

    ``detections``: the Storage where the final evaluations' detections go (None: not kept).
    """
    method = cell.plugin
    return StageJob(method=method, stage=stage, dataset=cell.dataset, detections=detections,
                    detector=method.stage_detector(stage, cell.detector), arch=cell.arch,
                    schedule=method.stage_schedule(stage, cell.schedule), seed=cell.seed,
                    artifacts={k: Path(v) for k, v in (artifacts or {}).items()},
                    conditions=list(cell.conditions), checkpoint=cell.checkpoint,
                    checkpoint_classes=list(cell.checkpoint_classes) if cell.checkpoint_classes else None)


def stage_artifact_key(cell: Cell, stage: str) -> str:
    """Key of an earlier stage's output: everything that determines it, nothing else."""
    job = stage_job(cell, stage)
    data = {k: v for k, v in cell.dataset.to_dict().items() if k != "name"}
    return artifact_key({"method": cell.method, "stage": stage, "config": job.method.stage_key(stage),
                         "dataset": data, "detector": job.detector.model_dump(), "arch": cell.arch,
                         "schedule": job.schedule.model_dump(), "seed": cell.seed,
                         "earlier": list(cell.stages[:cell.stages.index(stage)])})


class StageFailed(Exception):
    def __init__(self, output: StageOutput):
        super().__init__(output.reason or "stage failed")
        self.output = output


def train_worker(cfg: dict) -> StageOutput:
    """Ray Train worker loop for one stage; rank 0's return value goes back to the trial.

    ``cfg`` (Train's ``train_loop_config``, plain JSON): ``cell`` (:meth:`Cell.to_dict`),
    ``stage``, ``artifacts`` (earlier stage -> weights file), ``threads``, ``fit_started``
    (when the trial asked for this worker group: the start-up cost is recorded as a metric)
    and ``detections`` (``run`` + ``rel``: where the final evaluations' detections are kept).
    """
    entered = time.time()
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    keep = cfg.get("detections")
    job = stage_job(Cell.from_dict(cfg["cell"]), cfg["stage"], cfg["artifacts"],
                    detections=RunInfo.from_dict(keep["run"]).storage(keep["rel"]) if keep else None)

    state, model_state, resumes = None, None, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:  # a restarted worker group (or resumed trial) continues from its last epoch
        with checkpoint.as_directory() as d:
            meta = json.loads((Path(d) / "state.json").read_text())
            state = StageState(**meta["state"])
            resumes = meta["resumes"] + 1
            model_state = torch.load(Path(d) / "train_state.pt", map_location=device, weights_only=True)

    def on_epoch(st: StageState, model, resumable) -> None:
        record = st.history[-1] if st.history else {}  # an evaluation-only stage has no epochs
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics.update(stage=job.stage, epoch=st.epoch, resumes=resumes,
                       **{k: v for k, v in st.last_eval.items()})  # AP, AP50, ... for Tune/ASHA
        ckpt = None
        if rank == 0:
            # Uploaded in the background while the next epoch trains; the detector weights
            # (the stage's output) only after the last epoch.
            tmp = Path(tempfile.mkdtemp(prefix="detbench-ckpt-"))
            torch.save(resumable(), tmp / "train_state.pt")
            if st.epoch == job.schedule.epochs and not job.checkpoint:
                torch.save(job.method.detector_of(model).state_dict(), tmp / "detector.pt")
            (tmp / "state.json").write_text(json.dumps({"state": st.__dict__, "resumes": resumes},
                                                       default=float))
            ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)

    wrap = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrap = lambda m: DDP(m, device_ids=[device] if device.type == "cuda" else None,  # noqa: E731
                             find_unused_parameters=job.method.find_unused_parameters)
    try:
        state, _ = run_stage(job, device=device, world_size=world, rank=rank, state=state,
                             model_state=model_state, on_epoch=on_epoch, wrap=wrap)
    except NonFiniteLoss as exc:
        return StageOutput.failed(str(exc), history=(state or StageState()).history, resumes=resumes,
                                  node_id=_worker_nodes(world))
    worker_s = time.time() - entered
    timing = {"cost/worker_start_s": entered - cfg.get("fit_started", entered), "cost/worker_s": worker_s,
              "cost/device_s": _summed(worker_s, world)}  # device-seconds: every worker's time, summed
    return StageOutput("ok", history=state.history, final={**state.last_eval, **state.cost, **timing}, resumes=resumes,
                       conditions=state.conditions, node_id=_worker_nodes(world))


def _node_id() -> str:
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""


def _worker_nodes(world: int) -> str:
    """Ray node ids of all the stage's workers, distinct, comma-separated (rank 0's first)."""
    nodes = [_node_id()]
    if world > 1:
        import torch.distributed as dist
        gathered: list = [None] * world
        dist.all_gather_object(gathered, nodes[0])
        nodes = gathered
    return ",".join(dict.fromkeys(nodes))


def _summed(value: float, world: int) -> float:
    """``value`` summed over the stage's workers (one collective, after the last epoch)."""
    if world == 1:
        return value
    import torch.distributed as dist
    gathered: list = [None] * world
    dist.all_gather_object(gathered, value)
    return float(sum(gathered))


def _stop_requested() -> bool:
    """Whether Tune asked this trial to stop (its session's stop event; Ray-internal, guarded)."""
    try:
        from ray.train._internal.session import get_session
        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:
        return False


def fit_stage(cell: Cell, stage: str, run: RunInfo, trial_id: str, artifacts: dict[str, str], *,
              last: bool) -> tuple[StageOutput, object]:
    """One stage of a trial as one Ray Train run (named ``<trial id>-<stage>``); its output and checkpoint.

    Only the last stage reports to Tune (``TuneReportCallback``: rank 0's metrics, with
    an explicit ``epoch`` for ASHA). Raises :class:`StageFailed` when it did not succeed.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    res = run.resources
    use_gpu = res.gpus_per_worker > 0
    train_fs, train_path = run.storage().arrow("train")  # a local folder or the run's bucket prefix
    per_worker = {"CPU": res.cpus_per_worker, **({"GPU": res.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        train_worker,
        train_loop_config={"cell": cell.to_dict(), "stage": stage, "artifacts": artifacts,
                           "threads": res.cpus_per_worker, "fit_started": time.time(),
                           "detections": {"run": run.to_dict(), "rel": detections_prefix(trial_id, stage)}},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=res.workers_per_trial, use_gpu=use_gpu,
                                     resources_per_worker=per_worker, placement_strategy=res.placement_strategy),
        run_config=RunConfig(
            name=f"{trial_id}-{stage}", storage_path=train_path, storage_filesystem=train_fs,
            failure_config=FailureConfig(max_failures=res.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
            callbacks=[TuneReportCallback()] if last else []))
    started = time.time()
    result = trainer.fit()
    out = result.return_value or StageOutput.failed(f"stage {stage}: no result")
    if not out.ok:
        raise StageFailed(out)
    out.final["cost/stage_s"] = time.time() - started  # the whole Train run: start-up, training, teardown
    return out, result.checkpoint


@contextmanager
def local_checkpoint(checkpoint) -> Iterator[Path]:
    """A Train checkpoint as a local folder: in place on a local file system, else downloaded."""
    import pyarrow.fs
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    with tempfile.TemporaryDirectory(prefix="detbench-ckpt-") as d:
        yield Path(checkpoint.to_directory(d))


def run_stages(cell: Cell, run: RunInfo, trial_id: str) -> dict[str, StageOutput] | None:
    """Every stage of a cell, in order; earlier stages come from (or go to) the shared artifact store.

    Returns each stage's output up to the first that failed, or None when Tune is
    stopping the trial (its Train run died with it: the driver records it as stopped).
    """
    store = ArtifactStore(run.artifact_storage())
    outputs: dict[str, StageOutput] = {}
    artifacts: dict[str, str] = {}
    for i, stage in enumerate(cell.stages):
        try:
            if i == len(cell.stages) - 1:
                outputs[stage] = fit_stage(cell, stage, run, trial_id, artifacts, last=True)[0]
                break

            def make(stage=stage):  # earlier stages: produced once, reused by every trial
                out, checkpoint = fit_stage(cell, stage, run, trial_id, artifacts, last=False)
                folder = exits.enter_context(local_checkpoint(checkpoint))
                return {"detector.pt": folder / "detector.pt"}, {
                    "output": out.to_dict(), "method": cell.method, "stage": stage,
                    "dataset": cell.dataset.name, "seed": cell.seed}
            key = stage_artifact_key(cell, stage)
            with ExitStack() as exits:
                folder, reused = store.produce(key, make)
            out = StageOutput.from_dict(store.meta(key)["output"])
            outputs[stage] = replace(out, reused=reused, artifact=key)
            artifacts[stage] = str(folder / "detector.pt")
        except StageFailed as exc:
            outputs[stage] = exc.output
            break
        except Exception as exc:  # plugin bug, worker lost beyond max_failures, ...
            if _stop_requested():
                return None
            outputs[stage] = StageOutput.failed(f"{type(exc).__name__}: {exc}".strip()[:500],
                                                traceback=traceback.format_exc())
            break
    return outputs


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

    from harness.sweep import trial_cell

    run, cell = RunInfo.from_dict(config["run"]), trial_cell(config)
    trial_id = ray.tune.get_context().get_trial_id()
    storage = run.storage()
    done = ResultStore(storage).finished(trial_id, cell.cell_id, config_hash(cell))
    if done is not None:
        ray.tune.report(report_of_rows(done, cell))
        return
    marker = {"cell": cell.cell_id, "trial_id": trial_id, "started": time.time(), "node": _node_id()}
    storage.create(f"trials/{trial_id}.json", json.dumps(marker).encode())  # the first start is kept
    t0 = time.time()
    outputs = run_stages(cell, run, trial_id)
    if outputs is not None:
        ray.tune.report(finish_trial(cell, run, trial_id, outputs, wall_s=time.time() - t0))
