"""A run directory on S3 (a real S3 API server on 127.0.0.1), through the real stack.

One driver is started with ``--out s3://...``, SIGKILLed between its two trials,
and ``detbench resume`` continues from the store alone; then every command that
reads a run directory is pointed at the ``s3://`` URI. The rows, markers, Tune and
Train state, leaderboard, report and log live only in the bucket.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from harness.storage.artifacts import ArtifactStore
from harness.results import ResultStore
from harness.app import run_status
from harness.storage import open_storage
from runkit import DETBENCH, TINY_DATA, hang_guard, ray_gone, ray_pids, start_detbench, wait_for
from s3kit import TEST_ENV

SUITE = """
name: s3run
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
seeds: [0, 1]
schedule: {{epochs: 1, batch_size: 4, warmup_iters: 2}}
conditions: [clean, {{corruption: gaussian_noise, severity: 2}}]
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1}}
"""


def _objects(uri: str) -> dict[str, bytes]:
    storage = open_storage(uri)
    out = {}
    client = storage.client()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=storage.bucket):
        for o in page.get("Contents", ()):
            out[o["Key"]] = client.get_object(Bucket=storage.bucket, Key=o["Key"])["Body"].read()
    return out


@pytest.mark.timeout(hang_guard(110))
def test_s3_run_killed_between_trials_resumes_from_the_store(tmp_path, tiny_data, s3_uri, monkeypatch):
    monkeypatch.setenv("DETBENCH_CACHE", str(tmp_path / "cache"))
    suite = tmp_path / "s.yaml"
    suite.write_text(SUITE.format(**tiny_data))
    run_uri = f"{s3_uri}/r"
    others = ray_pids()
    log = tmp_path / "driver.out"
    proc = start_detbench(["run", str(suite), "--out", s3_uri, "--name", "r"], log)
    store = ResultStore(run_uri)
    t0 = time.time()
    wait_for(lambda: len(store.trial_ids()) == 1, hang_guard(60), "the first trial's rows", proc, log)
    print(f"first trial after {time.time() - t0:.0f} s")
    first = {t: store.storage.read_bytes(store.rel_for(t)) for t in store.trial_ids()}
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10)
    assert ray_gone(ignore=others), "the killed driver's Ray cluster did not exit"
    assert run_status(run_uri)["driver"] == "stopped"
    assert not (tmp_path / "runs").exists() and not list(tmp_path.glob("**/rows/*.parquet"))  # nothing local

    t0 = time.time()
    out = subprocess.run(DETBENCH + ["resume", run_uri, "--quiet"], capture_output=True, text=True, timeout=hang_guard(60))
    print(f"resume took {time.time() - t0:.0f} s")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Traceback" not in out.stderr
    df = store.read()
    assert df["row_id"].is_unique and len(store.trial_ids()) == 2
    assert {t: store.storage.read_bytes(store.rel_for(t)) for t in first} == first  # not rerun, not rewritten
    status = run_status(run_uri)
    assert status["counts"] == {"done": 2} and status["driver"] == "finished"
    storage = open_storage(run_uri)
    for name in ("leaderboard.md", "leaderboard.csv", "robustness.md", "manifest.json", "run.json",
                 "suite.yaml", "logs/driver.log"):
        assert storage.exists(name), name
    assert storage.list("plots") and storage.list_dirs("tune") == ["cells"] and len(storage.list_dirs("train")) == 2
    assert open_storage(run_uri).read_json("manifest.json")["storage"]["uri"] == run_uri

    # the commands that read a run directory, on the URI
    for cmd, expect in ((["status", run_uri], "total: 2 done"), (["leaderboard", run_uri], "faster_rcnn"),
                        (["report", run_uri], f"{run_uri}/robustness.md")):
        out = subprocess.run(DETBENCH + cmd, capture_output=True, text=True, timeout=hang_guard(15))
        assert out.returncode == 0 and expect in out.stdout, out.stdout + out.stderr
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"w" * 100)
    ArtifactStore(storage.child("artifacts")).put("k0", {"detector.pt": weights}, {"method": "m", "stage": "s"})
    out = subprocess.run(DETBENCH + ["artifacts", "ls", run_uri], capture_output=True, text=True, timeout=hang_guard(15))
    assert out.returncode == 0 and "k0  m/s" in out.stdout, out.stdout + out.stderr

    # credentials are never written anywhere: not in the bucket, not in the local cache, not printed
    secrets = [TEST_ENV["AWS_SECRET_ACCESS_KEY"].encode(), TEST_ENV["AWS_ACCESS_KEY_ID"].encode()]
    leaks = [k for k, data in _objects(run_uri).items() if any(s in data for s in secrets)]
    leaks += [str(p) for p in tmp_path.rglob("*") if p.is_file() and any(s in p.read_bytes() for s in secrets)
              if p.name != "s.yaml"]
    assert not leaks, leaks
    assert ray_gone(ignore=others)
