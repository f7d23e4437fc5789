"""The Ray Train worker function: every stage of a trial that its worker group runs, in one Train run.

Why one Train run for all of a trial's stages: starting a worker group (Train's controller
and placement-group cleaner, the worker processes, their torch import, the process group)
costs about 7 s on 2 CPU cores, and at scale also NCCL's set-up and each GPU's context;
a two-stage method (teacher -> student, pretrain -> finetune) paid it twice. The group now
trains the stages one after another; an earlier stage's detector is published to the
shared artifact store by rank 0 as soon as that stage ends (the trial holds the claim:
:class:`harness.storage.artifacts.ProducerClaims`), and every rank reads it back from there, so a
worker on another node of an object-store run reads it through its own node's cache.

What the group trains is a :class:`harness.sweep.job.WorkerJob` (Train's ``train_loop_config``
is its plain-JSON form).

Resuming: every epoch's checkpoint records the stage, its :class:`StageState` and the outputs
of the stages this run finished before it; a restarted group (or a resumed trial, whose Train
run has the same name) skips those and continues the stage from its epoch. A checkpoint of a
stage the trial no longer runs (its artifact was committed meanwhile) is not resumed from.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from harness.engine import NonFiniteLoss, StageState, run_stage
from harness.evaluate import detections_prefix
from harness.plan import Cell, StageOutput, stage_job
from harness.storage import ArtifactStore
from harness.sweep.job import WorkerJob, node_id
from harness.core import COST_DEVICE_S, COST_WORKER_S, COST_WORKER_START_S


@dataclass
class Restored:
    """What the latest checkpoint of this Train run says (nothing on a first start)."""
    stage: str | None = None
    state: StageState | None = None
    model_state: dict | None = None
    resumes: int = 0
    done: dict[str, StageOutput] = field(default_factory=dict)


def restored(device: torch.device) -> Restored:
    import ray.train
    checkpoint = ray.train.get_checkpoint()
    if not checkpoint:
        return Restored()
    with checkpoint.as_directory() as d:
        meta = json.loads((Path(d) / "state.json").read_text())
        weights = Path(d) / "train_state.pt"
        model_state = torch.load(weights, map_location=device, weights_only=True) if weights.is_file() else None
    return Restored(stage=meta["stage"], state=StageState(**meta["state"]), model_state=model_state,
                    resumes=meta["resumes"] + 1,
                    done={s: StageOutput.from_dict(o) for s, o in meta.get("done", {}).items()})


def artifact_file(store: ArtifactStore | None, stage: str, key: str) -> str:
    """This node's verified copy of an earlier stage's detector (raises if missing or damaged)."""
    folder = store.get(key) if store is not None else None
    if folder is None:
        raise FileNotFoundError(f"the artifact of stage {stage!r} ({key}) is missing or failed its checksum")
    return str(folder / "detector.pt")


def publish_artifact(store: ArtifactStore, key: str, cell: Cell, stage: str, detector: torch.nn.Module,
                     out: StageOutput, trial_id: str) -> None:
    """Rank 0: the stage's detector into the shared store (never over a committed one); the
    manifest's meta says which trial produced it."""
    if store.get(key) is not None:
        return
    with tempfile.TemporaryDirectory(prefix="detbench-artifact-") as d:
        path = Path(d) / "detector.pt"
        torch.save(detector.state_dict(), path)
        store.put(key, {"detector.pt": path}, {"output": out.to_dict(), "method": cell.method, "stage": stage,
                                               "dataset": cell.dataset.name, "seed": cell.seed,
                                               "trial_id": trial_id})


def train_worker(config: dict) -> dict[str, StageOutput]:
    """Ray Train worker loop over a :class:`WorkerJob` (``config``: its ``to_dict``, Train's
    ``train_loop_config``); rank 0's return value (stage -> output, in order) goes back to the trial."""
    entered = time.time()
    import ray.train
    import ray.train.torch

    tctx = ray.train.get_context()
    rank, world = tctx.get_world_rank(), tctx.get_world_size()
    device = ray.train.torch.get_device()
    job = WorkerJob.from_dict(config)
    torch.set_num_threads(job.threads)
    cell, run = job.cell, job.run
    store = ArtifactStore(run.artifact_storage()) if run else None
    keys, produce = dict(job.artifacts), dict(job.produce)
    back = restored(device)
    outputs = {s: o for s, o in back.done.items() if s in job.stages}
    keys.update({s: produce[s] for s in outputs if s in produce})
    first = True
    for stage in job.stages:
        if stage in outputs:
            continue
        started = time.time()
        stage_run = stage_job(cell, stage, {s: artifact_file(store, s, k) for s, k in keys.items()},
                              detections=run.storage(detections_prefix(job.trial_id, stage)) if run else None,
                              cpus=job.threads)
        resume = back.stage == stage
        out, model = _train(stage_run, device, rank, world, back.state if resume else None,
                            back.model_state if resume else None, back.resumes, outputs,
                            last=stage == cell.stages[-1])
        if out.ok:
            worker_s = time.time() - started
            out.final.update({COST_WORKER_S: worker_s, COST_DEVICE_S: _summed(worker_s, world),
                              **({COST_WORKER_START_S: entered - job.fit_started} if first else {})})
        outputs[stage] = out
        first = False
        if not out.ok:
            break
        if stage in produce:
            if rank == 0:
                publish_artifact(store, produce[stage], cell, stage, stage_run.method.detector_of(model), out,
                                 job.trial_id)
            _barrier(world)
            keys[stage] = produce[stage]
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return outputs


def _train(job, device, rank: int, world: int, state, model_state, resumes: int,
           done: dict[str, StageOutput], *, last: bool) -> tuple[StageOutput, torch.nn.Module | None]:
    """One stage with Ray's per-epoch report and checkpoint; its output and final model."""
    import ray.train
    from ray.train import CheckpointUploadMode

    def on_epoch(st: StageState, model, resumable) -> None:
        record = st.history[-1] if st.history else {}  # an evaluation-only stage has no epochs
        metrics = {k: v for k, v in record.items() if isinstance(v, (int, float))}
        metrics.update(stage=job.stage, epoch=st.epoch, resumes=resumes,
                       **{k: v for k, v in st.last_eval.items()})  # AP, AP50, ... for Tune/ASHA
        ckpt = None
        if rank == 0:
            # Uploaded in the background while the next epoch trains. After the trial's last
            # epoch only its final detector is kept (nothing resumes from there: a restart
            # returns the recorded state); an earlier stage's detector goes to the artifact
            # store instead, from the model (restored from here if the group restarts first).
            tmp = Path(tempfile.mkdtemp(prefix="detbench-ckpt-"))
            if last and st.epoch == job.schedule.epochs:
                if not job.checkpoint:
                    torch.save(job.method.detector_of(model).state_dict(), tmp / "detector.pt")
            else:
                torch.save(resumable(), tmp / "train_state.pt")
            (tmp / "state.json").write_text(json.dumps(
                {"stage": job.stage, "state": st.__dict__, "resumes": resumes,
                 "done": {s: o.to_dict() for s, o in done.items()}}, default=float))
            ckpt = ray.train.Checkpoint.from_directory(str(tmp))
        ray.train.report(metrics, checkpoint=ckpt, checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)

    wrap = None
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        wrap = lambda m: DDP(m, device_ids=[device] if device.type == "cuda" else None,  # noqa: E731
                             find_unused_parameters=job.method.find_unused_parameters)
    try:
        state, model = run_stage(job, device=device, world_size=world, rank=rank, state=state,
                                 model_state=model_state, on_epoch=on_epoch, wrap=wrap)
    except NonFiniteLoss as exc:
        return StageOutput.failed(str(exc), history=(state or StageState()).history, resumes=resumes,
                                  node_id=_worker_nodes(world)), None
    return StageOutput("ok", history=state.history, final={**state.last_eval, **state.cost}, resumes=resumes,
                       conditions=state.conditions, node_id=_worker_nodes(world)), model


def _worker_nodes(world: int) -> str:
    """Ray node ids of all the stage's workers, distinct, comma-separated (rank 0's first)."""
    nodes = [node_id()]
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


def _barrier(world: int) -> None:
    """Every rank waits for rank 0's publishing (the next stage reads the artifact)."""
    if world > 1:
        import torch.distributed as dist
        dist.barrier()
