"""The results store: every row of a run, one Parquet file per trial, and an index of finished cells.

Why this shape: every trial's rows are written at once, as one Parquet file
``rows/<trial_id>.parquet``, published whole through the run's
:class:`harness.storage.Storage` (POSIX: temp file + fsync + ``os.replace``;
object store: one PUT). A trial killed mid-write leaves at most a temporary
file that readers ignore, a retried trial simply replaces its file (no
duplicates), and concurrent writers of different trials never touch the same
file, so no locking is needed.

A trial that finished also leaves ``finished/<key>.json`` naming itself, keyed by
its cell and config hash, so the question a starting trial asks -- "has this cell
already been done with this config?" -- reads one small file and at most one rows
file, however many trials the run has (O(1) per trial, not O(trials)).
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.compute  # noqa: F401  (pa.compute)
import pyarrow.parquet as pq

from harness.core import DataError
from harness.results.schema import COLUMNS, SCHEMA, ResultRow, validate_frame
from harness.storage import Storage, open_storage

ROWS, FINISHED, RETIRED = "rows", "finished", "rows-retired"
SNAPSHOT, SNAPSHOT_KEY = "rows-snapshot.parquet", b"detbench.rows_versions"
#: Rows files read anew that make a reader refresh the snapshot.
SNAPSHOT_AFTER = 32
log = logging.getLogger(__name__)


def _to_pandas(table: pa.Table):
    import pandas as pd
    # Nullable ints stay ints in pandas (epoch would otherwise become float).
    mapper = {pa.int64(): pd.Int64Dtype()}
    return table.to_pandas(types_mapper=mapper.get)


class ResultStore:
    """All result rows of one run, under ``rows/`` of its storage (and ``finished/``, its index)."""

    def __init__(self, run_dir: str | Path | Storage):
        self.storage = open_storage(run_dir)

    def rel_for(self, trial_id: str) -> str:
        if not trial_id or "/" in trial_id or "\\" in trial_id or trial_id.startswith("."):
            raise ValueError(f"trial_id {trial_id!r} is not usable as a file name")
        return f"{ROWS}/{trial_id}.parquet"

    def path_for(self, trial_id: str) -> Path:
        """The local path of a trial's rows file (POSIX run directories only)."""
        return self.storage.local_path(self.rel_for(trial_id))

    def write_trial(self, trial_id: str, rows: list[ResultRow]) -> str:
        """Atomically (re)write all rows of one trial; returns the file as the user reads it.

        Rewriting a trial replaces its previous file, so retries never
        duplicate rows. Rows are validated before anything is written.
        """
        rel = self.rel_for(trial_id)
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
        self.storage.write_bytes(rel, buf.getvalue().to_pybytes())
        done = {(r.cell, r.config_hash) for r in rows if r.epoch is None and r.status == "ok"}
        for cell, cfg_hash in done:  # after the rows: an entry always names a committed file
            self.storage.write_json(self._finished_rel(cell, cfg_hash),
                                    {"trial_id": trial_id, "cell": cell, "config_hash": cfg_hash})
        return self.storage.display(rel)

    def _finished_rel(self, cell: str, cfg_hash: str) -> str:
        key = hashlib.sha256(f"{cell}\0{cfg_hash}".encode()).hexdigest()[:24]
        return f"{FINISHED}/{key}.json"

    def _table(self, data: bytes, rel: str) -> pa.Table:
        try:  # ParquetFile, not read_table: a third of the cost on small files (no dataset layer)
            return pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False).select(list(COLUMNS)).cast(SCHEMA)
        except (pa.ArrowException, KeyError, ValueError) as e:
            raise DataError(f"unreadable results file ({e})", file=self.storage.display(rel)) from None

    def read_trial(self, trial_id: str):
        """The rows of one trial (empty frame if it has none), reading only its file."""
        rel = self.rel_for(trial_id)
        try:
            table = self._table(self.storage.read_bytes(rel), rel)
        except FileNotFoundError:
            table = SCHEMA.empty_table()
        return _to_pandas(table)

    def finished(self, trial_id: str, cell: str, cfg_hash: str):
        """Rows of a successful earlier run of this trial, or of the same cell and config; else None.

        Reads at most two small index/rows files: the trial's own rows file (a restored
        trial keeps its id) and the trial the ``finished/`` index names for the cell.
        """
        own = self.read_trial(trial_id)
        if (own["epoch"].isna() & (own["status"] == "ok")).any():
            return own
        try:
            other = self.storage.read_json(self._finished_rel(cell, cfg_hash))["trial_id"]
        except (OSError, ValueError, KeyError):
            return None
        rows = self.read_trial(other) if other != trial_id else own
        mine = rows[(rows["cell"] == cell) & (rows["config_hash"] == cfg_hash)]
        return rows if (mine["epoch"].isna() & (mine["status"] == "ok")).any() else None

    def retire(self, trial_id: str) -> None:
        """Move a trial's rows out of the results (to ``rows-retired/``), e.g. before a retry."""
        self.storage.move(self.rel_for(trial_id), f"{RETIRED}/{trial_id}.parquet")

    def retired(self, trial_id: str) -> bool:
        return self.storage.exists(f"{RETIRED}/{trial_id}.parquet")

    def _names(self) -> list[str]:
        return [n for n in self.storage.list(ROWS) if n.endswith(".parquet")]  # temporaries never match

    def _snapshot(self) -> tuple[pa.Table | None, dict[str, str]]:
        """The last snapshot's rows and the version of each rows file they were read from."""
        try:
            data = self.storage.read_bytes(SNAPSHOT)
            table = pq.ParquetFile(pa.BufferReader(data)).read(use_threads=False)
            versions = json.loads(table.schema.metadata[SNAPSHOT_KEY])
            return table.select(list(COLUMNS)).cast(SCHEMA), versions
        except (FileNotFoundError, pa.ArrowException, KeyError, ValueError, TypeError):
            return None, {}  # none yet, or unreadable: the rows files are the truth

    def _write_snapshot(self, table: pa.Table, versions: dict[str, str]) -> None:
        """Best effort: a reader without write access (a read-only bucket policy) just reads more."""
        meta = {SNAPSHOT_KEY: json.dumps(versions, sort_keys=True)}
        buf = pa.BufferOutputStream()
        pq.write_table(table.replace_schema_metadata(meta), buf)
        try:
            self.storage.write_bytes(SNAPSHOT, buf.getvalue().to_pybytes())
        except Exception as exc:  # noqa: BLE001 -- never fail a read because a cache could not be written
            log.debug("rows snapshot not written (%s)", exc)

    def trial_ids(self) -> set[str]:
        """Trials with a committed rows file (failed ones included)."""
        return {n[: -len(".parquet")] for n in self._names()}

    def read(self):
        """All rows as a pandas DataFrame with the schema's columns (even when
        empty), de-duplicated by row_id keeping the latest ``created_at``.

        Why a snapshot: a 1,000-trial run has 1,000 rows files, and on an object
        store each is one request. ``rows-snapshot.parquet`` holds the rows of every
        file it was made from together with that file's version token
        (:meth:`Storage.versions`, one listing); a reader takes from it the files
        whose token is unchanged and reads only the others, then refreshes the
        snapshot when :data:`SNAPSHOT_AFTER` or more were new. The rows files stay
        the truth: a file rewritten, retired or added is always read from itself,
        and the version recorded is the one listed *before* reading, so a snapshot
        can cause an extra read, never a stale row.
        """
        versions = {n: v for n, v in self.storage.versions(ROWS).items() if n.endswith(".parquet")}
        snap, snap_versions = self._snapshot() if versions else (None, {})
        kept = {n for n, v in versions.items() if snap_versions.get(n) == v}
        tables = []
        if snap is not None and kept:
            ids = pa.array([n[: -len(".parquet")] for n in kept])
            tables.append(snap.filter(pa.compute.is_in(snap["trial_id"], value_set=ids)))
        fresh = sorted(set(versions) - kept)
        rels = [f"{ROWS}/{n}" for n in fresh]
        read = set()
        for name, rel, data in zip(fresh, rels, self.storage.read_many(rels)):
            if data is not None:  # None: removed between listing and reading
                tables.append(self._table(data, rel))
                read.add(name)
        table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
        if len(read) >= SNAPSHOT_AFTER:
            self._write_snapshot(table, {n: versions[n] for n in kept | read})
        df = _to_pandas(table)
        if len(df):
            df = (df.sort_values("created_at", kind="stable")
                    .drop_duplicates("row_id", keep="last")
                    .sort_values(["trial_id", "created_at"], kind="stable")
                    .reset_index(drop=True))
        return df

    validate_frame = staticmethod(validate_frame)
