"""COCO loader: the quirks of real COCO files, and a clear DataError for bad ones."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import CocoDetection, check_coco, collate_detection, image_to_float, load_coco
from harness.core import DataError

W, H = 40, 30


def _write_image(path, mode="RGB", size=(W, H)):
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        arr = np.full((size[1], size[0]), 65535, dtype=np.uint16)
        arr[0, 0] = 0
        Image.fromarray(arr).save(path)
    elif mode in ("P", "P+transparency"):
        img = Image.new("P", size, 1)
        img.putpalette([0, 0, 0, 200, 10, 10])
        img.save(path, transparency=1) if mode != "P" else img.save(path)
    else:
        colour = {"L": 128, "LA": (128, 255), "RGBA": (255, 0, 0, 128)}.get(mode, (255, 0, 0))
        Image.new(mode, size, colour).save(path)


def _dataset(tmp_path, images=None, annotations=None, categories=None, **extra):
    """A small COCO dataset on disk: image ids 900001/42, category ids 5/17."""
    if images is None:
        images = [{"id": 900001, "file_name": "sub/dir/a.png", "width": W, "height": H},
                  {"id": 42, "file_name": "b.png", "width": W, "height": H}]
    if categories is None:
        categories = [{"id": 17, "name": "dog"}, {"id": 5, "name": "cat"}]
    if annotations is None:
        annotations = [
            {"id": 1, "image_id": 900001, "category_id": 17, "bbox": [1, 2, 10, 5], "iscrowd": 0},
            {"id": 2, "image_id": 900001, "category_id": 5, "bbox": [30, 20, 20, 20]},  # clipped
            {"id": 3, "image_id": 900001, "category_id": 5, "bbox": [0, 0, 40, 30], "iscrowd": 1},
        ]
    for im in images:
        if isinstance(im, dict) and isinstance(im.get("file_name"), str):
            _write_image(tmp_path / "imgs" / im["file_name"])
    data = {"images": images, "annotations": annotations, "categories": categories, **extra}
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps(data))
    return ann, tmp_path / "imgs"


def test_ids_categories_subfolders_crowd_clipping(tmp_path):
    ann, root = _dataset(tmp_path)
    idx = load_coco(ann, root)
    assert len(idx) == 2 and idx.n_dropped_boxes == 0
    assert [im.id for im in idx.images] == [900001, 42]
    assert idx.class_names == ["cat", "dog"]  # label = rank of category id
    assert idx.cat_id_to_label == {5: 1, 17: 2}
    assert idx.label_to_cat_id == {1: 5, 2: 17}
    assert idx.image_path(0) == root / "sub" / "dir" / "a.png"
    t = idx.target(0)
    assert t["image_id"] == 900001
    assert t["boxes"].dtype == torch.float32 and t["labels"].dtype == torch.int64
    # crowd box excluded from training targets, kept as ignore
    assert t["boxes"].tolist() == [[1.0, 2.0, 11.0, 7.0], [30.0, 20.0, 40.0, 30.0]]
    assert t["labels"].tolist() == [2, 1]
    assert t["ignore_boxes"].tolist() == [[0.0, 0.0, 40.0, 30.0]]
    assert idx.n_file_annotations == 3
    ev = {a["id"]: a for a in idx.gt_for_eval()["annotations"]}
    assert ev[2]["bbox"] == [30.0, 20.0, 10.0, 10.0] and ev[2]["area"] == 100.0
    assert ev[3]["iscrowd"] == 1


def test_background_image_kept(tmp_path):
    ann, root = _dataset(tmp_path)
    idx = load_coco(ann, root)
    t = idx.target(1)
    assert t["image_id"] == 42
    assert t["boxes"].shape == (0, 4) and t["labels"].shape == (0,)
    assert t["ignore_boxes"].shape == (0, 4)


def test_clip_negative_origin_exact(tmp_path):
    anns = [{"id": 9, "image_id": 42, "category_id": 5, "bbox": [-5.5, -2, 10, 12.25]}]
    ann, root = _dataset(tmp_path, annotations=anns)
    assert load_coco(ann, root).target(1)["boxes"].tolist() == [[0.0, 0.0, 4.5, 10.25]]


def test_zero_area_dropped_counted_one_warning(tmp_path):
    anns = [{"id": 1, "image_id": 42, "category_id": 5, "bbox": [3, 3, 0, 5]},
            {"id": 2, "image_id": 42, "category_id": 5, "bbox": [50, 3, 5, 5]},  # outside
            {"id": 3, "image_id": 42, "category_id": 5, "bbox": [3, 3, 4, 4]}]
    ann, root = _dataset(tmp_path, annotations=anns)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        idx = load_coco(ann, root)
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1 and "dropped 2 zero-area boxes" in msgs[0]
    assert "instances.json" in msgs[0]
    assert idx.n_dropped_boxes == 2
    assert idx.target(1)["boxes"].tolist() == [[3.0, 3.0, 7.0, 7.0]]


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "P+transparency", "LA", "I;16", "RGB"])
def test_images_always_rgb(tmp_path, mode):
    ann, root = _dataset(tmp_path)
    _write_image(root / "b.png", mode)
    img, target = CocoDetection(load_coco(ann, root))[1]
    assert img.dtype == (torch.uint8 if mode in ("RGB",) else torch.float32)  # 8-bit RGB stays uint8 to the device
    img = image_to_float(img)
    assert img.dtype == torch.float32 and img.shape == (3, H, W)
    assert 0.0 <= img.min() and img.max() <= 1.0
    assert target["image_id"] == 42
    px = img[:, 5, 5].tolist()
    expected = {"L": [128 / 255] * 3, "RGBA": [128 / 255, 0, 0], "LA": [128 / 255] * 3,
                "P": [200 / 255, 10 / 255, 10 / 255], "P+transparency": [0, 0, 0],
                "I;16": [1.0] * 3, "RGB": [1.0, 0, 0]}
    assert px == pytest.approx(expected[mode], abs=1e-3)


def test_transform_and_collate(tmp_path):
    ann, root = _dataset(tmp_path)

    def flip(image, target):
        target = dict(target, flipped=True)
        return image.flip(-1), target

    ds = CocoDetection(load_coco(ann, root), transform=flip)
    loader = torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate_detection)
    images, targets = next(iter(loader))
    assert isinstance(images, list) and isinstance(targets, list) and len(images) == 2
    assert targets[0]["flipped"] and targets[1]["image_id"] == 42


def test_check_coco_summary_and_unreadable(tmp_path):
    ann, root = _dataset(tmp_path)
    s = check_coco(ann, root)
    assert s["images"] == 2 and s["annotations"] == 3 and s["categories"] == 2
    assert s["crowd"] == 1 and s["dropped_boxes"] == 0 and s["background_images"] == 1
    (root / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError) as e:
        check_coco(ann, root)
    assert "b.png" in str(e.value) and "image id=42" in str(e.value)


def test_image_size_mismatch(tmp_path):
    ann, root = _dataset(tmp_path)
    _write_image(root / "b.png", size=(W + 1, H))
    with pytest.raises(DataError, match="image id=42"):
        check_coco(ann, root)
    with pytest.raises(DataError, match="image id=42"):
        CocoDetection(load_coco(ann, root))[1]


def _expect_error(ann, root, *parts, **kw):
    with pytest.raises(DataError) as e:
        load_coco(ann, root, **kw)
    msg = str(e.value)
    for p in ("instances.json",) + parts:
        assert p in msg, (p, msg)
    return msg


def test_malformed_json_has_line_and_column(tmp_path):
    ann, root = _dataset(tmp_path)
    ann.write_text('{"images": [],\n  "annotations": [,]}')
    msg = _expect_error(ann, root, "line 2", "column")
    assert "malformed JSON" in msg


@pytest.mark.parametrize("key", ["images", "annotations", "categories"])
def test_missing_top_level_key(tmp_path, key):
    ann, root = _dataset(tmp_path)
    data = json.loads(ann.read_text())
    del data[key]
    ann.write_text(json.dumps(data))
    _expect_error(ann, root, f"field '{key}'", "missing")


def test_missing_image_file(tmp_path):
    ann, root = _dataset(tmp_path)
    (root / "sub" / "dir" / "a.png").unlink()
    with pytest.raises(DataError) as e:  # the image check (one lstat per image) finds it, not the JSON parse
        check_coco(ann, root)
    assert all(p in str(e.value) for p in ("instances.json", "image id=900001", "field 'file_name'", "a.png"))
    assert len(load_coco(ann, root)) == 2


def test_unknown_category(tmp_path):
    anns = [{"id": 77, "image_id": 42, "category_id": 6, "bbox": [1, 1, 2, 2]}]
    ann, root = _dataset(tmp_path, annotations=anns)
    _expect_error(ann, root, "annotation id=77", "field 'category_id'")


@pytest.mark.parametrize("bbox", [[1, 1, -2, 2], [1, 1, 2, -0.5], [1, 1, 2], "1,1,2,2",
                                  [1, 1, "2", 2], None, [1, 1, float("nan"), 2]])
def test_bad_bbox(tmp_path, bbox):
    anns = [{"id": 78, "image_id": 42, "category_id": 5, "bbox": bbox}]
    ann, root = _dataset(tmp_path, annotations=anns)
    _expect_error(ann, root, "annotation id=78", "field 'bbox'")


def test_unknown_image_id(tmp_path):
    anns = [{"id": 79, "image_id": 43, "category_id": 5, "bbox": [1, 1, 2, 2]}]
    ann, root = _dataset(tmp_path, annotations=anns)
    _expect_error(ann, root, "annotation id=79", "field 'image_id'", "43")


def test_duplicate_image_id(tmp_path):
    images = [{"id": 42, "file_name": "a.png", "width": W, "height": H},
              {"id": 42, "file_name": "b.png", "width": W, "height": H}]
    ann, root = _dataset(tmp_path, images=images, annotations=[])
    _expect_error(ann, root, "image id=42", "field 'id'", "duplicate")


def test_duplicate_annotation_id(tmp_path):
    anns = [{"id": 5, "image_id": 42, "category_id": 5, "bbox": [1, 1, 2, 2]}] * 2
    ann, root = _dataset(tmp_path, annotations=anns)
    _expect_error(ann, root, "annotation id=5", "field 'id'", "duplicate")


def test_bad_image_record(tmp_path):
    images = [{"id": 42, "file_name": "b.png", "width": 0, "height": H}]
    ann, root = _dataset(tmp_path, images=images, annotations=[])
    _expect_error(ann, root, "image id=42", "field 'width'")


def test_missing_annotation_file(tmp_path):
    _expect_error(tmp_path / "instances.json", tmp_path, "not found")
