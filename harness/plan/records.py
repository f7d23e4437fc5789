"""Typed records that cross module boundaries: a run, a cell, a stage's output.

Why records and not dicts: a cell is built in :mod:`harness.plan.cells`, travels through
Tune to a trial (:mod:`harness.sweep.trial`), is resumed from ``run.json``
(:mod:`harness.app.runner`) and is read by :mod:`harness.app.status` and
:mod:`harness.plan.estimate`; with one frozen record every reader sees the same named,
typed fields, and a misspelt key is an ``AttributeError`` at the writer, not a
``KeyError`` three modules later.

They become plain JSON-able dicts only at the two edges where that is required:
the Ray boundary (a Tune ``param_space`` / Train ``train_loop_config``) and the
run directory (``run.json``, artifact manifests). ``to_dict`` / ``from_dict`` are
each other's inverse, and ``Cell.to_dict`` keeps the layout ``run.json`` has
always had, so earlier runs resume and keep their config hashes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from functools import cached_property
from typing import Any

from harness.config import DetectorSpec, ResourcesSpec, ScheduleSpec, SearchSpec
from harness.data import PreparedCondition, PreparedDataset


@dataclass(frozen=True)
class RunInfo:
    """What every trial of a run needs to know about the run (``run.json``'s ``run``)."""
    run_dir: str
    run_id: str
    suite: str
    smoke: bool
    resources: ResourcesSpec
    versions_json: str
    git_sha: str
    artifacts_dir: str | None = None   # stage outputs shared with other runs (default run_dir/artifacts)
    #: ``endpoint_url`` / ``region`` of an object-store run directory (no credentials, ever).
    storage_options: dict | None = None

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["resources"] = self.resources.model_dump()
        for optional in ("artifacts_dir", "storage_options"):
            if d[optional] is None:
                del d[optional]
        return d

    def storage(self, rel: str = ""):
        """The run directory's :class:`harness.storage.Storage` (or that of ``rel`` under it)."""
        from harness.storage import open_storage
        root = open_storage(self.run_dir, **(self.storage_options or {}))
        return root.child(rel) if rel else root

    def artifact_storage(self):
        from harness.storage import open_storage
        if self.artifacts_dir:
            return open_storage(self.artifacts_dir, **(self.storage_options or {}))
        return self.storage("artifacts")

    @classmethod
    def from_dict(cls, d: dict) -> "RunInfo":
        return cls(**{**d, "resources": ResourcesSpec(**d["resources"])})


@dataclass(frozen=True)
class Cell:
    """The unit of work of one Tune trial: one method (all its stages), one dataset, one seed.

    ``method_config`` is the plugin's validated config, dumped (:meth:`plugin` rebuilds
    it once per process). ``search``: the method's hyperparameter search, if any;
    each sampled configuration is a copy made by :meth:`with_sampled`. The
    ``checkpoint*`` fields are set only for ``detbench eval`` cells.
    """
    cell_id: str
    method: str
    label: str
    variant: str
    stages: tuple[str, ...]
    method_config: dict
    detector: DetectorSpec
    arch: str
    schedule: ScheduleSpec
    dataset: PreparedDataset
    seed: int
    search: SearchSpec | None = None
    conditions: tuple[PreparedCondition, ...] = ()
    checkpoint: str | None = None
    checkpoint_sha256: str | None = None
    checkpoint_classes: tuple[str, ...] | None = None

    @cached_property
    def plugin(self):
        """The method plugin configured as this cell says (built once per process)."""
        from harness.plugin import METHODS
        return METHODS.get(self.method)(self.method_config)

    @property
    def trials(self) -> int:
        """Trials the cell runs: ``num_samples`` for a search, else one."""
        return self.search.num_samples if self.search else 1

    def with_sampled(self, sampled: dict[str, Any]) -> "Cell":
        """A copy with Tune-sampled values: ``schedule.<field>`` or a method config field."""
        if not sampled:
            return self
        config, schedule = dict(self.method_config), self.schedule.model_dump()
        for key, value in sampled.items():
            group, _, name = key.rpartition(".")
            (schedule if group == "schedule" else config)[name] = value.item() if hasattr(value, "item") else value
        return replace(self, method_config=json.loads(json.dumps(config)), schedule=ScheduleSpec(**schedule))

    def sampled_values(self) -> dict[str, Any]:
        """The value of every searched key in this (sampled) cell, keyed like the search space."""
        if not self.search:
            return {}
        schedule = self.schedule.model_dump()
        return {k: self.method_config.get(k, schedule.get(k.split(".")[-1])) for k in self.search.space}

    def to_dict(self) -> dict:
        """JSON-able, the layout of ``run.json``'s cells (and of the config hash's input)."""
        d = {"cell_id": self.cell_id, "method": self.method, "label": self.label, "stages": list(self.stages),
             "variant": self.variant, "method_config": self.method_config,
             "detector": self.detector.model_dump(), "arch": self.arch, "schedule": self.schedule.model_dump(),
             "dataset": self.dataset.to_dict(), "seed": self.seed,
             "search": self.search.model_dump() if self.search else None,
             "conditions": [c.to_dict() for c in self.conditions]}
        if self.checkpoint is not None:
            d.update(checkpoint=self.checkpoint, checkpoint_sha256=self.checkpoint_sha256,
                     checkpoint_classes=list(self.checkpoint_classes) if self.checkpoint_classes else None)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Cell":
        classes = d.get("checkpoint_classes")
        return cls(cell_id=d["cell_id"], method=d["method"], label=d["label"], variant=d["variant"],
                   stages=tuple(d["stages"]), method_config=dict(d["method_config"]),
                   detector=DetectorSpec(**d["detector"]), arch=d["arch"], schedule=ScheduleSpec(**d["schedule"]),
                   dataset=PreparedDataset(**d["dataset"]), seed=int(d["seed"]),
                   search=SearchSpec(**d["search"]) if d.get("search") else None,
                   conditions=tuple(PreparedCondition(**c) for c in d.get("conditions", [])),
                   checkpoint=d.get("checkpoint"), checkpoint_sha256=d.get("checkpoint_sha256"),
                   checkpoint_classes=tuple(classes) if classes else None)


@dataclass
class StageOutput:
    """What one stage of a trial produced, as the trial reports and records it.

    ``final``: clean evaluation metrics (and the cost figures); ``conditions``: label ->
    metrics of each degraded test set; ``reused`` / ``artifact``: an earlier stage taken
    from the shared artifact store (``artifact`` is its key).
    """
    status: str                                   # ok | failed
    history: list[dict] = field(default_factory=list)
    final: dict = field(default_factory=dict)
    conditions: dict[str, dict] = field(default_factory=dict)
    resumes: int = 0
    node_id: str = ""
    reason: str = ""
    traceback: str = ""
    reused: bool = False
    artifact: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @classmethod
    def failed(cls, reason: str, **kw) -> "StageOutput":
        return cls(status="failed", reason=reason, **kw)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "StageOutput":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


__all__ = ["Cell", "RunInfo", "StageOutput"]
