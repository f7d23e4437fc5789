"""The results store: every row of a run, one Parquet file per trial, and an index of finished cells.

Why this shape: every trial's rows are written at once, as one Parquet file
``rows/<trial_id>.parquet``, via temp file + fsync + ``os.replace``. A trial
killed mid-write leaves at most a ``*.tmp`` file that readers ignore, a retried
trial simply replaces its file (no duplicates), and concurrent writers of
different trials never touch the same file, so no locking is needed.

A trial that finished also leaves ``finished/<key>.json`` naming itself, keyed by
its cell and config hash, so the question a starting trial asks -- "has this cell
already been done with this config?" -- reads one small file and at most one rows
file, however many trials the run has (O(1) per trial, not O(trials)).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from harness.errors import DataError
from harness.fileio import atomic_write, atomic_write_json, fsync_dir
from harness.results.schema import COLUMNS, SCHEMA, ResultRow, validate_frame


def _to_pandas(table: pa.Table):
    import pandas as pd
    # Nullable ints stay ints in pandas (epoch would otherwise become float).
    mapper = {pa.int64(): pd.Int64Dtype()}
    return table.to_pandas(types_mapper=mapper.get)


class ResultStore:
    """All result rows of one run, under ``run_dir/rows/`` (and ``finished/``, its index)."""

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
        fsync_dir(self.rows_dir)
        done = {(r.cell, r.config_hash) for r in rows if r.epoch is None and r.status == "ok"}
        for cell, cfg_hash in done:  # after the rows: an entry always names a committed file
            atomic_write_json({"trial_id": trial_id, "cell": cell, "config_hash": cfg_hash},
                              self._finished_path(cell, cfg_hash))
        return path

    def _finished_path(self, cell: str, cfg_hash: str) -> Path:
        key = hashlib.sha256(f"{cell}\0{cfg_hash}".encode()).hexdigest()[:24]
        return self.run_dir / "finished" / f"{key}.json"

    def read_trial(self, trial_id: str):
        """The rows of one trial (empty frame if it has none), reading only its file."""
        path = self.path_for(trial_id)
        try:
            table = pq.read_table(path).select(list(COLUMNS)).cast(SCHEMA)
        except FileNotFoundError:
            table = SCHEMA.empty_table()
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise DataError(f"unreadable results file ({e})", file=path) from None
        return _to_pandas(table)

    def finished(self, trial_id: str, cell: str, cfg_hash: str):
        """Rows of a successful earlier run of this trial, or of the same cell and config; else None.

        Reads at most two small index/rows files: the trial's own rows file (a restored
        trial keeps its id) and the trial the ``finished/`` index names for the cell.
        """
        own = self.read_trial(trial_id)
        if (own["epoch"].isna() & (own["status"] == "ok")).any():
            return own
        entry = self._finished_path(cell, cfg_hash)
        try:
            other = json.loads(entry.read_text())["trial_id"]
        except (OSError, ValueError, KeyError):
            return None
        rows = self.read_trial(other) if other != trial_id else own
        mine = rows[(rows["cell"] == cell) & (rows["config_hash"] == cfg_hash)]
        return rows if (mine["epoch"].isna() & (mine["status"] == "ok")).any() else None

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
