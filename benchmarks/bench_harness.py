"""Harness overhead and evaluation backends (issue: foundation).

(a) Per-step training time of the harness path (Ray Train, 1 worker, with its
    per-epoch report + checkpoint) divided by the same training loop in one plain
    process, on the same model, data and batch: the median step (``time/step_s``) of
    the epochs after the first, loading included. Target <= 1.10; <= 1.05 with a
    loader worker on torchvision's R50-FPN v1 preset. The per-epoch report and
    checkpoint is shown apart, with its share of a COCO epoch: a toy epoch of a few
    steps would charge one epoch's checkpoint to each handful of steps.
(b) COCO evaluation time, pycocotools / faster-coco-eval, on a generated
    2,000-image set in real COCO format.
"""
from __future__ import annotations

import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

EPOCHS, IMAGES, BATCH = 4, 64, 8


#: (detector, epochs, images, batch) of the small model and of torchvision's R50-FPN v1 recipe
#: (800/1333 keep-ratio; ~23 s a step on one AVX-512 CPU thread: 6 timed steps a side).
SMALL = ({"fpn_width": 64, "image_size": 128}, EPOCHS, IMAGES, BATCH)
PRESET = ({"preset": "torchvision_v1", "backbone": "resnet50"}, 2, 12, 2)

#: Steps of one COCO train2017 epoch per rank in torchvision's recipe (118,287 images, 8 GPUs x 2).
COCO_STEPS = 118_287 // 16


def _cell(dataset, loader_workers: int = 0, setup=SMALL):
    from harness.config import DetectorSpec, ScheduleSpec
    from harness.plan import Cell
    detector, epochs, _, batch = setup
    return Cell(cell_id="faster_rcnn/bench/seed0", method="faster_rcnn", label="faster_rcnn", variant="",
                stages=("train",), method_config={}, detector=DetectorSpec(**detector),
                arch="faster_rcnn", schedule=ScheduleSpec(epochs=epochs, batch_size=batch, eval_every=1000,
                                                          warmup_iters=5, loader_workers=loader_workers),
                dataset=dataset, seed=0)


def _per_step(history: list[dict]) -> float:
    """The median of the epochs' median step times, the first (warm-up) epoch excluded."""
    return statistics.median(h["time/step_s"] for h in history[1:])


def _report_s(history: list[dict]) -> float:
    """Seconds of one epoch's report and checkpoint (the last epoch's keeps only the detector)."""
    return statistics.median(h["time/report_s"] for h in history[:-1])


def bench_overhead(tmp: Path, loader_workers: int = 0, setup=SMALL) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from harness.data import PreparedDataset, write_synthetic_coco
    from harness.engine import run_stage
    from harness.plan import stage_job
    from harness.sweep import init_ray, train_worker

    images, batch = setup[2], setup[3]
    tr = write_synthetic_coco(tmp / "train", n_images=images, seed=0)
    va = write_synthetic_coco(tmp / "val", n_images=2 if setup is PRESET else 8, seed=1)
    cell = _cell(PreparedDataset("bench", str(tr), str(tr.parent), str(va), str(va.parent)), loader_workers, setup)
    cfg = {"cell": cell.to_dict(), "stages": ["train"], "threads": 1}
    steps = images // batch

    torch.set_num_threads(1)
    plain, _ = run_stage(stage_job(cell, "train"), device=torch.device("cpu"))
    t_plain = _per_step(plain.history)

    init_ray(None)
    result = TorchTrainer(train_worker, train_loop_config=cfg,
                          scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1 + loader_workers}),
                          run_config=RunConfig(name=f"bench{loader_workers}", storage_path=str(tmp / "ray"))).fit()
    ray.shutdown()
    history = result.return_value["train"].history
    t_ray, report = _per_step(history), _report_s(history)
    what = "R50-FPN torchvision_v1 preset, 800/1333" if setup is PRESET else "r18/FPN64/128px"
    target = "1.05" if setup is PRESET and loader_workers else "1.10"
    print(f"(a) median step, faster_rcnn {what}, batch {batch}, 1 thread, {loader_workers} loader worker(s), "
          f"{steps} steps/epoch:")
    print(f"    plain process        {t_plain * 1000:8.1f} ms/step")
    print(f"    harness (Ray Train)  {t_ray * 1000:8.1f} ms/step")
    print(f"    ratio harness/plain  {t_ray / t_plain:8.3f}   (target <= {target})")
    print(f"    report+checkpoint    {report:8.2f} s/epoch: +{report / steps * 1000:.0f} ms/step over this "
          f"{steps}-step epoch, +{report / COCO_STEPS * 1000:.2f} ms/step over a COCO epoch ({COCO_STEPS} steps)")


def bench_eval(tmp: Path, n_images: int = 2000) -> None:
    from harness.data import load_coco, write_synthetic_coco
    from harness.evaluate import evaluate_coco

    ann = write_synthetic_coco(tmp / "eval", n_images=n_images, seed=3, max_objects=6)
    gt = load_coco(ann, ann.parent, check_images=False).gt_for_eval()
    rng = random.Random(0)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(3):  # jittered true positives of decreasing quality
            j = lambda v: v + rng.uniform(-0.15, 0.15) * max(w, h)  # noqa: E731
            dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                         "bbox": [j(x), j(y), w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)],
                         "score": rng.random()})
    cats = [c["id"] for c in gt["categories"]]
    for im in gt["images"]:
        for _ in range(10):  # false positives
            dets.append({"image_id": im["id"], "category_id": rng.choice(cats),
                         "bbox": [rng.uniform(0, 100), rng.uniform(0, 100), rng.uniform(5, 40), rng.uniform(5, 40)],
                         "score": rng.random() * 0.5})
    times = {}
    for backend in ("pycocotools", "faster_coco_eval"):
        t0 = time.perf_counter()
        res = evaluate_coco(gt, dets, backend=backend)
        times[backend] = time.perf_counter() - t0
        print(f"(b) {backend:17s} {times[backend]:6.2f} s  AP={res['AP']:.4f}")
    print(f"    {n_images} images, {len(dets)} detections; pycocotools / faster-coco-eval = "
          f"{times['pycocotools'] / times['faster_coco_eval']:.2f}x")


def main() -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    with tempfile.TemporaryDirectory() as d:
        bench_overhead(Path(d) / "w0")
        bench_overhead(Path(d) / "w1", loader_workers=1)  # images decoded in a loader process
        bench_overhead(Path(d) / "v1", loader_workers=1, setup=PRESET)
        bench_eval(Path(d))


if __name__ == "__main__":
    main()
