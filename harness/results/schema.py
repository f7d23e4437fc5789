"""The result row: one long-format row per (trial, stage, dataset, condition, metric, epoch).

Every number detbench measures is one :class:`ResultRow`; its Arrow :data:`SCHEMA` is
the Parquet schema of the store (:mod:`harness.results.store`). ``row_id`` hashes the
identity columns, so readers de-duplicate a measurement recorded twice.
"""
from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime, timezone
from typing import Any, Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from harness.core import COST_METRIC_NAMES  # noqa: F401  the cost rows' metric names, re-exported with the schema

IDENTITY_COLUMNS = ("run_id", "trial_id", "method", "variant", "stage", "dataset", "split",
                    "condition", "severity", "seed", "epoch", "metric")
STATUS_METRIC = "status"  # metric name of the single row recorded for a failed trial


def _utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds")


class ResultRow(BaseModel):
    """One measured number (or one failure record) of one trial."""

    model_config = ConfigDict(extra="forbid")

    run_id: str
    suite: str
    trial_id: str
    cell: str
    method: str
    variant: str = ""
    stage: str
    dataset: str
    split: str = "val"
    condition: str = "clean"
    severity: int = 0
    seed: int
    epoch: int | None = None  # None = final evaluation; int = per-epoch curve point
    metric: str
    value: float  # NaN allowed (e.g. APs without small GT boxes)
    config_hash: str
    config_json: str
    detector: str
    wall_s: float
    device_s: float = 0.0
    metric_backend: str = ""
    versions_json: str = "{}"
    git_sha: str = ""
    status: Literal["ok", "failed", "stopped"]  # stopped = ended early by the scheduler (ASHA)
    reason: str = ""
    smoke: bool = False
    restarts: int = 0
    node_id: str = ""           # Ray node id(s) of the stage's workers, comma-separated, rank 0 first
    created_at: str = Field(default_factory=_utc_now)  # ISO 8601, UTC

    @field_validator("config_json", "versions_json")
    @classmethod
    def _is_json(cls, v: str) -> str:
        json.loads(v)  # a ValueError here becomes a pydantic ValidationError
        return v

    @field_validator("created_at")
    @classmethod
    def _iso_utc(cls, v: str) -> str:
        ts = datetime.fromisoformat(v.replace("Z", "+00:00"))
        if ts.utcoffset() is None:
            raise ValueError("created_at needs a timezone (UTC)")
        # One canonical form, so that string order == time order.
        return ts.astimezone(timezone.utc).isoformat(timespec="microseconds")

    @model_validator(mode="after")
    def _failed_has_reason(self) -> "ResultRow":
        if self.status != "ok" and not self.reason:
            raise ValueError(f"a {self.status} row needs a reason")
        return self

    @computed_field  # type: ignore[prop-decorator]
    @property
    def row_id(self) -> str:
        """sha256 (16 hex) of the identity columns: same measurement, same id."""
        ident = json.dumps([getattr(self, c) for c in IDENTITY_COLUMNS], separators=(",", ":"))
        return hashlib.sha256(ident.encode()).hexdigest()[:16]

    @classmethod
    def failure(cls, reason: str, *, status: str = "failed", **fields: Any) -> "ResultRow":
        """The one row recorded for a trial that produced no final metrics (failed or stopped)."""
        return cls(metric=STATUS_METRIC, value=math.nan, status=status, reason=reason, **fields)


_ARROW = {str: pa.string(), int: pa.int64(), float: pa.float64(), bool: pa.bool_()}


def _arrow_field(name: str, annotation: Any) -> pa.Field:
    if name == "epoch":
        return pa.field(name, pa.int64(), nullable=True)
    if name == "status":
        return pa.field(name, pa.string(), nullable=False)
    return pa.field(name, _ARROW[annotation], nullable=False)


SCHEMA = pa.schema([pa.field("row_id", pa.string(), nullable=False)] + [
    _arrow_field(n, f.annotation) for n, f in ResultRow.model_fields.items()])
COLUMNS = tuple(SCHEMA.names)


def validate_frame(df) -> None:
    """Raise ValueError unless ``df`` has exactly the schema's columns and
    every row is a valid :class:`ResultRow` whose row_id matches its identity."""
    if tuple(df.columns) != COLUMNS:
        raise ValueError(f"columns {list(df.columns)} != schema {list(COLUMNS)}")
    for i, rec in enumerate(df.to_dict("records")):
        rec = {k: (None if _is_missing(v) and k == "epoch" else v) for k, v in rec.items()}
        row_id = rec.pop("row_id")
        try:
            row = ResultRow.model_validate(rec)
        except Exception as e:
            raise ValueError(f"row {i}: {e}") from None
        if row.row_id != row_id:
            raise ValueError(f"row {i}: row_id {row_id!r} != {row.row_id!r} from identity")


def _is_missing(v: Any) -> bool:
    import pandas as pd
    return v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v))
