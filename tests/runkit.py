"""Helpers of the tests that run detbench for real: the tiny dataset block of their suites, waiting
for run-directory states, finding and killing Ray processes."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

#: How much slower than the machine the idle times in this suite were measured on (a 2-core AVX-512
#: EPYC) the slowest machine CI has had is: a 2-core AVX2 EPYC ran the Optuna/ASHA sweep test in
#: 315 s idle where the measuring machine took 95 s (3.3x); 3.5 rounds it up.
SLOWEST_MACHINE = 3.5
#: A time limit is a hang guard, never a speed check: this many times the slowest machine's idle time,
#: so a loaded machine (another process on one of its two cores) does not trip it.
HANG_MARGIN = 3


def hang_guard(idle_s: float) -> int:
    """The time limit (s) of a step that takes ``idle_s`` on the measuring machine (see above)."""
    return math.ceil(HANG_MARGIN * SLOWEST_MACHINE * idle_s)


#: The ``datasets:`` + ``detector:`` block of the test suites (``str.format`` with the ``tiny_data`` fixture).
TINY_DATA = """
datasets:
  - name: tiny
    format: coco
    train: {{annotations: {train_annotations}, images: {train_images}}}
    val: {{annotations: {val_annotations}, images: {val_images}}}
detector: {{fpn_width: 16, image_size: 64}}
"""


#: ``detbench`` as a subprocess of the test (its own driver, killable on its own).
DETBENCH = [sys.executable, "-m", "harness.app.cli"]


def start_detbench(args: list[str], log: Path) -> subprocess.Popen:
    """``detbench ARGS`` in the background, output to ``log``, in its own session (kill-safe)."""
    return subprocess.Popen(DETBENCH + args, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, log=None):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"driver exited ({proc.returncode}) before {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)
    pytest.fail(f"timed out waiting for {what}")


def checkpoints(run_dir: Path, trial_id: str) -> list[Path]:
    """The epoch checkpoints Ray Train has registered (a restarted worker group resumes from
    these), per its snapshot file; a folder still being uploaded does not count yet."""
    folder = run_dir / "train" / trial_id
    try:
        snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    return [folder / n for n in names if (folder / n / "state.json").is_file()]


def final_checkpoint_state(run_dir: Path, trial_id: str) -> dict:
    """``state.json`` of the trial's last registered checkpoint (stage, its state, stages done)."""
    found = checkpoints(run_dir, trial_id)
    assert found, f"no checkpoint of trial {trial_id}"
    return json.loads((found[-1] / "state.json").read_text())


def markers(run_dir: Path) -> list[str]:
    folder = run_dir / "trials"
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def pids_matching(text: str) -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if text in cmd:
                pids.append(int(proc.name))
    return pids


def ray_pids() -> set[int]:
    return set(pids_matching("raylet")) | set(pids_matching("gcs_server"))


def ray_gone(timeout: float = hang_guard(3), ignore: set[int] = frozenset()) -> bool:
    """No Ray cluster processes left but those in ``ignore`` (clusters that were running before
    the test started: another test session's, a user's ``ray start``)."""
    end = time.time() + timeout
    while time.time() < end:
        if not ray_pids() - set(ignore):
            return True
        time.sleep(0.5)
    return False


def method_context(method_cls, stage: str, artifacts: dict | None = None):
    """A StageContext for a plugin's stage on the tiny detector (3 classes, CPU)."""
    import torch

    from harness.config import DetectorSpec, ScheduleSpec
    from harness.plugin import StageContext
    return StageContext(stage=stage, detector=DetectorSpec(backbone="resnet18", fpn_width=16, image_size=64),
                        arch=method_cls.arch, schedule=ScheduleSpec(epochs=2), num_classes=3,
                        class_names=["a", "b", "c"], device=torch.device("cpu"), seed=0, artifacts=artifacts or {})


def detection_batch():
    """Two 64 px images with one and two boxes (labels 1..3), deterministic."""
    import torch
    g = torch.Generator().manual_seed(0)
    images = [torch.rand(3, 64, 64, generator=g) for _ in range(2)]
    targets = [{"boxes": torch.tensor([[5.0, 5.0, 30.0, 40.0]]), "labels": torch.tensor([1]), "image_id": 1},
               {"boxes": torch.tensor([[10.0, 20.0, 50.0, 60.0], [0.0, 0.0, 12.0, 12.0]]),
                "labels": torch.tensor([3, 2]), "image_id": 2}]
    return images, targets


def make_cell(method: str, method_config: dict, dataset, *, detector, schedule, arch: str = "faster_rcnn",
              seed: int = 0):
    """A planned cell without a suite file (``dataset``: a PreparedDataset or its dict)."""
    from harness.data import PreparedDataset
    from harness.plan import Cell
    from harness.plugin import METHODS
    plugin = METHODS.get(method)(method_config)
    data = dataset if isinstance(dataset, PreparedDataset) else PreparedDataset(**dataset)
    return Cell(cell_id=f"{method}/{data.name}/seed{seed}", method=method, label=method, variant="",
                stages=tuple(plugin.active_stages), method_config=plugin.config.model_dump(), detector=detector,
                arch=arch, schedule=schedule, dataset=data, seed=seed)
