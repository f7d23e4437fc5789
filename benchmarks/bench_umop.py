"""Training-step time of ``umop`` (progressive focal loss per FPN level) relative to ``focal``.

RetinaNet, ResNet-18 FPN 64, 128 px, batch 8, one CPU thread: forward + backward,
after warm-up, median of interleaved steps. Target ratio <= 1.05.
"""
from __future__ import annotations

import statistics
import time

import torch

from benchmarks.common import random_detection_batch
from harness.config import DetectorSpec, ScheduleSpec
from harness.plugin import StageContext
from methods.focal import FocalRetinaNet
from methods.umop import UMOP

BATCH, SIZE, CLASSES, WARMUP, STEPS = 8, 128, 10, 2, 15


def _step(method, model, images, targets, ctx) -> float:
    t0 = time.perf_counter()
    loss = sum(method.training_losses("train", model, images, targets, ctx).values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    return time.perf_counter() - t0


def main() -> None:
    torch.set_num_threads(1)
    spec = DetectorSpec(backbone="resnet18", fpn_width=64, image_size=SIZE)
    ctx = StageContext(stage="train", detector=spec, arch="retinanet", schedule=ScheduleSpec(),
                       num_classes=CLASSES, class_names=[str(i) for i in range(CLASSES)],
                       device=torch.device("cpu"), seed=0)
    runs = {}
    for cls in (UMOP, FocalRetinaNet):
        torch.manual_seed(0)  # same weights for both
        method = cls()
        runs[cls.name] = (method, method.build_model("train", ctx).train())
    images, targets = random_detection_batch(BATCH, SIZE, CLASSES)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for i in range(WARMUP + STEPS):
        order = list(runs) if i % 2 == 0 else list(reversed(runs))  # interleaved, alternating order
        for name in order:
            t = _step(*runs[name], images, targets, ctx)
            if i >= WARMUP:
                times[name].append(t)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    ratio = med["umop"] / med["focal"]
    print(f"step time (median of {STEPS}, batch {BATCH}, {SIZE} px, 1 thread): "
          f"umop {med['umop'] * 1e3:.1f} ms, focal {med['focal'] * 1e3:.1f} ms")
    print(f"umop / focal = {ratio:.3f} (target <= 1.05){'' if ratio <= 1.05 else '  ABOVE TARGET'}")


if __name__ == "__main__":
    main()
