"""Running cells on Ray -- the only package that imports Ray: connecting and sizing against the
cluster, the search space, the Tuners, the Tune trial function, the Train worker, live loggers
and progress.

The face resolves its names on first use (PEP 562): every Ray Train worker process imports
:mod:`harness.sweep.worker`, and must not pay for the Tune-side modules (the live loggers'
integrations cost ~2.5 s per worker start on 2 cores, once per trial).
"""
from __future__ import annotations

import importlib

#: name -> the module of this package that defines it.
_EXPORTS = {
    "TRIAL_CPU": "job", "WorkerJob": "job", "node_id": "job",
    "decode_check_on_cluster": "images",
    "check_loggers": "loggers", "logger_callbacks": "loggers",
    "SweepProgress": "progress",
    "sampled_params": "space", "trial_cell": "space", "trial_config": "space", "tune_space": "space",
    "run_trial": "trial",
    "RAY_ENV": "tuners", "RAY_MESSAGES": "tuners", "check_fits": "tuners", "cluster_nodes": "tuners",
    "cluster_report": "tuners", "init_ray": "tuners", "ray_session": "tuners", "record_unfinished": "tuners",
    "run_sweep": "tuners",
    "train_worker": "worker",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'harness.sweep' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"harness.sweep.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
