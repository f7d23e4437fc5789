"""Row labels: how a method and its variant are named in results rows and leaderboards.

The one place that builds and parses them (``entry[variant]``, and ``entry[variant] (stage)``
for an earlier stage's row): the leaderboard, the robustness tables, the golden check and
the suite's own labels all go through these functions.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from harness.config.schema import MethodSpec


def row_label(method: str, variant) -> str:
    """The method label of a results row: ``method[variant]``, or ``method`` without a variant.

    The one definition of the format (leaderboard, robustness tables, suite labels)."""
    return f"{method}[{variant}]" if variant else method


def method_label(m: MethodSpec) -> str:
    """The leaderboard label of a suite's method: its ``label``, else :func:`row_label` of name and variant."""
    if m.label:
        return m.label
    return row_label(m.name, m.config.get("variant"))




def label_variant(label: str, method: str) -> str:
    """The results rows' ``variant`` of a suite label: what follows the method name (brackets
    dropped), or the whole label when it does not start with the method's name."""
    return label[len(method):].strip("[]") if label.startswith(method) else label


def stage_label(label: str, stage: str) -> str:
    """The label of an earlier stage's row (a teacher, an ideal model): ``label (stage)``."""
    return f"{label} ({stage})"


@dataclass(frozen=True)
class RowLabel:
    """A label taken apart: ``entry[variant] (stage)``; ``variant`` / ``stage`` empty when absent."""
    entry: str
    variant: str = ""
    stage: str = ""


_LABEL = re.compile(r"^(?P<entry>[^\[(]*?)(?:\[(?P<variant>.*)\])?(?: \((?P<stage>[^)]*)\))?$")


def parse_label(label: str) -> RowLabel:
    """The inverse of :func:`row_label` / :func:`stage_label` (searched rows "fctl[lambda_fs=1.25]"
    belong to entry "fctl"). A free-form suite ``label`` without brackets is its own entry."""
    m = _LABEL.match(label)
    if m is None:  # brackets inside a free-form label: the part before the first " (" is the row
        head, _, stage = label.partition(" (")
        return RowLabel(head.split("[")[0], "", stage.rstrip(")"))
    return RowLabel(m["entry"].strip(), m["variant"] or "", m["stage"] or "")
