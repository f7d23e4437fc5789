"""Every output of a run beside its rows: leaderboards, tables, plots and ``report.html``.

:func:`write_run_outputs` is the one entry point (the end of a sweep, ``detbench
leaderboard`` and ``detbench report``): it reads the rows once, computes the bootstrap
intervals once, and publishes each file whole (a reader never sees half a table):

* ``leaderboard.md`` / ``.csv`` / ``.tex``: methods x (dataset, condition, metric), with the
  gain over each row's baseline and its interval, and the published reference;
* ``robustness.md``: P (clean AP), mPC, rPC and per-family means (COCO-C protocol);
* ``tables.md`` + ``tables/*.csv`` (+ ``tables/README.md``, what every column is): seeds,
  cost, per-class AP, error breakdown, gains with intervals;
* ``plots/``: AP vs severity, learning curves, method curves (``Method.curves``), Pareto;
* ``report.html``: all of it in one self-contained file (:mod:`harness.report.html`).
"""
from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.config import LeaderboardSpec, parse_label, row_label, stage_label
from harness.evaluate import plot_ap_vs_severity, robustness_metrics
from harness.report.figures import figure_png
from harness.report.tables import Table, to_csv, to_markdown
from harness.results import ResultStore, planned_cells, run_settings
from harness.storage import Storage, open_storage

log = logging.getLogger(__name__)


def declared_curves(methods) -> dict[str, tuple[str, set[str]]]:
    """prefix -> (plot title, the methods declaring it): each plugin's ``curves``, for the methods run."""
    from harness.plugin import METHODS
    out: dict[str, tuple[str, set[str]]] = {}
    for name in methods:
        if name in METHODS:
            for prefix, title in METHODS.get(name).curves.items():
                out.setdefault(prefix, (title, set()))[1].add(name)
    return out


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.1f}"


def robustness_rows(df: pd.DataFrame) -> Table | None:
    """P / mPC / rPC per method and dataset, or None when only clean was evaluated."""
    if not (df["condition"] != "clean").any():
        return None
    from harness.report.leaderboard import drop_shared_stage_duplicates
    rob = robustness_metrics(drop_shared_stage_duplicates(df))
    if rob.empty:
        return None
    fams = [c for c in rob.columns if c.startswith("mPC_") and c != "mPC_all" and rob[c].notna().any()]
    # stage named for every entry of a multi-stage method (fctl[degraded_only] (corrective))
    multi = (rob.groupby(rob["method"].map(lambda lab: parse_label(lab).entry))["stage"].transform("nunique") > 1
             if "stage" in rob.columns else None)
    rows = []
    for i, r in rob.iterrows():
        rpc = "—" if pd.isna(r["rPC"]) else f"{r['rPC'] * 100:.1f}"
        name = stage_label(r["method"], r["stage"]) if multi is not None and multi[i] else r["method"]
        rows.append((name, r["dataset"], _fmt(r["P"]), _fmt(r["mPC"]), rpc, *(_fmt(r[f]) for f in fams)))
    return Table("robustness", "Robustness (P / mPC / rPC)",
                 ("method", "dataset", "P", "mPC", "rPC %", *(f.replace("mPC_", "") for f in fams)), tuple(rows),
                 note="mPC averages the COCO-C benchmark corruptions that ran (AP in %, mean over seeds first); "
                      "per-family columns include all corruptions run.",
                 columns={"P": "clean AP (%)", "mPC": "mean AP over the benchmark corruptions (%)",
                          "rPC %": "mPC / P"})


def robustness_table(df: pd.DataFrame) -> str:
    """Markdown P / mPC / rPC table, or '' when only clean was evaluated."""
    t = robustness_rows(df)
    return to_markdown(t) if t else ""


def plot_curves(df: pd.DataFrame) -> dict[str, bytes]:
    """``curve_<prefix>.png``: the per-epoch statistics the run's methods declare; and
    ``learning_curves.png``: training loss and validation AP per epoch, a line per row label."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    out = {}
    curves = df[df["epoch"].notna() & (df["status"] == "ok")]
    for prefix, (title, methods) in declared_curves(sorted(set(curves["method"]))).items():
        sel = curves[curves["method"].isin(methods) & curves["metric"].str.startswith(prefix)]
        if sel.empty:
            continue
        fig = Figure(figsize=(6, 4))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for (method, variant, metric), g in sel.groupby(["method", "variant", "metric"]):
            mean = g.groupby("epoch")["value"].mean()
            ax.plot(mean.index.astype(int), mean.values, marker="o",
                    label=f"{row_label(method, variant)} {metric[len(prefix):] or metric}")
        ax.set(xlabel="epoch", title=title + " (mean over seeds)")
        ax.legend(fontsize=7)
        out[f"curve_{prefix.strip('/').replace('/', '_')}.png"] = figure_png(fig)
    panels = [m for m in ("train/loss", "val/AP") if (curves["metric"] == m).any()]
    if panels:
        fig = Figure(figsize=(5 * len(panels), 3.6))
        FigureCanvasAgg(fig)
        for k, metric in enumerate(panels):
            ax = fig.add_subplot(1, len(panels), k + 1)
            sel = curves[curves["metric"] == metric]
            for (method, variant, stage, dataset), g in sel.groupby(["method", "variant", "stage", "dataset"]):
                mean = g.groupby("epoch")["value"].mean()
                ax.plot(mean.index.astype(int), mean.values, marker=".",
                        label=f"{row_label(method, variant)} ({stage}) {dataset}")
            ax.set(xlabel="epoch", title=f"{metric} (mean over seeds)")
            if len(ax.lines) <= 12:  # beyond that a legend hides the curves; report.html's tables name them
                ax.legend(fontsize=6)
        fig.tight_layout()
        out["learning_curves.png"] = figure_png(fig)
    return out


@dataclass
class RunOutputs:
    written: list[str]
    board: pd.DataFrame
    notes: list[str]


def write_run_outputs(run_dir: str | Path | Storage, *, df: pd.DataFrame | None = None,
                      leaderboard: LeaderboardSpec | None = None, html: bool = True) -> RunOutputs:
    """Build and publish every output of the run (see the module docstring); returns what was written."""
    from harness.report.published import DEFAULT as PUBLISHED_CSV
    from harness.report.published import load_published, published_for
    from harness.report.leaderboard import baseline_pairs, build_leaderboard, final_rows
    from harness.report.run_tables import (cost_table, detection_analyses, error_table, pareto_plots,
                                           per_class_tables, seeds_table)
    from harness.report.uncertainty import GroundTruth, bootstrap_intervals

    storage = open_storage(run_dir)
    settings = run_settings(storage)
    spec = leaderboard or settings.leaderboard
    df = ResultStore(storage).read() if df is None else df
    smoke = bool(df["smoke"].any()) if len(df) else False
    refs = {}
    if settings.published and not smoke:  # a bad published.csv stops here, before any file is written
        table = load_published(PUBLISHED_CSV)
        refs = {lab: published_for(key, table) for lab, key in settings.published.items()}
    final, _ = final_rows(df)
    labels = sorted(set(final["label"]))
    cells = planned_cells(storage)
    gts = GroundTruth(cells)
    intervals = bootstrap_intervals(storage, final, baseline_pairs(labels, settings.baselines), cells, spec)
    board = build_leaderboard(df, baselines=settings.baselines, intervals=intervals.by_cell, published=refs)
    notes = list(board.attrs.get("notes", [])) + intervals.notes
    written = _write_leaderboards(storage, board, intervals.legend(), notes)

    robustness = robustness_rows(df)
    if robustness:
        storage.write_text("robustness.md", to_markdown(robustness))
        written.append(storage.display("robustness.md"))
    tables = [t for t in [robustness, seeds_table(final), cost_table(df), gains_table(intervals)] if t]
    per_class, errors, more = detection_analyses(storage, final, gts) if not final.empty else (
        pd.DataFrame(), pd.DataFrame(), [])
    notes += more
    tables += per_class_tables(per_class) + [t for t in [error_table(errors)] if t]
    written += _write_tables(storage, tables, smoke)
    plots = {**_severity_plots(df), **plot_curves(df), **pareto_plots(df, final)}
    for name, png in plots.items():
        storage.write_bytes(f"plots/{name}", png)
        written.append(storage.display(f"plots/{name}"))
    if html:
        from harness.report.page import run_report
        storage.write_text("report.html", run_report(storage, settings, board, tables, plots, notes, smoke))
        written.append(storage.display("report.html"))
    return RunOutputs(written, board, notes)


def gains_table(intervals) -> Table | None:
    """Every gain with a bootstrap interval, AP and AP50 (points)."""
    if not intervals.by_cell:
        return None
    rows = []
    for (lab, d, c), iv in sorted(intervals.by_cell.items()):
        rows.append((lab, d, c, *(f"{iv[m].delta * 100:+.2f} [{iv[m].low * 100:+.2f}, {iv[m].high * 100:+.2f}]"
                                  + ("†" if iv[m].excludes_zero else "") for m in ("AP", "AP50"))))
    return Table("gains", "Gains over the baseline with bootstrap intervals (points)",
                 ("method", "dataset", "condition", "ΔAP [interval]", "ΔAP50 [interval]"), tuple(rows),
                 note=intervals.legend(), columns={"ΔAP [interval]": "AP(method) - AP(baseline), seeds pooled"})


def _write_leaderboards(storage: Storage, board: pd.DataFrame, legend: str, notes: list[str]) -> list[str]:
    from harness.report.leaderboard import render_leaderboard
    footers = {"md": "\n".join([legend] * bool(legend) + [f"Note: {n}" for n in notes]), "csv": "", "tex": legend}
    out = []
    for fmt, footer in footers.items():
        storage.write_text(f"leaderboard.{fmt}", render_leaderboard(board, fmt, footer=footer))
        out.append(storage.display(f"leaderboard.{fmt}"))
    return out


def _write_tables(storage: Storage, tables: list[Table], smoke: bool) -> list[str]:
    from harness.report.leaderboard import SMOKE_BANNER
    banner = [SMOKE_BANNER] if smoke else []
    md = ([SMOKE_BANNER, ""] if smoke else []) + [to_markdown(t) for t in tables]
    storage.write_text("tables.md", "\n".join(md))
    readme = ["# Columns of the CSV tables", "",
              "Values in % (AP) or in the unit in the column name; '—' = not measured; a trailing * marks "
              "the best value of its column.", ""]
    for t in tables:
        storage.write_text(f"tables/{t.name}.csv", to_csv(t, banner=banner))
        readme += [f"## {t.name}.csv — {t.title}", ""] + [f"- `{h}`: {t.columns.get(h, _DEFAULT_COLUMNS.get(h, ''))}"
                                                           for h in t.header] + [""]
    storage.write_text("tables/README.md", "\n".join(readme))
    return [storage.display("tables.md"), storage.display("tables/README.md")]


_DEFAULT_COLUMNS = {"method": "the leaderboard's row label (entry[variant] (stage))", "dataset": "dataset name",
                    "condition": "clean or corruption@severity", "metric": "COCO metric",
                    "class": "category name", "mean": "mean over seeds (%)"}


def _severity_plots(df: pd.DataFrame) -> dict[str, bytes]:
    if robustness_rows(df) is None:
        return {}
    with tempfile.TemporaryDirectory(prefix="detbench-plots-") as tmp:
        return {Path(p).name: Path(p).read_bytes() for p in plot_ap_vs_severity(df, Path(tmp))}


def write_report(run_dir: str | Path | Storage, df: pd.DataFrame | None = None) -> list[str]:
    """``detbench report``: every output of the run; returns where each is."""
    return write_run_outputs(run_dir, df=df).written


__all__ = ["write_run_outputs", "write_report", "robustness_table", "robustness_rows", "plot_curves",
           "RunOutputs", "declared_curves"]
