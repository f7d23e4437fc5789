"""Live monitoring (harness.sweep.loggers): the callbacks each logger gets, the errors up front, what
TensorBoard and MLflow receive from a real Tune run, and Optuna journals that optuna-dashboard opens."""
from __future__ import annotations

import dataclasses
import struct
import sys
import types
from pathlib import Path

import pytest

from harness.core import ConfigError
from harness.sweep.loggers import (EpochMLflowLoggerCallback, EpochTBXLoggerCallback, NoTBXLoggerCallback,
                                   result_scalars, trial_params)
from harness.sweep import check_loggers, logger_callbacks


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    """No tracking URI or file-store opt-in from the caller's environment; no MLflow telemetry."""
    for var in ("MLFLOW_TRACKING_URI", "MLFLOW_ALLOW_FILE_STORE", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def callbacks(loggers, run_dir, **kw):
    return logger_callbacks(loggers, run_dir=run_dir, suite_name="demo", run_id="run-1", **kw)


def read_scalars(path: Path) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of a TensorBoard event file (TFRecord frames of Event protos)."""
    from tensorboardX.proto.event_pb2 import Event
    data, out, i = path.read_bytes(), {}, 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4  # length, its crc, the record, its crc
        for v in event.summary.value:
            if v.WhichOneof("value") == "simple_value":
                out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def hparam_tags(path: Path) -> set[str]:
    from tensorboardX.proto.event_pb2 import Event
    data, tags, i = path.read_bytes(), set(), 0
    while i < len(data):
        (n,) = struct.unpack("<Q", data[i:i + 8])
        event = Event.FromString(data[i + 12:i + 12 + n])
        i += 12 + n + 4
        tags |= {v.tag for v in event.summary.value if v.metadata.plugin_data.plugin_name == "hparams"}
    return tags


# ---------------------------------------------------------------- which callbacks


def test_tensorboard_is_ours_and_tune_adds_no_second_one(tmp_path):
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks
    cbs = callbacks(["tensorboard"], tmp_path)
    assert [type(c) for c in cbs] == [EpochTBXLoggerCallback]
    final = _create_default_callbacks(list(cbs))  # what Tuner.fit does with the RunConfig's callbacks
    assert [c for c in final if isinstance(c, TBXLoggerCallback)] == cbs
    assert {CSVLoggerCallback, JsonLoggerCallback} <= {type(c) for c in final}  # Tune's other loggers stay


def test_without_tensorboard_no_event_files_at_all(tmp_path):
    from ray.tune.logger import TBXLoggerCallback
    from ray.tune.utils.callback import _create_default_callbacks
    cbs = callbacks([], tmp_path)
    assert [type(c) for c in cbs] == [NoTBXLoggerCallback]
    assert [c for c in _create_default_callbacks(list(cbs)) if isinstance(c, TBXLoggerCallback)] == cbs


def test_mlflow_defaults_to_a_database_in_the_run_directory(tmp_path):
    tb, ml = callbacks(["tensorboard", "mlflow"], tmp_path)
    assert isinstance(tb, EpochTBXLoggerCallback) and isinstance(ml, EpochMLflowLoggerCallback)
    assert ml.tracking_uri == f"sqlite:///{tmp_path.resolve()}/mlflow.db"
    assert ml.experiment_name == "demo"
    assert ml.tags == {"detbench.run_id": "run-1", "detbench.suite": "demo"}
    assert ml.should_save_artifact is False
    assert ml.artifact_location == (tmp_path.resolve() / "mlartifacts").as_uri()


def test_mlflow_tracking_uri_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    for run_dir in (tmp_path, "s3://bucket/runs/r1"):
        _, ml = callbacks(["tensorboard", "mlflow"], run_dir)
        assert ml.tracking_uri == "http://mlflow.example:5000" and ml.artifact_location is None


def test_mlflow_on_an_object_store_run_dir_needs_a_tracking_uri():
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI") as exc:
        check_loggers(["mlflow"], run_dir="s3://bucket/runs/r1")
    assert exc.value.field == "loggers" and "s3://bucket/runs/r1" in str(exc.value)
    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_URI"):
        callbacks(["tensorboard", "mlflow"], "s3://bucket/runs/r1")


def test_mlflow_file_store_refused_up_front_unless_allowed(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path}/mlruns")
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE") as exc:
        check_loggers(["mlflow"], run_dir=tmp_path)
    assert exc.value.field == "loggers"
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_loggers(["mlflow"], run_dir=tmp_path)


@pytest.mark.parametrize("logger,module,package", [("tensorboard", "tensorboardX", "tensorboardX"),
                                                   ("mlflow", "mlflow", "mlflow-skinny"),
                                                   ("wandb", "wandb", "wandb")])
def test_missing_package_refused_up_front(tmp_path, monkeypatch, logger, module, package):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    with pytest.raises(ConfigError, match=f"pip install {package}") as exc:
        check_loggers([logger], run_dir=tmp_path)
    assert exc.value.field == "loggers"


def test_every_logger_a_suite_may_name_is_known():
    from harness.config import LOGGERS
    from harness.sweep.loggers import PACKAGES
    assert tuple(PACKAGES) == LOGGERS


def test_unknown_logger_refused():
    with pytest.raises(ConfigError, match="unknown logger 'neptune'"):
        check_loggers(["neptune"])


def fake_wandb(monkeypatch, api_key=None):
    import ray.air.integrations.wandb as ray_wandb
    fake = types.SimpleNamespace(ensure_configured=lambda: None, api=types.SimpleNamespace(api_key=api_key))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr(ray_wandb, "wandb", fake)
    for var in ("WANDB_API_KEY", "WANDB_MODE"):
        monkeypatch.delenv(var, raising=False)


def test_wandb_callback_project_and_group(tmp_path, monkeypatch):
    from ray.air.integrations.wandb import WandbLoggerCallback
    fake_wandb(monkeypatch)
    monkeypatch.setenv("WANDB_MODE", "offline")
    tb, wb = callbacks(["tensorboard", "wandb"], tmp_path)
    assert isinstance(wb, WandbLoggerCallback)
    assert (wb.project, wb.group, wb.excludes) == ("demo", "run-1", ["run"])


def test_wandb_without_a_login_refused(tmp_path, monkeypatch):
    fake_wandb(monkeypatch)
    with pytest.raises(ConfigError, match="WANDB_API_KEY") as exc:
        check_loggers(["wandb"], run_dir=tmp_path)
    assert exc.value.field == "loggers"
    monkeypatch.setenv("WANDB_API_KEY", "not-a-real-key")
    check_loggers(["wandb"], run_dir=tmp_path)
    fake_wandb(monkeypatch, api_key="from-netrc")  # `wandb login`
    check_loggers(["wandb"], run_dir=tmp_path)


def test_messages_never_show_credentials(monkeypatch, tmp_path):
    with pytest.raises(ConfigError) as exc:
        check_loggers(["mlflow"], run_dir="s3://AKIAXXX:secret@bucket/runs")
    assert "secret" not in str(exc.value)


# ---------------------------------------------------------------- what is written


def test_result_scalars_step_names_and_what_is_left_out():
    result = {"epoch": 2, "training_iteration": 5, "val/AP": 0.25, "train/loss": 1.5, "lr": 0.01,
              "resumes": 0, "stage": "detector", "status": "ok", "done": False, "AP": float("nan"),
              "inf": float("inf"), "time_total_s": 3.0, "pid": 123, "config": {"x": 1}, "nested": {"a": 1}}
    assert result_scalars(result) == (2, {"val/AP": 0.25, "train/loss": 1.5, "lr": 0.01, "resumes": 0.0,
                                          "epoch": 2.0, "nested/a": 1.0})
    assert result_scalars({"training_iteration": 4, "x": 1})[0] == 4


def test_trial_params_of_a_detbench_trial_leave_the_run_out():
    config = {"cell": {"cell_id": "focal/tiny/seed0", "method": "focal", "label": "focal", "variant": "",
                       "arch": "retinanet", "seed": 0, "stages": ["detector"],
                       "dataset": {"name": "tiny", "train_images": "/d"},
                       "schedule": {"epochs": 3, "lr": 0.01}, "method_config": {"gamma": 2.0, "note": "x" * 400}},
              "run": {"run_dir": "/runs/r1", "versions_json": "{...}", "storage_options": {"region": "eu"}},
              "hp": {"schedule|lr": 0.02}}
    params = trial_params(config)
    assert params["cell"] == "focal/tiny/seed0" and params["dataset"] == "tiny" and params["seed"] == 0
    assert params["schedule/epochs"] == 3 and params["method_config/gamma"] == 2.0
    assert params["hp/schedule.lr"] == 0.02
    assert len(params["method_config/note"]) == 250
    assert not any(k.startswith("run") or "/d" == v for k, v in params.items())
    assert trial_params({"x": 1, "nested": {"y": "a"}, "skip": [1, 2]}) == {"x": 1, "nested/y": "a"}


class FakeTrial:
    """What the logger callbacks read of a Tune trial."""

    def __init__(self, trial_id: str, local_path: Path, config: dict):
        self.trial_id, self.local_path, self.config = trial_id, str(local_path), config
        self.evaluated_params = config

    def init_local_path(self):
        Path(self.local_path).mkdir(parents=True, exist_ok=True)

    def __str__(self):
        return f"fake_{self.trial_id}"


def epochs(x: float):
    """Three epoch reports, then a final report repeating epoch 3 with a cost and a status."""
    reports = [{"epoch": e, "training_iteration": e, "val/AP": x * e, "train/loss": 1 / e, "stage": "detector"}
               for e in (1, 2, 3)]
    return reports + [{**reports[-1], "training_iteration": 4, "cost/s": 1.5, "status": "ok"}]


def test_tensorboard_event_file_per_trial_step_is_epoch(tmp_path):
    cb = EpochTBXLoggerCallback()
    trial = FakeTrial("t0", tmp_path / "trial_t0", {"x": 0.5})
    cb.log_trial_start(trial)
    for i, r in enumerate(epochs(0.5)):
        cb.log_trial_result(i, trial, r)
    cb.log_trial_end(trial)
    (event_file,) = (tmp_path / "trial_t0").glob("events.out.tfevents.*")
    scalars = read_scalars(event_file)
    assert scalars["val/AP"] == [(1, 0.5), (2, 1.0), (3, 1.5)]  # the final report's repeat not written again
    assert [s for s, _ in scalars["train/loss"]] == [1, 2, 3] and scalars["cost/s"] == [(3, 1.5)]
    assert not {"stage", "status", "training_iteration"} & set(scalars)
    assert not any(t.startswith("ray/") for t in scalars)  # not Tune's default "ray/tune/val/AP"
    assert hparam_tags(event_file)  # the trial's params as TensorBoard hparams


def test_mlflow_run_per_trial_resumed_trial_continues_its_run(tmp_path):
    from mlflow.tracking import MlflowClient
    uri = f"sqlite:///{tmp_path}/mlflow.db"

    def driver():
        cb = EpochMLflowLoggerCallback(uri, experiment_name="demo", run_id="run-1", suite_name="demo")
        cb.setup()
        return cb

    cb = driver()
    trials = [FakeTrial(f"t{i}", tmp_path / f"trial_t{i}", {"x": x}) for i, x in enumerate((0.1, 0.2))]
    for t in trials:
        cb.log_trial_start(t)
        for i, r in enumerate(epochs(float(t.config["x"]))[:2]):
            cb.log_trial_result(i, t, r)
    cb.log_trial_end(trials[0])
    # A new driver (detbench run --resume) finishes trial t1 in the same MLflow run.
    cb = driver()
    for i, r in enumerate(epochs(0.2)[2:]):
        cb.log_trial_result(i, trials[1], r)
    cb.log_trial_end(trials[1])

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == ["t0", "t1"]
    by_trial = {r.data.tags["trial_id"]: r for r in runs}
    assert all(r.data.tags["detbench.run_id"] == "run-1" and r.info.status == "FINISHED" for r in runs)
    assert by_trial["t0"].data.params == {"x": "0.1"}
    history = client.get_metric_history(by_trial["t1"].info.run_id, "val/AP")
    assert [(m.step, round(m.value, 6)) for m in history] == [(1, 0.2), (2, 0.4), (3, 0.6)]
    assert "stage" not in by_trial["t1"].data.metrics and by_trial["t1"].data.metrics["cost/s"] == 1.5


# ---------------------------------------------------------------- the sweep's tuners


def test_run_sweep_gives_every_tuner_fresh_logger_callbacks(tmp_path, monkeypatch):
    from ray import tune

    from harness.config import DetectorSpec, ResourcesSpec, ScheduleSpec, SearchSpec
    from harness.data import PreparedDataset
    from harness.plan import Cell, RunInfo
    from harness.sweep import run_sweep
    from harness.sweep import trial_config

    made, restored = [], []

    class FakeTuner:
        def __init__(self, trainable, *, param_space, tune_config, run_config):
            made.append(run_config)

        def fit(self):
            return []

        @staticmethod
        def can_restore(path, storage_filesystem=None):
            return path.endswith("/cells")

        @classmethod
        def restore(cls, path, trainable, **kw):
            tuner = cls.__new__(cls)
            run_config = types.SimpleNamespace(callbacks=None)
            tuner._local_tuner = types.SimpleNamespace(get_run_config=lambda: run_config)
            restored.append(run_config)
            return tuner

    monkeypatch.setattr(tune, "Tuner", FakeTuner)
    data = PreparedDataset(name="tiny", train_annotations="a", train_images="i", val_annotations="a", val_images="i")
    cell = Cell(cell_id="m/tiny/seed0", method="m", label="m", variant="", stages=("detector",), method_config={},
                detector=DetectorSpec(), arch="faster_rcnn", schedule=ScheduleSpec(), dataset=data, seed=0)
    searched = dataclasses.replace(cell, cell_id="s/tiny/seed0",
                                   search=SearchSpec(space={"schedule.lr": {"loguniform": [1e-3, 1e-1]}}))
    run = RunInfo(run_dir=str(tmp_path), run_id="run-1", suite="demo", smoke=True, resources=ResourcesSpec(),
                  versions_json="{}", git_sha="x")
    mine = tune.Callback()
    run_sweep([cell, searched], run, concurrency=1, callbacks=[mine], loggers=["tensorboard", "mlflow"])
    grid, search = made
    assert grid.callbacks[0] is mine and [type(c) for c in grid.callbacks[1:]] == [EpochTBXLoggerCallback,
                                                                                   EpochMLflowLoggerCallback]
    assert {type(c) for c in search.callbacks} >= {EpochTBXLoggerCallback, EpochMLflowLoggerCallback}
    assert not set(map(id, grid.callbacks[1:])) & set(map(id, search.callbacks))  # fresh per experiment
    made.clear()
    run_sweep([cell], run, concurrency=1)  # default: TensorBoard only
    assert [type(c) for c in made[0].callbacks] == [EpochTBXLoggerCallback]
    run_sweep([cell], run, concurrency=1, callbacks=[mine], resume=True, loggers=["mlflow"])
    assert [type(c) for c in restored[0].callbacks] == [tune.Callback, NoTBXLoggerCallback, EpochMLflowLoggerCallback]
    params = trial_params(trial_config(searched, run) | {"hp": {"schedule|lr": 0.01}})
    assert params["cell"] == "s/tiny/seed0" and params["hp/schedule.lr"] == 0.01 and params["schedule/epochs"] > 0
    assert not any(str(tmp_path) in str(v) for v in params.values())  # the run's paths stay out


# ---------------------------------------------------------------- a real Tune run


@pytest.mark.slow
def test_tune_run_reaches_tensorboard_and_mlflow(tmp_path):
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune

    def report_three_epochs(config):  # defined here: Ray pickles it by value (workers cannot import tests/)
        for e in (1, 2, 3):
            tune.report({"epoch": e, "val/AP": config["x"] * e, "train/loss": 1.0 / e, "lr": 0.01, "stage": "detector"})
        tune.report({"epoch": 3, "val/AP": config["x"] * 3, "train/loss": 1.0 / 3, "status": "ok", "time/total_s": 0.5})

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(
            report_three_epochs, param_space={"x": tune.grid_search([0.1, 0.2])},
            tune_config=tune.TuneConfig(trial_dirname_creator=lambda t: f"trial_{t.trial_id}"),
            run_config=tune.RunConfig(name="cells", storage_path=str(tmp_path / "tune"), verbose=0,
                                      callbacks=callbacks(["tensorboard", "mlflow"], tmp_path)))
        grid = tuner.fit()
    finally:
        if started:
            ray.shutdown()
    assert not grid.errors and len(grid) == 2

    trial_dirs = sorted((tmp_path / "tune" / "cells").glob("trial_*"))
    assert len(trial_dirs) == 2
    expected = {}
    for d in trial_dirs:
        (event_file,) = d.glob("events.out.tfevents.*")  # exactly one: Tune added no default logger
        scalars = read_scalars(event_file)
        assert [s for s, _ in scalars["val/AP"]] == [1, 2, 3] and [s for s, _ in scalars["train/loss"]] == [1, 2, 3]
        assert scalars["time/total_s"] == [(3, 0.5)] and "stage" not in scalars
        expected[d.name.removeprefix("trial_")] = [round(v, 6) for _, v in scalars["val/AP"]]

    client = MlflowClient(f"sqlite:///{tmp_path.resolve()}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    assert sorted(r.data.tags["trial_id"] for r in runs) == sorted(expected)
    for r in runs:
        assert r.data.tags["detbench.run_id"] == "run-1" and r.info.status == "FINISHED"
        for metric in ("val/AP", "train/loss", "lr"):
            assert [m.step for m in client.get_metric_history(r.info.run_id, metric)] == [1, 2, 3]
        ap = [round(m.value, 6) for m in client.get_metric_history(r.info.run_id, "val/AP")]
        assert ap == expected[r.data.tags["trial_id"]] and ap[0] in (0.1, 0.2)


# ---------------------------------------------------------------- Optuna's journal


def journal_with_two_trials(path: Path) -> None:
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="focal/tiny/seed0", direction="maximize",
                                storage=JournalStorage(JournalFileBackend(str(path))))
    study.optimize(lambda t: t.suggest_float("lr", 1e-3, 1e-1, log=True), n_trials=2)


def test_search_journal_loads_back_as_optuna_dashboard_opens_it(tmp_path):
    """``optuna-dashboard PATH`` of an existing non-SQLite file = JournalStorage(JournalFileBackend(PATH))."""
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    path = tmp_path / "optuna" / "search0.journal"
    path.parent.mkdir()
    journal_with_two_trials(path)
    study = optuna.load_study(study_name=None, storage=JournalStorage(JournalFileBackend(str(path))))
    assert study.study_name == "focal/tiny/seed0" and len(study.trials) == 2
    assert all(t.state == optuna.trial.TrialState.COMPLETE and "lr" in t.params for t in study.trials)


def test_search_journal_opens_in_optuna_dashboard(tmp_path):
    pytest.importorskip("optuna_dashboard")
    import optuna
    from optuna_dashboard._storage_url import get_storage  # what `optuna-dashboard PATH` calls
    path = tmp_path / "search0.journal"
    journal_with_two_trials(path)
    assert len(optuna.load_study(study_name=None, storage=get_storage(str(path))).trials) == 2
