"""Cost of the CFPT neck against torchvision's FPN + P6P7, on the same C3..C5 maps.

The C3, C4, C5 maps a ResNet-18 gives for a 512 x 512 and an 800 x 1333 image (channels 128, 256,
512; sides ceil(H/8), ceil(H/16), ceil(H/32)), batch 1, random values; both necks width 256, train
mode, the module's own parameters only. (a) CFPT (:class:`methods.cfpt.CFPT`, official defaults)
and (b) ``FeaturePyramidNetwork`` + ``LastLevelP6P7``: forward + backward of the sum of the five
outputs, medians, all in one process with the machine's default torch threads.
Memory: peak extra memory of one forward + backward, a fresh subprocess per variant on CPU
(peak RSS growth, large blocks mmapped), ``max_memory_allocated`` growth on CUDA.
Scaling: CFPT's time at 2x the image area (800 x 1333 -> 1131 x 1885) over its time at
800 x 1333; the paper claims linear complexity (target <= 2.3). Also printed: the FLOP ratio
(``torch.utils.flop_counter``, machine-independent) and, on CPU, the ratio of minor page faults
per step: glibc serves blocks over its mmap threshold (at most 32 MiB; one 256-channel stride-8
map is 18 MiB at 800 x 1333, 35 MiB at 1131 x 1885) with fresh pages every step, so on CPU the
larger input also pays for page faults that the algorithm does not cause.
"""
from __future__ import annotations

import json
import math
import os
import resource
import statistics
import sys
import time
from collections import OrderedDict

import torch
from torch.utils.flop_counter import FlopCounterMode
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelP6P7

from benchmarks.common import memory_in_subprocess, peak_memory
from methods.cfpt import CFPT

WIDTH = 256
CHANNELS = (128, 256, 512)          # ResNet-18 C3..C5
IMAGES = {"512x512": (512, 512), "800x1333": (800, 1333)}
DOUBLE = ("800x1333", (1131, 1885))  # 1131 * 1885 / (800 * 1333) = 1.999
RUNS = 3


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def stage_shapes(h: int, w: int) -> list[tuple[int, int]]:
    """C3..C5 sides of a ResNet: every stride-2 stage maps n to ceil(n / 2)."""
    out = []
    for _ in range(5):
        h, w = math.ceil(h / 2), math.ceil(w / 2)
        out.append((h, w))
    return out[2:]


def build(neck: str, device) -> torch.nn.Module:
    torch.manual_seed(0)
    if neck == "cfpt":
        module = CFPT(CHANNELS, WIDTH)
    else:
        module = FeaturePyramidNetwork(list(CHANNELS), WIDTH, extra_blocks=LastLevelP6P7(WIDTH, WIDTH))
    return module.to(device).train()


def inputs(h: int, w: int, device) -> OrderedDict:
    g = torch.Generator().manual_seed(0)
    return OrderedDict((str(i), torch.randn(1, c, *s, generator=g).to(device))
                       for i, (c, s) in enumerate(zip(CHANNELS, stage_shapes(h, w))))


def step(module, x) -> float:
    device = next(module.parameters()).device
    _sync(device)
    t0 = time.perf_counter()
    out = module(x)
    sum(v.sum() for v in out.values()).backward()
    _sync(device)
    module.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def timed(module, x) -> float:
    step(module, x)  # warm-up
    return statistics.median(step(module, x) for _ in range(RUNS))


def flops(module, x) -> int:
    with FlopCounterMode(display=False) as counter:
        step(module, x)
    return counter.get_total_flops()


def page_faults(module, x) -> int:
    """Minor page faults of this process during one step."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step(module, x)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def measure_memory(variant: str) -> dict:
    """Peak extra memory of one forward + backward of ``neck:HxW`` (call in a fresh process on CPU)."""
    neck, size = variant.split(":")
    h, w = map(int, size.split("x"))
    device = _device()
    module, x = build(neck, device), inputs(h, w, device)
    return peak_memory(device, lambda: step(module, x))


def _memory(variant: str) -> dict:
    if _device().type == "cuda":
        return measure_memory(variant)
    return memory_in_subprocess("benchmarks.bench_cfpt", variant,
                                env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})


def main() -> None:
    device = _device()
    necks = {n: build(n, device) for n in ("cfpt", "fpn")}
    params = {n: sum(p.numel() for p in m.parameters()) for n, m in necks.items()}
    print(f"device {device}, {torch.get_num_threads()} threads; ResNet-18 C3..C5 ({'/'.join(map(str, CHANNELS))} ch), "
          f"width {WIDTH}, batch 1, train mode, fwd+bwd median of {RUNS}")
    print(f"parameters: CFPT {params['cfpt'] / 1e6:.3f} M, FPN+P6P7 {params['fpn'] / 1e6:.3f} M "
          f"(ratio {params['cfpt'] / params['fpn']:.2f})")
    times = {}
    for name, (h, w) in IMAGES.items():
        x = inputs(h, w, device)
        t = {n: timed(m, x) for n, m in necks.items()}
        mem = {n: _memory(f"{n}:{h}x{w}") for n in necks}
        times[name] = t
        print(f"{name} (C3 {'x'.join(map(str, stage_shapes(h, w)[0]))}): time CFPT {t['cfpt'] * 1e3:.0f} ms, "
              f"FPN {t['fpn'] * 1e3:.0f} ms, ratio {t['cfpt'] / t['fpn']:.2f}; peak memory ({mem['cfpt']['kind']}) "
              f"CFPT {mem['cfpt']['peak_mb']:.0f} MiB, FPN {mem['fpn']['peak_mb']:.0f} MiB, "
              f"ratio {mem['cfpt']['peak_mb'] / max(mem['fpn']['peak_mb'], 1e-9):.2f}")
    base, (h2, w2) = DOUBLE
    bh, bw = IMAGES[base]
    x1, x2 = inputs(bh, bw, device), inputs(h2, w2, device)
    t2 = {n: timed(m, x2) for n, m in necks.items()}
    area = h2 * w2 / (bh * bw)
    cfpt = necks["cfpt"]
    print(f"{h2}x{w2} ({area:.3f}x the area of {base}): CFPT {t2['cfpt'] * 1e3:.0f} ms, FPN {t2['fpn'] * 1e3:.0f} ms")
    print(f"time ratio at {area:.2f}x area: CFPT {t2['cfpt'] / times[base]['cfpt']:.2f} (target <= 2.3, linear = "
          f"{area:.2f}), FPN {t2['fpn'] / times[base]['fpn']:.2f}")
    f1, f2 = flops(cfpt, x1), flops(cfpt, x2)
    line = f"CFPT FLOPs (fwd+bwd) {f1 / 1e9:.0f} -> {f2 / 1e9:.0f} G, ratio {f2 / f1:.2f}"
    if device.type == "cpu":
        p1, p2 = page_faults(cfpt, x1), page_faults(cfpt, x2)
        line += f"; minor page faults per step {p1} -> {p2}, ratio {p2 / max(p1, 1):.1f}"
    print(line)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(measure_memory(sys.argv[2])))
    else:
        main()
