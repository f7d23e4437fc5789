"""The tables beside the leaderboard: seeds, cost (+ Pareto plots), per-class AP, error breakdown.

All start from :func:`harness.report.leaderboard.final_rows` (the rows the leaderboard counts,
labelled the same way), so every table names rows exactly as the leaderboard does.
Per-class AP and the error breakdown are computed from the detections the trials kept
(:mod:`harness.evaluate.detections`) on the clean test set of each dataset -- a decision:
degraded conditions would multiply the tables by 75 on COCO-C, and the robustness table
covers them; the CSVs are long-format, so nothing stops adding them. Means are over seeds.
"""
from __future__ import annotations

from collections import defaultdict

import numpy as np
import pandas as pd

from harness.evaluate import ERROR_TYPES, detections_rel, error_breakdown, per_class_ap, read_detections
from harness.report.tables import Table, best_positions, fmt_number
from harness.core import COST_DEVICE_S, COST_GFLOPS, COST_LATENCY_MS, COST_PARAMS_M, COST_PEAK_MEM_MB, COST_TRAIN_IMAGES_PER_S

#: metric -> (column, digits, lower is better, what it is)
COST_METRICS = {
    COST_DEVICE_S: ("train device-s", 0, True, "training device-seconds of the stage, every worker's summed"),
    COST_TRAIN_IMAGES_PER_S: ("train img/s", 1, False, "training images per second of the worker group"),
    COST_PEAK_MEM_MB: ("peak mem (MB)", 0, True, "peak CUDA memory allocated (GPU) or peak RSS (CPU) of rank 0"),
    COST_PARAMS_M: ("params (M)", 2, True, "parameters of the detector"),
    COST_GFLOPS: ("GFLOPs", 2, True, "forward FLOPs per image at the evaluation size (FlopCounterMode)"),
    COST_LATENCY_MS: ("latency (ms)", 1, True, "median batch-1 inference latency after warm-up"),
}


def seeds_table(final: pd.DataFrame) -> Table:
    """Every cell's seed values, not only their mean and spread (``--seeds-table``)."""
    rows = []
    for (lab, d, c, m), g in final.groupby(["label", "dataset", "cond", "metric"], sort=True):
        g = g.sort_values("seed")
        v = g["value"].to_numpy(dtype=float) * 100
        rows.append((lab, d, c, m, str(len(g)), fmt_number(np.nanmean(v) if np.isfinite(v).any() else None),
                     fmt_number(np.nanstd(v, ddof=1) if np.isfinite(v).sum() > 1 else None),
                     ", ".join(f"{s}: {fmt_number(x)}" for s, x in zip(g["seed"], v))))
    return Table("seeds", "Seeds (AP in %)", ("method", "dataset", "condition", "metric", "n", "mean", "std",
                                                "seed: value"), tuple(rows),
                 columns={"n": "seeds", "std": "sample std (ddof 1)", "seed: value": "each seed's value"})


def cost_frame(df: pd.DataFrame) -> pd.DataFrame:
    """label x dataset -> mean over seeds of every cost metric (index: label, dataset)."""
    from harness.report.leaderboard import final_rows
    final, _ = final_rows(df, tuple(COST_METRICS))
    if final.empty:
        return pd.DataFrame(columns=list(COST_METRICS))
    return final.pivot_table(index=["label", "dataset"], columns="metric", values="value", aggfunc="mean")


def cost_table(df: pd.DataFrame) -> Table:
    frame = cost_frame(df)
    cols = [m for m in COST_METRICS if m in frame.columns]
    rows = tuple((lab, d, *(fmt_number(frame.loc[(lab, d), m], COST_METRICS[m][1]) for m in cols))
                 for lab, d in frame.index)
    best = set()
    for _, g in frame.groupby(level="dataset"):  # best per dataset: costs differ with the data
        pos = [frame.index.get_loc(i) for i in g.index]
        for (i, j) in best_positions(g[cols].reset_index(drop=True),
                                     {m: not COST_METRICS[m][2] for m in cols}, offset=2):
            best.add((pos[i], j))
    return Table("cost", "Cost per cell (mean over seeds)", ("method", "dataset", *(COST_METRICS[m][0] for m in cols)),
                 rows, frozenset(best), columns={COST_METRICS[m][0]: COST_METRICS[m][3] for m in cols})


def pareto_plots(df: pd.DataFrame, final: pd.DataFrame) -> dict[str, bytes]:
    """``pareto_<dataset>.png`` -> PNG: clean AP against each cost, the Pareto front drawn."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from harness.report.figures import figure_png
    costs = cost_frame(df)
    ap = final[(final["metric"] == "AP") & (final["cond"] == "clean")].groupby(["label", "dataset"])["value"].mean()
    out = {}
    for dataset in sorted(set(ap.index.get_level_values("dataset"))):
        cols = [m for m in (COST_GFLOPS, COST_LATENCY_MS, COST_PARAMS_M, COST_DEVICE_S, COST_PEAK_MEM_MB)
                if m in costs.columns]
        if not cols:
            continue
        fig = Figure(figsize=(3.2 * len(cols), 3.2))
        FigureCanvasAgg(fig)
        for k, m in enumerate(cols):
            ax = fig.add_subplot(1, len(cols), k + 1)
            pts = [(costs.loc[(lab, dataset), m], ap[(lab, dataset)] * 100, lab)
                   for lab in ap.xs(dataset, level="dataset").index
                   if (lab, dataset) in costs.index and np.isfinite(costs.loc[(lab, dataset), m])]
            for x, y, lab in pts:
                ax.scatter(x, y, s=18)
                ax.annotate(lab, (x, y), fontsize=6, xytext=(2, 2), textcoords="offset points")
            front, best = [], -np.inf  # cheaper first; a point is on the front if no cheaper one is better
            for x, y, _ in sorted(pts, key=lambda p: (p[0], -p[1])):
                if y > best:
                    front.append((x, y))
                    best = y
            if front:
                ax.step(*zip(*front), where="post", color="k", lw=0.8, alpha=0.6)
            ax.set(xlabel=COST_METRICS[m][0], ylabel="clean AP (%)" if k == 0 else "")
        fig.suptitle(f"{dataset}: AP vs cost (Pareto front: black)", fontsize=9)
        fig.tight_layout()
        out[f"pareto_{dataset}.png"] = figure_png(fig)
    return out


def _clean_trials(final: pd.DataFrame):
    """(label, dataset) -> that cell's clean-set trials, one per seed."""
    clean = final[(final["cond"] == "clean")].drop_duplicates(["label", "dataset", "seed"])
    return {k: g for k, g in clean.groupby(["label", "dataset"])}


def detection_analyses(storage, final: pd.DataFrame, gts) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """(per-class long frame, error frame, notes) from the kept clean-set detections."""
    per_class, errors, notes, missing = [], [], [], []
    for (lab, dataset), trials in _clean_trials(final).items():
        gt, why = gts.get(dataset, "clean")
        if gt is None:
            notes.append(why)
            continue
        for t in trials.itertuples(index=False):
            try:
                dets = read_detections(storage, detections_rel(t.trial_id, t.stage))
            except FileNotFoundError:
                missing.append(t.trial_id)
                continue
            for c in per_class_ap(gt, dets):
                per_class.append(dict(label=lab, dataset=dataset, seed=t.seed, category=c.name,
                                      category_id=c.category_id, AP=c.ap, AP50=c.ap50, n_gt=c.n_gt))
            e = error_breakdown(gt, dets)
            errors.append(dict(label=lab, dataset=dataset, seed=t.seed, AP50=e.ap50,
                               **{f"d_{k}": e.delta[k] for k in ERROR_TYPES},
                               **{f"n_{k}": e.counts[k] for k in ERROR_TYPES}))
    if missing:
        from harness.report.uncertainty import missing_detections_note
        notes.append(missing_detections_note(missing, "no per-class or error rows for them"))
    return pd.DataFrame(per_class), pd.DataFrame(errors), list(dict.fromkeys(notes))


def per_class_tables(per_class: pd.DataFrame) -> list[Table]:
    """One table per dataset: classes x methods, AP (AP50) in %, mean over seeds."""
    if per_class.empty:
        return []
    out = []
    mean = per_class.groupby(["dataset", "category_id", "category", "label"])[["AP", "AP50"]].mean()
    for dataset, g in mean.groupby(level="dataset"):
        labels = sorted(set(g.index.get_level_values("label")))
        rows, values = [], defaultdict(list)
        for (cid, name), gc in g.groupby(level=["category_id", "category"]):
            cells = []
            for lab in labels:
                key = (dataset, cid, name, lab)
                ap, ap50 = (gc.loc[key, "AP"], gc.loc[key, "AP50"]) if key in gc.index else (np.nan, np.nan)
                values[lab].append(ap)
                cells.append(f"{fmt_number(ap, scale=100)} ({fmt_number(ap50, scale=100)})")
            rows.append((name, *cells))
        v = np.array([values[lab] for lab in labels], dtype=float).T  # classes x methods
        bold = frozenset((i, j + 1) for i in range(len(v)) if np.isfinite(v[i]).any()
                         for j in np.flatnonzero(v[i] == np.nanmax(v[i])))  # best method per class
        out.append(Table(f"per_class_{dataset}", f"Per-class AP (AP50), {dataset}, clean (%)",
                         ("class", *labels), tuple(rows), bold))
    return out


def error_table(errors: pd.DataFrame) -> Table | None:
    """Per method and dataset: AP50 and the AP50 gained by fixing each error type (TIDE's dAP)."""
    if errors.empty:
        return None
    cols = ["AP50", *[f"d_{k}" for k in ERROR_TYPES]]
    mean = errors.groupby(["label", "dataset"])[cols].mean()
    rows = tuple((lab, d, *(fmt_number(mean.loc[(lab, d), c], scale=100) for c in cols)) for lab, d in mean.index)
    names = {"cls": "classification", "loc": "localisation", "both": "cls + loc", "dupe": "duplicate",
             "bkg": "background", "miss": "missed GT"}
    return Table("errors", "Error breakdown (clean; dAP50 in points when each error type is fixed)",
                 ("method", "dataset", "AP50", *(f"d{k}" for k in ERROR_TYPES)), rows,
                 note="TIDE's definitions (IoU 0.5 foreground, 0.1 background); each fixed on its own, "
                      "so they do not add up. Mean over seeds.",
                 columns={f"d{k}": f"AP50 gained by fixing {names[k]} errors" for k in ERROR_TYPES})


__all__ = ["COST_METRICS", "seeds_table", "cost_frame", "cost_table", "pareto_plots", "detection_analyses",
           "per_class_tables", "error_table"]
