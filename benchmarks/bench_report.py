"""The paired bootstrap of ΔAP at COCO-val size (issue: publishable leaderboards).

A generated set of COCO val's shape: 5,000 images, 80 categories, ~7 GT boxes and
100 detections per image, two "methods" (the second's scores perturbed). Measured
in this one run:

(a) matching once (pycocotools ``evaluateImg``, both methods);
(b) 1,000 paired resamples of the fast bootstrap (target <= 60 s on this 2-core machine);
(c) the brute-force bootstrap: a full COCOeval (faster-coco-eval, the project's
    default backend, same AP as pycocotools) of 10 resampled sets with the drawn copies
    as new images, per method; its cost per resample extrapolated to 1,000, and the
    speed-up of (b) over it;
(d) every table, plot and ``report.html`` of a run of 1,000 trials (25 methods x 2 datasets x
    4 conditions... x 20 seeds, per-epoch curves and cost rows: ~90 rows per trial), read from
    the store and written (target <= 30 s). No detections are kept in it: their cost is (a)-(c).
"""
from __future__ import annotations

import time

import numpy as np
from harness.core import COST_DEVICE_S, COST_GFLOPS, COST_LATENCY_MS, COST_PARAMS_M, COST_PEAK_MEM_MB, COST_TRAIN_IMAGES_PER_S

IMAGES, CATEGORIES, DETS_PER_IMAGE, RESAMPLES, BRUTE = 5000, 80, 100, 1000, 10
METHODS, DATASETS, SEEDS = 25, 2, 20  # 1,000 trials


def generated_set(seed: int = 0):
    rng = np.random.default_rng(seed)
    images = [{"id": i + 1, "width": 640, "height": 480, "file_name": f"{i}.jpg"} for i in range(IMAGES)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(CATEGORIES)]
    anns, dets_a = [], []
    for img in images:
        n = int(rng.integers(1, 14))
        xy = rng.uniform(0, 500, (n, 2))
        wh = rng.uniform(8, 140, (n, 2))
        cls = rng.integers(1, CATEGORIES + 1, n)
        for k in range(n):
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": int(cls[k]),
                         "bbox": [*xy[k], *wh[k]], "area": float(wh[k, 0] * wh[k, 1]), "iscrowd": 0})
        near = min(n * 3, DETS_PER_IMAGE)
        src = rng.integers(0, n, near)
        jitter = rng.normal(0, 6, (near, 4))
        boxes = np.concatenate([np.c_[xy[src], wh[src]] + jitter,
                                np.c_[rng.uniform(0, 560, (DETS_PER_IMAGE - near, 2)),
                                      rng.uniform(8, 120, (DETS_PER_IMAGE - near, 2))]])
        labels = np.concatenate([np.where(rng.random(near) < 0.7, cls[src], rng.integers(1, CATEGORIES + 1, near)),
                                 rng.integers(1, CATEGORIES + 1, DETS_PER_IMAGE - near)])
        scores = np.concatenate([rng.beta(4, 2, near), rng.beta(1.5, 5, DETS_PER_IMAGE - near)])
        boxes[:, 2:] = np.maximum(boxes[:, 2:], 1.0)
        for b, lab, s in zip(boxes.tolist(), labels.tolist(), scores.tolist()):
            dets_a.append({"image_id": img["id"], "category_id": lab, "bbox": b, "score": s})
    noise = rng.normal(0, 0.08, len(dets_a))
    dets_b = [{**d, "score": float(min(max(d["score"] + e, 1e-4), 1.0))} for d, e in zip(dets_a, noise)]
    return {"images": images, "annotations": anns, "categories": cats}, dets_a, dets_b


def _brute(gt, dets, counts) -> float:
    """One brute-force resample: a full COCOeval of the resampled set (copies as new images)."""
    from harness.evaluate import evaluate_coco
    by_img, det_by = {}, {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    for d in dets:
        det_by.setdefault(d["image_id"], []).append(d)
    images, anns, out = [], [], []
    for pos, img in enumerate(sorted(gt["images"], key=lambda x: x["id"])):
        for c in range(int(counts[pos])):
            new = pos * 1000 + c
            images.append({**img, "id": new})
            for a in by_img.get(img["id"], []):
                anns.append({**a, "id": len(anns) + 1, "image_id": new})
            out += [{**d, "image_id": new} for d in det_by.get(img["id"], [])]
    return evaluate_coco({"images": images, "annotations": anns, "categories": gt["categories"]}, out)["AP"]


def bootstrap_bench() -> None:
    from harness.evaluate import draw_counts, match_detections, paired_bootstrap
    t0 = time.perf_counter()
    gt, dets_a, dets_b = generated_set()
    print(f"generated {IMAGES} images, {len(gt['annotations'])} GT boxes, {len(dets_a)} detections per method "
          f"({time.perf_counter() - t0:.0f} s)")
    t0 = time.perf_counter()
    a, b = match_detections(gt, dets_a), match_detections(gt, dets_b)
    match_s = time.perf_counter() - t0
    print(f"(a) matching once, both methods: {match_s:.1f} s")
    t0 = time.perf_counter()
    out = paired_bootstrap([a], [b], resamples=RESAMPLES, seed=0)
    fast_s = time.perf_counter() - t0
    ap = out["AP"]
    print(f"(b) fast paired bootstrap, {RESAMPLES} resamples: {fast_s:.1f} s (target <= 60 s); "
          f"ΔAP {100 * ap.delta:+.2f} [{100 * ap.low:+.2f}, {100 * ap.high:+.2f}]")
    counts = draw_counts(IMAGES, BRUTE, np.random.default_rng(1))
    t0 = time.perf_counter()
    for row in counts:
        _brute(gt, dets_a, row), _brute(gt, dets_b, row)
    brute_s = (time.perf_counter() - t0) / BRUTE
    print(f"(c) brute force: {brute_s:.1f} s per paired resample -> {brute_s * RESAMPLES / 60:.0f} min for "
          f"{RESAMPLES}; the fast bootstrap is {brute_s * RESAMPLES / fast_s:.0f}x faster "
          f"({brute_s * RESAMPLES / (fast_s + match_s):.0f}x counting the matching)")


def thousand_trial_run(root) -> object:
    """A run directory with 1,000 trials' rows (written as trials write them) and its manifest."""
    import math

    from harness.results import ResultRow, ResultStore
    from harness.storage import open_storage
    storage = open_storage(root)
    store = ResultStore(storage)
    rng = np.random.default_rng(0)
    conds = [("clean", 0), ("fog", 3), ("gaussian_noise", 2), ("motion_blur", 4)]
    for m in range(METHODS):
        for d in range(DATASETS):
            for seed in range(SEEDS):
                tid = f"t{m:02d}{d}{seed:02d}"
                common = dict(run_id="bench", suite="bench", trial_id=tid, cell=f"m{m}/d{d}/{seed}", method=f"m{m}",
                              stage="train", dataset=f"d{d}", seed=seed, config_hash=f"h{m}{d}", config_json="{}",
                              detector="RetinaNet R50-FPN", wall_s=100.0, status="ok")
                rows = [ResultRow(**common, condition=c, severity=s, metric=k,
                                  value=float(rng.uniform(0.2, 0.5)) if k != "APs" else math.nan)
                        for c, s in conds for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")]
                rows += [ResultRow(**common, metric=k, value=float(rng.uniform(1, 100)))
                         for k in (COST_GFLOPS, COST_LATENCY_MS, COST_PARAMS_M, COST_DEVICE_S,
                                   COST_PEAK_MEM_MB, COST_TRAIN_IMAGES_PER_S)]
                rows += [ResultRow(**common, epoch=e, split=sp, metric=k, value=float(rng.uniform(0, 1)))
                         for e in range(1, 13) for k, sp in (("train/loss", "train"), ("val/AP", "val"),
                                                             ("lr", "train"), ("time/epoch_s", "train"))]
                store.write_trial(tid, rows)
    storage.write_json("manifest.json", {"baselines": {f"m{m}": "m0" for m in range(1, METHODS)}})
    return storage


def report_bench() -> None:
    import tempfile

    from harness.report import write_run_outputs
    with tempfile.TemporaryDirectory(prefix="bench-report-") as tmp:
        t0 = time.perf_counter()
        storage = thousand_trial_run(tmp)
        print(f"(d) generated a run of {METHODS * DATASETS * SEEDS} trials ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        out = write_run_outputs(storage)
        took = time.perf_counter() - t0
        print(f"(d) every table, plot and report.html of the 1,000-trial run: {took:.1f} s (target <= 30 s); "
              f"{len(out.written)} files, report.html {len(storage.read_bytes('report.html')) / 1e6:.1f} MB")


def main() -> None:
    report_bench()
    bootstrap_bench()


if __name__ == "__main__":
    main()
