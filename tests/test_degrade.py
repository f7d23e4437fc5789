"""Corruptions, condition lists, the render cache and FCTL twins (harness.data.corruptions, conditions, render_cache, twins and the
modules it re-exports: corruptions, conditions, render_cache, twins)."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.data import corruptions as C
from harness.data import render_cache as RC
from harness.data import CocoDetection, image_to_float, load_coco, load_rgb
from harness.data import CLEAN, Condition, expand_conditions
from harness.data import CORRUPTIONS, FAMILY, GROUPS, corrupt, image_seed
from harness.data import DegradedTwins
from harness.data import render_condition
from harness.core import ConfigError, DataError

ROOT = Path(__file__).resolve().parent.parent
MOVING = {"glass_blur", "motion_blur", "zoom_blur", "elastic_transform"}


def _image(h=64, w=64, seed=0) -> np.ndarray:
    """A smooth image with edges (blurs and noise both visibly change it)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 / max(w - 1, 1), yy * 255 / max(h - 1, 1),
                    np.full((h, w), 120.0)], -1)
    img[h // 4: h // 2, w // 4: w // 2] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------- registry
def test_registry_and_groups():
    assert len(CORRUPTIONS) == 21
    assert len(GROUPS["coco-c"]) == 15 and len(GROUPS["coco-c-extra"]) == 4
    assert set(GROUPS["coco-c"]) | set(GROUPS["coco-c-extra"]) | {"rain", "dark"} == set(CORRUPTIONS)
    assert set(GROUPS["noise"]) | set(GROUPS["blur"]) | set(GROUPS["weather"]) \
        | set(GROUPS["digital"]) == set(GROUPS["coco-c"]) | {"rain"}
    assert {n for n, c in CORRUPTIONS.items() if c.moves_pixels} == MOVING
    assert all(FAMILY[n] == g for g in ("noise", "blur", "digital") for n in GROUPS[g])
    assert FAMILY["rain"] == "weather" and FAMILY["dark"] == "low_light"


def test_expand_conditions_groups_and_dedup():
    assert len(expand_conditions(["coco-c"])) == 75
    assert len(expand_conditions(["weather"])) == 25
    assert expand_conditions(["clean"]) == [CLEAN] and CLEAN.label == "clean"
    got = expand_conditions(["clean", "fog", {"corruption": "fog", "severity": 3}, "fog@2",
                             {"group": "weather", "severity": [1, 3]}, "clean"])
    assert got[0] == CLEAN and len(got) == len(set(got))
    assert [c.label for c in got[1:6]] == [f"fog@{s}" for s in range(1, 6)]
    assert {c.label for c in got} == {"clean"} | {f"fog@{s}" for s in range(1, 6)} \
        | {f"{n}@{s}" for n in GROUPS["weather"] for s in (1, 3)}
    assert expand_conditions([{"corruption": "rain", "severity": 4}]) == [Condition("rain", 4)]
    assert Condition.parse("rain@4") == Condition("rain", 4) and Condition("rain", 4).label == "rain@4"
    assert len(expand_conditions(["coco-c", "noise", "all"])) == 21 * 5


@pytest.mark.parametrize("items, field, hint", [
    (["clean", "gausian_noise"], "conditions[1]", "gaussian_noise"),
    ([{"corruption": "fogg", "severity": 1}], "conditions[0].corruption", "fog"),
    ([{"group": "wether"}], "conditions[0].group", "weather"),
    (["clean", "fog", {"corruption": "fog", "severity": 6}], "conditions[2].severity", "1-5"),
    ([{"group": "noise", "severity": [1, 0]}], "conditions[0].severity[1]", "1-5"),
    ([{"corruption": "fog", "severity": True}], "conditions[0].severity", "1-5"),
    (["fog@6"], "conditions[0]", "1-5"),
    (["clean@1"], "conditions[0]", "no severity"),
    ([{"corruption": "fog", "group": "noise"}], "conditions[0]", "exactly one"),
    ([{"corruption": "fog", "sev": 1}], "conditions[0]", "unexpected"),
    ([3], "conditions[0]", "name or a mapping"),
])
def test_expand_conditions_errors(items, field, hint):
    with pytest.raises(ConfigError) as e:
        expand_conditions(items)
    assert e.value.field == field and hint in str(e.value)


# --------------------------------------------------------------- corruptions
def test_every_corruption_is_deterministic_and_seeded():
    img = _image()
    for name, info in CORRUPTIONS.items():
        np.random.seed(1)
        before = np.random.get_state()[1].copy()
        a = corrupt(img, name, 3, image_seed(1000, name, 3))
        assert np.array_equal(np.random.get_state()[1], before), f"{name} changed np.random"
        np.random.seed(12345)  # something else in between: must not matter
        np.random.random(17)
        b = corrupt(img, name, 3, image_seed(1000, name, 3))
        c = corrupt(img, name, 3, image_seed(1007, name, 3))
        assert a.dtype == np.uint8 and a.shape == img.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} not reproducible"
        assert not np.array_equal(a, img), f"{name} changed nothing"
        assert (a.tobytes() != c.tobytes()) == info.stochastic, f"{name}: stochastic flag wrong"


def test_corruptions_identical_in_a_fresh_process(tmp_path):
    img = _image(48, 40)
    np.save(tmp_path / "img.npy", img)
    here = {n: hashlib.sha256(corrupt(img, n, 2, 99).tobytes()).hexdigest() for n in CORRUPTIONS}
    code = ("import hashlib, json, sys, numpy as np\n"
            "from harness.data.corruptions import corrupt, CORRUPTIONS\n"
            "img = np.load(sys.argv[1])\n"
            "print(json.dumps({n: hashlib.sha256(corrupt(img, n, 2, 99).tobytes()).hexdigest() "
            "for n in CORRUPTIONS}))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "img.npy")],
                         capture_output=True, text=True, cwd=ROOT, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


@pytest.mark.parametrize("shape", [(128, 128), (64, 100), (100, 64), (20, 13), (1, 1)])
def test_all_sizes_keep_shape(shape):
    img = _image(*shape)
    for name in CORRUPTIONS:
        out = corrupt(img, name, 5, 3)
        assert out.shape == shape + (3,) and out.dtype == np.uint8, (name, shape)


def test_grey_input_and_bad_input():
    grey = _image()[..., 0]
    assert corrupt(grey, "fog", 1, 0).shape == (64, 64, 3)
    with pytest.raises(ConfigError, match="snow"):
        corrupt(_image(), "snwo", 1, 0)
    with pytest.raises(ConfigError) as e:
        corrupt(_image(), "fog", 0, 0)
    assert e.value.field == "severity"
    with pytest.raises(TypeError):
        corrupt(_image().astype(np.float32), "fog", 1, 0)


@pytest.mark.parametrize("name", ["rain", "dark"])
def test_ours_get_worse_with_severity(name):
    img = _image(128, 160)
    mad = [np.abs(corrupt(img, name, s, 5).astype(float) - img).mean() for s in range(1, 6)]
    assert all(b > a + 2 for a, b in zip(mad, mad[1:])), mad
    assert mad[0] > 1.0
    assert C.RAIN_PARAMS.keys() == C.DARK_PARAMS.keys() == set(range(1, 6))


def test_image_seed_is_stable():
    assert image_seed(42, "fog", 3, 0) == image_seed(42, "fog", 3, 0) == 3930381441949167625
    assert len({image_seed(42, "fog", 3, 0), image_seed(43, "fog", 3, 0),
                image_seed(42, "snow", 3, 0), image_seed(42, "fog", 4, 0),
                image_seed(42, "fog", 3, 1)}) == 5
    assert 0 <= image_seed(2 ** 40, "rain", 5, 7) < 2 ** 63


# -------------------------------------------------------------- render cache
@pytest.fixture
def data(tmp_path):
    from harness.data import write_synthetic_coco
    ann = write_synthetic_coco(tmp_path / "src", n_images=4, seed=3, image_size=64, max_objects=2)
    return load_coco(ann, ann.parent)


@pytest.fixture
def count_renders(monkeypatch):
    calls = []
    real = RC._render_one

    def counting(*args):
        calls.append(Path(args[1]).name)
        return real(*args)
    monkeypatch.setattr(RC, "_render_one", counting)
    return calls


def test_render_condition_reuse_and_repair(data, tmp_path, count_renders):
    cond = Condition("fog", 2)
    root = render_condition(data, cond, tmp_path / "cache", progress=True)
    assert len(count_renders) == 4
    assert root == tmp_path / "cache" / RC.dataset_key(data.ann_file) / "fog@2"
    manifest = json.loads((root / "manifest.json").read_text())
    assert manifest["complete"] and manifest["params"]["severity"] == 2
    assert not (root / RC.JOURNAL).exists()
    for fn, rec in manifest["files"].items():
        assert hashlib.sha256((root / fn).read_bytes()).hexdigest() == rec["sha256"]
    # pixels = corrupt(source, seed of the image id); the annotations work on the root
    idx = load_coco(data.ann_file, root)
    info = data.images[1]
    src = np.asarray(Image.open(data.image_path(1)).convert("RGB"))
    want = corrupt(src, "fog", 2, image_seed(info.id, "fog", 2, 0))
    assert np.array_equal(np.asarray(Image.open(idx.image_path(1))), want)
    assert Image.open(idx.image_path(1)).format == "PNG"

    count_renders.clear()
    assert render_condition(data, cond, tmp_path / "cache") == root
    assert count_renders == []  # cache hit: nothing rendered

    # a missing image and a killed writer's temp file: only that image is redone
    first = data.images[0].file_name
    (root / first).unlink()
    tmp = (root / first).with_name(f".{Path(first).name}.999.abcd.tmp")
    tmp.write_bytes(b"half")
    os.utime(tmp, (time.time() - 3600,) * 2)
    render_condition(data, cond, tmp_path / "cache")
    assert count_renders == [Path(first).name] and not tmp.exists()

    # a damaged cached file (same size) is detected by its checksum; a truncated one by size
    count_renders.clear()
    p2, p3 = root / data.images[2].file_name, root / data.images[3].file_name
    b = bytearray(p2.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p2.write_bytes(bytes(b))
    p3.write_bytes(p3.read_bytes()[:100])
    render_condition(data, cond, tmp_path / "cache")
    assert sorted(count_renders) == sorted([p2.name, p3.name])
    assert json.loads((root / "manifest.json").read_text())["files"] == manifest["files"]

    # a touched source (same bytes) is kept; a changed source is re-rendered
    count_renders.clear()
    s0, s1 = data.image_path(0), data.image_path(1)
    os.utime(s0, (time.time() + 5,) * 2)
    Image.fromarray(255 - src).save(s1)
    render_condition(data, cond, tmp_path / "cache")
    assert count_renders == [s1.name]
    count_renders.clear()
    render_condition(data, cond, tmp_path / "cache")
    assert count_renders == []  # the touched source's new mtime was recorded


def test_render_resumes_after_kill(data, tmp_path, monkeypatch):
    real, done = RC._render_one, []

    def dies_after_two(*args):
        if len(done) == 2:
            raise KeyboardInterrupt
        done.append(args)
        return real(*args)
    monkeypatch.setattr(RC, "_render_one", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        render_condition(data, Condition("rain", 3), tmp_path / "c")
    root = RC.condition_root(data, Condition("rain", 3), tmp_path / "c")
    assert not (root / "manifest.json").exists() and (root / RC.JOURNAL).exists()
    assert not list(root.rglob("*.tmp"))
    done.clear()
    monkeypatch.setattr(RC, "_render_one", lambda *a: done.append(a) or real(*a))
    render_condition(data, Condition("rain", 3), tmp_path / "c")
    assert len(done) == 2 and (root / "manifest.json").exists()
    # same bytes as an uninterrupted render
    ref = render_condition(data, Condition("rain", 3), tmp_path / "ref")
    for info in data.images:
        assert (root / info.file_name).read_bytes() == (ref / info.file_name).read_bytes()


def test_render_parameters_versions_workers(data, tmp_path, monkeypatch, count_renders):
    cache = tmp_path / "c"
    a = render_condition(data, Condition("dark", 1), cache)
    b = render_condition(data, Condition("dark", 1), cache, suite_seed=7)
    assert a != b and b.name == "dark@1~s7" and len(count_renders) == 8
    assert render_condition(data, CLEAN, cache) == data.image_root
    count_renders.clear()
    monkeypatch.setattr(RC, "DEGRADE_VERSION", RC.DEGRADE_VERSION + 1)
    render_condition(data, Condition("dark", 1), cache)
    assert len(count_renders) == 4  # other version: everything redone
    par = render_condition(data, Condition("dark", 1), tmp_path / "par", workers=2)
    m1 = json.loads((a / "manifest.json").read_text())["files"]
    m2 = json.loads((par / "manifest.json").read_text())["files"]
    assert {f: r["sha256"] for f, r in m1.items()} == {f: r["sha256"] for f, r in m2.items()}


def test_render_rejects_file_name_outside_root(tmp_path):
    (tmp_path / "root").mkdir()
    Image.new("RGB", (40, 40)).save(tmp_path / "x.png")
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps({"images": [{"id": 1, "file_name": "../x.png", "width": 40,
                                           "height": 40}],
                               "annotations": [], "categories": [{"id": 1, "name": "a"}]}))
    with pytest.raises(DataError, match="inside the image folder"):  # the loader refuses it first
        load_coco(ann, tmp_path / "root")
    Image.new("RGB", (40, 40)).save(tmp_path / "root" / "x.png")
    ann.write_text(ann.read_text().replace("../x.png", "x.png"))
    index = load_coco(ann, tmp_path / "root")
    arrays = dict(index.arrays, names=np.frombuffer(b"../x.png", np.uint8), name_offsets=np.array([0, 8]))
    index = dataclasses.replace(index, arrays=arrays)  # an index changed after loading: the render cache still refuses
    with pytest.raises(DataError, match="outside"):
        render_condition(index, Condition("fog", 1), tmp_path / "c")


# --------------------------------------------------------------------- twins
def test_twins_on_the_fly(data):
    ds = CocoDetection(data)
    tw = DegradedTwins(ds, ["rain@2", {"corruption": "dark", "severity": 3}, "fog@1", "clean"],
                       seed=1)
    draws0 = [tw.draw(i) for i in range(len(tw))]
    for i in range(len(tw)):
        clean, deg, target = tw[i]
        ref, ref_t = ds[i]
        assert torch.equal(clean, ref) and clean.shape == deg.shape
        assert torch.equal(target["boxes"], ref_t["boxes"])
        assert deg.dtype == clean.dtype == torch.uint8  # as read: the device makes them float
        assert torch.equal(tw[i][1], deg)  # deterministic for (seed, epoch, i)
        cond, _ = tw.draw(i)
        assert torch.equal(deg, clean) == cond.is_clean
    tw.set_epoch(1)
    assert [tw.draw(i) for i in range(len(tw))] != draws0
    tw.set_epoch(0)
    assert [tw.draw(i) for i in range(len(tw))] == draws0


def test_twins_from_cache(data, tmp_path):
    tw = DegradedTwins(CocoDetection(data), ["snow@2"], cache_dir=tmp_path / "c")
    clean, deg, _ = tw[2]
    root = RC.condition_root(data, Condition("snow", 2), tmp_path / "c")
    assert torch.equal(image_to_float(deg), load_rgb(root / data.images[2].file_name))
    assert clean.shape == deg.shape
    with pytest.raises(ConfigError, match="transform"):
        DegradedTwins(CocoDetection(data, transform=lambda im, t: (im, t)), ["snow@2"],
                      cache_dir=tmp_path / "c")


@pytest.mark.parametrize("conds", [["glass_blur@1"], ["fog@1", "motion_blur@2"], ["zoom_blur"],
                                   [{"corruption": "elastic_transform", "severity": 5}], ["blur"]])
def test_twins_reject_pixel_moving(data, conds):
    with pytest.raises(ConfigError) as e:
        DegradedTwins(CocoDetection(data), conds)
    assert any(n in str(e.value) for n in MOVING) and "moves pixels" in str(e.value)
