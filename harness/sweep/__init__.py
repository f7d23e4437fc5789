"""Running cells on Ray -- the only package that imports Ray: connecting and sizing against the
cluster, the search space, the Tuners, the Tune trial function, the Train worker, live loggers
and progress. Importing it imports Ray (the live loggers' Tune callbacks); nothing below it does."""
from harness.sweep.job import TRIAL_CPU, WorkerJob, node_id
from harness.sweep.loggers import check_loggers, logger_callbacks
from harness.sweep.progress import SweepProgress
from harness.sweep.space import sampled_params, trial_cell, trial_config, tune_space
from harness.sweep.trial import run_trial
from harness.sweep.tuners import (RAY_ENV, RAY_MESSAGES, check_fits, cluster_nodes, cluster_report, init_ray,
                                  ray_session, record_unfinished, run_sweep)
from harness.sweep.worker import train_worker

__all__ = ["TRIAL_CPU", "WorkerJob", "node_id", "check_loggers", "logger_callbacks", "SweepProgress",
           "sampled_params", "trial_cell", "trial_config", "tune_space", "run_trial", "RAY_ENV", "RAY_MESSAGES",
           "check_fits", "cluster_nodes", "cluster_report", "init_ray", "ray_session", "record_unfinished",
           "run_sweep", "train_worker"]
