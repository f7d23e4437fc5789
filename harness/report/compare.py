"""``detbench compare RUN_A RUN_B``: two runs' shared cells side by side, and what differs between them.

A cell is (row label, dataset, condition, metric) for AP and AP50, of the rows a leaderboard
counts (:func:`harness.report.leaderboard.final_rows`). For every cell both runs have: A's and B's
"mean ± std" over seeds (%), Δ = B − A (points) and, where both runs kept the detections of
every seed of the cell and evaluated the same images with the same ground truth, the paired
image-level bootstrap interval of Δ (:func:`harness.evaluate.bootstrap.paired_bootstrap` of
B's matches against A's: the same resampled images for both runs, each side's AP of a resample
the mean over its seeds). Cells only one run has are listed, not compared. Then what differs:
each shared label's ``config_json`` (dotted paths, A value → B value) and run-level facts of
the rows (suite, git SHA, package versions, metric backend, smoke).

Where an interval cannot be computed the Δ is shown without one and :attr:`Comparison.notes`
says why, once per reason. Nothing is written to either run directory; ``--out`` publishes the
Markdown whole to a file of the user's choosing.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import LeaderboardSpec
from harness.core import ConfigError
from harness.report.tables import Table, to_markdown
from harness.storage import Storage, is_remote, open_storage

METRICS = ("AP", "AP50")
#: How many entries of a list (cells only in one run, config keys of a label) are printed.
SHOW = 20
ABSENT = "(absent)"
_VALUE_WIDTH = 60  # a config value longer than this is cut in the printed diff

CellKey = tuple[str, str, str, str]  # (label, dataset, cond, metric)


@dataclass(frozen=True)
class Diff:
    """One differing entry: a dotted path and each run's value (JSON text, or :data:`ABSENT`)."""
    path: str
    a: str
    b: str


@dataclass(frozen=True)
class CellComparison:
    """One shared cell: each run's per-seed values (fractions) and the interval of B − A, if any."""
    label: str
    dataset: str
    cond: str
    metric: str
    a_values: tuple[float, ...]
    b_values: tuple[float, ...]
    interval: object = None  # harness.evaluate.bootstrap.DeltaInterval (fractions) or None

    @staticmethod
    def _mean(values) -> float:
        v = np.asarray(values, dtype=float)
        v = v[~np.isnan(v)]
        return float(v.mean() * 100) if len(v) else float("nan")

    @property
    def a_mean(self) -> float:
        """A's mean over seeds, %."""
        return self._mean(self.a_values)

    @property
    def b_mean(self) -> float:
        return self._mean(self.b_values)

    @property
    def delta(self) -> float:
        """B − A in points (NaN where either side has no value)."""
        return self.b_mean - self.a_mean


@dataclass
class Comparison:
    """What :func:`compare_runs` found; :func:`format_comparison` renders it."""
    a: str                                  # run A as the user reads it (a path or a URI)
    b: str
    spec: LeaderboardSpec
    table: Table
    cells: list[CellComparison] = field(default_factory=list)
    only_a: list[CellKey] = field(default_factory=list)
    only_b: list[CellKey] = field(default_factory=list)
    config_diffs: dict[str, list[Diff]] = field(default_factory=dict)  # label -> differing keys
    run_diffs: list[Diff] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    smoke: bool = False

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


# --------------------------------------------------------------------------- the comparison


def compare_runs(a: str | Path | Storage, b: str | Path | Storage, *, bootstrap: int | None = None,
                 ci: float | None = None) -> Comparison:
    """Compare run B with run A (see the module docstring).

    ``bootstrap`` / ``ci`` override run A's ``leaderboard`` settings (its resamples, coverage;
    the resampling seed stays A's). Either argument not a run directory: :class:`DetbenchError`.
    """
    from harness.report.leaderboard import final_rows
    from harness.results import ResultStore, open_run, planned_cells, run_settings

    sa, sb = open_run(a), open_run(b)
    spec = _spec(run_settings(sa).leaderboard, bootstrap, ci)
    finals = []
    for storage in (sa, sb):
        df = ResultStore(storage).read()
        finals.append(final_rows(df, METRICS)[0])
    fa, fb = finals
    cells_a, cells_b = _cells(fa), _cells(fb)
    shared = sorted(set(cells_a) & set(cells_b), key=_order)
    out = Comparison(a=sa.display(), b=sb.display(), spec=spec, table=Table("compare", "", (), ()),
                     only_a=sorted(set(cells_a) - set(cells_b), key=_order),
                     only_b=sorted(set(cells_b) - set(cells_a), key=_order),
                     smoke=any(bool(f["smoke"].any()) for f in finals if len(f)))
    for name, f in (("A", fa), ("B", fb)):
        if f.empty:
            out.note(f"run {name} has no successful final evaluations of {' / '.join(METRICS)} yet")

    intervals = _intervals(out, (sa, fa, planned_cells(sa)), (sb, fb, planned_cells(sb)),
                           sorted({k[:3] for k in shared}), spec)
    for key in shared:
        iv = intervals.get(key[:3], {}).get(key[3])
        out.cells.append(CellComparison(*key, a_values=tuple(cells_a[key]), b_values=tuple(cells_b[key]),
                                        interval=iv))
    out.table = _table(out)
    out.config_diffs = _config_diffs(out, fa, fb, sorted({k[:2] for k in shared}))
    out.run_diffs = _diff(_run_facts(out, "A", sa, fa), _run_facts(out, "B", sb, fb))
    return out


def _spec(spec: LeaderboardSpec, bootstrap: int | None, ci: float | None) -> LeaderboardSpec:
    """Run A's leaderboard settings with the CLI's overrides; a bad value is a :class:`ConfigError`."""
    from pydantic import ValidationError
    update = {k: v for k, v in (("bootstrap", bootstrap), ("ci", ci)) if v is not None}
    if not update:
        return spec
    try:
        return LeaderboardSpec.model_validate({**spec.model_dump(), **update})
    except ValidationError as err:
        bad = err.errors()[0]
        raise ConfigError(bad["msg"], field=f"--{bad['loc'][0]}") from None


def _order(key: CellKey):
    label, dataset, cond, metric = key
    return (label, dataset, cond != "clean", cond, METRICS.index(metric) if metric in METRICS else 99, metric)


def _cells(final: pd.DataFrame) -> dict[CellKey, list[float]]:
    """Cell -> its per-seed values (fractions), in seed order."""
    out = {}
    for key, g in final.groupby(["label", "dataset", "cond", "metric"]):
        out[tuple(key)] = list(g.sort_values("seed")["value"].astype(float))
    return out


def _rows(final: pd.DataFrame, label: str, dataset: str, cond: str | None = None) -> pd.DataFrame:
    sel = (final["label"] == label) & (final["dataset"] == dataset)
    if cond is not None:
        sel &= final["cond"] == cond
    return final[sel]


# --------------------------------------------------------------------------- intervals


def _intervals(out: Comparison, side_a, side_b, cells: list[tuple[str, str, str]],
               spec: LeaderboardSpec) -> dict:
    """(label, dataset, cond) -> metric -> DeltaInterval of B − A, where one can be computed."""
    from harness.evaluate import detections_rel, match_detections, paired_bootstrap, read_detections
    from harness.report.uncertainty import GroundTruth, missing_detections_note

    if spec.bootstrap <= 0:
        if cells:
            out.note("bootstrap 0: no intervals")
        return {}
    sides = []
    for name, (storage, final, planned) in (("A", side_a), ("B", side_b)):
        sides.append({"name": name, "storage": storage, "final": final, "gts": GroundTruth(planned),
                      "missing": []})
    same_gt: dict[tuple[str, str], dict | None] = {}

    def ground_truth(dataset: str, cond: str) -> dict | None:
        """A's ground truth of the test set, when B's is the same (else None and a note)."""
        if (dataset, cond) not in same_gt:
            gts = []
            for s in sides:
                gt, why = s["gts"].get(dataset, cond)
                if gt is None:
                    out.note(f"run {s['name']}: {why}: no interval")
                gts.append(gt)
            same_gt[(dataset, cond)] = gts[0] if all(g is not None for g in gts) and \
                _same_ground_truth(out, dataset, cond, *gts) else None
        return same_gt[(dataset, cond)]

    def trials(s, label, dataset, cond) -> list[tuple] | None:
        """The cell's evaluations (one per seed), or None when one of them kept no detections."""
        rows = _rows(s["final"], label, dataset, cond).drop_duplicates("seed")
        keys = [(t.trial_id, t.stage, t.condition, int(t.severity))
                for t in rows[["trial_id", "stage", "condition", "severity"]].itertuples(index=False)]
        lost = [k[0] for k in keys if not s["storage"].exists(detections_rel(*k))]
        s["missing"] += lost
        return None if lost or not keys else keys

    matched: dict[tuple, object] = {}
    result = {}
    for label, dataset, cond in cells:
        keys = [trials(s, label, dataset, cond) for s in sides]
        if any(k is None for k in keys):
            continue
        gt = ground_truth(dataset, cond)
        if gt is None:
            continue
        matches = []
        for s, ks in zip(sides, keys):
            for k in ks:
                if (s["name"], k) not in matched:
                    matched[(s["name"], k)] = match_detections(gt, read_detections(s["storage"], detections_rel(*k)))
            matches.append([matched[(s["name"], k)] for k in ks])
        result[(label, dataset, cond)] = paired_bootstrap(matches[1], matches[0], resamples=spec.bootstrap,
                                                          seed=spec.seed, ci=spec.ci)
    for s in sides:
        if s["missing"]:
            out.note(f"run {s['name']}: " + missing_detections_note(s["missing"], "those cells have no interval"))
    return result


def _same_ground_truth(out: Comparison, dataset: str, cond: str, gt_a: dict, gt_b: dict) -> bool:
    """Whether both runs evaluated the same images against the same boxes (else a note)."""
    ids_a, ids_b = ({img["id"] for img in gt["images"]} for gt in (gt_a, gt_b))
    if ids_a != ids_b:
        out.note(f"{dataset}/{cond}: the runs evaluated different images ({len(ids_a)} in A, {len(ids_b)} in B, "
                 f"{len(ids_a & ids_b)} in both): no interval")
        return False
    boxes = [sorted((a["image_id"], a["category_id"], tuple(a["bbox"]), int(a.get("iscrowd", 0)))
                    for a in gt["annotations"]) for gt in (gt_a, gt_b)]
    cats = [sorted(c["id"] for c in gt["categories"]) for gt in (gt_a, gt_b)]
    if boxes[0] != boxes[1] or cats[0] != cats[1]:
        out.note(f"{dataset}/{cond}: the same images but different ground-truth boxes or categories in the two "
                 f"runs: no interval")
        return False
    return True


# --------------------------------------------------------------------------- the table


def _table(c: Comparison) -> Table:
    from harness.report.leaderboard import _fmt

    rows = []
    for cell in c.cells:
        a, b = np.asarray(cell.a_values, float), np.asarray(cell.b_values, float)
        delta = "—" if np.isnan(cell.delta) else f"{cell.delta:+.2f}"
        iv = cell.interval
        interval = "—" if iv is None else \
            f"[{iv.low * 100:+.2f}, {iv.high * 100:+.2f}]" + ("†" if iv.excludes_zero else "")
        rows.append((cell.label, cell.dataset, cell.cond, cell.metric, _fmt(a, len(a)), _fmt(b, len(b)), delta,
                     interval, f"{len(a)}/{len(b)}"))
    legend = ("A, B: %, mean ± sample std over seeds; Δ = B − A in points (of the means)"
              + (f"; [low, high]: {c.spec.ci:.0%} interval of Δ (paired image bootstrap of B's detections against "
                 f"A's, {c.spec.bootstrap} resamples, seed {c.spec.seed}, seeds pooled); † it excludes 0"
                 if any(cell.interval for cell in c.cells) else "") + ".")
    return Table("compare", "Shared cells (B − A)",
                 ("method", "dataset", "condition", "metric", "A", "B", "Δ", "interval", "seeds A/B"), tuple(rows),
                 note=legend,
                 columns={"A": "run A: mean ± sample std over seeds (%)", "B": "run B: the same",
                          "Δ": "B − A (points)", "interval": "paired-bootstrap interval of Δ (points)",
                          "seeds A/B": "seeds each run has of the cell"})


# --------------------------------------------------------------------------- what differs


def _flatten(value, prefix: str = "") -> dict[str, str]:
    """Dotted path -> JSON text of every leaf (lists are leaves)."""
    if isinstance(value, dict) and value:
        out = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix or "(value)": json.dumps(value, sort_keys=True, default=str)}


def _diff(a: dict[str, str], b: dict[str, str]) -> list[Diff]:
    return [Diff(k, a.get(k, ABSENT), b.get(k, ABSENT)) for k in sorted(set(a) | set(b))
            if a.get(k, ABSENT) != b.get(k, ABSENT)]


def _parse(text: str) -> dict:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {"(config_json)": text}
    return value if isinstance(value, dict) else {"(config_json)": value}


def _config_diffs(out: Comparison, fa: pd.DataFrame, fb: pd.DataFrame,
                  pairs: list[tuple[str, str]]) -> dict[str, list[Diff]]:
    """Shared label -> its differing config keys (per dataset where they differ by dataset)."""
    per: dict[str, dict[str, list[Diff]]] = {}
    for label, dataset in pairs:
        configs = []
        for name, f in (("A", fa), ("B", fb)):
            rows = _rows(f, label, dataset).sort_values("created_at", kind="stable")
            distinct = list(dict.fromkeys(rows["config_json"]))
            if len(distinct) > 1:
                out.note(f"{label} on {dataset}: {len(distinct)} configurations in run {name} "
                         "(a stage several entries share): the latest compared")
            configs.append(distinct[-1] if distinct else "{}")
        per.setdefault(label, {})[dataset] = _diff(*(_flatten(_parse(c)) for c in configs))
    result = {}
    for label, by_dataset in per.items():
        distinct = {json.dumps([(d.path, d.a, d.b) for d in v]) for v in by_dataset.values()}
        if len(distinct) == 1:
            diffs = next(iter(by_dataset.values()))
            if diffs:
                result[label] = diffs
        else:
            result.update({f"{label} on {d}": v for d, v in by_dataset.items() if v})
    return result


def _latest(out: Comparison, name: str, final: pd.DataFrame, column: str, what: str, empty=("",)):
    """The newest non-empty value of ``column`` in the rows (None without one); a note when several."""
    if column not in final.columns or final.empty:
        return None
    rows = final[~final[column].isin(empty)].sort_values("created_at", kind="stable")
    distinct = list(dict.fromkeys(rows[column]))
    if len(distinct) > 1:
        out.note(f"run {name}'s rows carry {len(distinct)} different {what} (a run resumed on another install?): "
                 "the newest compared")
    return distinct[-1] if distinct else None


def _run_facts(out: Comparison, name: str, storage: Storage, final: pd.DataFrame) -> dict[str, str]:
    """What the run's rows say about how they were made, flattened; the manifest where rows lack it."""
    from harness.results import run_settings
    manifest = run_settings(storage).manifest  # read for these fields only; storage options are never shown
    suite = _latest(out, name, final, "suite", "suite names") or (manifest.get("suite") or {}).get("name", "")
    sha = _latest(out, name, final, "git_sha", "git SHAs") or manifest.get("git_sha", "")
    versions = _latest(out, name, final, "versions_json", "package-version records", empty=("", "{}"))
    versions = json.loads(versions) if versions else (manifest.get("versions") or {})
    facts = {"suite": json.dumps(suite), "git_sha": json.dumps(sha)}
    facts.update({f"versions.{k}": json.dumps(v) for k, v in versions.items()})
    backend = _latest(out, name, final, "metric_backend", "metric backends")
    if backend:
        facts["metric_backend"] = json.dumps(backend)
    facts["smoke"] = json.dumps(bool(final["smoke"].any()) if len(final) else False)
    return facts


# --------------------------------------------------------------------------- rendering


def _cell_name(key: CellKey) -> str:
    label, dataset, cond, metric = key
    return f"{label} {dataset}/{cond} {metric}"


def _value(text: str) -> str:
    return text if len(text) <= _VALUE_WIDTH else text[: _VALUE_WIDTH - 1] + "…"


def _diff_lines(diffs: list[Diff]) -> list[str]:
    lines = [f"- `{d.path}`: {_value(d.a)} → {_value(d.b)}" for d in diffs[:SHOW]]
    if len(diffs) > SHOW:
        lines.append(f"- ... and {len(diffs) - SHOW} more")
    return lines


def format_comparison(c: Comparison) -> str:
    """The comparison as Markdown: the shared cells, those only in one run, what differs, notes."""
    from harness.report.leaderboard import SMOKE_BANNER
    lines = [SMOKE_BANNER, ""] if c.smoke else []
    lines += ["# Comparison of two runs", "", f"- A: {c.a}", f"- B: {c.b}", ""]
    if c.cells:
        lines.append(to_markdown(c.table))
    else:
        lines += ["## Shared cells (B − A)", "",
                  "No shared cells: the runs have no (method, dataset, condition, metric) in common.", ""]
    if c.only_a or c.only_b:
        lines += ["## Cells in one run only", ""]
        for name, keys in (("A", c.only_a), ("B", c.only_b)):
            if keys:
                more = f" (first {SHOW})" if len(keys) > SHOW else ""
                lines.append(f"- only in {name}: {len(keys)} cell(s){more}: "
                             + "; ".join(_cell_name(k) for k in keys[:SHOW]))
        lines.append("")
    lines += ["## Configuration differences (A → B)", ""]
    if c.config_diffs:
        for label, diffs in c.config_diffs.items():
            lines += [f"### {label}", ""] + _diff_lines(diffs) + [""]
    else:
        lines += ["The shared methods' configurations are the same." if c.cells else "No shared methods.", ""]
    lines += ["## Run differences (A → B)", ""]
    lines += (_diff_lines(c.run_diffs) if c.run_diffs else
              ["Same suite name, git SHA, package versions and metric backend."]) + [""]
    if c.notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in c.notes] + [""]
    return "\n".join(lines)


def write_comparison(text: str, where: str | Path) -> str:
    """Publish ``text`` whole at ``where`` (a file path or an object-store URI); returns where it is."""
    where = str(where)
    if is_remote(where):
        parent, _, name = where.rstrip("/").rpartition("/")
    else:
        path = Path(where).expanduser().resolve()
        parent, name = str(path.parent), path.name
    if not name:
        raise ConfigError(f"not a file name: {where!r}", field="--out")
    storage = open_storage(parent)
    storage.write_text(name, text)
    return storage.display(name)


__all__ = ["compare_runs", "format_comparison", "write_comparison", "Comparison", "CellComparison", "Diff"]
