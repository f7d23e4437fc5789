"""Live monitoring of a sweep: every trial's per-epoch curves in TensorBoard, MLflow or W&B.

The suite's ``loggers:`` (default ``[tensorboard]``) become Ray Tune callbacks on the sweep's
driver (:func:`logger_callbacks`). Each sees every result a trial reports to Tune: one per
epoch of the cell's last stage (``train/loss``, ``val/AP``, ``lr``, ``time/*``, ...,
with an explicit ``epoch``) and the trial's final report (the same epoch, plus ``cost/*``).

* ``tensorboard``: one event file per trial in the trial's Tune folder
  (``RUN_DIR/tune/<experiment>/trial_<id>/events.out.tfevents.*``), so
  ``tensorboard --logdir RUN_DIR/tune`` shows every trial as a run. Tune would add its own
  ``TBXLoggerCallback`` to any experiment that has none (``_create_default_callbacks``, unless
  ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``, which also drops its CSV/JSON loggers); ours takes
  its place, so there is exactly one event file per trial start. Without ``tensorboard`` in
  ``loggers`` a do-nothing stand-in takes the place instead: no event files at all.
* ``mlflow``: one MLflow run per trial (``MLflowLoggerCallback``), in the experiment named
  after the suite, tagged with the detbench run id. Tracking URI: ``MLFLOW_TRACKING_URI``,
  else ``sqlite:///RUN_DIR/mlflow.db`` for a local run directory (MLflow 3 refuses its
  ``file:`` store unless ``MLFLOW_ALLOW_FILE_STORE=true``); an object-store run directory
  needs ``MLFLOW_TRACKING_URI``.
* ``wandb``: one W&B run per trial (``WandbLoggerCallback``): project = the suite's name,
  group = the run id. Needs the ``wandb`` package and ``WANDB_API_KEY`` (or ``wandb login``,
  or ``WANDB_MODE=offline``).

What the TensorBoard and MLflow loggers write, per result: every finite number under its own
name (``val/AP`` stays ``val/AP``: TensorBoard groups the charts by the part before the first
``/``), at step ``epoch`` (Tune's ``training_iteration`` for a result without one), skipping a
value already written at that step (the final report repeats the last epoch's). Strings
(``status``, ``stage``), booleans, NaN/inf and Tune's own bookkeeping (``time_total_s``,
``pid``, ...) are not written. Parameters (MLflow params, TensorBoard hparams) are the cell's
identity and sampled values (:func:`trial_params`), never the run's paths or storage options.
"""
from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Sequence
from numbers import Real
from pathlib import Path

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune import Callback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS, TRAINING_ITERATION

from harness.core import ConfigError

log = logging.getLogger(__name__)

#: logger name -> (module it needs, the package to install for it).
PACKAGES = {"tensorboard": ("tensorboardX", "tensorboardX"),
            "mlflow": ("mlflow", "mlflow-skinny"),
            "wandb": ("wandb", "wandb")}

#: Keys of a Tune result that are Tune's bookkeeping, not the trial's metrics.
TUNE_KEYS = frozenset(AUTO_RESULT_KEYS) | {"done", "trial_id", "experiment_tag", "should_checkpoint"}

_MAX_PARAM_CHARS = 250  # MLflow refuses long parameter values (6000+ chars); ours are short


# ---------------------------------------------------------------- checks


def _redact(uri: str) -> str:
    """A URI without the ``user:password@`` part (never print a credential)."""
    return re.sub(r"(?<=://)[^/@]*@", "***@", uri)


def mlflow_tracking_uri(run_dir: str | Path | None) -> str:
    """``MLFLOW_TRACKING_URI``, else ``sqlite:///RUN_DIR/mlflow.db`` of a local run directory.

    An object-store run directory (``s3://...``) without ``MLFLOW_TRACKING_URI`` is a
    :class:`ConfigError`: the driver's MLflow store must be a database or a server.
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if run_dir is None or "://" in str(run_dir):
        where = f"the object-store run directory {_redact(str(run_dir))}" if run_dir else "no local run directory"
        raise ConfigError(f"logger 'mlflow' with {where} needs a tracking server or database: set "
                          "MLFLOW_TRACKING_URI (e.g. http://mlflow-host:5000 or sqlite:////shared/mlflow.db)",
                          field="loggers")
    return "sqlite:///" + str(Path(run_dir).resolve() / "mlflow.db")


def _wandb_logged_in(wandb) -> bool:
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return True
    try:  # a `wandb login` (netrc); the key itself is never read out here
        wandb.ensure_configured()
        return bool(wandb.api.api_key)
    except Exception:  # noqa: BLE001 - wandb's internals moved: let Ray's callback decide
        return True


def check_loggers(loggers: Sequence[str], *, run_dir: str | Path | None = None) -> None:
    """Refuse, before Ray starts, loggers that cannot work: unknown ones, a missing package, an
    MLflow store that cannot be opened (an object-store ``run_dir`` without
    ``MLFLOW_TRACKING_URI``, a ``file:`` URI MLflow refuses), W&B without a login."""
    for name in loggers:
        if name not in PACKAGES:
            raise ConfigError(f"unknown logger {name!r}; choose from {', '.join(PACKAGES)}", field="loggers")
        module, package = PACKAGES[name]
        try:
            mod = importlib.import_module(module)
        except ImportError:
            raise ConfigError(f"logger {name!r} needs the {package} package: pip install {package}",
                              field="loggers") from None
        if name == "mlflow" and run_dir is not None:
            _check_mlflow_store(mlflow_tracking_uri(run_dir))
        if name == "wandb" and not _wandb_logged_in(mod):
            raise ConfigError("logger 'wandb' needs a W&B login: set WANDB_API_KEY, run `wandb login`, "
                              "or set WANDB_MODE=offline", field="loggers")


def _check_mlflow_store(uri: str) -> None:
    """Open a file store up front (no network, no database to create): MLflow 3 refuses one
    unless MLFLOW_ALLOW_FILE_STORE=true. Servers and databases are first used by the sweep."""
    if not uri.startswith(("file:", "/", "./", "../", "~")):
        return
    from mlflow.tracking import MlflowClient
    try:
        MlflowClient(uri)
    except Exception as exc:  # noqa: BLE001 - MlflowException and whatever a store raises
        first = str(exc).split(". ")[0]
        raise ConfigError(f"logger 'mlflow': MLFLOW_TRACKING_URI {_redact(uri)} cannot be used ({first}); "
                          "use sqlite:///PATH/mlflow.db or a server, or set MLFLOW_ALLOW_FILE_STORE=true",
                          field="loggers") from None


# ---------------------------------------------------------------- what a trial logs


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


def result_scalars(result: dict) -> tuple[int, dict[str, float]]:
    """``(step, {name: value})`` of a Tune result: its finite numbers (not booleans) under their
    own names, Tune's bookkeeping left out; step = ``epoch``, else ``training_iteration``."""
    epoch = result.get("epoch")
    step = int(epoch) if isinstance(epoch, Real) and not isinstance(epoch, bool) and math.isfinite(epoch) \
        else int(result.get(TRAINING_ITERATION) or 0)
    mine = {k: v for k, v in result.items() if k not in TUNE_KEYS}
    scalars = {k: float(v) for k, v in _flat(mine).items()
               if isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v)}
    return step, scalars


class _NewScalars:
    """Per trial: what was last written at which step, so a repeat is not written twice."""

    def __init__(self):
        self._seen: dict[str, dict[str, tuple[int, float]]] = {}

    def __call__(self, trial_id: str, result: dict) -> tuple[int, dict[str, float]]:
        step, scalars = result_scalars(result)
        seen = self._seen.setdefault(trial_id, {})
        new = {k: v for k, v in scalars.items() if seen.get(k) != (step, v)}
        seen.update({k: (step, v) for k, v in new.items()})
        return step, new

    def forget(self, trial_id: str) -> None:
        self._seen.pop(trial_id, None)


def _scalar_param(v) -> bool:
    return isinstance(v, (str, bool, int, float)) and not (isinstance(v, float) and not math.isfinite(v))


def trial_params(config: dict) -> dict[str, str | int | float | bool]:
    """A trial's parameters for MLflow / TensorBoard's hparams: for a detbench trial the cell's
    identity (``cell``, ``method``, ``variant``, ``dataset``, ``seed``, ...), its ``schedule/*``
    and ``method_config/*`` and the sampled values (``hp/<search key>``); never the run's paths,
    versions or storage options. Any other config: its flattened scalar values."""
    cell = config.get("cell")
    if isinstance(cell, dict) and "cell_id" in cell:
        from harness.sweep.space import sampled_params
        params = {"cell": cell["cell_id"], "method": cell.get("method"), "label": cell.get("label"),
                  "variant": cell.get("variant"), "arch": cell.get("arch"), "seed": cell.get("seed"),
                  "dataset": (cell.get("dataset") or {}).get("name"), "stages": ",".join(cell.get("stages") or ())}
        params.update(_flat(cell.get("schedule") or {}, "schedule/"))
        params.update(_flat(cell.get("method_config") or {}, "method_config/"))
        params.update({f"hp/{k}": v for k, v in sampled_params(config).items()})
    else:
        params = _flat(config)
    return {k: (v[:_MAX_PARAM_CHARS] if isinstance(v, str) else v) for k, v in params.items() if _scalar_param(v)}


# ---------------------------------------------------------------- callbacks


class EpochTBXLoggerCallback(TBXLoggerCallback):
    """Tune's TensorBoard logger, writing :func:`result_scalars` (own names, step = epoch) and,
    when the trial ends, :func:`trial_params` as hparams. Being a ``TBXLoggerCallback``, it
    keeps Tune from adding its default one."""

    def __init__(self):
        super().__init__()
        self._new = _NewScalars()

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial not in self._trial_writer:
            self.log_trial_start(trial)
        step, scalars = self._new(trial.trial_id, result)
        writer = self._trial_writer[trial]
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, global_step=step)
        self._trial_result[trial] = {**self._trial_result.get(trial, {}), **scalars}
        writer.flush()

    def log_trial_end(self, trial, failed: bool = False):
        writer = self._trial_writer.pop(trial, None)
        last = self._trial_result.pop(trial, None)
        self._new.forget(trial.trial_id)
        if writer is None:
            return
        if last:
            try:
                from tensorboardX.summary import hparams
                for summary in hparams(hparam_dict=trial_params(trial.config), metric_dict=last):
                    writer.file_writer.add_summary(summary)
            except Exception as exc:  # noqa: BLE001 - hparams are a nicety; the curves are written
                log.warning("TensorBoard hparams of trial %s not written: %s", trial.trial_id, exc)
        writer.close()


class NoTBXLoggerCallback(TBXLoggerCallback):
    """Writes nothing; in place of Tune's default TensorBoard logger when ``tensorboard`` is not
    among the suite's loggers (it needs no tensorboardX)."""

    def __init__(self):
        self._trial_writer, self._trial_result = {}, {}

    def log_trial_start(self, trial):
        pass

    def log_trial_result(self, iteration: int, trial, result: dict):
        pass

    def log_trial_end(self, trial, failed: bool = False):
        pass


class EpochMLflowLoggerCallback(MLflowLoggerCallback):
    """Ray's MLflow logger: one run per trial (tags: ``detbench.run_id``, ``detbench.suite``,
    ``trial_id``; run name: the cell and trial id), :func:`trial_params` as its params,
    :func:`result_scalars` as its metrics at step = epoch. A resumed sweep's trial continues
    its MLflow run (found by run id and trial id) instead of starting a second one."""

    def __init__(self, tracking_uri: str, *, experiment_name: str, run_id: str, suite_name: str,
                 artifact_location: str | None = None):
        super().__init__(tracking_uri, experiment_name=experiment_name, save_artifact=False,
                         tags={"detbench.run_id": run_id, "detbench.suite": suite_name})
        self.run_id = run_id
        self.artifact_location = artifact_location
        self._new = _NewScalars()

    def setup(self, *args, **kwargs):
        self.mlflow_util.setup_mlflow(tracking_uri=self.tracking_uri, experiment_name=self.experiment_name,
                                      artifact_location=self.artifact_location)
        self._trial_runs = {}
        self._new = _NewScalars()

    def _client(self):
        from mlflow.tracking import MlflowClient
        return MlflowClient(self.tracking_uri)

    def _earlier_run(self, trial_id: str) -> str | None:
        """This detbench run's MLflow run of the trial, started by an earlier driver."""
        found = self._client().search_runs(
            [self.mlflow_util.experiment_id], max_results=1,
            filter_string=f"tags.`detbench.run_id` = '{self.run_id}' and tags.trial_id = '{trial_id}'")
        return found[0].info.run_id if found else None

    def log_trial_start(self, trial):
        if trial in self._trial_runs:
            return
        earlier = self._earlier_run(trial.trial_id)
        if earlier is not None:
            self._client().update_run(earlier, status="RUNNING")
            self._trial_runs[trial] = earlier
            return
        params = trial_params(trial.config)
        name = f"{params['cell']} {trial.trial_id}" if "cell" in params else str(trial)
        run = self.mlflow_util.start_run(run_name=name, tags={**self.tags, "trial_id": trial.trial_id,
                                                              "trial_name": str(trial)})
        self._trial_runs[trial] = run.info.run_id
        self.mlflow_util.log_params(run_id=run.info.run_id, params_to_log=params)

    def log_trial_result(self, iteration: int, trial, result: dict):
        if trial not in self._trial_runs:
            self.log_trial_start(trial)
        step, scalars = self._new(trial.trial_id, result)
        if scalars:
            self.mlflow_util.log_metrics(run_id=self._trial_runs[trial], metrics_to_log=scalars, step=step)

    def log_trial_end(self, trial, failed: bool = False):
        if trial not in self._trial_runs:
            return
        self._new.forget(trial.trial_id)
        self.mlflow_util.end_run(run_id=self._trial_runs.pop(trial), status="FAILED" if failed else "FINISHED")


def logger_callbacks(loggers: Sequence[str], *, run_dir: str | Path | None, suite_name: str,
                     run_id: str) -> list[Callback]:
    """The Tune callbacks of a sweep's ``loggers`` (see the module's docstring); always exactly
    one TensorBoard callback (:class:`EpochTBXLoggerCallback` or :class:`NoTBXLoggerCallback`).

    ``run_dir``: the run directory (a local path or an ``s3://`` URI; MLflow's default store
    lives in a local one). Raises :class:`ConfigError` as :func:`check_loggers` does. Build a
    fresh list for each ``Tuner``.
    """
    check_loggers(loggers, run_dir=run_dir)
    callbacks: list[Callback] = [EpochTBXLoggerCallback() if "tensorboard" in loggers else NoTBXLoggerCallback()]
    if "mlflow" in loggers:
        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage reports from a benchmark driver
        uri = mlflow_tracking_uri(run_dir)
        local = not os.environ.get("MLFLOW_TRACKING_URI")
        callbacks.append(EpochMLflowLoggerCallback(
            uri, experiment_name=suite_name, run_id=run_id, suite_name=suite_name,
            artifact_location=(Path(run_dir).resolve() / "mlartifacts").as_uri() if local else None))
    if "wandb" in loggers:
        from ray.air.integrations.wandb import WandbLoggerCallback
        # The trial config's "run" (paths, versions, storage options) stays out of W&B's config.
        callbacks.append(WandbLoggerCallback(project=suite_name, group=run_id, excludes=["run"]))
    return callbacks


__all__ = ["PACKAGES", "EpochMLflowLoggerCallback", "EpochTBXLoggerCallback", "NoTBXLoggerCallback",
           "check_loggers", "logger_callbacks", "mlflow_tracking_uri", "result_scalars", "trial_params"]
