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
import os
import tempfile
import time
import traceback
from pathlib import Path

import torch

from harness.config import DetectorSpec, ScheduleSpec
from harness.artifacts import ArtifactStore, artifact_key
from harness.fileio import atomic_write_json
from harness.engine import NonFiniteLoss, StageJob, StageState, run_stage
from harness.registry import METHODS

TRIAL_CPU = 0.01  # the trial driver itself: enough to be scheduled, small enough for workers to fit


def _job(cfg: dict) -> StageJob:
    method = METHODS.get(cfg["method"])(cfg["method_config"])
    stage = cfg["stage"]
    return StageJob(method=method, stage=stage, dataset=cfg["dataset"],
                    detector=method.stage_detector(stage, DetectorSpec(**cfg["detector"])), arch=cfg["arch"],
                    schedule=method.stage_schedule(stage, ScheduleSpec(**cfg["schedule"])), seed=cfg["seed"],
                    artifacts={k: Path(v) for k, v in cfg["artifacts"].items()},
                    conditions=cfg.get("conditions", []), checkpoint=cfg.get("checkpoint"),
                    checkpoint_classes=cfg.get("checkpoint_classes"))


def stage_artifact_key(cell: dict, stage: str) -> str:
    """Key of an earlier stage's output: everything that determines it, nothing else."""
    job = _job({**cell, "stage": stage, "artifacts": {}})
    data = {k: v for k, v in cell["dataset"].items() if k != "name"}
    return artifact_key({"method": cell["method"], "stage": stage, "config": job.method.stage_key(stage),
                         "dataset": data, "detector": job.detector.model_dump(), "arch": cell["arch"],
                         "schedule": job.schedule.model_dump(), "seed": cell["seed"],
                         "earlier": cell["stages"][:cell["stages"].index(stage)]})


class StageFailed(Exception):
    def __init__(self, output: dict):
        super().__init__(output.get("reason", "stage failed"))
        self.output = output


def train_worker(cfg: dict) -> dict:
    """Ray Train worker loop for one stage; rank 0's return value goes back to the trial."""
    import ray.train
    import ray.train.torch
    from ray.train import CheckpointUploadMode

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg["threads"])))
    job = _job(cfg)

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
                             find_unused_parameters=getattr(job.method, "find_unused_parameters", False))
    try:
        state, _ = run_stage(job, device=device, world_size=world, rank=rank, state=state,
                             model_state=model_state, on_epoch=on_epoch, wrap=wrap)
    except NonFiniteLoss as exc:
        return {"status": "failed", "reason": str(exc), "history": (state or StageState()).history,
                "resumes": resumes, "node_id": _worker_nodes(world)}
    return {"status": "ok", "history": state.history, "final": {**state.last_eval, **state.cost}, "resumes": resumes,
            "conditions": state.conditions, "node_id": _worker_nodes(world)}


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


def apply_search(cell: dict, sampled: dict) -> dict:
    """A copy of ``cell`` with Tune-sampled values: ``schedule.<f>`` or a method config field."""
    cell = json.loads(json.dumps(cell))
    for key, value in sampled.items():
        group, _, name = key.rpartition(".")
        target = cell["schedule"] if group == "schedule" else cell["method_config"]
        target[name] = value.item() if hasattr(value, "item") else value
    return cell


def sampled_params(config: dict) -> dict:
    """The values Tune sampled for this trial, keyed like the suite's search space."""
    return {k.replace("|", "."): v for k, v in config.get("hp", {}).items()}


def _stop_requested() -> bool:
    """Whether Tune asked this trial to stop (its session's stop event; Ray-internal, guarded)."""
    try:
        from ray.train._internal.session import get_session
        session = get_session()
        return bool(session is not None and session.stop_event.is_set())
    except Exception:
        return False


def finished_rows(store, trial_id: str, cell_id: str, cfg_hash: str):
    """Rows of a successful earlier run of this trial (or of the same cell and config), or None."""
    df = store.read()
    if df.empty:
        return None
    mine = df[(df["trial_id"] == trial_id) | ((df["cell"] == cell_id) & (df["config_hash"] == cfg_hash))]
    ok = mine[mine["epoch"].isna() & (mine["status"] == "ok")]
    if ok.empty:
        return None
    return mine[mine["trial_id"] == ok["trial_id"].iloc[-1]]


def _summary_of_rows(df, cell: dict) -> dict:
    """What a finished trial reported to Tune, rebuilt from its rows."""
    stage = cell["stages"][-1]
    mine = df[df["stage"] == stage]
    final = mine[mine["epoch"].isna() & (mine["condition"] == "clean")]
    report = {m: float(v) for m, v in zip(final["metric"], final["value"])}
    report.update(epoch=int(mine["epoch"].max()) if mine["epoch"].notna().any() else 0, status="ok",
                  resumed_from_rows=True)
    if cell.get("search"):
        report.setdefault(cell["search"]["metric"], float("nan"))
    return report


def run_trial(config: dict) -> None:
    """Tune function trainable: train every stage of one cell, then write its rows atomically."""
    import ray.tune
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from harness.plan import rows_for_trial

    run = config["run"]
    cell = apply_search(config["cell"], sampled_params(config))
    trial_id = ray.tune.get_context().get_trial_id()
    res = run["resources"]
    use_gpu = res["gpus_per_worker"] > 0
    per_worker = {"CPU": res["cpus_per_worker"], **({"GPU": res["gpus_per_worker"]} if use_gpu else {})}
    stages = cell["stages"]
    outputs, artifacts, t0 = {}, {}, time.time()
    store = ArtifactStore(run.get("artifacts_dir") or os.path.join(run["run_dir"], "artifacts"))

    def fit_stage(stage: str, last: bool):
        trainer = TorchTrainer(
            train_worker,
            train_loop_config={**cell, "stage": stage, "artifacts": artifacts,
                               "threads": res["cpus_per_worker"]},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
            scaling_config=ScalingConfig(num_workers=res["workers_per_trial"], use_gpu=use_gpu,
                                         resources_per_worker=per_worker,
                                         placement_strategy=res.get("placement_strategy", "PACK")),
            run_config=RunConfig(
                name=f"{trial_id}-{stage}", storage_path=os.path.join(run["run_dir"], "train"),
                failure_config=FailureConfig(max_failures=res["max_failures"]),
                checkpoint_config=CheckpointConfig(num_to_keep=1),
                callbacks=[TuneReportCallback()] if last else []))
        result = trainer.fit()
        out = result.return_value or {"status": "failed", "reason": f"stage {stage}: no result"}
        if out["status"] != "ok":
            raise StageFailed(out)
        return out, {"detector.pt": Path(result.checkpoint.path) / "detector.pt"}

    from harness.plan import config_hash
    from harness.results import ResultStore
    results = ResultStore(run["run_dir"])
    done = finished_rows(results, trial_id, cell["cell_id"], config_hash(cell))
    if done is not None:  # a resumed sweep whose Tune state predates these rows: nothing to redo
        ray.tune.report(_summary_of_rows(done, cell))
        return
    atomic_write_json({"cell": cell["cell_id"], "trial_id": trial_id, "started": time.time(), "node": _node_id()},
                      Path(run["run_dir"]) / "trials" / f"{trial_id}.json")
    try:
        for i, stage in enumerate(stages):
            if i == len(stages) - 1:
                outputs[stage] = fit_stage(stage, last=True)[0]
                break
            # Earlier stages are shared artifacts: produced once, reused by every trial.
            def make(stage=stage):
                out, files = fit_stage(stage, last=False)
                return files, {"output": out, "method": cell["method"], "stage": stage,
                               "dataset": cell["dataset"]["name"], "seed": cell["seed"]}
            key = stage_artifact_key(cell, stage)
            folder, reused = store.produce(key, make)
            outputs[stage] = {**store.meta(key)["output"], "reused": reused, "artifact": key}
            artifacts[stage] = str(folder / "detector.pt")
    except StageFailed as exc:
        outputs[stage] = exc.output
    except Exception as exc:  # plugin bug, worker lost beyond max_failures, ...
        if _stop_requested():  # Tune (ASHA) is stopping this trial and its Train run died with it:
            return             # the driver records it as stopped (harness.runner.record_unfinished)
        outputs[stage] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}".strip()[:500],
                          "traceback": traceback.format_exc()}
    rows = rows_for_trial(run, cell, trial_id, outputs, wall_s=time.time() - t0)
    results.write_trial(trial_id, rows)
    final = outputs[stages[-1]] if stages[-1] in outputs else next(iter(outputs.values()))
    tb = next((o.get("traceback") for o in outputs.values() if o.get("traceback")), None)
    if tb:
        failures = Path(run["run_dir"]) / "failures"
        failures.mkdir(exist_ok=True)
        (failures / f"{trial_id}.txt").write_text(tb)
    history = final.get("history") or [{}]
    report = {**history[-1], **final.get("final", {}), "epoch": len(final.get("history", [])),
              "status": final["status"]}
    if cell.get("search"):  # Tune checks every result carries the searched metric
        report.setdefault(cell["search"]["metric"], float("nan"))
    ray.tune.report(report)
