"""Metric names that more than one layer spells: the producers (modeling, engine, sweep) write them,
the results rows carry them, the report reads them. One spelling, here, below all of them;
:mod:`harness.results.schema` documents them as the rows' cost columns."""
from __future__ import annotations

COST_PARAMS_M = "cost/params_M"                     # detector parameters, millions
COST_NECK_PARAMS_M = "cost/neck_params_M"           # of which the neck's
COST_GFLOPS = "cost/gflops"                         # forward FLOPs per image at the evaluation size
COST_NECK_GFLOPS = "cost/neck_gflops"               # of which the neck's
COST_LATENCY_MS = "cost/latency_ms"                 # median batch-1 inference latency after warm-up
COST_PEAK_MEM_MB = "cost/peak_mem_mb"               # peak CUDA memory (GPU) or peak RSS (CPU) of rank 0
COST_TRAIN_IMAGES_PER_S = "cost/train_images_per_s"  # training images per second of the worker group
COST_DEVICE_S = "cost/device_s"                     # a stage's device-seconds, every worker's summed
COST_WORKER_S = "cost/worker_s"                     # a stage's wall time on rank 0
COST_WORKER_START_S = "cost/worker_start_s"         # from asking for the worker group to its first stage
COST_TRAIN_RUN_S = "cost/train_run_s"               # the whole Train run: start-up, stages, teardown

COST_METRIC_NAMES = (COST_PARAMS_M, COST_NECK_PARAMS_M, COST_GFLOPS, COST_NECK_GFLOPS, COST_LATENCY_MS, COST_PEAK_MEM_MB,
                COST_TRAIN_IMAGES_PER_S, COST_DEVICE_S, COST_WORKER_S, COST_WORKER_START_S, COST_TRAIN_RUN_S)
