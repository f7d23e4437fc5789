"""VisDrone2019-DET: the official text format, its COCO conversion and protocol."""
from __future__ import annotations

import json
import math
import random
import warnings

import pytest
from PIL import Image

from harness.data import load_coco
from harness.data import write_synthetic_visdrone
from harness.data.visdrone import CATEGORIES, parse_visdrone_annotation
from harness.data import convert_visdrone, visdrone_to_coco
from harness.core import DataError
from harness.evaluate import evaluate_coco
from harness.evaluate.visdrone import VISDRONE_METRIC_KEYS
from harness.evaluate import evaluate_visdrone


def _folder(root, images: dict):
    """``images``: stem -> ((width, height), annotation text)."""
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for stem, ((w, h), text) in images.items():
        Image.new("RGB", (w, h), (40, 40, 40)).save(root / "images" / f"{stem}.jpg")
        (root / "annotations" / f"{stem}.txt").write_text(text)
    return root


# -- parser ---------------------------------------------------------------------------

def test_parse_every_quirk(tmp_path):
    p = tmp_path / "a.txt"
    p.write_bytes(b"1,2,3,4,1,4,0,0,\r\n"      # trailing comma + CRLF
                  b"5,6,7,8,1,1,1,2\n"          # no trailing comma
                  b"\n"                         # blank line
                  b"0,0,50,50,0,0,0,0,\n"       # ignored region
                  b"10,10,5,5,1,11,0,0\n"       # others
                  b"20,20,5,5,0,3,0,0\n"        # score 0 -> ignore
                  b" 30 , 30 , 6 , 6 , 1 , 10 , 0 , 1 ")  # spaces, no final newline
    objs = parse_visdrone_annotation(p)
    assert [o["line"] for o in objs] == [1, 2, 4, 5, 6, 7]
    assert [o["kind"] for o in objs] == ["object", "object", "region", "others", "score0",
                                         "object"]
    assert [o["ignore"] for o in objs] == [False, False, True, True, True, False]
    assert objs[0]["bbox"] == [1, 2, 3, 4] and objs[0]["category"] == 4
    assert (objs[1]["truncation"], objs[1]["occlusion"]) == (1, 2)
    assert objs[-1]["category"] == 10 and objs[-1]["bbox"] == [30, 30, 6, 6]
    empty = tmp_path / "e.txt"
    empty.write_text("")
    assert parse_visdrone_annotation(empty) == []


@pytest.mark.parametrize("line, field, fragment", [
    ("1,2,3,4,1,4,0", None, "expected 8"),
    ("1,2,3,4,1,4,0,0,0", None, "got 9"),
    ("1,2,3,4,1,4,0,0,,", None, "got 10"),
    ("1,two,3,4,1,4,0,0", "bbox_top", "not a number"),
    ("1,2,3,4,1,car,0,0", "object_category", "not a number"),
    ("1,2,3,4,1,nan,0,0", "object_category", "finite"),
    ("1,2,-3,4,1,4,0,0", "bbox_width", "negative"),
    ("1,2,3,-4,1,4,0,0", "bbox_height", "negative"),
    ("1,2,3,4,1,12,0,0", "object_category", "unknown category 12"),
    ("1,2,3,4,1,-1,0,0", "object_category", "unknown category"),
    ("1,2,3,4,0.5,4,0,0", "score", "integer"),
    ("1,2,3,4,2,4,0,0", "score", "0 or 1"),
])
def test_parse_errors_name_file_line_field(tmp_path, line, field, fragment):
    p = tmp_path / "0000001_00000_d_0000001.txt"
    p.write_text("1,2,3,4,1,4,0,0,\n5,6,7,8,1,1,0,0\n" + line + "\n")
    with pytest.raises(DataError) as ei:
        parse_visdrone_annotation(p)
    e = ei.value
    assert e.file == str(p) and e.record == "line 3" and e.field == field
    msg = str(e)
    assert p.name in msg and "line 3" in msg and fragment in msg
    if field:
        assert field in msg


# -- conversion -----------------------------------------------------------------------

GT_A = ("10,10,20,20,1,4,0,0,\n"      # car
        "50,10,10,20,1,1,0,0,\n"      # pedestrian
        "100,0,60,60,0,0,0,0,\n"      # ignored region
        "110,10,20,20,1,4,0,0,\n"     # car lying inside the region: dropped in eval
        "170,70,20,20,0,4,0,0,\n"     # car with score 0: ignore
        "10,60,20,20,1,11,0,0,\n"     # others
        "60,60,0,5,1,4,0,0,\n")       # zero width (the official files have a few)


def test_convert_loads_with_coco_loader(tmp_path):
    src = _folder(tmp_path / "vd", {"b": ((64, 48), "1,1,8,8,1,2,0,0\n"),
                                    "a": ((200, 100), GT_A)})
    out = convert_visdrone(src, tmp_path / "out" / "vd.json")
    assert out == tmp_path / "out" / "vd.json"
    assert [p.name for p in out.parent.iterdir()] == ["vd.json"]  # no temp file left
    data = json.loads(out.read_text())
    assert [c["name"] for c in data["categories"]] == list(CATEGORIES)
    assert [c["id"] for c in data["categories"]] == list(range(1, 11))
    assert data["images"] == [{"id": 1, "file_name": "images/a.jpg", "width": 200, "height": 100},
                              {"id": 2, "file_name": "images/b.jpg", "width": 64, "height": 48}]
    assert data["info"]["visdrone_zero_size_boxes"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # zero-size box not written: no dropped-box warning
        idx = load_coco(out, src)
    t = idx.target(0)
    assert t["boxes"].tolist() == [[10, 10, 30, 30], [50, 10, 60, 30], [110, 10, 130, 30]]
    assert t["labels"].tolist() == [4, 1, 4]
    ignore = {tuple(b) for b in t["ignore_boxes"].tolist()}
    assert ignore == {(100, 0, 160, 60), (170, 70, 190, 90), (10, 60, 30, 80)}
    assert len(t["ignore_boxes"]) == 1 + 10 + 10  # score-0 once, region/others per class
    kinds = {a.get("visdrone_ignore") for a in data["annotations"] if a["iscrowd"]}
    assert kinds == {"region", "score0", "others"}
    assert idx.target(1)["labels"].tolist() == [2]
    assert visdrone_to_coco(src) == data


def test_conversion_pairs_files_strictly(tmp_path):
    src = _folder(tmp_path / "vd", {"a": ((32, 32), "1,1,8,8,1,2,0,0\n")})
    (src / "images" / "lonely.jpg").write_bytes((src / "images" / "a.jpg").read_bytes())
    with pytest.raises(DataError, match="lonely.jpg.*no annotation file"):
        visdrone_to_coco(src)
    (src / "images" / "lonely.jpg").unlink()
    (src / "annotations" / "orphan.txt").write_text("")
    with pytest.raises(DataError, match="orphan.txt.*no image"):
        visdrone_to_coco(src)
    with pytest.raises(DataError, match="missing"):
        visdrone_to_coco(tmp_path / "nowhere")
    (src / "annotations" / "orphan.txt").unlink()
    (src / "annotations" / "a.txt").write_text("1,1,8,8,1,2,0,0\n1,1,8\n")
    with pytest.raises(DataError, match=r"a\.txt: line 2"):
        convert_visdrone(src, tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


# -- evaluation -----------------------------------------------------------------------

def _det(image_id, cat, bbox, score):
    return {"image_id": image_id, "category_id": cat, "bbox": list(bbox), "score": score}


PERFECT = [_det(1, 4, (10, 10, 20, 20), 0.9), _det(1, 1, (50, 10, 10, 20), 0.8)]


@pytest.fixture
def gt_a(tmp_path):
    return _folder(tmp_path / "vd", {"a": ((200, 100), GT_A)})


def _same(a, b):
    assert set(a) == set(b) == set(VISDRONE_METRIC_KEYS)
    for k in a:
        assert (math.isnan(a[k]) and math.isnan(b[k])) or abs(a[k] - b[k]) < 1e-9, (k, a, b)


def test_perfect_detections(gt_a):
    r = evaluate_visdrone(gt_a, PERFECT)
    assert set(r) == set(VISDRONE_METRIC_KEYS)
    for k in ("AP", "AP50", "AP75", "APs", "AP_maxdets100"):
        assert r[k] == 1.0, k
    assert math.isnan(r["APm"]) and math.isnan(r["APl"])  # no GT that size
    empty = evaluate_visdrone(gt_a, [])
    assert empty["AP"] == 0.0 and empty["AP_maxdets100"] == 0.0


def test_ignored_region_drops_detections(gt_a):
    base = evaluate_visdrone(gt_a, PERFECT)
    inside = [_det(1, 4, (120, 20, 15, 15), 0.99), _det(1, 1, (100, 40, 30, 20), 0.95),
              _det(1, 4, (90, 10, 20, 10), 0.97)]  # exactly 50% inside: dropped
    _same(evaluate_visdrone(gt_a, PERFECT + inside), base)
    outside = evaluate_visdrone(gt_a, PERFECT + [_det(1, 4, (88, 10, 20, 10), 0.97)])  # 40%
    assert outside["AP"] < base["AP"]
    far = evaluate_visdrone(gt_a, PERFECT + [_det(1, 4, (10, 40, 15, 15), 0.99)])
    assert far["AP"] < base["AP"] and far["AP_maxdets100"] < 1.0


def test_coverage_is_by_the_union_of_regions(tmp_path):
    car = "10,10,20,20,1,4,0,0\n"
    # Adjacent regions x 100..120 and 120..140; det x 104..146: 38% + 48% inside
    # each one, 86% inside their union -> dropped.
    adjacent = _folder(tmp_path / "adj", {"a": ((200, 100), car + "100,0,20,60,0,0,0,0\n"
                                                                 "120,0,20,60,0,0,0,0\n")})
    _same(evaluate_visdrone(adjacent, PERFECT[:1] + [_det(1, 4, (104, 10, 42, 10), 0.99)]),
          evaluate_visdrone(adjacent, PERFECT[:1]))
    # Overlapping regions x 100..128 and 120..148; det x 124..174: 8% + 48% = 56% by a
    # naive sum, but 48% inside the union -> kept, a false positive.
    overlap = _folder(tmp_path / "ovl", {"a": ((200, 100), car + "100,0,28,60,0,0,0,0\n"
                                                                "120,0,28,60,0,0,0,0\n")})
    assert evaluate_visdrone(overlap, PERFECT[:1])["AP"] == 1.0
    assert evaluate_visdrone(overlap, PERFECT[:1]
                             + [_det(1, 4, (124, 10, 50, 10), 0.99)])["AP"] < 1.0


def test_score0_gt_is_ignored_for_its_class(gt_a):
    base = evaluate_visdrone(gt_a, PERFECT)
    _same(evaluate_visdrone(gt_a, PERFECT + [_det(1, 4, (170, 70, 20, 20), 0.99)]), base)
    # another class on the same spot is an ordinary false positive
    assert evaluate_visdrone(gt_a, PERFECT + [_det(1, 1, (170, 70, 20, 20), 0.99)])["AP"] < 1


def test_others_never_scored(tmp_path, gt_a):
    base = evaluate_visdrone(gt_a, PERFECT)
    cat11 = [_det(1, 11, (10, 60, 20, 20), 0.99), _det(1, 11, (150, 60, 20, 20), 0.99),
             _det(1, 0, (10, 40, 10, 10), 0.99)]
    _same(evaluate_visdrone(gt_a, PERFECT + cat11), base)
    # An "others" GT line changes nothing either -- not even for a car detection on it,
    # which the official toolkit counts as a false positive with or without the line.
    no_others = _folder(tmp_path / "vd2", {"a": ((200, 100), GT_A.replace(
        "10,60,20,20,1,11,0,0,\n", ""))})
    dets = PERFECT + cat11 + [_det(1, 4, (10, 60, 20, 20), 0.95)]
    with_o, without = evaluate_visdrone(gt_a, dets), evaluate_visdrone(no_others, dets)
    _same(with_o, without)
    assert with_o["AP"] < 1.0


def test_501st_detection_is_not_counted(tmp_path):
    """500 higher-scoring false positives of *another class* push the only true
    positive out: the cap is per image, all classes together."""
    gt = _folder(tmp_path / "vd", {"a": ((800, 700), "0,0,20,20,1,4,0,0\n")})
    fps = [_det(1, 1, (100 + 30 * (k % 20), 40 + 25 * (k // 20), 10, 10), 1.0 - k / 1000)
           for k in range(500)]
    tp = _det(1, 4, (0, 0, 20, 20), 0.1)
    dets = fps + [tp]
    r = evaluate_visdrone(gt, dets)
    assert r["AP"] == 0.0 and r["AP_maxdets100"] == 0.0
    assert evaluate_visdrone(gt, dets, max_dets=501)["AP"] == 1.0
    assert evaluate_visdrone(gt, fps[:499] + [tp])["AP"] == 1.0
    # plain COCOeval caps per image *and class*, so it would count it
    assert evaluate_coco(visdrone_to_coco(gt), dets, max_dets=500)["AP"] == 1.0


def _noisy(data: dict, seed: int) -> list[dict]:
    rng = random.Random(seed)
    dets = []
    for a in data["annotations"]:
        if a["iscrowd"] or rng.random() < 0.2:
            continue
        x, y, w, h = a["bbox"]
        cat = a["category_id"] if rng.random() < 0.85 else rng.randint(1, 11)
        dets.append(_det(a["image_id"], cat, (x + rng.uniform(-2, 2), y + rng.uniform(-2, 2),
                                              w * rng.uniform(0.8, 1.2), h), rng.random()))
    for im in data["images"]:
        for _ in range(5):
            dets.append(_det(im["id"], rng.randint(1, 11), (rng.uniform(0, 200),
                             rng.uniform(0, 200), rng.uniform(4, 30), rng.uniform(4, 30)),
                             rng.random()))
    return dets


def test_folder_dict_and_json_agree_on_synthetic(tmp_path):
    src = write_synthetic_visdrone(tmp_path / "syn", n_images=6, seed=0)
    data = visdrone_to_coco(src)
    snapshot = json.dumps(data)
    ann = convert_visdrone(src, tmp_path / "syn.json")
    perfect = [_det(a["image_id"], a["category_id"], a["bbox"], 1.0)
               for a in data["annotations"] if not a["iscrowd"]]
    for k in ("AP", "AP50", "AP75", "AP_maxdets100"):
        assert evaluate_visdrone(src, perfect)[k] == 1.0
    dets = _noisy(data, 0)
    r = evaluate_visdrone(src, dets)
    assert 0.0 < r["AP"] < 1.0
    _same(evaluate_visdrone(data, dets), r)
    _same(evaluate_visdrone(ann, dets), r)
    _same(evaluate_visdrone(str(ann), dets, backend="pycocotools"), r)
    assert json.dumps(data) == snapshot  # the GT dict is never modified


def test_unknown_image_id_is_a_data_error(gt_a):
    with pytest.raises(DataError, match="image_id"):
        evaluate_visdrone(gt_a, [_det(99, 4, (0, 0, 5, 5), 0.5)])
    with pytest.raises(ValueError):
        evaluate_visdrone(gt_a, PERFECT, max_dets=0)
