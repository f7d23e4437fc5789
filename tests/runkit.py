"""Helpers of the tests that run detbench for real: the tiny dataset block of their suites, waiting
for run-directory states, finding and killing Ray processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
DETBENCH = [sys.executable, "-m", "harness.cli"]


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
    folder = run_dir / "train" / f"{trial_id}-train"
    try:
        snapshot = json.loads((folder / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return []
    names = [r["checkpoint_dir_name"] for r in snapshot.get("checkpoint_results", [])]
    return [folder / n for n in names if (folder / n / "state.json").is_file()]


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


def ray_gone(timeout: float = 30, ignore: set[int] = frozenset()) -> bool:
    """No Ray cluster processes left but those in ``ignore`` (clusters that were running before
    the test started: another test session's, a user's ``ray start``)."""
    end = time.time() + timeout
    while time.time() < end:
        if not ray_pids() - set(ignore):
            return True
        time.sleep(0.5)
    return False
