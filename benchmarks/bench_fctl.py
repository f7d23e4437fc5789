"""Cost of FCTL's EANSDL loss against one Faster R-CNN R50-FPN training step, same input.

The five FPN maps of a 512 x 512 image (FPN width 256: 128^2, 64^2, 32^2, 16^2, 8^2), r0 = 4,
batch 1: EANSDL forward + backward over all five levels, (a) the fast implementation
(:class:`methods.fctl.OmegaSum`) and (b) the literal loop of shifted slices under autograd
(:func:`methods.fctl.omega_map_reference`), against (c) one forward + backward of the detector.
All in one process with the machine's default torch threads; medians.
Memory: peak RSS growth of a fresh subprocess per variant (large blocks mmapped, so freed
tensors leave RSS), in units of the largest map
(256 x 128 x 128 float32 = 16 MiB); on CUDA ``max_memory_allocated``.
Targets (issue): fast / step <= 0.25 (stretch <= 0.15); memory a few copies of one map.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time

import torch

from benchmarks.common import memory_in_subprocess, peak_memory, random_detection_batch
from harness.config import DetectorSpec
from harness.modeling import build_detector
from methods.fctl import eansdl

SIZE, WIDTH, R0, CLASSES = 512, 256, 4, 10
SIDES = (128, 64, 32, 16, 8)
STEP_RUNS, FAST_RUNS, REF_RUNS = 3, 5, 2


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _features(device):
    g = torch.Generator().manual_seed(0)
    ideal = [torch.randn(1, WIDTH, s, s, generator=g).to(device) for s in SIDES]
    degraded = [torch.randn(1, WIDTH, s, s, generator=g).to(device).requires_grad_() for s in SIDES]
    return ideal, degraded


def _loss_step(ideal, degraded, reference: bool) -> float:
    device = degraded[0].device
    _sync(device)
    t0 = time.perf_counter()
    total = sum(eansdl(a, b, k, r0=R0, progress=0.3, reference=reference)
                for k, (a, b) in enumerate(zip(ideal, degraded)))
    total.backward()
    _sync(device)
    for b in degraded:
        b.grad = None
    return time.perf_counter() - t0


def _detector_step(model, images, targets) -> float:
    _sync(images[0].device)
    t0 = time.perf_counter()
    loss = sum(model(images, targets).values())
    model.zero_grad(set_to_none=True)
    loss.backward()
    _sync(images[0].device)
    return time.perf_counter() - t0


def measure_memory(variant: str) -> dict:
    """Peak extra memory of one EANSDL forward + backward (call in a fresh process on CPU)."""
    device = _device()
    ideal, degraded = _features(device)
    return peak_memory(device, lambda: _loss_step(ideal, degraded, reference=variant == "reference"))


def _memory_in_subprocess(variant: str) -> dict:
    # Large blocks straight from / back to the OS, so the peak RSS is the peak of live tensors,
    # not of glibc's heap reuse.
    return memory_in_subprocess("benchmarks.bench_fctl", variant,
                                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def main() -> None:
    device = _device()
    torch.manual_seed(0)
    spec = DetectorSpec(backbone="resnet50", fpn_width=WIDTH, image_size=SIZE)
    model = build_detector(spec, CLASSES, arch="faster_rcnn").to(device).train()
    images, targets = random_detection_batch(1, SIZE, CLASSES, device=device)
    _detector_step(model, images, targets)  # warm-up
    step = statistics.median(_detector_step(model, images, targets) for _ in range(STEP_RUNS))
    del model

    ideal, degraded = _features(device)
    with torch.no_grad():  # the two implementations agree on this input
        fast_v = sum(eansdl(a, b, k, r0=R0) for k, (a, b) in enumerate(zip(ideal, degraded)))
        ref_v = sum(eansdl(a, b, k, r0=R0, reference=True) for k, (a, b) in enumerate(zip(ideal, degraded)))
    _loss_step(ideal, degraded, reference=False)  # warm-up
    fast = statistics.median(_loss_step(ideal, degraded, reference=False) for _ in range(FAST_RUNS))
    ref = statistics.median(_loss_step(ideal, degraded, reference=True) for _ in range(REF_RUNS))
    map_mb = WIDTH * SIDES[0] ** 2 * 4 / 2**20
    mem = {v: (measure_memory(v) if device.type == "cuda" else _memory_in_subprocess(v))
           for v in ("fast", "reference")}

    print(f"device {device}, {torch.get_num_threads()} threads; Faster R-CNN R50-FPN{WIDTH}, batch 1, "
          f"{SIZE} px; EANSDL on the five FPN maps {'/'.join(map(str, SIDES))} px, r0 = {R0}")
    print(f"value: fast {fast_v.item():.6f}, reference {ref_v.item():.6f} "
          f"(rel. diff {abs(fast_v - ref_v).item() / ref_v.item():.1e})")
    print(f"detector step (median of {STEP_RUNS}): {step * 1e3:.0f} ms")
    print(f"EANSDL fwd+bwd: fast {fast * 1e3:.0f} ms (median of {FAST_RUNS}), "
          f"reference loop {ref * 1e3:.0f} ms (median of {REF_RUNS})")
    print(f"EANSDL fast / detector step = {fast / step:.3f} (target <= 0.25, stretch <= 0.15); "
          f"reference / step = {ref / step:.2f}; speed-up fast vs reference = {ref / fast:.1f}x")
    kind = mem["fast"]["kind"]
    print(f"peak extra memory ({kind}), in copies of the largest map ({map_mb:.0f} MiB): "
          f"fast {mem['fast']['peak_mb'] / map_mb:.1f} ({mem['fast']['peak_mb']:.0f} MiB), "
          f"reference {mem['reference']['peak_mb'] / map_mb:.1f} ({mem['reference']['peak_mb']:.0f} MiB)")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(sys.argv[2])))
