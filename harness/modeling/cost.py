"""What a detector costs: parameters, FLOPs, batch-1 latency and peak memory (the cost columns).

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` (no extra
dependency) on one image at the detector's evaluation size: ``min_size`` (the
last one, the test size) by ``max_size`` for keep-ratio specs, i.e. the largest
input the transform produces; square ``image_size`` otherwise. They count the
matrix products and convolutions of the forward pass (one multiply-add = 2
FLOPs, the counter's convention), not NMS or box decoding. Neck FLOPs are
counted on the neck alone, fed the backbone's stages of that image.
Training cost comes from the trial: device-seconds (every worker's time, summed) and
training images/s are measured by :mod:`harness.sweep.worker` and :mod:`harness.engine.stage`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from harness.config import DetectorSpec
from harness.core import COST_GFLOPS, COST_LATENCY_MS, COST_NECK_GFLOPS, COST_NECK_PARAMS_M, COST_PARAMS_M, COST_PEAK_MEM_MB

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DetectorCost:
    params: int
    neck_params: int
    flops: float        # per image, whole detector forward at the evaluation size
    neck_flops: float
    image_hw: tuple[int, int]

    def as_metrics(self) -> dict[str, float]:
        """Rows' metric names (``cost/*``), in millions / GFLOPs for readable tables."""
        return {COST_PARAMS_M: self.params / 1e6, COST_NECK_PARAMS_M: self.neck_params / 1e6,
                COST_GFLOPS: self.flops / 1e9, COST_NECK_GFLOPS: self.neck_flops / 1e9}


def evaluation_size(spec: DetectorSpec) -> tuple[int, int]:
    """(H, W) of the largest image the detector's transform feeds it at test time."""
    short = spec.min_sizes[-1]
    return (short, spec.resize_max) if spec.resize_max > short else (short, short)


def _flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def detector_cost(detector: nn.Module, spec: DetectorSpec) -> DetectorCost:
    """Cost of a torchvision-style detector whose ``backbone`` is :class:`harness.modeling.detectors.BackboneWithNeck`."""
    backbone = detector.backbone
    neck = getattr(backbone, backbone.neck_name)
    h, w = evaluation_size(spec)
    device = next(detector.parameters()).device
    # two images, counts halved: a GroupNorm over a 1x1 top level needs more than one value
    images = [torch.rand(3, h, w, device=device) for _ in range(2)]
    was_training = detector.training
    detector.eval()
    try:
        flops = _flops(lambda: detector(images)) / 2
        batch, _ = detector.transform(images)
        stages = backbone.body(batch.tensors)
        neck_flops = _flops(lambda: neck(stages)) / 2
    finally:
        detector.train(was_training)
    return DetectorCost(params=sum(p.numel() for p in detector.parameters()),
                        neck_params=sum(p.numel() for p in neck.parameters()),
                        flops=flops, neck_flops=neck_flops, image_hw=(h, w))


#: Batch-1 forward passes timed for the latency (after :data:`LATENCY_WARMUP` untimed ones).
LATENCY_RUNS = 10
LATENCY_WARMUP = 3


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA ``max_memory_allocated`` on a GPU, peak RSS on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    try:  # VmHWM: getrusage's ru_maxrss carries a forking parent's high-water mark over fork + exec
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kilobytes


def inference_cost(detector: nn.Module, spec: DetectorSpec, device: torch.device, *,
                   autocast: torch.dtype | None = None, runs: int = LATENCY_RUNS,
                   warmup: int = LATENCY_WARMUP) -> dict[str, float]:
    """Median batch-1 latency (ms) at the evaluation size, and the worker's peak memory so far.

    Why the median after warm-up: the first calls pay for cuDNN autotuning and allocator
    growth. On CUDA every timed call is synchronised (kernels are asynchronous), which is
    the only correct way to time a forward pass; the host syncs are outside any training loop.
    ``autocast``: the dtype the run trains and evaluates in under autocast (None: full precision).
    """
    import time
    h, w = evaluation_size(spec)
    # its own generator: timing must not move the run's random stream
    image = [torch.rand(3, h, w, device=device, generator=torch.Generator(device=device).manual_seed(0))]
    dtype = autocast
    was_training = detector.training
    detector.eval()
    times = []
    try:
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            for i in range(warmup + runs):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                detector(image)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                if i >= warmup:
                    times.append(time.perf_counter() - t0)
    except ValueError as exc:
        # A toy size can leave a GroupNorm head one value per group at batch 1 (a 1x1 top level
        # of a 64 px image); real evaluation sizes never do. No latency rather than a failed trial.
        log.warning("batch-1 latency not measured at %dx%d: %s", h, w, exc)
        times = [math.nan]
    finally:
        detector.train(was_training)
    times.sort()
    return {COST_LATENCY_MS: 1000 * times[len(times) // 2], COST_PEAK_MEM_MB: peak_memory_mb(device)}


__all__ = ["DetectorCost", "detector_cost", "evaluation_size", "inference_cost", "peak_memory_mb"]
