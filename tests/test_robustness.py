"""COCO-C summaries (P / mPC / rPC / families) and AP-vs-severity plots."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from harness.data import GROUPS
from harness.evaluate import plot_ap_vs_severity, robustness_metrics


def _rows(method, variant, cells, *, dataset="d", metric="AP", **extra):
    """cells: {(condition, severity): [value per seed]}"""
    return [dict(method=method, variant=variant, dataset=dataset, condition=c, severity=s,
                 seed=k, metric=metric, value=v, **extra)
            for (c, s), vals in cells.items() for k, v in enumerate(vals)]


A = {("clean", 0): [0.4, 0.6],
     ("gaussian_noise", 1): [0.3, 0.1],   # seed mean 0.2
     ("fog", 2): [0.4],                   # one seed only: still one condition
     ("rain", 1): [0.25, 0.25],           # not a benchmark corruption
     ("dark", 3): [0.1, 0.1]}


def test_hand_computed_numbers():
    rows = _rows("m", "", A) + _rows("m", "", {("clean", 0): [0.9]}, metric="AP50") \
        + _rows("n", "x", {("clean", 0): [0.0], ("fog", 1): [0.0]})
    out = robustness_metrics(pd.DataFrame(rows)).set_index("method")
    m = out.loc["m"]
    assert m["P"] == pytest.approx(0.5)
    assert m["mPC"] == pytest.approx(0.3)           # mean(0.2, 0.4): seeds first
    assert m["rPC"] == pytest.approx(0.6)
    assert m["n_pc"] == 2 and not m["complete"]
    assert m["mPC_all"] == pytest.approx((0.2 + 0.4 + 0.25 + 0.1) / 4)
    assert m["rPC_all"] == pytest.approx(m["mPC_all"] / 0.5)
    assert m["mPC_noise"] == pytest.approx(0.2)
    assert m["mPC_weather"] == pytest.approx((0.4 + 0.25) / 2)
    assert m["mPC_low_light"] == pytest.approx(0.1)
    assert math.isnan(m["mPC_blur"]) and math.isnan(m["mPC_digital"])
    n = out.loc["n[x]"]  # label = method[variant]; P == 0 -> rPC NaN
    assert n["P"] == 0 and n["mPC"] == 0 and math.isnan(n["rPC"])


def test_records_filters_and_missing_clean():
    rows = _rows("m", "", A, epoch=None, status="ok", split="val", created_at="2024-01-01")
    rows += _rows("m", "", {("fog", 2): [0.9]}, epoch=3, status="ok", split="val",
                  created_at="2024-01-02")                              # curve point
    rows += _rows("m", "", {("fog", 3): [0.9]}, epoch=None, status="failed", split="val",
                  created_at="2024-01-02")                              # failed
    rows += _rows("m", "", {("gaussian_noise", 1): [0.5]}, epoch=None, status="ok", split="val",
                  created_at="2024-01-03")                              # re-run of seed 0
    rows += _rows("o", "", {("fog", 1): [0.2]}, epoch=None, status="ok", split="val",
                  created_at="2024-01-01")                              # no clean run
    out = robustness_metrics(rows).set_index("method")
    assert out.loc["m", "n_pc"] == 2
    assert out.loc["m", "mPC"] == pytest.approx(((0.5 + 0.1) / 2 + 0.4) / 2)
    assert math.isnan(out.loc["o", "P"]) and math.isnan(out.loc["o", "rPC"])
    assert out.loc["o", "mPC"] == pytest.approx(0.2)


def test_full_coco_c_and_stages():
    cells = {("clean", 0): [0.5]}
    cells.update({(c, s): [0.5 - 0.05 * s] for c in GROUPS["coco-c"] for s in range(1, 6)})
    rows = _rows("f", "", cells, stage="ideal") + _rows("f", "", cells, stage="corrective")
    rows += _rows("f", "", {("clean", 0): [0.1]}, dataset="e", stage="ideal")
    out = robustness_metrics(pd.DataFrame(rows))
    assert list(out.columns[:3]) == ["method", "stage", "dataset"] and len(out) == 3
    full = out[out["dataset"] == "d"].iloc[0]
    assert full["complete"] and full["n_pc"] == 75
    assert full["mPC"] == pytest.approx(0.35) and full["rPC"] == pytest.approx(0.7)
    empty = out[out["dataset"] == "e"].iloc[0]
    assert empty["n_pc"] == 0 and np.isnan(empty["mPC"]) and np.isnan(empty["rPC"])


def test_bad_input():
    with pytest.raises(ValueError, match="missing"):
        robustness_metrics(pd.DataFrame({"method": ["a"], "value": [1.0]}))


def test_plots(tmp_path):
    rows = _rows("m", "", A) + _rows("b", "v", {("clean", 0): [0.7], ("shot_noise", 2): [0.3],
                                                ("snow", 5): [0.1]})
    paths = plot_ap_vs_severity(pd.DataFrame(rows), tmp_path / "plots")
    assert sorted(p.name for p in paths) == ["ap_vs_severity_d_low_light.png",
                                             "ap_vs_severity_d_noise.png",
                                             "ap_vs_severity_d_weather.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
