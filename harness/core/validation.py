"""Validation messages that name the key path, the value as written and the closest valid key.

Shared by every pydantic model a user writes in a suite: the suite schema
(:mod:`harness.config`), a method's or a neck's own ``Config``.
"""
from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ValidationError

from harness.core.errors import ConfigError

#: pydantic error type of a name not in a plugin registry (its message already quotes the value).
UNKNOWN_PLUGIN = "unknown_plugin"


def suggest(word: str, options) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``options``, or ``""``."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.5)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _model_at(model: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the field at ``loc`` (to list its valid keys)."""
    cur: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(cur, "model_fields", None)
        if not fields or part not in fields:
            return None
        ann = fields[part].annotation
        cur = next((a for a in getattr(ann, "__args__", (ann,)) + (ann,)
                    if isinstance(a, type) and issubclass(a, BaseModel)), None)
        for a in getattr(ann, "__args__", ()):
            for b in getattr(a, "__args__", ()):
                if isinstance(b, type) and issubclass(b, BaseModel):
                    cur = b
        if cur is None:
            return None
    return cur


def format_validation_error(err: ValidationError, file: str, model: type[BaseModel],
                            prefix: tuple = ()) -> ConfigError:
    e = err.errors()[0]
    loc = prefix + tuple(e["loc"])
    path = ".".join(str(p) if not isinstance(p, int) else f"[{p}]" for p in loc).replace(".[", "[")
    msg = e["msg"]
    if e["type"] == "extra_forbidden":
        owner = _model_at(model, tuple(e["loc"]))
        valid = list(owner.model_fields) if owner else []
        msg = f"unknown key '{loc[-1]}'{suggest(loc[-1], valid)}"
        if valid:
            msg += f"; valid keys: {', '.join(valid)}"
    elif e["type"] == "literal_error":
        msg = f"{msg}, got {e['input']!r}"
        expected = e.get("ctx", {}).get("expected", "")
        options = [o.strip(" '") for o in expected.replace(" or ", ",").split(",") if o.strip()]
        msg += suggest(e["input"], options)
    elif (isinstance(e.get("input"), (int, float, str, bool)) and e["type"] not in ("missing", UNKNOWN_PLUGIN)
          and f"got {e['input']!r}" not in msg):
        msg = f"{msg}, got {e['input']!r}"  # the value as the user wrote it
    more = len(err.errors()) - 1
    if more:
        msg += f" (and {more} more problem{'s' if more > 1 else ''})"
    return ConfigError(msg, file=file, field=path or None)

