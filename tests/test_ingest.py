"""Training ingest at scale: the compact index, loader workers, image checks, torchvision's data rules."""
from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from harness.config import ScheduleSpec
from harness.core import ConfigError, DataError
from harness.data import (CocoDetection, DegradedTwins, PreparedCondition, cached_index, check_coco, load_coco, load_rgb, open_index,
                          read_image, save_index, set_loader_epoch, train_loader, write_synthetic_coco,
                          write_synthetic_visdrone)
from harness.engine import images_to_device, training_images
from harness.plan import load_suite
from runkit import hang_guard

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    ann = write_synthetic_coco(tmp_path_factory.mktemp("syn") / "d", n_images=24, seed=5, max_objects=4)
    return ann, ann.parent


def _quirky_coco(tmp_path) -> tuple[Path, Path]:
    """COCO's quirks: sparse ids, non-contiguous categories, crowd, clipped / zero-area / <=1 px
    boxes, an image without annotations, one with only a crowd region, file-given areas."""
    root = tmp_path / "imgs"
    root.mkdir()
    images = [{"id": 900001, "file_name": "a.jpg", "width": 64, "height": 48},
              {"id": 42, "file_name": "b.jpg", "width": 48, "height": 64},
              {"id": 7, "file_name": "c.jpg", "width": 64, "height": 48},   # no annotation
              {"id": 8, "file_name": "d.jpg", "width": 64, "height": 48},   # only tiny boxes
              {"id": 9, "file_name": "e.jpg", "width": 64, "height": 48}]   # only a crowd region
    for im in images:
        Image.new("RGB", (im["width"], im["height"]), (10, 200, 30)).save(root / im["file_name"], quality=90)
    anns = [{"id": 5, "image_id": 900001, "category_id": 17, "bbox": [1.5, 2, 10, 5], "area": 33.25, "iscrowd": 0},
            {"id": 6, "image_id": 900001, "category_id": 3, "bbox": [50, 40, 30, 30]},              # clipped
            {"id": 11, "image_id": 900001, "category_id": 3, "bbox": [0, 0, 64, 48], "iscrowd": 1},
            {"id": 12, "image_id": 42, "category_id": 17, "bbox": [60, 3, 5, 5]},                  # outside: dropped
            {"id": 13, "image_id": 42, "category_id": 3, "bbox": [3, 3, 20, 30.5]},
            {"id": 14, "image_id": 8, "category_id": 3, "bbox": [3, 3, 1, 9]},                     # side <= 1
            {"id": 15, "image_id": 9, "category_id": 3, "bbox": [3, 3, 20, 20], "iscrowd": 1}]
    cats = [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}]
    ann = tmp_path / "instances.json"
    ann.write_text(json.dumps({"info": {"v": 1}, "images": images, "annotations": anns, "categories": cats}))
    return ann, root


def _same_targets(a, b):
    assert len(a) == len(b) and a.class_names == b.class_names and a.cat_id_to_label == b.cat_id_to_label
    assert list(a.images) == list(b.images)
    for i in range(len(a)):
        ta, tb = a.target(i), b.target(i)
        assert ta["image_id"] == tb["image_id"]
        for k in ("boxes", "labels", "ignore_boxes"):
            assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), (i, k)
    assert a.gt_for_eval() == b.gt_for_eval()


def _reference_targets(ann_file):
    """The targets by the rules of docs/datasets (independent of harness.data.coco): labels by
    ascending category id, boxes clipped xyxy, zero-area dropped, crowd boxes as ignore boxes."""
    data = json.loads(Path(ann_file).read_text())
    label = {c: k + 1 for k, c in enumerate(sorted(c["id"] for c in data["categories"]))}
    out = {}
    for im in data["images"]:
        W, H = im["width"], im["height"]
        boxes, labels, ignore = [], [], []
        for a in data["annotations"]:
            if a["image_id"] != im["id"]:
                continue
            x, y, w, h = a["bbox"]
            x1, y1, x2, y2 = min(max(x, 0), W), min(max(y, 0), H), min(max(x + w, 0), W), min(max(y + h, 0), H)
            if x2 <= x1 or y2 <= y1:
                continue
            if a.get("iscrowd"):
                ignore.append([x1, y1, x2, y2])
            else:
                boxes.append([x1, y1, x2, y2])
                labels.append(label[a["category_id"]])
        out[im["id"]] = (np.float32(boxes).reshape(-1, 4), labels, np.float32(ignore).reshape(-1, 4))
    return out


def test_saved_index_gives_the_same_targets_as_the_annotation_file(tmp_path, synthetic):
    ann, root = _quirky_coco(tmp_path)
    vis = write_synthetic_visdrone(tmp_path / "vis", n_images=4, seed=2)
    from harness.data import convert_visdrone
    vis_json = convert_visdrone(vis, tmp_path / "vis.json")
    voc = tmp_path / "voc"
    (voc / "Annotations").mkdir(parents=True)
    (voc / "JPEGImages").mkdir()
    for stem, objs in {"a": [("bus", (5, 6, 55, 46), 1)], "b": [("car", (1, 1, 10, 20), 0), ("bus", (11, 21, 40, 50), 0)]}.items():
        Image.new("RGB", (120, 80), (90, 90, 90)).save(voc / "JPEGImages" / f"{stem}.jpg")
        (voc / "Annotations" / f"{stem}.xml").write_text(
            f"<annotation><filename>{stem}.jpg</filename>" + "".join(
                f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
                f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objs) + "</annotation>")
    from harness.data.voc import write_voc_as_coco
    voc_json = write_voc_as_coco(voc / "Annotations", voc / "JPEGImages", tmp_path / "voc.json")
    for a, r in ((ann, root), synthetic, (vis_json, vis / "images"), (voc_json, voc / "JPEGImages")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = load_coco(a, r)
        opened = open_index(save_index(parsed, tmp_path / "idx" / Path(a).stem), r, a)
        assert isinstance(opened.arrays["ann_boxes"], np.memmap)  # shared pages, no per-process copy
        _same_targets(parsed, opened)
        ref = _reference_targets(a)
        for i in range(len(opened)):
            t = opened.target(i)
            boxes, labels, ignore = ref[t["image_id"]]
            assert np.array_equal(t["boxes"].numpy(), boxes) and t["labels"].tolist() == labels
            assert np.array_equal(t["ignore_boxes"].numpy(), ignore)


def test_evaluation_ground_truth_keeps_file_areas_and_crowd(tmp_path):
    ann, root = _quirky_coco(tmp_path)
    gt = load_coco(ann, root).gt_for_eval()
    by_id = {a["id"]: a for a in gt["annotations"]}
    assert by_id[5]["area"] == 33.25 and by_id[5]["bbox"] == [1.5, 2.0, 10.0, 5.0]  # the file's area, not the box's
    assert by_id[6]["bbox"] == [50.0, 40.0, 14.0, 8.0] and by_id[6]["area"] == 14.0 * 8.0
    assert by_id[11]["iscrowd"] == 1 and 12 not in by_id
    assert gt["categories"] == [{"id": 17, "name": "dog"}, {"id": 3, "name": "cat"}] and gt["info"] == {"v": 1}


def test_index_is_keyed_by_content_and_rebuilt_when_the_file_changes(tmp_path):
    ann, root = _quirky_coco(tmp_path)
    first, folder = cached_index(ann, root, tmp_path / "cache")
    again, same = cached_index(ann, root, tmp_path / "cache")
    assert same == folder and len(list((tmp_path / "cache" / "index").iterdir())) == 1
    data = json.loads(ann.read_text())
    data["annotations"][0]["bbox"] = [2, 2, 4, 4]
    ann.write_text(json.dumps(data))
    os.utime(ann, ns=(0, ann.stat().st_mtime_ns))  # even with an old mtime: the content decides
    changed, other = cached_index(ann, root, tmp_path / "cache")
    assert other != folder and changed.target(0)["boxes"][0].tolist() == [2.0, 2.0, 6.0, 6.0]


@pytest.mark.timeout(hang_guard(10))
def test_an_index_build_killed_midway_is_never_opened_and_is_rebuilt(tmp_path, synthetic):
    """SIGKILL while the driver saves an index (after some arrays are written): no index folder
    appears, the next run builds it again, and the dead build's files are removed."""
    ann, root = synthetic
    script = f"""
import os, signal, numpy as np
from harness.data import coco
written = []
def save(path, array):
    written.append(path)
    np.lib.format.write_array(open(path, "wb"), array)
    if len(written) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
coco.np.save = save
coco.cached_index({str(ann)!r}, {str(root)!r}, {str(tmp_path)!r})
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=hang_guard(10))
    assert done.returncode == -9, done.stderr
    left = list((tmp_path / "index").iterdir())
    assert len(left) == 1 and left[0].name.startswith(".") and not (left[0] / "meta.json").exists(), left
    index, folder = cached_index(ann, root, tmp_path)
    assert sorted(p.name for p in (tmp_path / "index").iterdir()) == [folder.name]
    _same_targets(index, load_coco(ann, root))


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("unshare"), reason="needs root and unshare(1) for a private mount")
@pytest.mark.timeout(hang_guard(10))
def test_a_node_without_the_driver_cache_builds_the_index_into_its_own(tmp_path, synthetic):
    """A node that cannot see the driver's data cache (here: hidden by a tmpfs in a private mount
    namespace) builds the index from the annotation file into its own DETBENCH_CACHE."""
    ann, root = synthetic
    driver, node = tmp_path / "driver-cache", tmp_path / "node-cache"
    _, folder = cached_index(ann, root, driver)
    script = (f"from harness.data.loader import split_index; import os; "
              f"assert not os.path.exists({str(folder)!r}); "
              f"print(len(split_index({str(folder)!r}, {str(ann)!r}, {str(root)!r})))")
    done = subprocess.run(["unshare", "-m", "sh", "-c", f'mount -t tmpfs none "{driver}" && exec "$0" -c "$1"',
                           sys.executable, script], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, DETBENCH_CACHE=str(node)), timeout=hang_guard(10))
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == str(len(load_coco(ann, root)))
    built = node / "index" / folder.name
    assert (built / "meta.json").is_file() and (folder / "meta.json").is_file()
    _same_targets(open_index(built, root, ann), load_coco(ann, root))


def test_drop_empty_follows_torchvision_references(tmp_path):
    """``_coco_remove_images_without_annotations``: no annotation, or every box with a side <= 1 px
    -> dropped; crowd annotations count as annotations."""
    ann, root = _quirky_coco(tmp_path)
    index = load_coco(ann, root)
    assert [index.images[i].id for i in index.trainable()] == [900001, 42, 9]
    keep = training_images(index, ScheduleSpec(drop_empty_train_images=True), seed=0)
    assert len(keep) == 3 and keep[2][1]["image_id"] == 9
    assert len(training_images(index, ScheduleSpec(), seed=0)) == 5


def test_hflip_flips_half_the_images_and_their_boxes(synthetic):
    ann, root = synthetic
    index = load_coco(ann, root)
    plain = training_images(index, ScheduleSpec(), seed=3)
    flipping = training_images(index, ScheduleSpec(augment=["hflip"]), seed=3)
    assert not any(plain.flipped(i) for i in range(len(plain)))
    draws = []
    for epoch in range(25):
        flipping.set_epoch(epoch)
        draws += [flipping.flipped(i) for i in range(len(flipping))]
    n, k = len(draws), sum(draws)
    assert abs(k - n / 2) < 4 * (n / 4) ** 0.5  # binomial(600, 1/2): 4 sigma
    flipping.set_epoch(0)
    for i in range(len(flipping)):
        (im, t), (im0, t0) = flipping[i], plain[i]
        w = index.images[i].width
        if flipping.flipped(i):
            assert torch.equal(im, im0.flip(-1))
            x1, y1, x2, y2 = t0["boxes"].unbind(1)
            assert torch.equal(t["boxes"], torch.stack([w - x2, y1, w - x1, y2], 1))
        else:
            assert torch.equal(im, im0) and torch.equal(t["boxes"], t0["boxes"])


def _batches(dataset, workers, epochs=2):
    loader = train_loader(dataset, 3, seed=11, num_workers=workers)
    out = []
    for epoch in range(epochs):
        set_loader_epoch(loader, epoch)
        out += list(loader)
    return out


def _equal(a, b):
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b) \
            and (a.numel() == 0 or a.stride() == b.stride())
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.timeout(hang_guard(8))
def test_loader_workers_give_the_same_batches(synthetic):
    """Same seed, 0 or 2 loader processes (persistent across epochs): identical batches, with
    per-epoch flips and FCTL's on-the-fly degraded twins drawn inside the workers."""
    ann, root = synthetic
    index = load_coco(ann, root)

    def dataset():  # (clean, degraded) inputs with per-epoch flips, as FCTL's corrective stage trains
        from methods.fctl import TwinPairs
        return TwinPairs(DegradedTwins(training_images(index, ScheduleSpec(augment=["hflip"]), seed=2),
                                       ["fog@2", "dark@3", "clean"], seed=2))

    inline, workers = _batches(dataset(), 0), _batches(dataset(), 2)
    assert len(inline) == len(workers) == 2 * (len(index) // 3)
    assert _equal(inline, workers)
    assert not _equal(inline[:len(inline) // 2], inline[len(inline) // 2:])  # epochs differ


@pytest.mark.timeout(hang_guard(8))
def test_loader_workers_reuse_their_shared_buffers(synthetic, monkeypatch):
    """Batches cross from the loader workers in a few shared buffers kept for the whole run (one
    descriptor per buffer, not one fresh segment per tensor); an epoch left early hands its
    buffers back, and batches held by the training loop are never overwritten."""
    from harness.data import transfer
    received = {"batches": 0, "buffers": 0, "used_once": 0}
    receive = transfer.PackingCollate.receive

    def counting(self, packed):
        received["batches"] += 1
        received["buffers"] += packed.buffer is not None
        received["used_once"] += packed.slot is None
        return receive(self, packed)
    monkeypatch.setattr(transfer.PackingCollate, "receive", counting)
    ann, root = synthetic
    dataset = training_images(load_coco(ann, root), ScheduleSpec(augment=["hflip"]), seed=2)
    loader = train_loader(dataset, 2, seed=11, num_workers=2)
    for epoch in range(4):
        set_loader_epoch(loader, epoch)
        if epoch == 0:
            next(iter(loader))  # left early: its batches ahead are dropped unread
            continue
        held = list(loader)
        inline = train_loader(dataset, 2, seed=11, num_workers=0)
        set_loader_epoch(inline, epoch)
        assert _equal(held, list(inline)), epoch
    assert received["used_once"] == 0
    assert received["buffers"] <= 2 * loader.collate_fn.slots < received["batches"] / 4, received


@pytest.mark.timeout(hang_guard(8))
def test_a_loader_dropped_mid_epoch_lets_its_workers_go(synthetic):
    """A stage that fails mid-epoch drops its loader: the receiving thread stops and the loader
    workers exit (nothing lives on for the rest of the Train worker's life)."""
    import gc
    import threading
    import time
    ann, root = synthetic
    loader = train_loader(CocoDetection(load_coco(ann, root)), 2, seed=0, num_workers=2)
    next(iter(loader))
    workers = list(loader._iterator._workers)
    assert any(t.name == "detbench-loader-receive" for t in threading.enumerate())
    del loader
    gc.collect()
    deadline = time.time() + hang_guard(2)
    while time.time() < deadline and (any(w.is_alive() for w in workers)
                                      or any(t.name == "detbench-loader-receive" for t in threading.enumerate())):
        time.sleep(0.1)
    assert not any(w.is_alive() for w in workers)
    assert not any(t.name == "detbench-loader-receive" for t in threading.enumerate())


def test_a_stale_lease_frees_no_buffer():
    from harness.data.transfer import PackingCollate
    pool = PackingCollate(list, num_workers=1, slots=2)
    pool.leases[1] = 77
    pool.release(0, 1, 76)  # a batch of a replaced worker handed back late
    assert pool.leases[1] == 77
    pool.release(0, 1, 77)
    assert pool.leases[1] == 0


def test_images_reach_the_device_as_float():
    u8 = torch.tensor([[[0, 51, 255]]], dtype=torch.uint8).expand(3, 1, 3)
    moved = images_to_device([(u8, u8), {"v": u8}], torch.device("cpu"))
    assert moved[0][0].dtype == torch.float32
    assert torch.equal(moved[0][0][0, 0], torch.tensor([0, 51, 255], dtype=torch.float32) / 255)
    assert torch.equal(moved[1]["v"], moved[0][1])


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_fast_decode_has_the_pixels_of_pil(tmp_path, fmt):
    rng = np.random.default_rng(0)
    a = (rng.random((37, 53, 3)) * 255).astype(np.uint8)
    for name, img in (("rgb", Image.fromarray(a)), ("grey", Image.fromarray(a[..., 0]))):
        path = tmp_path / f"{name}.{fmt.lower()}"
        img.save(path, fmt)
        got = read_image(path)
        want = load_rgb(path)
        assert torch.equal(got.float() / 255 if got.dtype == torch.uint8 else got, want), (fmt, name)


def _truncated_jpeg_set(tmp_path):
    ann = write_synthetic_coco(tmp_path / "d", n_images=3, seed=1)
    root = ann.parent
    data = json.loads(ann.read_text())
    im = data["images"][1]
    buf = io.BytesIO()
    noise = (np.random.default_rng(0).random((im["height"], im["width"], 3)) * 255).astype(np.uint8)
    Image.fromarray(noise).save(buf, "JPEG", quality=95)  # mostly scan data: half of it keeps the header
    (root / im["file_name"]).write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])  # truncated, header intact
    return ann, root, im


def test_truncated_jpeg_found_by_decode_check_and_named_in_a_worker(tmp_path):
    ann, root, im = _truncated_jpeg_set(tmp_path)
    check_coco(ann, root, level="header")  # a header check cannot see it
    with pytest.raises(DataError) as e:
        check_coco(ann, root, level="decode")
    assert im["file_name"] in str(e.value) and f"image id={im['id']}" in str(e.value)
    loader = train_loader(CocoDetection(load_coco(ann, root)), 1, seed=0, num_workers=1)
    with pytest.raises(DataError) as e:  # in a loader worker: the file and record named, not a hang
        list(loader)
    assert im["file_name"] in str(e.value) and f"image id={im['id']}" in str(e.value)


def test_cli_decode_check_exits_2_naming_the_image(tmp_path):
    ann, root, im = _truncated_jpeg_set(tmp_path)
    run = subprocess.run([sys.executable, "-m", "harness.app.cli", "data", "check", str(ann), "--images", str(root),
                          "--check-images", "decode"], capture_output=True, text=True, timeout=hang_guard(5))
    assert run.returncode == 2 and im["file_name"] in run.stderr, run.stderr


def test_more_loader_workers_than_cpus_is_refused(tmp_path):
    import yaml
    suite = tmp_path / "s.yaml"
    data = yaml.safe_load((ROOT / "suites" / "smoke.yaml").read_text())
    data.setdefault("schedule", {})["loader_workers"] = 3
    data.setdefault("resources", {})["cpus_per_worker"] = 2
    suite.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_suite(suite, check_paths=False)
    assert "schedule.loader_workers" in str(e.value) and "s.yaml" in str(e.value)
    data["schedule"]["loader_workers"] = 2
    suite.write_text(yaml.safe_dump(data))
    load_suite(suite, check_paths=False)


def _stages():
    from harness.plugin import METHODS
    return [(name, stage) for name in sorted(METHODS.names()) for stage in METHODS.get(name).stage_names()]


@pytest.mark.timeout(hang_guard(8))
@pytest.mark.parametrize("name,stage", _stages())
def test_every_training_set_is_independent_of_loader_workers(tmp_path, synthetic, name, stage):
    """What a method's stage trains on (FCTL's twins, SoCo's views, ...) is built inside the loader
    workers, and is the same batch for batch whether 0 or 2 of them build it."""
    from harness.plugin import METHODS
    from runkit import method_context
    cls = METHODS.get(name)
    plugin = cls(cls.validate_config(cls.test_config(tmp_path)))
    ann, root = synthetic
    index = load_coco(ann, root)
    ctx = method_context(cls, stage)
    ctx.conditions = [PreparedCondition("fog@2", "fog", 2, str(ann), str(root))]  # what twins train on
    runs = [_batches(plugin.train_dataset(stage, ctx, training_images(index, ScheduleSpec(augment=["hflip"]), seed=4)),
                     workers, epochs=2) for workers in (0, 2)]
    assert _equal(*runs)


def test_rendered_twins_are_flipped_with_their_clean_image(tmp_path, synthetic):
    """Twins read from the render cache share the clean image's flip (the rendered file is not flipped)."""
    ann, root = synthetic
    index = load_coco(ann, root)
    flipping = training_images(index, ScheduleSpec(augment=["hflip"]), seed=3)
    twins = DegradedTwins(flipping, ["fog@2"], cache_dir=tmp_path / "render", seed=3)
    rendered = DegradedTwins(CocoDetection(index), ["fog@2"], cache_dir=tmp_path / "render", seed=3)
    assert {flipping.flipped(i) for i in range(len(index))} == {True, False}
    for i in range(len(index)):
        clean, degraded, _ = twins[i]
        plain_clean, plain_degraded, _ = rendered[i]
        flip = flipping.flipped(i)
        assert torch.equal(clean, plain_clean.flip(-1) if flip else plain_clean)
        assert torch.equal(degraded, plain_degraded.flip(-1) if flip else plain_degraded)
