"""A micro suite through the real stack: YAML -> Ray Tune -> Ray Train -> rows -> leaderboard."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from harness.report import render_leaderboard
from harness.results import ResultStore, validate_frame
from harness.app import run_suite
from runkit import TINY_DATA, final_checkpoint_state, hang_guard

#: Tests of the module's shared run: its set-up (88 s idle here) falls on whichever runs first, plus the
#: longest of them (the retry, 25 s). The sweeps below have their own guards.
pytestmark = pytest.mark.timeout(hang_guard(88 + 25))

SUITE = """
name: micro
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
  - name: focal
  - name: faster_rcnn
    label: diverging
    schedule: {{lr: 1.0e+9, grad_clip: null, warmup_iters: 0}}
seeds: [0]
schedule: {{epochs: 1, batch_size: 4, warmup_iters: 2}}
conditions: [clean, {{corruption: gaussian_noise, severity: 2}}]
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99}}
"""


@pytest.fixture(scope="module")
def micro_run(tmp_path_factory, tiny_data, ray_local):
    tmp = tmp_path_factory.mktemp("e2e")
    suite = tmp / "micro.yaml"
    suite.write_text(SUITE.format(**tiny_data))
    board = Path(run_suite(suite, out_dir=tmp / "runs", name="micro", progress=False))
    return board.parent, board


def test_rows_schema_and_content(micro_run):
    run_dir, _ = micro_run
    df = ResultStore(run_dir).read()
    validate_frame(df)
    assert df["row_id"].is_unique
    assert len(ResultStore(run_dir).trial_ids()) == 3
    final = df[df["epoch"].isna() & (df["status"] == "ok") & (df["condition"] == "clean")]
    for method in ("faster_rcnn", "focal"):
        got = final[final["method"] == method].set_index("metric")["value"]
        assert {"AP", "AP50", "AP75"} <= set(got.index)
        assert all(0.0 <= got[k] <= 1.0 for k in ("AP", "AP50"))
    curves = df[df["epoch"] == 1]
    assert {"train/loss", "val/AP"} <= set(curves["metric"])
    assert (df["smoke"]).all() and (df["node_id"] != "").all()


def test_nan_trial_failed_with_reason_others_finish(micro_run):
    run_dir, _ = micro_run
    df = ResultStore(run_dir).read()
    bad = df[df["variant"] == "diverging"]
    failed = bad[bad["status"] == "failed"]
    assert len(failed) == 1 and "non-finite loss" in failed["reason"].iloc[0]
    assert (df[df["variant"] != "diverging"]["status"] == "ok").all()


def test_leaderboard_written(micro_run):
    run_dir, board = micro_run
    text = board.read_text()
    assert "SMOKE RUN" in text and "faster_rcnn" in text and "focal" in text
    assert "tiny/clean/AP50" in text
    assert (run_dir / "leaderboard.csv").exists()
    html = render_leaderboard(ResultStore(run_dir).read(), "html")
    assert "<table" in html
    row = next(line for line in text.splitlines() if line.startswith("| faster_rcnn[diverging]")
               or line.startswith("| diverging"))
    assert row.rstrip(" |").endswith("| 1")          # the NaN trial counted in "failed"


def test_corruption_condition_rows_and_robustness(micro_run):
    run_dir, board = micro_run
    df = ResultStore(run_dir).read()
    noisy = df[(df["condition"] == "gaussian_noise") & df["epoch"].isna()]
    assert set(noisy["method"]) == {"faster_rcnn", "focal"} and (noisy["severity"] == 2).all()
    assert {"AP", "AP50"} <= set(noisy["metric"])
    assert "tiny/gaussian_noise@2/AP" in board.read_text()
    assert "mPC" in (run_dir / "robustness.md").read_text()


def test_manifest(micro_run):
    run_dir, _ = micro_run
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["versions"]["torch"].startswith("2.14.1") and manifest["seeds"] == [0]
    assert (run_dir / "suite.yaml").exists() and manifest["cluster"]["nodes"]


def test_checkpoint_per_epoch_named_by_trial(micro_run):
    run_dir, _ = micro_run
    trials = ResultStore(run_dir).trial_ids()
    for t in trials:  # one Train run per trial, whatever its number of stages
        assert (run_dir / "train" / t).is_dir()


ASHA_SUITE = """
name: asha
smoke: true
""" + TINY_DATA + """methods:
  - name: faster_rcnn
    search:
      space: {{schedule.lr: {{loguniform: [0.0001, 0.05]}}}}
      num_samples: 4
      metric: train/loss
      mode: min
      grace_period: 1
      reduction_factor: 2
seeds: [0]
schedule: {{epochs: 3, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99, max_concurrent_trials: 1}}
"""


@pytest.mark.timeout(hang_guard(95))  # 95 s idle here; 315 s on the slowest CI machine
def test_optuna_asha_sweep_stops_trials_without_leaking(tmp_path, tiny_data, ray_local):
    """4 Optuna samples, one at a time, ASHA stopping some: every trial gets rows, no hang."""
    suite = tmp_path / "asha.yaml"
    suite.write_text(ASHA_SUITE.format(**tiny_data))
    run_dir = Path(run_suite(suite, out_dir=tmp_path / "runs", name="asha", progress=False)).parent
    df = ResultStore(run_dir).read()
    assert len(ResultStore(run_dir).trial_ids()) == 4
    status = df[df["metric"] == "status"]
    assert (status["status"] == "stopped").sum() >= 1, "ASHA stopped no trial"
    assert "stopped early by the scheduler" in status["reason"].iloc[0]
    assert (df[df["epoch"].isna() & (df["metric"] == "AP")]["status"] == "ok").sum() >= 1
    assert (run_dir / "optuna" / "search0.journal").stat().st_size > 0
    assert df["variant"].str.contains("schedule.lr=").all()


FCTL_SUITE = """
name: fctl-reuse
smoke: true
""" + TINY_DATA + """methods:
  - name: fctl
    config: {{levels: [0, 1], train_conditions: [fog@2]}}
    baseline: fctl[degraded_only]
    search:
      space: {{lambda_fs: {{loguniform: [0.1, 10.0]}}}}
      num_samples: 2
      metric: AP
      mode: max
      scheduler: fifo
  - name: fctl
    config: {{variant: degraded_only, train_conditions: [fog@2]}}
seeds: [0]
schedule: {{epochs: 1, batch_size: 4, warmup_iters: 2}}
conditions: [clean, {{corruption: fog, severity: 2}}]
resources: {{workers_per_trial: 1, cpus_per_worker: 0.99}}
"""


@pytest.mark.timeout(hang_guard(67))
def test_fctl_sweep_trains_the_ideal_stage_once(tmp_path, tiny_data, ray_local):
    """3 trials (2 lambda_fs samples + degraded-only) share one ideal model: trained once, counted."""
    suite = tmp_path / "fctl.yaml"
    suite.write_text(FCTL_SUITE.format(**tiny_data))
    run_dir = Path(run_suite(suite, out_dir=tmp_path / "runs", name="fctl", progress=False)).parent
    store = ResultStore(run_dir)
    df = store.read()
    assert len(store.trial_ids()) == 3 and (df["status"] == "ok").all()
    from harness.storage.artifacts import ArtifactStore
    artifacts = ArtifactStore(run_dir / "artifacts").list()
    assert len(artifacts) == 1 and artifacts[0]["stage"] == "ideal"
    # One Train run per trial; only the producer's ran the ideal stage (its last checkpoint lists
    # the stages it finished before the last one), the other two started at the corrective stage.
    done = {t: final_checkpoint_state(run_dir, t)["done"] for t in store.trial_ids()}
    assert sorted(map(sorted, done.values())) == [[], [], ["ideal"]]
    assert [t for t, d in done.items() if d] == [artifacts[0]["trial_id"]]
    ideal = df[(df["stage"] == "ideal") & df["epoch"].isna() & (df["metric"] == "AP")]
    assert set(ideal["condition"]) == {"clean", "fog"} and ideal["config_hash"].nunique() == 1
    curves = df[(df["stage"] == "corrective") & (df["metric"] == "fctl/decay")]
    assert len(curves) == 2 and (curves["value"] < 1).all()  # the two trials with the feature loss
    board = (run_dir / "leaderboard.md").read_text()
    assert "fctl (ideal)" in board and "fctl[degraded_only] (corrective)" in board
    assert "vs fctl[degraded_only] (corrective)" in board


TWO_WORKERS_SUITE = """
name: fctl-ddp
smoke: true
""" + TINY_DATA + """methods:
  - name: fctl
    config: {{variant: degraded_only, train_conditions: [fog@2]}}
seeds: [0]
schedule: {{epochs: 1, batch_size: 4, warmup_iters: 2}}
resources: {{workers_per_trial: 2, cpus_per_worker: 0.99}}
"""


@pytest.mark.timeout(hang_guard(29))
def test_two_stage_trial_on_two_ddp_workers(tmp_path, tiny_data, ray_local):
    """Both stages in one 2-worker DDP group: rank 0 publishes the ideal model mid-run, the barrier
    holds rank 1 until it is committed, and each rank reads it back (a rank that cannot fails the trial)."""
    suite = tmp_path / "ddp.yaml"
    suite.write_text(TWO_WORKERS_SUITE.format(**tiny_data))
    run_dir = Path(run_suite(suite, out_dir=tmp_path / "runs", name="ddp", progress=False)).parent
    df = ResultStore(run_dir).read()
    assert (df["status"] == "ok").all() and set(df["stage"]) == {"ideal", "corrective"}
    from harness.storage.artifacts import ArtifactStore
    (artifact,) = ArtifactStore(run_dir / "artifacts").list()
    (trial,) = ResultStore(run_dir).trial_ids()
    assert artifact["stage"] == "ideal" and artifact["trial_id"] == trial
    assert list(final_checkpoint_state(run_dir, trial)["done"]) == ["ideal"]
    device_s = df[df["epoch"].isna() & (df["metric"] == "cost/device_s")].set_index("stage")["value"]
    worker_s = df[df["epoch"].isna() & (df["metric"] == "cost/worker_s")].set_index("stage")["value"]
    assert (device_s > 1.5 * worker_s).all()  # summed over the two workers, per stage


def test_status_then_retry_failed_reruns_only_the_failed_cell(micro_run):
    """Runs last in this module: it changes the micro run."""
    from harness.app import resume_run
    from harness.app import format_status, run_status
    run_dir, _ = micro_run
    status = run_status(run_dir)
    assert status["driver"] == "finished" and status["counts"] == {"done": 2, "failed": 1}
    failed = next(c for c in status["cells"] if c["state"] == "failed")
    assert failed["cell"] == "diverging/tiny/seed0" and "non-finite loss" in failed["detail"]
    assert "--retry-failed" in format_status(status)
    store = ResultStore(run_dir)
    before = {t: store.path_for(t).stat().st_mtime_ns for t in store.trial_ids()}
    old_failed = set(store.read().query("status == 'failed'")["trial_id"])
    resume_run(run_dir, progress=False, retry_failed=True)
    after = store.trial_ids()
    assert {t: store.path_for(t).stat().st_mtime_ns for t in after & set(before)} == \
        {t: m for t, m in before.items() if t not in old_failed}          # the others untouched
    new = after - set(before)
    assert len(new) == 1 and len(after) == 3                                # one set of rows per cell
    assert {p.stem for p in (run_dir / "rows-retired").glob("*.parquet")} == old_failed
    assert run_status(run_dir)["counts"] == {"done": 2, "failed": 1}        # NaN again: deterministic


@pytest.mark.timeout(hang_guard(20))
def test_the_sweep_reaper_frees_the_placement_group_of_a_killed_train_controller(ray_local):
    """A Train controller that dies with its trial (ASHA stop, lost node) leaves a reserved
    placement group; the driver's reaper removes it. One that is alive, or that ended and
    was forgotten, keeps its own."""
    import time

    ray = ray_local
    from harness.sweep.reaper import PING_EVERY_S, start_reaper

    reaper = start_reaper()

    @ray.remote(num_cpus=0)
    class Controller:
        def start(self, reaper):
            self.group = ray.util.placement_group([{"CPU": 0.5}])
            ray.get(self.group.ready())
            ctx = ray.get_runtime_context()
            ray.get(reaper.watch.remote(ctx.get_actor_id(), ctx.current_actor, self.group))
            return ctx.get_actor_id(), self.group

    def state(group):
        return ray.util.placement_group_table(group).get("state")

    killed, alive = Controller.remote(), Controller.remote()
    killed_id, killed_group = ray.get(killed.start.remote(reaper))
    alive_id, alive_group = ray.get(alive.start.remote(reaper))
    ray.kill(killed)
    deadline = time.time() + hang_guard(3)
    while state(killed_group) != "REMOVED" and time.time() < deadline:
        time.sleep(0.2)
    assert state(killed_group) == "REMOVED"
    time.sleep(3 * PING_EVERY_S)
    assert state(alive_group) == "CREATED" and ray.get(reaper.watching.remote()) == [alive_id]
    ray.get(reaper.forget.remote(alive_id))
    ray.kill(alive)
    time.sleep(3 * PING_EVERY_S)
    assert state(alive_group) == "CREATED"  # forgotten: a controller that ends removes its own
    ray.util.remove_placement_group(alive_group)


def test_train_runs_are_watched_by_the_reaper_instead_of_a_cleaner_each(ray_local):
    """Ray 2.60's per-run PlacementGroupCleaner (a process per trial, ~1 s of each teardown
    here, up to 12 s on a slow machine) is replaced by the reaper's callback; without a reaper
    Ray's own cleaner stays."""
    from ray.train import ScalingConfig
    from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

    from harness.sweep.reaper import start_reaper, train_trainer_class

    def kinds(reaper):
        cls, extra = train_trainer_class(reaper)
        trainer = cls(lambda: None, scaling_config=ScalingConfig(num_workers=1))
        return [type(c).__name__ for c in [*trainer._create_default_callbacks(), *extra]]

    assert PlacementGroupCleanerCallback.__name__ in kinds(None)
    watched = kinds(start_reaper())
    assert PlacementGroupCleanerCallback.__name__ not in watched and "ReaperCallback" in watched
