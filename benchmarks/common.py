"""Helpers shared by the benchmarks."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import torch


def random_detection_batch(batch: int, size: int, classes: int, *, seed: int = 0,
                           device: torch.device | str = "cpu") -> tuple[list, list]:
    """``batch`` random images with 1-4 random boxes each (labels 1..classes), deterministic by seed."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, size, size, generator=g) for _ in range(batch)]
    targets = []
    for _ in range(batch):
        n = int(torch.randint(1, 5, (1,), generator=g))
        xy = torch.rand(n, 2, generator=g) * size * 0.7
        wh = 8 + torch.rand(n, 2, generator=g) * size * 0.3
        targets.append({"boxes": torch.cat([xy, (xy + wh).clamp(max=size)], 1).to(device),
                        "labels": torch.randint(1, classes + 1, (n,), generator=g).to(device)})
    return [im.to(device) for im in images], targets


def status_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, MiB, from /proc/self/status."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak RSS of this process's own address space.

    ``VmHWM``, not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark over
    fork + exec into ``ru_maxrss``, so a subprocess of a big parent would report the parent's peak.
    """
    hwm = status_mb("VmHWM")
    return hwm if hwm == hwm else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def peak_memory(device: torch.device, run) -> dict:
    """Peak extra memory while ``run()`` executes: on CUDA ``max_memory_allocated`` growth, on CPU
    the growth of this process's peak RSS (call in a fresh process, see :func:`memory_in_subprocess`)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = status_mb("VmRSS")
    run()
    if device.type == "cuda":
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20, "kind": "cuda max_memory_allocated"}
    return {"peak_mb": peak_rss_mb() - base, "kind": "peak RSS growth"}


def memory_in_subprocess(module: str, variant: str, env: dict | None = None) -> dict:
    """Run ``python -m module --memory variant`` (which prints :func:`peak_memory`'s dict as JSON last)."""
    out = subprocess.run([sys.executable, "-m", module, "--memory", variant], capture_output=True, text=True,
                         check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])
