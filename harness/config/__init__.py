"""The suite as plain data: the schema (frozen pydantic models), the one YAML reader, row labels.

No registry lookups and no model building happen here (that is :mod:`harness.plan`);
this package imports only :mod:`harness.core`.
"""
from harness.config.labels import RowLabel, label_variant, method_label, parse_label, row_label, stage_label
from harness.config.schema import (LOGGERS, DatasetSpec, DetectorSpec, LeaderboardSpec, MethodSpec, RealCondition,
                                   ResourcesSpec, ScheduleSpec, SearchSpec, SplitSpec, StorageSpec, Strict, Suite,
                                   SyntheticSpec)
from harness.config.suite import (WEIGHT_FIELDS, data_cache_dir, detector_for, read_suite, read_yaml, resolve_paths,
                                  schedule_for)

__all__ = ["LOGGERS", "WEIGHT_FIELDS", "DatasetSpec", "DetectorSpec", "LeaderboardSpec", "MethodSpec",
           "RealCondition", "ResourcesSpec", "ScheduleSpec", "SearchSpec", "SplitSpec", "StorageSpec", "Strict",
           "Suite", "SyntheticSpec", "RowLabel", "label_variant", "data_cache_dir", "detector_for", "method_label", "parse_label", "read_suite",
           "read_yaml", "resolve_paths", "row_label", "schedule_for", "stage_label"]
