"""Extra outputs of a run beside the leaderboard: robustness table and plots.

* ``robustness.md``: P (clean AP), mPC, rPC and per-family means per method and
  dataset, when the run evaluated corruptions (COCO-C protocol).
* ``plots/ap_vs_severity_*.png``: AP against severity per corruption family.
* ``plots/curve_*.png``: per-epoch curves of method-specific statistics that
  move during training (e.g. UMOP's gamma_ad / alpha_ad per FPN level).
"""
from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pandas as pd

from harness.config import row_label
from harness.evaluate.robustness import plot_ap_vs_severity, robustness_metrics
from harness.storage import Storage, open_storage


def declared_curves(methods) -> dict[str, tuple[str, set[str]]]:
    """prefix -> (plot title, the methods declaring it): each plugin's ``curves``, for the methods run."""
    from harness.registry import METHODS
    out: dict[str, tuple[str, set[str]]] = {}
    for name in methods:
        if name in METHODS:
            for prefix, title in METHODS.get(name).curves.items():
                out.setdefault(prefix, (title, set()))[1].add(name)
    return out


def _fmt(v) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v * 100:.1f}"


def robustness_table(df: pd.DataFrame) -> str:
    """Markdown P / mPC / rPC table, or '' when only clean was evaluated."""
    if not (df["condition"] != "clean").any():
        return ""
    from harness.leaderboard import drop_shared_stage_duplicates
    rob = robustness_metrics(drop_shared_stage_duplicates(df))
    if rob.empty:
        return ""
    fams = [c for c in rob.columns if c.startswith("mPC_") and c != "mPC_all" and rob[c].notna().any()]
    head = ["method", "dataset", "P", "mPC", "rPC %"] + [f.replace("mPC_", "") for f in fams]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    # stage named for every entry of a multi-stage method (fctl[degraded_only] (corrective))
    multi = (rob.groupby(rob["method"].str.split("[").str[0])["stage"].transform("nunique") > 1
             if "stage" in rob.columns else None)
    for i, r in rob.iterrows():
        rpc = "—" if pd.isna(r["rPC"]) else f"{r['rPC'] * 100:.1f}"
        name = r["method"] + (f" ({r['stage']})" if multi is not None and multi[i] else "")
        lines.append("| " + " | ".join([name, r["dataset"], _fmt(r["P"]), _fmt(r["mPC"]), rpc]
                                       + [_fmt(r[f]) for f in fams]) + " |")
    note = ("\nmPC averages the COCO-C benchmark corruptions that ran "
            "(AP in %, mean over seeds first); per-family columns include all corruptions run.\n")
    return "## Robustness (P / mPC / rPC)\n\n" + "\n".join(lines) + "\n" + note


def plot_curves(df: pd.DataFrame, out_dir: Path) -> list[Path]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    paths = []
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
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"curve_{prefix.strip('/').replace('/', '_')}.png"
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths


def write_report(run_dir: str | Path | Storage, df: pd.DataFrame) -> list[str]:
    """Write robustness.md and the plots into the run directory; return where they are.

    Plots are drawn into a local folder (the run's own on POSIX, a temporary one
    otherwise) and each file is then published whole to the run's storage.
    """
    storage = open_storage(run_dir)
    written = []
    table = robustness_table(df)
    if table:
        storage.write_text("robustness.md", table)
        written.append(storage.display("robustness.md"))
    with tempfile.TemporaryDirectory(prefix="detbench-plots-") as tmp:
        plots = storage.local_path("plots") or Path(tmp)
        files = (plot_ap_vs_severity(df, plots) if table else []) + plot_curves(df, plots)
        for f in files:
            storage.upload(f"plots/{Path(f).name}", Path(f))
            written.append(storage.display(f"plots/{Path(f).name}"))
    return written
