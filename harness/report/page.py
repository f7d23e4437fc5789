"""``report.html`` of a run: the tables and plots :mod:`harness.report.outputs` built, as one page.

Only assembly: which table or plot goes in which section, and the suite and manifest
summary; rendering is :mod:`harness.report.html`'s. The page is self-contained
(inline styles, PNGs as data URIs), so a run's report can be mailed or archived alone.
"""
from __future__ import annotations

import json

from harness.report.html import HtmlReport, ImageBlock, KeyValueBlock, Section, TextBlock, render_html_report
from harness.report.tables import html_block

#: table name prefix -> (section title, anchor); the order of the page.
_SECTIONS = (("gains", "Gains over baselines", "gains"), ("robustness", "Robustness", "robustness"),
             ("per_class", "Per-class AP", "per-class"), ("errors", "Error breakdown", "errors"),
             ("cost", "Cost", "cost"), ("seeds", "Seeds", "seeds"))


def _images(plots: dict[str, bytes], prefix: str) -> tuple:
    return tuple(ImageBlock(name.rsplit(".", 1)[0].replace("_", " "), png)
                 for name, png in sorted(plots.items()) if name.startswith(prefix))


def _summary(storage, settings) -> tuple:
    m = settings.manifest
    versions = m.get("versions", {})
    items = [("run directory", storage.display()), ("suite", str(m.get("suite", {}).get("name", ""))),
             ("started (UTC)", str(m.get("started", ""))), ("git SHA", str(m.get("git_sha", "")) or "—"),
             ("cells", str(len(m.get("cells", [])))), ("seeds", ", ".join(map(str, m.get("seeds", [])))),
             ("cluster nodes", str(len((m.get("cluster") or {}).get("nodes", [])))),
             ("matches requirements.lock", {True: "yes", False: "no", None: "—"}[(m.get("lock") or {}).get("matches")])]
    items += [(f"version: {k}", str(versions[k])) for k in ("torch", "torchvision", "ray", "optuna",
                                                           "faster-coco-eval", "pycocotools") if k in versions]
    blocks = [KeyValueBlock("Run", tuple(items))]
    try:
        blocks.append(TextBlock(storage.read_text("suite.yaml"), preformatted=True))
    except FileNotFoundError:
        if m.get("suite"):
            blocks.append(TextBlock(json.dumps(m["suite"], indent=2, default=str), preformatted=True))
    return tuple(blocks)


def run_report(storage, settings, board, tables, plots: dict[str, bytes], notes: list[str], smoke: bool) -> str:
    from harness.report.leaderboard import SMOKE_BANNER, leaderboard_table
    lead = leaderboard_table(board)
    legend = next((t.note for t in tables if t.name == "gains"), "")
    sections = [Section("Leaderboard", "leaderboard", (html_block(lead),) if lead.rows else (),
                        note=" ".join([legend] * bool(legend) + [f"Note: {n}" for n in notes]))]
    for prefix, title, anchor in _SECTIONS:
        blocks = tuple(html_block(t) for t in tables if t.name.startswith(prefix))
        note = " ".join(t.note for t in tables if t.name.startswith(prefix) and t.note and prefix != "gains")
        if prefix == "robustness":
            blocks += _images(plots, "ap_vs_severity")
        if prefix == "cost":
            blocks += _images(plots, "pareto")
        if blocks or prefix not in ("gains", "robustness"):
            sections.append(Section(title, anchor, blocks, note=note))
    sections.append(Section("Training curves", "curves", _images(plots, "learning_curves") + _images(plots, "curve_")))
    sections.append(Section("Suite and manifest", "manifest", _summary(storage, settings)))
    name = settings.manifest.get("suite", {}).get("name", "") or storage.display()
    return render_html_report(HtmlReport(title=f"detbench report: {name}", subtitle=storage.display(),
                                         banner=SMOKE_BANNER if smoke else "", sections=tuple(sections)))


__all__ = ["run_report"]
