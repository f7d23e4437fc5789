"""Registries: name -> plugin, filled from Python entry points.

Each kind of plugin has its registry beside the code that builds it: methods
(:data:`harness.plugin.METHODS`, entry points ``detbench.methods``), backbones,
necks and detector archs (:mod:`harness.modeling`). Plugins are published under
their entry-point group (the built-in ones are declared in this project's
``pyproject.toml`` exactly like a third-party package would); the harness never
imports a plugin module by name, it asks the registry, which loads entry points
on first use. ``register`` exists for tests and notebooks that define a plugin inline.
"""
from __future__ import annotations

import difflib
import logging
from importlib.metadata import entry_points
from typing import Generic, TypeVar

from harness.core.errors import ConfigError

log = logging.getLogger(__name__)
T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, group: str | None = None):
        self.kind, self.group = kind, group
        self._items: dict[str, T] = {}
        self._loaded = group is None

    def register(self, name: str, obj: T, *, replace: bool = False) -> T:
        if name in self._items and self._items[name] is not obj and not replace:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def unregister(self, name: str) -> None:
        self._items.pop(name, None)

    def _load_entry_points(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue
            try:
                self._items[ep.name] = ep.load()
            except Exception as exc:  # a broken third-party plugin must not break the others
                log.warning("cannot load %s plugin %r from %s: %s", self.kind, ep.name, ep.value, exc)

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._items)

    def get(self, name: str, *, file: str | None = None, field: str | None = None) -> T:
        self._load_entry_points()
        if name not in self._items:
            close = difflib.get_close_matches(name, self._items, n=1, cutoff=0.5)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(f"unknown {self.kind} '{name}'{hint}; available: {', '.join(self.names())}",
                              file=file, field=field)
        return self._items[name]

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._items

