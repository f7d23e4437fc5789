"""Fault injection on a real Ray stack (each test bounded): driver SIGKILL + resume, a killed Train worker.

Both run ``detbench`` in a subprocess with its own embedded Ray cluster, so that
killing its driver or worker is the real thing. Kept out of any module that holds
an in-process Ray session.
"""
from __future__ import annotations

import os
import signal
import subprocess

import pytest

from runkit import DETBENCH, TINY_DATA, start_detbench, checkpoints, markers, pids_matching, ray_gone, wait_for
from harness.results import ResultStore
from harness.status import run_status

SUITE = """
name: faults
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
seeds: {seeds}
schedule: {{epochs: {epochs}, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1, max_failures: 1}}
"""


@pytest.mark.timeout(300)
def test_driver_sigkill_then_resume(tmp_path, tiny_data):
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0, 1]", epochs=4, **tiny_data))
    run_dir = tmp_path / "runs" / "r"
    log = tmp_path / "driver.log"
    proc = start_detbench(["run", str(suite), "--out", str(tmp_path / "runs"), "--name", "r", "--quiet"], log)
    store = ResultStore(run_dir)
    # first trial finished, the second has checkpointed at least one epoch
    wait_for(lambda: len(store.trial_ids()) == 1 and len(markers(run_dir)) == 2
              and checkpoints(run_dir, (set(markers(run_dir)) - store.trial_ids()).pop()),
              240, "trial 1 done and trial 2 mid-training", proc, log)
    first = store.trial_ids().pop()
    first_file = store.path_for(first)
    first_stamp = (first_file.stat().st_mtime_ns, first_file.read_bytes())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert ray_gone(), "the killed driver's Ray cluster did not exit"
    status = run_status(run_dir)
    assert status["driver"] == "stopped" and status["counts"] == {"done": 1, "interrupted": 1}

    out = subprocess.run(DETBENCH + ["resume", str(run_dir), "--quiet"], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    df = store.read()
    assert df["row_id"].is_unique and store.trial_ids() == set(markers(run_dir))
    assert run_status(run_dir)["counts"] == {"done": 2}
    assert (first_file.stat().st_mtime_ns, first_file.read_bytes()) == first_stamp  # not retrained
    second = df[df["trial_id"] != first]
    assert second["restarts"].max() == 1          # continued from its checkpoint
    assert sorted(second[second["metric"] == "train/loss"]["epoch"]) == [1, 2, 3, 4]
    assert ray_gone()


@pytest.mark.timeout(240)
def test_killed_train_worker_is_replaced_and_training_continues(tmp_path, tiny_data):
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0]", epochs=12, **tiny_data))  # still training when killed
    run_dir = tmp_path / "runs" / "w"
    log = tmp_path / "driver.log"
    proc = start_detbench(["run", str(suite), "--out", str(tmp_path / "runs"), "--name", "w", "--quiet"], log)
    wait_for(lambda: markers(run_dir) and checkpoints(run_dir, markers(run_dir)[0]), 180,
              "the first epoch checkpoint", proc, log)
    workers = pids_matching("ray::RayTrainWorker")
    assert len(workers) == 1, f"expected one Train worker, found {workers}"
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(200) == 0, log.read_text()[-3000:]
    df = ResultStore(run_dir).read()
    assert (df["status"] == "ok").all() and df["restarts"].max() == 1
    final = df[df["epoch"].isna() & (df["metric"] == "AP")]
    assert len(final) == 1
    assert sorted(df[df["metric"] == "train/loss"]["epoch"]) == list(range(1, 13))
    assert ray_gone()
