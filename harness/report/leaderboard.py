"""Leaderboard tables from the results store.

Only final evaluations count (``epoch`` null, split ``val``, status ``ok``):
per-epoch curves and HPO noise must not leak into the headline table. Cells
are "mean ± std" over seeds in percent; a number without its seed count and
spread is not a result, so both are always shown. Failed trials are counted,
never silently dropped.
"""
from __future__ import annotations

import csv
import html
import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd

from harness.config import parse_label, row_label, stage_label
from harness.evaluate import condition_key
from harness.report.tables import Table
from harness.results import ResultStore
from harness.storage import Storage, open_storage

SMOKE_BANNER = "SMOKE RUN (tiny synthetic settings) — not comparable to published numbers"
FORMATS = {"md": "md", "csv": "csv", "html": "html", "tex": "tex"}
EMPTY_MESSAGE = "No successful final evaluations yet"
_EXTRA = ("seeds", "failed")  # trailing non-metric columns


def _fmt(values: np.ndarray, n_method: int) -> str:
    """'52.3 ± 1.2' (sample std, ddof=1); one seed: '52.3'; all NaN: 'n/a'."""
    v = values[~np.isnan(values)] * 100.0
    if not len(v):
        return "n/a"
    s = f"{v.mean():.1f}" if len(v) == 1 else f"{v.mean():.1f} ± {v.std(ddof=1):.1f}"
    return s if len(v) == n_method else f"{s} (n={len(v)})"  # fewer seeds than the method's


def final_rows(df: pd.DataFrame, metrics=("AP", "AP50"), *, stage: str | None = None
               ) -> tuple[pd.DataFrame, pd.Series]:
    """The rows a leaderboard counts, labelled, and the failed trials per label.

    Final evaluations only (``epoch`` null, split ``val``, status ``ok``) of ``metrics``,
    with columns ``label`` (the row label: entry, and stage for multi-stage methods; one
    label for a stage several entries share) and ``cond`` (``clean`` / ``fog@3``); a
    re-run of the same seed supersedes the older one. The one definition of "what the
    table shows" for the leaderboard, the seeds table, the intervals and ``compare``.
    """
    metrics = list(metrics)
    if stage is not None:
        df = df[df["stage"] == stage]
    base = [row_label(m, v) for m, v in zip(df["method"], df["variant"])]
    # Methods with several stages (teacher -> student, ...) get one row per stage.
    done = df["epoch"].isna() & (df["status"] == "ok")
    n_stages = pd.Series(df["stage"].to_numpy(), index=base)[done.to_numpy()].groupby(level=0).nunique()
    label = pd.Series([f"{b} ({st})" if n_stages.get(b, 1) > 1 else b for b, st in zip(base, df["stage"])],
                      index=df.index, dtype=object)
    label = label.replace(_shared_stage_aliases(df[done], label[done]))
    failed = (df[df["status"] == "failed"].assign(label=label)
              .groupby("label")["trial_id"].nunique())
    failed = failed[failed > 0]  # a label with no failure is no row of its own (e.g. a stage that never evaluates)
    final = df[df["epoch"].isna() & (df["split"] == "val") & (df["status"] == "ok")
               & df["metric"].isin(metrics)].copy()
    final["label"] = label[final.index]
    final["cond"] = [condition_key(c, s) for c, s in zip(final["condition"], final["severity"])]
    final = (final.sort_values("created_at", kind="stable")
             .drop_duplicates(["label", "dataset", "cond", "metric", "seed"], keep="last"))
    return final, failed


def build_leaderboard(df: pd.DataFrame, metrics=("AP", "AP50"), *,
                      stage: str | None = None, baselines: dict[str, str] | None = None,
                      intervals: dict | None = None, published: dict | None = None) -> pd.DataFrame:
    """Methods x (dataset, condition, metric) table of "mean ± std" strings.

    Extra columns ("seeds", "", "") and ("failed", "", ""). Numeric
    means/stds (percent) are in ``.attrs["mean"]`` / ``.attrs["std"]`` for
    ranking; ``.attrs["smoke"]`` is True if any row is a smoke row. Rows are
    sorted by the first metric column's mean, best first. A cell with fewer
    seeds than its method has elsewhere gets an "(n=k)" suffix.
    ``stage`` optionally restricts to one stage (e.g. only final retrains).
    ``baselines`` maps a row label to the label it is compared with: a
    "ΔAP vs baseline" column per (dataset, condition) gives the gain in AP
    points and relative to the baseline; ``intervals`` ((label, dataset, cond) ->
    metric -> :class:`harness.evaluate.bootstrap.DeltaInterval`) adds its bootstrap
    interval, marked † where it excludes 0. ``published`` (label ->
    :class:`harness.report.published.PublishedRef`) adds the reference value and the
    measured one's difference from it (never for smoke rows: not comparable).
    """
    metrics = list(metrics)
    final, failed = final_rows(df, metrics, stage=stage)
    seeds = final.groupby("label")["seed"].nunique()
    labels = sorted(set(final["label"]) | set(failed.index))

    cells = sorted({(d, c) for d, c in zip(final["dataset"], final["cond"])},
                   key=lambda dc: (dc[0], dc[1] != "clean", dc[1]))
    cols = [(d, c, m) for d, c in cells for m in metrics
            if ((final["dataset"] == d) & (final["cond"] == c) & (final["metric"] == m)).any()]
    index = pd.Index(labels, name="method")
    mi = pd.MultiIndex.from_tuples(cols, names=["dataset", "condition", "metric"])
    mean = pd.DataFrame(np.nan, index=index, columns=mi)
    std = mean.copy()
    text = pd.DataFrame("—", index=index, columns=mi, dtype=object)
    for (lab, d, c, m), g in final.groupby(["label", "dataset", "cond", "metric"]):
        v = g["value"].to_numpy(dtype=float)
        ok = v[~np.isnan(v)] * 100.0
        if len(ok):
            mean.loc[lab, (d, c, m)] = ok.mean()
            std.loc[lab, (d, c, m)] = ok.std(ddof=1) if len(ok) > 1 else np.nan
        text.loc[lab, (d, c, m)] = _fmt(v, int(seeds.get(lab, 0)))
    if cols:  # rank by the first metric column, best first; no value last; ties by name
        first = mean[cols[0]]
        order = sorted(labels, key=lambda lab: (bool(np.isnan(first[lab])),
                                                -np.nan_to_num(first[lab]), lab))
        mean, std, text = mean.loc[order], std.loc[order], text.loc[order]
    notes, compact = [], {}
    for lab, ref in baseline_pairs(mean.index, baselines):  # gain over the method's baseline row
        for d, c, m in [col for col in cols if col[2] == metrics[0]]:
            a, b = mean.loc[lab, (d, c, m)], mean.loc[ref, (d, c, m)]
            if np.isnan(b) and not np.isnan(a):
                notes.append(f"baseline {ref} of {lab} has no {m} on {d}/{c}: that gain is left empty")
            if not (np.isnan(a) or np.isnan(b)):
                rel = f" ({(a - b) / b * 100:+.1f}%)" if b else ""
                iv = (intervals or {}).get((lab, d, c), {}).get(m)
                mark = "†" if iv and iv.excludes_zero else ""
                ci = f" [{iv.low * 100:+.1f}, {iv.high * 100:+.1f}]{mark}" if iv else ""
                col = (f"Δ{m} vs baseline", f"{d}/{c}", "")
                text.loc[lab, col] = f"{a - b:+.1f}{rel}{ci} vs {ref}"
                compact[(lab, col)] = f"{a - b:+.1f}{mark}"  # the terminal's form
    smoke = bool(df["smoke"].any()) if "smoke" in df.columns else False
    if published and not smoke:
        _add_published(text, mean, published)
    text = text.fillna("")
    text[("seeds", "", "")] = [int(seeds.get(lab, 0)) for lab in text.index]
    text[("failed", "", "")] = [int(failed.get(lab, 0)) for lab in text.index]
    text.attrs.update(mean=mean, std=std, smoke=smoke, notes=notes, compact=compact)
    return text


def baseline_pairs(rows, baselines: dict[str, str] | None) -> list[tuple[str, str]]:
    """(row, its baseline row) for every row of ``rows`` that has a baseline among ``rows``."""
    pairs = [(lab, _baseline_row(lab, baselines or {}, rows)) for lab in rows]
    return [(lab, ref) for lab, ref in pairs if ref and ref in rows]


def _add_published(text: pd.DataFrame, mean: pd.DataFrame, published: dict) -> None:
    """"published" (the reference, with its metric and dataset) and "Δ vs published" columns."""
    for lab, ref in published.items():
        if lab not in text.index:
            continue
        text.loc[lab, ("published", "", "")] = f"{ref.value:.1f} ({ref.dataset} {ref.metric}, {ref.key})"
        col = (ref.dataset, "clean", ref.metric)
        if col in mean.columns and not np.isnan(mean.loc[lab, col]):
            text.loc[lab, ("Δ vs published", "", "")] = f"{mean.loc[lab, col] - ref.value:+.1f}"


def _shared_stage_aliases(done: pd.DataFrame, label: pd.Series) -> dict[str, str]:
    """One row for a stage output that several entries share (an FCTL ideal model, a DeFeat teacher).

    Rows of a shared earlier stage carry the artifact's key as ``config_hash``; labels whose
    rows of one stage have the same hashes are the same models. They are shown once, as
    "method (stage)" when that name is free, else under the shortest of their labels.
    """
    if "config_hash" not in done.columns or done.empty:
        return {}
    groups: dict[tuple, list[str]] = {}
    for (lab, method, stage), g in done.assign(label=label).groupby(["label", "method", "stage"]):
        groups.setdefault((method, stage, frozenset(g["config_hash"])), []).append(lab)
    per_stage = pd.Series([(m, st) for m, st, _ in groups]).value_counts()
    aliases = {}
    for (method, stage, _), labels in groups.items():
        if len(labels) < 2:
            continue
        name = stage_label(method, stage) if per_stage[(method, stage)] == 1 else min(labels, key=lambda s: (len(s), s))
        aliases.update({lab: name for lab in labels if lab != name})
    return aliases


def drop_shared_stage_duplicates(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` without the repeated copies of a shared earlier stage (one entry's rows kept).

    For tables that name rows by entry (the robustness table), where
    :func:`_shared_stage_aliases`' relabelling does not apply.
    """
    if df.empty or "stage" not in df.columns:
        return df
    label = pd.Series([stage_label(row_label(m, v), st) for m, v, st in zip(df["method"], df["variant"], df["stage"])],
                      index=df.index)
    done = (df["epoch"].isna() & (df["status"] == "ok")).to_numpy()
    groups: dict[str, list[str]] = {}
    for lab, name in _shared_stage_aliases(df[done], label[done]).items():
        groups.setdefault(name, []).append(lab)
    drop = set()
    for name, labs in groups.items():
        keep = name if name in set(label) else min(labs, key=lambda s: (len(s), s))
        drop |= set(labs) - {keep}
    return df[~label.isin(drop)]


def _baseline_row(lab: str, baselines: dict[str, str], rows) -> str | None:
    """The row ``lab`` is compared with: its own baseline, else its entry's; same stage if staged.

    Rows of a search ("fctl[lambda_fs=1.25]") use the baseline of their method's entry.
    "fctl (corrective)" compares with "fctl[degraded_only] (corrective)" when the suite says
    ``baseline: fctl[degraded_only]``; "defeat (student)" with the single-stage "faster_rcnn".
    """
    parsed = parse_label(lab)  # searched rows "fctl[lambda_fs=1.25]" belong to entry "fctl"
    entry = row_label(parsed.entry, parsed.variant)
    ref = next((baselines[k] for k in (lab, entry, parsed.entry) if k in baselines), None)
    if not ref or ref == entry:
        return None
    staged = stage_label(ref, parsed.stage) if parsed.stage else ref
    return staged if staged in rows else ref


def _best_mask(board: pd.DataFrame) -> pd.DataFrame:
    """True where a cell holds the highest mean of its column (ties: all)."""
    mean = board.attrs.get("mean", pd.DataFrame())
    return mean.eq(mean.max(axis=0), axis=1) & mean.notna()


def _header(col) -> str:
    return "/".join(str(p) for p in col if p != "")  # e.g. "voc/fog@3/AP"


def _table(board: pd.DataFrame, mark) -> tuple[list[str], list[list[str]]]:
    """Header and body rows as strings, best cells wrapped by ``mark``."""
    best = _best_mask(board)
    head = ["method"] + [_header(c) for c in board.columns]
    body = []
    for lab, row in board.iterrows():
        cells = [lab]
        for col, val in row.items():
            is_best = col in best.columns and bool(best.loc[lab, col])
            cells.append(mark(str(val)) if is_best else str(val))
        body.append(cells)
    return head, body


def leaderboard_table(board: pd.DataFrame, title: str = "Leaderboard") -> Table:
    """The board as a :class:`harness.report.tables.Table` (LaTeX, report.html), best means bold."""
    if len(board.columns) <= len(_EXTRA) or not len(board):
        return Table("leaderboard", title, ("method",), ())
    best = _best_mask(board)
    head = ["method"] + [_header(c) for c in board.columns]
    bold = {(i, j + 1) for i, lab in enumerate(board.index) for j, col in enumerate(board.columns)
            if col in best.columns and bool(best.loc[lab, col])}
    rows = tuple((lab, *(str(v) for v in row)) for lab, row in zip(board.index, board.itertuples(index=False)))
    return Table("leaderboard", title, tuple(head), rows, frozenset(bold),
                 note="AP in %, mean ± sample std over seeds; best per column bold.")


def _empty_message(board: pd.DataFrame) -> str:
    n = int(board[("failed", "", "")].sum()) if ("failed", "", "") in board.columns else 0
    return EMPTY_MESSAGE + (f" ({n} failed trial{'s' if n != 1 else ''})" if n else "") + "."


def _is_rows(df: pd.DataFrame) -> bool:
    return "metric" in df.columns and "mean" not in df.attrs


def render_leaderboard(df: pd.DataFrame, fmt: str = "md", *, smoke: bool = False,
                       title: str | None = None, metrics=("AP", "AP50"),
                       baselines: dict[str, str] | None = None, footer: str = "") -> str:
    """Render raw result rows (or a built board) as Markdown, CSV, HTML or LaTeX (booktabs).

    Best mean per column: Markdown ``**bold**``, HTML ``<b>``, CSV trailing
    ``*``. A smoke run's output starts with :data:`SMOKE_BANNER` (also when
    ``smoke`` is False but the rows themselves are smoke rows). ``footer`` (the interval
    legend, notes) goes under a Markdown table and into the LaTeX table's note.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown leaderboard format {fmt!r}; expected one of {list(FORMATS)}")
    board = build_leaderboard(df, metrics, baselines=baselines) if _is_rows(df) else df
    smoke = smoke or bool(board.attrs.get("smoke", False))
    has_cells = len(board.columns) > len(_EXTRA) and len(board)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        for line in ([SMOKE_BANNER] if smoke else []) + ([title] if title else []):
            w.writerow([line])
        if not has_cells:
            w.writerow([_empty_message(board)])
        else:
            head, body = _table(board, lambda s: s + "*")
            w.writerows([head] + body)
        return buf.getvalue()
    if fmt == "tex":
        from harness.report.tables import latex_document
        t = leaderboard_table(board, title or "Leaderboard")
        if footer:
            t = replace(t, note=f"{t.note} {footer}".strip())
        return latex_document([t], smoke_note=SMOKE_BANNER if smoke else "") if t.rows else \
            f"% {_empty_message(board)}\n"
    if fmt == "html":
        parts = [f'<p class="smoke"><b>{html.escape(SMOKE_BANNER)}</b></p>'] if smoke else []
        if title:
            parts.append(f"<h2>{html.escape(title)}</h2>")
        if not has_cells:
            parts.append(f"<p>{html.escape(_empty_message(board))}</p>")
        else:
            head, body = _table(board, lambda s: f"<b>{html.escape(s)}</b>")
            esc = lambda s: s if s.startswith("<b>") else html.escape(s)  # noqa: E731
            parts.append("<table>\n<thead><tr>" + "".join(f"<th>{html.escape(h)}</th>"
                                                          for h in head) + "</tr></thead>")
            parts.append("<tbody>\n" + "\n".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r)
                                                  + "</tr>" for r in body) + "\n</tbody>\n</table>")
        return "\n".join(parts) + "\n"
    lines = [SMOKE_BANNER, ""] if smoke else []
    if title:
        lines += [f"# {title}", ""]
    if not has_cells:
        lines.append(_empty_message(board))
    else:
        head, body = _table(board, lambda s: f"**{s}**")
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in body]
    return "\n".join(lines + (["", footer] if footer else [])) + "\n"


#: Columns a terminal leaderboard fits in.
TERMINAL_WIDTH = 120
TERMINAL_DELTA_NOTE = ("Δ: points over the row's baseline, † where its bootstrap interval excludes 0.\n"
                       "Each row's baseline and interval: leaderboard.md, report.html.")


def format_for_terminal(df: pd.DataFrame, metrics=("AP", "AP50"),
                        baselines: dict[str, str] | None = None, *, width: int = TERMINAL_WIDTH) -> str:
    """Plain-text table for the CLI, no line wider than ``width``; best cells get a trailing ``*``.

    A gain over the baseline is shown as ``+3.1†`` (the interval and the baseline's name stay
    in leaderboard.md, the tables and report.html). A table too wide is split by dataset, each
    part repeating the method column, and a dataset too wide for one part is wrapped.
    """
    board = build_leaderboard(df, metrics, baselines=baselines) if _is_rows(df) else df
    prefix = SMOKE_BANNER + "\n" if board.attrs.get("smoke") else ""
    if len(board.columns) <= len(_EXTRA) or not len(board):
        return prefix + _empty_message(board)
    compact = board.attrs.get("compact", {})
    _, body = _table(board, lambda s: s + "*")  # a gain is never a best mean: its cell is free to shorten
    labels = [str(lab) for lab in board.index]
    columns = []  # (dataset or "" for seeds / failed / published, header, header within its dataset, cells)
    for j, col in enumerate(board.columns):
        cells = [compact.get((lab, col), row[j + 1]) for lab, row in zip(board.index, body)]
        if str(col[0]).startswith("Δ") and col[1]:  # ("ΔAP vs baseline", "coco/clean", "")
            metric, (group, within) = str(col[0]).split(" ")[0], str(col[1]).split("/", 1)
            header, short = f"{metric}/{col[1]}", f"{metric}/{within}"
        else:
            group = str(col[0]) if col[1] else ""
            header = _header(col)
            short = "/".join(str(p) for p in col[1:] if p != "") if group else header
        columns.append((group, header, short, cells))
    label_w = max(len("method"), *(len(lab) for lab in labels))
    widths = {short: [max(len(c[2 if short else 1]), *(len(v) for v in c[3])) for c in columns]
              for short in (False, True)}

    def render(idx: list[int], short: bool, title: str = "") -> str:
        w = widths[short]
        lines = ([title] if title else []) + \
            ["method".ljust(label_w) + "".join("  " + columns[i][2 if short else 1].rjust(w[i]) for i in idx)]
        lines += [lab.ljust(label_w) + "".join("  " + columns[i][3][r].rjust(w[i]) for i in idx)
                  for r, lab in enumerate(labels)]
        return "\n".join(line.rstrip() for line in lines)

    def fits(idx: list[int], short: bool) -> bool:  # every line is padded to this width at most
        return label_w + sum(widths[short][i] + 2 for i in idx) <= width

    everything = list(range(len(columns)))
    if fits(everything, short=False):
        blocks = [render(everything, short=False)]
    else:  # one part per dataset, its name above it and not in each header; wrapped when too wide
        groups: dict[str, list[int]] = {}
        for i, column in enumerate(columns):
            groups.setdefault(column[0], []).append(i)
        trailing = groups.pop("", [])
        parts: list[tuple[str, list[int]]] = []
        for group, idx in groups.items():
            part: list[int] = []
            for i in idx:
                if part and not fits(part + [i], short=True):
                    parts.append((group, part))
                    part = []
                part.append(i)
            parts.append((group, part))
        if trailing and parts and fits(parts[-1][1] + trailing, short=True):
            parts[-1] = (parts[-1][0], parts[-1][1] + trailing)
        elif trailing:
            parts.append(("", trailing))
        seen: set[str] = set()
        blocks = []
        for group, idx in parts:
            title = (f"{group} (continued)" if group in seen else group) if group else ""
            seen.add(group)
            blocks.append(render(idx, short=True, title=f"[{title}]" if title else ""))
    note = "\n\n" + TERMINAL_DELTA_NOTE if compact else ""
    return prefix + "\n\n".join(blocks) + note


def write_leaderboard(run_dir: str | Path | Storage, fmt: str = "md", *, metrics=("AP", "AP50"),
                      title: str | None = None) -> str:
    """Render the run's leaderboard to ``leaderboard.<fmt>`` of the run directory, published whole;
    returns where it is (a path or a URI). Rows only, no intervals or published column: every
    output of a run together is :func:`harness.report.outputs.write_run_outputs`."""
    from harness.results import run_settings
    storage = open_storage(run_dir)
    df = ResultStore(storage).read()
    text = render_leaderboard(df, fmt, smoke=bool(df["smoke"].any()), title=title, metrics=metrics,
                              baselines=run_settings(storage).baselines)
    rel = f"leaderboard.{FORMATS[fmt]}"
    storage.write_text(rel, text)
    return storage.display(rel)
