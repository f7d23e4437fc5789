"""Robustness summaries in the COCO-C protocol (Michaelis et al. 2019).

From the results store's long rows to, per (method label, [stage,] dataset):

* ``P``   -- clean AP;
* ``mPC`` -- mean AP over the 15 *benchmark* corruptions x severities that
  are present (COCO-C's mPC when all 75 ran; ``n_pc`` says how many did and
  ``complete`` whether all 75 are there);
* ``rPC`` -- ``mPC / P`` (NaN when ``P`` is 0 or missing);
* ``mPC_all`` / ``rPC_all`` / ``n_all`` -- the same over every corrupted
  condition present (extras, rain, dark included);
* ``mPC_<family>`` for ``noise, blur, weather, digital, low_light``: mean
  over the present conditions whose corruption is in that family (extras
  included, e.g. ``spatter`` counts as weather; ``harness.data.corruptions.FAMILY``).

Order of averaging: AP is first averaged over seeds for each condition
(``condition@severity``), then over conditions -- so a condition that ran
with fewer seeds still weighs as one condition.  Values stay in AP's own
units (fractions, not percent).  Conditions that did not run are ignored,
never counted as zero.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import row_label
from harness.data import BENCHMARK, FAMILIES, FAMILY

N_BENCHMARK_CONDITIONS = len(BENCHMARK) * 5
_NEEDED = ("method", "dataset", "condition", "severity", "seed", "metric", "value")


def _label(method: str, variant) -> str:
    """The leaderboard's label (:func:`harness.config.row_label`); a missing variant (NaN, None: loose
    records rather than the store's rows, whose ``variant`` is always a string) counts as none."""
    return row_label(method, variant if isinstance(variant, str) else "")


def _final_rows(df_or_records, metric: str) -> tuple[pd.DataFrame, list[str]]:
    df = df_or_records if isinstance(df_or_records, pd.DataFrame) \
        else pd.DataFrame.from_records(list(df_or_records))
    missing = [c for c in _NEEDED if c not in df.columns]
    if missing:
        raise ValueError(f"robustness rows need columns {list(_NEEDED)}; missing {missing}")
    keep = df["metric"] == metric
    # Same filters as the leaderboard when the store's columns are there.
    if "epoch" in df.columns:
        keep &= df["epoch"].isna()
    if "status" in df.columns:
        keep &= df["status"] == "ok"
    if "split" in df.columns:
        keep &= df["split"] == "val"
    d = df[keep].copy()
    variant = d["variant"] if "variant" in d.columns else pd.Series("", index=d.index)
    d["label"] = [_label(m, v) for m, v in zip(d["method"], variant)]
    d["severity"] = d["severity"].astype(int)
    d.loc[d["condition"] == "clean", "severity"] = 0
    d["value"] = d["value"].astype(float)
    keys = ["label"] + (["stage"] if "stage" in d.columns else []) + ["dataset"]
    if "created_at" in d.columns:  # a re-run of the same seed supersedes the older one
        d = (d.sort_values("created_at", kind="stable")
             .drop_duplicates(keys + ["condition", "severity", "seed"], keep="last"))
    return d, keys


def seed_means(df_or_records, *, metric: str = "AP") -> pd.DataFrame:
    """Mean over seeds per (label, [stage,] dataset, condition, severity); NaN seeds skipped."""
    d, keys = _final_rows(df_or_records, metric)
    g = d.groupby(keys + ["condition", "severity"], sort=True)["value"]
    out = g.mean().rename("value").reset_index()
    out["seeds"] = g.count().to_numpy()
    return out


def robustness_metrics(df_or_records, *, metric: str = "AP") -> pd.DataFrame:
    """One row per (method label, [stage,] dataset): P, mPC, rPC, family means.

    Input: a long DataFrame (or records) with columns method, variant,
    dataset, condition, severity, seed, metric, value (e.g.
    ``ResultStore.load()``); only ``metric`` rows are used, and, where the
    columns exist, final (``epoch`` null), ``status == "ok"``, ``split ==
    "val"`` rows, the latest per seed (``created_at``).  ``stage`` is a key
    when present (an FCTL ``ideal`` and ``corrective`` model are different
    models).  See the module docstring for the definitions.
    """
    sm = seed_means(df_or_records, metric=metric)
    keys = [c for c in ("label", "stage", "dataset") if c in sm.columns]
    fam_cols = [f"mPC_{f}" for f in FAMILIES]
    cols = keys + ["P", "mPC", "rPC", "n_pc", "complete", "mPC_all", "rPC_all", "n_all"] \
        + fam_cols
    rows = []
    for key, g in sm.groupby(keys, sort=True):
        key = key if isinstance(key, tuple) else (key,)
        clean = g.loc[g["condition"] == "clean", "value"]
        P = float(clean.iloc[0]) if len(clean) else np.nan
        cor = g[(g["condition"] != "clean") & g["value"].notna()]
        bench = cor[cor["condition"].isin(BENCHMARK)]
        fam = cor["condition"].map(FAMILY)

        def mean(s):
            return float(s.mean()) if len(s) else np.nan

        def ratio(m):
            return m / P if (np.isfinite(P) and P != 0 and np.isfinite(m)) else np.nan

        mpc, mall = mean(bench["value"]), mean(cor["value"])
        row = dict(zip(keys, key))
        row.update(P=P, mPC=mpc, rPC=ratio(mpc), n_pc=len(bench),
                   complete=len(bench) == N_BENCHMARK_CONDITIONS,
                   mPC_all=mall, rPC_all=ratio(mall), n_all=len(cor))
        for f in FAMILIES:
            row[f"mPC_{f}"] = mean(cor.loc[fam == f, "value"])
        rows.append(row)
    out = pd.DataFrame(rows, columns=cols)
    return out.rename(columns={"label": "method"})


def plot_ap_vs_severity(df, out_dir, *, metric: str = "AP") -> list[Path]:
    """One PNG per (dataset, corruption family): AP vs severity, a line per method.

    Severity 0 is clean AP; severity ``s`` is the mean over the family's
    corruptions present at ``s`` (seed means first).  Methods of several
    stages are labelled ``method/stage``.  Files:
    ``out_dir/ap_vs_severity_<dataset>_<family>.png``; returns their paths.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot state
    from matplotlib.figure import Figure

    sm = seed_means(df, metric=metric)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if "stage" in sm.columns and sm.groupby("label")["stage"].nunique().max() > 1:
        sm["label"] = sm["label"] + "/" + sm["stage"].astype(str)
    sm["family"] = sm["condition"].map(FAMILY)
    paths = []
    for dataset, d in sm.groupby("dataset", sort=True):
        clean = d[d["condition"] == "clean"].groupby("label")["value"].mean()
        for fam in FAMILIES:
            f = d[d["family"] == fam]
            if f.empty:
                continue
            fig = Figure(figsize=(5.5, 4))
            FigureCanvasAgg(fig)
            ax = fig.add_subplot()
            curves = f.groupby(["label", "severity"])["value"].mean()
            members = sorted(f["condition"].unique())
            for label in sorted(set(f["label"])):
                c = curves.loc[label]
                x, y = list(c.index), list(c.to_numpy())
                if label in clean.index:
                    x, y = [0] + x, [clean[label]] + y
                ax.plot(x, y, marker="o", label=label)
            ax.set_xticks(range(0, 6))
            ax.set_xlabel("severity (0 = clean)")
            ax.set_ylabel(metric)
            ax.set_title(f"{dataset}: {fam} ({', '.join(members)})", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
            safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(dataset))
            path = out_dir / f"ap_vs_severity_{safe}_{fam}.png"
            fig.savefig(path, dpi=100, bbox_inches="tight")
            paths.append(path)
    return paths
