"""``detbench check RUN_DIR --against FILE``: a run's numbers against a committed reference (golden file).

Why: a smoke suite is a regression test only if something fails when its numbers
move. The reference is a small CSV (``results/golden/*.csv``) holding, per cell
and seed, the final clean and degraded metrics of a known-good run; it is written
by ``detbench check RUN_DIR --write FILE`` and updated only by a reviewed commit.

A cell *regressed* when its value is below the reference by more than the
tolerance (absolute, in metric units: 0.02 = 2 AP points), or when it is missing
from the run (a method that crashed, a cell dropped from the suite). A value
above the reference by more than the tolerance is reported as *improved* and does
not fail: the golden file is then worth refreshing. Exit 1 names every regressed
cell; unusable input (not a run, a malformed reference) is exit 2.

Only final evaluations count (``epoch`` empty, status ``ok``), as on the
leaderboard. Rows of a hyperparameter search have sampled values in their
variant and are not stable across runs: leave searches out of golden suites.
"""
from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from harness.config import row_label
from harness.core import DataError, DetbenchError, atomic_write
from harness.results import ResultStore

KEY = ("label", "stage", "dataset", "condition", "severity", "seed", "metric")
COLUMNS = KEY + ("value",)
DEFAULT_METRICS = ("AP", "AP50")
DEFAULT_TOLERANCE = 0.02


@dataclass(frozen=True)
class CellCheck:
    """One (cell, seed, metric) of the reference: its value in the run, or None when missing."""
    label: str
    stage: str
    dataset: str
    condition: str
    severity: int
    seed: int
    metric: str
    reference: float
    value: float | None

    @property
    def delta(self) -> float | None:
        return None if self.value is None else self.value - self.reference

    def state(self, tolerance: float) -> str:
        if self.value is None or math.isnan(self.value):
            return "missing" if self.value is None else ("ok" if math.isnan(self.reference) else "regressed")
        if math.isnan(self.reference):
            return "ok"
        if self.delta < -tolerance:
            return "regressed"
        return "improved" if self.delta > tolerance else "ok"

    @property
    def name(self) -> str:
        cond = "clean" if self.condition == "clean" else f"{self.condition}@{self.severity}"
        return f"{self.label} ({self.stage}) / {self.dataset} / {cond} / seed {self.seed} / {self.metric}"


def run_values(run_dir: str | Path, metrics=DEFAULT_METRICS) -> pd.DataFrame:
    """The run's final metrics in the golden file's columns, one row per key."""
    from harness.results import open_run
    df = ResultStore(open_run(run_dir)).read()
    final = df[df["epoch"].isna() & (df["status"] == "ok") & df["metric"].isin(list(metrics))]
    out = pd.DataFrame({"label": [row_label(m, v) for m, v in zip(final["method"], final["variant"])],
                        "stage": final["stage"].to_numpy(), "dataset": final["dataset"].to_numpy(),
                        "condition": final["condition"].to_numpy(),
                        "severity": final["severity"].astype(int).to_numpy(),
                        "seed": final["seed"].astype(int).to_numpy(), "metric": final["metric"].to_numpy(),
                        "value": final["value"].astype(float).to_numpy()})
    # a shared earlier stage is recorded by every trial that reused it: one value per key
    return out.drop_duplicates(list(KEY), keep="last").sort_values(list(KEY)).reset_index(drop=True)


def write_golden(run_dir: str | Path, path: str | Path, metrics=DEFAULT_METRICS) -> Path:
    """Write the run's values as the reference file ``path`` (atomically)."""
    values = run_values(run_dir, metrics)
    if values.empty:
        raise DetbenchError("the run has no successful final evaluation to record", file=run_dir)
    buf = io.StringIO()
    values.to_csv(buf, index=False, float_format="%.6f", columns=list(COLUMNS))
    return atomic_write(path, buf.getvalue())


def read_golden(path: str | Path) -> list[dict]:
    """The reference rows, each validated; a malformed file is a DataError naming the row and column."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise DataError(f"cannot read the reference file ({e.strerror or e})", file=path) from None
    reader = csv.DictReader(io.StringIO(text))
    missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
    if missing:
        raise DataError(f"not a golden file: missing column(s) {', '.join(missing)} "
                        f"(expected {', '.join(COLUMNS)})", file=path)
    rows = []
    for i, rec in enumerate(reader, start=2):  # line 1 is the header
        for col, conv in (("severity", int), ("seed", int), ("value", float)):
            try:
                rec[col] = conv(rec[col])
            except (TypeError, ValueError):
                raise DataError(f"{col} {rec[col]!r} is not a number", file=path, record=f"line {i}",
                                field=col) from None
        rows.append(rec)
    if not rows:
        raise DataError("the reference file has no rows", file=path)
    return rows


def check_run(run_dir: str | Path, against: str | Path) -> list[CellCheck]:
    """Every reference row with the run's value beside it (None where the run lacks it)."""
    from harness.results import open_run
    open_run(run_dir)
    reference = read_golden(against)
    values = run_values(run_dir, sorted({r["metric"] for r in reference}))
    found = {tuple(r[k] for k in KEY): r["value"] for r in values.to_dict("records")}
    return [CellCheck(**{k: r[k] for k in KEY}, reference=r["value"],
                      value=found.get(tuple(r[k] for k in KEY))) for r in reference]


def format_checks(checks: list[CellCheck], tolerance: float) -> str:
    """A plain-text table: cell, value, reference, delta, state; then the verdict."""
    def num(v):
        return "—" if v is None or math.isnan(v) else f"{v:.4f}"
    rows = [("cell", "value", "reference", "delta", "")]
    rows += [(c.name, num(c.value), num(c.reference), "—" if c.delta is None or math.isnan(c.delta)
              else f"{c.delta:+.4f}", c.state(tolerance)) for c in checks]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(v.ljust(w) if i in (0, 4) else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
             for r in rows]
    bad = [c for c in checks if c.state(tolerance) in ("regressed", "missing")]
    verdict = (f"{len(bad)} of {len(checks)} checked value(s) regressed beyond {tolerance:g} or are missing:\n"
               + "\n".join(f"  {c.state(tolerance)}: {c.name}" for c in bad)) if bad else \
        f"all {len(checks)} checked value(s) within {tolerance:g} of the reference"
    return "\n".join(lines) + "\n\n" + verdict


__all__ = ["CellCheck", "run_values", "write_golden", "read_golden", "check_run", "format_checks",
           "DEFAULT_TOLERANCE"]
