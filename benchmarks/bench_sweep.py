"""What stage-artifact reuse saves in a sweep, and what resuming a run costs.

A small FCTL-style two-stage sweep through the real stack (Ray Tune + Train on the
embedded local cluster): K trials sampling ``lambda_fs`` share one ``ideal`` stage.
Reported: stage-1 trainings actually run (1) vs K without reuse, and the compute that
saved, from the trials' own per-epoch times. Then ``resume_run`` on the finished run:
the driver-side overhead of restoring the Tune experiments when nothing is left to do.
"""
from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

K = 3
SUITE = """
name: bench-sweep
smoke: true
datasets:
  - name: tiny
    format: synthetic
    synthetic: {{train_images: 24, val_images: 8, seed: 0, image_size: 96, max_objects: 3}}
data_cache: {cache}
detector: {{fpn_width: 32, image_size: 96}}
methods:
  - name: fctl
    config: {{levels: [0, 1, 2], train_conditions: [fog@3]}}
    search:
      space: {{lambda_fs: {{loguniform: [0.1, 10.0]}}}}
      num_samples: {k}
      metric: AP
      mode: max
      scheduler: fifo
seeds: [0]
schedule: {{epochs: 3, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99}}
"""


def main() -> None:
    import ray

    from harness.app import resume_run, run_suite
    from harness.results import ResultStore

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        suite = tmp / "sweep.yaml"
        suite.write_text(SUITE.format(cache=tmp / "cache", k=K))
        t0 = time.perf_counter()
        run_dir = run_suite(suite, out_dir=tmp / "runs", name="sweep", progress=False).parent
        sweep_s = time.perf_counter() - t0
        df = ResultStore(run_dir).read()
        ideal_runs = [p for p in (run_dir / "train").iterdir() if p.name.endswith("-ideal")]
        epoch_s = df[df["metric"] == "time/epoch_s"]
        # one ideal training (its rows are repeated in every trial that reused it)
        ideal_s = epoch_s[epoch_s["stage"] == "ideal"].drop_duplicates("epoch")["value"].sum()
        corrective_s = epoch_s[epoch_s["stage"] == "corrective"]["value"].sum()
        with_reuse = ideal_s * len(ideal_runs) + corrective_s
        without = ideal_s * K + corrective_s
        t0 = time.perf_counter()
        resume_run(run_dir, progress=False)
        resume_s = time.perf_counter() - t0
        ray.shutdown()
        t0 = time.perf_counter()  # what a user waits after a driver crash: new process, new Ray
        subprocess.run([sys.executable, "-m", "harness.app.cli", "resume", str(run_dir), "--quiet"],
                       check=True, capture_output=True)
        fresh_s = time.perf_counter() - t0
    print(f"FCTL-style sweep, K = {K} trials over lambda_fs (tiny synthetic data, CPU); wall {sweep_s:.0f} s")
    print(f"stage-1 (ideal) trainings: {len(ideal_runs)} with artifact reuse vs {K} without")
    print(f"training compute: {with_reuse:.1f} s with reuse vs {without:.1f} s without "
          f"(saved {without - with_reuse:.1f} s = {(without - with_reuse) / without:.0%}; "
          f"ideal stage {ideal_s:.1f} s, corrective stages {corrective_s:.1f} s in all)")
    print(f"driver resume overhead (restore the finished run's Tune experiments, rewrite the "
          f"leaderboard, Ray already up): {resume_s:.1f} s; `detbench resume` in a fresh process "
          f"(Python + Ray start included): {fresh_s:.1f} s")
