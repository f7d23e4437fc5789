"""Kept detections: lossless round trip of what was evaluated, a clear error for a foreign file."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from harness.evaluate import coco_detections_from_outputs
from harness.evaluate import condition_key, detections_rel, to_coco_results
from harness.evaluate.detections import decode_detections, encode_detections


def _outputs(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    xy = torch.rand(n, 2, generator=g) * 600
    wh = torch.rand(n, 2, generator=g) * 200 + 0.37
    return {"boxes": torch.cat([xy, xy + wh], 1), "scores": torch.rand(n, generator=g),
            "labels": torch.randint(1, 4, (n,), generator=g)}


def test_round_trip_is_exactly_what_was_evaluated():
    dets = coco_detections_from_outputs([7], [_outputs()], {1: 1, 2: 5, 3: 90})
    back = decode_detections(encode_detections(dets))
    assert back == dets  # float32 corners stored: w = x2 - x1 rebuilt in double, as at evaluation
    assert to_coco_results(back) == dets


def test_empty_and_foreign_files():
    assert decode_detections(encode_detections([])) == []
    import io
    import pyarrow as pa
    import pyarrow.parquet as pq
    buf = io.BytesIO()
    pq.write_table(pa.table({"image_id": np.arange(3)}), buf)
    with pytest.raises(ValueError, match="not a detbench detections file"):
        decode_detections(buf.getvalue())


def test_file_names():
    assert condition_key("clean", 0) == "clean" and condition_key("fog", 3) == "fog@3"
    assert detections_rel("t1", "student", "fog", 3) == "detections/t1/student/fog@3.parquet"
