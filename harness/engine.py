"""Training and evaluation of one stage on one worker.

:func:`run_stage` is plain PyTorch (optionally DDP): the Ray Train entry point
in :mod:`harness.distributed` calls it with Ray's reporting and checkpoint
hooks, and the benchmark calls it without Ray, so the harness overhead is
measured on exactly the same loop.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from harness.config import DetectorSpec, ScheduleSpec
from harness.cost import detector_cost
from harness.data.coco import CocoDetection, load_coco
from harness.data.loader import eval_loader, load_split, train_loader
from harness.evaluate.coco import coco_detections_from_outputs, evaluate_coco
from harness.method import Method, StageContext

log = logging.getLogger(__name__)


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or inf: the trial is failed with this reason, not retried."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
    """Tensors anywhere inside lists / tuples / dicts moved to ``device``."""
    if torch.is_tensor(obj):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


@torch.no_grad()
def evaluate_detector(detector: nn.Module, index, *, device, batch_size: int = 8, world_size: int = 1,
                      rank: int = 0, transform=None, protocol: str = "coco",
                      class_names: list[str] | None = None) -> dict[str, float]:
    """AP of ``detector`` on ``index`` (COCO or VisDrone protocol); images sharded over ranks.

    ``class_names`` (the training classes, label = index + 1) maps predictions to a test set
    with its own categories by name; classes the test set lacks are not scored.
    """
    label_to_cat = index.label_to_cat_id
    if class_names is not None:
        by_name = {name: index.label_to_cat_id[i + 1] for i, name in enumerate(index.class_names)}
        label_to_cat = {i + 1: by_name[n] for i, n in enumerate(class_names) if n in by_name}
    was_training = detector.training
    detector.eval()
    dets = []
    for images, targets in eval_loader(index, batch_size, world_size=world_size, rank=rank):
        if transform is not None:
            images = [transform(im) for im in images]
        outputs = detector([im.to(device) for im in images])
        keep = [torch.isin(o["labels"].cpu(), torch.tensor(sorted(label_to_cat))) for o in outputs]
        dets += coco_detections_from_outputs([t["image_id"] for t in targets],
                                             [{k: v.cpu()[m] for k, v in o.items()} for o, m in zip(outputs, keep)],
                                             label_to_cat)
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, dets)
        dets = [d for part in gathered for d in part]
    detector.train(was_training)
    if protocol == "visdrone":
        from harness.evaluate.visdrone import evaluate_visdrone
        return evaluate_visdrone(index.gt, dets)
    return evaluate_coco(index.gt_for_eval(), dets)


@dataclass
class StageJob:
    """Everything one worker needs to train one stage (JSON-able pieces only)."""
    method: Method
    stage: str
    dataset: dict
    detector: DetectorSpec
    arch: str
    schedule: ScheduleSpec
    seed: int
    artifacts: dict = field(default_factory=dict)
    conditions: list = field(default_factory=list)  # degraded test sets (harness.data.loader.prepare_conditions)


@dataclass
class StageState:
    """Resumable state: what a checkpoint holds besides the weights."""
    epoch: int = 0          # epochs completed
    history: list = field(default_factory=list)
    last_eval: dict = field(default_factory=dict)
    conditions: dict = field(default_factory=dict)  # label -> metrics, after the last epoch
    cost: dict = field(default_factory=dict)        # harness.cost metrics of the final detector


def run_stage(job: StageJob, *, device: torch.device, world_size: int = 1, rank: int = 0,
              state: StageState | None = None, model_state: dict | None = None,
              on_epoch: Callable[[StageState, nn.Module, torch.optim.Optimizer], None] | None = None,
              max_steps: int | None = None, wrap: Callable[[nn.Module], nn.Module] | None = None
              ) -> tuple[StageState, nn.Module]:
    """Train one stage; returns its final state (history + final evaluation) and the model.

    ``on_epoch`` is called after every epoch (Ray reports and checkpoints there).
    ``max_steps`` stops early (benchmarks). ``wrap`` wraps the model for DDP.
    """
    seed_everything(job.seed * 1000 + rank)
    s = job.schedule
    train_index = load_split(job.dataset, "train", check_images=False)
    val_index = load_split(job.dataset, "val", check_images=False)
    ctx = StageContext(stage=job.stage, detector=job.detector, arch=job.arch, schedule=s,
                       num_classes=len(train_index.class_names), class_names=train_index.class_names,
                       device=device, seed=job.seed, world_size=world_size, rank=rank,
                       artifacts=dict(job.artifacts), conditions=list(job.conditions))
    model = job.method.build_model(job.stage, ctx).to(device)
    optimizer = build_optimizer(model, s)
    state = state or StageState()
    if model_state is not None:
        model.load_state_dict(model_state["model"])
        optimizer.load_state_dict(model_state["optimizer"])
    per_worker = max(1, s.batch_size // world_size)
    dataset = job.method.train_dataset(job.stage, ctx, CocoDetection(train_index))
    loader = train_loader(RepeatedDataset(dataset, job.dataset.get("repeat", 1)), per_worker,
                          seed=job.seed, world_size=world_size, rank=rank)
    ctx.steps_per_epoch = len(loader)
    total_steps = s.epochs * len(loader)
    trained = wrap(model) if wrap else model
    steps = 0
    for epoch in range(state.epoch, s.epochs):
        ctx.epoch = epoch
        loader.sampler.set_epoch(epoch)
        if hasattr(loader.dataset, "set_epoch"):
            loader.dataset.set_epoch(epoch)
        trained.train()
        sums: dict[str, float] = {}
        t0 = time.perf_counter()
        for step, (images, targets) in enumerate(loader):
            ctx.step_in_epoch = step
            it = epoch * len(loader) + step
            for g in optimizer.param_groups:
                g["lr"] = s.base_lr * lr_factor(it, total_steps, s)
            images, targets = to_device(images, device), to_device(targets, device)
            terms = job.method.training_losses(job.stage, trained, images, targets, ctx)
            loss = sum(terms.values())
            bad = torch.tensor([0.0 if torch.isfinite(loss) else 1.0], device=device)
            if world_size > 1:
                dist.all_reduce(bad)
            if bad.item():
                raise NonFiniteLoss(f"non-finite loss at epoch {epoch + 1} step {step + 1}: "
                                    + ", ".join(f"{k}={v.item():.4g}" for k, v in terms.items()))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if s.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), s.grad_clip)
            optimizer.step()
            job.method.after_step(job.stage, model, ctx)
            for k, v in terms.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            sums["loss"] = sums.get("loss", 0.0) + float(loss.detach())
            steps += 1
            if max_steps is not None and steps >= max_steps:
                return state, model
        record = {f"train/{k}": v / max(1, len(loader)) for k, v in _all_mean(sums, world_size).items()}
        record["time/epoch_s"] = time.perf_counter() - t0
        record["lr"] = optimizer.param_groups[0]["lr"]
        record.update(job.method.epoch_metrics(job.stage, model, ctx))
        due = (epoch + 1) % s.eval_every == 0 or epoch + 1 == s.epochs
        if due and job.method.evaluates(job.stage):
            detector = job.method.detector_of(model)
            protocol = job.dataset.get("protocol", "coco")
            state.last_eval = evaluate_detector(detector, val_index, device=device, world_size=world_size,
                                                rank=rank, protocol=protocol)
            record.update({f"val/{k}": v for k, v in state.last_eval.items()})
            if epoch + 1 == s.epochs and hasattr(detector.backbone, "neck_name"):
                state.cost = detector_cost(detector, job.detector).as_metrics()
            if epoch + 1 == s.epochs:  # degraded test sets: once, with the final model
                for cond in job.conditions:
                    index = load_coco(cond["annotations"], cond["images"], check_images=False)
                    state.conditions[cond["label"]] = evaluate_detector(
                        detector, index, device=device, world_size=world_size, rank=rank,
                        protocol=cond["protocol"], class_names=train_index.class_names if cond["by_name"] else None)
        state.epoch = epoch + 1
        record["epoch"] = state.epoch
        state.history.append(record)
        if on_epoch:
            t1 = time.perf_counter()
            on_epoch(state, model, optimizer)
            record["time/report_s"] = time.perf_counter() - t1  # reporting + checkpoint cost
    return state, model
