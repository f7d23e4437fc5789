"""Ingesting a COCO-train2017-sized dataset: wall time and peak memory of reading the annotations.

The data set is :mod:`benchmarks.coco_scale`'s synthetic train2017 (118,287 images, 860,001
annotations, a ~414 MB instances file, one tiny real JPEG per image), generated once into
``$DETBENCH_BENCH_CACHE`` (default ``~/.cache/detbench/bench``; about a minute and 420 MB the first time).

Each variant of :data:`VARIANTS` runs in a fresh subprocess (``python -m benchmarks.bench_ingest
--memory <variant>``), so its peak RSS is its own: "growth" is ``VmHWM`` minus ``VmRSS`` just before
the call (after the imports), "peak" the process's whole ``VmHWM``. The instances file is read from the
page cache (it was just written or read), so the times are CPU, not disk.

Figures (targets of the ingest issue, #30): ``detbench data check`` and the pre-run check
(<= 60 s), index build, per-rank index memory (<= 300 MB) and open time (<= 2 s), loader
throughput with 1 worker vs 0 (>= 1.6x). Before the compact index (8d70ef9) every rank ran
``load_coco``: 45-46 s and +2,963 MiB per process on this set.

To measure another way of ingesting, add ``name: function(ann_file, image_dir) -> dict`` to
:data:`VARIANTS` (the function runs in the subprocess; its dict is printed as the figure's summary).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

ENV_ANN, ENV_IMAGES = "DETBENCH_INGEST_ANN", "DETBENCH_INGEST_IMAGES"
EPOCHS = 4  # of the loader figure, over its 200 images


def _load_coco(ann: Path, images: Path) -> dict:
    from harness.data import load_coco
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index = load_coco(ann, images, check_images=False)
    return {"images": len(index), "dropped_boxes": getattr(index, "n_dropped_boxes", None)}


def _check_coco(ann: Path, images: Path) -> dict:
    from harness.data import check_coco
    return {k: v for k, v in check_coco(ann, images).items() if not isinstance(v, (list, dict))}


def _index_dir() -> Path:
    from benchmarks.coco_scale import default_root
    return default_root() / "ingest-cache"


def _index_build(ann: Path, images: Path) -> dict:
    """The driver, once per annotation content: parse + validate + save the compact index."""
    import shutil

    from harness.data import cached_index
    shutil.rmtree(_index_dir() / "index", ignore_errors=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        index, folder = cached_index(ann, images, _index_dir())
    size = sum(f.stat().st_size for f in folder.iterdir())
    return {"images": len(index), "index_mb": round(size / 2**20, 1)}


def _index_open(ann: Path, images: Path) -> dict:
    """A rank: open the saved index (memory-mapped) and build every training target once (an epoch's
    worth of index reads): its RSS growth is the per-rank annotation memory."""
    from harness.data.coco import open_index
    folder = next((_index_dir() / "index").iterdir())
    t0 = time.perf_counter()
    index = open_index(folder, images, ann)
    opened = time.perf_counter() - t0
    boxes = sum(len(index.target(i)["boxes"]) for i in range(len(index)))
    return {"open_s": round(opened, 3), "boxes": boxes}


def _prerun_check(ann: Path, images: Path) -> dict:
    """``detbench run``'s pre-run check of a split whose index is cached: content digest + open +
    one lstat and one header read per image, in parallel."""
    from harness.data import cached_index
    from harness.data.coco import check_image_files
    index, _ = cached_index(ann, images, _index_dir())
    return {"images": len(index), "check_s": round(check_image_files(index, level="header"), 1)}


def _photo_set(n: int = 200) -> tuple[Path, Path]:
    """``n`` 640x480 JPEGs at quality 90 with photo-like detail (smooth shapes + sensor noise:
    ~5 ms to decode each, as a COCO photo), and their instances file; made once into the cache."""
    import numpy as np
    from PIL import Image
    root = _index_dir().parent / f"photos-{n}"
    ann = root / "instances.json"
    if ann.is_file():
        return ann, root / "images"
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:480, 0:640]
    images = []
    for i in range(n):
        base = np.stack([np.sin(xx / rng.uniform(8, 60) + rng.uniform(0, 6)) * np.cos(yy / rng.uniform(8, 60))
                         for _ in range(3)], -1)
        pixels = np.clip(127 + 90 * base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{i:06d}.jpg", quality=90)
        images.append({"id": i + 1, "file_name": f"{i:06d}.jpg", "width": 640, "height": 480})
    anns = [{"id": i + 1, "image_id": i + 1, "category_id": 1, "bbox": [10, 10, 100, 80]} for i in range(n)]
    ann.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]}))
    return ann, root / "images"


def _loader(workers: int, twins: bool = False):
    def run(ann: Path, images: Path) -> dict:
        """Images/s of a training loader (batches of 2, 640x480 JPEGs at quality 90) in front of a
        device step as long as the loading itself: the step is a sleep (a GPU computes while the
        process waits), its length the per-batch time of reading the same images in this process,
        measured first (after a warm-up pass). With 0 workers loading and step alternate; with 1
        the worker reads the next batch meanwhile: the ideal ratio is 2."""
        import torch

        from harness.data import CocoDetection, DegradedTwins, load_coco, set_loader_epoch, train_loader
        torch.set_num_threads(1)
        dataset = CocoDetection(load_coco(*_photo_set()))
        if twins:  # FCTL's corrective stage: each image with a degraded twin rendered on the fly
            from methods.fctl import TwinPairs
            dataset = TwinPairs(DegradedTwins(dataset, ["fog@3", "gaussian_noise@3", "clean"], seed=0))
        for _ in train_loader(dataset, 2, seed=0, num_workers=0):  # warm: page cache, decoder set-up
            pass
        t0 = time.perf_counter()
        batches = sum(1 for _ in train_loader(dataset, 2, seed=0, num_workers=0))
        step_s = (time.perf_counter() - t0) / batches
        loader = train_loader(dataset, 2, seed=0, num_workers=workers)
        n, t0 = 0, None
        for epoch in range(EPOCHS):  # persistent workers: started once, timed from the first batch on
            set_loader_epoch(loader, epoch)
            for batch, _ in loader:
                if t0 is None:
                    t0 = time.perf_counter()
                else:
                    n += len(batch)
                time.sleep(step_s)
        return {"images": n, "step_ms": round(step_s * 1e3, 2),
                "images_per_s": round(n / (time.perf_counter() - t0), 1)}
    return run


# variant name -> function run in a fresh subprocess; labels for the printout
VARIANTS = {"load_coco": _load_coco, "check_coco": _check_coco, "index_build": _index_build,
            "index_open": _index_open, "prerun_check": _prerun_check, "loader_0": _loader(0), "loader_1": _loader(1),
            "twins_0": _loader(0, twins=True), "twins_1": _loader(1, twins=True)}
LABELS = {"load_coco": "load_coco(check_images=False): parse + validate the JSON",
          "check_coco": "check_coco = detbench data check (parse + header check of every image)",
          "index_build": "index build (driver, once per annotation content)",
          "index_open": "index open + every target once (per rank)",
          "prerun_check": "pre-run check, index cached (digest + open + header check)",
          "loader_0": "loader + device step, 0 workers (decode in the training process)",
          "loader_1": "loader + device step, 1 worker",
          "twins_0": "FCTL twins loader + device step, 0 workers",
          "twins_1": "FCTL twins loader + device step, 1 worker"}


def measure(variant: str) -> dict:
    """In this (fresh) process: run ``VARIANTS[variant]`` once; wall time and peak RSS."""
    import harness.data  # noqa: F401  imported before the baseline: its import is not the variant's memory
    import torch

    from benchmarks.common import peak_memory, peak_rss_mb, status_mb
    if os.environ.get(ENV_ANN):
        ann, images = Path(os.environ[ENV_ANN]), Path(os.environ[ENV_IMAGES])
    else:
        from benchmarks.coco_scale import ensure_coco_sized
        ann, images = ensure_coco_sized(progress=False)
    out: dict = {"base_rss_mb": status_mb("VmRSS")}

    def run() -> None:
        t0 = time.perf_counter()
        out["summary"] = VARIANTS[variant](ann, images)
        out["wall_s"] = time.perf_counter() - t0

    out.update(peak_memory(torch.device("cpu"), run))
    out["peak_rss_mb"] = peak_rss_mb()
    return out


def main() -> None:
    from benchmarks.coco_scale import ensure_coco_sized
    from benchmarks.common import memory_in_subprocess
    t0 = time.perf_counter()
    ann, images = ensure_coco_sized()
    print(f"data: {ann} ({ann.stat().st_size / 1e6:.0f} MB), images {images} "
          f"(ready in {time.perf_counter() - t0:.1f} s); one fresh process per figure")
    env = dict(os.environ, **{ENV_ANN: str(ann), ENV_IMAGES: str(images)})
    rates = {}
    for variant in VARIANTS:
        try:
            r = memory_in_subprocess("benchmarks.bench_ingest", variant, env=env)
        except subprocess.CalledProcessError as e:
            print(f"  {variant}: FAILED (exit {e.returncode})\n{e.stderr[-3000:]}", flush=True)
            continue
        print(f"  {LABELS.get(variant, variant)}: wall {r['wall_s']:.1f} s, "
              f"peak RSS growth {r['peak_mb']:.0f} MiB, process peak RSS {r['peak_rss_mb']:.0f} MiB "
              f"(base {r['base_rss_mb']:.0f} MiB); {json.dumps(r['summary'])}", flush=True)
        rates[variant] = r["summary"].get("images_per_s")
    for kind in ("loader", "twins"):
        if rates.get(f"{kind}_0") and rates.get(f"{kind}_1"):
            print(f"  {kind} throughput 1 worker / 0 workers: {rates[f'{kind}_1'] / rates[f'{kind}_0']:.2f}x "
                  f"(target >= 1.6; ideal 2)", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        print(json.dumps(measure(sys.argv[2])))
    else:
        main()
