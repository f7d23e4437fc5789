"""Cost of DeFeat's distillation: student step time and peak memory, with / without DeFeat.

Faster R-CNN, ResNet-18-FPN 64 student, ResNet-50 teacher (frozen, random weights: the cost does not
depend on them), 128 px, batch 4, one CPU thread. A step is forward + backward. Time: both models in
one process, interleaved steps in alternating order, median of STEPS after WARMUP. Memory: on CPU the
peak RSS growth of a fresh subprocess per variant (``VmHWM`` minus ``VmRSS`` before the model is
built), so neither sees the other's allocations; on CUDA ``torch.cuda.max_memory_allocated``.
"""
from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from benchmarks.common import memory_in_subprocess, peak_memory, random_detection_batch
from harness.config import DetectorSpec, ScheduleSpec
from harness.plugin import StageContext
from methods.defeat import DeFeat
from methods.faster_rcnn import FasterRCNNBaseline

BATCH, SIZE, CLASSES, WARMUP, STEPS, MEM_STEPS = 4, 128, 10, 2, 7, 3
VARIANTS = ("defeat", "faster_rcnn")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _ctx(device) -> StageContext:
    spec = DetectorSpec(backbone="resnet18", fpn_width=64, image_size=SIZE)
    return StageContext(stage="student", detector=spec, arch="faster_rcnn", schedule=ScheduleSpec(),
                        num_classes=CLASSES, class_names=[str(i) for i in range(CLASSES)], device=device, seed=0)


def _build(variant: str, ctx: StageContext):
    torch.manual_seed(0)  # the same student weights for both
    if variant == "defeat":
        method, stage = DeFeat(), "student"
    else:
        method, stage = FasterRCNNBaseline(), "train"
    import logging
    logging.getLogger("methods.defeat").setLevel(logging.ERROR)  # the random-teacher warning
    return method, stage, method.build_model(stage, ctx).to(ctx.device).train()


def _step(method, stage, model, images, targets, ctx) -> float:
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    loss = sum(method.training_losses(stage, model, images, targets, ctx).values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def measure_memory(variant: str) -> dict:
    """Peak memory of MEM_STEPS steps of one variant (call in a fresh process on CPU)."""
    torch.set_num_threads(1)
    device = _device()
    ctx = _ctx(device)
    images, targets = random_detection_batch(BATCH, SIZE, CLASSES, device=device)

    def run():
        method, stage, model = _build(variant, ctx)
        for _ in range(MEM_STEPS):
            _step(method, stage, model, images, targets, ctx)
    return peak_memory(device, run)


def main() -> None:
    torch.set_num_threads(1)
    device = _device()
    ctx = _ctx(device)
    runs = {v: _build(v, ctx) for v in VARIANTS}
    images, targets = random_detection_batch(BATCH, SIZE, CLASSES, device=device)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for i in range(WARMUP + STEPS):
        order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
        for v in order:
            t = _step(*runs[v], images, targets, ctx)
            if i >= WARMUP:
                times[v].append(t)
    med = {v: statistics.median(ts) for v, ts in times.items()}
    del runs
    if device.type == "cuda":
        mem = {v: measure_memory(v) for v in VARIANTS}
    else:
        mem = {v: memory_in_subprocess("benchmarks.bench_defeat", v) for v in VARIANTS}
    kind = mem[VARIANTS[0]]["kind"]
    print(f"device {device}; student resnet18-FPN64 faster_rcnn, teacher resnet50, batch {BATCH}, {SIZE} px, "
          f"1 thread; step = forward + backward")
    print(f"step time (median of {STEPS}): defeat {med['defeat'] * 1e3:.1f} ms, "
          f"student alone {med['faster_rcnn'] * 1e3:.1f} ms; defeat / alone = "
          f"{med['defeat'] / med['faster_rcnn']:.2f}")
    print(f"memory ({kind}, {MEM_STEPS} steps): defeat {mem['defeat']['peak_mb']:.0f} MiB, "
          f"student alone {mem['faster_rcnn']['peak_mb']:.0f} MiB; defeat / alone = "
          f"{mem['defeat']['peak_mb'] / mem['faster_rcnn']['peak_mb']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(sys.argv[2])))
    else:
        main()
