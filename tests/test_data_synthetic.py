"""Synthetic data: deterministic, real COCO format, atomic and reusable."""
from __future__ import annotations

import json
import os
import warnings

import pytest
import torch

from harness.data import CocoDetection, image_to_float, load_coco
from harness.data import write_synthetic_coco
from harness.core import ConfigError, DataError


def _files(root):
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_deterministic_bytes(tmp_path):
    a = write_synthetic_coco(tmp_path / "a", n_images=12, seed=7)
    b = write_synthetic_coco(tmp_path / "b", n_images=12, seed=7)
    c = write_synthetic_coco(tmp_path / "c", n_images=12, seed=8)
    assert a == tmp_path / "a" / "annotations.json"
    fa, fb = _files(a.parent), _files(b.parent)
    assert len(fa) == 13 and fa == fb
    assert _files(c.parent)["images/000000.png"] != fa["images/000000.png"]


def test_loads_through_real_loader(tmp_path):
    ann = write_synthetic_coco(tmp_path / "d", n_images=40, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no dropped-box warning
        idx = load_coco(ann, ann.parent)
    assert len(idx) == 40 and idx.n_dropped_boxes == 0
    assert idx.class_names == ["square", "circle", "triangle"]
    cat_ids = sorted(idx.cat_id_to_label)
    assert cat_ids != list(range(1, len(cat_ids) + 1))  # non-contiguous on purpose
    assert all(im.id >= 1000 for im in idx.images)
    assert all("/" in im.file_name for im in idx.images)  # subfolder on purpose
    labels, areas = [], []
    for i in range(len(idx)):
        t = idx.target(i)
        b = t["boxes"]
        assert len(b) >= 1 and len(t["ignore_boxes"]) == 0
        assert (b[:, 0] >= 0).all() and (b[:, 1] >= 0).all()
        assert (b[:, 2] <= 128).all() and (b[:, 3] <= 128).all()
        assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
        labels += t["labels"].tolist()
        areas += ((b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])).tolist()
    assert set(labels) == {1, 2, 3}
    assert any(a < 32 ** 2 for a in areas) and any(a >= 32 ** 2 for a in areas)
    img, t = CocoDetection(idx)[0]
    assert img.shape == (3, 128, 128) and img.dtype == torch.uint8


def test_boxes_are_tight(tmp_path):
    """Object pixels are bright, background dark: each box edge touches the object."""
    ann = write_synthetic_coco(tmp_path / "d", n_images=6, seed=3, max_objects=1)
    idx = load_coco(ann, ann.parent)
    ds = CocoDetection(idx)
    for i in range(len(idx)):
        img, t = ds[i]
        img = image_to_float(img)
        x1, y1, x2, y2 = (int(v) for v in t["boxes"][0])
        inside = img[:, y1:y2, x1:x2].max(0).values > 0.55
        assert inside[0].any() and inside[-1].any() and inside[:, 0].any() and inside[:, -1].any()
        out = img.max(0).values > 0.55
        out[y1:y2, x1:x2] = False
        assert not out.any()


def test_large_objects_when_image_allows(tmp_path):
    classes = ("square", "circle", "triangle", "cross", "diamond")
    ann = write_synthetic_coco(tmp_path / "d", n_images=30, seed=1, image_size=320,
                               classes=classes)
    data = json.loads(ann.read_text())
    assert any(a["area"] >= 96 ** 2 for a in data["annotations"])
    assert [c["name"] for c in data["categories"]] == list(classes)


def test_reuse_without_rewrite(tmp_path):
    out = tmp_path / "d"
    ann = write_synthetic_coco(out, n_images=5, seed=0)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    os.utime(ann, ns=(1, 1))  # make any rewrite visible even on coarse clocks
    stamps[ann] = 1
    assert write_synthetic_coco(out, n_images=5, seed=0) == ann
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    # other parameters: replaced by the new dataset, no leftovers next to it
    write_synthetic_coco(out, n_images=3, seed=0)
    assert len(load_coco(ann, out)) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_incomplete_dir_never_reused_and_foreign_dir_kept(tmp_path):
    out = tmp_path / "d"
    out.mkdir()
    write_synthetic_coco(out, n_images=2, seed=0)  # empty dir: fine to fill
    (out / "images" / "000001.png").unlink()        # damaged dataset: regenerated
    write_synthetic_coco(out, n_images=2, seed=0)
    assert (out / "images" / "000001.png").is_file()
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="mine"):
        write_synthetic_coco(foreign, n_images=2, seed=0)
    assert (foreign / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kw", [{"n_images": 0}, {"classes": ("blob",)},
                                {"classes": ()}, {"image_size": 8}, {"seed": -1}])
def test_bad_parameters(tmp_path, kw):
    args = {"n_images": 2, "seed": 0, **kw}
    with pytest.raises(ConfigError):
        write_synthetic_coco(tmp_path / "d", **args)
    assert not (tmp_path / "d").exists()


# -- VisDrone-format synthetic data ---------------------------------------------------

def test_visdrone_deterministic_bytes(tmp_path):
    from harness.data import write_synthetic_visdrone
    a = write_synthetic_visdrone(tmp_path / "a", n_images=4, seed=7, image_size=(160, 96))
    b = write_synthetic_visdrone(tmp_path / "b", n_images=4, seed=7, image_size=(160, 96))
    c = write_synthetic_visdrone(tmp_path / "c", n_images=4, seed=8, image_size=(160, 96))
    assert a == tmp_path / "a"
    fa = _files(a)
    assert len(fa) == 9 and fa == _files(b)
    name = "images/0000001_00000_d_0000001.jpg"
    assert fa[name][:3] == b"\xff\xd8\xff" and _files(c)[name] != fa[name]


def test_visdrone_has_every_quirk_and_parses(tmp_path):
    from harness.data import write_synthetic_visdrone
    from harness.data import convert_visdrone
    from harness.data.visdrone import parse_visdrone_annotation
    src = write_synthetic_visdrone(tmp_path / "d", n_images=5, seed=0, image_size=(192, 128))
    texts = [p.read_text() for p in sorted((src / "annotations").glob("*.txt"))]
    assert len(texts) == 5
    for text in texts:  # trailing comma on some lines, not on others, in every file
        lines = text.splitlines()
        assert any(ln.endswith(",") for ln in lines) and not all(ln.endswith(",") for ln in lines)
    objs = [o for p in sorted((src / "annotations").glob("*.txt"))
            for o in parse_visdrone_annotation(p)]
    kinds = [o["kind"] for o in objs]
    assert {"object", "region", "others", "score0"} <= set(kinds)
    scored = [o for o in objs if o["kind"] == "object"]
    assert len(scored) >= 5 * 3  # dense
    assert all(6 <= o["bbox"][2] <= 24 and 6 <= o["bbox"][3] <= 24 for o in scored)
    assert len({o["category"] for o in scored}) >= 8
    ann = convert_visdrone(src, tmp_path / "d.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        idx = load_coco(ann, src)
    assert len(idx) == 5 and idx.images[0].width == 192 and idx.images[0].height == 128
    assert sum(len(idx.target(i)["boxes"]) for i in range(5)) == len(scored)
    img, _ = CocoDetection(idx)[0]
    assert img.shape == (3, 128, 192)


def test_visdrone_reuse_replace_and_foreign(tmp_path):
    from harness.data import write_synthetic_visdrone
    out = tmp_path / "d"
    write_synthetic_visdrone(out, n_images=2, seed=0, image_size=64)
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    assert write_synthetic_visdrone(out, n_images=2, seed=0, image_size=64) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == stamps
    next(iter((out / "annotations").iterdir())).unlink()  # damaged: regenerated
    write_synthetic_visdrone(out, n_images=2, seed=0, image_size=64)
    assert len(list((out / "annotations").iterdir())) == 2
    write_synthetic_visdrone(out, n_images=3, seed=0, image_size=64)  # other params
    assert len(list((out / "images").iterdir())) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]
    coco = write_synthetic_coco(tmp_path / "coco", n_images=2, seed=0)
    with pytest.raises(DataError, match="refusing"):
        write_synthetic_visdrone(coco.parent, n_images=2, seed=0)


@pytest.mark.parametrize("kw", [{"n_images": 0}, {"image_size": 32}, {"image_size": (64,)},
                                {"image_size": (64, 8)}, {"min_objects": 9, "max_objects": 4},
                                {"seed": -1}, {"max_objects": 1}])
def test_visdrone_bad_parameters(tmp_path, kw):
    from harness.data import write_synthetic_visdrone
    with pytest.raises(ConfigError):
        write_synthetic_visdrone(tmp_path / "d", **{"n_images": 2, "seed": 0, **kw})
    assert not (tmp_path / "d").exists()
