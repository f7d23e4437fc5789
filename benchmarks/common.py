"""Helpers shared by the benchmarks."""
from __future__ import annotations

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
