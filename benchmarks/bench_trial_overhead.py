"""Fixed cost of a trial: a 1-epoch, 1-step trial's wall time minus its training step, 1-stage and 2-stage.

A micro suite (8 images of 64 px, batch 8: one step per epoch) runs through the real
stack -- ``detbench run`` on the embedded Ray cluster, one trial at a time -- with a
1-stage method (faster_rcnn) and a 2-stage one (fctl: ideal -> corrective). From the
rows, per trial:

* ``trial``: wall time from the trial's start marker to its rows (``wall_s``);
* ``train``: the training steps (``time/epoch_s``, summed over stages);
* ``fixed = trial - train``, split into the trial's one Ray Train run's start-up (``fit()``
  called -> the worker function entered: controller + worker processes, torch import,
  process group), each stage's own set-up / evaluation / checkpoint, and Train's teardown;
* ``gap``: from one trial's rows to the next trial's start marker (Tune's trial actor).

Target (issue #19): fixed cost <= 10 s per trial. Printed as measured, never compared
with stored numbers.
"""
from __future__ import annotations

import json
import tempfile
import time
from harness.core import COST_TRAIN_RUN_S, COST_WORKER_S, COST_WORKER_START_S
from pathlib import Path

SUITE = """\
name: overhead
smoke: true
datasets:
  - name: shapes
    format: synthetic
    synthetic: {{train_images: 8, val_images: 4, seed: 0, image_size: 64, max_objects: 2}}
detector: {{backbone: resnet18, fpn_width: 32, image_size: 64, norm: bn}}
methods:
  - name: faster_rcnn
  - name: fctl
    config: {{variant: degraded_only, train_conditions: ["fog@3"]}}
seeds: [0]
schedule: {{epochs: 1, batch_size: 8, warmup_iters: 0}}
conditions: [clean]
data_cache: {cache}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1}}
"""


def main() -> None:
    from harness.app import run_suite
    from harness.results import ResultStore

    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    suite = tmp / "overhead.yaml"
    suite.write_text(SUITE.format(cache=tmp / "cache"))
    t0 = time.time()
    run_suite(suite, out_dir=tmp / "runs", name="o", progress=False)
    total = time.time() - t0
    run_dir = tmp / "runs" / "o"
    df = ResultStore(run_dir).read()
    markers = {json.loads(p.read_text())["trial_id"]: json.loads(p.read_text())["started"]
               for p in (run_dir / "trials").glob("*.json")}
    print(f"whole run (data, Ray start, 2 trials, tables): {total:.1f} s")
    order = sorted(markers, key=markers.get)
    previous_end = None
    for trial_id in order:
        rows = df[df["trial_id"] == trial_id]
        stages = list(dict.fromkeys(rows["stage"]))
        wall = float(rows["wall_s"].iloc[0])
        train = float(rows.loc[rows["metric"] == "time/epoch_s", "value"].sum())
        end = markers[trial_id] + wall
        gap = f", Tune gap before it {markers[trial_id] - previous_end:.1f} s" if previous_end else ""
        print(f"{rows['method'].iloc[0]} ({len(stages)} stage{'s' if len(stages) > 1 else ''}): trial {wall:.1f} s, "
              f"training steps {train:.1f} s, fixed {wall - train:.1f} s{gap}")
        finals = {stage: rows[(rows["stage"] == stage) & rows["epoch"].isna()].set_index("metric")["value"]
                  for stage in stages}
        whole = float(finals[stages[-1]].get(COST_TRAIN_RUN_S, float("nan")))
        ran = [s for s in stages if COST_WORKER_S in finals[s]]  # not reused from the artifact store
        start = float(finals[ran[0]].get(COST_WORKER_START_S, float("nan")))
        in_stages = sum(float(finals[s].get(COST_WORKER_S, 0)) for s in ran)
        print(f"    one Train run {whole:5.1f} s = start-up {start:4.1f} + stages {in_stages:4.1f} "
              f"+ teardown {whole - start - in_stages:4.1f}")
        for stage in ran:
            epochs = rows[(rows["stage"] == stage) & (rows["metric"] == "time/epoch_s")]["value"].sum()
            worker = float(finals[stage].get(COST_WORKER_S, float("nan")))
            print(f"      {stage:<11} {worker:4.1f} s = training {epochs:.1f} + set-up, evaluation, checkpoint "
                  f"{worker - epochs:.1f}")
        previous_end = end
    print("target: fixed cost <= 10 s per trial")


if __name__ == "__main__":
    main()
