"""The tests' headless browser: Debian's chromium driven by selenium, and what a loaded page shows.

Debian's ``chromium`` and ``chromium-driver`` packages (``.ci/install-browser``, run by ``make
test``) rather than selenium-manager's or playwright's downloads, which our machines cannot reach:
the driver is named by path, so selenium never looks for one to download. Without them the
browser tests skip, naming the packages and the script. The browser is told not to talk to the
network on its own (no sync, component updates or background fetches), so a test that finds no
external references on a page also saw no traffic the page did not ask for.
"""
from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

CHROMIUM_ARGS = ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync")

#: Everything a page loaded, after ``load``: images that failed to decode, and every src/href that
#: leaves the file (``http://``, ``https://``, protocol-relative ``//``).
_PAGE_FACTS_JS = """
var external = /^\\s*(https?:)?\\/\\//i, refs = [];
document.querySelectorAll("[src], [href]").forEach(function (el) {
  ["src", "href"].forEach(function (name) {
    var value = el.getAttribute(name);
    if (value !== null && external.test(value)) { refs.push(el.tagName.toLowerCase() + " " + name + "=" + value); }
  });
});
var images = Array.prototype.slice.call(document.images);
return {
  tables: document.querySelectorAll("table").length,
  images: images.length,
  broken: images.filter(function (img) { return img.complete && img.naturalWidth === 0; })
                .map(function (img) { return img.alt || img.getAttribute("src").slice(0, 60); }),
  external: refs,
  title: document.title
};
"""


@dataclass
class PageReport:
    """What the browser saw on one page: its console errors (SEVERE log entries: script errors,
    failed loads), how many tables and images it has, the alt texts of images that did not
    decode, and the references that point outside the file (empty for a self-contained page)."""
    console_errors: list[str]
    tables: int
    images: int
    broken_images: list[str]
    external_refs: list[str]
    title: str


@contextmanager
def open_browser(*, page_load_timeout_s: float = 30) -> Iterator["object"]:
    """A headless chromium webdriver with a fresh profile and the console log readable via
    ``driver.get_log("browser")``; skips the test when chromium or its driver is not installed."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.skip(f"no headless browser: {', '.join(missing)} missing; install Debian's chromium and "
                    "chromium-driver packages (as root: bash .ci/install-browser, which make test runs)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with tempfile.TemporaryDirectory(prefix="detbench-chromium-") as profile:
        options = webdriver.ChromeOptions()
        options.binary_location = str(CHROMIUM)
        for arg in (*CHROMIUM_ARGS, f"--user-data-dir={profile}"):
            options.add_argument(arg)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
        try:
            driver.set_page_load_timeout(page_load_timeout_s)
            yield driver
        finally:
            driver.quit()


def inspect_page(driver, path: str | Path) -> PageReport:
    """Load ``path`` as a ``file://`` URL, wait for its ``load`` event (every image decoded or
    failed), and report what it shows. The browser log is drained first so the report holds only
    this page's console messages."""
    driver.get_log("browser")
    driver.get(Path(path).resolve().as_uri())  # returns once document.readyState is "complete"
    facts = driver.execute_script(_PAGE_FACTS_JS)
    errors = [entry["message"] for entry in driver.get_log("browser") if entry.get("level") == "SEVERE"]
    return PageReport(console_errors=errors, tables=int(facts["tables"]), images=int(facts["images"]),
                      broken_images=list(facts["broken"]), external_refs=list(facts["external"]),
                      title=str(facts["title"]))
