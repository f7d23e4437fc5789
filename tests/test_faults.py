"""Fault injection on a real Ray stack (each test bounded): driver SIGKILL + resume, a killed Train worker.

Both run ``detbench`` in a subprocess with its own embedded Ray cluster, so that
killing its driver or worker is the real thing. Kept out of any module that holds
an in-process Ray session.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess

import pytest

from runkit import (DETBENCH, TINY_DATA, checkpoints, final_checkpoint_state, hang_guard, markers, pids_matching,
                    ray_gone, ray_pids, start_detbench, wait_for)
from harness.results import ResultStore
from harness.app import run_status

SUITE = """
name: faults
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
seeds: {seeds}
schedule: {{epochs: {epochs}, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1, max_failures: 1}}
"""


def _first_trial_done_second_checkpointed(run_dir, store) -> bool:
    started = markers(run_dir)
    return (len(store.trial_ids()) == 1 and len(started) == 2
            and bool(checkpoints(run_dir, (set(started) - store.trial_ids()).pop())))


#: When the driver is killed: trial 1 started but has no checkpoint yet; trial 1 just finished
#: (its rows are there, trial 2 may or may not have started); trial 2 mid-training.
KILL_MOMENTS = {
    "before_first_checkpoint": lambda run_dir, store: bool(markers(run_dir)) and not store.trial_ids()
    and not checkpoints(run_dir, markers(run_dir)[0]),
    "between_trials": lambda run_dir, store: len(store.trial_ids()) == 1,
    "mid_trial": _first_trial_done_second_checkpointed,
}


@pytest.mark.timeout(hang_guard(90))  # 71-89 s idle here
@pytest.mark.parametrize("moment,flags", [("mid_trial", []), ("before_first_checkpoint", ["--quiet"]),
                                          ("between_trials", [])],
                         ids=["mid_trial-progress", "before_first_checkpoint-quiet", "between_trials-progress"])
def test_driver_sigkill_then_resume(tmp_path, tiny_data, moment, flags):
    """As users run it: default flags (the progress display on, which Tune's saved state must not
    carry) and ``--quiet``; the driver's whole process group SIGKILLed at several moments."""
    epochs = 4 if moment == "mid_trial" else 3  # mid-trial: a window between checkpoint and end
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0, 1]", epochs=epochs, **tiny_data))
    run_dir = tmp_path / "runs" / "r"
    log = tmp_path / "driver.log"
    others = ray_pids()
    proc = start_detbench(["run", str(suite), "--out", str(tmp_path / "runs"), "--name", "r", *flags], log)
    store = ResultStore(run_dir)
    wait_for(lambda: KILL_MOMENTS[moment](run_dir, store), hang_guard(60), moment, proc, log)
    before = {t: (store.path_for(t).stat().st_mtime_ns, store.path_for(t).read_bytes()) for t in store.trial_ids()}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert ray_gone(ignore=others), "the killed driver's Ray cluster did not exit"
    assert run_status(run_dir)["driver"] == "stopped"

    out = subprocess.run(DETBENCH + ["resume", str(run_dir), *flags], capture_output=True, text=True,
                         timeout=hang_guard(60))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr and "RecursionError" not in out.stderr
    df = store.read()
    assert df["row_id"].is_unique and store.trial_ids() == set(markers(run_dir)) and len(store.trial_ids()) == 2
    assert run_status(run_dir)["counts"] == {"done": 2}
    for trial_id, stamp in before.items():  # finished before the kill: not retrained, not rewritten
        assert (store.path_for(trial_id).stat().st_mtime_ns, store.path_for(trial_id).read_bytes()) == stamp
    for trial_id, rows in df.groupby("trial_id"):
        assert sorted(rows[rows["metric"] == "train/loss"]["epoch"]) == list(range(1, epochs + 1))
    if moment == "mid_trial":
        second = df[~df["trial_id"].isin(before)]
        assert second["restarts"].max() == 1          # continued from its checkpoint
    assert ray_gone(ignore=others)


@pytest.mark.timeout(hang_guard(55))
def test_killed_train_worker_is_replaced_and_training_continues(tmp_path, tiny_data):
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0]", epochs=12, **tiny_data))  # still training when killed
    run_dir = tmp_path / "runs" / "w"
    log = tmp_path / "driver.log"
    others = ray_pids()
    proc = start_detbench(["run", str(suite), "--out", str(tmp_path / "runs"), "--name", "w", "--quiet"], log)
    wait_for(lambda: markers(run_dir) and checkpoints(run_dir, markers(run_dir)[0]), hang_guard(40),
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
    assert ray_gone(ignore=others)


TWO_STAGE_SUITE = """
name: faults2
smoke: true
""" + TINY_DATA + """methods:
  - name: fctl
    config: {{variant: degraded_only, train_conditions: ["fog@2"]}}
seeds: [0]
schedule: {{epochs: 8, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1, max_failures: 1}}
"""


@pytest.mark.timeout(hang_guard(65))
def test_killed_worker_in_a_later_stage_resumes_it_not_the_earlier_one(tmp_path, tiny_data):
    """Both of fctl's stages run in one worker group; killed during the corrective stage, the
    restarted group continues that stage from its checkpoint and does not train the ideal one again."""
    suite = tmp_path / "s.yaml"
    suite.write_text(TWO_STAGE_SUITE.format(**tiny_data))
    run_dir = tmp_path / "runs" / "w2"
    log = tmp_path / "driver.log"
    others = ray_pids()
    proc = start_detbench(["run", str(suite), "--out", str(tmp_path / "runs"), "--name", "w2", "--quiet"], log)

    def in_corrective() -> bool:
        found = markers(run_dir) and checkpoints(run_dir, markers(run_dir)[0])
        return bool(found) and json.loads((found[-1] / "state.json").read_text())["stage"] == "corrective"
    wait_for(in_corrective, hang_guard(45), "a checkpoint of the corrective stage", proc, log)
    workers = pids_matching("ray::RayTrainWorker")
    assert len(workers) == 1, f"expected one Train worker, found {workers}"
    os.kill(workers[0], signal.SIGKILL)
    assert proc.wait(200) == 0, log.read_text()[-3000:]
    df = ResultStore(run_dir).read()
    assert (df["status"] == "ok").all()
    restarts = df.groupby("stage")["restarts"].max()
    assert restarts["ideal"] == 0 and restarts["corrective"] == 1
    for stage in ("ideal", "corrective"):  # every epoch once: none lost, none trained twice
        assert sorted(df[(df["stage"] == stage) & (df["metric"] == "train/loss")]["epoch"]) == list(range(1, 9))
    final = final_checkpoint_state(run_dir, markers(run_dir)[0])
    assert final["stage"] == "corrective" and list(final["done"]) == ["ideal"]
    assert final["done"]["ideal"]["resumes"] == 0
    assert ray_gone(ignore=others)
