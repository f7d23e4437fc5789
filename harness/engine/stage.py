"""Training and evaluation of one stage on one worker.

:func:`run_stage` is plain PyTorch (optionally DDP): the Ray Train entry point
in :mod:`harness.sweep.worker` calls it with Ray's reporting and checkpoint
hooks, and the benchmark calls it without Ray, so the harness overhead is
measured on exactly the same loop.
"""
from __future__ import annotations

import logging
import math
import os
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.config import DetectorSpec, ScheduleSpec
from harness.data import (CocoDetection, PreparedCondition, PreparedDataset, eval_loader, image_to_float, load_split,
                          set_loader_epoch, split_index, train_loader)
from harness.evaluate import coco_detections_from_outputs, evaluate_coco
from harness.modeling import detector_cost, inference_cost
from harness.plugin import Method, StageContext
from harness.core import COST_TRAIN_IMAGES_PER_S

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the trial is failed with this reason, not retried."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def use_deterministic_kernels() -> None:
    """``schedule.deterministic``: deterministic kernels where PyTorch has them.

    On CPU, training here is already bitwise repeatable for a seed (same thread count). On
    CUDA, cuDNN's autotuner and atomics-based kernels vary run to run: this turns the autotuner
    off, fixes cuBLAS's workspace (read when its handle is created, so before the first matmul)
    and asks for deterministic algorithms. Ops without one -- notably ``roi_align``'s backward
    (Faster R-CNN's box head, DeFeat, SoCo) and ``index_put`` with accumulate -- only warn
    (``warn_only``): the run still goes, but is not bitwise repeatable on GPU.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True
    torch.use_deterministic_algorithms(True, warn_only=True)


def parameter_groups(model: nn.Module, s: ScheduleSpec) -> list[dict]:
    """Trainable parameters; with ``norm_weight_decay`` set, norm layers' parameters and those a
    module declares with ``no_weight_decay()`` (names relative to it, timm's convention) in a
    group of their own with that weight decay (torchvision references' ``set_weight_decay``)."""
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if s.norm_weight_decay is None:
        return [{"params": [p for _, p in trainable]}]
    norms = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    exempt: set[str] = set()
    for prefix, module in model.named_modules():
        if isinstance(module, norms):
            exempt |= {f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)}
        if hasattr(module, "no_weight_decay"):
            exempt |= {f"{prefix}.{n}" if prefix else n for n in module.no_weight_decay()}
    return [{"params": [p for n, p in trainable if n not in exempt]},
            {"params": [p for n, p in trainable if n in exempt], "weight_decay": s.norm_weight_decay}]


def build_optimizer(model: nn.Module, s: ScheduleSpec) -> torch.optim.Optimizer:
    groups = parameter_groups(model, s)
    if s.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=s.base_lr, weight_decay=s.weight_decay)
    return torch.optim.SGD(groups, lr=s.base_lr, momentum=s.momentum, weight_decay=s.weight_decay)


def lr_factor(it: int, total: int, s: ScheduleSpec) -> float:
    """Linear warm-up, then cosine / step (x0.1 at 2/3 and 8/9 of training) / multistep / constant.

    Warm-up: from ``warmup_factor`` to 1 over ``warmup_iters`` as the torchvision references
    (``LinearLR``), or from ``1 / warmup_iters`` when no factor is given. ``multistep``: times
    ``lr_gamma`` after each epoch of ``lr_steps``; ``total`` is the number of iterations.
    """
    if not s.warmup_iters or it >= s.warmup_iters:
        warm = 1.0
    elif s.warmup_factor is None:
        warm = (it + 1) / s.warmup_iters
    else:
        warm = s.warmup_factor + (1 - s.warmup_factor) * it / s.warmup_iters
    frac = it / max(1, total)
    if s.lr_schedule == "cosine":
        return warm * 0.5 * (1 + math.cos(math.pi * frac))
    if s.lr_schedule == "step":
        return warm * (0.1 ** ((frac >= 2 / 3) + (frac >= 8 / 9)))
    if s.lr_schedule == "multistep":
        epoch = frac * s.epochs  # fractional epochs done
        return warm * s.lr_gamma ** sum(epoch >= e - 1e-9 for e in s.lr_steps)
    return warm


def _all_mean(values: dict[str, float], world_size: int) -> dict[str, float]:
    if world_size == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t)
    return {k: float(v) / world_size for k, v in zip(keys, t)}


class RepeatedDataset(torch.utils.data.Dataset):
    """``dataset`` seen ``times`` times per epoch (mmdet's RepeatDataset: short epochs on small
    sets cost evaluation and start-up per epoch); ``set_epoch`` is passed on."""

    def __init__(self, dataset, times: int = 1):
        self.dataset, self.times = dataset, max(1, int(times))

    def __len__(self) -> int:
        return len(self.dataset) * self.times

    def __getitem__(self, i: int):
        return self.dataset[i % len(self.dataset)]

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)


def to_device(obj, device):
    """Tensors anywhere inside lists / tuples / dicts moved to ``device`` (asynchronously from
    pinned memory)."""
    if torch.is_tensor(obj):
        return obj.to(device, non_blocking=True)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def images_to_device(obj, device):
    """A batch's inputs on ``device``, uint8 images (:func:`harness.data.read_image`) made float
    in [0,1] there: a quarter of the bytes cross the bus, and the conversion is the device's."""
    if torch.is_tensor(obj):
        return image_to_float(obj.to(device, non_blocking=True))
    if isinstance(obj, dict):
        return {k: images_to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(images_to_device(v, device) for v in obj)
    return obj


def loader_workers(schedule: ScheduleSpec, cpus: int) -> int:
    """DataLoader worker processes of one training worker: ``schedule.loader_workers``, else one
    per CPU the worker has beyond the one training runs on."""
    return schedule.loader_workers if schedule.loader_workers is not None else max(0, int(cpus) - 1)


@torch.no_grad()
def evaluate_detector(detector: nn.Module, index, *, device, batch_size: int = 8, world_size: int = 1,
                      rank: int = 0, transform=None, protocol: str = "coco",
                      class_names: list[str] | None = None, amp: bool = False,
                      on_detections: Callable[[list[dict]], None] | None = None, num_workers: int = 0,
                      gt: dict | None = None) -> dict[str, float]:
    """AP of ``detector`` on ``index`` (COCO or VisDrone protocol); images sharded over ranks.

    ``class_names`` (the names of the detector's labels 1..N) maps predictions to a test set
    with its own categories by name; classes the test set lacks are not scored.
    Every rank evaluates its shard; the detections are gathered and every rank computes the
    same AP (no rank-0-only evaluation, no idle workers). ``on_detections`` receives the gathered
    COCO result dicts (the final evaluation keeps them: :mod:`harness.evaluate.detections`).
    ``gt``: ``index.gt_for_eval()`` when the caller has it already (conditions sharing a split).
    """
    label_to_cat = index.label_to_cat_id
    if class_names is not None:
        by_name = {name: index.label_to_cat_id[i + 1] for i, name in enumerate(index.class_names)}
        label_to_cat = {i + 1: by_name[n] for i, n in enumerate(class_names) if n in by_name}
    known = torch.tensor(sorted(label_to_cat))
    was_training = detector.training
    detector.eval()
    dtype = autocast_dtype(device) if amp else None
    dets = []
    loader = eval_loader(index, batch_size, world_size=world_size, rank=rank, num_workers=num_workers,
                         pin_memory=device.type == "cuda")
    for images, targets in loader:
        images = images_to_device(images, device)
        if transform is not None:
            images = [transform(im) for im in images]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            outputs = detector(images)
        outputs = [{k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in o.items()} for o in outputs]
        keep = [torch.isin(o["labels"], known) for o in outputs]
        dets += coco_detections_from_outputs([t["image_id"] for t in targets],
                                             [{k: v[m] for k, v in o.items()} for o, m in zip(outputs, keep)],
                                             label_to_cat)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
    detector.train(was_training)
    if on_detections is not None:
        on_detections(dets)
    if protocol == "visdrone":
        from harness.evaluate import evaluate_visdrone
        return evaluate_visdrone(index.ann_file, dets)
    return evaluate_coco(gt if gt is not None else index.gt_for_eval(), dets)


def autocast_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (with a loss scaler), bf16 elsewhere (CPU autocast supports bf16 only well)."""
    return torch.float16 if device.type == "cuda" else torch.bfloat16


@dataclass
class Precision:
    """A stage's arithmetic: the autocast dtype (None: fp32) and the loss scaler (a no-op unless fp16)."""
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    @classmethod
    def of(cls, schedule: ScheduleSpec, device: torch.device) -> "Precision":
        dtype = autocast_dtype(device) if schedule.amp else None
        return cls(dtype, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16))

    def autocast(self, device: torch.device):
        return torch.autocast(device.type, dtype=self.dtype, enabled=self.dtype is not None)


@dataclass
class StageJob:
    """Everything one worker needs to train one stage (built by :func:`harness.plan.stage_job`).

    ``checkpoint``: detector weights to evaluate instead of training (``detbench eval``);
    ``checkpoint_classes``: the names of its labels 1..N when they are not the dataset's
    (a torchvision COCO checkpoint predicts COCO's 90 categories).
    """
    method: Method
    stage: str
    dataset: PreparedDataset
    detector: DetectorSpec
    arch: str
    schedule: ScheduleSpec
    seed: int
    artifacts: dict = field(default_factory=dict)
    conditions: list[PreparedCondition] = field(default_factory=list)  # degraded test sets
    checkpoint: str | None = None
    checkpoint_classes: list[str] | None = None
    #: Where rank 0 publishes the final evaluations' detections (a Storage; None: not kept).
    detections: object | None = None
    #: DataLoader worker processes (:func:`loader_workers`); 0: images are read in this process.
    loader_workers: int = 0


@dataclass
class StageState:
    """Resumable state: what a checkpoint holds besides the weights."""
    epoch: int = 0          # epochs completed
    history: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)  # label -> metrics, after the last epoch
    cost: dict = field(default_factory=dict)        # harness.modeling.cost metrics of the final detector


#: Steps between two looks at the loss's finiteness: each look is a host sync (and, under DDP,
#: a collective), so the loop does not stall the device every step; a non-finite loss fails the
#: trial anyway, a few steps late.
FINITE_CHECK_EVERY = 20


class FiniteWatch:
    """Notes, on the device, the first step whose loss was not finite and its terms."""

    def __init__(self, device: torch.device):
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.step = torch.full((), -1, dtype=torch.int64, device=device)
        self.terms: dict[str, torch.Tensor] = {}

    def note(self, step: int, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        first = ~torch.isfinite(loss.detach()) & ~self.bad
        self.step = torch.where(first, torch.full_like(self.step, step), self.step)
        for k, v in terms.items():
            v = v.detach().float().reshape(())
            self.terms[k] = torch.where(first, v, self.terms.get(k, v))
        self.bad = self.bad | first

    def check(self, epoch: int, world_size: int) -> None:
        flag = self.bad.float().reshape(1)
        if world_size > 1:
            dist.all_reduce(flag)
        if flag.item():
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in self.terms.items()) if self.bad else "on another rank"
            raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {int(self.step) + 1}: {detail}")


def _check_loss_weights(weights: dict[str, float], terms: dict, stage: str) -> None:
    """A weighted name that is no term of this stage is said once (a typo would do nothing)."""
    unknown = sorted(set(weights) - set(terms))
    if unknown:
        log.warning("schedule.loss_weights: %s not a loss term of stage %r (its terms: %s)",
                    ", ".join(unknown), stage, ", ".join(sorted(terms)))


def set_lr(optimizer, it: int, total: int, s: ScheduleSpec) -> None:
    for g in optimizer.param_groups:
        g["lr"] = s.base_lr * lr_factor(it, total, s)


def train_one_epoch(job: StageJob, model: nn.Module, trained: nn.Module, optimizer, loader, ctx: StageContext,
                    precision: Precision, *, epoch: int, total_steps: int, world_size: int = 1,
                    max_steps: int | None = None) -> dict[str, float]:
    """One epoch of SGD; the mean of every loss term (over steps and ranks) as ``train/<term>``.

    Loss values stay on the device (summed there) and finiteness is looked at every
    :data:`FINITE_CHECK_EVERY` steps: no host sync per step. ``time/step_s`` is the median
    wall time of a step, loading included: robust to the epoch's first steps (workers
    warming up, the last epoch's checkpoint uploading) where the epoch's mean is not. On a
    GPU the host runs ahead of the device only until the launch queue fills, so over an
    epoch the host's step time is the device's.
    """
    s, device = job.schedule, ctx.device
    sums: dict[str, torch.Tensor] = {}
    watch = FiniteWatch(device)
    steps = 0
    stamps = [time.perf_counter()]
    for step, (images, targets) in enumerate(loader):
        ctx.step_in_epoch = step
        set_lr(optimizer, epoch * len(loader) + step, total_steps, s)
        images, targets = images_to_device(images, device), to_device(targets, device)
        with precision.autocast(device):
            terms = job.method.training_losses(job.stage, trained, images, targets, ctx)
            if step == 0 and s.loss_weights:
                _check_loss_weights(s.loss_weights, terms, job.stage)
            loss = sum(v * s.loss_weights.get(k, 1.0) for k, v in terms.items())
        watch.note(step, loss, terms)
        optimizer.zero_grad(set_to_none=True)
        precision.scaler.scale(loss).backward()
        if s.grad_clip:
            precision.scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
        precision.scaler.step(optimizer)
        precision.scaler.update()
        job.method.after_step(job.stage, model, ctx)
        for k, v in (*terms.items(), ("loss", loss)):
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        steps += 1
        if steps % FINITE_CHECK_EVERY == 0 or step + 1 == len(loader) or steps == max_steps:
            watch.check(epoch, world_size)
        stamps.append(time.perf_counter())
        if max_steps is not None and steps >= max_steps:
            break
    values = {k: float(v) for k, v in zip(sums, torch.stack(list(sums.values())).tolist())} if sums else {}
    record = {f"train/{k}": v / max(1, steps) for k, v in _all_mean(values, world_size).items()}
    if steps:
        record["time/step_s"] = statistics.median([b - a for a, b in zip(stamps, stamps[1:])])
    return record


def evaluate_stage(job: StageJob, detector: nn.Module, val_index, state: StageState, ctx: StageContext, *,
                   final: bool, on_condition: Callable[[StageState], None] | None = None) -> dict[str, float]:
    """Validation AP (``state.last_eval``); after the last epoch also the cost and every test condition.

    Conditions already in ``state.conditions`` are skipped (a resumed evaluation), and
    ``on_condition`` is called after each one so it can be checkpointed.
    """
    classes = job.checkpoint_classes
    common = dict(device=ctx.device, world_size=ctx.world_size, rank=ctx.rank, amp=job.schedule.amp,
                  batch_size=job.schedule.eval_batch_size, num_workers=job.loader_workers)
    gts: dict[str, dict] = {}  # a split's evaluation ground truth, built once for all its conditions

    def gt_of(index, folder: str, protocol: str) -> dict | None:
        if protocol != "coco" or not folder:
            return None
        if folder not in gts:
            gts[folder] = index.gt_for_eval()
        return gts[folder]

    state.last_eval = evaluate_detector(detector, val_index, protocol=job.dataset.protocol, class_names=classes,
                                        on_detections=_keeper(job, ctx, "clean", 0, final),
                                        gt=gt_of(val_index, job.dataset.val_index, job.dataset.protocol), **common)
    if not final:
        return state.last_eval
    if hasattr(getattr(detector, "backbone", None), "neck_name"):
        state.cost = detector_cost(detector, job.detector).as_metrics()
    state.cost.update(inference_cost(detector, job.detector, ctx.device,
                                     autocast=autocast_dtype(ctx.device) if job.schedule.amp else None))
    for cond in job.conditions:  # degraded test sets: once, with the final model
        if cond.label in state.conditions:
            continue
        index = split_index(cond.index, cond.annotations, cond.images)
        names = classes or (ctx.class_names if cond.by_name else None)  # the training classes
        state.conditions[cond.label] = evaluate_detector(detector, index, protocol=cond.protocol, class_names=names,
                                                         on_detections=_keeper(job, ctx, cond.name, cond.severity, True),
                                                         gt=gt_of(index, cond.index, cond.protocol), **common)
        if on_condition:
            on_condition(state)
    return state.last_eval


def _keeper(job: StageJob, ctx: StageContext, condition: str, severity: int, final: bool):
    """What keeps one final evaluation's detections: rank 0 publishes them (every rank has them all)."""
    if not final or job.detections is None or ctx.rank != 0:
        return None
    from harness.evaluate import condition_key, write_detections
    return lambda dets: write_detections(job.detections, f"{condition_key(condition, severity)}.parquet", dets)


def grouped_loader(dataset, train_ratios, per_worker: int, s: ScheduleSpec, *, seed: int, world_size: int,
                   rank: int, num_workers: int = 0, pin_memory: bool = False):
    """The training loader; with ``aspect_ratio_group_factor``, batches of similar aspect ratio
    (``train_ratios``: width / height of each image of the detection set)."""
    ratios = None
    if s.aspect_ratio_group_factor is not None:
        n = len(train_ratios)
        if len(dataset) % n:
            log.warning("aspect-ratio grouping skipped: the method's training set (%d items) is not the "
                        "detection set (%d images) repeated", len(dataset), n)
        else:
            ratios = np.resize(train_ratios, len(dataset)).tolist()
    return train_loader(dataset, per_worker, seed=seed, world_size=world_size, rank=rank,
                        aspect_ratios=ratios, group_factor=s.aspect_ratio_group_factor, num_workers=num_workers,
                        pin_memory=pin_memory)


def training_images(index, s: ScheduleSpec, *, seed: int) -> CocoDetection:
    """The detection training set of a schedule: ``drop_empty_train_images`` keeps the images
    torchvision's references train on; ``augment: [hflip]`` flips half of them, per epoch."""
    items = index.trainable() if s.drop_empty_train_images else None
    return CocoDetection(index, items=items, flip_seed=seed if "hflip" in s.augment else None)


def run_stage(job: StageJob, *, device: torch.device, world_size: int = 1, rank: int = 0,
              state: StageState | None = None, model_state: dict | None = None,
              on_epoch: Callable[[StageState, nn.Module, Callable[[], dict]], None] | None = None,
              max_steps: int | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None
              ) -> tuple[StageState, nn.Module]:
    """Train one stage (or, with ``job.checkpoint``, only evaluate it); returns its final state and model.

    ``on_epoch(state, model, resumable)`` is called after every epoch (Ray reports and
    checkpoints there; ``resumable()`` gives the model, optimizer and scaler states).
    ``max_steps`` stops early (benchmarks). ``wrap`` wraps the model for DDP.
    """
    seed_everything(job.seed * 1000 + rank)
    s = job.schedule
    if s.deterministic:
        use_deterministic_kernels()
    val_index = load_split(job.dataset, "val", check_images=False)  # its classes are train's (prepare_dataset)
    ctx = StageContext(stage=job.stage, detector=job.detector, arch=job.arch, schedule=s,
                       num_classes=len(val_index.class_names), class_names=val_index.class_names,
                       device=device, seed=job.seed, world_size=world_size, rank=rank,
                       artifacts=dict(job.artifacts), conditions=list(job.conditions))
    state = state or StageState()
    if job.checkpoint:
        return evaluate_checkpoint(job, ctx, val_index, state, on_epoch), None
    model = job.method.build_model(job.stage, ctx).to(device)
    optimizer = build_optimizer(model, s)
    precision = Precision.of(s, device)
    if model_state is not None:
        model.load_state_dict(model_state["model"])
        optimizer.load_state_dict(model_state["optimizer"])
        if "scaler" in model_state:
            precision.scaler.load_state_dict(model_state["scaler"])
    train_index = load_split(job.dataset, "train", check_images=False)
    detection_set = training_images(train_index, s, seed=job.seed)
    dataset = RepeatedDataset(job.method.train_dataset(job.stage, ctx, detection_set), job.dataset.repeat)
    loader = grouped_loader(dataset, detection_set.aspect_ratios(), max(1, s.batch_size // world_size), s, seed=job.seed, world_size=world_size, rank=rank,
                            num_workers=job.loader_workers, pin_memory=device.type == "cuda")
    ctx.steps_per_epoch = len(loader)
    trained = wrap(model) if wrap else model

    def resumable() -> dict:
        return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scaler": precision.scaler.state_dict()}

    for epoch in range(state.epoch, s.epochs):
        ctx.epoch = epoch
        set_loader_epoch(loader, epoch)
        trained.train()
        t0 = time.perf_counter()
        record = train_one_epoch(job, model, trained, optimizer, loader, ctx, precision, epoch=epoch,
                                 total_steps=s.epochs * len(loader), world_size=world_size, max_steps=max_steps)
        if max_steps is not None:
            return state, model
        record["time/epoch_s"] = time.perf_counter() - t0
        record["lr"] = optimizer.param_groups[0]["lr"]
        record.update(job.method.epoch_metrics(job.stage, model, ctx))
        final = epoch + 1 == s.epochs
        if (final or (epoch + 1) % s.eval_every == 0) and job.method.stage(job.stage).evaluates:
            evaluate_stage(job, job.method.detector_of(model), val_index, state, ctx, final=final)
            record.update({f"val/{k}": v for k, v in state.last_eval.items()})
        state.epoch = epoch + 1
        record["epoch"] = state.epoch
        state.history.append(record)
        if on_epoch:
            t1 = time.perf_counter()
            on_epoch(state, model, resumable)
            record["time/report_s"] = time.perf_counter() - t1  # reporting + checkpoint cost
    trained_s = sum(r.get("time/epoch_s", 0.0) for r in state.history)
    if trained_s > 0:  # training throughput of the whole worker group, evaluation excluded
        state.cost[COST_TRAIN_IMAGES_PER_S] = len(dataset) * len(state.history) / trained_s
    return state, model


def evaluate_checkpoint(job: StageJob, ctx: StageContext, val_index, state: StageState,
                        on_epoch=None) -> StageState:
    """``detbench eval``: the stage's detector with ``job.checkpoint``'s weights, on every test set."""
    from torchvision.models.detection._utils import overwrite_eps

    from harness.modeling import build_detector, load_state, zero_eps_checkpoint
    weights = load_state(job.checkpoint)
    classes = job.checkpoint_classes or ctx.class_names
    detector = build_detector(job.detector, len(classes), arch=job.arch)
    detector.load_state_dict(weights, strict=True)
    if job.detector.preset and zero_eps_checkpoint(job.checkpoint):
        overwrite_eps(detector, 0.0)  # torchvision's legacy COCO_V1 files, as its builders do
    detector.to(ctx.device)
    report = (lambda st: on_epoch(st, detector, lambda: {})) if on_epoch else None
    evaluate_stage(job, detector, val_index, state, ctx, final=True, on_condition=report)
    state.history = []
    return state
