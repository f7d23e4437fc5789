"""evaluate_coco must give pycocotools' numbers, whatever the backend."""
from __future__ import annotations

import copy
import json
import math
import random

import pytest

from harness.core import DataError
from harness.evaluate import coco_detections_from_outputs, evaluate_coco
from harness.evaluate.coco import METRIC_KEYS


def _gt() -> dict:
    """4 images, categories 3 and 17, small/medium/large boxes, one crowd."""
    boxes = [  # image_id, category_id, xywh, iscrowd
        (1, 3, [10, 10, 20, 20], 0), (1, 17, [50, 60, 60, 40], 0),
        (1, 3, [200, 150, 150, 120], 0), (2, 17, [5, 5, 16, 24], 0),
        (2, 17, [100, 100, 120, 110], 0), (2, 3, [30, 200, 50, 50], 1),
        (3, 3, [40, 40, 70, 70], 0), (3, 3, [150, 20, 25, 30], 0),
        (4, 17, [0, 0, 300, 220], 0), (4, 3, [310, 230, 12, 9], 0),
    ]
    anns = [{"id": i + 1, "image_id": im, "category_id": c, "bbox": b,
             "area": float(b[2] * b[3]), "iscrowd": crowd}
            for i, (im, c, b, crowd) in enumerate(boxes)]
    return {"images": [{"id": i, "width": 400, "height": 300, "file_name": f"{i}.jpg"}
                       for i in range(1, 5)],
            "annotations": anns,
            "categories": [{"id": 3, "name": "cat"}, {"id": 17, "name": "dog"}]}


def _random_dets(gt: dict, seed: int = 0) -> list[dict]:
    """Jittered GT copies, wrong-class copies and pure false positives."""
    rng = random.Random(seed)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        for _ in range(rng.randint(1, 3)):
            j = [x + rng.uniform(-0.3, 0.3) * w, y + rng.uniform(-0.3, 0.3) * h,
                 w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3)]
            cat = a["category_id"] if rng.random() < 0.8 else rng.choice([3, 17])
            dets.append({"image_id": a["image_id"], "category_id": cat, "bbox": j,
                         "score": rng.random()})
    for _ in range(15):
        dets.append({"image_id": rng.randint(1, 4), "category_id": rng.choice([3, 17]),
                     "bbox": [rng.uniform(0, 300), rng.uniform(0, 200),
                              rng.uniform(4, 120), rng.uniform(4, 120)],
                     "score": rng.random()})
    return dets


def _assert_close(a: dict, b: dict, tol: float = 1e-6) -> None:
    assert set(a) == set(b) == set(METRIC_KEYS)
    for k in METRIC_KEYS:
        if math.isnan(b[k]):
            assert math.isnan(a[k]), k
        else:
            assert abs(a[k] - b[k]) <= tol, (k, a[k], b[k])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_backends_agree(seed):
    gt = _gt()
    dets = _random_dets(gt, seed)
    fast = evaluate_coco(gt, dets)
    ref = evaluate_coco(gt, dets, backend="pycocotools")
    _assert_close(fast, ref)
    assert 0.0 < ref["AP"] < 1.0
    _assert_close(evaluate_coco(gt, dets, max_dets=2),
                  evaluate_coco(gt, dets, backend="pycocotools", max_dets=2))
    assert all(0.0 <= v <= 1.0 for v in ref.values())


def test_matches_pycocotools_summarize():
    """Our reduction of eval['precision'] == pycocotools' own stats[0:6]."""
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval
    gt, dets = _gt(), _random_dets(_gt(), 5)
    with contextlib.redirect_stdout(io.StringIO()):
        c = COCO()
        c.dataset = copy.deepcopy(gt)
        c.createIndex()
        ev = COCOeval(c, c.loadRes(copy.deepcopy(dets)), "bbox")
        ev.evaluate(), ev.accumulate(), ev.summarize()
    ours = evaluate_coco(gt, dets)
    for k, v in zip(METRIC_KEYS, ev.stats[:6]):
        assert abs(ours[k] - v) <= 1e-6, k


def test_perfect_detections_ap_one():
    gt = _gt()
    dets = [{"image_id": a["image_id"], "category_id": a["category_id"],
             "bbox": a["bbox"], "score": 0.9} for a in gt["annotations"] if not a["iscrowd"]]
    for backend in ("faster_coco_eval", "pycocotools"):
        r = evaluate_coco(gt, dets, backend=backend)
        assert all(v == pytest.approx(1.0) for v in r.values()), (backend, r)


def test_empty_detections_zero():
    for backend in ("faster_coco_eval", "pycocotools"):
        assert evaluate_coco(_gt(), [], backend=backend) == dict.fromkeys(METRIC_KEYS, 0.0)


def test_no_gt_in_area_range_is_nan():
    gt = _gt()
    gt["annotations"] = [a for a in gt["annotations"] if a["area"] >= 96 ** 2]
    for backend in ("faster_coco_eval", "pycocotools"):
        r = evaluate_coco(gt, _random_dets(_gt()), backend=backend)
        assert math.isnan(r["APs"]) and math.isnan(r["APm"]) and r["APl"] >= 0.0
        r = evaluate_coco(gt, [], backend=backend)
        assert r["AP"] == 0.0 and math.isnan(r["APs"])


def test_gt_without_annotations_is_nan():
    gt = _gt()
    gt["annotations"] = []
    for backend in ("faster_coco_eval", "pycocotools"):
        for dets in ([], _random_dets(_gt())):
            r = evaluate_coco(gt, dets, backend=backend)
            assert all(math.isnan(v) for v in r.values()), (backend, r)


def test_unknown_image_id_raises():
    dets = _random_dets(_gt()) + [{"image_id": 999, "category_id": 3,
                                   "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(DataError, match="999"):
        evaluate_coco(_gt(), dets)


def test_gt_path_and_no_mutation(tmp_path, capsys):
    gt = _gt()
    before = copy.deepcopy(gt)
    dets = _random_dets(gt, 3)
    dets_before = copy.deepcopy(dets)
    from_dict = evaluate_coco(gt, dets)
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(gt))
    _assert_close(evaluate_coco(path, dets), from_dict, tol=0.0)
    _assert_close(evaluate_coco(str(path), dets, backend="pycocotools"), from_dict)
    assert gt == before and dets == dets_before
    assert capsys.readouterr().out == ""  # libraries' printing silenced


def test_missing_gt_file_is_data_error(tmp_path):
    with pytest.raises(DataError, match="not found"):
        evaluate_coco(tmp_path / "nope.json", [])


def test_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        evaluate_coco(_gt(), [], backend="nope")


def test_detections_from_outputs():
    np = pytest.importorskip("numpy")
    outputs = [{"boxes": np.array([[10.0, 20.0, 40.0, 60.0]]), "scores": np.array([0.75]),
                "labels": np.array([2])},
               {"boxes": np.zeros((0, 4)), "scores": np.zeros(0), "labels": np.zeros(0)}]
    dets = coco_detections_from_outputs([np.int64(7), 8], outputs, {1: 3, 2: 17})
    assert dets == [{"image_id": 7, "category_id": 17, "bbox": [10.0, 20.0, 30.0, 40.0],
                     "score": 0.75}]
    assert all(type(v) is float for v in dets[0]["bbox"])
    with pytest.raises(ValueError):
        coco_detections_from_outputs([1], outputs[:1], {1: 3})


def test_detections_from_torch_outputs():
    torch = pytest.importorskip("torch")
    out = [{"boxes": torch.tensor([[1.0, 2.0, 5.0, 10.0]]), "scores": torch.tensor([0.5]),
            "labels": torch.tensor([1])}]
    assert coco_detections_from_outputs(torch.tensor([4]), out, {1: 3}) == [
        {"image_id": 4, "category_id": 3, "bbox": [1.0, 2.0, 4.0, 8.0], "score": 0.5}]
