"""Every output of a run from its rows and kept detections: intervals, tables, LaTeX, report.html.

The run directory is built without Ray: a suite planned for real (``prepare_suite``), rows
as trials write them, and detections made from the ground truth with method-dependent
noise, so the "better" method is known and the intervals can be checked against it.
"""
from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest

from harness.data import load_coco
from harness.evaluate import evaluate_coco
from harness.evaluate import detections_rel, write_detections
from harness.plan import RunInfo
from harness.report import write_run_outputs
from harness.results import ResultRow, ResultStore
from harness.app.runner import prepare_suite
from harness.storage import open_storage

#: A suite over one COCO-format set (``str.format``: name, methods, ann, img); test_compare's too.
SUITE = """
name: {name}
datasets:
  - name: shapes
    format: coco
    train: {{annotations: {ann}, images: {img}}}
    val: {{annotations: {ann}, images: {img}}}
detector: {{fpn_width: 16, image_size: 64}}
methods:
{methods}
seeds: [0, 1]
leaderboard: {{bootstrap: 200, ci: 0.9}}
"""
METHODS = """\
  - name: faster_rcnn
  - name: focal
    baseline: faster_rcnn
    published: tv_retinanet_r50_fpn_v1"""
NOISE = {"faster_rcnn": 0.35, "focal": 0.05}  # box jitter in box sizes: focal is clearly better here


def run_info(storage) -> RunInfo:
    """The ``run`` record of a run directory written by these tests (no Ray: its resources are unused)."""
    from harness.config import ResourcesSpec
    return RunInfo(run_dir=storage.uri, run_id="r", suite="report-test", smoke=False, resources=ResourcesSpec(),
                   versions_json="{}", git_sha="abc123")


def _detections(gt: dict, noise: float, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    dets = []
    for a in gt["annotations"]:
        x, y, w, h = a["bbox"]
        jitter = rng.normal(0, noise, 4) * [w, h, w, h]
        dets.append({"image_id": a["image_id"], "category_id": a["category_id"],
                     "bbox": [x + jitter[0], y + jitter[1], max(1.0, w + jitter[2]), max(1.0, h + jitter[3])],
                     "score": float(rng.uniform(0.3, 1.0))})
    for img in gt["images"][::3]:  # a background false positive on every third image
        dets.append({"image_id": img["id"], "category_id": gt["categories"][0]["id"],
                     "bbox": [1.0, 1.0, 8.0, 8.0], "score": float(rng.uniform(0, 0.5))})
    return dets


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from harness.data import write_synthetic_coco
    root = tmp_path_factory.mktemp("report")
    ann = write_synthetic_coco(root / "data", n_images=40, seed=3, image_size=64, max_objects=3)
    suite = root / "suite.yaml"
    suite.write_text(SUITE.format(name="report-test", methods=METHODS, ann=ann, img=ann.parent))
    checked = prepare_suite(suite)
    storage = open_storage(root / "run")
    storage.upload("suite.yaml", suite)
    storage.write_json("manifest.json", {"suite": checked.suite.model_dump(), "baselines": {"focal": "faster_rcnn"},
                                         "git_sha": "abc123", "versions": {"torch": "2.14.1"}, "seeds": [0, 1]})
    storage.write_json("run.json", {"run": run_info(storage).to_dict(), "cells": [c.to_dict() for c in checked.cells]})
    gt = load_coco(ann, ann.parent, check_images=False).gt_for_eval()
    store = ResultStore(storage)
    for cell in checked.cells:
        trial, stage = f"{cell.method}-{cell.seed}", cell.stages[-1]
        dets = _detections(gt, NOISE[cell.method], seed=cell.seed + 10 * len(cell.method))
        write_detections(storage, detections_rel(trial, stage), dets)
        metrics = {**evaluate_coco(gt, dets), "cost/gflops": 1.0 + len(cell.method), "cost/latency_ms": 5.0,
                   "cost/device_s": 60.0, "cost/params_M": 3.0}
        common = dict(run_id="r", suite="report-test", trial_id=trial, cell=cell.cell_id, method=cell.method,
                      stage=stage, dataset="shapes", seed=cell.seed, config_hash=f"h{trial}", config_json="{}",
                      detector="d", wall_s=1.0, status="ok")
        rows = [ResultRow(**common, metric=k, value=v) for k, v in metrics.items()]
        rows += [ResultRow(**common, metric=m, value=v, epoch=e, split=s)
                 for e in (1, 2) for m, v, s in (("train/loss", 2.0 / e, "train"), ("val/AP", 0.2 * e, "val"))]
        store.write_trial(trial, rows)
    return storage


def test_every_output_is_written(run_dir):
    out = write_run_outputs(run_dir)
    names = {w.rsplit("/run/", 1)[-1] for w in out.written}
    assert {"leaderboard.md", "leaderboard.csv", "leaderboard.tex", "tables.md", "tables/README.md",
            "report.html", "plots/pareto_shapes.png", "plots/learning_curves.png"} <= names
    for table in ("seeds", "cost", "gains", "per_class_shapes", "errors"):
        assert run_dir.exists(f"tables/{table}.csv"), table
    readme = run_dir.read_text("tables/README.md")
    assert "## cost.csv" in readme and "`latency (ms)`: median batch-1" in readme


def test_gain_interval_is_paired_and_excludes_zero_for_a_clear_gain(run_dir):
    out = write_run_outputs(run_dir)
    cell = out.board.loc["focal", ("ΔAP vs baseline", "shapes/clean", "")]
    mean = out.board.attrs["mean"]
    gain = mean.loc["focal", ("shapes", "clean", "AP")] - mean.loc["faster_rcnn", ("shapes", "clean", "AP")]
    assert gain > 10 and cell.startswith(f"{gain:+.1f}") and "]†" in cell and cell.endswith("vs faster_rcnn")
    lo, hi = (float(v) for v in cell.split("[")[1].split("]")[0].split(","))
    assert lo < gain < hi and lo > 0
    md = run_dir.read_text("leaderboard.md")
    assert "90% interval of the gain (paired image bootstrap, B = 200, seed 0, seeds pooled)" in md
    gains = run_dir.read_text("tables/gains.csv")
    assert "focal,shapes,clean," in gains  # the point estimate in the gains table is the rows' ΔAP
    assert f"{gain:+.2f}" in gains


def test_intervals_can_be_turned_off_and_are_seeded(run_dir):
    from harness.config import LeaderboardSpec
    a = write_run_outputs(run_dir, html=False).board.loc["focal", ("ΔAP vs baseline", "shapes/clean", "")]
    b = write_run_outputs(run_dir, html=False).board.loc["focal", ("ΔAP vs baseline", "shapes/clean", "")]
    assert a == b  # same seed, same interval
    off = write_run_outputs(run_dir, leaderboard=LeaderboardSpec(bootstrap=0), html=False)
    assert "[" not in off.board.loc["focal", ("ΔAP vs baseline", "shapes/clean", "")]


def test_published_column_and_seed_values(run_dir):
    out = write_run_outputs(run_dir, html=False)
    assert out.board.loc["focal", ("published", "", "")] == "36.4 (coco AP, tv_retinanet_r50_fpn_v1)"
    assert ("Δ vs published", "", "") not in out.board.columns  # measured on shapes, not coco: no difference
    seeds = run_dir.read_text("tables/seeds.csv")
    assert "focal,shapes,clean,AP,2," in seeds and "0: " in seeds and "1: " in seeds


def test_missing_detections_leave_the_gain_without_an_interval(run_dir, tmp_path):
    copy = open_storage(tmp_path / "copy")
    shutil.copytree(run_dir.local_path(""), copy.local_path(""), dirs_exist_ok=True)
    copy.delete_tree("detections")
    out = write_run_outputs(copy, html=False)
    cell = out.board.loc["focal", ("ΔAP vs baseline", "shapes/clean", "")]
    assert "[" not in cell and cell.endswith("vs faster_rcnn")
    assert any("no detections kept" in n for n in out.notes)


def test_latex_compiles_where_a_tex_engine_is_installed(run_dir, tmp_path):
    write_run_outputs(run_dir, html=False)
    tex = run_dir.read_text("leaderboard.tex")
    assert r"\toprule" in tex and r"\textbf{" in tex and r"$\pm$" in tex
    if not shutil.which("pdflatex"):
        pytest.skip("no pdflatex here (Debian: texlive-latex-base texlive-latex-recommended)")
    (tmp_path / "lb.tex").write_text(tex)
    done = subprocess.run(["pdflatex", "-interaction=nonstopmode", "-halt-on-error", "lb.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "lb.pdf").stat().st_size > 1000


def test_report_html_in_a_real_browser(run_dir):
    from browserkit import inspect_page, open_browser
    write_run_outputs(run_dir)
    page = run_dir.local_path("report.html")
    html = page.read_text(encoding="utf-8")
    for anchor in ("leaderboard", "gains", "per-class", "errors", "cost", "seeds", "curves", "manifest"):
        assert f'id="{anchor}"' in html, anchor
    with open_browser() as driver:
        report = inspect_page(driver, page)
    assert report.console_errors == [] and report.broken_images == [] and report.external_refs == []
    assert report.tables >= 6 and report.images >= 2  # leaderboard, gains, per-class, errors, cost, seeds
    assert report.title.startswith("detbench report: report-test")


def test_a_run_without_rows_is_refused(tmp_path):
    from harness.app.cli import main
    storage = open_storage(tmp_path / "run")
    storage.write_json("run.json", {"run": run_info(storage).to_dict(), "cells": []})
    storage.write_json("manifest.json", {})
    assert main(["leaderboard", str(tmp_path / "run")]) == 2
    assert not storage.exists("leaderboard.md")


def test_bad_published_file_stops_before_any_table_is_written(run_dir, tmp_path, monkeypatch):
    import harness.report.published as published
    bad = tmp_path / "published.csv"
    bad.write_text("key,method,dataset,detector,schedule,metric,value,source\n"
                   "tv_retinanet_r50_fpn_v1,focal,coco,RetinaNet,1x,AP,lots,somewhere\n")
    monkeypatch.setattr(published, "DEFAULT", bad)
    copy = open_storage(tmp_path / "copy")
    shutil.copytree(run_dir.local_path(""), copy.local_path(""), dirs_exist_ok=True)
    for f in ("leaderboard.md", "report.html"):
        copy.delete(f)
    from harness.core import ConfigError
    with pytest.raises(ConfigError, match="value"):
        write_run_outputs(copy)
    assert not copy.exists("leaderboard.md") and not copy.exists("report.html")
