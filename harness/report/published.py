"""Published reference numbers (``suites/published.csv``) and their lookup.

The file holds one reference number per row: what a paper, a method's released code or
torchvision's model zoo reports for a method on a dataset, with the citation it comes from
(docs/published.md). Columns, in this order::

    key, method, dataset, detector, schedule, metric, value, source

* ``key`` -- unique, short and stable: a suite refers to the row by it.
* ``method`` -- the detbench method name or leaderboard label where one exists
  (``focal``, ``retinanet_r50_fpn_v1``, ...), else the paper's own name (``SoCo*``).
* ``dataset``, ``detector``, ``schedule`` (may be empty when the source does not state it).
* ``metric`` -- the name of the leaderboard metric it compares with (``AP``, ``AP50``,
  ``AP_maxdets100``, ``P`` / ``mPC`` / ``rPC`` for COCO-C, ...).
* ``value`` -- a finite number, in percent as papers print it (rPC too).
* ``source`` -- the citation (paper and table, repository file, or torchvision weights enum);
  never empty: a number without a source is not a reference.

How the leaderboard uses it: a suite method may name a row, ::

    methods:
      - name: focal
        label: retinanet_r50_fpn_v1
        published: tv_retinanet_r50_fpn_v1

(``MethodSpec.published``). The leaderboard then shows, beside the measured value of that
row's ``metric`` (the mean over seeds), the published value and the difference
measured - published, in points: :func:`published_for` gives the reference for one method's
key and one metric column, or ``None`` where the row is about another metric. Smoke runs
never show a published column: their tiny synthetic settings are not comparable with
any published number (the leaderboard's smoke banner says so), and a difference would
only invite a wrong reading.

Errors: everything wrong with the file (a missing or extra column, an empty key or source,
a value that is not a finite number, a duplicate key, a row with too many or too few
cells, a file that is not UTF-8) is a :class:`~harness.core.errors.ConfigError` naming the
file, the row (1-based data row and its line in the file) and the field.
"""
from __future__ import annotations

import csv
import difflib
import io
import math
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from harness.core import ConfigError

#: The packaged reference file.
DEFAULT = Path(__file__).resolve().parents[2] / "suites" / "published.csv"

#: The columns, in the order the file has them.
COLUMNS = ("key", "method", "dataset", "detector", "schedule", "metric", "value", "source")
#: Columns that may be empty (a source that does not state the schedule).
OPTIONAL = frozenset({"schedule"})


class PublishedRef(BaseModel):
    """One published reference number: a row of ``suites/published.csv``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str
    method: str
    dataset: str
    detector: str
    schedule: str
    metric: str
    value: float  # percent, as printed in the source
    source: str


def load_published(path: str | Path = DEFAULT) -> dict[str, PublishedRef]:
    """Every row of a published-numbers CSV (UTF-8), by key, in file order.

    Raises :class:`ConfigError` naming the file, the row and the field for any bad input.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")  # a BOM (spreadsheet export) is not part of the header
    except FileNotFoundError:
        raise ConfigError("no such file", file=path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text (byte {e.start})", file=path) from None
    except OSError as e:
        raise ConfigError(f"cannot be read: {e.strerror or e}", file=path) from None

    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None:
            raise ConfigError(f"empty file; the header must be {','.join(COLUMNS)}", file=path,
                              record="line 1")
        _check_header([h.strip() for h in header], path)
        refs: dict[str, PublishedRef] = {}
        first_row: dict[str, int] = {}
        n = 0  # data rows, 1-based; blank lines are not rows (the line number in the message is exact)
        for cells in reader:
            if not cells or all(not c.strip() for c in cells):
                continue
            n += 1
            where = f"row {n} (line {reader.line_num})"
            if len(cells) != len(COLUMNS):
                raise ConfigError(f"{len(cells)} cells, the header has {len(COLUMNS)} "
                                  "(quote a cell that contains a comma)", file=path, record=where)
            row = dict(zip(COLUMNS, (c.strip() for c in cells)))
            for col in COLUMNS:
                if not row[col] and col not in OPTIONAL:
                    hint = " (every reference needs its citation)" if col == "source" else ""
                    raise ConfigError(f"empty{hint}", file=path, record=where, field=col)
            key = row["key"]
            if any(ch.isspace() for ch in key):
                raise ConfigError(f"a key has no whitespace, got {key!r}", file=path, record=where, field="key")
            if key in refs:
                raise ConfigError(f"duplicate key {key!r} (first in row {first_row[key]})", file=path,
                                  record=where, field="key")
            try:
                value = float(row["value"])
            except ValueError:
                raise ConfigError(f"not a number, got {row['value']!r}", file=path, record=where,
                                  field="value") from None
            if not math.isfinite(value):
                raise ConfigError(f"not a finite number, got {row['value']!r}", file=path, record=where,
                                  field="value")
            refs[key] = PublishedRef(**{**row, "value": value})
            first_row[key] = n
    except csv.Error as e:
        raise ConfigError(f"malformed CSV: {e}", file=path, record=f"line {reader.line_num}") from None
    return refs


def _check_header(header: list[str], path: Path) -> None:
    expected = ",".join(COLUMNS)
    seen = set()
    for name in header:
        if name in seen:
            raise ConfigError(f"duplicate column in the header; it must be {expected}", file=path,
                              record="header (line 1)", field=name)
        seen.add(name)
    missing = [c for c in COLUMNS if c not in seen]
    if missing:
        raise ConfigError(f"missing column(s) {', '.join(missing)} in the header; it must be {expected}",
                          file=path, record="header (line 1)", field=missing[0])
    extra = [h for h in header if h not in COLUMNS]
    if extra:
        raise ConfigError(f"unknown column(s) {', '.join(repr(h) for h in extra)} in the header; "
                          f"it must be {expected}", file=path, record="header (line 1)", field=extra[0])
    if tuple(header) != COLUMNS:
        raise ConfigError(f"columns out of order; the header must be {expected}", file=path,
                          record="header (line 1)")


def published_for(key: str, refs: dict[str, PublishedRef] | None = None,
                  metric: str | None = None) -> PublishedRef | None:
    """The reference a suite's ``published: KEY`` names, for one leaderboard metric column.

    ``refs`` defaults to the packaged file. ``metric`` given: ``None`` unless the row is
    about that metric (the leaderboard asks per column and shows the published value only
    in the column it compares with). An unknown key is a :class:`ConfigError` on the
    suite's ``published`` field, with the closest known key.
    """
    refs = load_published() if refs is None else refs
    ref = refs.get(key)
    if ref is None:
        close = difflib.get_close_matches(str(key), list(refs), n=1, cutoff=0.5)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ConfigError(f"no published reference with key {key!r}{hint}; the keys are in "
                          "suites/published.csv", field="published")
    if metric is not None and ref.metric != metric:
        return None
    return ref
