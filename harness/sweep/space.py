"""A cell's trials as Tune sees them: the search space's encoding for Tune and back.

Tune's config is plain JSON (the Ray boundary): :func:`trial_config` writes a cell and
its run into it, :func:`trial_cell` reads a trial's cell back with the sampled values.
"""
from __future__ import annotations

from harness.plan import Cell, RunInfo

#: Tune flattens nested config keys on "/" and ".", so a search key ``schedule.lr`` travels as
#: ``schedule|lr`` under the trial config's ``hp``; :func:`sampled_params` decodes it.
_KEY_SEP = "|"


def tune_space(space: dict) -> dict:
    """The suite's search space as Tune distributions, keys encoded for Tune."""
    from ray import tune
    out = {}
    for key, dist in space.items():
        (kind, args), = dist.items()
        fn = {"uniform": tune.uniform, "loguniform": tune.loguniform, "randint": tune.randint,
              "choice": lambda *a: tune.choice(list(a))}[kind]
        out[key.replace(".", _KEY_SEP)] = fn(*args)
    return out


def sampled_params(config: dict) -> dict:
    """The values Tune sampled for a trial, keyed like the suite's search space."""
    return {k.replace(_KEY_SEP, "."): v for k, v in config.get("hp", {}).items()}


def trial_config(cell: Cell, run: RunInfo) -> dict:
    """The Tune config of a cell's trials (plain JSON: the Ray boundary)."""
    return {"cell": cell.to_dict(), "run": run.to_dict()}


def trial_cell(config: dict) -> Cell:
    """A trial's cell, with its sampled values applied (the other side of :func:`trial_config`)."""
    return Cell.from_dict(config["cell"]).with_sampled(sampled_params(config))
