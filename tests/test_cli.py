"""The CLI on bad input: exit 2, one line naming file / record / field, nothing left behind."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from harness.app.cli import main
from runkit import hang_guard


@pytest.fixture
def coco_copy(tmp_path, tiny_data):
    """A writable copy of the tiny train split."""
    root = tmp_path / "data"
    shutil.copytree(tiny_data["train_images"], root)
    return root, root / "annotations.json"


def corrupt(ann, fn):
    data = json.loads(ann.read_text())
    fn(data)
    ann.write_text(json.dumps(data))
    return data


def run_check(capsys, ann, images):
    code = main(["data", "check", str(ann), "--images", str(images)])
    return code, capsys.readouterr()


def test_check_ok(capsys, coco_copy):
    root, ann = coco_copy
    code, out = run_check(capsys, ann, root)
    assert code == 0 and "ok" in out.out


def test_malformed_json(capsys, coco_copy):
    root, ann = coco_copy
    ann.write_text('{"images": [')
    code, out = run_check(capsys, ann, root)
    assert code == 2 and "annotations.json" in out.err and "line" in out.err


def test_missing_image(capsys, coco_copy):
    root, ann = coco_copy
    data = json.loads(ann.read_text())
    (root / data["images"][0]["file_name"]).unlink()
    code, out = run_check(capsys, ann, root)
    assert code == 2 and f"image id={data['images'][0]['id']}" in out.err and "file_name" in out.err


def test_unknown_category(capsys, coco_copy):
    root, ann = coco_copy
    data = corrupt(ann, lambda d: d["annotations"][0].update(category_id=999))
    code, out = run_check(capsys, ann, root)
    assert code == 2 and f"annotation id={data['annotations'][0]['id']}" in out.err
    assert "category_id" in out.err


def test_negative_bbox_width(capsys, coco_copy):
    root, ann = coco_copy
    corrupt(ann, lambda d: d["annotations"][1]["bbox"].__setitem__(2, -4.0))
    code, out = run_check(capsys, ann, root)
    assert code == 2 and "bbox" in out.err


def test_run_with_bad_dataset_exits_2_without_run_dir(capsys, tmp_path, coco_copy, tiny_data):
    root, ann = coco_copy
    corrupt(ann, lambda d: d["annotations"][0].update(category_id=999))
    suite = tmp_path / "s.yaml"
    suite.write_text(f"""
name: bad
datasets:
  - name: d
    format: coco
    train: {{annotations: {ann}, images: {root}}}
    val: {{annotations: {tiny_data['val_annotations']}, images: {tiny_data['val_images']}}}
methods: [{{name: faster_rcnn}}]
""")
    out_dir = tmp_path / "runs"
    assert main(["run", str(suite), "--out", str(out_dir)]) == 2
    err = capsys.readouterr().err
    assert "category_id" in err and "annotations.json" in err
    assert not out_dir.exists()


def test_synth_then_check(capsys, tmp_path):
    out = tmp_path / "syn"
    assert main(["data", "synth", "--format", "coco", str(out), "--images", "3", "--seed", "1"]) == 0
    assert main(["data", "check", str(out / "annotations.json"), "--images", str(out)]) == 0


def test_synth_unknown_format(capsys, tmp_path):
    assert main(["data", "synth", "--format", "yolo", str(tmp_path / "x")]) == 2


@pytest.mark.slow
@pytest.mark.timeout(hang_guard(13))
def test_default_is_a_new_local_cluster_even_when_ray_start_left_one(tmp_path):
    """``ray start`` (or a test) leaves /tmp/ray/ray_current_cluster; a plain ``detbench`` must not
    attach to that cluster (here a dead address) but start the embedded one the README describes."""
    import os
    import subprocess

    from ray._private.utils import get_ray_address_file

    from harness.sweep.tuners import ray_address
    from runkit import DETBENCH
    address_file = Path(get_ray_address_file(None))
    saved = address_file.read_text() if address_file.exists() else None
    address_file.parent.mkdir(parents=True, exist_ok=True)
    address_file.write_text("127.0.0.1:1")  # nothing listens there
    try:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        out = subprocess.run(DETBENCH + ["cluster", "info"], capture_output=True, text=True, timeout=hang_guard(12), env=env)
    finally:
        address_file.unlink(missing_ok=True)  # the cluster it started may have removed it on exit
        if saved is not None:
            address_file.write_text(saved)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "Ray cluster" in out.stdout and "127.0.0.1:1\n" not in out.stdout
    assert "Token authentication" not in out.stderr  # Ray's notices go to logs, not the terminal
    env_address = os.environ.pop("RAY_ADDRESS", None)
    try:
        assert ray_address(None) == "local" and ray_address("auto") == "auto"
        os.environ["RAY_ADDRESS"] = "ray://head:10001"
        assert ray_address(None) == "ray://head:10001"
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        if env_address is not None:
            os.environ["RAY_ADDRESS"] = env_address
