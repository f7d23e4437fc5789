"""Results: every measured number is a :class:`ResultRow` in a run's Parquet :class:`ResultStore`.

* :mod:`harness.results.schema` -- the row, its Arrow schema and the metric names;
* :mod:`harness.results.store` -- one file per trial, atomic, and the finished-cell index;
* :mod:`harness.results.trial` -- a trial's outputs as rows, its config hash;
* :mod:`harness.results.run` -- reading a run directory (its plan and its suite's settings).
"""
from harness.results.run import DRIVER_FILE, RUN_FILE, RunSettings, load_run, open_run, planned_cells, run_settings
from harness.results.schema import (COST_METRIC_NAMES, COLUMNS, IDENTITY_COLUMNS, SCHEMA, STATUS_METRIC, ResultRow,
                                    validate_frame)
from harness.results.store import ResultStore
from harness.results.trial import config_hash, report_of_rows, row_variant, rows_for_trial

__all__ = ["DRIVER_FILE", "RUN_FILE", "RunSettings", "load_run", "open_run", "planned_cells", "run_settings",
           "COST_METRIC_NAMES", "COLUMNS", "IDENTITY_COLUMNS", "SCHEMA", "STATUS_METRIC", "ResultRow", "ResultStore",
           "validate_frame", "config_hash", "report_of_rows", "row_variant", "rows_for_trial"]
