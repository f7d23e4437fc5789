"""Corruption rendering throughput per family and the render cache's speed-up.

~20 synthetic 128 px images (harness.data.synthetic); every corruption at
severity 3 rendered through ``render_condition`` (decode + corrupt + PNG
encode + checksum + journal), then the same calls again (cache hits, with
and without sha256 verification).  Corruption functions are warmed up first
(imports, numba JIT) so the figures are steady-state throughput.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

N_IMAGES, SIZE, SEVERITY = 20, 128, 3


def main() -> None:
    from harness.data import (CORRUPTIONS, FAMILIES, Condition, corrupt, load_coco, render_condition,
                              write_synthetic_coco)

    with tempfile.TemporaryDirectory() as tmp:
        ann = write_synthetic_coco(Path(tmp) / "src", n_images=N_IMAGES, seed=0, image_size=SIZE)
        index = load_coco(ann, ann.parent)
        warm = np.zeros((SIZE, SIZE, 3), np.uint8)
        for name in CORRUPTIONS:
            corrupt(warm, name, SEVERITY, 0)
        cache = Path(tmp) / "cache"
        fresh, hit, hit_nv = {}, {}, {}
        for name in CORRUPTIONS:
            cond = Condition(name, SEVERITY)
            t0 = time.perf_counter()
            render_condition(index, cond, cache)
            t1 = time.perf_counter()
            render_condition(index, cond, cache)
            t2 = time.perf_counter()
            render_condition(index, cond, cache, verify=False)
            t3 = time.perf_counter()
            fresh[name], hit[name], hit_nv[name] = t1 - t0, t2 - t1, t3 - t2

    print(f"{N_IMAGES} synthetic {SIZE}x{SIZE} images, severity {SEVERITY}, 1 process")
    print(f"{'family':<10} {'corruptions':>11} {'images/s':>9}   slowest")
    for fam in FAMILIES:
        names = [n for n, c in CORRUPTIONS.items() if c.family == fam]
        t = sum(fresh[n] for n in names)
        slow = max(names, key=fresh.get)
        print(f"{fam:<10} {len(names):>11} {N_IMAGES * len(names) / t:>9.1f}   "
              f"{slow} {N_IMAGES / fresh[slow]:.1f} img/s")
    total, total_hit, total_nv = sum(fresh.values()), sum(hit.values()), sum(hit_nv.values())
    n = N_IMAGES * len(CORRUPTIONS)
    print(f"all 21     {'':>11} {n / total:>9.1f}")
    print(f"cache hit (sha256 verified): {n / total_hit:.0f} images/s, "
          f"speed-up x{total / total_hit:.1f} over rendering afresh")
    print(f"cache hit (verify=False):    {n / total_nv:.0f} images/s, "
          f"speed-up x{total / total_nv:.1f}")


if __name__ == "__main__":
    main()
