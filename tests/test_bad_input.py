"""Broken inputs of the kinds users really produce, generated: every one is refused the same way.

For each broken suite or annotation file: ``detbench run`` exits 2 with ONE line on stderr that
names the file and the key path (or record and field), no traceback, no run directory, within a few
seconds, before Ray starts. Annotation and image problems give the same line from ``detbench data
check`` (one validation path). Cases are generated from a valid suite and a valid COCO split:
truncations at many offsets, wrong types and out-of-range values at typed key paths, alias chains,
search distributions with impossible bounds or values, paths that leave the image folder, empty
and undecodable images.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from harness.app.cli import main
from runkit import DETBENCH, hang_guard


@pytest.fixture
def world(tmp_path, tiny_data, monkeypatch):
    """A writable COCO copy (train split) and a valid suite using it; the cache in tmp_path."""
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    root = tmp_path / "data"
    shutil.copytree(tiny_data["train_images"], root)
    suite = {
        "name": "bad",
        "datasets": [{"name": "d", "format": "coco",
                      "train": {"annotations": str(root / "annotations.json"), "images": str(root)},
                      "val": {"annotations": tiny_data["val_annotations"], "images": tiny_data["val_images"]}}],
        "detector": {"fpn_width": 16, "image_size": 64},
        "seeds": [0],
        "schedule": {"epochs": 1, "batch_size": 2, "lr": 0.01},
        "resources": {"workers_per_trial": 1, "cpus_per_worker": 1},
        "methods": [{"name": "focal"}],  # last, one line: every truncation of the file breaks it
    }
    return {"root": root, "ann": root / "annotations.json", "suite": suite, "tmp": tmp_path}


def write_suite(world, suite: dict | str) -> Path:
    path = world["tmp"] / "suite.yaml"
    text = suite if isinstance(suite, str) else yaml.safe_dump(suite, sort_keys=False, default_flow_style=None)
    path.write_text(text)
    return path


def refused(capsys, world, suite_path: Path, *where: str) -> str:
    """Run the suite in-process; assert the refusal contract and return the message line."""
    out_dir = world["tmp"] / "runs"
    t0 = time.perf_counter()
    code = main(["run", str(suite_path), "--out", str(out_dir)])
    elapsed = time.perf_counter() - t0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.strip()]
    assert code == 2, f"exit {code}: {captured.err[-2000:]}"
    assert len(lines) == 1 and lines[0].startswith("detbench: error: "), captured.err
    assert "Traceback" not in captured.err + captured.out
    for piece in where:
        assert piece in lines[0], f"{piece!r} not named in: {lines[0]}"
    assert not out_dir.exists(), "a refused run left a run directory"
    assert elapsed < 10, f"took {elapsed:.1f} s to refuse"
    return lines[0]


# --------------------------------------------------------------------------- suite files
def test_truncated_suites(capsys, world):
    text = yaml.safe_dump(world["suite"], sort_keys=False, default_flow_style=None)
    rng = random.Random(0)
    cuts = sorted(rng.sample(range(1, len(text) - 1), 10)) + [text.index("methods")]
    for cut in cuts:
        refused(capsys, world, write_suite(world, text[:cut]), "suite.yaml")


#: Typed key paths of the suite and values their field cannot take.
TYPED = {
    ("schedule", "epochs"): ["five", 0, -2, 1.5, [1]],
    ("schedule", "lr"): ["fast", 0, -0.1, {"a": 1}],
    ("schedule", "batch_size"): [0, "8x"],
    ("schedule", "optimizer"): ["sgdd", 3],
    ("detector", "fpn_width"): [4, "wide"],
    ("detector", "image_size"): [16, None],
    ("detector", "backbone"): ["resnet51", 18],
    ("resources", "workers_per_trial"): [0, "two"],
    ("resources", "cpus_per_worker"): [0, -1],
    ("seeds",): ["zero", [], ["a"]],
    ("datasets", 0, "format"): ["yolo"],
    ("methods", 0, "name"): ["focall", 7],
}


def _set(d, path, value):
    for key in path[:-1]:
        d = d[key]
    d[path[-1]] = value


def test_wrong_types_and_ranges(capsys, world):
    rng = random.Random(1)
    cases = [(path, v) for path, values in TYPED.items() for v in values]
    for path, value in rng.sample(cases, 16):
        suite = json.loads(json.dumps(world["suite"]))
        _set(suite, path, value)
        key = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in path).replace(".[", "[")
        refused(capsys, world, write_suite(world, suite), "suite.yaml", key)


def test_negative_synthetic_seed_names_key_path_and_value(capsys, world):
    suite = dict(world["suite"], datasets=[{"name": "s", "format": "synthetic", "synthetic": {"seed": -3}}])
    line = refused(capsys, world, write_suite(world, suite), "suite.yaml", "datasets[0].synthetic.seed")
    assert "-3" in line


ALIAS_BOMB = """
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
"""


@pytest.mark.parametrize("where", ["top", "choice"])
def test_alias_chains_refused_wherever_they_are(capsys, world, where):
    text = yaml.safe_dump(world["suite"], sort_keys=False, default_flow_style=None)
    if where == "choice":
        text = ALIAS_BOMB + text.replace("- name: focal", "- name: focal\n  search: {space: {gamma: {choice: *h}}}")
    else:
        text = ALIAS_BOMB + text
    line = refused(capsys, world, write_suite(world, text), "suite.yaml")
    assert "expands" in line


@pytest.mark.parametrize("dist,key", [
    ({"gamma": {"choice": [1.0, "two"]}}, "search.space.gamma.choice[1]"),
    ({"gamma": {"choice": [[1, 2]]}}, "search.space.gamma.choice[0]"),
    ({"gamma": {"choice": []}}, "search.space.gamma.choice"),
    ({"schedule.lr": {"loguniform": [0, 0.1]}}, "search.space.schedule.lr.loguniform"),
    ({"schedule.lr": {"uniform": [0.1, 0.01]}}, "search.space.schedule.lr.uniform"),
    ({"schedule.lr": {"uniform": [-0.1, 0.1]}}, "search.space.schedule.lr.uniform[0]"),
    ({"schedule.epochs": {"randint": [1.5, 4]}}, "search.space.schedule.epochs.randint"),
    ({"schedule.epochs": {"randint": [0, 4]}}, "search.space.schedule.epochs.randint[0]"),
    ({"alpha": {"uniform": [0.1, 0.5], "choice": [1]}}, "search.space.alpha"),
    ({"gama": {"uniform": [1, 2]}}, "search.space.gama"),
])
def test_search_distributions_checked_against_their_field(capsys, world, dist, key):
    suite = json.loads(json.dumps(world["suite"]))
    suite["methods"] = [{"name": "focal", "search": {"space": dist, "num_samples": 2}}]
    refused(capsys, world, write_suite(world, suite), "suite.yaml", f"methods[0].{key}")


# --------------------------------------------------------------------------- annotations and images
def _image_record(world) -> dict:
    return json.loads(world["ann"].read_text())["images"][0]


def _rewrite(world, fn) -> dict:
    data = json.loads(world["ann"].read_text())
    fn(data)
    world["ann"].write_text(json.dumps(data))
    return data


def _same_from_data_check(capsys, world, line: str) -> None:
    assert main(["data", "check", str(world["ann"]), "--images", str(world["root"])]) == 2
    assert capsys.readouterr().err.strip() == line


def test_truncated_annotation_files(capsys, world):
    text = world["ann"].read_text()
    rng = random.Random(2)
    for cut in sorted(rng.sample(range(1, len(text) - 1), 8)):
        world["ann"].write_text(text[:cut])
        line = refused(capsys, world, write_suite(world, world["suite"]), "annotations.json")
        _same_from_data_check(capsys, world, line)


@pytest.mark.parametrize("name", ["../outside.png", "sub/../../outside.png", "/etc/hostname", "LINK"])
def test_image_paths_that_leave_the_image_folder(capsys, world, name):
    outside = world["tmp"] / "outside.png"
    first = world["root"] / _image_record(world)["file_name"]
    shutil.copyfile(first, outside)
    if name == "LINK":
        (world["root"] / "link.png").symlink_to(outside)
        name = "link.png"
    iid = _image_record(world)["id"]
    _rewrite(world, lambda d: d["images"][0].update(file_name=name))
    line = refused(capsys, world, write_suite(world, world["suite"]), "annotations.json", f"image id={iid}",
                   "file_name")
    _same_from_data_check(capsys, world, line)


def test_link_inside_the_image_folder_is_fine(capsys, world):
    rec = _image_record(world)
    (world["root"] / "alias.png").symlink_to(world["root"] / rec["file_name"])
    _rewrite(world, lambda d: d["images"][0].update(file_name="alias.png"))
    assert main(["data", "check", str(world["ann"]), "--images", str(world["root"])]) == 0


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_empty_or_undecodable_image_refused_before_the_run(capsys, world, content):
    rec = _image_record(world)
    (world["root"] / rec["file_name"]).write_bytes(content)
    line = refused(capsys, world, write_suite(world, world["suite"]), "annotations.json",
                   f"image id={rec['id']}", "file_name", "unreadable")
    _same_from_data_check(capsys, world, line)


def test_image_of_another_size_refused_before_the_run(capsys, world):
    rec = _image_record(world)
    _rewrite(world, lambda d: d["images"][0].update(width=rec["width"] + 3))
    line = refused(capsys, world, write_suite(world, world["suite"]), "annotations.json",
                   f"image id={rec['id']}", "width")
    _same_from_data_check(capsys, world, line)


@pytest.mark.parametrize("breakage,field", [
    (lambda d: d["annotations"][0].update(bbox="1,2,3,4"), "bbox"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3]), "bbox"),
    (lambda d: d["annotations"][0].pop("category_id"), "category_id"),
    (lambda d: d["images"][0].update(height=-5), "height"),
    (lambda d: d["images"][1].update(id=d["images"][0]["id"]), "id"),
    (lambda d: d["categories"][0].pop("name"), "name"),
    (lambda d: d.pop("images"), "images"),
])
def test_broken_records(capsys, world, breakage, field):
    _rewrite(world, breakage)
    line = refused(capsys, world, write_suite(world, world["suite"]), "annotations.json", field)
    _same_from_data_check(capsys, world, line)


# --------------------------------------------------------------------------- the real CLI, with Ray
@pytest.mark.timeout(hang_guard(17))
def test_unschedulable_request_names_the_suite_file(tmp_path, tiny_data):
    suite = tmp_path / "big.yaml"
    suite.write_text(f"""
name: big
datasets:
  - name: d
    format: coco
    train: {{annotations: {tiny_data['train_annotations']}, images: {tiny_data['train_images']}}}
    val: {{annotations: {tiny_data['val_annotations']}, images: {tiny_data['val_images']}}}
methods: [{{name: faster_rcnn}}]
resources: {{workers_per_trial: 1, cpus_per_worker: 64}}
""")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(DETBENCH + ["run", str(suite), "--out", str(tmp_path / "runs")], capture_output=True,
                         text=True, timeout=hang_guard(16), env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert str(suite) in lines[0] and "resources" in lines[0] and "PENDING" in lines[0]
    assert "Token authentication" not in out.stderr + out.stdout  # Ray's notices stay out of the terminal
    assert not (tmp_path / "runs").exists()


@pytest.mark.timeout(hang_guard(25))
def test_truncated_jpeg_refused_by_the_cluster_decode_before_the_run(world):
    """--check-images decode: the header check passes a JPEG cut in its scan data; the full decode,
    as Ray tasks on the cluster's nodes, refuses it naming file, record and node; no run directory."""
    import io

    import numpy as np
    from PIL import Image
    rec = _image_record(world)
    noise = (np.random.default_rng(0).random((rec["height"], rec["width"], 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    (world["root"] / rec["file_name"]).write_bytes(buf.getvalue()[: len(buf.getvalue()) * 2 // 3])
    suite = write_suite(world, world["suite"])
    assert main(["data", "check", str(world["ann"]), "--images", str(world["root"])]) == 0  # header: passes
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    out = subprocess.run(DETBENCH + ["run", str(suite), "--out", str(world["tmp"] / "runs"), "--check-images",
                                     "decode", "--quiet"], capture_output=True, text=True, timeout=hang_guard(24),
                         env=env)
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1, out.stderr
    assert rec["file_name"] in lines[0] and f"image id={rec['id']}" in lines[0] and "on node" in lines[0], lines[0]
    assert not (world["tmp"] / "runs").exists()


# --------------------------------------------------------------------------- real-scale recipes
def _resnet18_file(world, state=None) -> Path:
    import torch
    from torchvision.models import resnet18
    path = world["tmp"] / "weights.pth"
    torch.save(resnet18().state_dict() if state is None else state, path)
    return path


@pytest.mark.parametrize("case,named", [
    ("not_state_dict", ("weights.pth", "detector.backbone_weights", "not a state dict")),
    ("wrong_arch", ("weights.pth", "detector.backbone_weights", "key")),
    ("missing_file", ("nowhere.pth", "detector.backbone_weights", "not found")),
    ("torchvision_absent", ("detector.backbone_weights", "resnet18-f37072fd.pth", "hub/checkpoints")),
    ("trainable_layers", ("suite.yaml", "detector.trainable_layers", "got 7")),
    ("sizes", ("suite.yaml", "detector", "min_size 96 is larger than max_size 64")),
    ("lr_steps", ("suite.yaml", "schedule", "lr_steps must be ascending epochs in 1..1")),
    ("preset", ("suite.yaml", "detector.preset", "torchvision_v2")),
    ("checkpoint_absent", ("detector.init_checkpoint", "not found")),
])
def test_bad_recipe_inputs(capsys, world, monkeypatch, case, named):
    monkeypatch.setenv("TORCH_HOME", str(world["tmp"] / "torch"))
    suite = world["suite"]
    det = suite["detector"]
    if case == "not_state_dict":
        det["backbone_weights"] = str(_resnet18_file(world, [1, 2, 3]))
    elif case == "wrong_arch":
        det.update(backbone="resnet50", backbone_weights=str(_resnet18_file(world)))
    elif case == "missing_file":
        det["backbone_weights"] = str(world["tmp"] / "nowhere.pth")
    elif case == "torchvision_absent":
        det["backbone_weights"] = "torchvision:ResNet18_Weights.IMAGENET1K_V1"
    elif case == "trainable_layers":
        det["trainable_layers"] = 7
    elif case == "sizes":
        det.update(min_size=96, max_size=64)
    elif case == "lr_steps":
        suite["schedule"].update(lr_schedule="multistep", lr_steps=[3])
    elif case == "preset":
        det.update(preset="torchvision_v2", backbone="mobilenet_v3")
    elif case == "checkpoint_absent":
        det["init_checkpoint"] = str(world["tmp"] / "nowhere.pt")
    refused(capsys, world, write_suite(world, suite), *named)
