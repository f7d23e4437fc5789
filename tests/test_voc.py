"""Pascal VOC XML -> COCO: coordinates, difficult, errors naming file/object/field."""
from __future__ import annotations

import json

import pytest
from PIL import Image

from harness.data import load_coco
from harness.data.voc import voc_to_coco, write_voc_as_coco
from harness.core import DataError
from harness.evaluate import evaluate_coco


def _obj(name, box, difficult=None, raw=None):
    bnd = raw if raw is not None else (
        "<bndbox>" + "".join(f"<{k}>{v}</{k}>" for k, v in
                             zip(("xmin", "ymin", "xmax", "ymax"), box)) + "</bndbox>")
    diff = "" if difficult is None else f"<difficult>{difficult}</difficult>"
    return f"<object><name>{name}</name><pose>Unspecified</pose>{diff}{bnd}</object>"


def _dataset(root, files: dict, size=(120, 80)):
    """``files``: stem -> list of <object> strings; <size> is deliberately wrong."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for stem, objs in files.items():
        Image.new("RGB", size, (90, 90, 90)).save(root / "JPEGImages" / f"{stem}.jpg")
        (root / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><folder>VOC</folder><filename>{stem}.jpg</filename>"
            "<size><width>0</width><height>0</height><depth>3</depth></size>"
            + "".join(objs) + "</annotation>")
    return root / "Annotations", root / "JPEGImages"


def test_good_files(tmp_path):
    xml_dir, img_dir = _dataset(tmp_path, {
        "b": [_obj("person", (1, 1, 10, 20)), _obj(" car ", (11.5, 21, 40, 50), difficult=0)],
        "a": [_obj("bus", (5, 6, 55, 46), difficult=1)],
        "c": []})
    data = voc_to_coco(xml_dir, img_dir)
    assert [c["name"] for c in data["categories"]] == ["bus", "car", "person"]
    assert [c["id"] for c in data["categories"]] == [1, 2, 3]
    assert [im["file_name"] for im in data["images"]] == ["a.jpg", "b.jpg", "c.jpg"]
    assert all((im["width"], im["height"]) == (120, 80) for im in data["images"])
    anns = [(a["image_id"], a["category_id"], a["bbox"], a["iscrowd"])
            for a in data["annotations"]]
    assert anns == [(1, 1, [4, 5, 51, 41], 1),            # 1-based inclusive -> 0-based
                    (2, 3, [0, 0, 10, 20], 0),
                    (2, 2, [10.5, 20, 29.5, 30], 0)]
    fixed = voc_to_coco(xml_dir, img_dir, class_names=["person", "car", "bus", "bicycle"])
    assert [c["name"] for c in fixed["categories"]] == ["person", "car", "bus", "bicycle"]
    assert [a["category_id"] for a in fixed["annotations"]] == [3, 1, 2]

    out = write_voc_as_coco(xml_dir, img_dir, tmp_path / "o" / "voc.json")
    assert [p.name for p in out.parent.iterdir()] == ["voc.json"]
    assert json.loads(out.read_text()) == data
    idx = load_coco(out, img_dir)
    t = idx.target(0)  # image a: its only box is difficult
    assert len(t["boxes"]) == 0 and t["ignore_boxes"].tolist() == [[4, 5, 55, 46]]
    assert idx.target(1)["boxes"].tolist() == [[0, 0, 10, 20], [10.5, 20, 40, 50]]


def test_difficult_is_ignored_in_evaluation(tmp_path):
    xml_dir, img_dir = _dataset(tmp_path, {"a": [_obj("car", (1, 1, 20, 20)),
                                                 _obj("car", (51, 41, 80, 70), difficult=1)]})
    gt = voc_to_coco(xml_dir, img_dir)
    hit = {"image_id": 1, "category_id": 1, "bbox": [0, 0, 20, 20], "score": 0.5}
    on_difficult = {"image_id": 1, "category_id": 1, "bbox": [50, 40, 30, 30], "score": 0.9}
    assert evaluate_coco(gt, [hit])["AP"] == 1.0
    assert evaluate_coco(gt, [hit, on_difficult])["AP"] == 1.0  # neither TP nor FP


@pytest.mark.parametrize("obj, field, fragment", [
    (_obj("car", None, raw=""), "bndbox", "missing <bndbox>"),
    (_obj("car", (1, "ten", 5, 5)), "bndbox/ymin", "non-numeric"),
    (_obj("car", None, raw="<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax></bndbox>"),
     "bndbox/ymax", "missing"),
    (_obj("car", (10, 1, 5, 5)), "bndbox/xmax", "before xmin"),
    (_obj("", (1, 1, 5, 5)), "name", "name"),
    (_obj("car", (1, 1, 5, 5), difficult="yes"), "difficult", "0 or 1"),
])
def test_object_errors_name_file_object_field(tmp_path, obj, field, fragment):
    xml_dir, img_dir = _dataset(tmp_path, {"img7": [_obj("car", (1, 1, 5, 5)), obj]})
    with pytest.raises(DataError) as ei:
        voc_to_coco(xml_dir, img_dir)
    e = ei.value
    assert e.file == str(xml_dir / "img7.xml") and e.record.startswith("object #1")
    assert e.field == field
    assert "img7.xml" in str(e) and "object #1" in str(e) and fragment in str(e)


def test_file_level_errors(tmp_path):
    xml_dir, img_dir = _dataset(tmp_path, {"a": [_obj("car", (1, 1, 5, 5))]})
    with pytest.raises(DataError, match="not in class_names"):
        voc_to_coco(xml_dir, img_dir, class_names=["person"])
    (img_dir / "a.jpg").unlink()
    with pytest.raises(DataError, match=r"a\.xml.*image not found"):
        voc_to_coco(xml_dir, img_dir)
    (xml_dir / "a.xml").write_text("<annotation><object>")
    with pytest.raises(DataError, match=r"a\.xml.*malformed XML"):
        voc_to_coco(xml_dir, img_dir)
    with pytest.raises(DataError, match="no \\*.xml"):
        voc_to_coco(img_dir, img_dir)
