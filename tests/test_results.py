"""The results store: schema, stable row ids, atomic and idempotent writes."""
from __future__ import annotations

import math
import os

import pandas as pd
import pytest
from pydantic import ValidationError

from harness.results import (COLUMNS, IDENTITY_COLUMNS, SCHEMA, ResultRow, ResultStore,
                             validate_frame)

BASE = dict(run_id="run1", suite="smoke", trial_id="t1", cell="voc/clean", method="faster_rcnn",
            stage="final", dataset="voc", seed=0, metric="AP", value=0.42, config_hash="abc",
            config_json='{"lr": 0.01}', detector="fasterrcnn_resnet50_fpn", wall_s=12.5,
            status="ok")


def row(**kw) -> ResultRow:
    return ResultRow(**{**BASE, **kw})


def trial_rows(trial_id="t1", seed=0) -> list[ResultRow]:
    rows = [row(trial_id=trial_id, seed=seed, metric=m, value=v)
            for m, v in (("AP", 0.4), ("AP50", 0.6), ("APs", math.nan))]
    rows += [row(trial_id=trial_id, seed=seed, epoch=e, metric="loss", value=1.0 / (e + 1))
             for e in range(3)]
    return rows


def test_schema_matches_model():
    assert SCHEMA.names == list(COLUMNS)
    assert COLUMNS[0] == "row_id" and set(IDENTITY_COLUMNS) <= set(COLUMNS)
    assert set(COLUMNS) == set(row().model_dump())


def test_schema_of_every_row(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", trial_rows("t1"))
    fail = ResultRow.failure("CUDA out of memory", **{k: v for k, v in BASE.items()
                                                     if k not in ("metric", "value", "status")}
                             | {"trial_id": "t2", "seed": 1})
    store.write_trial("t2", [fail])
    df = store.read()
    assert list(df.columns) == list(COLUMNS) and len(df) == 7
    validate_frame(df)  # every row re-validates and its row_id matches
    ResultStore.validate_frame(df)
    f = df[df.trial_id == "t2"].iloc[0]
    assert f.status == "failed" and f.metric == "status" and math.isnan(f.value)
    assert f.reason == "CUDA out of memory"
    assert df.epoch.isna().sum() == 4 and df.epoch.dtype == "Int64"
    assert store.trial_ids() == {"t1", "t2"}


def test_validate_frame_rejects_bad(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", trial_rows())
    df = store.read()
    with pytest.raises(ValueError, match="row_id"):
        validate_frame(df.assign(seed=5))
    with pytest.raises(ValueError, match="columns"):
        validate_frame(df.drop(columns=["node_id"]))
    with pytest.raises(ValueError, match="row 0"):
        validate_frame(df.assign(status="maybe"))


def test_empty_store_has_columns(tmp_path):
    df = ResultStore(tmp_path / "nothing").read()
    assert len(df) == 0 and list(df.columns) == list(COLUMNS)
    validate_frame(df)
    assert ResultStore(tmp_path).trial_ids() == set()


def test_row_id_stable_and_identity_sensitive():
    a = row()
    assert a.row_id == row().row_id == row(wall_s=99.0, value=0.1, node_id="n").row_id
    assert len(a.row_id) == 16 and int(a.row_id, 16) >= 0
    changed = {"run_id": "run2", "trial_id": "t9", "method": "focal", "variant": "g2",
               "stage": "tune", "dataset": "coco", "split": "test", "condition": "fog",
               "severity": 3, "seed": 7, "epoch": 4, "metric": "AP50"}
    assert set(changed) == set(IDENTITY_COLUMNS)
    ids = {row(**{c: v}).row_id for c, v in changed.items()}
    assert len(ids) == len(changed) and a.row_id not in ids
    assert row(epoch=0).row_id != row(epoch=None).row_id


def test_validation():
    with pytest.raises(ValidationError):
        row(status="maybe")
    with pytest.raises(ValidationError):
        row(status="failed")  # no reason
    with pytest.raises(ValidationError):
        row(bogus=1)  # extra="forbid"
    with pytest.raises(ValidationError):
        row(config_json="{not json")
    with pytest.raises(ValidationError):
        row(created_at="2024-01-01T00:00:00")  # naive timestamp
    assert row(created_at="2024-01-01T00:00:00Z").created_at.startswith("2024-01-01T00:00:00")
    assert math.isnan(row(value=float("nan")).value)


def test_idempotent_rewrite(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", trial_rows())
    n = len(store.read())
    store.write_trial("t1", trial_rows())
    store.write_trial("t1", trial_rows())
    assert len(store.read()) == n
    assert len(list((tmp_path / "rows").iterdir())) == 1


def test_dedupe_across_files_keeps_latest(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", [row(value=0.1, created_at="2024-01-01T00:00:00+00:00")])
    # Same identity landing in a second file (e.g. copied in by hand).
    table_path = store.write_trial("t1", [row(value=0.3, created_at="2024-01-02T00:00:00+00:00")])
    os.link(table_path, tmp_path / "rows" / "copy.parquet")
    store.write_trial("t1", [row(value=0.2, created_at="2024-01-01T12:00:00+00:00")])
    df = store.read()
    assert len(df) == 1 and df.value.iloc[0] == 0.3


def test_refuses_foreign_rows_and_bad_ids(tmp_path):
    store = ResultStore(tmp_path)
    with pytest.raises(ValueError, match="t2"):
        store.write_trial("t2", trial_rows("t1"))
    with pytest.raises(ValueError, match="duplicate"):
        store.write_trial("t1", [row(), row(value=0.9)])
    with pytest.raises(ValueError):
        store.write_trial("t1", [])
    with pytest.raises(ValueError):
        store.write_trial("../evil", [row(trial_id="../evil")])
    assert store.read().empty


def test_leftover_tmp_ignored(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", trial_rows())
    (tmp_path / "rows" / "t2.123.deadbeef.tmp").write_bytes(b"PAR1 half-written")
    assert store.trial_ids() == {"t1"}
    assert set(store.read().trial_id) == {"t1"}


def test_failed_replace_keeps_previous_file(tmp_path, monkeypatch):
    store = ResultStore(tmp_path)
    store.write_trial("t1", trial_rows())
    before = store.read()

    def boom(*a, **k):
        raise OSError("simulated crash during replace")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        store.write_trial("t1", [row(metric="AP75", value=0.9)])
    monkeypatch.undo()
    after = store.read()
    pd.testing.assert_frame_equal(before, after)
    assert [p.name for p in (tmp_path / "rows").iterdir()] == ["t1.parquet"]  # tmp cleaned


def test_dict_rows_are_validated(tmp_path):
    store = ResultStore(tmp_path)
    store.write_trial("t1", [dict(BASE)])
    assert store.read().metric.tolist() == ["AP"]
    with pytest.raises(ValidationError):
        store.write_trial("t1", [dict(BASE, status="nope")])


def test_finished_lookup_reads_one_index_entry_not_every_trial(tmp_path, monkeypatch):
    """A starting trial's "already done?" question costs O(1) files, however many trials the run has."""
    store = ResultStore(tmp_path)
    for i in range(40):
        store.write_trial(f"t{i}", [r.model_copy(update={"cell": f"c{i}"}) for r in trial_rows(f"t{i}")])
    failed = [row(trial_id="tf", cell="c99", status="failed", reason="boom", metric="status", value=math.nan)]
    store.write_trial("tf", failed)
    reads = []
    real = store.storage.read_bytes
    monkeypatch.setattr(store.storage, "read_bytes", lambda rel: reads.append(rel) or real(rel))
    monkeypatch.setattr(store.storage, "list", lambda *a: pytest.fail("the lookup must not list the rows"))
    # a restored trial finds its own rows; a new trial id of the same cell + config finds the indexed one
    assert set(store.finished("t7", "c7", "abc")["trial_id"]) == {"t7"} and reads == ["rows/t7.parquet"]
    reads.clear()
    assert set(store.finished("new", "c12", "abc")["trial_id"]) == {"t12"}
    assert reads[0] == "rows/new.parquet" and reads[1].startswith("finished/") and reads[2:] == ["rows/t12.parquet"]
    reads.clear()
    assert store.finished("new", "c12", "other-hash") is None      # another config: not finished
    reads.clear()
    assert store.finished("tf", "c99", "abc") is None and len(reads) <= 2  # failed rows never finish a cell
    store.retire("tf")
    assert store.finished("new", "c99", "abc") is None


@pytest.fixture(params=["local", "s3"])
def run_root(request, tmp_path):
    return str(tmp_path / "run") if request.param == "local" else request.getfixturevalue("s3_uri") + "/run"


def test_snapshot_serves_unchanged_trials_and_never_a_stale_row(run_root, monkeypatch):
    """The rows snapshot: one read instead of one per trial, while every rows file stays the truth."""
    from harness.results.store import SNAPSHOT, SNAPSHOT_AFTER
    store = ResultStore(run_root)
    n = SNAPSHOT_AFTER + 8
    for i in range(n):
        store.write_trial(f"t{i}", [r.model_copy(update={"cell": f"c{i}"}) for r in trial_rows(f"t{i}")])
    first = store.read()
    assert len(first) == 6 * n and store.storage.exists(SNAPSHOT)
    reads = []
    real = store.storage.read_bytes
    monkeypatch.setattr(store.storage, "read_bytes", lambda rel: reads.append(rel) or real(rel))
    assert store.read().equals(first) and reads == [SNAPSHOT]           # nothing but the snapshot
    reads.clear()
    store.write_trial("t3", [r.model_copy(update={"cell": "c3", "value": 0.99}) for r in trial_rows("t3")])
    store.retire("t5")
    store.write_trial("new", trial_rows("new"))
    df = store.read()
    assert sorted(reads) == sorted([SNAPSHOT, "rows/t3.parquet", "rows/new.parquet"])
    assert set(df[(df["trial_id"] == "t3") & (df["metric"] == "AP")]["value"]) == {0.99}
    assert "t5" not in set(df["trial_id"]) and "new" in set(df["trial_id"]) and len(df) == 6 * n
    store.storage.write_bytes(SNAPSHOT, b"not parquet")                 # a damaged snapshot is ignored
    assert store.read().sort_values("row_id").reset_index(drop=True).equals(
        df.sort_values("row_id").reset_index(drop=True))
