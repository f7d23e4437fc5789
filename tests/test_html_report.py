"""The self-contained HTML report: escaped, linked and offline as text, and, in a real headless
browser, free of console errors, broken images and references outside the file. A negative control
shows the browser check catches a broken image and a script error."""
from __future__ import annotations

import io
import re

import pytest
from browserkit import inspect_page, open_browser

from harness.report.html import (HtmlReport, ImageBlock, KeyValueBlock, Section, TableBlock, TextBlock,
                                 render_html_report)

NASTY = '<b>&"'  # a cell that must come out as text, not markup


def png_plot(title: str, ys: list[float]) -> bytes:
    """A small real matplotlib figure (Agg, no pyplot state) as PNG bytes."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3, 2), dpi=60)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(range(len(ys)), ys, marker="o")
    ax.set_title(title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


@pytest.fixture(scope="module")
def report() -> HtmlReport:
    leaderboard = TableBlock(
        caption="Leaderboard (AP, %)",
        header=("method", "dataset", "AP", "AP50"),
        rows=(("focal", "coco-mini", "31.2", "52.0"),
              ("umop", "coco-mini", "33.4", "51.1"),
              (NASTY, "coco-mini", "—", "49.9")),
        bold=frozenset({(1, 2), (0, 3)}))
    robustness = TableBlock(
        caption="Robustness: P / mPC / rPC",
        header=("method", "P", "mPC", "rPC", "note"),
        rows=(("focal", "31.2", "18.0", "57.7%", "ok"), ("umop", "33.4", "20.1", "60.2%", NASTY)))
    return HtmlReport(
        title=f"detbench report {NASTY}",
        subtitle="suite smoke.yaml, 2 methods x 1 dataset",
        banner="Smoke run: tiny data and schedules; not for comparison",
        sections=(
            Section("Leaderboard", "leaderboard", (leaderboard,), note="Bold: best per column."),
            Section("Robustness", "robustness", (
                robustness,
                ImageBlock("AP vs severity: gaussian_noise", png_plot("gaussian_noise", [31, 25, 20, 14, 9])),
                ImageBlock(f"UMOP gamma_ad per level {NASTY}", png_plot("gamma_ad", [2.0, 1.7, 1.5])))),
            Section("Suite", "suite", (TextBlock("methods:\n  - focal\n  - umop  # <not a tag>\n", preformatted=True),
                                       TextBlock("First paragraph.\n\nSecond & last."))),
            Section("Manifest", "manifest", (KeyValueBlock("Run", (("commit", "907b035"), ("seed", "0"),
                                                                   ("host", f"node-1 {NASTY}"))),)),
            Section("Failures", "failures"),
        ))


@pytest.fixture(scope="module")
def html(report) -> str:
    return render_html_report(report)


def test_page_references_nothing_outside_itself(html):
    assert html.startswith("<!DOCTYPE html>")
    assert not re.search(r"https?:", html, re.I)
    assert not re.search(r"""(src|href)\s*=\s*["']?//""", html, re.I)
    assert "<link rel=\"stylesheet\"" not in html and "<script src" not in html
    assert html.count('src="data:image/png;base64,') == 2


def test_every_text_is_escaped(html):
    assert NASTY not in html
    assert "&lt;b&gt;&amp;&quot;" in html
    assert "&lt;not a tag&gt;" in html and "Second &amp; last." in html
    assert "<title>detbench report &lt;b&gt;&amp;&quot;</title>" in html
    assert 'alt="UMOP gamma_ad per level &lt;b&gt;&amp;&quot;"' in html


def test_every_section_is_anchored_and_listed_in_the_contents(report, html):
    for section in report.sections:
        assert f'<section id="{section.anchor}">' in html
        assert f'<a href="#{section.anchor}">' in html
    assert html.count("<table") == 2
    assert 'id="leaderboard-table-1" data-section="leaderboard"' in html
    assert 'id="robustness-table-1" data-section="robustness"' in html
    assert "Smoke run: tiny data" in html.split("<main>")[0]


def test_best_cells_bold_and_numbers_right_aligned(html):
    assert '<td class="num best"><strong>33.4</strong></td>' in html
    assert '<td class="num best"><strong>52.0</strong></td>' in html
    assert '<td class="num">31.2</td>' in html and '<td class="num">—</td>' in html  # "—" keeps AP numeric
    assert '<th scope="col" class="num">rPC</th>' in html  # "57.7%" reads as a number
    assert "<td>focal</td>" in html and '<th scope="col">note</th>' in html


def test_empty_section_and_empty_table_say_so(html):
    failures = html.split('<section id="failures">')[1].split("</section>")[0]
    assert "Nothing to show in this section." in failures
    no_rows = Section("S", "s", (TableBlock("none yet", ("a", "b"), ()),))
    empty = render_html_report(HtmlReport("t", sections=(no_rows,)))
    assert '<td class="empty" colspan="2">No rows.</td>' in empty


def test_numeric_columns_can_be_named():
    table = TableBlock("t", ("run", "AP"), (("7", "31.0"), ("12", "n/a")), numeric_cols=frozenset({1}))
    assert table.numeric_columns() == {1}
    assert TableBlock("t", ("run", "AP"), table.rows).numeric_columns() == {0, 1}


def test_records_refuse_what_would_render_wrong():
    with pytest.raises(ValueError, match="row 0 has 1 cells"):
        TableBlock("t", ("a", "b"), (("1",),))
    with pytest.raises(ValueError, match="outside the table"):
        TableBlock("t", ("a",), (("1",),), bold=frozenset({(0, 1)}))
    with pytest.raises(ValueError, match="anchor"):
        Section("Bad", 'x" onclick="alert(1)')
    with pytest.raises(ValueError, match="share the anchor"):
        render_html_report(HtmlReport("t", sections=(Section("A", "a"), Section("B", "a"))))


@pytest.fixture(scope="module")
def browser():
    with open_browser() as driver:
        yield driver


def test_page_in_a_headless_browser(browser, html, tmp_path):
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    seen = inspect_page(browser, page)
    assert seen.console_errors == []
    assert (seen.tables, seen.images) == (2, 2)
    assert seen.broken_images == []
    assert seen.external_refs == []
    assert seen.title == f"detbench report {NASTY}"


def test_header_click_sorts_numerically(browser, html, tmp_path):
    from selenium.webdriver.common.by import By
    page = tmp_path / "report.html"
    page.write_text(html, encoding="utf-8")
    inspect_page(browser, page)
    table = browser.find_element(By.ID, "leaderboard-table-1")
    ap = table.find_elements(By.CSS_SELECTOR, "thead th")[2]

    def column() -> list[str]:
        return [tr.find_elements(By.TAG_NAME, "td")[2].text for tr in table.find_elements(By.CSS_SELECTOR, "tbody tr")]

    ap.click()
    assert column() == ["31.2", "33.4", "—"]  # missing last
    ap.click()
    assert column() == ["33.4", "31.2", "—"]
    assert ap.get_attribute("aria-sort") == "descending"
    assert [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"] == []


def test_browser_check_catches_a_broken_page(browser, tmp_path):
    page = tmp_path / "broken.html"
    page.write_text('<!DOCTYPE html><html><head><title>broken</title></head><body>'
                    '<img src="data:image/png;base64,AAAA" alt="truncated png">'
                    '<a href="https://example.invalid/x">out</a>'
                    "<script>undefined_fn()</script></body></html>", encoding="utf-8")
    seen = inspect_page(browser, page)
    assert seen.broken_images == ["truncated png"]
    assert any("undefined_fn" in e for e in seen.console_errors), seen.console_errors
    assert seen.external_refs == ["a href=https://example.invalid/x"]
    assert (seen.tables, seen.images, seen.title) == (0, 1, "broken")
