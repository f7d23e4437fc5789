"""The real-scale recipe's per-step cost (issue: real-scale recipes).

(a) Harness step / plain PyTorch loop on torchvision's Faster R-CNN R50-FPN v1 preset: two
    images of 1333x800 and 1067x800 (keep-ratio resize to 800/1333), batch 2, CPU. The harness
    path is :func:`harness.engine.stage.train_one_epoch` with the grouped batch sampler, the JPEG
    loader, the LR schedule and the device-side loss bookkeeping; the plain loop feeds the same
    decoded tensors to the same model. Target <= 1.05.
(b) bf16 autocast on CPU: step time amp / fp32 of the same preset at 512 px (informational:
    on GPU, fp16 with a GradScaler is the point; CPUs without bf16 units emulate it).
"""
from __future__ import annotations

import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SIZES = ((1333, 800), (1067, 800))  # (width, height), the two images
STEPS, WARMUP = 3, 1


def _coco_pair(root: Path) -> Path:
    """Two random-texture JPEGs with a few boxes each, as a COCO instances file."""
    rng = np.random.default_rng(0)
    images, anns = [], []
    for i, (w, h) in enumerate(SIZES, start=1):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"{i}.jpg", quality=90)
        images.append({"id": i, "file_name": f"{i}.jpg", "width": w, "height": h})
        for k in range(3):
            x, y = float(rng.uniform(0, w - 300)), float(rng.uniform(0, h - 300))
            anns.append({"id": len(anns) + 1, "image_id": i, "category_id": 1 + k % 2, "iscrowd": 0,
                         "bbox": [x, y, 120.0 + 50 * k, 150.0], "area": (120.0 + 50 * k) * 150})
    path = root / "pair.json"
    path.write_text(json.dumps({"images": images, "annotations": anns,
                                "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]}))
    return path


def _setup(tmp: Path, *, amp: bool, min_size: int | None = None, max_size: int | None = None,
           steps: int = STEPS):
    from harness.config import DetectorSpec, ScheduleSpec
    from harness.data import CocoDetection, PreparedDataset, load_split
    from harness.engine import Precision, RepeatedDataset, StageJob, build_optimizer, grouped_loader
    from harness.plugin import StageContext
    from methods.faster_rcnn import FasterRCNNBaseline

    ann = _coco_pair(tmp)
    data = PreparedDataset("pair", str(ann), str(tmp), str(ann), str(tmp), repeat=steps + WARMUP)
    spec = DetectorSpec(preset="torchvision_v1", backbone="resnet50", norm="frozen_bn", trainable_layers=3,
                        min_size=min_size, max_size=max_size)
    sched = ScheduleSpec(epochs=1, batch_size=2, warmup_iters=0, amp=amp, aspect_ratio_group_factor=0)  # both wide: one group
    job = StageJob(method=FasterRCNNBaseline(), stage="train", dataset=data, detector=spec, arch="faster_rcnn",
                   schedule=sched, seed=0)
    index = load_split(data, "train", check_images=False)
    ctx = StageContext(stage="train", detector=spec, arch="faster_rcnn", schedule=sched, num_classes=2,
                       class_names=index.class_names, device=torch.device("cpu"), seed=0)
    torch.manual_seed(0)
    model = job.method.build_model("train", ctx)
    loader = grouped_loader(RepeatedDataset(CocoDetection(index), data["repeat"]), index, 2, sched, seed=0,
                            world_size=1, rank=0)
    return job, ctx, model, build_optimizer(model, sched), loader, Precision.of(sched, torch.device("cpu"))


def _harness_step_s(job, ctx, model, optimizer, loader, precision) -> float:
    """Seconds per step of train_one_epoch, warm-up steps excluded (timed per step by a hook)."""
    from harness.engine import train_one_epoch
    stamps = []
    hook = model.register_forward_pre_hook(lambda *_: stamps.append(time.perf_counter()))
    train_one_epoch(job, model, model, optimizer, loader, ctx, precision, epoch=0, total_steps=len(loader))
    end = time.perf_counter()
    hook.remove()
    stamps.append(end)
    per = [b - a for a, b in zip(stamps, stamps[1:])][WARMUP:]
    return statistics.median(per)


def _plain_step_s(model, optimizer, batch) -> float:
    images, targets = batch
    per = []
    for i in range(STEPS + WARMUP):
        t0 = time.perf_counter()
        loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
        optimizer.step()
        if i >= WARMUP:
            per.append(time.perf_counter() - t0)
    return statistics.median(per)


def bench_step_ratio(tmp: Path) -> None:
    job, ctx, model, optimizer, loader, precision = _setup(tmp, amp=False)
    plain_model = copy.deepcopy(model)
    plain_opt = type(optimizer)(plain_model.parameters(), **{k: v for k, v in optimizer.defaults.items()
                                                             if k in ("lr", "momentum", "weight_decay")})
    batch = next(iter(loader))
    t_harness = _harness_step_s(job, ctx, model, optimizer, loader, precision)
    t_plain = _plain_step_s(plain_model, plain_opt, batch)
    print(f"(a) R50-FPN v1 preset, 1333x800 + 1067x800 -> 800/1333, batch 2, CPU {torch.get_num_threads()} threads:\n"
          f"    harness step {t_harness:.2f} s, plain loop {t_plain:.2f} s, ratio {t_harness / t_plain:.3f} "
          f"(target <= 1.05)")


def bench_amp(tmp: Path) -> None:
    times = {}
    for amp in (False, True):
        job, ctx, model, optimizer, loader, precision = _setup(tmp, amp=amp, min_size=512, max_size=512,
                                                              steps=2)  # emulated bf16 is slow
        times[amp] = _harness_step_s(job, ctx, model, optimizer, loader, precision)
    print(f"(b) same preset at 512 px: fp32 {times[False]:.2f} s/step, bf16 autocast {times[True]:.2f} s/step, "
          f"ratio amp/fp32 {times[True] / times[False]:.2f} (informational on CPU)")


def main() -> None:
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        bench_step_ratio(Path(d))
        bench_amp(Path(d))


if __name__ == "__main__":
    main()
