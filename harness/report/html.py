"""One self-contained HTML file for a run's report: tables, plots, the suite and its manifest.

A researcher e-mails one file and a reviewer opens it offline, perhaps years later, perhaps on a
machine with no network: so the page references nothing outside itself. Styles are an inline
``<style>``, images are ``data:image/png;base64`` URIs, the only script is a few inline lines that
sort a table by a clicked header, and there are no fonts, CDNs or favicons to fetch. Every piece
of text (titles, captions, cells, the suite YAML) goes through :func:`html.escape`, because method
names, dataset paths and notes come from user files. The records are frozen dataclasses so the
caller builds the whole report as data and this module only renders it (the lead publishes the
returned string through the run's storage).
"""
from __future__ import annotations

import base64
import re
from dataclasses import dataclass, field
from html import escape
from typing import Union

#: Anchors are HTML ids and URL fragments: keep them to characters that need no escaping in either.
_ANCHOR = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
#: A cell that reads as a number (``41.3``, ``-0.2``, ``12%``, ``41.3 ± 0.4``, ``1e-3``): right-aligned.
_NUMBER = re.compile(r"[-+\u2212]?(\d[\d,]*(\.\d*)?|\.\d+)([eE][-+]?\d+)?\s*(%|±\s*\S+)?")
#: Cells that stand for a missing number and do not stop a column from being numeric.
_MISSING = {"", "—", "–", "-", "n/a", "nan"}


@dataclass(frozen=True)
class TableBlock:
    """A table; ``bold`` holds ``(row, col)`` cells (0-based, body rows) to mark as best values.
    ``numeric_cols`` right-aligns and sorts those columns as numbers; ``None`` detects them
    (every cell a number or a missing mark)."""
    caption: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    bold: frozenset[tuple[int, int]] = frozenset()
    numeric_cols: frozenset[int] | None = None

    def __post_init__(self):
        for i, row in enumerate(self.rows):
            if len(row) != len(self.header):
                raise ValueError(f"table {self.caption!r}: row {i} has {len(row)} cells, header {len(self.header)}")
        outside = sorted((r, c) for r, c in self.bold if not (0 <= r < len(self.rows) and 0 <= c < len(self.header)))
        if outside:
            raise ValueError(f"table {self.caption!r}: bold cells outside the table: {outside}")

    def numeric_columns(self) -> frozenset[int]:
        if self.numeric_cols is not None:
            return self.numeric_cols
        def numeric(col: int) -> bool:
            cells = [row[col].strip() for row in self.rows]
            values = [c for c in cells if c.lower() not in _MISSING]
            return bool(values) and all(_NUMBER.fullmatch(c) for c in values)
        return frozenset(c for c in range(len(self.header)) if numeric(c))


@dataclass(frozen=True)
class ImageBlock:
    """A PNG (e.g. a matplotlib figure's bytes), embedded as a data URI; the caption is its alt text."""
    caption: str
    png: bytes


@dataclass(frozen=True)
class TextBlock:
    """Prose (blank lines separate paragraphs), or, ``preformatted``, text kept verbatim (suite YAML)."""
    text: str
    preformatted: bool = False


@dataclass(frozen=True)
class KeyValueBlock:
    """A short list of labelled values (a manifest summary: commit, seed, hosts, wall time)."""
    caption: str
    items: tuple[tuple[str, str], ...]


Block = Union[TableBlock, ImageBlock, TextBlock, KeyValueBlock]


@dataclass(frozen=True)
class Section:
    """A titled part of the page, linked from the table of contents by ``anchor``."""
    title: str
    anchor: str
    blocks: tuple[Block, ...] = ()
    note: str = ""

    def __post_init__(self):
        if not _ANCHOR.fullmatch(self.anchor):
            raise ValueError(f"section {self.title!r}: anchor {self.anchor!r} must match {_ANCHOR.pattern}")


@dataclass(frozen=True)
class HtmlReport:
    """The whole page; ``banner`` is shown prominently above everything (e.g. "smoke run: not for comparison")."""
    title: str
    subtitle: str = ""
    banner: str = ""
    sections: tuple[Section, ...] = field(default_factory=tuple)


_STYLE = """
:root { color-scheme: light; --line: #d0d7de; --zebra: #f6f8fa; --head: #eaeef2; --accent: #0b5cad; }
body { font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       max-width: 72rem; margin: 0 auto; padding: 1.5rem; }
h1 { margin-bottom: .2rem; } .subtitle { color: #59636e; margin-top: 0; }
.banner { border: 2px solid #bf8700; background: #fff8c5; padding: .6rem 1rem; font-weight: 600; border-radius: 6px; }
nav.toc { border: 1px solid var(--line); border-radius: 6px; padding: .4rem 1rem; margin-top: 1rem;
          display: inline-block; }
nav.toc ol { margin: .3rem 0; padding-left: 1.4rem; } a { color: var(--accent); }
section { margin-top: 2rem; } .note, .empty { color: #59636e; } .empty { font-style: italic; }
.table-wrap { overflow: auto; max-height: 70vh; border: 1px solid var(--line); border-radius: 6px; margin: 1rem 0; }
table { border-collapse: collapse; font-variant-numeric: tabular-nums; min-width: 100%; }
caption { caption-side: top; text-align: left; font-weight: 600; padding: .4rem .6rem; }
th, td { padding: .3rem .6rem; border-bottom: 1px solid var(--line); white-space: nowrap; text-align: left; }
thead th { position: sticky; top: 0; background: var(--head); cursor: pointer; user-select: none; }
thead th[aria-sort="ascending"]::after { content: " \\25B2"; }
thead th[aria-sort="descending"]::after { content: " \\25BC"; }
tbody tr:nth-child(even) { background: var(--zebra); }
.num { text-align: right; } td.best { font-weight: 700; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid var(--line); }
figcaption { color: #59636e; font-size: .9em; }
pre { background: var(--zebra); border: 1px solid var(--line); border-radius: 6px; padding: .8rem; overflow-x: auto; }
dl.kv { display: grid; grid-template-columns: max-content 1fr; gap: .2rem 1rem; }
dl.kv dt { font-weight: 600; } dl.kv dd { margin: 0; overflow-wrap: anywhere; } .kv-caption { font-weight: 600; }
@media print {
  body { max-width: none; padding: 0; font-size: 11pt; } nav.toc { display: none; }
  .table-wrap { overflow: visible; max-height: none; border: none; } thead th { position: static; }
  thead { display: table-header-group; } tr, figure, pre { break-inside: avoid; } a { color: inherit; }
}
"""

#: Click a header to sort its table (numbers as numbers, missing values last); click again to reverse.
_SCRIPT = """
"use strict";
document.querySelectorAll("table.data thead th").forEach(function (th) {
  th.addEventListener("click", function () {
    var table = th.closest("table"), body = table.tBodies[0], col = th.cellIndex;
    var numeric = th.classList.contains("num"), up = th.getAttribute("aria-sort") !== "ascending";
    var key = function (tr) {
      var text = tr.cells[col] ? tr.cells[col].textContent.trim() : "";
      return numeric ? parseFloat(text.replace(/[,\\u2212]/g, function (c) { return c === "," ? "" : "-"; })) : text;
    };
    var rows = Array.prototype.slice.call(body.rows)
      .filter(function (tr) { return !tr.classList.contains("empty-row"); });
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      if (numeric) {
        if (isNaN(x) || isNaN(y)) { return isNaN(x) - isNaN(y); }
        return up ? x - y : y - x;
      }
      return up ? x.localeCompare(y) : y.localeCompare(x);
    });
    rows.forEach(function (tr) { body.appendChild(tr); });
    table.querySelectorAll("thead th").forEach(function (h) { h.removeAttribute("aria-sort"); });
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
  });
});
"""


def _table(block: TableBlock, table_id: str, anchor: str) -> str:
    numeric = block.numeric_columns()

    def cls(col: int, best: bool = False) -> str:
        names = ["num"] * (col in numeric) + ["best"] * best
        return f' class="{" ".join(names)}"' if names else ""

    def cell(r: int, c: int, text: str) -> str:
        best = (r, c) in block.bold
        return f"<td{cls(c, best)}>" + (f"<strong>{escape(text)}</strong>" if best else escape(text)) + "</td>"

    head = "".join(f'<th scope="col"{cls(c)}>{escape(h)}</th>' for c, h in enumerate(block.header))
    body = "".join("<tr>" + "".join(cell(r, c, v) for c, v in enumerate(row)) + "</tr>"
                   for r, row in enumerate(block.rows))
    if not block.rows:
        body = f'<tr class="empty-row"><td class="empty" colspan="{max(len(block.header), 1)}">No rows.</td></tr>'
    caption = f"<caption>{escape(block.caption)}</caption>" if block.caption else ""
    return (f'<div class="table-wrap"><table class="data" id="{table_id}" data-section="{anchor}">{caption}'
            f"<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>")


def _block(block: Block, block_id: str, anchor: str) -> str:
    if isinstance(block, TableBlock):
        return _table(block, block_id, anchor)
    if isinstance(block, ImageBlock):
        alt = escape(block.caption or f"figure {block_id}")
        src = "data:image/png;base64," + base64.b64encode(block.png).decode("ascii")
        caption = f"<figcaption>{escape(block.caption)}</figcaption>" if block.caption else ""
        return f'<figure id="{block_id}" data-section="{anchor}"><img src="{src}" alt="{alt}">{caption}</figure>'
    if isinstance(block, TextBlock):
        if block.preformatted:
            return f'<pre id="{block_id}">{escape(block.text)}</pre>'
        paragraphs = [p.strip() for p in re.split(r"\n\s*\n", block.text) if p.strip()]
        return "".join(f"<p>{escape(p)}</p>" for p in paragraphs)
    if isinstance(block, KeyValueBlock):
        caption = f'<p class="kv-caption">{escape(block.caption)}</p>' if block.caption else ""
        items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in block.items)
        return f'<div id="{block_id}" data-section="{anchor}">{caption}<dl class="kv">{items}</dl></div>'
    raise TypeError(f"not a report block: {type(block).__name__}")


def _section(section: Section) -> str:
    kinds = {TableBlock: "table", ImageBlock: "figure", TextBlock: "text", KeyValueBlock: "kv"}
    counts: dict[str, int] = {}
    parts = []
    for block in section.blocks:
        kind = kinds.get(type(block), "block")
        counts[kind] = counts.get(kind, 0) + 1
        parts.append(_block(block, f"{section.anchor}-{kind}-{counts[kind]}", section.anchor))
    note = f'<p class="note">{escape(section.note)}</p>' if section.note else ""
    body = "".join(parts) or '<p class="empty">Nothing to show in this section.</p>'
    return f'<section id="{section.anchor}"><h2>{escape(section.title)}</h2>{note}{body}</section>'


def render_html_report(report: HtmlReport) -> str:
    """The report as one HTML5 document that references nothing outside itself."""
    seen: set[str] = set()
    for s in report.sections:
        if s.anchor in seen:
            raise ValueError(f"two sections share the anchor {s.anchor!r}: the contents would link to one")
        seen.add(s.anchor)
    toc = "".join(f'<li><a href="#{s.anchor}">{escape(s.title)}</a></li>' for s in report.sections)
    toc = f'<nav class="toc" aria-label="Contents"><strong>Contents</strong><ol>{toc}</ol></nav>' if toc else ""
    subtitle = f'<p class="subtitle">{escape(report.subtitle)}</p>' if report.subtitle else ""
    banner = f'<div class="banner" role="alert">{escape(report.banner)}</div>' if report.banner else ""
    sections = "\n".join(_section(s) for s in report.sections)
    # The empty data: icon stops browsers from asking for /favicon.ico, a fetch outside the file.
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">\n'
            f'<title>{escape(report.title)}</title>\n<link rel="icon" href="data:,">\n'
            f"<style>{_STYLE}</style>\n</head>\n<body>\n<header><h1>{escape(report.title)}</h1>{subtitle}</header>\n"
            f"{banner}\n{toc}\n<main>\n{sections}\n</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")
