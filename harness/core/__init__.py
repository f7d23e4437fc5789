"""What every other package stands on: user-facing errors, durable file writes, the registry base,
validation messages, this node's folders, the metric names several layers spell.
No torch, no Ray, no other harness package."""
from harness.core.errors import EXIT_USER_ERROR, ConfigError, DataError, DetbenchError, StorageError
from harness.core.metrics import (COST_DEVICE_S, COST_GFLOPS, COST_LATENCY_MS, COST_METRIC_NAMES, COST_NECK_GFLOPS,
                                  COST_NECK_PARAMS_M, COST_PARAMS_M, COST_PEAK_MEM_MB, COST_TRAIN_IMAGES_PER_S,
                                  COST_TRAIN_RUN_S, COST_WORKER_S, COST_WORKER_START_S)
from harness.core.fileio import TMP_SUFFIX, atomic_write, atomic_write_json, file_lock, fsync_dir, sha256_file
from harness.core.paths import missing_path_hint, node_cache_dir
from harness.core.registry import Registry
from harness.core.validation import UNKNOWN_PLUGIN, format_validation_error, suggest

__all__ = ["COST_DEVICE_S", "COST_GFLOPS", "COST_LATENCY_MS", "COST_METRIC_NAMES", "COST_NECK_GFLOPS",
           "COST_NECK_PARAMS_M", "COST_PARAMS_M", "COST_PEAK_MEM_MB", "COST_TRAIN_IMAGES_PER_S", "COST_TRAIN_RUN_S",
           "COST_WORKER_S", "COST_WORKER_START_S", "EXIT_USER_ERROR", "ConfigError", "DataError", "DetbenchError",
           "StorageError", "TMP_SUFFIX", "atomic_write", "atomic_write_json", "file_lock", "fsync_dir", "sha256_file",
           "missing_path_hint", "node_cache_dir", "Registry", "UNKNOWN_PLUGIN", "format_validation_error", "suggest"]
