"""A real multi-node Ray cluster on this one machine: trials and DDP workers spread over nodes,
a worker node killed (its raylet, by pid) mid-trial and survived, ``cluster info``, refusal of
unschedulable suites. Bounded in time; every Ray process the fixture started is gone afterwards.

Layout: a head node with 0 CPUs (it schedules nothing, like a real cluster's head) and worker
nodes of 1 CPU each with a custom resource naming them. A trial asks 2 workers x 0.99 CPU,
SPREAD, so its DDP workers always sit on two different nodes. The run directory (and the
artifacts in it) is a path every node sees, as NFS would be on a real cluster.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness.results import ResultStore
from runkit import DETBENCH, TINY_DATA, checkpoints, hang_guard, markers, pids_matching, start_detbench, wait_for

SUITE = """
name: cluster
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
seeds: {seeds}
schedule: {{epochs: {epochs}, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 2, cpus_per_worker: {cpus}, placement_strategy: SPREAD, max_failures: 2,
             max_concurrent_trials: 1}}
"""
FAST_FAILURE_DETECTION = {"health_check_period_ms": 500, "health_check_failure_threshold": 4}


def _node_pids(node) -> list[int]:
    return [p.process.pid for procs in node.all_processes.values() for p in procs if p.process is not None]


@pytest.fixture(scope="module")
def cluster():
    """Head (0 CPU) + workers node_a and node_b (1 CPU each); torn down by the pids it started."""
    from ray._private.utils import get_ray_address_file
    from ray.cluster_utils import Cluster
    address_file = Path(get_ray_address_file(None))
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": FAST_FAILURE_DETECTION})
    nodes = [c.add_node(num_cpus=1, resources={name: 1}) for name in ("node_a", "node_b")]
    c.wait_for_nodes()
    started = {"pids": set(_node_pids(c.head_node)) | {p for n in nodes for p in _node_pids(n)}}
    c.started = started
    yield c
    started["pids"] |= {p for n in c.worker_nodes for p in _node_pids(n)}
    c.shutdown()
    end = time.time() + hang_guard(3)
    while time.time() < end and [p for p in started["pids"] if Path(f"/proc/{p}").exists()]:
        time.sleep(0.5)
    left = [p for p in started["pids"] if Path(f"/proc/{p}").exists()
            and "zombie" not in Path(f"/proc/{p}/status").read_text().lower()]
    assert not left, f"Ray processes left behind: {left}"
    # Cluster() writes /tmp/ray/ray_current_cluster; none may be left for a later plain ray.init()
    if address_file.exists() and address_file.read_text().strip() == c.address:
        address_file.unlink()
    assert not (address_file.exists() and address_file.read_text().strip() == c.address)


def _node_ids_by_resource(cluster) -> dict[str, str]:
    """custom resource name -> Ray node id, from the cluster's GCS (a short-lived driver)."""
    code = ("import json, ray; ray.init(address=%r, logging_level='ERROR'); "
            "print(json.dumps({k: n['NodeID'] for n in ray.nodes() if n['Alive'] "
            "for k in n['Resources'] if k.startswith('node_')}))" % cluster.address)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=hang_guard(15), check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _resumes(checkpoint: Path) -> int:
    try:
        return json.loads((checkpoint / "state.json").read_text())["resumes"]
    except (OSError, ValueError, KeyError):
        return 0


@pytest.mark.timeout(hang_guard(80))
def test_trials_and_ddp_workers_spread_over_both_worker_nodes(cluster, tmp_path, tiny_data):
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0, 1]", epochs=2, cpus=0.99, **tiny_data))
    info = subprocess.run(DETBENCH + ["cluster", "info", "--address", cluster.address, "--suite", str(suite)],
                          capture_output=True, text=True, timeout=hang_guard(15))
    assert info.returncode == 0, info.stderr[-2000:]
    assert "node_a=1" in info.stdout and "node_b=1" in info.stdout and "fits: up to 1 trial" in info.stdout
    t0 = time.time()
    log = tmp_path / "driver.log"
    proc = start_detbench(["run", str(suite), "--address", cluster.address, "--out", str(tmp_path / "runs"),
                 "--name", "spread", "--quiet"], log)
    assert proc.wait(200) == 0, log.read_text()[-3000:]
    print(f"\n2 trials x 2 DDP workers over 2 nodes: {time.time() - t0:.0f} s")
    df = ResultStore(tmp_path / "runs" / "spread").read()
    assert (df["status"] == "ok").all() and df["row_id"].is_unique
    per_trial = df.groupby("trial_id")["node_id"].first().str.split(",")
    workers = set(_node_ids_by_resource(cluster).values())
    assert all(len(nodes) == 2 for nodes in per_trial)                   # DDP across two nodes
    assert set().union(*per_trial) == workers                              # both worker nodes used
    assert "faster_rcnn" in (tmp_path / "runs" / "spread" / "leaderboard.md").read_text()


@pytest.mark.timeout(hang_guard(25))
def test_unschedulable_suite_is_refused_before_anything_runs(cluster, tmp_path, tiny_data):
    suite = tmp_path / "big.yaml"
    suite.write_text(SUITE.format(seeds="[0]", epochs=1, cpus=2, **tiny_data))  # 2 CPUs on 1-CPU nodes
    out = subprocess.run(DETBENCH + ["run", str(suite), "--address", cluster.address, "--out",
                                     str(tmp_path / "runs"), "--quiet"], capture_output=True, text=True, timeout=hang_guard(15))
    assert out.returncode == 2 and "PENDING forever" in out.stderr
    assert not (tmp_path / "runs").exists()
    info = subprocess.run(DETBENCH + ["cluster", "info", "--address", cluster.address, "--suite", str(suite)],
                          capture_output=True, text=True, timeout=hang_guard(15))
    assert info.returncode == 2 and "cannot be scheduled" in info.stdout


@pytest.mark.timeout(hang_guard(70))
def test_worker_node_killed_mid_trial_is_survived(cluster, tmp_path, tiny_data):
    spare = cluster.add_node(num_cpus=1, resources={"node_c": 1})  # room to recover on
    cluster.wait_for_nodes()
    cluster.started["pids"] |= set(_node_pids(spare))
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(seeds="[0]", epochs=10, cpus=0.99, **tiny_data))
    run_dir = tmp_path / "runs" / "kill"
    log = tmp_path / "driver.log"
    proc = start_detbench(["run", str(suite), "--address", cluster.address, "--out", str(tmp_path / "runs"),
                 "--name", "kill", "--quiet"], log)
    wait_for(lambda: markers(run_dir) and checkpoints(run_dir, markers(run_dir)[0]), hang_guard(40),
              "the first epoch checkpoint", proc, log)
    worker = sorted(pids_matching("ray::RayTrainWorker"))[0]
    raylet = int(Path(f"/proc/{worker}/stat").read_text().rsplit(")", 1)[1].split()[1])  # its parent
    assert "raylet" in Path(f"/proc/{raylet}/cmdline").read_bytes().decode(errors="replace")
    killed_at = time.time()
    os.kill(raylet, signal.SIGKILL)
    wait_for(lambda: any(_resumes(p) >= 1 for p in checkpoints(run_dir, markers(run_dir)[0])),
              150, "an epoch checkpointed by the restarted worker group", proc, log)
    print(f"\nrecovered (restarted group checkpointed an epoch) {time.time() - killed_at:.1f} s after the kill")
    assert proc.wait(200) == 0, log.read_text()[-3000:]
    df = ResultStore(run_dir).read()
    assert len(ResultStore(run_dir).trial_ids()) == 1 and df["row_id"].is_unique
    assert (df["status"] == "ok").all() and df["restarts"].max() >= 1      # recorded in the rows
    assert sorted(df[df["metric"] == "train/loss"]["epoch"]) == list(range(1, 11))
    assert len(df[df["epoch"].isna() & (df["metric"] == "AP")]) == 1
