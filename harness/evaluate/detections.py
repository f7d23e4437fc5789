"""A trial's final detections, kept in the run directory so any statistic can be recomputed later.

Why: a leaderboard number cannot be re-examined without the model's outputs, and the
model is gone (or costs a GPU) after the sweep. Every final evaluation (the clean
validation set and each test condition, of every stage that evaluates) keeps its
detections at ``detections/<trial id>/<stage>/<condition>.parquet``; the paired
bootstrap (:mod:`harness.evaluate.bootstrap`), the per-class table and the error
breakdown (:mod:`harness.evaluate.analysis`) read them, as can a user.

Format: one row per detection with COCO's result fields -- ``image_id``,
``category_id``, ``score`` and the box -- in Parquet with zstd. Decision: Parquet
rather than COCO's JSON list, because the box is stored as the detector's float32
corners (``x1, y1, x2, y2``), which is lossless: :func:`read_detections` rebuilds
exactly the ``[x, y, w, h]`` dicts that were evaluated (``w = x2 - x1`` in double,
as at evaluation time), so a recomputed AP equals the row's. It is also ~4x smaller
than JSON, which matters at COCO-C scale (76 test sets x 500k detections per trial).
``pandas.read_parquet`` opens a file; :func:`to_coco_results` gives COCO's format.

Commit: the files are published whole by the evaluating worker (rank 0; every rank
holds the gathered detections) before the trial writes its rows, and only trials
with rows are read, so the rows commit them. A restarted worker rewrites a file whole.
"""
from __future__ import annotations

import io
from typing import Any, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

DETECTIONS_DIR = "detections"
SCHEMA = pa.schema([("image_id", pa.int64()), ("category_id", pa.int32()), ("score", pa.float32()),
                    ("x1", pa.float32()), ("y1", pa.float32()), ("x2", pa.float32()), ("y2", pa.float32())])


def condition_key(condition: str, severity: int) -> str:
    """The file name of a test set's detections: ``clean``, ``fog@3``, a real set's ``name@0``."""
    return "clean" if condition == "clean" else f"{condition}@{int(severity)}"


def detections_prefix(trial_id: str, stage: str) -> str:
    """The folder, under the run directory, of one stage's kept detections."""
    return f"{DETECTIONS_DIR}/{trial_id}/{stage}"


def detections_rel(trial_id: str, stage: str, condition: str = "clean", severity: int = 0) -> str:
    """Where, under the run directory, one evaluation's detections are."""
    return f"{detections_prefix(trial_id, stage)}/{condition_key(condition, severity)}.parquet"


def encode_detections(dets: Sequence[Mapping[str, Any]]) -> bytes:
    """COCO result dicts (``bbox`` = ``[x, y, w, h]``) -> Parquet bytes of float32 corners."""
    n = len(dets)
    box = np.asarray([d["bbox"] for d in dets], dtype=np.float64).reshape(n, 4)
    cols = {"image_id": np.fromiter((d["image_id"] for d in dets), np.int64, n),
            "category_id": np.fromiter((d["category_id"] for d in dets), np.int32, n),
            "score": np.fromiter((d["score"] for d in dets), np.float32, n),
            "x1": box[:, 0].astype(np.float32), "y1": box[:, 1].astype(np.float32),
            "x2": (box[:, 0] + box[:, 2]).astype(np.float32), "y2": (box[:, 1] + box[:, 3]).astype(np.float32)}
    buf = io.BytesIO()
    pq.write_table(pa.table(cols, schema=SCHEMA), buf, compression="zstd")
    return buf.getvalue()


def decode_detections(data: bytes) -> list[dict]:
    """Parquet bytes -> the COCO result dicts that were evaluated (exactly)."""
    t = pq.ParquetFile(io.BytesIO(data)).read()
    missing = [n for n in SCHEMA.names if n not in t.column_names]
    if missing:
        raise ValueError(f"not a detbench detections file (no column {missing[0]!r})")
    c = {n: t.column(n).to_numpy().astype(np.float64 if n[0] in "xys" else np.int64) for n in SCHEMA.names}
    return [{"image_id": int(i), "category_id": int(k), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": s}
            for i, k, s, x1, y1, x2, y2 in zip(c["image_id"].tolist(), c["category_id"].tolist(),
                                               c["score"].tolist(), c["x1"].tolist(), c["y1"].tolist(),
                                               c["x2"].tolist(), c["y2"].tolist())]


def write_detections(storage, rel: str, dets: Sequence[Mapping[str, Any]]) -> None:
    """Publish one evaluation's detections whole (a local folder or the run's bucket)."""
    storage.write_bytes(rel, encode_detections(dets))


def read_detections(storage, rel: str) -> list[dict]:
    """One evaluation's detections as COCO result dicts; FileNotFoundError when none were kept."""
    return decode_detections(storage.read_bytes(rel))


def to_coco_results(dets: Sequence[Mapping[str, Any]]) -> list[dict]:
    """COCO's results format (what ``COCO.loadRes`` takes): plain floats, boxes ``[x, y, w, h]``."""
    return [{"image_id": d["image_id"], "category_id": d["category_id"],
             "bbox": [float(v) for v in d["bbox"]], "score": float(d["score"])} for d in dets]


__all__ = ["DETECTIONS_DIR", "condition_key", "detections_prefix", "detections_rel", "encode_detections", "decode_detections",
           "write_detections", "read_detections", "to_coco_results"]
