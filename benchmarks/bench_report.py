"""The paired bootstrap of ΔAP at COCO-val size (issue: publishable leaderboards).

A generated set of COCO val's shape: 5,000 images, 80 categories, ~7 GT boxes and
100 detections per image, two "methods" (the second's scores perturbed). Measured
in this one run:

(a) matching once (pycocotools ``evaluateImg``, both methods);
(b) 1,000 paired resamples of the fast bootstrap (target <= 60 s on this 2-core machine);
(c) the brute-force bootstrap: a full COCOeval (faster-coco-eval, the project's
    default backend, same AP as pycocotools) of 10 resampled sets with the drawn copies
    as new images, per method; its cost per resample extrapolated to 1,000, and the
    speed-up of (b) over it.
"""
from __future__ import annotations

import time

import numpy as np

IMAGES, CATEGORIES, DETS_PER_IMAGE, RESAMPLES, BRUTE = 5000, 80, 100, 1000, 10


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
    from harness.evaluate.coco import evaluate_coco
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


def main() -> None:
    from harness.evaluate.bootstrap import draw_counts, match_detections, paired_bootstrap
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


if __name__ == "__main__":
    main()
