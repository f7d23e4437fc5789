"""Evaluation conditions: ``clean`` or one corruption at a severity, and suite lists of them.

A suite's ``conditions:`` (and FCTL's ``train_conditions``) are names, groups,
``NAME@S`` labels or mappings; this module turns them into de-duplicated
:class:`Condition` s, with errors that name the offending field.  It is a
module of its own because it needs only the names and groups of
:mod:`harness.data.corruptions`, not their code, while the render cache and
FCTL twins key everything by :class:`Condition`.
"""
from __future__ import annotations

from dataclasses import dataclass

from harness.core import ConfigError
from harness.data.corruptions import CORRUPTIONS, GROUPS, SEVERITIES, _unknown


@dataclass(frozen=True, order=True)
class Condition:
    """One evaluation condition: ``Condition("clean", 0)`` or a corruption at 1-5."""
    name: str
    severity: int

    @property
    def label(self) -> str:
        return "clean" if self.name == "clean" else f"{self.name}@{self.severity}"

    @property
    def is_clean(self) -> bool:
        return self.name == "clean"

    @classmethod
    def parse(cls, label: str) -> "Condition":
        """Inverse of :attr:`label`: ``"clean"`` or ``"fog@3"``."""
        items = expand_conditions([label])
        if len(items) != 1:
            raise ConfigError(f"{label!r} is not a single condition (use NAME@SEVERITY)")
        return items[0]


CLEAN = Condition("clean", 0)


def _severities(value, field: str) -> list[int]:
    vals = value if isinstance(value, (list, tuple)) else [value]
    if not vals:
        raise ConfigError("empty severity list", field=field)
    for k, s in enumerate(vals):
        f = f"{field}[{k}]" if isinstance(value, (list, tuple)) else field
        if not isinstance(s, int) or isinstance(s, bool) or s not in SEVERITIES:
            raise ConfigError(f"severity must be an integer 1-5, got {s!r}", field=f)
    return list(vals)


def expand_conditions(items, *, field: str = "conditions") -> list[Condition]:
    """Expand a suite's ``conditions:`` list into de-duplicated :class:`Condition` s.

    Accepted items (first occurrence order is kept):

    * ``"clean"``
    * a group name (``"coco-c"``, ``"coco-c-extra"``, ``"weather"``, ``"noise"``,
      ``"blur"``, ``"digital"``, ``"all"``): every member at severities 1-5
    * a corruption name (``"fog"``): severities 1-5; or a label ``"fog@3"``
    * ``{corruption: NAME, severity: S | [S, ...]}`` (severity defaults to 1-5)
    * ``{group: NAME, severity: S | [S, ...]}``

    Unknown names raise :class:`ConfigError` suggesting the closest known one;
    a severity outside 1-5 names the field, e.g. ``conditions[2].severity``.
    """
    if isinstance(items, (str, dict)):
        items = [items]
    out: dict[Condition, None] = {}
    names = list(CORRUPTIONS) + list(GROUPS) + ["clean"]
    for k, item in enumerate(items):
        f = f"{field}[{k}]"
        sev = list(SEVERITIES)
        if isinstance(item, str):
            key = item.strip()
            if "@" in key:
                key, _, s = key.partition("@")
                try:
                    sev = _severities(int(s), f)
                except ValueError:
                    raise ConfigError(f"bad severity in {item!r} (use NAME@1..5)", field=f) from None
            kind = "group" if key in GROUPS else "corruption"
        elif isinstance(item, dict):
            extra = set(item) - {"corruption", "group", "severity"}
            if extra or ("corruption" in item) == ("group" in item):
                raise ConfigError("a condition mapping needs exactly one of 'corruption' or "
                                  "'group' and optionally 'severity'"
                                  + (f" (unexpected keys: {sorted(extra)})" if extra else ""),
                                  field=f)
            kind = "group" if "group" in item else "corruption"
            key = item[kind]
            if not isinstance(key, str):
                raise ConfigError(f"must be a string, got {key!r}", field=f"{f}.{kind}")
            if "severity" in item:
                sev = _severities(item["severity"], f"{f}.severity")
        else:
            raise ConfigError(f"a condition is a name or a mapping, got {item!r}", field=f)
        if key == "clean":
            if (isinstance(item, dict) and "severity" in item) or "@" in str(item):
                raise ConfigError("'clean' takes no severity", field=f)
            out[CLEAN] = None
            continue
        if kind == "group":
            if key not in GROUPS:
                raise _unknown("group", key, list(GROUPS), f"{f}.group")
            members = GROUPS[key]
        else:
            if key not in CORRUPTIONS:
                raise _unknown("corruption or group", key, names,
                               f"{f}.corruption" if isinstance(item, dict) else f)
            members = (key,)
        for name in members:
            for s in sev:
                out[Condition(name, s)] = None
    return list(out)
