"""Results: every measured number is a :class:`ResultRow` in a run's Parquet :class:`ResultStore`.

* :mod:`harness.results.schema` -- the row and its Arrow schema;
* :mod:`harness.results.store` -- one file per trial, atomic, and the finished-cell index;
* :mod:`harness.results.trial` -- a trial's outputs as rows, its config hash, unfinished trials.
"""
from harness.results.schema import COLUMNS, IDENTITY_COLUMNS, SCHEMA, STATUS_METRIC, ResultRow, validate_frame
from harness.results.store import ResultStore
from harness.results.trial import config_hash, record_unfinished, report_of_rows, rows_for_trial

__all__ = ["COLUMNS", "IDENTITY_COLUMNS", "SCHEMA", "STATUS_METRIC", "ResultRow", "ResultStore",
           "validate_frame", "config_hash", "record_unfinished", "report_of_rows", "rows_for_trial"]
