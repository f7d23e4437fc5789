"""What a trial hands its Ray Train workers (:class:`WorkerJob`), and where a process runs.

The job is a typed record on both sides; it becomes a plain dict only as Train's
``train_loop_config`` (the Ray boundary), through :meth:`WorkerJob.to_dict` /
:meth:`WorkerJob.from_dict`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from harness.plan import Cell, RunInfo

TRIAL_CPU = 0.01  # the trial driver itself: enough to be scheduled, small enough for workers to fit


@dataclass(frozen=True)
class WorkerJob:
    """The stages one Train run trains for a trial.

    ``artifacts``: earlier stage -> key of its committed artifact (reused, not run);
    ``produce``: earlier stage of ``stages`` -> the key rank 0 publishes its detector under;
    ``run`` / ``trial_id``: the artifact store and where the final evaluations' detections
    are kept (None: neither -- the benchmark's bare loop); ``threads``: torch threads per
    worker; ``fit_started``: when the trial asked for the group (its start-up cost).
    """
    cell: Cell
    stages: tuple[str, ...]
    threads: int = 1
    artifacts: dict[str, str] = field(default_factory=dict)
    produce: dict[str, str] = field(default_factory=dict)
    run: RunInfo | None = None
    trial_id: str = ""
    fit_started: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        d = {"cell": self.cell.to_dict(), "stages": list(self.stages), "threads": self.threads,
             "artifacts": dict(self.artifacts), "produce": dict(self.produce), "trial_id": self.trial_id,
             "fit_started": self.fit_started}
        if self.run is not None:
            d["run"] = self.run.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "WorkerJob":
        return cls(cell=Cell.from_dict(d["cell"]), stages=tuple(d["stages"]), threads=max(1, int(d["threads"])),
                   artifacts=dict(d.get("artifacts", {})), produce=dict(d.get("produce", {})),
                   run=RunInfo.from_dict(d["run"]) if d.get("run") else None, trial_id=d.get("trial_id", ""),
                   fit_started=float(d.get("fit_started", time.time())))


def node_id() -> str:
    """This process's Ray node id ("" outside Ray)."""
    import ray
    try:
        return ray.get_runtime_context().get_node_id()
    except Exception:
        return ""
