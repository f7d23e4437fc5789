"""Per-class AP (reference backend) and the TIDE-style error breakdown."""
from __future__ import annotations

import math

import numpy as np
import pytest

from harness.evaluate import evaluate_coco
from harness.evaluate import ERROR_TYPES, error_breakdown, per_class_ap

CAT, DOG, BIRD = 1, 2, 3
FAR = [300, 300, 10, 10]   # overlaps nothing


def _gt(boxes, n_images: int = 1, crowd=()) -> dict:
    """``boxes``: (image_id, category_id, xywh); ``crowd``: the same, as iscrowd regions."""
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": list(map(float, b)),
             "area": float(b[2] * b[3]), "iscrowd": int(i >= len(boxes))}
            for i, (im, c, b) in enumerate([*boxes, *crowd])]
    return {"images": [{"id": i, "width": 400, "height": 400} for i in range(1, n_images + 1)],
            "annotations": anns,
            "categories": [{"id": CAT, "name": "cat"}, {"id": DOG, "name": "dog"},
                           {"id": BIRD, "name": "bird"}]}


def _det(cat, box, score, image_id=1) -> dict:
    return {"image_id": image_id, "category_id": cat, "bbox": list(map(float, box)), "score": score}


def _ap50(gt, dets) -> float:
    return evaluate_coco(gt, dets, backend="pycocotools")["AP50"]


G1, G2 = [0, 0, 10, 10], [100, 0, 10, 10]
NEAR_G2 = [105, 0, 10, 10]    # IoU 1/3 with G2: localisation range
ON_G1 = [1, 0, 10, 10]        # IoU 9/11 with G1: a duplicate's box
TWO_CATS = _gt([(1, CAT, G1), (1, CAT, G2)])
CAT_DOG = _gt([(1, CAT, G1), (1, DOG, G2)])
P = 2 / 3
# error type -> (gt, detections, the detections with that error fixed by hand,
#                base AP50, fixed AP50), all hand-computed (101 recall points).
CASES = {
    "cls": (CAT_DOG, [_det(CAT, G2, .9), _det(CAT, G1, .8)],
            [_det(DOG, G2, .9), _det(CAT, G1, .8)], (.5 + 0) / 2, 1.0),
    "loc": (TWO_CATS, [_det(CAT, NEAR_G2, .9), _det(CAT, G1, .8)],
            [_det(CAT, G2, .9), _det(CAT, G1, .8)], 51 * .5 / 101, 1.0),
    "both": (CAT_DOG, [_det(CAT, NEAR_G2, .9), _det(CAT, G1, .8), _det(DOG, G2, .7)],
             [_det(CAT, G1, .8), _det(DOG, G2, .7)], (.5 + 1) / 2, 1.0),
    "dupe": (TWO_CATS, [_det(CAT, G1, .9), _det(CAT, ON_G1, .8), _det(CAT, G2, .7)],
             [_det(CAT, G1, .9), _det(CAT, G2, .7)], (51 + 50 * P) / 101, 1.0),
    "bkg": (TWO_CATS, [_det(CAT, FAR, .9), _det(CAT, G1, .8), _det(CAT, G2, .7)],
            [_det(CAT, G1, .8), _det(CAT, G2, .7)], P, 1.0),
    "miss": (TWO_CATS, [_det(CAT, G1, .9)], None, 51 / 101, 1.0),
}


@pytest.mark.parametrize("kind", list(CASES))
def test_each_error_type_alone(kind):
    gt, dets, fixed_dets, base, fixed = CASES[kind]
    out = error_breakdown(gt, dets)
    assert out.counts == {k: int(k == kind) for k in ERROR_TYPES}
    assert out.ap50 == pytest.approx(base, abs=1e-12)
    assert out.ap50 == pytest.approx(_ap50(gt, dets), abs=1e-12)
    assert out.delta[kind] == pytest.approx(fixed - base, abs=1e-12)
    assert all(out.delta[k] == 0 for k in ERROR_TYPES if k != kind)
    if fixed_dets is not None:   # the oracle is the hand fix, scored by pycocotools
        assert out.ap50 + out.delta[kind] == pytest.approx(_ap50(gt, fixed_dets), abs=1e-12)


def test_localisation_wins_over_classification_as_in_tide():
    """Same-class IoU 1/3, other-class IoU 1: TIDE's code checks Loc before Cls."""
    gt = _gt([(1, CAT, G2), (1, DOG, NEAR_G2)])
    out = error_breakdown(gt, [_det(CAT, NEAR_G2, .9), _det(DOG, NEAR_G2, .8)])
    assert out.counts["loc"] == 1 and out.counts["cls"] == 0


def test_only_the_best_error_per_gt_is_fixed():
    """Two loc errors on one unmatched GT: the higher-scoring becomes a TP, the other goes."""
    dets = [_det(CAT, NEAR_G2, .9), _det(CAT, [95, 0, 10, 10], .85), _det(CAT, G1, .8)]
    out = error_breakdown(TWO_CATS, dets)
    assert out.counts == {k: 2 * (k == "loc") for k in ERROR_TYPES}
    assert out.ap50 + out.delta["loc"] == pytest.approx(1.0)   # TP .9, TP .8; .85 suppressed


def test_a_fix_never_matches_a_gt_twice():
    """A loc error on an already matched GT is suppressed by the fix, not made a TP."""
    out = error_breakdown(TWO_CATS, [_det(CAT, G1, .9), _det(CAT, [5, 0, 10, 10], .8)])
    assert out.counts == {k: int(k in ("loc", "miss")) for k in ERROR_TYPES}
    assert out.ap50 == pytest.approx(51 / 101) and out.delta["loc"] == 0.0


def test_equal_iou_goes_to_the_last_gt_like_cocoeval():
    """IoU 9/11 with both GTs: COCOeval takes the later one, which frees the first for .8."""
    gt = _gt([(1, CAT, [0, 0, 10, 10]), (1, CAT, [2, 0, 10, 10])])
    dets = [_det(CAT, [1, 0, 10, 10], .9), _det(CAT, [-3, 0, 10, 10], .8)]  # .8: IoU 7/13, 1/3
    assert error_breakdown(gt, dets).ap50 == pytest.approx(_ap50(gt, dets)) == pytest.approx(1.0)


def test_perfect_and_empty_detectors():
    gt = _gt([(1, CAT, G1), (1, DOG, G2), (2, BIRD, G1)], n_images=2)
    perfect = [_det(a["category_id"], a["bbox"], 1.0, a["image_id"]) for a in gt["annotations"]]
    out = error_breakdown(gt, perfect)
    assert out.ap50 == pytest.approx(1.0, abs=1e-12)   # COCOeval adds eps to the denominator
    assert out.delta == dict.fromkeys(ERROR_TYPES, 0.0)
    assert out.counts == dict.fromkeys(ERROR_TYPES, 0)
    empty = error_breakdown(gt, [])
    assert empty.ap50 == 0.0 and empty.delta["miss"] == 1.0
    assert empty.counts == {k: 3 * (k == "miss") for k in ERROR_TYPES}


def _random_case(seed: int = 0, n_images: int = 30, crowd: bool = False):
    """Jittered GT copies (some relabelled, some duplicated), background boxes, tied scores."""
    rng = np.random.default_rng(seed)
    boxes, crowds, dets = [], [], []
    for image_id in range(1, n_images + 1):
        for _ in range(rng.integers(0, 6)):
            x, y, w, h = rng.uniform(0, 300, 2).tolist() + rng.uniform(8, 90, 2).tolist()
            boxes.append((image_id, int(rng.integers(1, 4)), [x, y, w, h]))
        if crowd and rng.random() < 0.3:
            crowds.append((image_id, int(rng.integers(1, 4)), rng.uniform(0, 200, 4).tolist()))
    for image_id, cat, (x, y, w, h) in boxes:
        for _ in range(rng.integers(0, 4)):   # 0: missed; 2-3: duplicates
            jx, jy, sw, sh = rng.normal(0, 0.15, 4)
            label = cat if rng.random() < 0.8 else int(rng.integers(1, 4))
            dets.append(_det(label, [x + jx * w, y + jy * h, w * np.exp(sw), h * np.exp(sh)],
                             round(float(rng.random()), 1), image_id))
    for _ in range(3 * n_images):
        dets.append(_det(int(rng.integers(1, 4)), rng.uniform(0, 300, 4).tolist(),
                         round(float(rng.random()), 1), int(rng.integers(1, n_images + 1))))
    return _gt(boxes, n_images, crowds), dets


@pytest.mark.parametrize("crowd", [False, True])
def test_base_ap50_is_pycocotools_ap50(crowd):
    gt, dets = _random_case(seed=1, crowd=crowd)
    out = error_breakdown(gt, dets)
    assert out.ap50 == pytest.approx(_ap50(gt, dets), abs=1e-9)
    assert 0 < out.ap50 < 1 and all(0 <= v <= 1 - out.ap50 + 1e-12 for v in out.delta.values())
    assert all(out.counts[k] > 0 for k in ERROR_TYPES), out.counts


def test_max_dets_cap_is_per_image_and_class_like_cocoeval():
    gt, dets = _random_case(seed=2)
    capped = evaluate_coco(gt, dets, backend="pycocotools", max_dets=2)["AP50"]
    assert error_breakdown(gt, dets, max_dets=2).ap50 == pytest.approx(capped, abs=1e-9)


def test_per_class_ap_hand_checked():
    gt = _gt([(1, CAT, G1), (1, CAT, G2), (1, DOG, [0, 50, 10, 10])],
             crowd=[(1, BIRD, [0, 100, 50, 50])])
    dets = [_det(CAT, G1, .9), _det(CAT, FAR, .8), _det(CAT, G2, .7),
            _det(DOG, [0, 50, 10, 5.8], .9),   # IoU .58: a TP at IoU .50 and .55 only
            _det(BIRD, [0, 100, 50, 50], .9)]
    rows = {r.category_id: r for r in per_class_ap(gt, dets)}
    assert [r.name for r in rows.values()] == ["cat", "dog", "bird"]
    assert rows[CAT].ap == pytest.approx((51 + 50 * P) / 101) == rows[CAT].ap50
    assert (rows[CAT].n_gt, rows[CAT].n_det) == (2, 3)
    assert (rows[DOG].ap, rows[DOG].ap50) == (pytest.approx(0.2), pytest.approx(1.0))
    assert math.isnan(rows[BIRD].ap) and math.isnan(rows[BIRD].ap50)   # crowd GT only
    assert (rows[BIRD].n_gt, rows[BIRD].n_det) == (0, 1)


@pytest.mark.parametrize("backend", ["faster_coco_eval", "pycocotools"])
def test_mean_of_per_class_ap_is_headline_ap(backend):
    gt, dets = _random_case(seed=3)
    rows = per_class_ap(gt, dets, backend=backend)
    headline = evaluate_coco(gt, dets, backend=backend)
    with_gt = [r for r in rows if r.n_gt > 0]
    assert len(with_gt) == 3
    assert np.mean([r.ap for r in with_gt]) == pytest.approx(headline["AP"], abs=1e-9)
    assert np.mean([r.ap50 for r in with_gt]) == pytest.approx(headline["AP50"], abs=1e-9)
