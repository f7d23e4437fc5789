"""A titled table of strings and its four renderings: Markdown, CSV, LaTeX (booktabs) and HTML.

Why one record: the leaderboard, the seeds, cost, per-class and error tables are each
built once, as a :class:`Table`, and every output format renders that same record --
so the numbers in a paper's LaTeX table, the CSV and ``report.html`` cannot disagree.
Best values are marked by position (``bold``): Markdown ``**x**``, CSV a trailing ``*``,
LaTeX ``\\textbf{x}``, HTML ``<strong>``.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class Table:
    name: str                                   # file stem under tables/ ("cost", "seeds", ...)
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    bold: frozenset = frozenset()               # (row, column) positions of best values
    note: str = ""                              # a legend line shown under the table
    columns: dict[str, str] = field(default_factory=dict)  # column -> what it is (tables/README.md)


def fmt_number(v, digits: int = 1, scale: float = 1.0) -> str:
    """``12.3``; missing (None / NaN) is an em dash, as everywhere in detbench's tables."""
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return "—"
    return f"{float(v) * scale:.{digits}f}"


def best_positions(values: pd.DataFrame, higher_is_better: dict[str, bool] | None = None,
                   offset: int = 1) -> frozenset:
    """Positions (row, column + ``offset``) of the best value of each column of ``values``."""
    out = set()
    for j, col in enumerate(values.columns):
        v = pd.to_numeric(values[col], errors="coerce").to_numpy(dtype=float)
        if not np.isfinite(v).any():
            continue
        best = np.nanmax(v) if (higher_is_better or {}).get(col, True) else np.nanmin(v)
        out |= {(i, j + offset) for i in np.flatnonzero(v == best)}
    return frozenset(out)


def to_markdown(t: Table, *, heading: str = "##") -> str:
    cell = lambda i, j, s: (f"**{s}**" if (i, j) in t.bold else s).replace("|", "\\|")  # noqa: E731
    lines = [f"{heading} {t.title}", ""] if t.title else []
    if not t.rows:
        return "\n".join(lines + ["No rows.", ""])
    lines += ["| " + " | ".join(h.replace("|", "\\|") for h in t.header) + " |", "|" + "---|" * len(t.header)]
    lines += ["| " + " | ".join(cell(i, j, s) for j, s in enumerate(r)) + " |" for i, r in enumerate(t.rows)]
    return "\n".join(lines + ([f"\n{t.note}"] if t.note else []) + [""])


def to_csv(t: Table, *, banner: list[str] = ()) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    for line in banner:
        w.writerow([line])
    w.writerow(t.header)
    w.writerows([[s + "*" if (i, j) in t.bold else s for j, s in enumerate(r)] for i, r in enumerate(t.rows)])
    return buf.getvalue()


_TEX = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
        "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
        "±": r"$\pm$", "Δ": r"$\Delta$", "†": r"\textsuperscript{\dag}", "—": "--", "−": "$-$",
        "<": r"\textless{}", ">": r"\textgreater{}"}


def tex_escape(s: str) -> str:
    return "".join(_TEX.get(ch, ch) for ch in str(s))


def _groups(header: tuple[str, ...]) -> tuple[list[tuple[str, int]], list[str]]:
    """Column groups from ``a/b/metric`` headers: [(``a/b``, span)], and the last parts."""
    groups: list[tuple[str, int]] = []
    leaves = []
    for h in header:
        top, _, leaf = h.rpartition("/")
        leaves.append(leaf)
        if groups and groups[-1][0] == top:
            groups[-1] = (top, groups[-1][1] + 1)
        else:
            groups.append((top, 1))
    return groups, leaves


def to_latex(t: Table, *, smoke_note: str = "") -> str:
    """A booktabs ``table`` (``\\usepackage{booktabs}``): grouped headers for ``dataset/condition/metric``
    columns, best values bold, the note as a footnote-size line under the rule."""
    if not t.rows:
        return f"% {tex_escape(t.title)}: no rows\n"
    groups, leaves = _groups(t.header)
    spec = "l" + "r" * (len(t.header) - 1)
    out = [r"\begin{table}[t]", r"\centering", r"\small"]
    if t.title:
        out.append(r"\caption{" + tex_escape(t.title) + "}")
    out += [r"\begin{tabular}{" + spec + "}", r"\toprule"]
    if any(top for top, _ in groups):
        cells, rules, col = [], [], 1
        for top, span in groups:
            cells.append(r"\multicolumn{%d}{c}{%s}" % (span, tex_escape(top)) if span > 1 else tex_escape(top))
            if top:
                rules.append(r"\cmidrule(lr){%d-%d}" % (col, col + span - 1))
            col += span
        out += [" & ".join(cells) + r" \\", " ".join(rules)]
    out.append(" & ".join(tex_escape(h) for h in leaves) + r" \\")
    out.append(r"\midrule")
    for i, r in enumerate(t.rows):
        out.append(" & ".join(r"\textbf{" + tex_escape(s) + "}" if (i, j) in t.bold else tex_escape(s)
                              for j, s in enumerate(r)) + r" \\")
    out += [r"\bottomrule", r"\end{tabular}"]
    for line in (t.note, smoke_note):
        if line:
            out.append(r"\par\vspace{2pt}{\footnotesize " + tex_escape(line) + "}")
    out += [r"\end{table}", ""]
    return "\n".join(out)


def latex_document(tables: list[Table], *, smoke_note: str = "") -> str:
    """A compilable document holding ``tables`` (``pdflatex``): paste the ``table`` environments into a paper."""
    body = "\n".join(to_latex(t, smoke_note=smoke_note) for t in tables)
    return ("% detbench tables: booktabs, best value per column in bold.\n"
            "\\documentclass{article}\n\\usepackage[T1]{fontenc}\n\\usepackage[utf8]{inputenc}\n"
            "\\usepackage{booktabs}\n\\usepackage[margin=1.5cm,landscape]{geometry}\n"
            "\\begin{document}\n" + body + "\\end{document}\n")


def html_block(t: Table):
    """The table as a :class:`harness.report.html.TableBlock`."""
    from harness.report.html import TableBlock
    return TableBlock(caption=t.title, header=tuple(t.header), rows=tuple(tuple(r) for r in t.rows),
                      bold=frozenset(t.bold))


__all__ = ["Table", "fmt_number", "best_positions", "to_markdown", "to_csv", "to_latex", "latex_document",
           "tex_escape", "html_block"]
