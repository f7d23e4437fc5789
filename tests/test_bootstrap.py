"""The fast paired bootstrap equals a brute-force COCOeval of each resampled set (pycocotools)."""
from __future__ import annotations

import numpy as np
import pytest

from harness.evaluate import draw_counts, match_detections, paired_bootstrap
from harness.evaluate.bootstrap import weighted_ap
from harness.evaluate import evaluate_coco


def _dataset(seed: int, n_images: int = 14, n_cats: int = 3):
    """GT with crowd boxes and empty images; detections with distinct scores, some near a GT box."""
    rng = np.random.default_rng(seed)
    images = [{"id": 100 + 7 * i, "width": 200, "height": 150, "file_name": f"{i}.jpg"} for i in range(n_images)]
    cats = [{"id": c + 1, "name": f"c{c}"} for c in range(n_cats)]
    anns, dets = [], []
    for img in images:
        for _ in range(rng.integers(0, 5)):
            x, y = rng.uniform(0, 120), rng.uniform(0, 90)
            w, h = rng.uniform(5, 70), rng.uniform(5, 55)
            cat = int(rng.integers(1, n_cats + 1))
            anns.append({"id": len(anns) + 1, "image_id": img["id"], "category_id": cat, "bbox": [x, y, w, h],
                         "area": w * h, "iscrowd": int(rng.random() < 0.1)})
            if rng.random() < 0.8:  # a detection near the box, sometimes of the wrong class
                j = rng.normal(0, 4, 4)
                dets.append({"image_id": img["id"], "category_id": cat if rng.random() < 0.85 else
                             int(rng.integers(1, n_cats + 1)), "bbox": [x + j[0], y + j[1], w + j[2], h + j[3]]})
        for _ in range(rng.integers(0, 4)):  # background detections
            dets.append({"image_id": img["id"], "category_id": int(rng.integers(1, n_cats + 1)),
                         "bbox": [rng.uniform(0, 150), rng.uniform(0, 100), rng.uniform(4, 40), rng.uniform(4, 40)]})
    scores = rng.permutation(len(dets)) / len(dets) + 1e-3  # distinct
    for d, s in zip(dets, scores):
        d["score"] = float(s)
    return {"images": images, "annotations": anns, "categories": cats}, dets


def _resampled(gt: dict, dets: list[dict], counts: np.ndarray):
    """The brute-force set: each drawn copy of an image is a new image (new ids, copies adjacent)."""
    order = sorted(img["id"] for img in gt["images"])
    k = 1000
    images, anns, out = [], [], []
    by_img = {}
    for a in gt["annotations"]:
        by_img.setdefault(a["image_id"], []).append(a)
    det_by = {}
    for d in dets:
        det_by.setdefault(d["image_id"], []).append(d)
    info = {img["id"]: img for img in gt["images"]}
    for pos, image_id in enumerate(order):
        for c in range(int(counts[pos])):
            new = pos * k + c
            images.append({**info[image_id], "id": new})
            for a in by_img.get(image_id, []):
                anns.append({**a, "id": len(anns) + 1, "image_id": new})
            out += [{**d, "image_id": new} for d in det_by.get(image_id, [])]
    return {"images": images, "annotations": anns, "categories": gt["categories"]}, out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_bootstrap_equals_brute_force_coco_eval(seed):
    gt, dets = _dataset(seed)
    matches = match_detections(gt, dets)
    full = evaluate_coco(gt, dets, backend="pycocotools")
    assert matches.ap()["AP"] == pytest.approx(full["AP"], abs=1e-12)
    assert matches.ap()["AP50"] == pytest.approx(full["AP50"], abs=1e-12)
    counts = draw_counts(len(gt["images"]), 6, np.random.default_rng(seed))
    fast = weighted_ap(matches, counts)
    for b in range(len(counts)):
        brute = evaluate_coco(*_resampled(gt, dets, counts[b]), backend="pycocotools")
        for key in ("AP", "AP50"):
            expected = brute[key]
            assert (np.isnan(expected) and np.isnan(fast[key][b])) or abs(fast[key][b] - expected) < 1e-9, \
                (b, key, fast[key][b], expected)


def test_paired_bootstrap_interval_and_its_mark():
    gt, dets = _dataset(5, n_images=40)
    worse = [{**d, "score": d["score"] * 0.5} if i % 3 == 0 else d for i, d in enumerate(dets)]
    worse = [d for i, d in enumerate(worse) if i % 4]  # drop a quarter: clearly lower AP
    a, b = match_detections(gt, dets), match_detections(gt, worse)
    out = paired_bootstrap([a], [b], resamples=300, seed=0)
    ap = out["AP"]
    assert ap.delta == pytest.approx(a.ap()["AP"] - b.ap()["AP"]) and ap.low <= ap.delta <= ap.high
    assert ap.excludes_zero and ap.low > 0
    same = paired_bootstrap([a], [a], resamples=50, seed=0)["AP"]   # paired: identical sides, zero width
    assert same.low == same.high == same.delta == 0 and not same.excludes_zero
    again = paired_bootstrap([a], [b], resamples=300, seed=0)["AP"]  # seeded
    assert (again.low, again.high) == (ap.low, ap.high)
