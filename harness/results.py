"""The results store: one long-format row per (trial, cell, metric, epoch).

Why this shape: every trial's rows are written at once, as one Parquet file
``rows/<trial_id>.parquet``, via temp file + fsync + ``os.replace``. A trial
killed mid-write leaves at most a ``*.tmp`` file that readers ignore, a retried
trial simply replaces its file (no duplicates), and concurrent writers of
different trials never touch the same file, so no locking is needed.
``row_id`` hashes the identity columns so readers can still de-duplicate.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator, model_validator

from harness.fileio import atomic_write
from harness.errors import DataError

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


def _to_pandas(table: pa.Table):
    import pandas as pd
    # Nullable ints stay ints in pandas (epoch would otherwise become float).
    mapper = {pa.int64(): pd.Int64Dtype()}
    return table.to_pandas(types_mapper=mapper.get)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform/filesystem
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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


class ResultStore:
    """All result rows of one run, under ``run_dir/rows/``."""

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.rows_dir = self.run_dir / "rows"

    def path_for(self, trial_id: str) -> Path:
        if not trial_id or "/" in trial_id or "\\" in trial_id or trial_id.startswith("."):
            raise ValueError(f"trial_id {trial_id!r} is not usable as a file name")
        return self.rows_dir / f"{trial_id}.parquet"

    def write_trial(self, trial_id: str, rows: list[ResultRow]) -> Path:
        """Atomically (re)write all rows of one trial; returns the file path.

        Rewriting a trial replaces its previous file, so retries never
        duplicate rows. Rows are validated before anything touches disk.
        """
        path = self.path_for(trial_id)
        rows = [r if isinstance(r, ResultRow) else ResultRow.model_validate(r) for r in rows]
        if not rows:
            raise ValueError(f"trial {trial_id}: no rows to write (record a failure row instead)")
        seen: set[str] = set()
        for r in rows:
            if r.trial_id != trial_id:
                raise ValueError(f"row of trial {r.trial_id!r} passed to write_trial({trial_id!r})")
            if r.row_id in seen:
                raise ValueError(f"trial {trial_id}: duplicate row for metric {r.metric!r} "
                                 f"(dataset {r.dataset}, condition {r.condition}@{r.severity}, "
                                 f"seed {r.seed}, epoch {r.epoch})")
            seen.add(r.row_id)
        table = pa.Table.from_pylist([r.model_dump() for r in rows], schema=SCHEMA)
        buf = pa.BufferOutputStream()
        pq.write_table(table, buf)
        atomic_write(path, buf.getvalue().to_pybytes())
        _fsync_dir(self.rows_dir)
        return path

    def retire(self, trial_id: str) -> None:
        """Move a trial's rows out of the results (to ``rows-retired/``), e.g. before a retry."""
        retired = self.run_dir / "rows-retired"
        retired.mkdir(exist_ok=True)
        self.path_for(trial_id).replace(retired / self.path_for(trial_id).name)

    def retired(self, trial_id: str) -> bool:
        return (self.run_dir / "rows-retired" / self.path_for(trial_id).name).is_file()

    def _files(self) -> list[Path]:
        if not self.rows_dir.is_dir():
            return []
        return sorted(self.rows_dir.glob("*.parquet"))  # *.tmp never matches

    def trial_ids(self) -> set[str]:
        """Trials with a committed rows file (failed ones included)."""
        return {p.name[: -len(".parquet")] for p in self._files()}

    def read(self):
        """All rows as a pandas DataFrame with the schema's columns (even when
        empty), de-duplicated by row_id keeping the latest ``created_at``."""
        tables = []
        for p in self._files():
            try:
                tables.append(pq.read_table(p).select(list(COLUMNS)).cast(SCHEMA))
            except FileNotFoundError:
                continue  # removed between listing and reading
            except (pa.ArrowException, KeyError, ValueError) as e:
                raise DataError(f"unreadable results file ({e})", file=p) from None
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        df = _to_pandas(table)
        if len(df):
            df = (df.sort_values("created_at", kind="stable")
                    .drop_duplicates("row_id", keep="last")
                    .sort_values(["trial_id", "created_at"], kind="stable")
                    .reset_index(drop=True))
        return df

    validate_frame = staticmethod(validate_frame)
